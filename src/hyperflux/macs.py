"""Multiply-accumulates (MACs; FLOPs are about twice as many) per sample of one forward pass, dense and
counting present weights only.

The ratio of the two is the most that unstructured sparsity could save in arithmetic; what it saves in time
depends on the kernels (`to_sparse_inference`, BENCHMARKS.md). Counted from one real forward pass in eval mode
(so batch-norm statistics are left alone and test passes never add up: the counter is a function, not a
running total), for Linear and Conv1d/2d/3d layers: a layer costs its weights (dense) or its non-zero weights
(sparse) once per output position; `nn.MultiheadAttention` its projections' weights once per token of their input
(query, key, value) or output. Other operations (attention's products, norms, activations, pooling) are not
counted; the table names the layers that are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hyperflux.modes import eval_mode
from hyperflux.selection import DEFAULT_MODULES
from hyperflux.table import text_table


@dataclass(frozen=True)
class LayerMacs:
    """One layer's MACs per sample: `dense` with every weight, `sparse` with its non-zero weights only."""

    name: str
    dense: int
    sparse: int


@dataclass(frozen=True)
class MacCount:
    """Per-layer and total MACs per sample of one forward pass."""

    layers: tuple[LayerMacs, ...]

    @property
    def dense(self) -> int:
        return sum(layer.dense for layer in self.layers)

    @property
    def sparse(self) -> int:
        return sum(layer.sparse for layer in self.layers)

    @property
    def reduction(self) -> float:
        """How many times fewer MACs the present weights cost than all of them."""
        return self.dense / max(self.sparse, 1)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "dense_macs_per_sample": self.dense,
            "sparse_macs_per_sample": self.sparse,
            "reduction": self.reduction,
        }

    def table(self) -> str:
        rows = [(layer.name, f"{layer.dense:,}", f"{layer.sparse:,}", _times(layer)) for layer in self.layers]
        rows.append(("total", f"{self.dense:,}", f"{self.sparse:,}", f"{self.reduction:.1f}x"))
        return text_table(("layer", "MACs/sample dense", "MACs/sample sparse", "fewer"), rows)


def _attention_uses(
    attention: nn.MultiheadAttention, args: tuple, kwargs: dict, samples: int
) -> list[tuple[torch.Tensor, int]]:
    """Each projection's weight and the tokens per sample it was applied to: query, key and value's, then the
    output projection's, which torch applies through its weight (its Linear's own forward never runs)."""
    inputs = [args[i] if i < len(args) else kwargs[key] for i, key in enumerate(("query", "key", "value"))]
    if attention.in_proj_weight is not None:
        weights = attention.in_proj_weight.chunk(3)
    else:
        weights = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
    tokens = [x.numel() // x.shape[-1] // samples for x in inputs]
    return [*zip(weights, tokens, strict=True), (attention.out_proj.weight, tokens[0])]


def _times(layer: LayerMacs) -> str:
    return f"{layer.dense / layer.sparse:.1f}x" if layer.sparse else "all"


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> MacCount:
    """MACs per sample of `model` on `example`, a batch whose first dimension counts the samples.

    Works on a prepared model (masked weights count as absent), a squashed one and a dense one alike.
    """
    if example.dim() < 1 or example.shape[0] < 1:
        raise ValueError(
            f"example must be a batch with at least one sample, got shape {tuple(example.shape)}"
        )
    samples = example.shape[0]
    found: dict[str, LayerMacs] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            if isinstance(module, nn.MultiheadAttention):
                uses = _attention_uses(module, args, kwargs, samples)
            else:
                channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
                uses = [(module.weight, output.numel() // channels // samples)]
            dense = sum(weight.numel() * positions for weight, positions in uses)
            sparse = sum(int(torch.count_nonzero(weight)) * positions for weight, positions in uses)
            earlier = found.get(name, LayerMacs(name, 0, 0))  # a layer called twice costs twice
            found[name] = LayerMacs(name, earlier.dense + dense, earlier.sparse + sparse)

        return record

    handles = [
        module.register_forward_hook(hook(name), with_kwargs=True)
        for name, module in model.named_modules()
        if isinstance(module, (*DEFAULT_MODULES, nn.MultiheadAttention))
    ]
    try:
        with eval_mode(model):
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        raise ValueError("the model has no Linear or Conv layer that ran on the example")
    return MacCount(tuple(found.values()))
