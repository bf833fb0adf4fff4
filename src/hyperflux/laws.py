"""The laws pruning reveals (method.md section 5), fitted on hyperflux runs.

- Pressure scaling law: under a constant pressure P the density converges to S, and across pressures
  `ln S = ln c - a0 ln P - a1 (ln P)^2` (a1 = 0: the pure power law `S = c P^-a0`).
- Neural Pruning Law: the minimum importance I among surviving weights (for hyperflux the pressure, or the
  smallest flux) and the density follow `ln S = ln c - k ln I` on 0.5% < S <= 50%. It is the paper's form
  (arXiv 2504.05349), density as a function of importance, so k of the pressure series is comparable with a0.

Densities are fractions, as everywhere in hyperflux; c is in the unit of the densities given (100 c in %).
The fits are ordinary least squares in log space (numpy: scipy is not a runtime dependency), and R^2 is
measured there, on ln S.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure

from hyperflux.recipe import changes_since, load_recipe, read_yaml
from hyperflux.runfiles import CHECKPOINT, RECIPE, SUMMARY, RunError, RunFolder

# The authors' public ResNet-50 / CIFAR-10 points (method.md section 5): pressure -> density (fraction).
AUTHORS_RESNET50_CIFAR10: tuple[tuple[float, float], ...] = (
    (2.0**-10, 0.9346),
    (2.0**-8, 0.4776),
    (2.0**-6, 0.2440),
    (2.0**-4, 0.1403),
    (2.0**-2, 0.0767),
    (1.0, 0.0349),
    (4.0, 0.0130),
    (16.0, 0.0048),
    (32.0, 0.0029),
)
# The default sweep, 2^-8 .. 2^2: on LeNet-300-100 pressures above ~1 already leave less than 1% of the weights
DEFAULT_PRESSURES: tuple[float, ...] = tuple(2.0**k for k in range(-8, 3))
NPLH_WINDOW = (0.005, 0.5)  # lo < density <= hi, the region the authors fit
NPLH_SERIES = ("pressure", "flux_min", "flux_p01")
BASELINE_SERIES = "importance_min"  # written by the baselines in the epochs where they prune
MIN_POINTS = 3  # a power law's two parameters and one degree of freedom; the quadratic form needs one more


def min_points(quadratic: bool) -> int:
    """The fewest points a fit of the scaling law takes: one more than its parameters, or R^2 is 1 by
    construction."""
    return MIN_POINTS + quadratic


@dataclass(frozen=True)
class PressureFit:
    """`ln S = ln c - a0 ln P - a1 (ln P)^2`, fitted on n runs with pressures in [p_min, p_max]."""

    c: float
    a0: float
    a1: float
    r2: float
    n: int
    p_min: float
    p_max: float

    def density(self, pressure: float | np.ndarray) -> float | np.ndarray:
        log_p = np.log(pressure)
        return self.c * np.exp(-self.a0 * log_p - self.a1 * log_p**2)


@dataclass(frozen=True)
class PowerFit:
    """`ln S = ln c - exponent ln I`, fitted on the n points with lo < S <= hi."""

    exponent: float
    c: float
    r2: float
    n: int


def _logs(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """ln of values that must all be finite and positive (a log-log fit has no place for the others)."""
    array = np.asarray(values, dtype=float)
    bad = array[~(np.isfinite(array) & (array > 0))]
    if bad.size:
        raise ValueError(f"{name} must be positive and finite, got {bad[0]:g} ({bad.size} such values)")
    return np.log(array)


def _least_squares(columns: list[np.ndarray], y: np.ndarray) -> tuple[np.ndarray, float]:
    """Coefficients and R^2 of y on the columns; a singular design (too few distinct x) is an error."""
    design = np.stack(columns, axis=1)
    coef, _, rank, _ = np.linalg.lstsq(design, y, rcond=None)
    if rank < design.shape[1]:
        raise ValueError(f"need at least {design.shape[1]} distinct x values to fit, the data has fewer")
    residual = y - design @ coef
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(residual @ residual) / total if total > 0 else math.nan
    return coef, r2


def _check_count(n: int, m: int, least: int = MIN_POINTS) -> None:
    if n != m:
        raise ValueError(f"need as many densities as x values, got {m} and {n}")
    if n < least:
        raise ValueError(f"need at least {least} points to fit, got {n}")


def fit_pressure_law(
    pressures: Sequence[float], densities: Sequence[float], *, quadratic: bool = True
) -> PressureFit:
    """Fit the scaling law on (constant pressure, converged density) pairs; `quadratic=False` fixes a1 = 0."""
    _check_count(len(pressures), len(densities), min_points(quadratic))
    log_p, log_s = _logs("pressures", pressures), _logs("densities", densities)
    columns = [np.ones_like(log_p), -log_p] + ([-(log_p**2)] if quadratic else [])
    coef, r2 = _least_squares(columns, log_s)
    a1 = float(coef[2]) if quadratic else 0.0
    p = np.asarray(pressures, dtype=float)
    return PressureFit(math.exp(coef[0]), float(coef[1]), a1, r2, len(p), float(p.min()), float(p.max()))


def predict_pressure(fit: PressureFit, density: float) -> float:
    """The constant pressure the fit says ends at `density`: the root of the quadratic in ln P that lies in
    the fitted range of pressures (outside it, or with two roots in it, the fit cannot say)."""
    if not (math.isfinite(density) and density > 0):
        raise ValueError(f"a density must be positive, got {density:g}")
    t = math.log(density) - math.log(fit.c)  # solve a1 L^2 + a0 L + t = 0 for L = ln P
    if fit.a1 == 0:
        roots = [-t / fit.a0] if fit.a0 != 0 else []
    else:
        disc = fit.a0**2 - 4 * fit.a1 * t
        # the cancellation-free pair of roots: with a1 near 0 the textbook form loses the root that matters
        q = -(fit.a0 + math.copysign(math.sqrt(disc), fit.a0)) / 2 if disc >= 0 else 0.0
        roots = [] if disc < 0 else [r for r in (q / fit.a1, t / q if q else math.nan) if math.isfinite(r)]
    lo, hi = math.log(fit.p_min), math.log(fit.p_max)
    slack = 1e-9 * max(1.0, hi - lo)
    inside = sorted({r for r in roots if lo - slack <= r <= hi + slack})
    if len(inside) != 1:
        why = "two pressures give it (the fit is not monotonic there)" if inside else "outside the fit"
        raise ValueError(
            f"no single pressure in the fitted range [{fit.p_min:g}, {fit.p_max:g}] gives density "
            f"{density:g}: {why}"
        )
    return math.exp(inside[0])


def _pruning_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows of the pruning phase: after it the paper's form releases the pressure and masks stop, so only
    these tie density to pressure and flux."""
    return [r for r in rows if r.get("phase", "pruning") == "pruning" and r.get("density") is not None]


def converged_density(rows: Sequence[Mapping[str, Any]], window: int = 5, tol: float = 0.02) -> float | None:
    """The final density of a constant-pressure run, or None if it has not converged: converged means the
    densities of the last `window` pruning epochs spread by at most `tol` relative to the last one
    ((max - min) / last <= tol)."""
    if window < 2 or not tol >= 0:
        raise ValueError(f"need window >= 2 and tol >= 0, got {window} and {tol:g}")
    spread = density_spread(rows, window)
    if spread is None or spread > tol:
        return None
    return float(_pruning_rows(rows)[-1]["density"])


def density_spread(rows: Sequence[Mapping[str, Any]], window: int = 5) -> float | None:
    """(max - min) / last of the density over the last `window` pruning epochs (None with fewer epochs; 0 for
    a run stuck at density 0, infinite for one that just reached it): the measure of convergence."""
    densities = [float(r["density"]) for r in _pruning_rows(rows)][-window:]
    if len(densities) < window:
        return None
    spread = max(densities) - min(densities)
    if densities[-1] > 0:
        return spread / densities[-1]
    return 0.0 if spread == 0 else math.inf


def fit_power_law(
    densities: Sequence[float],
    importances: Sequence[float],
    lo: float = NPLH_WINDOW[0],
    hi: float = NPLH_WINDOW[1],
) -> PowerFit:
    """Fit the Neural Pruning Law `ln S = ln c - k ln I` on the points with lo < S <= hi."""
    _check_count(len(importances), len(densities))
    s, i = np.asarray(densities, dtype=float), np.asarray(importances, dtype=float)
    keep = (s > lo) & (s <= hi)
    if keep.sum() < MIN_POINTS:
        raise ValueError(
            f"need at least {MIN_POINTS} points with {lo:g} < density <= {hi:g}, got {keep.sum()}"
        )
    log_i, log_s = _logs("importances", i[keep]), np.log(s[keep])
    coef, r2 = _least_squares([np.ones_like(log_i), -log_i], log_s)
    return PowerFit(float(coef[1]), math.exp(coef[0]), r2, int(keep.sum()))


class Series(NamedTuple):
    """One importance series of a run: its points, how many non-positive importances were left out, and why
    the series is no minimum importance at all (`not_a_law`), when it is not."""

    densities: list[float]
    importances: list[float]
    left_out: int
    not_a_law: str | None = None


def nplh_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, Series]:
    """The importance series of a run against density. A hyperflux run: the pressure and the smallest and
    1st-percentile flux of surviving weights, from its pruning epochs. A baseline run: `importance_min`, the
    threshold of each pruning decision (magnitude, GMP, IMP: the largest |w| removed; Taylor: the smallest
    |w g| kept), from the epochs that pruned. Non-positive values are left out and counted: P = 0 while the
    controller lets go, or a sampled negative flux, is no minimum importance. The pressure of a run whose
    pressure fell (a controller chasing a target, which raises and releases it) is not a threshold either: its
    series comes with `not_a_law` set."""
    pruning = _pruning_rows(rows)
    sources = {key: pruning for key in NPLH_SERIES} | {BASELINE_SERIES: rows}
    series = {}
    for key, source in sources.items():
        points = [(float(r["density"]), float(r[key])) for r in source if r.get(key) is not None]
        kept = [p for p in points if p[1] > 0]
        if points:
            series[key] = Series([p[0] for p in kept], [p[1] for p in kept], len(points) - len(kept))
    if "pressure" in series:
        values = [float(r["pressure"]) for r in pruning if r.get("pressure") is not None]
        if any(later < earlier for earlier, later in itertools.pairwise(values)):
            series["pressure"] = series["pressure"]._replace(
                not_a_law="the pressure fell during pruning (a controller chasing a target sparsity moves it "
                "both ways), so it is no threshold; a sweep of constant pressures gives the law "
                "(hyperflux law pressure)"
            )
    return series


# ----------------------------------------------------------------- run folders
def read_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run folder's saved recipe and its metrics rows; a folder without them is an error."""
    folder = RunFolder(run_dir)
    if not folder.file(RECIPE).is_file():
        raise RunError(f"{folder.path}: not a run folder (no {RECIPE})")
    rows = folder.read_metrics()
    if not rows:
        raise RunError(f"{folder.path}: no metrics.jsonl with any epoch")
    recipe = read_yaml(folder.file(RECIPE))
    if not isinstance(recipe, dict):
        raise RunError(f"{folder.file(RECIPE)}: not a recipe")
    return recipe, rows


def constant_pressure(recipe: Mapping[str, Any]) -> float | None:
    """The run's constant pressure (`hyperflux.pressure`), None for a run under another schedule."""
    value = (recipe.get("hyperflux") or {}).get("pressure")
    return None if value is None else float(value)


# ----------------------------------------------------------------- the sweep
def sweep_recipe(
    recipe_path: str | Path, pressure: float, epochs: int, assignments: Sequence[str] = ()
) -> dict[str, Any]:
    """The recipe at `recipe_path` (with `assignments` applied) turned into a constant-pressure run: hyperflux
    in the paper's form at pressure P for `epochs` pruning epochs and no regrowth phase, which would release
    the pressure and let the density move away from where P holds it."""
    if not (math.isfinite(pressure) and pressure > 0):
        raise ValueError(f"a sweep pressure must be positive, got {pressure:g}")
    recipe = load_recipe(
        recipe_path,
        [
            *assignments,
            "method=hyperflux-paper",
            "hyperflux.target_sparsity=null",
            "hyperflux.pressure_schedule=null",
            f"hyperflux.pressure={float(pressure)!r}",  # a numpy scalar's repr is no YAML number
            "hyperflux.exact_target=false",
            f"hyperflux.pruning_epochs={epochs}",
            "hyperflux.regrowth_epochs=0",
        ],
    )
    recipe["name"] = f"{recipe['name']}-P{pressure:g}"
    return recipe


def run_sweep(
    recipe_path: str | Path,
    pressures: Sequence[float],
    epochs: int,
    runs_dir: str | Path,
    assignments: Sequence[str] = (),
    *,
    quiet: bool = True,
    log: Any = None,
) -> list[Path]:
    """Run one constant-pressure run per pressure into `runs_dir/P<pressure>` and return the folders.

    A finished run of the same recipe is kept as it is and a stopped one resumes from its checkpoint, so an
    interrupted sweep continues where it stopped; a finished run of another recipe in the folder is an error.
    """
    from hyperflux.training import run_recipe  # the trainer pulls in the data and model code

    folders = []
    for index, pressure in enumerate(pressures, 1):
        recipe = sweep_recipe(recipe_path, pressure, epochs, assignments)
        folder = Path(runs_dir) / f"P{pressure:g}"
        folders.append(folder)
        if (folder / SUMMARY).is_file():
            changed = changes_since(read_yaml(folder / RECIPE), recipe)
            if changed:
                raise RunError(
                    f"{folder}: holds a finished run of another recipe (differs in {', '.join(changed)}); "
                    "sweep into another folder"
                )
            continue
        if log is not None:
            print(f"[{index}/{len(pressures)}] P {pressure:g}: {epochs} epochs into {folder}", file=log)
        resume = (folder / CHECKPOINT).is_file()
        run_recipe(recipe, folder, resume=resume, overwrite=not resume, quiet=quiet, log=log)
    return folders


# ----------------------------------------------------------------- plots
def _log_axes(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xscale="log", yscale="log")
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _save(fig: Figure, ax: Any, path: Path) -> None:
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)  # a bare Figure renders with Agg: no pyplot, no display


def plot_pressure_law(
    series: Sequence[tuple[str, Sequence[float], Sequence[float], PressureFit]], path: str | Path
) -> None:
    """Each (label, pressures, densities, fit): the points and the fitted curve over their pressures."""
    fig, ax = _log_axes("Pressure scaling law", "constant pressure P", "converged density (%)")
    for index, (label, pressures, densities, fit) in enumerate(series):
        color = f"C{index}"
        ax.plot(pressures, [100 * d for d in densities], "o", color=color, label=label)
        grid = np.geomspace(fit.p_min, fit.p_max, 200)
        ax.plot(
            grid,
            100 * fit.density(grid),
            "-",
            color=color,
            alpha=0.7,
            label=f"fit a0={fit.a0:.3f} a1={fit.a1:.4f} R²={fit.r2:.4f}",
        )
    _save(fig, ax, Path(path))


def plot_nplh(
    series: Sequence[tuple[str, Sequence[float], Sequence[float], PowerFit]],
    path: str | Path,
    window: tuple[float, float] = NPLH_WINDOW,
) -> None:
    """Each (label, densities, importances, fit): the points in the window and the fitted power law."""
    fig, ax = _log_axes("Neural Pruning Law", "minimum importance I", "density (%)")
    for index, (label, densities, importances, fit) in enumerate(series):
        s, i = np.asarray(densities), np.asarray(importances)
        keep = (s > window[0]) & (s <= window[1])
        color = f"C{index}"
        ax.plot(i[keep], 100 * s[keep], ".", color=color, label=label)
        grid = np.geomspace(i[keep].min(), i[keep].max(), 100)
        ax.plot(
            grid,
            100 * fit.c * grid**-fit.exponent,
            "-",
            color=color,
            alpha=0.7,
            label=f"k={fit.exponent:.3f}",
        )
    _save(fig, ax, Path(path))
