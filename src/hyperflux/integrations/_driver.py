"""What both trainer callbacks share: the sparsifier, the mask logits' own Adam, and the period clock.

The logits get their own optimiser instead of a group in the host's: a host LR scheduler holds one lr per
group (and torch checks the count), would schedule the mask lr, and the host's weight decay must not touch them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from hyperflux.sparsifier import Hyperflux


class MaskDriver:
    def __init__(
        self,
        target_sparsity: float | None,
        pruning_epochs: int,
        regrowth_epochs: int,
        every_n_steps: int | None,
        mask_betas: tuple[float, float],
        options: dict[str, Any],
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.settings = {
            "target_sparsity": target_sparsity,
            "pruning_epochs": pruning_epochs,
            "regrowth_epochs": regrowth_epochs,
            **options,
        }
        self.every_n_steps = every_n_steps
        self.mask_betas = mask_betas
        self.hf: Hyperflux | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.host_optimizers: list[torch.optim.Optimizer] = []
        self.last_step = 0
        self.pending: dict[str, Any] | None = None  # a checkpoint's state, applied once the optimiser exists
        self.restored = False  # whether the schedule came from a checkpoint (not started over)

    def build(
        self,
        model: nn.Module,
        another: str = "this callback masks the model it was first given; give another model a new callback",
    ) -> Hyperflux:
        """Mask the model, once: before the host builds its optimiser or wraps the model in DDP, so DDP
        registers (and all-reduces) the logits too. A host that hands over another model later gets the
        ValueError `another`, which says how to use the host: the masks stay on the first."""
        if self.hf is None:
            self.hf = Hyperflux(model, **self.settings)
        elif model is not self.hf.model:
            raise ValueError(another)
        return self.hf

    def take_over(self, host_optimizers: Iterable[torch.optim.Optimizer], hide: bool = True) -> None:
        """Give the logits their own Adam, attached so that its step applies the pressure. With `hide`, also
        take them out of the host's optimisers (built from `model.parameters()`, they hold them with the
        weights' lr and decay); without, the host must step after `step_masks()`, which leaves their gradients
        None, so the host's step skips them. A new fit with new host optimisers is taken over again."""
        host_optimizers = list(host_optimizers)
        new_hosts = [id(o) for o in host_optimizers] != [id(o) for o in self.host_optimizers]
        self.host_optimizers = host_optimizers
        if hide and new_hosts:
            self._hide_logits()
        if self.optimizer is not None:
            return
        self.optimizer = torch.optim.Adam(
            [{"params": list(self.hf.mask_parameters()), "weight_decay": 0.0}],
            lr=self.hf.base_mask_lr,
            betas=self.mask_betas,
        )
        self.hf.attach(self.optimizer)
        if self.pending is not None:
            self.load_state_dict(self.pending)

    def _hide_logits(self) -> None:
        """Take the logits out of the host optimisers' groups (they hold no state there: never stepped)."""
        logit_ids = {id(p) for p in self.hf.mask_parameters()}
        for optimizer in self.host_optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in logit_ids]

    def state_dict(self) -> dict[str, Any]:
        """The sparsifier's schedule, the mask optimiser and the period clock, for the host's checkpoints (the
        logits themselves are model parameters and travel with the model's state)."""
        if self.hf is None or self.optimizer is None:
            return {} if self.pending is None else self.pending
        return {
            "hf": self.hf.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; before the mask optimiser exists (hosts restore callbacks before they build
        optimisers) it is kept and applied by `take_over`."""
        if not state:
            return
        if self.hf is None or self.optimizer is None:
            self.pending = dict(state)
            return
        self.hf.load_state_dict(state["hf"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.last_step = state["last_step"]
        self.pending = None
        self.restored = True

    def step_masks(self, grad_scale: float | None = None, *, check_finite: bool = False) -> None:
        """One mask-optimiser step on the logits' accumulated gradients, then clear them. `grad_scale` is the
        AMP loss scale the host's scaler applied (it unscales only its own optimisers). With a scale, or
        `check_finite` (a host in fp16), a step whose gradients are not finite (an overflowed step, which the
        host's scaler skips) is skipped: Adam would turn every logit it reached NaN. Unasked, the check is not
        made, for it waits for the device at every step."""
        grads = [p.grad for p in self.hf.mask_parameters() if p.grad is not None]
        if grads and grad_scale is not None:
            torch._foreach_mul_(grads, 1.0 / grad_scale)
        # the largest |g| of each: a NaN or infinity shows, and, unlike the L2 norm, no float16 sum overflows
        largest = (
            torch._foreach_norm(grads, float("inf"))
            if grads and (check_finite or grad_scale is not None)
            else []
        )
        if largest and not bool(torch.stack(largest).isfinite().all()):
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def due(self, global_step: int) -> bool:
        """With `every_n_steps`: whether a period ended since the last call (counted in optimiser steps)."""
        ended = global_step // self.every_n_steps > self.last_step // self.every_n_steps
        self.last_step = global_step
        return ended

    def close_period(self) -> dict[str, float] | None:
        """`hf.step()` while the schedule runs; returns the values to log, None once it is over."""
        if self.hf.period >= self.hf.total_epochs:
            return None
        self.hf.step(*self.host_optimizers)  # lets it clear pruned weights' momentum
        return self.metrics()

    def warn_if_unfinished(self, host: str) -> None:
        """At the end of the host's training: warn when it stopped before the masks froze, so that they are
        not at the target (nothing else would say so)."""
        hf = self.hf
        if hf is None or hf.frozen:
            return
        freezes_at = min(hf.total_epochs, hf.pruning_epochs + hf.freeze_after)
        warnings.warn(
            f"{host} ended after {hf.period} of the {freezes_at} periods before the masks freeze at the target: "
            f"they are at {hf.sparsity():.4%} sparsity, not frozen; train for pruning_epochs + regrowth_epochs "
            "periods (epochs, or blocks of every_n_steps steps)",
            stacklevel=3,
        )

    def periods_missing(self, epochs_done: int) -> int:
        """Epoch periods the host has finished but this schedule, restored from a checkpoint, has not closed:
        one saved at an epoch's last step, before that epoch's end closed its period. A schedule that started
        over counts from where it started."""
        if self.every_n_steps is not None or self.hf is None or not self.restored:
            return 0
        return max(0, min(epochs_done, self.hf.total_epochs) - self.hf.period)

    def metrics(self) -> dict[str, float]:
        return {
            "hyperflux/density": self.hf.density(),
            "hyperflux/sparsity": self.hf.sparsity(),
            "hyperflux/pressure": self.hf.pressure,
            "hyperflux/period": float(self.hf.period),
        }


class DrivenCallback:
    """The constructor and `hf` that both trainer callbacks share (mixed in before the host's callback class).

    `pruning_epochs` and `regrowth_epochs` count periods: epochs, or blocks of `every_n_steps` optimiser steps.
    Other keyword arguments go to `Hyperflux` (`mask_lr`, `names`, `exact_target`, ...).
    """

    def __init__(
        self,
        target_sparsity: float | None,
        pruning_epochs: int,
        regrowth_epochs: int = 0,
        *,
        every_n_steps: int | None = None,
        mask_betas: tuple[float, float] = (0.9, 0.999),
        **options: Any,
    ) -> None:
        self.driver = MaskDriver(
            target_sparsity, pruning_epochs, regrowth_epochs, every_n_steps, mask_betas, options
        )

    @property
    def hf(self) -> Hyperflux | None:
        """The sparsifier, once the host has given the callback its model."""
        return self.driver.hf
