"""The accuracy benchmark's results file, shared by processes that run different models or seeds side by side."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_vs_sparsity.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("accuracy_vs_sparsity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(model: str, seed: int, method: str = "hyperflux") -> dict:
    return {"model": model, "method": method, "target_sparsity": 0.9, "seed": seed, "final_accuracy": 90.0}


def on_disk(path: Path) -> list[tuple[str, str, int]]:
    return sorted((r["model"], r["method"], r["seed"]) for r in json.loads(path.read_text())["records"])


def test_processes_owning_different_seeds_keep_each_others_records(bench, tmp_path):
    path = tmp_path / "results.json"
    first = {"records": [record("lenet5", 0)]}
    bench.save_results(path, first, "first", ["lenet5"], [0])
    second = {"records": [record("lenet5", 1)]}  # started before `first` saved anything
    bench.save_results(path, second, "second", ["lenet5"], [1])
    first["records"].append(record("lenet5", 0, "gmp"))
    bench.save_results(path, first, "first", ["lenet5"], [0])
    assert on_disk(path) == [("lenet5", "gmp", 0), ("lenet5", "hyperflux", 0), ("lenet5", "hyperflux", 1)]


def test_a_process_owning_a_whole_model_leaves_other_models_alone(bench, tmp_path):
    path = tmp_path / "results.json"
    bench.save_results(
        path, {"records": [record("lenet300", 0), record("lenet5", 0)]}, "all", ["lenet300", "lenet5"]
    )
    bench.save_results(path, {"records": [record("lenet5", 2)]}, "lenet5 only", ["lenet5"])
    assert on_disk(path) == [("lenet300", "hyperflux", 0), ("lenet5", "hyperflux", 2)]
    assert json.loads(path.read_text())["meta"]["commands"] == {"lenet300": "all", "lenet5": "lenet5 only"}


def test_each_process_keeps_the_other_models_lr_and_schedule_choices(bench, tmp_path):
    path = tmp_path / "results.json"
    choice = {"lenet300": {"gmp": {"update_every": 40}}}
    bench.save_results(
        path, {"records": [], "lr_choice": choice, "schedule_choice": choice}, "a", ["lenet300"]
    )
    other = {"lenet5": {"gmp": {"update_every": None}}}
    bench.save_results(path, {"records": [], "lr_choice": other, "schedule_choice": other}, "b", ["lenet5"])
    saved = json.loads(path.read_text())
    for name in ("lr_choice", "schedule_choice"):
        assert saved[name] == choice | other


def test_the_choice_prefers_on_target_runs_and_breaks_ties_for_the_default(bench):
    trials = {
        "default": {"holdout_accuracy": 90.0, "gap_pp": 0.0},
        "40": {"holdout_accuracy": 90.0, "gap_pp": 0.01},
        "80": {"holdout_accuracy": 95.0, "gap_pp": 0.2},  # better, but off target
    }
    assert bench.best_trial(trials, "default") == "default"
    trials["40"]["holdout_accuracy"] = 90.01
    assert bench.best_trial(trials, "default") == "40"
    off = {k: {**t, "gap_pp": 1.0} for k, t in trials.items()}
    assert bench.best_trial(off, "default") == "80"  # none on target, all as far: the most accurate
    off["default"]["gap_pp"] = 0.5
    assert bench.best_trial(off, "default") == "default"  # none on target: the closest to it


def test_a_cell_mixing_epoch_budgets_is_refused_and_budgets_come_from_the_recipes(bench):
    """A record run on another budget must not average into a cell (or count as done on resume)."""
    cell = [
        {**record("lenet300", seed), "achieved_sparsity": 0.9, "wall_time_s": 1.0, "epochs": epochs}
        for seed, epochs in ((0, 45), (1, 10))
    ]
    with pytest.raises(ValueError, match=r"records of \[10, 45\] epochs in one cell"):
        bench.stats(cell)
    assert bench.stats(cell[:1])["epochs"] == 45
    assert bench.budget_epochs("lenet300", False) == 45 and bench.budget_epochs("lenet5", False) == 15
    assert bench.budget_epochs("lenet300", True) == sum(bench.QUICK_EPOCHS)


def test_widening_the_lr_grid_goes_past_an_edge_choice_until_it_is_inside(bench):
    def trials(accuracies: dict[str, float]) -> dict[str, dict[str, float]]:
        return {k: {"holdout_accuracy": a, "gap_pp": 0.0} for k, a in accuracies.items()}

    assert bench.next_multiplier(trials({"0.5": 90, "1": 91, "2": 90})) is None  # inside
    assert bench.next_multiplier(trials({"0.5": 90, "1": 91, "2": 92})) == 4.0
    assert bench.next_multiplier(trials({"0.5": 93, "1": 91, "2": 92})) == 0.25
    assert bench.next_multiplier(trials({"0.5": 90, "1": 91, "2": 92, "4": 91.5})) is None  # 2x now inside
    assert bench.next_multiplier(trials({"2": 90, "4": 91, "8": 92})) is None  # at the limit
    assert bench.next_multiplier(trials({"0.125": 92, "0.25": 91})) is None


def test_a_results_file_from_before_imps_schedule_choice_reads_as_it_was_meant(bench, tmp_path):
    """Schedule choices were saved under "every" before IMP's final share joined them."""
    path = tmp_path / "old.json"
    trials = {
        "default": {"holdout_accuracy": 90.0, "gap_pp": 0.0},
        "40": {"holdout_accuracy": 91.0, "gap_pp": 0.0},
    }
    path.write_text(
        json.dumps(
            {
                "meta": {},
                "records": [],
                "schedule_choice": {"lenet5": {"gmp": {"every": 40, "trials": trials}}},
            }
        )
    )
    results = bench.load_results(path)
    assert results["schedule_choice"]["lenet5"]["gmp"] == {"update_every": 40, "trials": trials}
    assert "| gmp | every 40 batches | alternative | 90.00 | 91.00 |" in bench.markdown(
        {**results, "meta": {}, "records": [], "lr_choice": {}}
    )
