"""Reports: valid PNGs and an HTML page that refers to them, for finished and unfinished runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hyperflux.recipe import load_recipe
from hyperflux.report import PLOTS, write_report
from hyperflux.runfiles import RunError
from hyperflux.training import run_recipe

SMOKE = Path(__file__).parent.parent / "recipes" / "smoke-digits.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def short_recipe() -> dict:
    return load_recipe(SMOKE, ["hyperflux.pruning_epochs=3", "hyperflux.regrowth_epochs=1"])


def check_report(folder: Path) -> str:
    page = write_report(folder).read_text()
    for name in PLOTS.values():
        data = (folder / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 5000, name  # a drawn plot, not an empty canvas
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(sources) == sorted(PLOTS.values())  # relative paths, beside the page
    return page


def test_report_of_a_finished_run(tmp_path):
    summary = run_recipe(short_recipe(), tmp_path, quiet=True)
    page = check_report(tmp_path)
    assert f"{summary['final_accuracy']:.2f}%" in page
    assert f"{100 * summary['sparsity']:.3f}%" in page
    for layer in summary["per_layer"]:
        assert layer["name"] in page


def test_report_of_a_run_still_going(tmp_path):
    run_recipe(short_recipe(), tmp_path, quiet=True, stop_after=2)
    page = check_report(tmp_path)
    assert "in progress: epoch 2" in page


def test_report_needs_a_run_folder(tmp_path):
    with pytest.raises(RunError, match=re.escape("no metrics.jsonl")):
        write_report(tmp_path)
