"""The laws pruning reveals, measured on LeNet-300-100 / MNIST (issue 6, method.md section 5).

1. Pressure scaling law: a sweep of 11 constant pressures 2^-8 .. 2^2 (`hyperflux law pressure --sweep`,
   the LeNet recipe in the paper's form, 50 pruning epochs each, mask lr 1e-2), the fit of
   `ln S = ln c - a0 ln P - a1 (ln P)^2` on the runs whose density converged (last 5 epochs within 2%).
2. Prediction: the pressure the fit gives for a 2% density, run the same way; how close it lands.
3. Neural Pruning Law: power laws between density and minimum importance on 0.5% < S <= 50% for hyperflux
   (the sweep's pressures and the 1st percentile of surviving flux), GMP and IMP (the largest |w| removed
   per pruning step) and Taylor (the smallest |w g| kept), the baselines run at 99.5% in the shipped recipe.
4. Regrowth and order, from one paper-form run at 98% observed epoch by epoch: weights back after the
   pressure is released, their share of the final mask and the accuracy without them; the rank correlation of
   the epoch each weight was first pruned with its flux and with its magnitude after epoch 1.

Every run goes to --runs (default runs/laws) and is reused when the script runs again, so an interrupted
run continues where it stopped. Writes benchmarks/results/laws.json, laws.md (tables) and laws/*.png.

    .venv/bin/python benchmarks/laws.py [--runs runs/laws]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from datetime import date
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from hyperflux import laws, report
from hyperflux.recipe import load_recipe
from hyperflux.runfiles import CHECKPOINT, SUMMARY, atomic_write
from hyperflux.training import Trainer, evaluate, run_recipe

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SWEEP_RECIPE = ROOT / "recipes" / "lenet300-mnist-98.yaml"
SWEEP_SET = ["hyperflux.mask_lr=0.01"]  # 10x the paper's mask lr: 50 epochs reach a steady density
SWEEP_EPOCHS = 50
WINDOW, TOL = 5, 0.02
PREDICT_DENSITY = 0.02
NPLH_RECIPE = ROOT / "recipes" / "lenet300-mnist-99.5.yaml"
NPLH_METHODS = ("gmp", "imp", "taylor")
ORDER_RECIPE = ROOT / "recipes" / "lenet300-mnist-98.yaml"


# ----------------------------------------------------------------- 1, 2: the pressure law and a prediction
def pressure_law(
    runs: Path,
) -> tuple[dict[str, Any], laws.PressureFit, laws.PressureFit, list[tuple[float, float]]]:
    """The sweep's record, its fit, the fit of the authors' points, and the converged (pressure, density)."""
    folders = laws.run_sweep(
        SWEEP_RECIPE, laws.DEFAULT_PRESSURES, SWEEP_EPOCHS, runs / "sweep", SWEEP_SET, log=sys.stdout
    )
    points, converged = [], []
    for pressure, folder in zip(laws.DEFAULT_PRESSURES, folders, strict=True):
        rows = laws.read_run(folder)[1]
        density = laws.converged_density(rows, WINDOW, TOL)
        last = rows[-1]
        points.append(
            {
                "pressure": pressure,
                "density": last["density"],
                "converged": density is not None,
                "last_epochs_spread": laws.density_spread(rows, WINDOW),
                "test_accuracy": last["test_accuracy"],
                "flux_min": last.get("flux_min"),
                "flux_p01": last.get("flux_p01"),
            }
        )
        if density is not None:
            converged.append((pressure, density))
    fit = laws.fit_pressure_law(*zip(*converged, strict=True))
    authors = laws.fit_pressure_law(*zip(*laws.AUTHORS_RESNET50_CIFAR10, strict=True))
    record = {**fit_record(fit), "points": points, "authors_resnet50_cifar10": fit_record(authors)}
    return record, fit, authors, converged


def fit_record(fit: laws.PressureFit) -> dict[str, Any]:
    return {"c": fit.c, "c_percent": 100 * fit.c, "a0": fit.a0, "a1": fit.a1, "r2": fit.r2, "n": fit.n}


def prediction(runs: Path, fit: laws.PressureFit) -> dict[str, Any]:
    pressure = laws.predict_pressure(fit, PREDICT_DENSITY)
    (folder,) = laws.run_sweep(SWEEP_RECIPE, [pressure], SWEEP_EPOCHS, runs / "predict", SWEEP_SET)
    rows = laws.read_run(folder)[1]
    achieved = rows[-1]["density"]
    return {
        "target_density": PREDICT_DENSITY,
        "pressure": pressure,
        "achieved_density": achieved,
        "relative_error": abs(achieved - PREDICT_DENSITY) / PREDICT_DENSITY,
        "converged": laws.converged_density(rows, WINDOW, TOL) is not None,
        "test_accuracy": rows[-1]["test_accuracy"],
    }


# ----------------------------------------------------------------- 3: the Neural Pruning Law
def run_method(runs: Path, method: str) -> Path:
    folder = runs / "nplh" / method
    if not (folder / SUMMARY).is_file():
        recipe = load_recipe(NPLH_RECIPE, [f"method={method}"])
        resume = (folder / CHECKPOINT).is_file()
        print(f"NPLH: {method} at 99.5% into {folder}", flush=True)
        run_recipe(recipe, folder, resume=resume, overwrite=not resume, quiet=True)
    return folder


def power_fit(densities: list[float], importances: list[float]) -> laws.PowerFit | str:
    """The NPLH fit of one series, or why it cannot be fitted."""
    try:
        return laws.fit_power_law(densities, importances)
    except ValueError as error:
        return str(error)


def power_record(fit: laws.PowerFit | str) -> dict[str, Any]:
    if isinstance(fit, str):
        return {"exponent": None, "r2": None, "n": 0, "error": fit}
    return {"exponent": fit.exponent, "c": fit.c, "r2": fit.r2, "n": fit.n}


def nplh(runs: Path, sweep_points: list[dict[str, Any]], converged: list[tuple[float, float]]):
    series: dict[str, tuple[list[float], list[float]]] = {
        "hyperflux (pressure)": ([s for _, s in converged], [p for p, _ in converged]),
    }
    flux = [
        (p["density"], p["flux_p01"]) for p in sweep_points if p["converged"] and (p["flux_p01"] or 0) > 0
    ]
    series["hyperflux (1st percentile of surviving flux)"] = ([d for d, _ in flux], [f for _, f in flux])
    for method in NPLH_METHODS:
        found = laws.nplh_series(laws.read_run(run_method(runs, method))[1])[laws.BASELINE_SERIES]
        label = f"{method} ({'smallest |w g| kept' if method == 'taylor' else 'largest |w| removed'})"
        series[label] = (found.densities, found.importances)
    fits = {label: power_fit(*values) for label, values in series.items()}
    return fits, series


# ----------------------------------------------------------------- 4: regrowth and order
class Observer:
    """Wraps `hf.step` of a trainer: keeps the mask after every step, and the flux (pressure units) and |W|
    of every weight at the end of the first epoch, before any pressure (the controller reacts one epoch late)."""

    def __init__(self, hf) -> None:
        self.hf, self.inner = hf, hf.step
        hf.step = self.step
        self.masks: list[torch.Tensor] = []
        self.flux: torch.Tensor | None = None
        self.magnitude: torch.Tensor | None = None

    @staticmethod
    def flat(tensors) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).cpu() for t in tensors])

    def step(self, *optimizers):
        if self.flux is None:
            scale = self.hf.grad_scale * self.hf.total
            self.flux = self.flat(g.mean_flux() * scale for g in self.hf.gates)
            self.magnitude = self.flat(w.abs() for w in self.hf.masked_weights().values())
        stats = self.inner(*optimizers)
        self.masks.append(self.flat(g.mask() for g in self.hf.gates))
        return stats


def regrowth_and_order(runs: Path) -> dict[str, Any]:
    folder = runs / "order"
    saved = folder / "observation.pt"
    if not saved.is_file():
        recipe = load_recipe(ORDER_RECIPE, ["method=hyperflux-paper", "hyperflux.exact_target=false"])
        print(f"regrowth and order: a paper-form run at 98% into {folder}", flush=True)
        trainer = Trainer(recipe, folder, overwrite=True, quiet=True)
        observer = Observer(trainer.hf)
        summary = trainer.run()
        masks = torch.stack(observer.masks)
        pruning_epochs = recipe["hyperflux"]["pruning_epochs"]
        regrown = masks[-1] & ~masks[pruning_epochs - 1]
        without = without_weights(trainer, regrown)
        torch.save(
            {
                "masks": masks,
                "flux": observer.flux,
                "magnitude": observer.magnitude,
                "pruning_epochs": pruning_epochs,
                "final_accuracy": summary["final_accuracy"],
                "accuracy_without_regrown": without,
            },
            saved,
        )
    data = torch.load(saved)
    masks, t_p = data["masks"], data["pruning_epochs"]
    end_of_pruning, final = masks[t_p - 1], masks[-1]
    regrown = final & ~end_of_pruning
    removed_after = end_of_pruning & ~final
    rows = laws.read_run(folder)[1]
    # the epoch (1-based) each weight is first seen pruned, over the pruning phase
    pruned = ~masks[:t_p]
    ever = pruned.any(0)
    first = pruned.float().argmax(0) + 1
    epochs = first[ever].numpy()
    flux_rho = spearmanr(epochs, data["flux"][ever].numpy()).statistic
    magnitude_rho = spearmanr(epochs, data["magnitude"][ever].numpy()).statistic
    return {
        "run": "LeNet-300-100, recipes/lenet300-mnist-98.yaml, method hyperflux-paper",
        "regrowth": {
            "density_end_of_pruning": float(end_of_pruning.float().mean()),
            "density_final": float(final.float().mean()),
            "regrown_after_release": int(regrown.sum()),
            "pruned_after_release": int(removed_after.sum()),
            "regrown_share_of_final_mask": float(regrown.sum() / final.sum()),
            "regrown_per_regrowth_epoch": [r["regrown"] for r in rows if r["phase"] != "pruning"],
            "final_accuracy": data["final_accuracy"],
            "accuracy_without_regrown": data["accuracy_without_regrown"],
        },
        "order": {
            "weights_pruned_in_pruning_phase": int(ever.sum()),
            "spearman_first_pruned_epoch_vs_flux": float(flux_rho),
            "spearman_first_pruned_epoch_vs_magnitude": float(magnitude_rho),
            "reference": "flux (mean over epoch 1's sampled batches) and |W| at the end of epoch 1",
        },
    }


@torch.no_grad()
def without_weights(trainer: Trainer, drop: torch.Tensor) -> float:
    """Test accuracy of the finished (squashed) model with the weights `drop` flags set to zero."""
    start = 0
    for target in trainer.hf.targets:
        weight = getattr(target.module, target.param_name)
        part = drop[start : start + weight.numel()].reshape(weight.shape).to(weight.device)
        weight.masked_fill_(part, 0.0)
        start += weight.numel()
    return evaluate(trainer.model, trainer.test_loader, trainer.device)[0]


# ----------------------------------------------------------------- output
TELEMETRY_RUNS = {"sweep_p0.0625": ("sweep", "P0.0625"), "order_run": ("order", "")}


def plots(out: Path, runs: Path, converged, fit, authors, series, nplh_fits) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, (part, sub) in TELEMETRY_RUNS.items():  # what `hyperflux report` draws, for LAWS.md
        rows = laws.read_run(runs / part / sub)[1]
        report.plot_flux_hist(rows, out / f"flux_hist_{name}.png")
        report.plot_flips(rows, out / f"flips_{name}.png")
    authors_p, authors_s = zip(*laws.AUTHORS_RESNET50_CIFAR10, strict=True)
    laws.plot_pressure_law(
        [
            ("LeNet-300-100 / MNIST", [p for p, _ in converged], [s for _, s in converged], fit),
            ("authors ResNet-50 / CIFAR-10", authors_p, authors_s, authors),
        ],
        out / "pressure_law.png",
    )
    fitted = [
        (label, *series[label], power)
        for label, power in nplh_fits.items()
        if isinstance(power, laws.PowerFit)
    ]
    laws.plot_nplh(fitted, out / "nplh.png")


def markdown(results: dict[str, Any]) -> str:
    law, pred = results["pressure_law"], results["prediction"]
    lines = [
        f"Command: `{results['meta']['command']}`, {results['meta']['date']}, {results['meta']['machine']}, "
        "one seed.",
        "",
        "| pressure | density | converged (spread of last 5 epochs) | test accuracy | flux p01 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in law["points"]:
        flux = "-" if p["flux_p01"] is None else f"{p['flux_p01']:.3g}"
        lines.append(
            f"| 2^{math.log2(p['pressure']):g} | {100 * p['density']:.3f}% | "
            f"{'yes' if p['converged'] else 'no'} ({100 * p['last_epochs_spread']:.1f}%) | "
            f"{p['test_accuracy']:.2f}% | {flux} |"
        )
    a = law["authors_resnet50_cifar10"]
    lines += [
        "",
        "| fit | c (%) | a0 | a1 | R^2 | points |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| LeNet-300-100 / MNIST | {law['c_percent']:.3f} | {law['a0']:.4f} | {law['a1']:.4f} | "
        f"{law['r2']:.4f} | {law['n']} |",
        f"| authors ResNet-50 / CIFAR-10 | {a['c_percent']:.3f} | {a['a0']:.4f} | {a['a1']:.4f} | "
        f"{a['r2']:.4f} | {a['n']} |",
        "",
        f"Prediction: density {100 * pred['target_density']:g}% -> P {pred['pressure']:.4g}; the run landed at "
        f"{100 * pred['achieved_density']:.3f}% ({100 * pred['relative_error']:.1f}% relative error, "
        f"{'converged' if pred['converged'] else 'not converged'}), test accuracy {pred['test_accuracy']:.2f}%.",
        "",
        "| NPLH series | exponent k | R^2 | points in 0.5% < S <= 50% |",
        "| --- | --- | --- | --- |",
    ]
    for label, f in results["nplh"].items():
        if f["exponent"] is None:
            lines.append(f"| {label} | not fitted: {f['error']} | | |")
        else:
            lines.append(f"| {label} | {f['exponent']:.3f} | {f['r2']:.4f} | {f['n']} |")
    reg, order = results["regrowth_and_order"]["regrowth"], results["regrowth_and_order"]["order"]
    lines += [
        "",
        f"Regrowth ({results['regrowth_and_order']['run']}): density {100 * reg['density_end_of_pruning']:.3f}% "
        f"at the end of pruning, {100 * reg['density_final']:.3f}% at the end; "
        f"{reg['regrown_after_release']:,} weights regrown after the release "
        f"({100 * reg['regrown_share_of_final_mask']:.1f}% of the final mask), "
        f"{reg['pruned_after_release']:,} pruned after it; regrown per regrowth epoch "
        f"{reg['regrown_per_regrowth_epoch']}; test accuracy {reg['final_accuracy']:.2f}%, "
        f"{reg['accuracy_without_regrown']:.2f}% with the regrown weights zeroed (no retraining).",
        "",
        f"Order: of {order['weights_pruned_in_pruning_phase']:,} weights pruned during the pruning phase, the "
        f"Spearman correlation of the epoch each was first pruned with its flux is "
        f"{order['spearman_first_pruned_epoch_vs_flux']:.3f}, with its magnitude "
        f"{order['spearman_first_pruned_epoch_vs_magnitude']:.3f} ({order['reference']}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "laws", help="run folders (reused)")
    parser.add_argument("--out", type=Path, default=RESULTS / "laws.json")
    args = parser.parse_args()

    law, fit, authors, converged = pressure_law(args.runs)
    pred = prediction(args.runs, fit)
    nplh_fits, series = nplh(args.runs, law["points"], converged)
    results = {
        "meta": {
            "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "command": "python benchmarks/laws.py " + " ".join(sys.argv[1:]),
            "seeds": 1,
            "sweep": {
                "recipe": str(SWEEP_RECIPE.relative_to(ROOT)),
                "set": SWEEP_SET,
                "epochs": SWEEP_EPOCHS,
                "convergence": f"density spread (max - min) / last over the last {WINDOW} epochs <= {TOL}",
            },
        },
        "pressure_law": law,
        "prediction": pred,
        "nplh": {label: power_record(power) for label, power in nplh_fits.items()},
        "nplh_points": {label: {"densities": d, "importances": i} for label, (d, i) in series.items()},
        "regrowth_and_order": regrowth_and_order(args.runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(results, indent=1) + "\n")
    plots(args.out.parent / "laws", args.runs, converged, fit, authors, series, nplh_fits)
    text = markdown(results)
    atomic_write(args.out.with_suffix(".md"), text)
    print(text)
    print(f"wrote {args.out}, {args.out.with_suffix('.md')}, {args.out.parent / 'laws'}/*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
