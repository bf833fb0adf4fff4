"""The methods hyperflux is compared with, on one shared mask machinery, so the comparison is of methods alone.

Every baseline selects the same tensors as `Hyperflux` (`select_targets`), keeps a boolean keep-mask per
tensor and drives it from the trainer's step: `after_backward()` reads the dense gradient (Taylor scores,
RigL's growth signal) and then zeroes the pruned entries' gradients; `end_step()` re-zeroes the pruned
weights after the optimiser step (so no momentum or weight decay can move them) and changes the masks when
the method's schedule says so. Every method ends at exactly round(target density * N) kept weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hyperflux.selection import DEFAULT_MODULES, select_targets

STATE_FORMAT = 1
# Per-entry optimiser state that belongs to one weight; cleared when its mask flips, so a pruned or regrown
# weight starts from rest (RigL: grown weights start at zero, with no stale momentum).
_ENTRY_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def cubic(start: float, end: float, progress: float) -> float:
    """Zhu and Gupta's schedule: `end + (start - end) * (1 - progress)^3`, fast at first, gentle at the end."""
    return end + (start - end) * (1 - min(max(progress, 0.0), 1.0)) ** 3


def erk_counts(shapes: Sequence[Sequence[int]], kept: int) -> list[int]:
    """Erdős–Rényi-Kernel allocation (Evci et al.): per-layer density proportional to sum(shape) / prod(shape),
    layers that would exceed density 1 kept dense; counts sum to exactly `kept`."""
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        budget = kept - sum(sizes[i] for i in dense)
        scale = budget / sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        over = [i for i in range(len(sizes)) if i not in dense and scale * raw[i] > 1]
        if not over:
            break
        dense.add(max(over, key=lambda i: raw[i]))
    counts = [
        sizes[i] if i in dense else min(sizes[i], round(scale * raw[i] * sizes[i])) for i in range(len(sizes))
    ]
    # rounding leaves a few weights over or under: settle them on the largest sparse layers
    order = sorted((i for i in range(len(sizes)) if i not in dense), key=lambda i: -sizes[i])
    for i in order:
        diff = kept - sum(counts)
        if diff == 0:
            break
        counts[i] = min(sizes[i], max(0, counts[i] + diff))
    return counts


def _top(scores: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Masks keeping the `count` globally highest scores (exactly `count`, ties broken by position)."""
    flat = torch.cat([s.flatten().float() for s in scores])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(count).indices] = True
    return [part.view_as(s) for part, s in zip(keep.split([s.numel() for s in scores]), scores, strict=True)]


class Baseline:
    """A fixed-schedule pruning method on boolean masks; subclasses say when and how the masks change.

    `total_steps` is the run's budget in optimiser steps, `batches` the steps per epoch; the schedule keys
    (`prune_epoch`, `start_epoch`, `end_epoch`, `rewind_epoch`) count epochs from 0.
    """

    name = "baseline"
    # what `stats()["importance_min"]` measures: "magnitude" (|W|), "taylor" (|W * g|) or None (no threshold)
    importance_kind: str | None = None

    def __init__(
        self,
        model: nn.Module,
        target_sparsity: float,
        total_epochs: int,
        batches: int,
        *,
        modules: Sequence[type[nn.Module]] = DEFAULT_MODULES,
        names: Sequence[str] | str | None = None,
        ignore: Sequence[str] | str | None = None,
        seed: int = 0,
        **settings: Any,
    ) -> None:
        self.model = model
        self.targets = select_targets(model, modules, names, ignore)
        self.weights = {t.name: getattr(t.module, t.param_name) for t in self.targets}
        self.mask = {name: torch.ones_like(w, dtype=torch.bool) for name, w in self.weights.items()}
        self.total = sum(w.numel() for w in self.weights.values())
        self.target_sparsity = target_sparsity
        self.target_count = round((1 - target_sparsity) * self.total)
        self.batches = batches
        self.total_epochs = total_epochs
        self.total_steps = total_epochs * batches
        self.seed = seed
        self.settings = settings
        self.steps = 0
        self._reset_counts()
        self.optimizers: list[torch.optim.Optimizer] = []

    # ------------------------------------------------------------- what the trainer calls
    def attach(self, *optimizers: torch.optim.Optimizer) -> Baseline:
        """Optimisers whose per-weight state is cleared where a mask flips; then applies the initial masks."""
        self.optimizers.extend(optimizers)
        self.start()
        self._apply()
        return self

    def start(self) -> None:
        """The masks before the first step (dense unless the method prunes at step 0)."""

    def after_backward(self) -> None:
        """Read the dense gradient if the method needs it, then zero the pruned entries' gradients."""
        self.observe()
        for name, weight in self.weights.items():
            if weight.grad is not None:
                weight.grad.mul_(self.mask[name])

    def observe(self) -> None:
        """Hook on the dense gradient of the step being taken."""

    def end_step(self) -> None:
        """After the optimiser step: pruned weights back to exactly zero, then the method's mask update."""
        self.steps += 1
        self.update()
        self._apply()

    def update(self) -> None:
        """Change the masks if the schedule says so at `self.steps` completed steps."""

    # ------------------------------------------------------------- mask changes
    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """New masks; counts the flips and clears the flipped weights' optimiser state."""
        flipped: dict[int, torch.Tensor] = {}
        for name, new in masks.items():
            old = self.mask[name]
            self.layer_pruned[name] += int((old & ~new).sum())
            self.layer_regrown[name] += int((~old & new).sum())
            flipped[id(self.weights[name])] = old ^ new
            self.mask[name] = new.clone()
        with torch.no_grad():
            for optimizer in self.optimizers:
                for param, state in optimizer.state.items():
                    change = flipped.get(id(param))
                    if change is None:
                        continue
                    for key in _ENTRY_STATE:
                        buffer = state.get(key)
                        if isinstance(buffer, torch.Tensor) and buffer.shape == param.shape:
                            buffer.masked_fill_(change, 0.0)

    def prune_to(
        self, masks: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor], unit: float = 1.0
    ) -> None:
        """`set_masks(masks)` for a pruning decision ranked by `scores` (by tensor name), recording its threshold
        importance divided by `unit` (the Neural Pruning Law's minimum importance, method.md section 5): for
        magnitude the largest score removed, for Taylor the smallest score kept. Call it before the weights
        change."""
        threshold = None
        if self.importance_kind == "magnitude":
            removed = torch.cat([scores[n][self.mask[n] & ~m].flatten().float() for n, m in masks.items()])
            threshold = float(removed.max()) if removed.numel() else None
        elif self.importance_kind == "taylor":
            kept = torch.cat([scores[n][m].flatten().float() for n, m in masks.items()])
            threshold = float(kept.min()) if kept.numel() else None
        if threshold is not None:
            self.importance_min = threshold / unit
        self.set_masks(masks)

    def _apply(self) -> None:
        with torch.no_grad():
            for name, weight in self.weights.items():
                weight.mul_(self.mask[name])

    def magnitude_masks(self, count: int) -> dict[str, torch.Tensor]:
        """Keep the `count` largest |W| among the weights present now (global ranking)."""
        scores = [torch.where(self.mask[n], w.detach().abs(), -math.inf) for n, w in self.weights.items()]
        return dict(zip(self.weights, _top(scores, count), strict=True))

    def magnitude_prune(self, count: int) -> None:
        """Prune to the `count` largest |W| present now, recording the largest |W| removed."""
        magnitudes = {n: w.detach().abs() for n, w in self.weights.items()}
        self.prune_to(self.magnitude_masks(count), magnitudes)

    def count_at(self, start: int, end: int) -> int:
        """Kept count of the cubic schedule at this step, between `start` and `end` (steps)."""
        progress = 1.0 if end <= start else (self.steps - start) / (end - start)
        return round(self.total * (1 - cubic(0.0, self.target_sparsity, progress)))

    def expected_density(self) -> float:
        """The density the method's schedule aims at now."""
        return self.target_count / self.total

    def phase(self) -> str:
        return "prune" if self.kept() > self.target_count else "train"

    def schedule_progress(self, progress: float) -> float:
        """Where the trainer's lr schedule reads at `progress` epochs: unchanged except for IMP's rounds."""
        return progress

    def setting(self, key: str, default: Any) -> Any:
        value = self.settings.get(key)
        return default if value is None else value

    # ------------------------------------------------------------- measurement and state
    def masked_weights(self) -> dict[str, nn.Parameter]:
        return dict(self.weights)

    def masks(self) -> dict[str, torch.Tensor]:
        return {name: mask.clone() for name, mask in self.mask.items()}

    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.mask.values()))

    def density(self) -> float:
        return self.kept() / self.total

    def stats(self) -> dict[str, Any]:
        """Counts since the last call (`pruned`, `regrown`, also per layer) and now, in the shape of
        `Hyperflux.stats()`; `importance_min` is the threshold importance of the latest pruning decision since
        the last call (None if there was none, or the method has no threshold), of kind `importance_kind`."""
        layers = [
            {
                "name": name,
                "shape": list(mask.shape),
                "total": mask.numel(),
                "kept": int(mask.sum()),
                "density": int(mask.sum()) / mask.numel(),
                "pruned": self.layer_pruned[name],
                "regrown": self.layer_regrown[name],
            }
            for name, mask in self.mask.items()
        ]
        kept = self.kept()
        record = {
            "phase": self.phase(),
            "kept": kept,
            "total": self.total,
            "density": kept / self.total,
            "sparsity": 1 - kept / self.total,
            "target_sparsity": self.target_sparsity,
            "expected_density": self.expected_density(),
            "pruned": sum(self.layer_pruned.values()),
            "regrown": sum(self.layer_regrown.values()),
            "importance_kind": self.importance_kind,
            "importance_min": self.importance_min,
            "layers": layers,
        }
        self._reset_counts()
        return record

    def _reset_counts(self) -> None:
        """Flips per layer and the latest threshold: what `stats()` reports since its last call."""
        self.layer_pruned = dict.fromkeys(self.weights, 0)
        self.layer_regrown = dict.fromkeys(self.weights, 0)
        self.importance_min: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "method": self.name,
            "steps": self.steps,
            "masks": [m.clone() for m in self.mask.values()],
            **self.extra_state(),
        }

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT or state.get("method") != self.name:
            raise ValueError(f"the state is not a {self.name} state")
        masks = list(state["masks"])
        if len(masks) != len(self.mask):
            raise ValueError(f"the {self.name} state holds {len(masks)} masks, this model {len(self.mask)}")
        for (name, own), mask in zip(self.mask.items(), masks, strict=True):
            if tuple(mask.shape) != tuple(own.shape):
                raise ValueError(
                    f"the {self.name} state's mask for {name} has shape {tuple(mask.shape)}, the weight "
                    f"{tuple(own.shape)}"
                )
        self.steps = int(state["steps"])
        self._reset_counts()  # a checkpoint is taken right after `stats()` reset them
        for name, mask in zip(self.mask, masks, strict=True):
            self.mask[name] = mask.to(self.mask[name].device).bool().clone()
        self.load_extra_state(state)

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `extra_state` saved."""

    def squash(self) -> nn.Module:
        """The model with the masks baked in (they already are: pruned weights are stored as zeros)."""
        self._apply()
        return self.model


class Random(Baseline):
    """A uniformly random global mask at the target from step 0, then trained: the floor."""

    name = "random"

    def start(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        scores = [torch.rand(w.shape, generator=generator).to(w.device) for w in self.weights.values()]
        self.set_masks(dict(zip(self.weights, _top(scores, self.target_count), strict=True)))

    def phase(self) -> str:
        return "train"


class Magnitude(Baseline):
    """One-shot global magnitude pruning after `prune_epoch` epochs (default: the recipe's pruning epochs, or
    half the budget without a regrowth phase), then fine-tuning with the same masks."""

    name = "magnitude"
    importance_kind = "magnitude"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prune_step = self.setting("prune_epoch", self.settings["phase_end"]) * self.batches

    def start(self) -> None:
        self.update()

    def update(self) -> None:
        if self.steps == self.prune_step:
            self.magnitude_prune(self.target_count)

    def expected_density(self) -> float:
        return 1.0 if self.steps < self.prune_step else self.target_count / self.total


class Gradual(Baseline):
    """Shared by GMP and Taylor: the cubic schedule from `start_epoch` (default 0) to `end_epoch` (default the
    end of the pruning phase), each update keeping the best-scored present weights. The end step always
    updates, whatever the method's interval, so that the schedule ends at the target."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_step = self.setting("start_epoch", 0) * self.batches
        self.end_step_at = self.setting("end_epoch", self.settings["phase_end"]) * self.batches

    def expected_density(self) -> float:
        return self.count_at(self.start_step, self.end_step_at) / self.total

    def due(self) -> bool:
        raise NotImplementedError

    def scores(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def importance_unit(self) -> float:
        """What the scores are divided by for `importance_min`."""
        return 1.0

    def update(self) -> None:
        at_end = self.steps == self.end_step_at
        if self.start_step <= self.steps <= self.end_step_at and (at_end or self.due()):
            count = self.count_at(self.start_step, self.end_step_at)
            if count < self.kept():
                scores = dict(zip(self.mask, self.scores(), strict=True))
                present = [torch.where(self.mask[n], s, -math.inf) for n, s in scores.items()]
                masks = dict(zip(self.mask, _top(present, count), strict=True))
                self.prune_to(masks, scores, unit=self.importance_unit())


class GMP(Gradual):
    """Gradual magnitude pruning (Zhu and Gupta 2017): global |W|, masks updated every `update_every` steps
    (default min(100, batches per epoch)) and at the end step."""

    name = "gmp"
    importance_kind = "magnitude"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.every = self.setting("update_every", min(100, self.batches))

    def due(self) -> bool:
        return (self.steps - self.start_step) % self.every == 0

    def scores(self) -> list[torch.Tensor]:
        return [w.detach().abs() for w in self.weights.values()]


class Taylor(Gradual):
    """First-order Taylor importance (Molchanov et al.): |W * dL/dW| summed over the batches since the last
    update, pruned every `update_every` steps (default: at each epoch end) on the cubic schedule."""

    name = "taylor"
    importance_kind = "taylor"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.every = self.setting("update_every", self.batches)
        self.score = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in self.weights.items()}

    def observe(self) -> None:
        # a gradient that overflowed (an fp16 step the loss scaler skips) adds nothing: infinities would
        # outrank every real score until the next update
        with torch.no_grad():
            for name, weight in self.weights.items():
                if weight.grad is not None:
                    importance = (weight.detach() * weight.grad).abs().float()
                    self.score[name].add_(importance.nan_to_num_(nan=0.0, posinf=0.0))

    def due(self) -> bool:
        return self.steps % self.every == 0 and self.steps > self.start_step

    def scores(self) -> list[torch.Tensor]:
        return list(self.score.values())

    def importance_unit(self) -> float:
        """The score summed over the batches since the last reset, reported as the mean |W * g| per batch."""
        return float(self.steps % self.every or self.every)

    def update(self) -> None:
        super().update()
        if self.steps % self.every == 0:
            for score in self.score.values():
                score.zero_()

    def extra_state(self) -> dict[str, Any]:
        return {"score": [s.clone() for s in self.score.values()]}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        for name, score in zip(self.score, state["score"], strict=True):
            self.score[name] = score.to(self.score[name].device).clone()


class IMP(Baseline):
    """Iterative magnitude pruning with rewinding (Frankle et al.): train, prune 20% of what remains
    (`prune_fraction`), rewind the weights to their value at `rewind_epoch` (default 1, an early point),
    repeat until the target. The budget's steps are split evenly between the rounds, or, with `final_share`,
    that share of them goes to the last round (the final mask's training) and the rest is split evenly between
    the rounds before it; each round replays the lr schedule from the rewind point, compressed into its
    share."""

    name = "imp"
    importance_kind = "magnitude"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fraction = self.setting("prune_fraction", 0.2)
        counts = []
        kept = self.total
        while kept > self.target_count:
            # at least one weight a round: 20% of four weights rounds to none
            kept = max(self.target_count, min(kept - 1, round(kept * (1 - fraction))))
            counts.append(kept)
        self.counts = counts
        rounds = len(counts) + 1  # the dense round, then one per prune
        share = self.setting("final_share", None)
        if share is not None and not (0 < share < 1 and round(share * self.total_steps) >= 1):
            raise ValueError(
                f"imp's final_share must be in (0, 1) and give the final mask at least one of the budget's "
                f"{self.total_steps} steps, got {share}"
            )
        # the steps of the rounds before the last, which get equal parts of them
        before_last = None if share is None else self.total_steps - round(share * self.total_steps)
        if self.total_steps < rounds or (before_last is not None and before_last < rounds - 1):
            raise ValueError(
                f"imp needs {rounds} rounds of at least one step but the budget has only {self.total_steps} "
                f"steps" + ("" if share is None else f", {before_last} of them before the final share")
            )
        if before_last is None:
            self.ends = [round((j + 1) * self.total_steps / rounds) for j in range(rounds)]
        else:
            self.ends = [round((j + 1) * before_last / (rounds - 1)) for j in range(rounds - 1)]
            self.ends.append(self.total_steps)
        self.rewind_epoch = self.setting("rewind_epoch", min(1, self.total_epochs - 1))
        # the rewind point is taken in the dense round, whose schedule is compressed like every round's
        self.rewind_step = round(self.rewind_epoch / self.total_epochs * self.ends[0])
        self.rewind: list[torch.Tensor] | None = None
        self.rewind_buffers: list[torch.Tensor] = []  # BatchNorm statistics, rewound with the weights

    def start(self) -> None:
        self.update()

    def current_round(self) -> int:
        return sum(self.steps >= end for end in self.ends[:-1])

    def update(self) -> None:
        if self.steps == self.rewind_step and self.rewind is None:
            self.rewind = [p.detach().clone() for p in self.model.parameters()]
            self.rewind_buffers = [b.detach().clone() for b in self.model.buffers()]
        if self.steps in self.ends[:-1]:
            self.magnitude_prune(self.counts[self.ends.index(self.steps)])
            with torch.no_grad():
                for param, saved in zip(self.model.parameters(), self.rewind, strict=True):
                    param.copy_(saved)
                # a checkpoint from before buffers were rewound holds none: nothing to zip
                for buffer, saved in zip(self.model.buffers(), self.rewind_buffers, strict=False):
                    buffer.copy_(saved)
            for optimizer in self.optimizers:
                optimizer.state.clear()  # a rewound run restarts its optimiser too

    def expected_density(self) -> float:
        current = self.current_round()
        return (self.counts[current - 1] if current else self.total) / self.total

    def schedule_progress(self, progress: float) -> float:
        step = round(progress * self.batches, 6)  # epoch + batch / batches: 14.999... would be round 0's
        current = sum(step >= end for end in self.ends[:-1])
        begin = self.ends[current - 1] if current else 0
        local = (step - begin) / (self.ends[current] - begin)
        origin = self.rewind_epoch if current else 0.0
        return origin + local * (self.total_epochs - origin)

    def extra_state(self) -> dict[str, Any]:
        return {"rewind": self.rewind, "rewind_buffers": self.rewind_buffers}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        saved = state["rewind"]
        self.rewind = None if saved is None else [t.clone() for t in saved]
        self.rewind_buffers = [t.clone() for t in state.get("rewind_buffers", [])]


class RigL(Baseline):
    """Rigged lottery (Evci et al. 2020): ERK per-layer allocation and a random mask at the target from step 0;
    every `update_every` steps until `end_epoch` (default 3/4 of the budget) each layer drops its smallest
    |W| and grows as many inactive weights with the largest |gradient|, grown weights starting at zero. The
    dropped fraction (`drop_fraction`, default 0.3) decays on a cosine to zero at the end."""

    name = "rigl"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.every = self.setting("update_every", min(100, self.batches))
        self.end_at = self.setting("end_epoch", round(0.75 * self.total_epochs)) * self.batches
        self.drop_fraction = self.setting("drop_fraction", 0.3)
        self.grad: dict[str, torch.Tensor] = {}

    def start(self) -> None:
        shapes = [list(w.shape) for w in self.weights.values()]
        generator = torch.Generator().manual_seed(self.seed)
        masks = {}
        for (name, weight), count in zip(
            self.weights.items(), erk_counts(shapes, self.target_count), strict=True
        ):
            scores = torch.rand(weight.shape, generator=generator).to(weight.device)
            masks[name] = _top([scores], count)[0]
        self.set_masks(masks)

    def phase(self) -> str:
        return "train"

    def updating(self, steps: int) -> bool:
        return steps % self.every == 0 and 0 < steps < self.end_at

    def observe(self) -> None:
        if self.updating(self.steps + 1):
            self.grad = {  # an overflowed gradient (see Taylor) grows nothing
                n: w.grad.detach().abs().nan_to_num_(nan=0.0, posinf=0.0)
                for n, w in self.weights.items()
                if w.grad is not None
            }

    def update(self) -> None:
        if not self.updating(self.steps):
            return
        fraction = self.drop_fraction * (1 + math.cos(math.pi * self.steps / self.end_at)) / 2
        masks = {}
        for name, weight in self.weights.items():
            mask = self.mask[name]
            active = int(mask.sum())
            drop = round(fraction * active)
            if drop == 0 or name not in self.grad:  # a layer no batch reached since the last update
                masks[name] = mask
                continue
            survivors = _top([torch.where(mask, weight.detach().abs(), -math.inf)], active - drop)[0]
            grown = _top([torch.where(survivors, -math.inf, self.grad[name].float())], drop)[0]
            masks[name] = survivors | grown
        self.grad = {}
        self.set_masks(masks)  # grown weights were pruned, so they are zero: they start at zero


METHODS: dict[str, type[Baseline]] = {cls.name: cls for cls in (Magnitude, GMP, IMP, Taylor, RigL, Random)}


def build(
    method: str,
    model: nn.Module,
    target_sparsity: float,
    pruning_epochs: int,
    regrowth_epochs: int,
    batches: int,
    **options: Any,
) -> Baseline:
    """The baseline `method` over the same epoch budget as hyperflux (pruning + regrowth epochs)."""
    total = pruning_epochs + regrowth_epochs
    end = phase_end(pruning_epochs, regrowth_epochs)
    return METHODS[method](model, target_sparsity, total, batches, phase_end=end, **options)


def phase_end(pruning_epochs: int, regrowth_epochs: int) -> int:
    """The epoch at which schedules that prune and then fine-tune end their pruning: where hyperflux's pruning
    phase ends, or at 3/4 of the budget when the recipe has no regrowth phase."""
    return pruning_epochs if regrowth_epochs else max(1, round(0.75 * (pruning_epochs + regrowth_epochs)))
