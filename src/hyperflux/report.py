"""The run report: PNG plots of the run's metrics and one HTML page that shows them with the summary table.

Plots: density against epoch with the target trajectory, pressure against epoch, accuracy against epoch,
and the final per-layer densities; and, where the metrics rows carry the telemetry (runs from before it do
not, and their reports simply leave these out): weights pruned and regrown per epoch and layer, histograms of
the flux of surviving and pruned weights at a few epochs, and the smallest surviving flux against the
pressure. Everything is read back from the run folder, so a report can be redrawn for any run, finished or not.
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hyperflux.runfiles import RECIPE, REPORT, RunError, RunFolder, atomic_write

PLOTS = {
    "density": "density.png",
    "pressure": "pressure.png",
    "accuracy": "accuracy.png",
    "layers": "layers.png",
}
# drawn only when the metrics rows have the keys they need
TELEMETRY_PLOTS = {
    "flips": "flips.png",
    "flux_hist": "flux_hist.png",
    "flux_vs_pressure": "flux_vs_pressure.png",
}
CAPTIONS = {
    "density": "measured density against the target trajectory",
    "pressure": "the pressure P the controller applied in each epoch",
    "accuracy": "test accuracy and the running train accuracy of the masked model",
    "layers": "final density of each masked tensor",
    "flips": "weights pruned and regrown per epoch, stacked by layer: which layers give way when, and "
    "whether weights regrow once the pressure eases",
    "flux_hist": "flux of surviving and of pruned weights (pressure units) at a few epochs: near equilibrium "
    "the survivors sit right of the pressure line and the pruned weights left of it",
    "flux_vs_pressure": "smallest (and 1st-percentile) surviving flux against the pressure, epochs with a "
    "positive pressure (symmetric-log flux axis: sampled minima are often negative); at a static equilibrium "
    "the smallest flux would lie near the dashed y = x line",
}


def report_files() -> list[str]:
    """What `write_report` may write into a run folder."""
    return [REPORT, *PLOTS.values(), *TELEMETRY_PLOTS.values()]


def _figure(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if xlabel == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # no half epochs, even at one
    return fig, ax


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix[1:])  # a bare Figure renders with Agg: no pyplot, no global state
    atomic_write(path, buffer.getvalue())


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


def plot_accuracy(rows: list[dict[str, Any]], path: Path, split: str = "test") -> None:
    """The evaluated accuracy (`split`: "test", or "holdout" for a run that set training samples aside; the
    metrics call it test_accuracy either way) and the running train accuracy, per epoch."""
    fig, ax = _figure("Accuracy", "epoch", "accuracy (%)")
    for key, label in (("test_accuracy", split), ("train_accuracy", "train (running, masked)")):
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


def _layer_colors(count: int) -> list[Any]:
    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    return [colormaps["viridis"](i / (count - 1)) for i in range(count)]


def plot_flips(rows: list[dict[str, Any]], path: Path) -> None:
    """Bars per epoch, stacked by layer: weights pruned, and, where any regrew, weights regrown in a panel of
    its own (on its own scale, since regrowth is often a few weights against thousands pruned)."""
    rows = [r for r in rows if r.get("layer_pruned") is not None]
    # a method that never regrows (the peers) gets the pruned panel alone
    panels = [("layer_pruned", "pruned")] + (
        [("layer_regrown", "regrown")]
        if any(any((r.get("layer_regrown") or {}).values()) for r in rows)
        else []
    )
    fig = Figure(figsize=(7, 2.75 * len(panels)), dpi=100)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    names = list(rows[-1]["layer_pruned"])
    colors = _layer_colors(len(names))
    epochs = np.array([r["epoch"] for r in rows])
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs, even for a run of one
    for ax, (key, title) in zip(axes, panels, strict=True):
        bottom = np.zeros(len(rows))
        for name, color in zip(names, colors, strict=True):
            counts = np.array([(r.get(key) or {}).get(name, 0) for r in rows], dtype=float)
            ax.bar(epochs, counts, bottom=bottom, color=color, width=0.8, label=name)
            bottom += counts
        ax.set_title(f"Weights {title} per epoch", fontsize=10)
        ax.set_ylabel(f"weights {title}")
        ax.grid(True, axis="y", alpha=0.3)
    if len(names) <= 12:
        axes[0].legend(fontsize=7, ncol=2)
        axes[-1].set_xlabel("epoch")
    else:
        axes[-1].set_xlabel(f"epoch  ({len(names)} layers stacked in model order, dark to light)")
    _save(fig, path)


def _histogram_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first, middle and last pruning epochs with a histogram, then the first regrowth epoch with one."""
    have = [r for r in rows if r.get("flux_hist")]
    pruning = [r for r in have if r.get("phase") == "pruning"] or have
    picked = [pruning[0], pruning[len(pruning) // 2], pruning[-1]]
    picked += [r for r in have if r.get("phase") == "regrowth"][:1]
    unique = {r["epoch"]: r for r in picked}
    return [unique[e] for e in sorted(unique)]


def plot_flux_hist(rows: list[dict[str, Any]], path: Path) -> None:
    """Step histograms on a symmetric-log flux axis, one panel per chosen epoch, log counts."""
    chosen = _histogram_rows(rows)
    fig = Figure(figsize=(7, 1.9 * len(chosen) + 1.0), dpi=100)
    axes = fig.subplots(len(chosen), 1, sharex=True, squeeze=False)[:, 0]
    for ax, row in zip(axes, chosen, strict=True):
        hist = row["flux_hist"]
        edges = np.asarray(hist["edges"], dtype=float)
        # the open end bins are drawn half a decade wide
        edges = np.concatenate([[edges[0] * 10**0.5], edges, [edges[-1] * 10**0.5]])
        for key, color in (("survivors", "tab:green"), ("pruned", "tab:gray")):
            counts = np.asarray(hist[key], dtype=float)
            if counts.sum():
                ax.stairs(counts, edges, color=color, linewidth=1.5, label=f"{key} ({int(counts.sum()):,})")
        pressure = row.get("pressure")
        if pressure:
            ax.axvline(
                pressure, color="tab:red", linestyle="--", linewidth=1, label=f"pressure {pressure:.3g}"
            )
        ax.set_xscale("symlog", linthresh=min(e for e in hist["edges"] if e > 0))
        ticks = [s * 10.0**k for s in (-1, 1) for k in range(-6, 3, 2)] + [0.0]
        ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.7)
        ax.set_title(f"epoch {row['epoch']} ({row.get('phase', '-')})", fontsize=9)
        ax.set_ylabel("weights")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("flux (pressure units, symmetric log)")
    fig.suptitle("Flux of surviving and pruned weights")
    _save(fig, path)


FLUX_SERIES = (("flux_min", "smallest", "o"), ("flux_p01", "1st percentile", "^"))


def _flux_pressure_points(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float, float]]:
    """(epoch, pressure, flux) of the rows with a positive pressure and a flux figure (of either sign: a
    sampled flux estimate of a survivor is often negative, and the plot should show it)."""
    return [
        (r["epoch"], float(r["pressure"]), float(r[key]))
        for r in rows
        if (r.get("pressure") or 0) > 0 and r.get(key) is not None
    ]


def plot_flux_vs_pressure(rows: list[dict[str, Any]], path: Path) -> None:
    """Smallest (and 1st-percentile) surviving flux against the pressure, with y = x; log pressure, symmetric
    log flux (linear within a tenth of the smallest pressure, so negative estimates show); the colour is the
    epoch."""
    fig, ax = _figure("Surviving flux against the pressure", "pressure P", "surviving flux (pressure units)")
    epochs = [r["epoch"] for r in rows]
    pressures: list[float] = []
    for key, label, marker in FLUX_SERIES:
        points = _flux_pressure_points(rows, key)
        if not points:
            continue
        epoch, pressure, flux = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        ax.plot(pressure, flux, color="lightgray", linewidth=0.8, zorder=1)
        dots = ax.scatter(
            pressure,
            flux,
            c=epoch,
            cmap="viridis",
            vmin=min(epochs),
            vmax=max(epochs),
            marker=marker,
            s=20,
            zorder=2,
            label=label,
        )
        pressures += list(pressure)
    fig.colorbar(dots, ax=ax, label="epoch")
    low, high = min(pressures) / 2, max(pressures) * 2
    ax.plot([low, high], [low, high], color="black", linestyle="--", linewidth=1, label="flux = pressure")
    ax.axhline(0.0, color="gray", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=min(pressures) / 10)
    ax.legend()
    _save(fig, path)


def draw_telemetry(rows: list[dict[str, Any]], folder: RunFolder) -> dict[str, str]:
    """The telemetry plots the rows have data for; returns {key: file name} of those drawn."""
    drawn = {}
    if any(r.get("layer_pruned") is not None for r in rows):
        plot_flips(rows, folder.file(TELEMETRY_PLOTS["flips"]))
        drawn["flips"] = TELEMETRY_PLOTS["flips"]
    if any(r.get("flux_hist") for r in rows):
        plot_flux_hist(rows, folder.file(TELEMETRY_PLOTS["flux_hist"]))
        drawn["flux_hist"] = TELEMETRY_PLOTS["flux_hist"]
    if any(_flux_pressure_points(rows, key) for key, _, _ in FLUX_SERIES):
        plot_flux_vs_pressure(rows, folder.file(TELEMETRY_PLOTS["flux_vs_pressure"]))
        drawn["flux_vs_pressure"] = TELEMETRY_PLOTS["flux_vs_pressure"]
    return drawn


def _final_layers(folder: RunFolder, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = folder.read_summary()
    if summary is not None:
        return summary["per_layer"]
    last = rows[-1].get("layers") or {}
    return [{"name": name, "density": density} for name, density in last.items()]


def _summary_rows(
    summary: dict[str, Any] | None, rows: list[dict[str, Any]], split: str
) -> list[tuple[str, str]]:
    if summary is None:
        last = rows[-1]
        accuracy = last.get("test_accuracy")  # the split evaluated on, under the trainer's one key
        return [
            ("status", f"unfinished (stopped, or still running) after epoch {last['epoch']}"),
            ("density", f"{100 * last.get('density', 1.0):.3f}%"),
            (f"{split} accuracy (epoch {last['epoch']})", "-" if accuracy is None else f"{accuracy:.2f}%"),
        ]
    target = summary["target_sparsity"]
    recipe = summary.get("recipe") or {}
    return [
        ("method", summary["method"]),
        ("model / data", f"{summary.get('model', '-')} / {summary.get('data', '-')}"),
        (
            f"final {summary.get('evaluated_on', 'test')} accuracy (last epoch)",
            f"{summary['final_accuracy']:.2f}%",
        ),
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


def _evaluated_on(folder: RunFolder, summary: dict[str, Any] | None) -> str:
    """The split the run's accuracy was measured on: the summary says; a run still going has its recipe."""
    if summary is not None and "evaluated_on" in summary:
        return summary["evaluated_on"]
    if folder.file(RECIPE).is_file():
        from hyperflux.recipe import evaluation_split, load_recipe

        return evaluation_split(load_recipe(folder.file(RECIPE)))
    return "test"


def write_report(run_dir: str | Path) -> Path:
    """Draw the plots and `report.html` into `run_dir`; returns the HTML's path."""
    folder = RunFolder(run_dir)
    rows = folder.read_metrics()
    if not rows:
        raise RunError(f"{folder.path}: no metrics.jsonl with any epoch; is this a run folder?")
    summary = folder.read_summary()
    split = _evaluated_on(folder, summary)
    plot_density(rows, folder.file(PLOTS["density"]))
    drawn = dict(PLOTS)
    if any(r.get("pressure") is not None for r in rows):
        plot_pressure(rows, folder.file(PLOTS["pressure"]))
    else:  # a dense run or a peer method: no pressure to draw
        del drawn["pressure"]
        folder.file(PLOTS["pressure"]).unlink(missing_ok=True)
    plot_accuracy(rows, folder.file(PLOTS["accuracy"]), split)
    layers = _final_layers(folder, rows)
    plot_layers(layers, folder.file(PLOTS["layers"]))
    drawn |= draw_telemetry(rows, folder)

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
    captions = CAPTIONS | {"accuracy": CAPTIONS["accuracy"].replace("test", split, 1)}
    images = "".join(
        f'<figure><img src="{name}" alt="{key}"><figcaption>{html.escape(captions[key])}</figcaption></figure>'
        for key, name in drawn.items()
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; max-width: 530px; }} img {{ max-width: 530px; }}
figcaption {{ font-size: 0.9em; color: #444; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Summary</h2>
{_table(_summary_rows(summary, rows, split))}
<h2>Plots</h2>
<div class="plots">{images}</div>
<h2>Per-layer density</h2>
{_table(layer_rows, ("tensor", "kept", "total", "density"))}
</body></html>
"""
    path = folder.file(REPORT)
    atomic_write(path, page)
    return path
