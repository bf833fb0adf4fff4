"""Sparse inference on CPU: pruned Linear and Conv2d layers computed from their non-zero weights only.

Unstructured sparsity pays only where a sparse kernel beats a dense BLAS call that is far better tuned: large
layers, low density, and enough work per call to amortise the sparse kernel's overhead; small layers at small
batches and convolutions (whose im2col copies cost more than the product) often do not. So each layer is
converted only when measured faster at the example's batch, and runs dense below the measured crossover batch
when it is slower at batch 1; the measurements are kept in the plan (`plan_sparse_inference`) for anyone to
read.

The sparse modules keep W in CSR and compute with hyperflux's compiled kernel (`hyperflux.kernels`), or, where
that kernel cannot be built, with torch's sparse CSR matmul on ``W @ x.T``. Both return a batch of more than
two rows as the transposed view of a feature-major result, so that only the first layer of a chain (with
elementwise activations between) transposes its input; the values are those of the dense layer.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hyperflux.gate import has_masks
from hyperflux.kernels import sparse_linear_op
from hyperflux.modes import eval_mode

# Without an example input the choice is modelled, conservatively: a Linear with at most this density and at
# least this many weights (measured faster at batch 1 and 256 on the CPUs this was built on).
MODELLED_DENSITY = 0.05
MODELLED_MIN_WEIGHTS = 2**17
# A layer converts only when measured at least this much faster: a tie within the machine's timing noise
# (a few percent here) is no reason to swap a layer, and swapped ties made whole models 0.95x at batch 1.
MIN_GAIN = 0.05
# A sparse matmul reads a row of the transposed input per non-zero weight: batches are cut into blocks of
# about this many input bytes so those rows come from the L2 cache (1.7x faster on 4096-wide layers).
CACHE_BYTES = 2**20
# torch has no CPU sparse kernel for these: a converted layer cast to one computes in float32 (`_operands`)
HALF_TYPES = (torch.float16, torch.bfloat16)


def _csr(matrix: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the calls used here are stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.detach().contiguous().to_sparse_csr()


def _bias_column(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().reshape(-1, 1).clone()


def _transposed(flat: torch.Tensor) -> torch.Tensor:
    """`flat.t()` as a contiguous tensor. A sparse layer's output is already in that layout, so in a chain of
    sparse layers only the first one transposes (the others copy column blocks, or nothing); numpy's transpose
    copy is cache-blocked and about 1.5x faster than torch's on a 256x784 float batch, which is a third of
    LeNet-300-100's sparse forward."""
    transposed = flat.t()
    if transposed.is_contiguous():
        return transposed
    if flat.stride(0) == 1:  # a block of a transposed layout: its columns are contiguous, copy as they are
        return transposed.contiguous()
    if flat.device.type == "cpu" and not flat.requires_grad and flat.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.ascontiguousarray(flat.numpy().T))
    return transposed.contiguous()


class _CompiledCSR(nn.Module):
    """What SparseLinear and SparseConv2d share: `y = x W^T + b` by the compiled kernel, which reads the CSR
    arrays of the `weight` buffer. A small layer's whole call takes a few microseconds, so the arrays are
    looked up once per weight (again whenever `.to()` or `load_state_dict` puts a new weight there) and the
    buffers are read from `_buffers` (`self.weight` goes through `Module.__getattr__`, a microsecond a call)."""

    _kernel_cache: tuple[Any, ...] = ()  # (weight, bias, op, the op's arguments after the input)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (`torch.save(model)`) without the kernel cache, whose compiled function has no importable
        name; the first call after loading looks it up again."""
        state = super().__getstate__()
        state.pop("_kernel_cache", None)
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> _CompiledCSR:
        """`copy.deepcopy` (EMA copies, trainers that clone a model): torch cannot deep-copy a sparse CSR
        tensor (it asks for its storage), so the CSR weight is cloned; the kernel cache is left behind, since
        it points at this module's buffers."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_buffers":
                value = {
                    name: buffer.clone()
                    if buffer is not None and buffer.layout is torch.sparse_csr
                    else copy.deepcopy(buffer, memo)
                    for name, buffer in value.items()
                }
            elif key != "_kernel_cache":
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        return new

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """A CSR weight with another count of non-zeros replaces this one (torch copies CSR tensors of equal
        counts only); its shape, and every other key, are checked by torch's loader."""
        key, weight = prefix + "weight", self._buffers["weight"]
        incoming = state_dict.get(key)
        if (
            isinstance(incoming, torch.Tensor)
            and incoming.layout is torch.sparse_csr
            and incoming.shape == weight.shape
        ):
            incoming = incoming.to(weight.device, weight.dtype)
            if incoming.crow_indices().dtype != torch.int64:  # the compiled kernel reads int64 indices
                incoming = torch.sparse_csr_tensor(
                    incoming.crow_indices().long(),
                    incoming.col_indices().long(),
                    incoming.values(),
                    incoming.shape,
                    check_invariants=True,
                )
            self._buffers["weight"] = incoming.clone()
            self.density = incoming._nnz() / max(incoming.shape.numel(), 1)
            state_dict = {**state_dict, key: self._buffers["weight"]}
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _operands(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The CSR weight and bias to compute with: the buffers, or for a half-precision layer on the CPU (a
        converted model cast with `.to(torch.bfloat16)`), float32 copies sharing the weight's indices, made at
        each call (so that an in-place change of the buffers reaches them), since torch's CPU sparse matmul
        has no half-precision kernel."""
        buffers = self._buffers
        weight, bias = buffers["weight"], buffers["bias"]
        if not self._half_on_cpu():
            return weight, bias
        weight32 = torch.sparse_csr_tensor(
            weight.crow_indices(),
            weight.col_indices(),
            weight.values().float(),
            weight.shape,
            check_invariants=False,
        )
        return weight32, None if bias is None else bias.float()

    def _half_on_cpu(self) -> bool:
        weight = self._buffers["weight"]
        return weight.is_cpu and weight.dtype in HALF_TYPES

    def _kernel(self, x: torch.Tensor) -> tuple[Callable[..., torch.Tensor], tuple[Any, ...]] | None:
        """The compiled kernel and its arguments after the input, or None where it cannot take `x` (not
        float32 on the CPU, a gradient wanted, or no kernel built), leaving it to torch's sparse matmul. Asked
        before the input is laid out for the kernel, so that the fallback pays for no layout it does not use."""
        if not x.is_cpu or x.dtype is not torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
            return None
        op = sparse_linear_op()
        buffers = self._buffers
        cache = self._kernel_cache
        if cache and cache[0] is buffers["weight"] and cache[1] is buffers["bias"] and cache[2] is op:
            return op, cache[3]
        weight, bias = self._operands()
        if (
            op is None
            or weight.dtype is not torch.float32
            or (bias is not None and bias.dtype is not torch.float32)
        ):
            return None
        flat_bias = None if bias is None else bias.reshape(-1)
        args = (weight.crow_indices(), weight.col_indices(), weight.values(), flat_bias, weight.shape[1])
        if not self._half_on_cpu():  # float32 copies are made again at every call
            self._kernel_cache = (buffers["weight"], buffers["bias"], op, args)
        return op, args


def _computable(x: torch.Tensor) -> torch.Tensor:
    """`x` in a dtype the sparse layers compute in on its device: float32 for half precision on the CPU."""
    return x.float() if x.is_cpu and x.dtype in HALF_TYPES else x


def _density(weight: torch.Tensor) -> float:
    return int(torch.count_nonzero(weight)) / max(weight.numel(), 1)


class SparseLinear(_CompiledCSR):
    """A Linear whose weight is a CSR tensor: ``y = (W @ x.T).T + b``, bias fused into the sparse kernel.

    The sparse kernel has a fixed cost per call that a small layer at a small batch does not earn back: below
    `min_batch` rows the layer runs dense, from a dense copy of the weight kept only for that case.
    """

    def __init__(self, linear: nn.Linear, min_batch: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.density = _density(linear.weight)
        self.min_batch = min_batch
        self.register_buffer("weight", _csr(linear.weight))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("dense_weight", linear.weight.detach().clone() if min_batch > 1 else None)
        # a plain int (no module attribute lookup) keeps the dense path as cheap as nn.Linear's at batch 1
        self._dense_below = min_batch * self.in_features if min_batch > 1 else 0

    # `input`, nn.Linear's name for it, so that a layer called as `fc(input=x)` keeps working once converted
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input
        if x.numel() < self._dense_below:
            return F.linear(x, self.dense_weight, self.bias)
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        kernel = self._kernel(flat)
        out = self._product(flat) if kernel is None else kernel[0](flat, *kernel[1])
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def _product(self, flat: torch.Tensor) -> torch.Tensor:
        """`forward` where the compiled kernel does not take `flat` as it is: half precision on the CPU in
        float32 (on the kernel if it takes that), the rest on torch's sparse kernels."""
        computable = _computable(flat)
        if computable is flat:
            return self._torch_matmul(flat)
        kernel = self._kernel(computable)
        out = self._torch_matmul(computable) if kernel is None else kernel[0](computable, *kernel[1])
        return out.to(flat.dtype)

    def _torch_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        """The fallback on torch's sparse kernels: matrix-vector for one row (half the fixed cost)."""
        weight, bias = self._operands()
        if flat.shape[0] == 1:
            return (weight @ flat[0] if bias is None else torch.addmv(bias, weight, flat[0]))[None]
        return self._matmul_transposed(flat).t()

    def _matmul_transposed(self, flat: torch.Tensor) -> torch.Tensor:
        """``W @ flat.T + b`` as a contiguous (out, batch) tensor. Large inputs go in blocks of columns whose
        rows stay in the L2 cache across the sparse rows (1.4x faster on 4096-wide layers than one call),
        each block transposed or copied contiguous on its own."""
        weight, bias = self._operands()
        bias = None if bias is None else bias.unsqueeze(1)
        block = max(16, 2 ** int(math.log2(max(CACHE_BYTES // (4 * self.in_features), 1))))
        batch = flat.shape[0]
        parts = [(start, _transposed(flat[start : start + block])) for start in range(0, batch, block)]
        if len(parts) == 1:
            xt = parts[0][1]
            return weight @ xt if bias is None else torch.addmm(bias, weight, xt)
        out = flat.new_empty(self.out_features, batch)
        for start, xt in parts:
            out[:, start : start + xt.shape[1]] = (
                weight @ xt if bias is None else torch.addmm(bias, weight, xt)
            )
        return out

    def extra_repr(self) -> str:
        sparse_from = f", min_batch={self.min_batch}" if self.min_batch > 1 else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"density={self.density:.4f}{sparse_from}"
        )


class SparseConv2d(_CompiledCSR):
    """A Conv2d (groups=1, zero padding) as im2col (`F.unfold`) followed by a CSR matmul."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not supports_sparse_conv(conv):
            raise ValueError(f"{conv} has groups, string padding or non-zero padding mode")
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.density = _density(conv.weight)
        self.register_buffer("weight", _csr(conv.weight.reshape(conv.out_channels, -1)))
        self.register_buffer("bias", _bias_column(conv.bias))

    def _side(self, size: int, axis: int) -> int:
        span = self.dilation[axis] * (self.kernel_size[axis] - 1) + 1
        return (size + 2 * self.padding[axis] - span) // self.stride[axis] + 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # nn.Conv2d's name for it, as SparseLinear's
        x = input
        batched = x.dim() == 4
        images = _computable(x if batched else x.unsqueeze(0))
        n, height, width = images.shape[0], images.shape[2], images.shape[3]
        cols = F.unfold(images, self.kernel_size, self.dilation, self.padding, self.stride)
        sides = self._side(height, 0), self._side(width, 1)
        # (patch features, n * pixels): a view for one image; both paths give (channels, n * pixels)
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)
        kernel = self._kernel(cols)
        if kernel is not None:  # the kernel reads the patches feature-major as they are, and writes so
            out = kernel[0](cols.t(), *kernel[1]).t()
        else:
            weight, bias = self._operands()
            out = weight @ cols if bias is None else torch.addmm(bias, weight, cols)
        # laid out as nn.Conv2d lays out its output: channels-last for a channels-last batch
        channels_last = (
            batched and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        )
        layout = torch.channels_last if channels_last else torch.contiguous_format
        out = (
            out.to(x.dtype)
            .reshape(self.out_channels, n, *sides)
            .transpose(0, 1)
            .contiguous(memory_format=layout)
        )
        return out if batched else out[0]

    def extra_repr(self) -> str:
        return (
            f"out_channels={self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, density={self.density:.4f}"
        )


def supports_sparse_conv(conv: nn.Conv2d) -> bool:
    return conv.groups == 1 and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)


def median_ms(
    functions: list[Callable[[], Any]],
    repeats: int = 7,
    sample_s: float = 2e-3,
    device: torch.device | str | None = None,
) -> list[float]:
    """Median milliseconds per call of each function (see `sample_ms`)."""
    return [statistics.median(out) for out in sample_ms(functions, repeats, sample_s, device)]


def sample_ms(
    functions: list[Callable[[], Any]],
    repeats: int = 7,
    sample_s: float = 2e-3,
    device: torch.device | str | None = None,
) -> list[list[float]]:
    """Per function, `repeats` samples of milliseconds per call, taken in rounds that alternate between the
    functions so that drifts in machine load hit all alike (a round's samples are neighbours in time); fast
    calls are looped so that one sample lasts about `sample_s`. On a CUDA `device` each sample waits for the
    device's queued work at both ends, so that it times the kernels and not only their launches."""
    wait = _waiter(device)

    def seconds(function: Callable[[], Any], count: int) -> float:
        wait()
        start = time.perf_counter()
        for _ in range(count):
            function()
        wait()
        return time.perf_counter() - start

    loops = []
    for function in functions:
        function()  # warm-up: allocator, kernel selection
        loops.append(max(1, min(1000, round(sample_s / max(seconds(function, 1), 1e-7)))))
    samples: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for function, count, out in zip(functions, loops, samples, strict=True):
            out.append(1e3 * seconds(function, count) / count)
    return samples


def _waiter(device: torch.device | str | None) -> Callable[[], None]:
    """What waits for `device`'s queued kernels: nothing on the CPU, whose calls return when done."""
    if device is not None and torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class LayerChoice:
    """Whether one layer runs sparse, and why: `timings` maps a batch size to (dense ms, sparse ms)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    density: float
    sparse: bool
    reason: str
    timings: dict[int, tuple[float, float]] = field(default_factory=dict)
    min_batch: int = 1


def _sparse_module(module: nn.Module, min_batch: int = 1) -> nn.Module:
    return SparseLinear(module, min_batch) if isinstance(module, nn.Linear) else SparseConv2d(module)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Plain Linear and Conv2d layers (exact types: subclasses such as attention's out_proj are read by their
    owner's code, which a swapped module would break), outside batch-first transformer encoder layers, whose
    fused eval path reads their feed-forward weights directly."""
    found = []
    fused = {
        id(child)
        for owner in model.modules()
        if isinstance(owner, nn.TransformerEncoderLayer) and owner.self_attn.batch_first
        for child in owner.children()
    }
    for name, module in model.named_modules():
        if has_masks(module):
            raise ValueError(
                f"{name or 'the model'} still has its masks; convert the squashed model (hf.squash())"
            )
        if type(module) in (nn.Linear, nn.Conv2d) and id(module) not in fused:
            found.append((name, module))
    return found


@dataclass
class Comparison:
    """Dense against sparse on one input: median ms of each, and `ratio`, the median of each round's dense
    over sparse time (a round's two samples are neighbours in time, so a burst of load from elsewhere on the
    machine moves both, where a ratio of the two medians can pair a quiet sample with a loaded one)."""

    dense_ms: float
    sparse_ms: float
    ratio: float


@torch.no_grad()
def compare_ms(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, repeats: int = 7) -> Comparison:
    """Time the two forms on the same input in alternating rounds (`sample_ms`)."""
    dense_samples, sparse_samples = sample_ms([lambda: dense(x), lambda: sparse(x)], repeats, device=x.device)
    return Comparison(
        statistics.median(dense_samples),
        statistics.median(sparse_samples),
        statistics.median(d / s for d, s in zip(dense_samples, sparse_samples, strict=True)),
    )


def _faster(choice: LayerChoice, dense: nn.Module, sparse: nn.Module, x: torch.Tensor, repeats: int) -> bool:
    """Time both forms on `x`, record the times in `choice`, and say whether sparse won by `MIN_GAIN`."""
    timing = compare_ms(dense, sparse, x, repeats)
    choice.timings[x.shape[0]] = (timing.dense_ms, timing.sparse_ms)
    return timing.ratio > 1 / (1 - MIN_GAIN)


@torch.no_grad()
def _layer_inputs(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named layer sees (its first call) when the model runs on `example`."""
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str, args: tuple, kwargs: dict[str, Any]) -> None:
        # a layer called by keyword, `fc(input=x)`, has no positional arguments
        inputs.setdefault(name, args[0] if args else kwargs["input"])

    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _module, args, kwargs, name=name: keep(name, args, kwargs), with_kwargs=True
        )
        for name in names
    ]
    try:
        with eval_mode(model):  # the inference it plans for: a BatchNorm in training mode would update itself
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


@torch.no_grad()
def plan_sparse_inference(
    model: nn.Module, example: torch.Tensor | None = None, *, max_density: float = 0.3, repeats: int = 7
) -> list[LayerChoice]:
    """Choose, per Linear and Conv2d layer, whether its sparse form is faster.

    With `example` (a batch of real inputs) every layer at or below `max_density` is timed dense and sparse on
    the input it sees, at batch 1 and at the example's batch, and goes sparse if at least `MIN_GAIN` (5%)
    faster at both. A Linear that
    is faster sparse at the example's batch only goes sparse from the measured crossover batch; a Linear's
    batch counts rows, every dimension of its input but the last. Without
    it, the choice is modelled: Linear layers of at most `MODELLED_DENSITY` and `MODELLED_MIN_WEIGHTS` weights.
    """
    plan = []
    layers = _candidates(model)
    for name, module in layers:
        kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        density = _density(module.weight)
        choice = LayerChoice(name, kind, tuple(module.weight.shape), density, False, "")
        plan.append(choice)
        if kind == "conv2d" and not supports_sparse_conv(module):
            choice.reason = "groups, string padding or padding mode: no sparse form"
        elif module.weight.is_cpu and module.weight.dtype not in (torch.float32, torch.float64):
            choice.reason = (
                f"{module.weight.dtype}: kept dense (its sparse form computes in float32 on the CPU)"
            )
        elif density > max_density:
            choice.reason = f"density {density:.1%} above max_density {max_density:.0%}"
        elif example is None:
            choice.sparse = (
                kind == "linear"
                and density <= MODELLED_DENSITY
                and module.weight.numel() >= MODELLED_MIN_WEIGHTS
            )
            choice.reason = "modelled: " + (
                "large and sparse enough" if choice.sparse else "needs an example input to measure"
            )
    if example is None:
        return plan
    measured = [choice for choice in plan if not choice.reason]
    inputs = _layer_inputs(model, [choice.name for choice in measured], example)
    for choice in measured:
        if choice.name not in inputs:
            choice.reason = "not called on the example"
            continue
        dense = model.get_submodule(choice.name)
        sparse, x = _sparse_module(dense), inputs[choice.name]
        # batches as the layers count them: a Linear's rows (every dimension but the last), as SparseLinear
        # compares with min_batch, and an unbatched image as a batch of one
        x = x.reshape(-1, x.shape[-1]) if choice.kind == "linear" else x if x.dim() == 4 else x[None]
        full = x.shape[0]
        if not _faster(choice, dense, sparse, x[:full], repeats):
            choice.reason = f"measured slower sparse at batch {full}"
        elif full == 1 or _faster(choice, dense, sparse, x[:1], repeats):
            choice.sparse, choice.reason = True, f"measured faster sparse at batch 1 and {full}"
        elif choice.kind == "linear":  # slower at batch 1 only: find the crossover, doubling the batch
            batch = 2
            while batch < full and not _faster(choice, dense, sparse, x[:batch], repeats):
                batch *= 2
            choice.sparse, choice.min_batch = True, min(batch, full)
            choice.reason = f"measured faster sparse from batch {choice.min_batch}; dense below"
        else:
            choice.reason = "measured slower sparse at batch 1"
    return plan


def to_sparse_inference(
    model: nn.Module,
    example: torch.Tensor | None = None,
    *,
    plan: list[LayerChoice] | None = None,
    max_density: float = 0.3,
    repeats: int = 7,
    inplace: bool = False,
) -> nn.Module:
    """The squashed `model` with the layers that run faster sparse replaced by `SparseLinear`/`SparseConv2d`.

    The layers are chosen by `plan` or else by `plan_sparse_inference(model, example, ...)`. Outputs equal the
    dense model's to float rounding (1e-5). The result is for inference: its sparse weights are buffers, not
    parameters. `inplace=False` leaves `model` untouched.
    """
    if not inplace:
        model = copy.deepcopy(model)
    if plan is None:
        plan = plan_sparse_inference(model, example, max_density=max_density, repeats=repeats)
    for choice in plan:
        if not choice.sparse:
            continue
        sparse = _sparse_module(model.get_submodule(choice.name), choice.min_batch)
        if not choice.name:
            return sparse
        parent, _, child = choice.name.rpartition(".")
        setattr(model.get_submodule(parent), child, sparse)
    return model
