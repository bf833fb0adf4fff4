"""Reports: valid PNGs and an HTML page that refers to them, for finished and unfinished runs, with the
telemetry plots where the metrics rows have the data and without them for runs from before it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hyperflux.recipe import load_recipe
from hyperflux.report import CAPTIONS, PLOTS, TELEMETRY_PLOTS, _histogram_rows, write_report
from hyperflux.runfiles import RunError
from hyperflux.sparsifier import FLUX_HIST_EDGES
from hyperflux.training import run_recipe

SMOKE = Path(__file__).parent.parent / "recipes" / "smoke-digits.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def short_recipe() -> dict:
    return load_recipe(SMOKE, ["hyperflux.pruning_epochs=3", "hyperflux.regrowth_epochs=1"])


def check_report(folder: Path, telemetry: tuple[str, ...] = ()) -> str:
    """Write the report; the four plots and exactly the `telemetry` ones are drawn, valid and on the page."""
    for name in TELEMETRY_PLOTS.values():
        (folder / name).unlink(missing_ok=True)
    page = write_report(folder).read_text()
    # the pressure plot only for runs that have a pressure (not the peers' or dense runs)
    pressure = any(row.get("pressure") is not None for row in read_rows(folder))
    plots = [name for key, name in PLOTS.items() if key != "pressure" or pressure]
    expected = [*plots, *(TELEMETRY_PLOTS[key] for key in telemetry)]
    for name in expected:
        data = (folder / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 5000, name  # a drawn plot, not an empty canvas
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(expected)
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(sources) == sorted(expected)  # relative paths, beside the page
    for key in telemetry:
        assert CAPTIONS[key] in page
    return page


def read_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def write_rows(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def positive_flux_and_pressure(rows: list[dict]) -> bool:
    """Whether the rows have a flux figure (of either sign) at a positive pressure: the flux plot's data."""
    return any(
        (r.get("pressure") or 0) > 0 and r.get(k) is not None for r in rows for k in ("flux_min", "flux_p01")
    )


def test_report_of_a_finished_run(tmp_path):
    summary = run_recipe(short_recipe(), tmp_path, quiet=True)
    flux_plot = ("flux_vs_pressure",) if positive_flux_and_pressure(read_rows(tmp_path)) else ()
    page = check_report(tmp_path, ("flips", "flux_hist", *flux_plot))
    assert f"{summary['final_accuracy']:.2f}%" in page
    assert f"{100 * summary['sparsity']:.3f}%" in page
    for layer in summary["per_layer"]:
        assert layer["name"] in page


def test_a_holdout_run_is_captioned_and_plotted_as_holdout(tmp_path, monkeypatch):
    from hyperflux import report

    labels = []
    original = report.plot_accuracy
    monkeypatch.setattr(
        report,
        "plot_accuracy",
        lambda rows, path, split="test": labels.append(split) or original(rows, path, split),
    )
    holdout = load_recipe(
        SMOKE, ["hyperflux.pruning_epochs=3", "hyperflux.regrowth_epochs=1", "data.holdout=300"]
    )
    run_recipe(holdout, tmp_path, quiet=True, stop_after=2)  # still going: the recipe says
    page = write_report(tmp_path).read_text()
    assert "holdout accuracy and the running train accuracy" in page
    assert "<td>holdout accuracy (epoch 2)</td>" in page and "test accuracy" not in page
    run_recipe(holdout, tmp_path, quiet=True, resume=True)  # finished: the summary says
    assert "holdout accuracy and the running train accuracy" in write_report(tmp_path).read_text()
    assert labels == ["holdout", "holdout"]


def test_report_of_a_run_still_going(tmp_path):
    run_recipe(short_recipe(), tmp_path, quiet=True, stop_after=2)
    flux_plot = ("flux_vs_pressure",) if positive_flux_and_pressure(read_rows(tmp_path)) else ()
    page = check_report(tmp_path, ("flips", "flux_hist", *flux_plot))
    assert "unfinished (stopped, or still running) after epoch 2" in page
    assert "<td>test accuracy (epoch 2)</td>" in page
    # a run from before the telemetry: rows without flips and histograms still render, without those plots
    old = [
        {k: v for k, v in row.items() if k not in ("layer_pruned", "layer_regrown", "flux_hist")}
        for row in read_rows(tmp_path)
    ]
    write_rows(tmp_path, old)
    flux_plot = ("flux_vs_pressure",) if positive_flux_and_pressure(old) else ()
    for row in old:
        row["flux_min"] = row["flux_p01"] = None  # and from before the flux statistics
    write_rows(tmp_path / "older", old)
    page = check_report(tmp_path, flux_plot)
    assert "unfinished (stopped, or still running) after epoch 2" in page
    check_report(tmp_path / "older")


def hist(survivors: dict[int, int], pruned: dict[int, int]) -> dict:
    counts = [[0] * (len(FLUX_HIST_EDGES) + 1) for _ in range(2)]
    for side, values in zip(counts, (survivors, pruned), strict=True):
        for index, count in values.items():
            side[index] = count
    return {"edges": list(FLUX_HIST_EDGES), "survivors": counts[0], "pruned": counts[1]}


def telemetry_rows() -> list[dict]:
    """Nine epochs: six of pruning with a rising pressure, three of regrowth; the flux near the pressure."""
    rows = []
    for epoch in range(1, 10):
        pressure = 0.0 if epoch == 1 else 0.05 * 2**epoch
        rows.append(
            {
                "epoch": epoch,
                "phase": "pruning" if epoch <= 6 else "regrowth",
                "loss": 1.0,
                "train_accuracy": 90.0,
                "density": 1 - 0.1 * epoch,
                "pressure": pressure,
                "flux_min": -0.5 if epoch == 3 else 1.3 * pressure,  # a negative minimum: symmetric log axis
                "flux_p01": 2 * pressure,
                "layers": {"a.weight": 1 - 0.1 * epoch, "b.weight": 1 - 0.05 * epoch},
                "layer_pruned": {"a.weight": 100, "b.weight": 50}
                if epoch <= 6
                else {"a.weight": 3, "b.weight": 0},
                "layer_regrown": {"a.weight": 0, "b.weight": 0}
                if epoch <= 6
                else {"a.weight": 8, "b.weight": 2},
                "flux_hist": hist({30: 500 - 40 * epoch, 33: 200, 12: 7}, {25: 40 * epoch, 20: 30, 31: 2}),
            }
        )
    return rows


def test_report_draws_the_telemetry_plots_from_rows_that_have_them(tmp_path):
    rows = telemetry_rows()
    write_rows(tmp_path, rows)
    check_report(tmp_path, tuple(TELEMETRY_PLOTS))
    # histograms at the first, middle and last pruning epoch and the first regrowth epoch
    assert [r["epoch"] for r in _histogram_rows(rows)] == [1, 4, 6, 7]
    # no pruning epoch with a histogram: first, middle and last of those there are
    assert [r["epoch"] for r in _histogram_rows(rows[7:])] == [8, 9]
    # a baseline run: flips per layer, no pressure, no flux
    baseline = [
        {k: v for k, v in row.items() if k not in ("flux_hist", "pressure", "flux_min", "flux_p01")}
        for row in rows
    ]
    write_rows(tmp_path / "baseline", baseline)
    check_report(tmp_path / "baseline", ("flips",))


def test_report_needs_a_run_folder(tmp_path):
    with pytest.raises(RunError, match=re.escape("no metrics.jsonl")):
        write_report(tmp_path)


def test_epoch_axes_tick_whole_epochs_only():
    from hyperflux import report

    for epochs in ([1], [1, 2, 3]):
        fig, ax = report._figure("a short run", "epoch", "accuracy (%)")
        ax.plot(epochs, [50.0] * len(epochs))
        fig.canvas.draw()  # the ticks are placed when drawn
        ticks = [t for t in ax.get_xticks() if 1 <= t <= epochs[-1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (epochs, list(ax.get_xticks()))


def test_a_run_without_pressure_gets_no_pressure_plot(tmp_path):
    """A peer method or a dense run has no pressure column: an empty plot captioned as the controller's
    pressure would mislead."""
    recipe = load_recipe(
        SMOKE, ["hyperflux.pruning_epochs=2", "hyperflux.regrowth_epochs=1", "method=random"]
    )
    run_recipe(recipe, tmp_path, quiet=True)
    (tmp_path / PLOTS["pressure"]).write_bytes(PNG_MAGIC)  # one left by an earlier report
    page = write_report(tmp_path).read_text()
    drawn = {p.name for p in tmp_path.glob("*.png")}
    assert PLOTS["pressure"] not in drawn and drawn >= {
        name for key, name in PLOTS.items() if key != "pressure"
    }
    assert PLOTS["pressure"] not in page and CAPTIONS["pressure"] not in page


def png_height(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[20:24], "big")  # the IHDR chunk's height


def test_the_flips_plot_has_a_regrown_panel_only_where_weights_regrew(tmp_path):
    """A peer method never regrows: its flips plot had an empty second panel with a negative y range."""
    rows = telemetry_rows()
    write_rows(tmp_path / "regrew", rows)
    never = [{**row, "layer_regrown": {"a.weight": 0, "b.weight": 0}} for row in rows]
    write_rows(tmp_path / "never", never)
    for name in ("regrew", "never"):
        write_report(tmp_path / name)
    flips = TELEMETRY_PLOTS["flips"]
    assert png_height(tmp_path / "never" / flips) * 2 == png_height(tmp_path / "regrew" / flips)
