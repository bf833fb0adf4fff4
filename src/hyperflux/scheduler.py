"""The pressure schedule: a target density trajectory and the closed-loop gamma controller (method.md s. 3)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

_RETENTION_CAP = 0.999


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1) (0.98 means 98%), got {value}")
    return value


def _check_number(
    name: str, value: object, low: float = 0.0, *, strict: bool = True, integer: bool = False
) -> float:
    """`value` as a float, refused unless finite and above `low` (or at it, unless `strict`) and, with
    `integer`, whole: NaN passes every plain comparison, so each check is written as what must hold."""
    try:
        if isinstance(value, bool | str):  # float() would read True as 1 and "30" as 30
            raise TypeError
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(number) and (number > low or (not strict and number == low))) or (
        integer and number != int(number)
    ):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind} {'>' if strict else '>='} {low:g}, got {value!r}")
    return number


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def trajectory_density(s0: float, epoch: int, epochs: int, aggressivity: float) -> float:
    """Expected density (fraction) after `epoch` epochs: the product of the per-epoch retentions r_k."""
    density = 1.0
    for k in range(1, min(epoch, epochs) + 1):
        density *= s0 + (_RETENTION_CAP - s0) * _sigmoid((aggressivity / epochs) * (k - epochs / 2))
    return density


def solve_s0(target_density: float, epochs: int, aggressivity: float) -> float:
    """Bisection on [0, 0.999] for the base retention s0 that makes the trajectory end at the target."""
    low, high = 0.0, _RETENTION_CAP
    for _ in range(100):
        mid = (low + high) / 2
        if trajectory_density(mid, epochs, epochs, aggressivity) < target_density:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return (low + high) / 2


class PressureScheduler:
    """Owns the global pressure P = gamma ** exponent and how it evolves, one `step()` per period.

    Three modes:
    - trajectory (the default): a target sparsity reached after `epochs` periods along the sigmoid-shaped
      trajectory, tracked by the integral controller of method.md section 3;
    - constant: `PressureScheduler.constant(P)`, a fixed pressure (for the scaling-law experiments);
    - schedule: `PressureScheduler.from_schedule(fn_or_list)`, pressure = schedule(periods completed).
    """

    def __init__(
        self,
        target_sparsity: float | None = None,
        epochs: int | None = None,
        *,
        aggressivity: float = 6.0,
        delta: float = 0.3,
        exponent: float = 1.5,
        pressure: float | None = None,
        schedule: Callable[[int], float] | Sequence[float] | None = None,
    ) -> None:
        given = sum(x is not None for x in (target_sparsity, pressure, schedule))
        if given != 1:
            raise ValueError("give exactly one of target_sparsity (with epochs), pressure, or schedule")
        self.delta = _check_number("delta", delta)
        # `delta` is the gain now (the exact mode's regrowth lowers it); `base_delta` the one given
        self.base_delta = self.delta
        self.exponent = _check_number("exponent", exponent)
        self.aggressivity = _check_number("aggressivity", aggressivity)
        self.target_sparsity: float | None = None
        self.epochs: int | None = None
        self.s0: float | None = None
        self._constant: float | None = None
        self._schedule: Callable[[int], float] | None = None
        if target_sparsity is not None:
            self.target_sparsity = _check_fraction("target_sparsity", target_sparsity)
            if epochs is None:
                raise ValueError("epochs must be a positive integer for a target trajectory, got None")
            self.epochs = int(_check_number("epochs", epochs, 1, strict=False, integer=True))
            self.s0 = solve_s0(1.0 - self.target_sparsity, self.epochs, self.aggressivity)
            reachable = trajectory_density(self.s0, self.epochs, self.epochs, self.aggressivity)
            if reachable > (1.0 - self.target_sparsity) * 1.001:
                warnings.warn(
                    f"in {self.epochs} period{'s' if self.epochs != 1 else ''} the trajectory reaches {reachable:.2%} density at the lowest, not "
                    f"the target {1.0 - self.target_sparsity:.2%}; the controller follows what it can reach (an "
                    "exact-target run still trims to the count at the freeze); for more periods, prune longer or "
                    "close a period every K batches",
                    stacklevel=2,
                )
        elif pressure is not None:
            self._constant = _check_number("a constant pressure", pressure, strict=False)
        else:
            self._schedule = self._wrap_schedule(schedule)
        self.epoch = 0
        self.gamma = 0.0
        self.boost_up = 0.0
        self.boost_down = 0.0

    @classmethod
    def constant(cls, pressure: float) -> PressureScheduler:
        return cls(pressure=pressure)

    @classmethod
    def from_schedule(cls, schedule: Callable[[int], float] | Sequence[float]) -> PressureScheduler:
        return cls(schedule=schedule)

    @staticmethod
    def _wrap_schedule(schedule: Callable[[int], float] | Sequence[float] | None) -> Callable[[int], float]:
        if callable(schedule):
            return schedule
        values = [float(v) for v in schedule]  # type: ignore[union-attr]
        if not values or any(not v >= 0 or math.isinf(v) for v in values):
            raise ValueError("a pressure schedule must be a non-empty list of finite pressures >= 0")
        return lambda epoch: values[min(epoch, len(values) - 1)]

    @property
    def mode(self) -> str:
        if self.s0 is not None:
            return "trajectory"
        return "constant" if self._constant is not None else "schedule"

    @property
    def pressure(self) -> float:
        """The pressure for the period now running."""
        if self._constant is not None:
            return self._constant
        if self._schedule is not None:
            value = float(self._schedule(self.epoch))
            if not value >= 0 or math.isinf(value):
                raise ValueError(
                    f"the pressure schedule gave {value} at period {self.epoch}; need finite >= 0"
                )
            return value
        return self.gamma**self.exponent

    def expected_density(self, epoch: int) -> float:
        """Target density (fraction) after `epoch` periods: the final target from `epochs` on, or, where the
        trajectory cannot reach it in `epochs` periods (the constructor warns), the lowest density it reaches.

        Never below the target: a target density above `0.999 ** epochs` is more than the retention cap of
        method.md s. 3 lets the trajectory end at, so it reaches the target early and holds it there.
        """
        if self.s0 is None or self.epochs is None or self.target_sparsity is None:
            raise ValueError(f"a {self.mode}-mode scheduler has no target trajectory")
        density = trajectory_density(self.s0, max(int(epoch), 0), self.epochs, self.aggressivity)
        return max(density, 1.0 - self.target_sparsity)

    def step(self, measured_density: float) -> float:
        """Close one period with its measured density; returns the pressure for the next period."""
        measured_density = float(measured_density)
        if not 0.0 <= measured_density <= 1.0:
            raise ValueError(f"measured_density must be a fraction in [0, 1], got {measured_density}")
        self.epoch += 1
        if self.s0 is not None:
            if measured_density > self.expected_density(self.epoch):
                self.gamma += self.delta + self.boost_up
                self.boost_up += self.delta / 4
                self.boost_down = 0.0
            else:
                gamma = self.gamma - self.delta - self.boost_down
                self.gamma = gamma if gamma > 1e-9 else 0.0  # not a rounding residue like 5e-17
                self.boost_down += self.delta / 4
                self.boost_up = 0.0
        return self.pressure

    def reset(self) -> None:
        """Release the pressure: gamma and both integrators back to zero (the paper's regrowth transition)."""
        self.gamma = self.boost_up = self.boost_down = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "target_sparsity": self.target_sparsity,
            "epochs": self.epochs,
            "epoch": self.epoch,
            "gamma": self.gamma,
            "boost_up": self.boost_up,
            "boost_down": self.boost_down,
            "delta": self.delta,
            "exponent": self.exponent,
            "aggressivity": self.aggressivity,
            "constant": self._constant,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode or state.get("target_sparsity") != self.target_sparsity:
            raise ValueError(
                f"scheduler state is for mode={state.get('mode')!r}, target={state.get('target_sparsity')}; "
                f"this scheduler is mode={self.mode!r}, target={self.target_sparsity}"
            )
        if state.get("epochs") != self.epochs:
            raise ValueError(
                f"scheduler state is for {state.get('epochs')} epochs, this one for {self.epochs}"
            )
        # this scheduler's settings hold; the state's must match them (a state of the exact mode's regrowth
        # carries the regrowth gain, which the sparsifier checks)
        settings = {"exponent": self.exponent}
        if self._constant is not None:
            settings["constant"] = self._constant
        if self.s0 is not None:
            settings["aggressivity"] = self.aggressivity  # the trajectory's s0 is solved for it
            if int(state["epoch"]) < self.epochs:  # the controller's gain while pruning
                settings["delta"] = self.base_delta
        for key, value in settings.items():
            if state.get(key) is None or float(state[key]) != value:
                raise ValueError(f"scheduler state is for {key} {state.get(key)}, this one for {value}")
        self.epoch = int(state["epoch"])
        self.gamma = float(state["gamma"])
        self.boost_up = float(state["boost_up"])
        self.boost_down = float(state["boost_down"])
        self.delta = float(state["delta"])
        self.exponent = float(state["exponent"])
        self.aggressivity = float(state["aggressivity"])
        if self._constant is not None:
            self._constant = float(state["constant"])

    def __repr__(self) -> str:
        if self.mode == "trajectory":
            return (
                f"PressureScheduler(target_sparsity={self.target_sparsity}, epochs={self.epochs}, "
                f"s0={self.s0:.5f}, epoch={self.epoch}, gamma={self.gamma:.4g}, pressure={self.pressure:.4g})"
            )
        return f"PressureScheduler(mode={self.mode}, epoch={self.epoch}, pressure={self.pressure:.4g})"
