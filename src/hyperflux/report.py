"""The run report: PNG plots of the run's metrics and one HTML page that shows them with the summary table.

Plots: density against epoch with the target trajectory, pressure against epoch, accuracy against epoch,
and the final per-layer densities. Everything is read back from the run folder, so a report can be redrawn
for any run, finished or not.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from hyperflux.runfiles import RunError, RunFolder

REPORT = "report.html"
PLOTS = {
    "density": "density.png",
    "pressure": "pressure.png",
    "accuracy": "accuracy.png",
    "layers": "layers.png",
}


def _figure(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)  # a bare Figure renders with Agg: no pyplot, no display, no global state


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_density(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = _figure("Density of the masked weights", "epoch", "density (%)")
    epochs, density = _series(rows, "density")
    ax.plot([0, *epochs], [100.0, *(100 * d for d in density)], label="measured", marker=".")
    epochs_t, target = _series(rows, "expected_density")
    if target:
        ax.plot(
            [0, *epochs_t], [100.0, *(100 * t for t in target)], label="target trajectory", linestyle="--"
        )
    if density and min(density) > 0:
        ax.set_yscale("log")
    ax.legend()
    _save(fig, path)


def plot_pressure(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = _figure("Pressure", "epoch", "pressure P")
    epochs, pressure = _series(rows, "pressure")
    ax.plot(epochs, pressure, marker=".", color="tab:red")
    _save(fig, path)


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = _figure("Accuracy", "epoch", "accuracy (%)")
    for key, label in (("test_accuracy", "test"), ("train_accuracy", "train (running, masked)")):
        epochs, values = _series(rows, key)
        if values:
            ax.plot(epochs, values, marker=".", label=label)
    ax.legend()
    _save(fig, path)


def plot_layers(layers: list[dict[str, Any]], path: Path) -> None:
    fig = Figure(figsize=(7, max(2.5, 0.35 * len(layers) + 1.2)), dpi=100)
    ax = fig.add_subplot()
    names = [layer["name"] for layer in layers]
    densities = [100 * layer["density"] for layer in layers]
    ax.barh(range(len(names)), densities, color="tab:green")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("density (%)")
    ax.set_title("Final density per layer")
    ax.grid(True, axis="x", alpha=0.3)
    _save(fig, path)


def _final_layers(folder: RunFolder, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = folder.read_summary()
    if summary is not None:
        return summary["per_layer"]
    last = rows[-1].get("layers") or {}
    return [{"name": name, "density": density} for name, density in last.items()]


def _summary_rows(summary: dict[str, Any] | None, rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    if summary is None:
        last = rows[-1]
        return [
            ("status", f"in progress: epoch {last['epoch']}"),
            ("density", f"{100 * last.get('density', 1.0):.3f}%"),
            ("test accuracy", "-" if last.get("test_accuracy") is None else f"{last['test_accuracy']:.2f}%"),
        ]
    target = summary["target_sparsity"]
    recipe = summary.get("recipe") or {}
    return [
        ("method", summary["method"]),
        ("model / data", f"{summary.get('model', '-')} / {summary.get('data', '-')}"),
        ("final test accuracy (last epoch)", f"{summary['final_accuracy']:.2f}%"),
        ("sparsity", f"{100 * summary['sparsity']:.3f}%"),
        ("target sparsity", "-" if target is None else f"{100 * target:.3f}%"),
        ("weights kept", f"{summary['kept']:,} of {summary['total']:,} (masked tensors)"),
        ("epochs", str(summary["epochs"])),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("seed", str(summary["seed"])),
        ("recipe", str(recipe.get("name", "-"))),
    ]


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def write_report(run_dir: str | Path) -> Path:
    """Draw the plots and `report.html` into `run_dir`; returns the HTML's path."""
    folder = RunFolder(run_dir)
    rows = folder.read_metrics()
    if not rows:
        raise RunError(f"{folder.path}: no metrics.jsonl with any epoch; is this a run folder?")
    summary = folder.read_summary()
    plot_density(rows, folder.file(PLOTS["density"]))
    plot_pressure(rows, folder.file(PLOTS["pressure"]))
    plot_accuracy(rows, folder.file(PLOTS["accuracy"]))
    layers = _final_layers(folder, rows)
    plot_layers(layers, folder.file(PLOTS["layers"]))

    layer_rows = [
        (
            layer["name"],
            f"{layer['kept']:,}" if "kept" in layer else "-",
            f"{layer['total']:,}" if "total" in layer else "-",
            f"{100 * layer['density']:.2f}%",
        )
        for layer in layers
    ]
    title = f"hyperflux run: {folder.path.resolve().name}"
    images = "".join(
        f'<figure><img src="{name}" alt="{key}"><figcaption>{key}</figcaption></figure>'
        for key, name in PLOTS.items()
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }} img {{ max-width: 530px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Summary</h2>
{_table(_summary_rows(summary, rows))}
<h2>Plots</h2>
<div class="plots">{images}</div>
<h2>Per-layer density</h2>
{_table(layer_rows, ("tensor", "kept", "total", "density"))}
</body></html>
"""
    path = folder.file(REPORT)
    path.write_text(page)
    return path
