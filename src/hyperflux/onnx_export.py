"""ONNX export of a squashed model, checked against onnxruntime when it is installed.

The ONNX file holds the dense weights with their zeros: ONNX Runtime has no general sparse kernel for
unstructured weights, so the file is as large and as fast as the dense model. It is for deployment where
ONNX is required; for size use `save_sparse`, for speed on CPU `to_sparse_inference`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from hyperflux.gate import has_masks
from hyperflux.modes import eval_mode


def export_onnx(
    model: nn.Module, example: torch.Tensor, path: str | Path, *, check: bool = True, atol: float = 1e-4
) -> float | None:
    """Write `model` to `path` as ONNX with a dynamic batch axis (input ``input``, output ``output``).

    With `check` and onnxruntime importable, run the file on `example` and return the largest absolute
    difference from the model's output (ValueError above `atol`); None when it was not checked.
    """
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
    tmp = path.with_name(f".{path.name}.tmp")  # renamed into place once written and checked
    try:
        error = _export_checked(model, example, tmp, check)
        if error is not None and not error <= atol:
            raise ValueError(
                f"{path}: onnxruntime's output differs from the model's by {error:.3g} (> {atol}); not written"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return error


def _export_checked(model: nn.Module, example: torch.Tensor, path: Path, check: bool) -> float | None:
    """Write the file; with `check` and onnxruntime importable, the largest difference of its output."""
    with eval_mode(model), warnings.catch_warnings(), torch.no_grad(), _no_attention_fastpath():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
        expected = model(example)
    if not check:
        return None
    try:
        import onnxruntime
    except ImportError:
        return None
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
    return float((torch.from_numpy(output) - expected.cpu()).abs().max())


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
