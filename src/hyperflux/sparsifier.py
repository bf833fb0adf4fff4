"""`Hyperflux`: attaches learned L0 masks to a model and drives them through the phases of the method."""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from hyperflux.gate import FluxMeter, HardGate, register_gate
from hyperflux.kernels import add_to_grads, stats_ops, stop_flushing
from hyperflux.scheduler import PressureScheduler, _check_fraction, _check_number
from hyperflux.selection import DEFAULT_MODULES, Target, select_targets
from hyperflux.table import text_table

STATE_FORMAT = 1
STATE_KEYS = frozenset(
    (
        "format", "names", "target_sparsity", "pruning_epochs", "regrowth_epochs", "exact_target", "period",
        "frozen", "layer_scales", "meter_batches", "scheduler", "snapshot", "flux_sum", "flux_batches",
    )
)  # fmt: skip
_TRIM_LOGIT = 1e-3

# Bin edges of `stats()["flux_hist"]`, in pressure units: 0 and +-10^k for k = -6, -5.5, ..., 3 (half-decade
# steps), 39 edges and 40 bins with open ends. Bin 0 is flux < -1e3, bin i is edges[i-1] <= flux < edges[i],
# bin 39 is flux >= 1e3; an exact zero falls in [0, 1e-6). The edges never change, so histograms of
# different epochs and runs compare bin by bin.
_HALF_DECADES = [10.0 ** (k / 2) for k in range(-12, 7)]
FLUX_HIST_EDGES: tuple[float, ...] = (*(-e for e in reversed(_HALF_DECADES)), 0.0, *_HALF_DECADES)


def _pressure_value(coefs: Sequence[float], logits: Sequence[torch.Tensor]) -> torch.Tensor:
    total = logits[0].new_zeros((), dtype=torch.float32)
    for coef, m in zip(coefs, logits, strict=True):
        if coef:
            total = total + coef * m.detach().sum(dtype=torch.float32)
    return total


class _PressureLoss(torch.autograd.Function):
    """`sum_l coef_l * sum(m_l)`, whose backward hands every logit of layer l the constant `coef_l`.

    The gradient is an expanded scalar (no memory), and it scales with the loss like any other term, so
    gradient scaling (AMP) and accumulation treat it correctly.
    """

    @staticmethod
    def forward(ctx, coefs: tuple[float, ...], *logits):  # type: ignore[override]
        ctx.coefs = coefs
        ctx.shapes = [m.shape for m in logits]
        return _pressure_value(coefs, logits)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grads = [
            (grad_out * coef).expand(shape) if coef else None
            for coef, shape in zip(ctx.coefs, ctx.shapes, strict=True)
        ]
        return (None, *grads)


def _layer_stats(
    gate: HardGate, before: torch.Tensor, units: float
) -> tuple[torch.Tensor, Callable[[float, float], torch.Tensor] | None]:
    """One masked tensor's numbers for `stats()` in one float64 tensor on its device: [kept, pruned, regrown]
    since the snapshot `before` and, when flux was sampled, [survivors' minimum flux, survivors' sum, pruned
    sum] then the histogram counts of survivors and of pruned weights over `FLUX_HIST_EDGES` (flux in pressure
    units: mean flux times `units`). With it, where flux was sampled, `between(lo, hi)`: the survivors' flux
    with lo <= flux < hi (NaN for a bound leaves it out), for `_quantile`.

    Float32 CPU masks take one compiled pass (kernels.cpp, `gate_stats`); other devices and dtypes, or no
    compiled kernels, the same numbers from torch ops.
    """
    flux_sum = gate.flux_sum if gate.flux_batches else None
    logits = gate.logits.detach()
    if (ops := stats_ops()) is not None:
        numbers = ops[0](logits, before, flux_sum, gate.flux_batches, units, FLUX_HIST_EDGES)
        if numbers is not None:
            between = (
                None
                if flux_sum is None
                else functools.partial(ops[1], logits, flux_sum, gate.flux_batches, units)
            )
            return numbers, between
    mask = gate.mask()
    row = [mask.sum(), (before & ~mask).sum(), (~before & mask).sum()]
    if flux_sum is None:
        return torch.stack([value.double() for value in row]), None
    flux = gate.mean_flux() * units
    edges = torch.tensor(FLUX_HIST_EDGES, dtype=torch.float32, device=flux.device)  # the accumulators' dtype
    # survivors in bins [0, 40), pruned weights in [40, 80)
    index = torch.bucketize(flux.contiguous(), edges, right=True) + (len(edges) + 1) * (~mask)
    row += [
        torch.where(mask, flux, torch.inf).amin(),
        torch.where(mask, flux, 0.0).sum(dtype=torch.float64),
        torch.where(mask, 0.0, flux).sum(dtype=torch.float64),
    ]
    counts = torch.bincount(index.flatten(), minlength=2 * (len(edges) + 1))

    def between(lo: float, hi: float) -> torch.Tensor:
        inside = mask if math.isnan(lo) else mask & ~(flux < lo)
        return flux[inside if math.isnan(hi) else inside & (flux < hi)]

    return torch.cat([torch.stack([value.double() for value in row]), counts.double()]), between


def _quantile(
    betweens: list[Callable[[float, float], torch.Tensor]],
    edges: Sequence[float],
    survivors: list[int],
    q: float,
) -> float:
    """The q-quantile of the surviving weights' flux over all layers: the k-th smallest value, k = ceil(q * n),
    found in the one histogram bin that holds it (`survivors`, the counts per bin of `edges`), so that only
    that bin's values are gathered and ranked rather than every surviving weight's."""
    k = max(1, math.ceil(q * sum(survivors)))
    index = below = 0
    while below + survivors[index] < k:
        below += survivors[index]
        index += 1
    # bin `index` as bucketize(right=True) has it: edges[index - 1] <= flux < edges[index] (NaN in the last bin)
    lo = edges[index - 1] if index > 0 else math.nan
    hi = edges[index] if index < len(edges) else math.nan
    parts = [between(lo, hi) for between in betweens]
    return float(torch.cat([part.to(parts[0].device) for part in parts]).kthvalue(k - below).values)


def default_freeze_after(regrowth_epochs: int, exact_target: bool) -> int:
    """Regrowth periods before the masks freeze: the paper's 50, or in exact mode, which trims at the freeze,
    half the regrowth (at most 50), leaving the other half to fine-tune the trimmed mask."""
    return min(50, regrowth_epochs // 2) if exact_target else 50


class _AttachedStep:
    """Step pre- and post-hook of an attached optimiser. Before the step, each layer's P / N is added to its
    logits' gradients in place, in one call; with `flush`, and while the masks are on the CPU, the step runs with
    denormals flushed to zero (`flush_denormals`), set in that same call: a pruned weight's decaying moments
    made it several times slower, and a GPU computes them at full speed (its host-bound steps would pay for
    the flag)."""

    def __init__(self, sparsifier: Hyperflux, gate_indices: list[int], flush: bool) -> None:
        self.sparsifier = sparsifier
        self.gate_indices = gate_indices
        self.flush = flush
        self._unflush = False  # stays set through a step that raised, so that the next one turns it off
        self.seen = sparsifier.meter.batches  # the flux meter's counter after this optimiser's last step

    def before(
        self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]] | None:
        """Prepare the gradients now, or, for `step(closure)`, after each call of the closure, which computes
        them afresh (LBFGS calls it several times a step); the flux is read after its first call."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.prepare(optimizer)
            return None
        calls = 0

        def closure_then_pressure() -> Any:
            nonlocal calls
            loss = closure()
            self.prepare(optimizer, first=calls == 0)
            calls += 1
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_pressure}
        return (args[0], closure_then_pressure, *args[2:]), kwargs

    def prepare(self, optimizer: torch.optim.Optimizer, first: bool = True) -> None:
        """Take a sampled batch's flux (on a step's `first` gradients only), then add the pressure."""
        coefs = self.sparsifier._pressure_coefs()
        gates = self.sparsifier.gates
        # AMP's GradScaler hands a fused optimiser its gradients still scaled, with the scale to divide by and
        # whether they overflowed, in which case the optimiser's kernel skips the step
        scale = getattr(optimizer, "grad_scale", None)
        meter = self.sparsifier.meter
        sampled = False
        if first:
            sampled = meter.step_sampled(self.seen)
            self.seen = meter.batches
        if sampled or self.sparsifier.frozen:  # the flux, from the gradients before the pressure joins them
            found_inf = getattr(optimizer, "found_inf", None)
            # read (a GPU sync) only on a step that takes the flux
            skipped = sampled and found_inf is not None and bool(found_inf)
            for i in self.gate_indices:
                if sampled and not skipped:
                    gates[i].add_step_flux(scale)
                gates[i].refreeze()  # frozen logits thawed for a flux batch
        grads, values = [], []
        for i in self.gate_indices:
            if not coefs[i]:
                continue
            logits = gates[i].logits
            if logits.grad is None:
                # a layer this step's forward passes skipped feels the pressure all the same, as through the loss
                logits.grad = torch.zeros_like(logits)
            grads.append(logits.grad)
            values.append(coefs[i])
        flush = self.flush and gates[self.gate_indices[0]].logits.device.type == "cpu"
        self._unflush = add_to_grads(grads, values, flush, scale) or self._unflush

    def after(self, *_: object) -> None:
        sparsifier = self.sparsifier
        if sparsifier.frozen and sparsifier.meter.next_sampled():
            # compiled code never thaws frozen logits for a flux batch, as the eager gate does: the step before
            # one does (the freeze itself does not, for a DDP wrapper built after it must find them frozen)
            for i in self.gate_indices:
                sparsifier.gates[i].thaw()
        if self._unflush:
            self._unflush = False
            stop_flushing()


def _warn_of_shared_groups(
    optimizer: torch.optim.Optimizer, logit_ids: set[int], stacklevel: int = 3
) -> None:
    """Mask logits in a group with other parameters, or under weight decay, move at the weights' lr and decay
    towards 0, where every gate flips: the usual slip is an optimiser built from `model.parameters()`."""
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        if not ids & logit_ids:
            continue
        if ids - logit_ids or group.get("weight_decay"):
            warnings.warn(
                f"the mask logits share an optimiser group with other parameters or weight decay (lr "
                f"{group.get('lr')}, weight_decay {group.get('weight_decay')}); build the optimiser from "
                "hf.param_groups(), which gives them their own lr and no decay",
                stacklevel=stacklevel,
            )
            return


def _warn_of_a_small_share(model: nn.Module, modules: Sequence[type[nn.Module]], masked: int) -> None:
    """Warn when layers of types not selected (embeddings, recurrent layers: dense by default) hold more weights
    than the masked tensors: the sparsity targeted and reported is the masked tensors' alone, which would
    mislead silently."""
    dense: dict[int, tuple[int, str]] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, (*modules, parametrize.ParametrizationList)):
            continue
        for param_name, parameter in module.named_parameters(recurse=False):
            if not nn.parameter.is_lazy(parameter) and parameter.dim() > 1:
                name = f"{module_name}.{param_name}" if module_name else param_name
                size = parameter.numel()
                dense[id(parameter)] = size, f"{name} ({type(module).__name__}, {size:,})"
    left = sum(size for size, _ in dense.values())
    if left <= masked:
        return
    largest = ", ".join(text for _, text in sorted(dense.values(), reverse=True)[:3])
    warnings.warn(
        f"hyperflux masks {masked:,} weights, and layers of types it was not asked to mask hold {left:,} more, "
        f"dense (largest: {largest}): the target sparsity and every density reported count the masked tensors "
        "only; add those types to modules=(...) where they can be masked",
        stacklevel=3,
    )


def _put_flat(tensor: torch.Tensor, indices: torch.Tensor, value: float) -> None:
    """`tensor.flatten()[indices] = value`, written into `tensor` whatever its memory layout (a model moved to
    channels-last has 4-d logits whose flat view would be a copy)."""
    with torch.no_grad():
        if tensor.is_contiguous():  # a flat view: many times faster than index_put_ with unravelled indices
            tensor.view(-1).index_fill_(0, indices, value)
        else:
            tensor.index_put_(torch.unravel_index(indices, tensor.shape), tensor.new_tensor(value))


class _DenseKeyLoader:
    """load_state_dict pre-hook: lets a plain (dense) checkpoint load into a prepared model.

    `fc.weight` is moved to `fc.parametrizations.weight.original`; when the checkpoint has no logits, the
    current ones are kept, so the masks survive.
    """

    def __init__(self, param_name: str, gate: HardGate) -> None:
        self.param_name = param_name
        self.gate = gate

    def __call__(self, module, state_dict, prefix, *args) -> None:
        plain = prefix + self.param_name
        if plain not in state_dict:
            return
        base = f"{prefix}parametrizations.{self.param_name}."
        state_dict.setdefault(base + "original", state_dict[plain])
        del state_dict[plain]
        state_dict.setdefault(base + "0.logits", self.gate.logits.detach().clone())


class Hyperflux:
    """Prunes a model to `target_sparsity` inside the user's own training loop.

    Usage: build it on the model, give the optimiser `param_groups()`, add `pressure_loss()` to the loss, and
    call `step(optimizer)` once per epoch (or once every K batches: the schedule counts calls, "periods").
    Pruning lasts `pruning_epochs` periods, regrowth `regrowth_epochs`; `total_epochs` is their sum.

    `exact_target=True` (default) keeps the controller on at a lower gain during regrowth and, when the masks
    freeze, trims (or refills) by mask logit to exactly the requested count. `exact_target=False` is the
    paper's form: pressure released at regrowth, the final density ends near the target, not on it.
    """

    def __init__(
        self,
        model: nn.Module,
        target_sparsity: float | None,
        pruning_epochs: int,
        regrowth_epochs: int = 0,
        *,
        modules: Sequence[type[nn.Module]] = DEFAULT_MODULES,
        names: Sequence[str] | str | None = None,
        ignore: Sequence[str] | str | None = None,
        overrides: Mapping[str, Mapping[str, float]] | None = None,
        min_density: float = 0.0,
        exact_target: bool = True,
        scheduler: PressureScheduler | None = None,
        delta: float = 0.3,
        regrowth_delta: float | None = None,
        aggressivity: float = 6.0,
        exponent: float = 1.5,
        grad_scale: float = 0.25,
        init_logit: float = 0.2,
        mask_lr: float = 1e-3,
        regrowth_mask_lr: float | None = None,
        regrowth_decay: float = 0.75,
        freeze_after: int | None = None,
        flux_every: int = 8,
    ) -> None:
        _check_number("pruning_epochs", pruning_epochs, 1, strict=False, integer=True)
        _check_number("regrowth_epochs", regrowth_epochs, strict=False, integer=True)
        if target_sparsity is not None:
            target_sparsity = _check_fraction("target_sparsity", target_sparsity)
        if scheduler is None:
            if target_sparsity is None:
                raise ValueError(
                    "target_sparsity is required unless a constant or scheduled PressureScheduler is given"
                )
            scheduler = PressureScheduler(
                target_sparsity, pruning_epochs, aggressivity=aggressivity, delta=delta, exponent=exponent
            )
        elif (
            scheduler.mode == "trajectory"
            and target_sparsity is not None
            and (scheduler.target_sparsity != target_sparsity or scheduler.epochs > pruning_epochs)
        ):
            raise ValueError(
                f"the scheduler's trajectory reaches {scheduler.target_sparsity} sparsity in {scheduler.epochs} "
                f"periods; this sparsifier prunes to {target_sparsity} in {pruning_epochs}: give both the same "
                "target, and the trajectory no more periods than pruning has"
            )
        if exact_target and target_sparsity is None:
            raise ValueError(
                "exact_target=True needs a target_sparsity; use exact_target=False with a fixed pressure"
            )
        for name, value in (
            ("grad_scale", grad_scale),
            ("init_logit", init_logit),
            ("regrowth_delta", regrowth_delta),
        ):
            if value is not None:
                _check_number(name, value)
        for name, value in (("mask_lr", mask_lr), ("regrowth_mask_lr", regrowth_mask_lr)):
            if value is not None:
                _check_number(name, value, strict=False)
        if _check_number("regrowth_decay", regrowth_decay) > 1:
            raise ValueError(f"regrowth_decay must be in (0, 1], got {regrowth_decay}")
        if freeze_after is not None:
            _check_number("freeze_after", freeze_after, strict=False, integer=True)
        _check_number("flux_every", flux_every, strict=False, integer=True)
        self.model = model
        self.target_sparsity = target_sparsity
        self.pruning_epochs = int(pruning_epochs)
        self.regrowth_epochs = int(regrowth_epochs)
        self.exact_target = bool(exact_target)
        self.scheduler = scheduler
        self.regrowth_delta = scheduler.delta / 3 if regrowth_delta is None else float(regrowth_delta)
        self.grad_scale = float(grad_scale)
        self.init_logit = float(init_logit)
        self.base_mask_lr = float(mask_lr)
        self.regrowth_mask_lr = self.base_mask_lr if regrowth_mask_lr is None else float(regrowth_mask_lr)
        self._regrowth_mask_lr_given = regrowth_mask_lr is not None
        self.regrowth_decay = float(regrowth_decay)
        if freeze_after is None:
            freeze_after = default_freeze_after(self.regrowth_epochs, self.exact_target)
        self.freeze_after = int(freeze_after)

        self.targets: list[Target] = select_targets(model, modules, names, ignore, overrides, min_density)
        self.total = sum(t.numel for t in self.targets)
        # lazy parameters (a LazyBatchNorm not yet run) have no size to count
        self.model_numel = sum(p.numel() for p in model.parameters() if not nn.parameter.is_lazy(p))
        if names is None and tuple(modules) == DEFAULT_MODULES:  # layers the user did not choose, left dense
            _warn_of_a_small_share(model, modules, self.total)
        if target_sparsity is not None:
            want = round((1 - target_sparsity) * self.total)
            if want == 0:
                raise ValueError(
                    f"target sparsity {target_sparsity} keeps no weight of the {self.total} selected: every "
                    "output would stop depending on the input"
                )
            floor = sum(t.floor for t in self.targets)
            if floor > want:
                raise ValueError(
                    f"the per-layer minimum densities keep {floor} of {self.total} weights, more than the "
                    f"target sparsity {target_sparsity} allows"
                )
        self.meter = FluxMeter(int(flux_every))
        self.gates: list[HardGate] = []
        self._hooks = []
        self._param_order = [list(t.module._parameters) for t in self.targets]
        for target in self.targets:
            weight = getattr(target.module, target.param_name)
            # half-precision weights get float32 logits: Adam's steps of about mask_lr would round away (or to
            # a whole bf16 step) on logits of 0.2-0.5, and P / N would underflow in float16
            low = weight.dtype in (torch.float16, torch.bfloat16)
            logits = torch.empty_like(weight, dtype=torch.float32 if low else None, requires_grad=False)
            with torch.no_grad():
                logits.uniform_(self.init_logit, 2.5 * self.init_logit)
            gate = HardGate(logits, self.grad_scale, self.meter)
            register_gate(target.module, target.param_name, gate)
            self.gates.append(gate)
            self._hooks.append(
                target.module.register_load_state_dict_pre_hook(_DenseKeyLoader(target.param_name, gate))
            )
        self._hooks.append(model.register_forward_pre_hook(self.meter.tick))

        self._optimizers: list[torch.optim.Optimizer] = []
        self._checked_optimizers: weakref.WeakSet = weakref.WeakSet()  # passed to step(), checked once
        self._warned_no_mask_lr = False
        # whether pressure_loss() was called since the last step(): a flag set, never read, by it, so that
        # compiled code calling it does not guard on a counter's value
        self._pressure_asked = False
        self._warned_no_pressure = False
        self._attached_steps: list[_AttachedStep] = []
        self._attached = False
        self.period = 0
        self.frozen = False
        self.squashed = False
        self.layer_scales = [t.pressure_scale for t in self.targets]
        self._snapshot = [g.mask() for g in self.gates]
        self.last_stats: dict[str, Any] | None = None

    # ----------------------------------------------------------------- schedule and phases
    @property
    def total_epochs(self) -> int:
        return self.pruning_epochs + self.regrowth_epochs

    @property
    def target_density(self) -> float | None:
        return None if self.target_sparsity is None else 1.0 - self.target_sparsity

    @property
    def phase(self) -> str:
        """ "pruning", "regrowth", "frozen" (masks fixed, weights still training) or "done"."""
        if self.period >= self.total_epochs:
            return "done"
        if self.frozen:
            return "frozen"
        return "pruning" if self.period < self.pruning_epochs else "regrowth"

    @property
    def pressure(self) -> float:
        """The pressure P applied in the period now running."""
        phase = self.phase
        if phase in ("frozen", "done") or (phase == "regrowth" and not self.exact_target):
            return 0.0
        return self.scheduler.pressure

    @property
    def mask_lr(self) -> float:
        """The mask learning rate for the period now running: reset at regrowth, then decayed, then 0."""
        if self.phase in ("frozen", "done"):
            return 0.0
        if self.period < self.pruning_epochs:
            return self.base_mask_lr
        k = self.period - self.pruning_epochs
        return self.regrowth_mask_lr * self.regrowth_decay**k

    def expected_density(self, period: int | None = None) -> float | None:
        """The trajectory's density after `period` periods; by default at the end of the period now running."""
        if self.scheduler.mode != "trajectory":
            return None
        return self.scheduler.expected_density(self.period + 1 if period is None else period)

    # ----------------------------------------------------------------- the loss term and parameters
    def _pressure_coefs(self) -> tuple[float, ...]:
        pressure = self.pressure
        return tuple(pressure * s / self.total for s in self.layer_scales)

    def pressure_loss(self) -> torch.Tensor:
        """`P * sum(m) / N`, to add to the loss: every logit feels exactly P / N (times its layer's scale).

        After `attach()`, the attached optimisers apply that gradient themselves to the logits they hold, whose
        part of this value has no graph: adding it to the loss changes nothing for them but the number you
        log. Logits that no attached optimiser holds keep their gradient through the loss.
        """
        self._check_live()
        if torch.is_grad_enabled():  # a value logged under no_grad applies no pressure
            self._pressure_asked = True
        coefs = self._pressure_coefs()
        logits = [g.logits for g in self.gates]
        if not any(coefs):
            return logits[0].new_zeros((), dtype=torch.float32)
        if not self._attached:
            return _PressureLoss.apply(coefs, *logits)
        held = [g.flux_at_step for g in self.gates]  # set by attach() for the logits its optimisers hold
        value = _pressure_value([c if h else 0.0 for c, h in zip(coefs, held, strict=True)], logits)
        unheld = tuple(0.0 if h else c for c, h in zip(coefs, held, strict=True))
        return value + _PressureLoss.apply(unheld, *logits) if any(unheld) else value

    def attach(self, *optimizers: torch.optim.Optimizer, flush_denormals: bool = True) -> Hyperflux:
        """Let these optimisers apply the pressure and the mask-lr schedule; returns self.

        A step pre-hook adds P / N to the mask logits' gradients right before each `optimizer.step()`: no
        graph and one in-place pass (the fast path), after AMP's unscale and DDP's all-reduce, and once per
        step under gradient accumulation. A fused optimiser that GradScaler leaves to unscale its gradients in
        its own kernel gets the pressure scaled as they are. `step()` then needs no arguments. The same hook
        reads the flux of sampled batches from the logits' gradients (`stats()`), so that under AMP it carries
        no loss scale and skipped steps add nothing to it.

        With `flush_denormals` (the default) each of their steps runs with denormal floats flushed to zero
        while the masks are on the CPU (`hyperflux.flush_denormals`): a pruned weight's optimiser moments decay
        through denormals, which made the step several times slower after a large pruning step.
        """
        self._check_live()
        logit_ids = {id(p) for p in self.mask_parameters()}
        for optimizer in optimizers:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]} & logit_ids
            if not held:
                raise ValueError("this optimizer holds no mask logits; build it from hf.param_groups()")
            if any(o is optimizer for o in self._optimizers):
                continue
            _warn_of_shared_groups(optimizer, logit_ids)
            self._optimizers.append(optimizer)
            gates = [i for i, g in enumerate(self.gates) if id(g.logits) in held]
            for i in gates:
                self.gates[i].flux_at_step = True
            hooks = _AttachedStep(self, gates, flush_denormals)
            self._attached_steps.append(hooks)
            self._hooks.append(optimizer.register_step_pre_hook(hooks.before))
            self._hooks.append(optimizer.register_step_post_hook(hooks.after))
        self._attached = bool(self._optimizers)
        return self

    def masked_weights(self) -> dict[str, nn.Parameter]:
        """The stored (unmasked) weight of every masked tensor, by tensor name: the parameters that optimisers
        update and weight decay applies to."""
        return {t.name: getattr(t.module.parametrizations, t.param_name).original for t in self.targets}

    def decay_present_weights(self, rate: float, *, into_grad: bool = False) -> None:
        """Weight decay on present weights only (method.md s. 6), so decay never shrinks a pruned weight's
        stored value and with it its chance to regrow.

        Decoupled by default: `W -= rate * W` where the gate is open (pass lr * wd). With `into_grad`,
        `W.grad += rate * W` there instead (coupled L2, as SGD and Adam apply it; pass wd); under AMP, after
        `GradScaler.unscale_`, since it adds to the gradients as they are.
        """
        with torch.no_grad():
            for original, gate in zip(self.masked_weights().values(), self.gates, strict=True):
                open_gate = torch.empty_like(original)
                torch.ge(gate.logits, 0, out=open_gate)
                if not into_grad:
                    original.addcmul_(original, open_gate, value=-rate)
                elif original.grad is not None:
                    original.grad.addcmul_(original, open_gate, value=rate)

    def mask_parameters(self) -> Iterator[nn.Parameter]:
        for gate in self.gates:
            yield gate.logits

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """Every model parameter that is not a mask logit (weights, biases, norms)."""
        logit_ids = {id(p) for p in self.mask_parameters()}
        for param in self.model.parameters():
            if id(param) not in logit_ids:
                yield param

    def param_groups(
        self,
        lr: float | None = None,
        weight_decay: float | None = None,
        mask_lr: float | None = None,
        **options,
    ) -> list[dict[str, Any]]:
        """Two optimiser groups: the model's weights, and the mask logits with their own lr and no decay.

        `weight_decay` goes to the weights' group, so the optimiser decays pruned weights' stored values too (the
        authors' behaviour); `decay_present_weights` decays present weights only. `mask_lr` replaces the
        constructor's, so that the schedule (`self.mask_lr`, the regrowth reset unless `regrowth_mask_lr` was
        given) goes on from the lr the group starts with.
        """
        if mask_lr is not None:
            self.base_mask_lr = float(mask_lr)
            if not self._regrowth_mask_lr_given:
                self.regrowth_mask_lr = self.base_mask_lr
        weights: dict[str, Any] = {"params": list(self.weight_parameters()), **options}
        if lr is not None:
            weights["lr"] = lr
        if weight_decay is not None:
            weights["weight_decay"] = weight_decay
        masks = {
            "params": list(self.mask_parameters()),
            "lr": self.base_mask_lr,
        }
        masks["weight_decay"] = 0.0
        return [weights, masks]

    # ----------------------------------------------------------------- measurement
    def kept(self) -> int:
        """How many selected weights have their gate open."""
        return int(sum(int(g.mask().sum()) for g in self.gates))

    def density(self) -> float:
        """Exact fraction of the selected weights whose gate is open."""
        return self.kept() / self.total

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean keep-masks by tensor name."""
        return {t.name: g.mask() for t, g in zip(self.targets, self.gates, strict=True)}

    def _sync_flux(self) -> None:
        """Average the sampled flux over DDP ranks, so every rank reports and decides the same."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        # the ranks sample the same batches, each its share of them; a rank whose forward passes skipped a layer
        # counts none for it and adds zeros, as DDP averages its gradient in: the mean is the ranks' summed flux
        # over world * the batches sampled, and a period no rank sampled stays without flux, as in one process
        counts = torch.tensor([g.flux_batches for g in self.gates], device=self.gates[0].logits.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        for gate, batches in zip(self.gates, counts.tolist(), strict=True):
            if batches == 0:
                continue
            unsampled = gate.flux_sum is None  # this rank skipped the layer: zeros
            flux = (gate.mean_flux() if unsampled else gate.flux_sum).contiguous()
            dist.all_reduce(flux)
            gate.flux_sum, gate.flux_batches = flux / world, batches

    def stats(self) -> dict[str, Any]:
        """Global and per-layer counts, pressure and flux since the last `step()`, as a plain dict.

        Flux is reported in pressure units, `c * N * mean(-W * g)`, so a weight's flux and the pressure compare
        directly: a weight holds while its flux beats P. `flux_hist` counts the flux of surviving and of
        pruned weights over all masked tensors in the fixed bins of `FLUX_HIST_EDGES`
        (`{"edges", "survivors", "pruned"}`), None when no batch was sampled since the last `step()`.

        With the logits' optimiser attached, a sampled batch's flux is read at its optimiser step from the
        logits' gradient, as that step applies it (unscaled under AMP, averaged over DDP ranks, summed over
        accumulated batches, clipped where the logits are; frozen logits get a gradient for that batch only);
        otherwise the backward pass adds it.
        """
        self._check_live()
        units = self.grad_scale * self.total
        bins = len(FLUX_HIST_EDGES) + 1
        # computed on the masks' devices and read back in one transfer: a GPU would otherwise wait for each of
        # several reads per layer
        numbers, betweens = [], []
        for gate, before in zip(self.gates, self._snapshot_here(), strict=True):
            row, between = _layer_stats(gate, before, units)
            numbers.append(row)
            if between is not None:
                betweens.append(between)
        values = iter(torch.cat([n.to(numbers[0].device) for n in numbers]).tolist() if numbers else [])
        hist_counts = [0] * (2 * bins) if betweens else None
        layers = []
        kept_total = pruned_total = regrown_total = 0
        alive_sum = dead_sum = 0.0
        alive_min = math.inf
        for target, gate in zip(self.targets, self.gates, strict=True):
            kept, pruned, regrown = (int(next(values)) for _ in range(3))
            flux_min = flux_mean = None
            if gate.flux_batches:
                layer_min, layer_alive, layer_dead = (next(values) for _ in range(3))
                for i in range(2 * bins):
                    hist_counts[i] += int(next(values))
                alive_sum += layer_alive
                dead_sum += layer_dead
                if kept:
                    flux_min, flux_mean = layer_min, layer_alive / kept
                    # NaN spreads, as in each layer's minimum (Python's min would keep whichever came first)
                    alive_min = layer_min if math.isnan(layer_min) or layer_min < alive_min else alive_min
            layers.append(
                {
                    "name": target.name,
                    "shape": list(gate.logits.shape),
                    "total": gate.logits.numel(),
                    "kept": kept,
                    "density": kept / gate.logits.numel(),
                    "pruned": pruned,
                    "regrown": regrown,
                    "min_density": target.min_density,
                    "flux_min": flux_min,
                    "flux_mean": flux_mean,
                }
            )
            kept_total += kept
            pruned_total += pruned
            regrown_total += regrown
        alive_count = sum(hist_counts[:bins]) if hist_counts else 0
        dead_count = sum(hist_counts[bins:]) if hist_counts else 0
        return {
            "period": self.period,
            "phase": self.phase,
            "kept": kept_total,
            "total": self.total,
            "density": kept_total / self.total,
            "sparsity": 1.0 - kept_total / self.total,
            "target_sparsity": self.target_sparsity,
            "expected_density": self.expected_density(),
            "pressure": self.pressure,
            "gamma": self.scheduler.gamma,
            "mask_lr": self.mask_lr,
            "pruned": pruned_total,
            "regrown": regrown_total,
            "flux_batches": max((g.flux_batches for g in self.gates), default=0),
            "flux_min": alive_min if alive_count else None,
            "flux_p01": _quantile(betweens, FLUX_HIST_EDGES, hist_counts[:bins], 0.01)
            if alive_count
            else None,
            "flux_mean": alive_sum / alive_count if alive_count else None,
            "flux_mean_pruned": dead_sum / dead_count if dead_count else None,
            "flux_hist": (
                {
                    "edges": list(FLUX_HIST_EDGES),
                    "survivors": hist_counts[:bins],
                    "pruned": hist_counts[bins:],
                }
                if hist_counts is not None
                else None
            ),
            "layers": layers,
        }

    def summary(self, stats: Mapping[str, Any] | None = None) -> str:
        """A readable per-layer table of `stats()`, or of a record `step()` returned (`hf.summary(hf.step())`):
        flips and flux are counted since the last `step()`, so right after one they are those of the period
        it closed only in its record."""
        s = self.stats() if stats is None else stats

        def num(value: float | None) -> str:
            return "-" if value is None else f"{value:.3g}"

        target = "-" if s["target_sparsity"] is None else f"{100 * s['target_sparsity']:.2f}%"
        lines = [
            f"Hyperflux  period {s['period']}/{self.total_epochs} ({s['phase']})  "
            f"sparsity {100 * s['sparsity']:.3f}% (target {target})  kept {s['kept']:,}/{s['total']:,}  "
            f"pressure {s['pressure']:.4g}  gamma {s['gamma']:.4g}",
        ]
        header = ("layer", "shape", "kept", "total", "density", "pruned", "regrown", "flux min", "flux mean")

        def cells(name: str, shape: str, row: dict[str, Any]) -> tuple[str, ...]:
            return (
                name,
                shape,
                f"{row['kept']:,}",
                f"{row['total']:,}",
                f"{100 * row['density']:.2f}%",
                f"{row['pruned']:,}",
                f"{row['regrown']:,}",
                num(row["flux_min"]),
                num(row["flux_mean"]),
            )

        rows = [cells(row["name"], "x".join(map(str, row["shape"])), row) for row in s["layers"]]
        rows.append(cells("total", "", s))
        lines.append(text_table(header, rows, left=2))
        since = "since the last step()" if stats is None else "as the record given counts them"
        share = self.total / self.model_numel
        lines.append(f"  masked: {self.total:,} of the model's {self.model_numel:,} parameters ({share:.1%})")
        lines.append(f"  pruned, regrown and flux: {since}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        target = "None" if self.target_sparsity is None else f"{self.target_sparsity:g}"
        return (
            f"Hyperflux(tensors={len(self.targets)}, weights={self.total:,}, target_sparsity={target}, "
            f"period={self.period}/{self.total_epochs}, phase={self.phase!r}, sparsity={self.sparsity():.4f}, "
            f"pressure={self.pressure:.4g}, exact_target={self.exact_target})"
        )

    # ----------------------------------------------------------------- the per-period step
    def step(self, *optimizers: torch.optim.Optimizer) -> dict[str, Any]:
        """Close a period: measure, update the pressure, move through the phases; returns that period's stats.

        The regrowth phase resets and decays the mask lr in the attached optimisers and in any passed here.
        """
        self._check_live()
        self._check_step_optimizers(optimizers)
        self._check_finite()
        if self.period == self.total_epochs:
            warnings.warn(
                f"hf.step() past the end of the schedule ({self.total_epochs} periods): the masks are frozen "
                "and stay as they are; training on is fine, but check that the loop's epochs match "
                "pruning_epochs + regrowth_epochs",
                stacklevel=2,
            )
        self._warn_if_no_pressure()
        self._sync_flux()
        self._enforce_floors()
        record = self.stats()
        density = record["density"]
        self.period += 1
        end_of_pruning = self.pruning_epochs
        if self.period <= end_of_pruning or (self.exact_target and not self.frozen):
            self.scheduler.step(density)
        if self.period == end_of_pruning:
            if self.exact_target:
                self.scheduler.delta = self.regrowth_delta
            else:
                self.scheduler.reset()
        regrowth_done = self.period - end_of_pruning
        if not self.frozen and (self.period >= self.total_epochs or regrowth_done >= self.freeze_after):
            if self.exact_target:
                before = [g.mask() for g in self.gates]
                self._trim_to_target()
                self._count_trim(record, before)
            self._freeze()
        self._set_mask_lr(optimizers)
        self._clear_pruned_momentum(optimizers)
        for gate in self.gates:
            gate.reset_flux()
        self._snapshot = [g.mask() for g in self.gates]
        self.last_stats = record
        return record

    def _warn_if_no_pressure(self) -> None:
        """Warn, once, of a period with pressure that reached no logit: neither attached nor in the loss, the
        method prunes nothing of its own, and exact-target mode's trim at the freeze prunes in one shot."""
        asked, self._pressure_asked = self._pressure_asked, False
        if self._attached or asked or self._warned_no_pressure or self.frozen or not self.pressure > 0:
            return
        self._warned_no_pressure = True
        warnings.warn(
            f"hf.step(): the pressure of this period (P = {self.pressure:.3g}) reached no mask logit: attach the "
            "optimiser that holds them (hf.attach(optimizer)) or add hf.pressure_loss() to the loss; without "
            "either, only the exact trim at the freeze prunes, all at once",
            stacklevel=3,
        )

    def _snapshot_here(self) -> list[torch.Tensor]:
        """The masks at the last `step()`, on the device each layer is on now (the model may have moved since)."""
        self._snapshot = [
            before if before.device == gate.logits.device else before.to(gate.logits.device)
            for before, gate in zip(self._snapshot, self.gates, strict=True)
        ]
        return self._snapshot

    def _count_trim(self, record: dict[str, Any], before: list[torch.Tensor]) -> None:
        """Fold the trim's flips into the period's record, so that its counts and `kept` add up to the masks
        the period leaves behind (the next period's flips are counted from them)."""
        for layer, gate, was in zip(record["layers"], self.gates, before, strict=True):
            mask = gate.mask()
            closed, opened = int((was & ~mask).sum()), int((~was & mask).sum())
            layer["pruned"] += closed
            layer["regrown"] += opened
            record["pruned"] += closed
            record["regrown"] += opened
            layer["kept"] = int(mask.sum())
            layer["density"] = layer["kept"] / layer["total"]
        record["kept"] = sum(layer["kept"] for layer in record["layers"])
        record["density"] = record["kept"] / self.total
        record["sparsity"] = 1.0 - record["density"]

    def _check_finite(self) -> None:
        """Refuse to go on from NaN or infinite logits or weights: a NaN logit reads as a closed gate, so one
        non-finite loss or gradient would close every gate, the controller would take that for a density, and
        the trim would rank the NaNs."""
        broken = [
            f"{target.name} ({what})"
            for target, gate, weight in zip(
                self.targets, self.gates, self.masked_weights().values(), strict=True
            )
            for what, tensor in (("mask logits", gate.logits), ("weights", weight))
            if not bool(torch.isfinite(tensor).all())
        ]
        if broken:
            raise FloatingPointError(
                f"hf.step(): NaN or infinite values in {', '.join(broken[:4])}"
                + (f" and {len(broken) - 4} more" if len(broken) > 4 else "")
                + ": a non-finite loss or gradient reached the optimiser (under float16 autocast use "
                "torch.amp.GradScaler, which skips such steps)"
            )

    def _check_step_optimizers(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Refuse what is not an optimiser, and warn, once per optimiser, of mask logits it decays or moves at
        the weights' lr, as `attach()` does (the loss form never calls it)."""
        for optimizer in optimizers:
            if not hasattr(optimizer, "param_groups"):
                raise TypeError(
                    f"hf.step() takes the optimisers that hold the mask logits, got a {type(optimizer).__name__}"
                )
            # attached, the logits step in the attached optimisers; one passed here may hold them unstepped
            # (the transformers integration leaves them in the Trainer's groups)
            if self._attached or optimizer in self._checked_optimizers:
                continue
            self._checked_optimizers.add(optimizer)
            _warn_of_shared_groups(optimizer, {id(p) for p in self.mask_parameters()}, stacklevel=4)

    def _set_mask_lr(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if self.period < self.pruning_epochs:
            return
        if not self._optimizers and not optimizers and not self.frozen and not self._warned_no_mask_lr:
            self._warned_no_mask_lr = True
            warnings.warn(
                "the regrowth phase resets and decays the mask lr, but no optimiser is attached or passed to "
                "hf.step(): pass the one that holds the mask logits, hf.step(optimizer), or attach() it",
                stacklevel=3,
            )
        logit_ids = {id(p) for p in self.mask_parameters()}
        for optimizer in [*self._optimizers, *optimizers]:
            for group in optimizer.param_groups:
                if group["params"] and all(id(p) in logit_ids for p in group["params"]):
                    group["lr"] = self.mask_lr

    def _clear_pruned_momentum(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Zero the first-moment state (Adam's exp_avg, SGD's momentum buffer) of weights pruned for a whole
        period (closed at the last `step()` and still closed now).

        A pruned weight's gradient is exactly zero, so its momentum only decays, and within about 800 steps it
        reaches denormal floats, which make a fused CPU Adam step several times slower (measured: 2.8x -> 1.4x
        overhead on LeNet-300-100). After a period the momentum left is far below the weight's float
        resolution, so clearing it moves nothing; weights pruned during the period keep theirs until then.
        Under the optimiser's own (coupled) weight decay a pruned weight's gradient is `wd * W`, not zero: its
        momentum does not fade, and clearing it restarts that decay's momentum once a period.
        """
        gates = {
            id(w): (g, before)
            for w, g, before in zip(
                self.masked_weights().values(), self.gates, self._snapshot_here(), strict=True
            )
        }
        with torch.no_grad():
            for optimizer in [*self._optimizers, *optimizers]:
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        state = optimizer.state.get(param)
                        if id(param) not in gates or not state:
                            continue
                        gate, before = gates[id(param)]
                        long_pruned = ~(gate.mask() | before)
                        for key in ("exp_avg", "momentum_buffer"):
                            buffer = state.get(key)
                            if isinstance(buffer, torch.Tensor) and buffer.shape == param.shape:
                                buffer.masked_fill_(long_pruned, 0.0)

    def _freeze(self) -> None:
        for gate in self.gates:
            gate.logits.requires_grad_(False)
            gate.logits.grad = None
            gate._thawed = False
        self.frozen = True

    def _enforce_floors(self) -> None:
        """Reopen the best pruned weights of any layer below its minimum density, and lift its pressure."""
        for i, (target, gate) in enumerate(zip(self.targets, self.gates, strict=True)):
            if target.min_density <= 0:
                continue
            need = target.floor
            mask = gate.mask()
            missing = need - int(mask.sum())
            if missing > 0:
                candidates = torch.where(mask, -math.inf, gate.logits.detach()).flatten()
                _put_flat(gate.logits, candidates.topk(missing).indices, _TRIM_LOGIT)
            self.layer_scales[i] = 0.0 if missing >= 0 else target.pressure_scale

    def _trim_to_target(self) -> None:
        """Close (or open) the gates nearest to flipping until exactly round(target density * N) are open.

        Ranking by logit follows the method's own integrated evidence, and logits are identical on every
        rank, so the trim is too.
        """
        want = round(self.target_density * self.total)
        kept = self.kept()
        if kept == want:
            return
        flats = [g.logits.detach().flatten() for g in self.gates]  # copies, where the layout is channels-last
        closing = kept > want
        pools = []  # per layer with candidates: (layer, their logits, their flat indices)
        for layer, (target, flat) in enumerate(zip(self.targets, flats, strict=True)):
            mask = flat >= 0
            if not closing:
                index = (~mask).nonzero().squeeze(1)
            elif target.floor:  # only its lowest open logits above the floor compete
                removable = int(mask.sum()) - target.floor
                if removable <= 0:
                    continue
                index = torch.where(mask, flat, math.inf).topk(removable, largest=False).indices
            else:
                index = mask.nonzero().squeeze(1)
            if len(index):
                pools.append((layer, flat[index], index))
        # one global ranking, on one device (a model split over devices has its layers on several)
        device = self.gates[0].logits.device
        values = torch.cat([logits.float().to(device) for _, logits, _ in pools])
        chosen = torch.zeros(len(values), dtype=torch.bool, device=device)
        count = kept - want if closing else want - kept
        chosen[values.topk(count, largest=not closing, sorted=False).indices] = True
        value = -_TRIM_LOGIT if closing else _TRIM_LOGIT
        parts = chosen.split([len(index) for _, _, index in pools])
        for (layer, _, index), picked in zip(pools, parts, strict=True):
            _put_flat(self.gates[layer].logits, index[picked.to(index.device)], value)
        emptied = [t.name for t, g in zip(self.targets, self.gates, strict=True) if not g.mask().any()]
        if closing and emptied:
            warnings.warn(
                f"the exact trim left {', '.join(emptied[:4])} with no weight: what follows no longer depends "
                "on its input; a min_density for it (overrides) keeps some",
                stacklevel=3,
            )

    # ----------------------------------------------------------------- state and export
    def state_dict(self) -> dict[str, Any]:
        """Everything the sparsifier adds to a run; with the model's and optimisers' state it resumes exactly."""
        return {
            "format": STATE_FORMAT,
            "names": [t.name for t in self.targets],
            "target_sparsity": self.target_sparsity,
            "pruning_epochs": self.pruning_epochs,
            "regrowth_epochs": self.regrowth_epochs,
            "exact_target": self.exact_target,
            "period": self.period,
            "frozen": self.frozen,
            "layer_scales": list(self.layer_scales),
            "meter_batches": self.meter.batches,
            "scheduler": self.scheduler.state_dict(),
            "snapshot": [m.clone() for m in self._snapshot],
            # the sum itself (None for a period with nothing sampled, as at the trainer's checkpoints)
            "flux_sum": [g.flux_sum.clone() if g.flux_batches else None for g in self.gates],
            "flux_batches": [g.flux_batches for g in self.gates],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_live()
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"unknown Hyperflux state format {state.get('format')!r}; expected {STATE_FORMAT}"
            )
        missing = sorted(STATE_KEYS - set(state))
        if missing:
            raise ValueError(f"the Hyperflux state lacks {', '.join(missing)}: not a Hyperflux.state_dict()")
        names = [t.name for t in self.targets]
        if list(state["names"]) != names:
            raise ValueError(
                f"the state is for tensors {list(state['names'])[:4]}..., this sparsifier masks {names[:4]}..."
            )
        for key in ("target_sparsity", "pruning_epochs", "regrowth_epochs", "exact_target"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"the state has {key}={state[key]!r}, this sparsifier {getattr(self, key)!r}"
                )
        for key in ("snapshot", "flux_sum"):
            for target, gate, saved in zip(self.targets, self.gates, state[key], strict=True):
                if saved is not None and tuple(saved.shape) != tuple(gate.logits.shape):
                    raise ValueError(
                        f"the state's {key} for {target.name} has shape {tuple(saved.shape)}, the tensor "
                        f"{tuple(gate.logits.shape)}"
                    )
        regrowing = self.exact_target and int(state["period"]) >= self.pruning_epochs
        if regrowing and float(state["scheduler"]["delta"]) != self.regrowth_delta:
            raise ValueError(
                f"the state's regrowth runs at delta {state['scheduler']['delta']}, this sparsifier's at "
                f"{self.regrowth_delta}"
            )
        self.scheduler.load_state_dict(state["scheduler"])
        self.period = int(state["period"])
        # this run's overrides hold; only a floor's release of the pressure (a saved 0) is the run's own state
        self.layer_scales = [
            0.0 if t.min_density > 0 and float(saved) == 0.0 else t.pressure_scale
            for t, saved in zip(self.targets, state["layer_scales"], strict=True)
        ]
        self.meter.restart(int(state["meter_batches"]))
        for hooks in self._attached_steps:
            hooks.seen = self.meter.batches
        self._snapshot = [
            m.to(g.logits.device).clone() for m, g in zip(state["snapshot"], self.gates, strict=True)
        ]
        for gate, flux, batches in zip(self.gates, state["flux_sum"], state["flux_batches"], strict=True):
            gate.flux_sum = flux.to(gate.logits.device).clone() if batches else None
            gate.flux_batches = int(batches)
        self.frozen = False
        for gate in self.gates:
            gate.logits.requires_grad_(True)
            gate._thawed = False  # a gate thawed for a flux batch of the frozen run it replaces stays live
        if state["frozen"]:
            self._freeze()

    def squash(self) -> nn.Module:
        """Bake the masks into the weights (zeros), remove the parametrizations, and return the model.

        Its `state_dict()` has the original keys and its outputs equal the masked model's (to float rounding
        where torch's matmul picks its kernel by whether the weight needs a gradient: README, "State,
        checkpoints and export").
        """
        self._check_live()
        for hook in self._hooks:
            hook.remove()
        getters = []
        for target, order in zip(self.targets, self._param_order, strict=True):
            module = target.module
            getters.append(
                (module, type(module), target.param_name, type(module).__dict__.get(target.param_name))
            )
            parametrize.remove_parametrizations(module, target.param_name, leave_parametrized=True)
            # removal re-registers the weight last; restore the order so state_dict keys read as before
            params = module._parameters
            module._parameters = {name: params[name] for name in order if name in params} | params
        for module, prepared, name, getter in getters:
            if type(module) is not prepared and getter is not None:
                # torch deletes the property from the class it made for this module, which deep copies of the
                # prepared model share (an EMA copy, say): they keep it
                setattr(prepared, name, getter)
        self.squashed = True
        return self.model

    def _check_live(self) -> None:
        if self.squashed:
            raise RuntimeError(
                "this Hyperflux has been squashed: its masks are baked into the model's weights"
            )
