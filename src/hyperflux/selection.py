"""Which tensors get a mask: module types, names or regular expressions, an ignore list, per-layer overrides."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

DEFAULT_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# The tensors masked in a module of a selected type, where they are not its `weight`: attention's input
# projections (packed, or one per input when the key and value sizes differ; its output projection is a
# Linear), and a recurrent cell's (RNNCell, LSTMCell, GRUCell: read at each call, unlike nn.RNN's).
MASKED_TENSORS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
    nn.RNNCellBase: ("weight_ih", "weight_hh"),
}
OVERRIDE_KEYS = frozenset({"min_density", "pressure_scale"})


@dataclass
class Target:
    """One masked tensor: where it lives and its per-layer settings."""

    name: str
    module_name: str
    module: nn.Module
    param_name: str
    min_density: float = 0.0
    pressure_scale: float = 1.0

    @property
    def numel(self) -> int:
        """Counted on the stored tensor once masked: reading the masked weight runs the gate."""
        if parametrize.is_parametrized(self.module, self.param_name):
            return self.module.parametrizations[self.param_name].original.numel()
        return getattr(self.module, self.param_name).numel()

    @property
    def floor(self) -> int:
        """The fewest weights this tensor keeps: `min_density` of it rounded up, after shedding float noise
        (0.07 of 100 weights is 7, where `ceil(0.07 * 100)` says 8)."""
        return math.ceil(round(self.min_density * self.numel, 6))


def _matches(pattern: str, target: Target) -> bool:
    return (
        re.fullmatch(pattern, target.name) is not None
        or re.fullmatch(pattern, target.module_name) is not None
    )


def _own_ignores(model: nn.Module) -> list[str]:
    """The `hyperflux_ignore` patterns the model and each of its submodules carry, a submodule's prefixed with
    its name: a ViT keeps its patch embedding dense inside a wrapper (a LightningModule's `self.model`,
    `torch.compile`, DataParallel) too."""
    found = []
    for module_name, module in model.named_modules():
        patterns = _compile_all(getattr(module, "hyperflux_ignore", ()), "hyperflux_ignore")
        prefix = re.escape(f"{module_name}.") if module_name else ""
        found += [f"{prefix}(?:{pattern})" for pattern in patterns]
    return found


def _compile_all(patterns: Iterable[str], what: str) -> list[str]:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{what} pattern {pattern!r} is not a valid regular expression: {err}") from None
    return patterns


def _refusal(module: nn.Module, param_name: str, name: str, weight: torch.Tensor | None) -> str | None:
    """Why the tensor `name` cannot be masked, or None when it can (or is absent: `weight` None)."""
    if isinstance(module, nn.RNNBase):
        return (
            f"{type(module).__name__} layers cannot be masked: they run on the weights they gathered when built "
            "(`_flat_weights`), so a parametrization never reaches their forward pass; leave them out"
        )
    if parametrize.is_parametrized(module, param_name):
        kinds = [type(p).__name__ for p in getattr(module.parametrizations, param_name)]
        if "HardGate" in kinds:
            return f"{name} already has a hyperflux mask (was this model prepared twice?)"
        return (
            f"{name} is already parametrized ({', '.join(kinds)}); hyperflux masks plain weights: remove that "
            f"parametrization first (torch.nn.utils.parametrize.remove_parametrizations) or leave {name} out"
        )
    if weight is not None and param_name not in module._parameters and param_name not in module._buffers:
        return (
            f"{name} is not a parameter but a tensor a hook computes from others (torch.nn.utils.weight_norm or "
            "spectral_norm, say), which a mask cannot reach: remove that hook (torch.nn.utils.remove_weight_norm, "
            f"remove_spectral_norm) or leave {name} out"
        )
    if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse:
        return (
            f"{name} belongs to an embedding with sparse=True, whose sparse gradient a mask cannot take: build "
            f"it with sparse=False or leave {name} out"
        )
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return f"{name} is not initialised yet (a lazy module): run one batch through the model first"
    if weight is not None and not weight.is_floating_point():
        return f"{name} has dtype {weight.dtype}; only floating-point weights can be masked"
    return None


def _tensor_names(module: nn.Module) -> tuple[str, ...]:
    """The names of the tensors a selected module has masked: its `weight`, those of `MASKED_TENSORS`, or a
    recurrent layer's, which `_refusal` refuses."""
    if isinstance(module, nn.RNNBase):
        return tuple(n for n in module._flat_weights_names if n.startswith("weight"))
    for kind, names in MASKED_TENSORS.items():
        if isinstance(module, kind):
            return names
    return ("weight",)


def _no_match(what: str, pattern: str, candidates: Sequence[Target]) -> ValueError:
    shown = ", ".join(t.name for t in candidates[:6]) + (", ..." if len(candidates) > 6 else "")
    return ValueError(
        f"{what} pattern {pattern!r} matches no prunable tensor (candidates: {shown or 'none'})"
    )


def _check_fraction_range(name: str, value: float, low: float, high: float) -> float:
    value = float(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _refuse_tied(model: nn.Module, selected: list[Target]) -> None:
    """A masked weight must not be shared with another parameter (tied weights, such as a language model's head
    and embedding): the other user would read the unmasked tensor in training and the masked one after
    `squash()`, which writes into the shared tensor."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, parameter in module._parameters.items():
            if parameter is not None:
                name = f"{module_name}.{param_name}" if module_name else param_name
                owners.setdefault(id(parameter), []).append((name, module, param_name))
    for target in selected:
        # one module reached under two names (a layer applied twice) has one mask, which both uses read
        others = [
            name
            for name, module, param_name in owners.get(id(getattr(target.module, target.param_name)), [])
            if module is not target.module or param_name != target.param_name
        ]
        if others:
            raise ValueError(
                f"{target.name} is the same tensor as {', '.join(others)} (tied weights), which its mask would "
                f"reach too; leave tied weights out (ignore), untie them, or keep one owner and let the other "
                "use read it (a head computing F.linear(h, self.embed.weight) reads the masked weight)"
            )


def select_targets(
    model: nn.Module,
    modules: Sequence[type[nn.Module]] = DEFAULT_MODULES,
    names: Sequence[str] | str | None = None,
    ignore: Sequence[str] | str | None = None,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
    min_density: float = 0.0,
) -> list[Target]:
    """The `weight` of every module of the given types (for `nn.MultiheadAttention`, its input projection
    weights), filtered by names and ignore patterns.

    Patterns are regular expressions matched in full against the tensor name (`"fc1.weight"`) or the module
    name (`"fc1"`), so an exact name is a pattern too. When `ignore` is None the `hyperflux_ignore` attributes
    of the model and of its submodules (if any) are used, e.g. a ViT's patch embedding and head.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a torch.nn.Module, got {type(model).__name__}")
    min_density = _check_fraction_range("min_density", min_density, 0.0, 1.0)
    module_types = () if isinstance(modules, type | str) else tuple(modules)
    if not module_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in module_types):
        raise ValueError(f"modules must be a non-empty sequence of nn.Module subclasses, got {modules!r}")

    candidates: list[Target] = []
    refused: dict[str, str] = {}  # tensors that cannot be masked, refused only if the selection keeps them
    offered: dict[type[nn.Module], tuple[str, bool]] = {}  # a type's first layer; whether any had a tensor
    for module_name, module in model.named_modules():
        if not isinstance(module, module_types):
            continue
        before = len(candidates)
        for param_name in _tensor_names(module):
            name = f"{module_name}.{param_name}" if module_name else param_name
            weight = (
                None if parametrize.is_parametrized(module, param_name) else getattr(module, param_name, None)
            )
            weight = weight if isinstance(weight, torch.Tensor) else None
            reason = _refusal(module, param_name, name, weight)
            if weight is None and reason is None:
                continue
            if reason is not None:
                refused[name] = reason
            candidates.append(Target(name, module_name, module, param_name, min_density=min_density))
        for kind in module_types:
            if isinstance(module, kind):
                first, any_tensor = offered.get(kind, (module_name, False))
                offered[kind] = first, any_tensor or len(candidates) > before
    for kind, (first, any_tensor) in offered.items():
        if not any_tensor:
            parameters = [n for n, _ in model.get_submodule(first).named_parameters(recurse=False)]
            raise ValueError(
                f"modules: no {kind.__name__} layer has a tensor hyperflux can mask ({first or 'the model'}'s "
                f"own parameters: {', '.join(parameters) or 'none'}); it masks a layer's `weight` (and "
                "attention's and recurrent cells' input weights): leave the type out, or name its parameter "
                "`weight`"
            )

    selected = candidates
    if names is not None:
        patterns = _compile_all(names, "names")
        for pattern in patterns:
            if not any(_matches(pattern, t) for t in candidates):
                raise _no_match("names", pattern, candidates)
        selected = [t for t in candidates if any(_matches(p, t) for p in patterns)]

    if ignore is None:
        for pattern in _own_ignores(model):
            selected = [t for t in selected if not _matches(pattern, t)]
    else:
        for pattern in _compile_all(ignore, "ignore"):
            if not any(_matches(pattern, t) for t in selected):
                raise _no_match("ignore", pattern, selected)
            selected = [t for t in selected if not _matches(pattern, t)]

    if not selected:
        kinds = ", ".join(t.__name__ for t in module_types)
        raise ValueError(
            f"nothing to prune in {type(model).__name__}: no {kinds} weight is left after selection"
        )

    for target in selected:
        if target.name in refused:
            raise ValueError(refused[target.name])
    _refuse_tied(model, selected)
    for pattern, settings in (overrides or {}).items():
        _compile_all([pattern], "overrides")
        if not isinstance(settings, Mapping):
            raise ValueError(
                f"overrides[{pattern!r}] must map setting names to values ({{'min_density': 0.1}}), got {settings!r}"
            )
        unknown = set(settings) - OVERRIDE_KEYS
        if unknown:
            raise ValueError(
                f"overrides[{pattern!r}] has unknown key(s) {sorted(unknown)}; known: {sorted(OVERRIDE_KEYS)}"
            )
        hits = [t for t in selected if _matches(pattern, t)]
        if not hits:
            raise _no_match("overrides", pattern, selected)
        for target in hits:
            if "min_density" in settings:
                target.min_density = _check_fraction_range(
                    f"overrides[{pattern!r}].min_density", settings["min_density"], 0.0, 1.0
                )
            if "pressure_scale" in settings:
                scale = float(settings["pressure_scale"])
                if not scale >= 0 or scale == float("inf"):
                    raise ValueError(
                        f"overrides[{pattern!r}].pressure_scale must be finite and >= 0, got {scale}"
                    )
                target.pressure_scale = scale
    return selected
