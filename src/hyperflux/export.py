"""Compressed checkpoints: a pruned model stored in the space its non-zero weights need.

A plain safetensors file keeps every zero of a pruned model. `save_sparse` writes each tensor in the smallest of
three forms, chosen per tensor:

- ``dense``: the tensor as it is (small, non-float or barely sparse tensors);
- ``bitmask``: the non-zero values in row-major order plus one bit per element (`numpy.packbits`), under
  ``NAME:values`` and ``NAME:mask``;
- ``csr``: the tensor seen as a matrix (first dimension by the rest), its non-zero values, the number of
  non-zeros per row (``NAME:counts``) and their column indices (``NAME:columns``), each index array in the
  narrowest integer type that holds it (uint8, int16 or int32).

The file's metadata holds ``format`` (`FORMAT`), ``format_version`` (`FORMAT_VERSION`) and ``tensors``, a JSON
list giving every original key in order with its form, shape and dtype. Loading decodes and checks every tensor
before anything is written into a model, so a truncated, foreign or mismatched file raises ValueError and leaves
the model as it was. Zeros come back as +0.0 (a -0.0 of the squashed weights reads as 0.0).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file
from torch import nn

from hyperflux.runfiles import atomic_write

FORMAT = "hyperflux-sparse"
FORMAT_VERSION = 1
_SEP = ":"


def _index_dtype(limit: int) -> torch.dtype:
    """The narrowest integer type holding 0..limit-1 (uint8 is the only unsigned one torch handles fully)."""
    if limit <= 256:
        return torch.uint8
    if limit <= 2**15:
        return torch.int16
    return torch.int32


def _encode(name: str, tensor: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The smallest stored form of one tensor: its metadata entry and the arrays to write."""
    tensor = tensor.detach().cpu().contiguous()
    entry: dict[str, Any] = {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype)[6:]}
    numel, item = tensor.numel(), tensor.element_size()
    if not tensor.is_floating_point() or numel == 0:
        return entry | {"form": "dense"}, {name: tensor.clone()}
    nonzero = tensor.reshape(-1) != 0
    nnz = int(nonzero.sum())
    rows = tensor.shape[0] if tensor.dim() > 1 else 1
    columns = numel // rows
    matrix_nonzero = nonzero.reshape(rows, columns)
    counts = matrix_nonzero.sum(dim=1)
    count_dtype = _index_dtype(int(counts.max()) + 1)
    column_dtype = _index_dtype(columns)
    sizes = {
        "dense": numel * item,
        "bitmask": math.ceil(numel / 8) + nnz * item,
        "csr": nnz * (item + torch.empty(0, dtype=column_dtype).element_size())
        + rows * torch.empty(0, dtype=count_dtype).element_size(),
    }
    form = min(sizes, key=lambda key: (sizes[key], key != "dense"))  # ties stay dense
    if form == "dense":
        return entry | {"form": "dense"}, {name: tensor.clone()}
    values = tensor.reshape(-1)[nonzero].clone()
    if form == "bitmask":
        mask = torch.from_numpy(np.packbits(nonzero.numpy()))
        return entry | {"form": "bitmask"}, {f"{name}{_SEP}values": values, f"{name}{_SEP}mask": mask}
    column_index = matrix_nonzero.nonzero()[:, 1].to(column_dtype)
    return entry | {"form": "csr"}, {
        f"{name}{_SEP}values": values,
        f"{name}{_SEP}counts": counts.to(count_dtype),
        f"{name}{_SEP}columns": column_index,
    }


def _state_of(model: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    state = model.state_dict() if isinstance(model, nn.Module) else model
    masked = [key for key in state if "parametrizations" in key.split(".")]
    if masked:
        raise ValueError(
            f"the model still has its masks ({masked[0]}); save the squashed model (hf.squash()) instead"
        )
    converted = [key for key, tensor in state.items() if tensor.layout != torch.strided]
    if converted:
        raise ValueError(
            f"{converted[0]} is a sparse-layout tensor (a model converted by to_sparse_inference?); save the "
            "squashed model before converting it"
        )
    return state


def save_sparse(
    model: nn.Module | Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a squashed model (or its state dict) to `path` with each tensor in its smallest form.

    `metadata` adds string entries to the file's header (the format's own keys cannot be overridden). The file
    is written beside `path` and renamed into place, so a crash never leaves a half-written file there.
    """
    path = Path(path)
    entries, arrays = [], {}
    for name, tensor in _state_of(model).items():
        if _SEP in name:
            raise ValueError(f"tensor name {name!r} contains {_SEP!r}, which the sparse format reserves")
        entry, stored = _encode(name, tensor)
        entries.append(entry)
        arrays |= stored
    header = dict(metadata or {}) | {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "tensors": json.dumps(entries),
    }
    atomic_write(path, save(arrays, metadata=header))
    return path


def _decode(entry: dict[str, Any], arrays: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One dense tensor back from its stored form, every length and index checked."""
    name, form = entry["name"], entry["form"]
    shape = torch.Size(entry["shape"])
    dtype = getattr(torch, entry["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name}: unknown dtype {entry['dtype']!r}")
    if form == "dense":
        tensor = arrays[name]
        if tensor.shape != shape or tensor.dtype != dtype:
            raise ValueError(
                f"{name}: stored as {tuple(tensor.shape)} {tensor.dtype}, listed as {tuple(shape)}"
            )
        return tensor
    values = arrays[f"{name}{_SEP}values"]
    numel = shape.numel()
    if values.dtype != dtype or values.dim() != 1:
        raise ValueError(f"{name}: values are {values.dtype} {tuple(values.shape)}, expected {dtype}")
    if form == "bitmask":
        packed = arrays[f"{name}{_SEP}mask"]
        if packed.dtype != torch.uint8 or packed.numel() != math.ceil(numel / 8):
            raise ValueError(f"{name}: the bitmask does not cover {numel} elements")
        nonzero = torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).astype(bool))
        if int(nonzero.sum()) != values.numel():
            raise ValueError(f"{name}: {values.numel()} values for {int(nonzero.sum())} set bits")
        flat = torch.zeros(numel, dtype=dtype)
        flat[nonzero] = values
        return flat.reshape(shape)
    if form != "csr":
        raise ValueError(f"{name}: unknown storage form {form!r}")
    counts = arrays[f"{name}{_SEP}counts"].long()
    column_index = arrays[f"{name}{_SEP}columns"].long()
    rows = shape[0] if len(shape) > 1 else 1
    columns = numel // rows if rows else 0
    if (
        counts.numel() != rows
        or int(counts.sum()) != values.numel()
        or column_index.numel() != values.numel()
    ):
        raise ValueError(f"{name}: row counts, column indices and values disagree")
    if values.numel() and (int(column_index.min()) < 0 or int(column_index.max()) >= columns):
        raise ValueError(f"{name}: a column index is outside 0..{columns - 1}")
    row_index = torch.repeat_interleave(torch.arange(rows), counts)
    matrix = torch.zeros(rows, columns, dtype=dtype)
    matrix[row_index, column_index] = values
    return matrix.reshape(shape)


def read_sparse(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The dense state dict (original keys and order) and the header metadata of a `save_sparse` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or foreign): {error}") from None
    if header.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a hyperflux sparse file (no format={FORMAT!r} in its metadata); "
            "a plain safetensors file loads with safetensors.torch.load_file"
        )
    version = header.get("format_version", "")
    if version != str(FORMAT_VERSION):
        raise ValueError(f"{path}: sparse format version {version!r}; this hyperflux reads {FORMAT_VERSION}")
    try:
        entries = json.loads(header["tensors"])
        state = {entry["name"]: _decode(entry, arrays) for entry in entries}
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, RuntimeError) as error:
        raise ValueError(f"{path}: a damaged sparse file ({type(error).__name__}: {error})") from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return state, header


def load_sparse(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    inference: bool = False,
    example: torch.Tensor | None = None,
) -> dict[str, torch.Tensor] | nn.Module:
    """Read a `save_sparse` file: the dense state dict, or `model` with it loaded (and returned).

    `model` must have exactly the file's keys and shapes; nothing is copied into it unless all match.
    `inference=True` then converts it with `to_sparse_inference(model, example)`, measuring each layer on
    `example` when given.
    """
    state, _ = read_sparse(path)
    if model is None:
        if inference:
            raise ValueError("inference=True needs the model skeleton to load into (model=...)")
        return state
    expected = model.state_dict()
    converted = [key for key, tensor in expected.items() if tensor.layout != torch.strided]
    if converted:  # torch's loader would fail on it halfway, with the tensors before it already copied
        raise ValueError(
            f"{converted[0]} is a sparse-layout tensor (a model converted by to_sparse_inference?); load the "
            "file into the plain model, with inference=True to convert it afterwards"
        )
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [key for key in expected if key in state and expected[key].shape != state[key].shape]
    if missing or unexpected or wrong:
        masked = any("parametrizations" in key.split(".") for key in expected)
        raise ValueError(
            f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shape {wrong[:3]}"
            + (
                "; the model still has its masks: load the file's state, model.load_state_dict("
                "load_sparse(path)), which a prepared model takes as it takes a dense checkpoint"
                if masked
                else ""
            )
        )
    model.load_state_dict(state)
    if inference:
        from hyperflux.sparse_inference import to_sparse_inference

        return to_sparse_inference(model, example, inplace=True)
    return model


def file_sizes(model: nn.Module | Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(bytes of a plain safetensors file, bytes of the `save_sparse` file) of the same squashed model."""
    with tempfile.TemporaryDirectory() as folder:
        dense, sparse = Path(folder) / "dense.safetensors", Path(folder) / "sparse.safetensors"
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in _state_of(model).items()}, str(dense))
        save_sparse(model, sparse)
        return dense.stat().st_size, sparse.stat().st_size
