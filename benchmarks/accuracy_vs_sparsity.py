"""Accuracy against sparsity: every pruning method on the same data, model, trainer and epoch budget.

Each cell (model, method, target sparsity, seed) is one `run_recipe` run of the shipped recipe with only
`method`, `hyperflux.target_sparsity`, `seed` (and, for --quick, the epoch budget) changed. A record is
appended to the JSON right after its cell, and cells already in the JSON are skipped, so an interrupted run
(hours on a 2-core CPU) resumes where it stopped; an interrupted cell resumes from its run folder's checkpoint.

Learning rate, the same short choice for every method, hyperflux included: before its cells, each method
runs the task's recipe with every lr it has scaled by 0.5, 1 and 2 (the optimiser's lr, lr_end, lr_reset and
lr_final; for hyperflux and hyperflux-paper also the mask logits' `mask_lr` and `regrowth_mask_lr`), on a
6 + 4 epoch budget at the task's choice target (98% LeNet-300-100, 95% LeNet-5), trained on the training
split less 10,000 samples and judged on those 10,000 (`data.holdout`), never on the test split. The
multiplier with the best final holdout accuracy among the runs within 0.05 pp of the target wins (ties: the
recipe's own, 1); where no run is within 0.05 pp (the paper's form), the one closest to the target. With
`--widen-lr`, a choice at the edge of the multipliers tried tries the next power of two beyond it (down to 1/8,
up to 8) until the best is inside them. The choice is stored in the JSON (`lr_choice`) and reused; a choice that
moves drops the method's schedule choice, made at the old lr, to be made again.

Schedule, chosen the same way right after the lr, for every method that has one to choose: the methods that
update their masks on a step interval, hyperflux and hyperflux-paper (`train.controller_every`: a controller
period per epoch by default), GMP, Taylor and RigL (`baseline.update_every`: every min(100, batches per epoch)
steps for GMP and RigL, per epoch for Taylor, by default), try every 40 batches; IMP, whose rounds share the
budget equally by default, tries giving the final mask half of it (`baseline.final_share=0.5`; the rounds
before it share the other half). At the chosen lr, the default (its run is the lr choice's) is compared with
the alternative (one more holdout run, same budget and rule; ties: the default) and the better is kept
(`schedule_choice`). Magnitude and random have no schedule to choose. Everything else (Adam, label smoothing
0.1, no weight decay, the baselines' other default schedules from `hyperflux.baselines`) is the recipe's.

Tasks: LeNet-300-100 on MNIST (recipes/lenet300-mnist-*.yaml: 30 pruning + 15 regrowth epochs, Adam 5e-3)
at 90, 95, 98, 99 and 99.5%; LeNet-5 on Fashion-MNIST served at 32x32 (recipes/lenet5-fashion-*.yaml with
`data.name=fashion-mnist-32`, Adam 2e-3) at 90, 95 and 98%, on a budget this CPU can afford for 72 cells:
10 + 5 epochs on a fixed 20,000-image subset of the training split (`data.train_subset`; an epoch of the full
set takes about 45 s on one core here), the whole 10,000-image test split.

    .venv/bin/python benchmarks/accuracy_vs_sparsity.py [--seeds 3] [--quick] [--report-only]

--quick: 1 seed, LeNet-300-100 only, targets 90/98/99%, a 6 + 4 epoch budget, the recipe's lr for every method
(no choice); written to accuracy_vs_sparsity_quick.{json,md,png} so quick numbers never mix with the full ones.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import sys
import time
import traceback
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

import torch

from hyperflux.recipe import load_recipe
from hyperflux.runfiles import CHECKPOINT, atomic_write
from hyperflux.training import run_recipe

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("hyperflux", "hyperflux-paper", "magnitude", "gmp", "imp", "taylor", "rigl", "random")
# model key -> (recipe file pattern, extra overrides, dataset name, targets)
TASKS: dict[str, dict[str, Any]] = {
    "lenet300": {
        "recipe": "recipes/lenet300-mnist-{target}.yaml",
        "dataset": "mnist",
        "set": [],
        "targets": (0.90, 0.95, 0.98, 0.99, 0.995),
        "choice_target": 0.98,
    },
    "lenet5": {
        "recipe": "recipes/lenet5-fashion-{target}.yaml",
        "dataset": "fashion-mnist-32",
        "set": [
            "data.name=fashion-mnist-32",
            "threads=1",  # so that the two tasks can run side by side on two cores
            "data.train_subset=20000",
            "hyperflux.pruning_epochs=10",
            "hyperflux.regrowth_epochs=5",
        ],
        "targets": (0.90, 0.95, 0.98),
        "choice_target": 0.95,
    },
}
QUICK_TASKS = {"lenet300": (0.90, 0.98, 0.99)}
QUICK_EPOCHS = (6, 4)  # pruning + regrowth epochs of the --quick budget
LR_MULTIPLIERS = (0.5, 1.0, 2.0)
LR_LIMITS = (0.125, 8.0)  # how far --widen-lr goes
LR_KEYS = ("lr", "lr_end", "lr_reset", "lr_final")
MASK_LR_KEYS = ("mask_lr", "regrowth_mask_lr")  # hyperflux's other optimiser group, scaled with the rest
HYPERFLUX_METHODS = ("hyperflux", "hyperflux-paper")


class Schedule(NamedTuple):
    """A method's schedule setting that the choice tries one alternative of, against the recipe's default."""

    key: str  # the recipe key
    field: str  # its name in the records and in `schedule_choice`
    alternative: float
    label: str  # the alternative, in words
    suffix: str  # run folders trained with the alternative end in f"-{suffix}{alternative:g}"


EVERY_40 = ("update_every", 40, "every 40 batches", "every")
SCHEDULES = {
    "hyperflux": Schedule("train.controller_every", *EVERY_40),
    "hyperflux-paper": Schedule("train.controller_every", *EVERY_40),
    "gmp": Schedule("baseline.update_every", *EVERY_40),
    "taylor": Schedule("baseline.update_every", *EVERY_40),
    "rigl": Schedule("baseline.update_every", *EVERY_40),
    "imp": Schedule("baseline.final_share", "final_share", 0.5, "final mask trains half the budget", "final"),
}
CHOICES = ("lr_choice", "schedule_choice")
CHOICE_EPOCHS = (6, 4)
CHOICE_HOLDOUT = 10_000


def target_label(target: float) -> str:
    """0.9 -> '90', 0.995 -> '99.5' (the recipes' file names)."""
    return f"{100 * target:g}"


def cell_recipe(
    model: str,
    method: str,
    target: float,
    seed: int,
    quick: bool,
    lr_multiplier: float = 1.0,
    choosing: bool = False,
    schedule: float | None = None,
) -> dict[str, Any]:
    task = TASKS[model]
    path = ROOT / task["recipe"].format(target=target_label(target))
    assignments = [*task["set"], f"method={method}", f"hyperflux.target_sparsity={target}", f"seed={seed}"]
    if method == "hyperflux-paper":
        assignments.append(
            "hyperflux.exact_target=false"
        )  # the recipes say true, which the paper form contradicts
    epochs = QUICK_EPOCHS if quick else CHOICE_EPOCHS if choosing else None
    if epochs:
        assignments += [f"hyperflux.pruning_epochs={epochs[0]}", f"hyperflux.regrowth_epochs={epochs[1]}"]
    if choosing:
        assignments.append(f"data.holdout={CHOICE_HOLDOUT}")
    if schedule is not None:
        assignments.append(f"{SCHEDULES[method].key}={schedule}")
    if lr_multiplier != 1.0:
        base = load_recipe(path, assignments)
        scaled = [("optimizer", k) for k in LR_KEYS]
        if method in HYPERFLUX_METHODS:
            scaled += [("hyperflux", k) for k in MASK_LR_KEYS]
        assignments += [
            f"{section}.{k}={base[section][k] * lr_multiplier!r}"
            for section, k in scaled
            if base[section].get(k) is not None
        ]
    recipe = load_recipe(path, assignments)
    recipe["name"] = f"bench-{model}-{method}-{target_label(target)}-seed{seed}"
    return recipe


def schedule_label(method: str, schedule: float | None) -> str:
    """The run folder's suffix for a non-default schedule."""
    return "" if schedule is None else f"-{SCHEDULES[method].suffix}{schedule:g}"


def run_label(method: str, multiplier: float, schedule: float | None) -> str:
    """The run folder's suffix for a non-default lr or schedule ("lrs": hyperflux's mask lrs scaled too, which
    folders from before that rule did not)."""
    lr = "lrs" if method in HYPERFLUX_METHODS else "lr"
    return ("" if multiplier == 1.0 else f"-{lr}{multiplier:g}x") + schedule_label(method, schedule)


def holdout_trial(
    model: str, method: str, runs: Path, multiplier: float, schedule: float | None
) -> dict[str, float]:
    """One choice run (seed 0, 6+4 epochs, on the holdout at the task's choice target)."""
    target = TASKS[model]["choice_target"]
    name = f"x{multiplier:g}" + schedule_label(method, schedule)
    if multiplier != 1.0 and method in HYPERFLUX_METHODS:
        name += "-masklr"  # hyperflux's mask lrs scaled too, which folders from before that rule did not
    out = runs / "lr-choice" / model / method / name
    setting = "default" if schedule is None else f"{SCHEDULES[method].field} {schedule:g}"
    print(f"choice: {model} {method} lr x{multiplier:g} schedule {setting} ...", end=" ", flush=True)
    summary = run_cell(
        cell_recipe(model, method, target, 0, False, multiplier, choosing=True, schedule=schedule), out
    )
    print(f"holdout {summary['final_accuracy']:.2f}%  sparsity {100 * summary['sparsity']:.3f}%")
    return {"holdout_accuracy": summary["final_accuracy"], "gap_pp": 100 * abs(summary["sparsity"] - target)}


def best_trial(trials: dict[str, dict[str, float]], default: str) -> str:
    """The trial with the best holdout accuracy among those within 0.05 pp of the target; if none is (the
    paper's form), the one closest to the target, since the table compares methods at their targets. Ties go
    to `default`."""
    on_target = {k: t for k, t in trials.items() if t["gap_pp"] <= 0.05}
    if on_target:
        return max(on_target, key=lambda k: (on_target[k]["holdout_accuracy"], k == default))
    return min(trials, key=lambda k: (trials[k]["gap_pp"], -trials[k]["holdout_accuracy"], k != default))


def choose_lrs(
    results: dict[str, Any],
    model: str,
    methods: list[str],
    runs: Path,
    json_path: Path,
    command: str,
    seeds: list[int] | None = None,
    widen: bool = False,
) -> dict[str, float]:
    """Each method's lr multiplier for `model`, from the JSON or chosen now on the holdout (see the module
    docstring); every choice is saved as soon as it is made. With `widen`, a choice at the edge of its trials
    tries beyond it until it is inside them (or at `LR_LIMITS`)."""
    chosen = results.setdefault("lr_choice", {}).setdefault(model, {})
    for method in methods:
        if method not in chosen:
            trials = {f"{m:g}": holdout_trial(model, method, runs, m, None) for m in LR_MULTIPLIERS}
            chosen[method] = {"multiplier": float(best_trial(trials, "1")), "trials": trials}
            save_results(json_path, results, command, [model], seeds)
        while widen and (beyond := next_multiplier(chosen[method]["trials"])) is not None:
            trials = chosen[method]["trials"]
            trials[f"{beyond:g}"] = holdout_trial(model, method, runs, beyond, None)
            multiplier = float(best_trial(trials, "1"))
            if multiplier != chosen[method]["multiplier"]:
                results.get("schedule_choice", {}).get(model, {}).pop(method, None)  # made at the old lr
            chosen[method]["multiplier"] = multiplier
            save_results(json_path, results, command, [model], seeds)
    return {method: chosen[method]["multiplier"] for method in methods}


def next_multiplier(trials: dict[str, dict[str, float]]) -> float | None:
    """The multiplier beyond the trials' edge when the best of them is on it, within `LR_LIMITS`; else None."""
    tried = sorted(float(k) for k in trials)
    best = float(best_trial(trials, "1"))
    if best == tried[0] and best / 2 >= LR_LIMITS[0]:
        return best / 2
    if best == tried[-1] and best * 2 <= LR_LIMITS[1]:
        return best * 2
    return None


def choose_schedules(
    results: dict[str, Any],
    model: str,
    multipliers: dict[str, float],
    runs: Path,
    json_path: Path,
    command: str,
    seeds: list[int] | None = None,
) -> dict[str, float | None]:
    """Each method's schedule setting for `model` (None: its default), from the JSON or chosen now on the
    holdout at the method's chosen lr (see the module docstring)."""
    lr_trials = results["lr_choice"][model]
    chosen = results.setdefault("schedule_choice", {}).setdefault(model, {})
    for method, multiplier in multipliers.items():
        if method in chosen or method not in SCHEDULES:
            continue
        schedule = SCHEDULES[method]
        trials = {
            "default": lr_trials[method]["trials"][f"{multiplier:g}"],
            f"{schedule.alternative:g}": holdout_trial(model, method, runs, multiplier, schedule.alternative),
        }
        best = best_trial(trials, "default")
        chosen[method] = {
            schedule.field: None if best == "default" else schedule.alternative,
            "trials": trials,
        }
        save_results(json_path, results, command, [model], seeds)
    return {
        method: chosen[method][SCHEDULES[method].field] if method in chosen else None
        for method in multipliers
    }


def record_schedule(record: dict[str, Any]) -> float | None:
    """The schedule setting a record was run with (None: the method's default)."""
    schedule = SCHEDULES.get(record["method"])
    return None if schedule is None else record.get(schedule.field)


def budget_epochs(model: str, quick: bool) -> int:
    """The epochs every method's cell of `model` trains for (hyperflux's pruning + regrowth)."""
    spec = cell_recipe(model, "hyperflux", TASKS[model]["targets"][0], 0, quick)["hyperflux"]
    return spec["pruning_epochs"] + spec["regrowth_epochs"]


def key(record: dict[str, Any]) -> tuple[str, str, float, int]:
    return (record["model"], record["method"], round(record["target_sparsity"], 6), record["seed"])


def load_results(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"meta": {}, "records": []}
    results = json.loads(path.read_text())
    for methods in results.get("schedule_choice", {}).values():
        for choice in methods.values():
            if "every" in choice:  # written before IMP's schedule joined the choice
                choice["update_every"] = choice.pop("every")
    return results


def save_results(
    path: Path,
    results: dict[str, Any],
    command: str,
    models: list[str] | None = None,
    seeds: list[int] | None = None,
) -> None:
    """Write the results; with `models`, this process owns only those models' records (of `seeds`, if given)
    and lr choices, and all other records are taken from the file as it is now, so processes running different
    models, or different seeds of one model, can share one JSON."""
    if models is not None:

        def owned(record: dict[str, Any]) -> bool:
            return record["model"] in models and (seeds is None or record["seed"] in seeds)

        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = load_results(path)
            results["records"] = [r for r in on_disk["records"] if not owned(r)] + [
                r for r in results["records"] if owned(r)
            ]
            for name in CHOICES:
                theirs = {m: c for m, c in on_disk.get(name, {}).items() if m not in models}
                results[name] = theirs | {m: c for m, c in results.get(name, {}).items() if m in models}
            commands = {**on_disk.get("meta", {}).get("commands", {}), **{m: command for m in models}}
            _write(path, results, command, commands)
        return
    _write(path, results, command)


def _write(path: Path, results: dict[str, Any], command: str, commands: dict[str, str] | None = None) -> None:
    results["meta"] = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} cores",
        "threads": "1 per cell (the LeNet-300-100 recipes say so; the LeNet-5 task sets it)",
        "torch": torch.__version__,
        "command": command,
        "commands": commands or {},  # per model, where processes ran the models side by side
        "lr_rule": "each method's lrs: the recipe's scaled by the multiplier in lr_choice (0.5, 1 or 2, "
        "with --widen-lr on beyond the edge while the best is on it, best final holdout accuracy on a 6+4 "
        "epoch budget); its schedule: the default or the alternative in "
        "schedule_choice (every 40 batches; IMP: the final mask trains half the budget), the better on the "
        "same holdout; --quick: the recipe's",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(results, indent=2) + "\n")


def run_cell(recipe: dict[str, Any], out: Path) -> dict[str, Any]:
    resume = (out / CHECKPOINT).exists()
    summary = run_recipe(recipe, out, resume=resume, overwrite=not resume, quiet=True)
    if summary is None:
        raise RuntimeError(f"{out}: the run stopped before its end")
    return summary


# ----------------------------------------------------------------- aggregation and output
def groups(records: list[dict[str, Any]]) -> dict[tuple[str, float, str], list[dict[str, Any]]]:
    out: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault((r["model"], round(r["target_sparsity"], 6), r["method"]), []).append(r)
    return out


def stats(cell: list[dict[str, Any]]) -> dict[str, float]:
    budgets = {r["epochs"] for r in cell}
    if len(budgets) > 1:
        first = cell[0]
        raise ValueError(
            f"{first['model']} {first['method']} at {first['target_sparsity']}: records of {sorted(budgets)} "
            "epochs in one cell; remove the stale ones from the JSON"
        )
    accs = [r["final_accuracy"] for r in cell]
    return {
        "mean": statistics.fmean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "sparsity": statistics.fmean(r["achieved_sparsity"] for r in cell),
        "worst_gap_pp": max(abs(r["achieved_sparsity"] - r["target_sparsity"]) for r in cell) * 100,
        "time": statistics.fmean(r["wall_time_s"] for r in cell),
        "n": len(cell),
        "epochs": cell[0]["epochs"],
    }


def models_in(records: list[dict[str, Any]]) -> list[str]:
    return [m for m in TASKS if any(r["model"] == m for r in records)]


def print_table(records: list[dict[str, Any]]) -> None:
    table = groups(records)
    print(
        f"\n{'model':<9} {'target':>6} {'method':<16} {'accuracy %':>15} {'achieved %':>10} {'time/cell s':>11} {'n':>2}"
    )
    for model in models_in(records):
        targets = sorted({t for m, t, _ in table if m == model})
        for target in targets:
            for method in METHODS:
                cell = table.get((model, target, method))
                if not cell:
                    continue
                s = stats(cell)
                print(
                    f"{model:<9} {target_label(target):>6} {method:<16} {s['mean']:>7.2f} ± {s['std']:<5.2f} "
                    f"{100 * s['sparsity']:>10.3f} {s['time']:>11.1f} {s['n']:>2}"
                )


def markdown(results: dict[str, Any]) -> str:
    records, meta, choice = results["records"], results["meta"], results.get("lr_choice", {})
    commands = ", ".join(f"`{c}`" for c in sorted(set(meta.get("commands", {}).values()))) or (
        f"`{meta.get('command', '')}`"
    )
    table = groups(records)
    names = {"lenet300": "LeNet-300-100 / MNIST", "lenet5": "LeNet-5 / Fashion-MNIST 32x32"}
    lr_rule = (
        "each method's lrs are the recipe's times its chosen multiplier (below; chosen on a training holdout)"
        if choice
        else "optimiser settings unchanged: no per-method lr choice, hyperflux included"
    )
    lines = [
        "## Accuracy against sparsity: hyperflux and its peers",
        "",
        f"{commands} on {meta.get('machine', '')}, {meta.get('date', '')}. Final-epoch test "
        "accuracy (%), mean ± std over seeds; every method on the same recipe (data, model, trainer, epoch "
        f"budget; {lr_rule}). Best mean among the methods within 0.05 pp of the target in bold; a method that "
        "misses the target shows the sparsity it reached.",
        "",
    ]
    for model, methods in sorted(choice.items(), key=lambda item: list(TASKS).index(item[0])):
        tried = sorted({float(k) for c in methods.values() for k in c["trials"]})
        lines += [
            f"lr multiplier chosen for {names.get(model, model)} (holdout accuracy % at "
            + " / ".join(f"{m:g}x" for m in tried)
            + "):",
            "",
            "| method | chosen | " + " | ".join(f"{m:g}x" for m in tried) + " |",
            "| --- | --- |" + " --- |" * len(tried),
        ]
        for method, c in sorted(methods.items(), key=lambda item: METHODS.index(item[0])):
            accs = [c["trials"].get(f"{m:g}", {}).get("holdout_accuracy") for m in tried]
            cells = " | ".join("–" if a is None else f"{a:.2f}" for a in accs)
            lines.append(f"| {method} | {c['multiplier']:g}x | {cells} |")
        lines.append("")
    schedules = results.get("schedule_choice", {})
    for model, methods in sorted(schedules.items(), key=lambda item: list(TASKS).index(item[0])):
        lines += [
            f"Schedule chosen for {names.get(model, model)} at the chosen lr (holdout accuracy %):",
            "",
            "| method | alternative tried | chosen | default | alternative |",
            "| --- | --- | --- | --- | --- |",
        ]
        for method, c in sorted(methods.items(), key=lambda item: METHODS.index(item[0])):
            schedule = SCHEDULES[method]
            accs = [c["trials"][k]["holdout_accuracy"] for k in ("default", f"{schedule.alternative:g}")]
            chosen = "default" if c[schedule.field] is None else "alternative"
            lines.append(f"| {method} | {schedule.label} | {chosen} | {accs[0]:.2f} | {accs[1]:.2f} |")
        lines.append("")
    for model in models_in(records):
        targets = sorted({t for m, t, _ in table if m == model})
        methods = [m for m in METHODS if any((model, t, m) in table for t in targets)]
        some = next(cell for (m, _, _), cell in table.items() if m == model)
        lines += [f"### {names.get(model, model)} ({some[0]['epochs']} epochs)", ""]
        lines += ["| target | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
        counts = {
            stats(table[(model, t, m)])["n"] for t in targets for m in methods if (model, t, m) in table
        }
        for target in targets:
            cells = {m: stats(table[(model, target, m)]) for m in methods if (model, target, m) in table}
            on_target = [s["mean"] for s in cells.values() if s["worst_gap_pp"] <= 0.05]
            best = max(on_target, default=None)
            row = []
            for m in methods:
                if m not in cells:
                    row.append("–")
                    continue
                s = cells[m]
                text = f"{s['mean']:.2f} ± {s['std']:.2f}"
                if len(counts) > 1:
                    text += f" (n={s['n']})"
                if s["worst_gap_pp"] > 0.05:
                    text += f" (at {100 * s['sparsity']:.2f}%)"
                row.append(f"**{text}**" if s["mean"] == best and s["worst_gap_pp"] <= 0.05 else text)
            lines.append(f"| {target_label(target)}% | " + " | ".join(row) + " |")
        lines += ["", "Achieved sparsity (%, mean over seeds) / wall time per cell (s, mean):", ""]
        lines += ["| target | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
        for target in targets:
            row = []
            for m in methods:
                cell = table.get((model, target, m))
                if not cell:
                    row.append("–")
                    continue
                s = stats(cell)
                row.append(f"{100 * s['sparsity']:.3f} / {s['time']:.0f}")
            lines.append(f"| {target_label(target)}% | " + " | ".join(row) + " |")
        seeds = sorted({r["seed"] for r in records if r["model"] == model})
        lines += ["", f"Seeds: {', '.join(map(str, seeds))}.", ""]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = groups(records)
    models = models_in(records)
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for method in METHODS:
            points = sorted(
                (t, stats(cell)) for (m, t, me), cell in table.items() if m == model and me == method
            )
            if not points:
                continue
            x = [1 - s["sparsity"] for _, s in points]
            ax.errorbar(
                x,
                [s["mean"] for _, s in points],
                yerr=[s["std"] for _, s in points],
                marker="o",
                capsize=3,
                label=method,
                linewidth=2.2 if method.startswith("hyperflux") else 1.2,
            )
        ax.set_xscale("log")
        ax.invert_xaxis()
        ticks = sorted({t for m, t, _ in table if m == model})
        ax.set_xticks([1 - t for t in ticks], [f"{target_label(t)}%" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("sparsity")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results: dict[str, Any], json_path: Path) -> None:
    records = results["records"]
    if not records:
        return
    print_table(records)
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    atomic_write(md_path, markdown(results) + "\n")
    try:
        plot(records, png_path)
        print(f"wrote {json_path}, {md_path}, {png_path}")
    except ImportError:
        print(f"wrote {json_path}, {md_path} (no plot: matplotlib is not installed)")


# ----------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per cell (default 3; --quick: 1)")
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        help="only these seeds, e.g. to run the seeds of one model in two processes once its lr choice is done",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, LeNet-300-100 at 90/98/99%%, 6+4 epochs"
    )
    parser.add_argument("--models", nargs="+", choices=list(TASKS), help="only these models")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--targets", nargs="+", type=float, help="only these target sparsities of each model, e.g. 0.95 0.98"
    )
    parser.add_argument(
        "--out", type=Path, help="results JSON (default benchmarks/results/accuracy_vs_sparsity[_quick].json)"
    )
    parser.add_argument(
        "--runs", type=Path, default=ROOT / "runs" / "bench", help="scratch folder for run folders"
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the JSON")
    parser.add_argument(
        "--widen-lr",
        action="store_true",
        help="extend each lr choice at the edge of its trials beyond it (to 1/8x or 8x) until it is inside them",
    )
    args = parser.parse_args()

    stem = "accuracy_vs_sparsity_quick" if args.quick else "accuracy_vs_sparsity"
    json_path = args.out or RESULTS / f"{stem}.json"
    runs = args.runs / "quick" if args.quick else args.runs
    seeds = args.seed or list(range(1 if args.quick else args.seeds))
    tasks = {
        m: QUICK_TASKS[m] if args.quick else TASKS[m]["targets"]
        for m in (QUICK_TASKS if args.quick else TASKS)
    }
    if args.models:
        tasks = {m: t for m, t in tasks.items() if m in args.models}
    if args.targets:
        tasks = {
            m: tuple(t for t in ts if any(abs(t - x) < 1e-9 for x in args.targets)) for m, ts in tasks.items()
        }
    command = "python benchmarks/accuracy_vs_sparsity.py " + " ".join(sys.argv[1:])

    results = load_results(json_path)
    if args.report_only:
        write_reports(results, json_path)
        return 0
    default_threads = torch.get_num_threads()
    # (model, method) -> (lr multiplier, schedule setting or None for the method's default)
    settings: dict[tuple[str, str], tuple[float, float | None]] = {}
    for model in tasks:
        if args.quick:
            settings |= {(model, method): (1.0, None) for method in args.methods}
            continue
        torch.set_num_threads(default_threads)
        lrs = choose_lrs(
            results, model, list(args.methods), runs, json_path, command, args.seed, args.widen_lr
        )
        torch.set_num_threads(default_threads)
        chosen = choose_schedules(results, model, lrs, runs, json_path, command, args.seed)
        settings |= {(model, method): (lrs[method], chosen[method]) for method in args.methods}
    # a record counts as done only if it was run with its method's chosen settings (older records: the recipe's)
    # and on this run's epoch budget
    budget = {model: budget_epochs(model, args.quick) for model in tasks}
    done = {
        key(r)
        for r in results["records"]
        if (r.get("lr_multiplier", 1.0), record_schedule(r)) == settings.get((r["model"], r["method"]))
        and r["epochs"] == budget.get(r["model"], r["epochs"])
        # hyperflux records from before its mask lrs were scaled with the rest lack `mask_lr`
        and (r["method"] not in HYPERFLUX_METHODS or r.get("lr_multiplier", 1.0) == 1.0 or "mask_lr" in r)
    }
    results["records"] = [
        r for r in results["records"] if key(r) in done or (r["model"], r["method"]) not in settings
    ]
    # seed-major: an interrupted run leaves every cell with as many seeds as possible, not some with three
    cells = [(m, me, t, s) for s in seeds for m, ts in tasks.items() for t in ts for me in args.methods]
    todo = [c for c in cells if (c[0], c[1], round(c[2], 6), c[3]) not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already in {json_path}, {len(todo)} to run")
    failed = []
    start = time.perf_counter()
    for i, (model, method, target, seed) in enumerate(todo, 1):
        torch.set_num_threads(default_threads)  # a recipe's `threads` must not leak into the next cell
        multiplier, schedule = settings[(model, method)]
        out = (
            runs
            / model
            / method
            / target_label(target)
            / f"seed{seed}{run_label(method, multiplier, schedule)}"
        )
        print(
            f"[{i}/{len(todo)}] {model} {method} {target_label(target)}% seed {seed} ...", end=" ", flush=True
        )
        try:
            recipe = cell_recipe(model, method, target, seed, args.quick, multiplier, schedule=schedule)
            summary = run_cell(recipe, out)
        except Exception as error:  # one failing cell must not cost the rest of a run of hours
            failed.append((model, method, target, seed, f"{type(error).__name__}: {error}"))
            print(f"FAILED: {type(error).__name__}: {error}")
            traceback.print_exc(file=sys.stderr)
            continue
        record = {
            "method": method,
            "model": model,
            "dataset": TASKS[model]["dataset"],
            "target_sparsity": target,
            "achieved_sparsity": summary["sparsity"],
            "seed": seed,
            "final_accuracy": summary["final_accuracy"],
            "epochs": summary["epochs"],
            "wall_time_s": round(summary["wall_time_s"], 2),
            "lr_multiplier": multiplier,
            "lr": recipe["optimizer"]["lr"],
            "mask_lr": recipe["hyperflux"]["mask_lr"],
        }
        if method in SCHEDULES:
            record[SCHEDULES[method].field] = schedule
        results["records"].append(record)
        save_results(json_path, results, command, list(tasks), args.seed)
        print(
            f"{record['final_accuracy']:.2f}%  sparsity {100 * record['achieved_sparsity']:.3f}%  "
            f"{record['wall_time_s']:.0f}s"
        )
    if todo:
        print(f"ran {len(todo) - len(failed)} cells in {time.perf_counter() - start:.0f}s")
    if not results["meta"]:
        save_results(json_path, results, command, list(tasks), args.seed)
    write_reports(results, json_path)
    for model, method, target, seed, why in failed:
        print(f"failed: {model} {method} {target_label(target)}% seed {seed}: {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
