"""ONNX export of a squashed model, checked against onnxruntime when it is installed.

The ONNX file holds the dense weights with their zeros: ONNX Runtime has no general sparse kernel for
unstructured weights, so the file is as large and as fast as the dense model. It is for deployment where
ONNX is required; for size use `save_sparse`, for speed on CPU `to_sparse_inference`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from hyperflux.gate import has_masks
from hyperflux.modes import eval_mode
from hyperflux.runfiles import TMP_SUFFIX


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    *,
    check: bool = True,
    atol: float = 1e-4,
    dynamic_axes: Mapping[int, str] | None = None,
) -> float | None:
    """Write `model` to `path` as ONNX (input ``input``, output ``output``) whose input may vary in size along
    `dynamic_axes` (axis -> name; default ``{0: "batch"}``, output axis 0 following input axis 0).

    With `check` and onnxruntime importable, run the file on `example` and return the largest absolute
    difference from the model's output (ValueError above `atol`); None when it was not checked. The file is
    also run on `example` doubled along every dynamic axis, where it must agree with the model as well: the
    exporter fixes some sizes it traced (the sequence length of attention layers), which would otherwise
    surface only when the file is used.
    """
    axes = _checked_axes(example, {0: "batch"} if dynamic_axes is None else dynamic_axes)
    for name, module in model.named_modules():
        if has_masks(module):
            raise ValueError(
                f"{name or 'the model'} still has its masks, which trace as constants; export the squashed "
                "model (hf.squash())"
            )
        if any(t.layout != torch.strided for t in module.buffers(recurse=False)):
            raise ValueError(
                f"{name or 'the model'} runs hyperflux's sparse kernels (to_sparse_inference), which ONNX "
                "cannot trace; export the squashed model before converting it"
            )
    path = Path(path)
    # renamed into place once written and checked; a name of its own, as `atomic_write` gives
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        error = _export_checked(model, example, tmp, check, axes)
        if error is not None and not error <= atol:
            raise ValueError(
                f"{path}: onnxruntime's output differs from the model's by {error:.3g} (> {atol}); not written"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return error


def _checked_axes(example: torch.Tensor, axes: Mapping[int, str]) -> dict[int, str]:
    """`axes` with negative axes counted from the end, or ValueError naming what is wrong."""
    out = {}
    for axis, name in axes.items():
        if isinstance(axis, bool) or not isinstance(axis, int) or not -example.dim() <= axis < example.dim():
            raise ValueError(
                f"dynamic_axes: {axis!r} is not an axis of the {example.dim()}-dimensional example "
                f"{tuple(example.shape)}"
            )
        if not isinstance(name, str) or not name:
            raise ValueError(f"dynamic_axes: axis {axis} needs a name (a non-empty string), got {name!r}")
        if axis % example.dim() in out:
            raise ValueError(f"dynamic_axes: axis {axis} is given twice (as {axis % example.dim()} too)")
        out[axis % example.dim()] = name
    return out


def _export_checked(
    model: nn.Module, example: torch.Tensor, path: Path, check: bool, axes: dict[int, str]
) -> float | None:
    """Write the file; with `check` and onnxruntime importable, the largest difference of its output from the
    model's, on the example and on the example doubled along each dynamic axis."""
    with _as_exported(model):
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": axes, "output": {0: axes[0]} if 0 in axes else {}},
        )
    if not check:
        return None
    try:
        import onnxruntime
    except ImportError:
        return None
    grown = example
    for axis in axes:
        grown = torch.cat([grown, grown], dim=axis)
    with _as_exported(model):
        expected = model(example)
        try:
            expected_grown = model(grown)
        except Exception as error:
            raise ValueError(
                f"the model itself does not run on the example doubled along its dynamic axes {axes} "
                f"(on {tuple(grown.shape)}: {str(error).strip()[:200]}); give only the axes it can vary "
                "(dynamic_axes); not written"
            ) from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (output,) = session.run(["output"], {"input": example.detach().cpu().numpy()})
    except Exception as error:  # onnxruntime's own error types, one per status, from its compiled module
        hint = (
            f"; its CPU kernels of some operators (convolutions) take float32 only: export model.float() with "
            f"a float32 example, not {example.dtype}"
            if example.dtype != torch.float32
            else ""
        )
        raise ValueError(
            f"onnxruntime cannot run the exported model ({str(error).strip()[:300]}){hint}; not written "
            "(check=False writes it unchecked)"
        ) from None
    try:
        (output_grown,) = session.run(["output"], {"input": grown.detach().cpu().numpy()})
    except Exception as error:
        raise ValueError(
            f"the exported model runs on the example but not on it doubled along its dynamic axes {axes} "
            f"(onnxruntime on {tuple(grown.shape)}: {str(error).strip()[:200]}): the exporter fixed a size "
            "it traced, as it does for the sequence length of attention layers; export with only the axes "
            "that may vary; not written"
        ) from None
    if output_grown.shape != tuple(expected_grown.shape):
        raise ValueError(
            f"the exported model gives an output of shape {output_grown.shape} on {tuple(grown.shape)} where "
            f"the model gives {tuple(expected_grown.shape)}: the exporter fixed a size it traced; not written"
        )
    return max(
        float((torch.from_numpy(out) - want.cpu()).abs().max())
        for out, want in ((output, expected), (output_grown, expected_grown))
    )


@contextlib.contextmanager
def _as_exported(model: nn.Module) -> Iterator[None]:
    """The model as the exporter traces it: eval mode, no gradients, attention's unfused path."""
    with eval_mode(model), warnings.catch_warnings(), torch.no_grad(), _no_attention_fastpath():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        yield


@contextlib.contextmanager
def _no_attention_fastpath() -> Iterator[None]:
    """Batch-first attention and transformer layers in eval mode run torch's fused kernels, which the exporter
    cannot trace; their unfused path computes the same."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
