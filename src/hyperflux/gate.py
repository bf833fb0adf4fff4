"""The hard L0 gate: forward `W * 1[m >= 0]`, straight-through backward, and a sampled flux estimate.

The gate is a `torch.nn.utils.parametrize` parametrization, so the user's model class is never rewritten:
`module.weight` becomes `W * H(m)` and the logits `m` live at `module.parametrizations.weight[0].logits`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from hyperflux.kernels import gate_op


class _GateFunction(torch.autograd.Function):
    """`W * 1[m >= 0]` with the gradients of method.md section 1, one kernel per output each way: the gate
    under `torch.compile` (which traces through it) and where hyperflux's C++ kernels could not be built.

    dL/dW = H(m) * g and dL/dm = c * W * g, where g = dL/dW_eff. When `gate` is given (a sampled batch), the
    batch's flux `-W * g` is added into `gate.flux_sum`.
    """

    @staticmethod
    def forward(ctx, weight, logits, scale: float, gate):  # type: ignore[override]
        # A float 0/1 gate written by `ge(out=float)`: on CPU, bool tensors (made or consumed) cost several
        # times a float pass, and this keeps the gate at one pass forward and one per gradient backward.
        open_gate = torch.empty_like(weight)
        torch.ge(logits, 0, out=open_gate)
        ctx.save_for_backward(weight, open_gate)
        ctx.scale = scale
        ctx.gate = gate
        return weight * open_gate

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        weight, open_gate = ctx.saved_tensors
        grad_weight = grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_weight = grad_out * open_gate
        if ctx.needs_input_grad[1]:
            grad_logits = torch.addcmul(grad_out.new_zeros(()), weight, grad_out, value=ctx.scale)
        if ctx.gate is not None:
            ctx.gate.add_flux(weight, grad_out)
        return grad_weight, grad_logits, None, None


class FluxMeter:
    """Decides, once per forward pass of the model, whether this batch's flux is sampled.

    Sampling every `every`-th batch keeps the running estimate almost free. The counter is a plain integer
    advanced identically on every rank, so it never makes ranks diverge.
    """

    def __init__(self, every: int) -> None:
        if every < 0:
            raise ValueError(f"flux_every must be >= 0 (0 turns flux sampling off), got {every}")
        self.every = every
        self.batches = 0
        self.sampling = False
        self._sampled_since_step = False
        # (the counter after it, whether sampled): the decision optimisers stepping later in the same step share
        self._step_decision: tuple[int, bool] | None = None

    def tick(self, *_: object) -> None:
        """Called by a forward pre-hook on the model; evaluation passes (no grad) do not count.

        Compiled code must not read the counter: torch.compile would guard on its value and recompile at every
        batch until it gave up and ran the model eagerly. An attached optimiser's step counts in its place.
        """
        if torch.compiler.is_compiling():
            return
        if not torch.is_grad_enabled():
            self.sampling = False
            return
        self.sampling = self.next_sampled()
        self._sampled_since_step |= self.sampling
        self.batches += 1

    def step_sampled(self, seen: int) -> bool:
        """Whether an attached optimiser's step, whose previous step left the counter at `seen`, takes the flux:
        when a batch it applies was sampled. Where no batch was counted since (the model ran compiled) the step
        counts itself in place of its batch. Attached optimisers that step after it in the same training step
        share its decision.
        """
        if seen == self.batches:  # nothing counted since this optimiser's last step: compiled
            sampled = self.next_sampled()
            self.batches += 1
        elif self._step_decision is not None and self._step_decision[0] == self.batches:
            return self._step_decision[1]  # decided by the optimiser that stepped before this one
        else:
            sampled = self._sampled_since_step
        self._sampled_since_step = False
        self._step_decision = (self.batches, sampled)
        return sampled

    def next_sampled(self) -> bool:
        """Whether the next batch counted is a flux batch."""
        return self.every > 0 and self.batches % self.every == 0

    def restart(self, batches: int) -> None:
        """Continue counting from `batches` (a resumed run)."""
        self.batches = batches
        self._sampled_since_step = False
        self._step_decision = None


def _empty_slots() -> list[torch.Tensor]:
    """Where the compiled gate keeps the memory of its two gradients from one step to the next, to write the
    next step's there when nothing else holds it (kernels.cpp, `in_slot`)."""
    return [torch.empty(0) for _ in range(2)]


class HardGate(nn.Module):
    """Parametrization holding the mask logits of one weight tensor.

    The flux accumulator is a plain attribute, not a buffer: DDP broadcasts buffers from rank 0, and each
    rank's flux must stay its own until the sparsifier averages them.
    """

    def __init__(self, logits: torch.Tensor, scale: float, meter: FluxMeter) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)
        self.scale = scale
        self.meter = meter
        self.flux_sum: torch.Tensor | None = None
        self.flux_batches = 0
        self._flux_batch: int | None = None  # the meter's batch whose flux was last added
        # set by `Hyperflux.attach` for logits an attached optimiser holds: a sampled batch's flux is then
        # taken from the logits' gradient at the optimiser's step (`add_step_flux`), not in the backward pass,
        # where a loss scale the step never sees would be in it
        self.flux_at_step = False
        self._thawed = False  # frozen logits given a gradient for one sampled batch, to read its flux from
        self._slots = _empty_slots()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: the Python function, which compilers see through
            return _GateFunction.apply(weight, self.logits, self.scale, None)
        logits = self.logits
        flux = None
        if self.meter.sampling and torch.is_grad_enabled():  # a flux batch
            if not self.flux_at_step:
                flux = self._flux_accumulator(weight)  # its backward adds -W * g
            else:  # frozen: a gradient for this batch, which the step takes back
                self.thaw()
        if weight.dtype is logits.dtype and (op := gate_op()) is not None:
            # the same gate, gradients and flux: one pass each way for float32 on the CPU, and on any device
            # an autograd node without Python in it (operands on two devices: its error says so)
            return op(weight, logits, self.scale, flux, self._slots)
        return _GateFunction.apply(weight, logits, self.scale, None if flux is None else self)

    def __getstate__(self) -> dict:
        """Copied (`copy.deepcopy`) or pickled without the memory the compiled gate keeps."""
        return {**super().__getstate__(), "_slots": _empty_slots()}

    def _flux_accumulator(self, weight: torch.Tensor) -> torch.Tensor:
        """`flux_sum`, made on first use in the weight's layout, with this batch counted once however many
        times the module runs in it (each run adds its flux)."""
        if self.flux_sum is None:
            self.flux_sum = torch.zeros_like(weight, dtype=torch.float32)
        elif self.flux_sum.device != weight.device:  # the model moved: the period's sum moves with it
            self.flux_sum = self.flux_sum.to(weight.device)
        if self._flux_batch != self.meter.batches:
            self._flux_batch = self.meter.batches
            self.flux_batches += 1
        return self.flux_sum

    def add_flux(self, weight: torch.Tensor, grad_eff: torch.Tensor) -> None:
        self.flux_sum.addcmul_(weight, grad_eff, value=-1.0)

    def add_step_flux(self, grad_scale: torch.Tensor | None) -> None:
        """Add the flux of a sampled batch from the logits' gradient `c * W * g` as the optimiser's step sees
        it: after GradScaler's unscale (or divided by `grad_scale`, the scale a fused optimiser is left to
        divide by), DDP's all-reduce and any clipping, and summed over the step's accumulated batches.

        Taken in the backward pass instead, the flux of fp16 AMP would carry the loss scale, and a batch the
        scaler skips would add infinities.
        """
        grad = self.logits.grad
        if grad is None:
            return
        flux = self._flux_accumulator(grad)
        if grad_scale is None:
            flux.add_(grad, alpha=-1.0 / self.scale)
        else:
            flux.addcdiv_(grad, grad_scale.to(grad.device), value=-1.0 / self.scale)

    def thaw(self) -> None:
        """Give frozen logits a gradient for the coming flux batch alone (`refreeze` takes it back)."""
        if not self.logits.requires_grad:
            self.logits.requires_grad_(True)
            self._thawed = True

    def refreeze(self) -> None:
        """Take back the gradient a frozen gate was given for a flux batch, before the optimiser sees it."""
        if self._thawed:
            self.logits.grad = None
            self.logits.requires_grad_(False)
            self._thawed = False

    def mask(self) -> torch.Tensor:
        """The boolean keep-mask, identical in training and inference."""
        return self.logits.detach() >= 0

    def mean_flux(self) -> torch.Tensor:
        """Mean of `-W * g` over the sampled batches since the last reset (zeros when none were sampled)."""
        if self.flux_sum is None:
            return torch.zeros_like(self.logits, dtype=torch.float32).detach()
        return self.flux_sum / max(self.flux_batches, 1)

    def reset_flux(self) -> None:
        if self.flux_sum is not None:
            self.flux_sum.zero_()
        self.flux_batches = 0

    def extra_repr(self) -> str:
        return f"shape={tuple(self.logits.shape)}, scale={self.scale}"


def has_masks(module: nn.Module) -> bool:
    """Whether hyperflux's gates parametrize one of `module`'s own tensors (torch's weight_norm and other
    parametrizations do not count)."""
    return parametrize.is_parametrized(module) and any(
        isinstance(p, HardGate) for ps in module.parametrizations.values() for p in ps
    )


def register_gate(module: nn.Module, name: str, gate: HardGate) -> None:
    """`parametrize.register_parametrization(module, name, gate)`, with `module.<name>` then read by a shorter
    path than torch's.

    torch's property reaches the gate through two module calls, index and attribute lookups that raise and
    catch, which cost more than the gate's own kernel in a small layer's forward pass. The shorter getter calls
    the gate on the stored weight directly, as torch does for a single parametrization; anything else (another
    parametrization stacked on this one, `parametrize.cached()`) takes torch's own getter.
    """
    parametrize.register_parametrization(module, name, gate)
    cls = type(module)  # the class parametrize made for this module alone
    torch_property = cls.__dict__.get(name)
    if not isinstance(torch_property, property) or not hasattr(parametrize, "_cache_enabled"):
        return  # a torch whose parametrize differs: its own getter
    torch_getter = torch_property.fget

    def gated(self: nn.Module) -> torch.Tensor:
        chain = self._modules["parametrizations"]._modules[name]
        original = chain._parameters.get("original")
        if original is None or len(chain._modules) != 1 or parametrize._cache_enabled:
            return torch_getter(self)
        return chain._modules["0"](original)

    setattr(cls, name, property(gated, torch_property.fset, doc=torch_property.__doc__))
