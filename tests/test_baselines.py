"""The baseline methods: exact target counts, masks that change only when each method says, pruned weights
that stay exactly zero under momentum, weight decay and AdamW, and each method run end to end by a recipe."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hyperflux import baselines
from hyperflux.recipe import BASELINE_METHODS, RecipeError, load_recipe
from hyperflux.training import load_run, run_recipe

SMOKE = Path(__file__).parent.parent / "recipes" / "smoke-digits.yaml"
TARGET = 0.8
EPOCHS, BATCHES = 4, 5  # pruning 3 + regrowth 1 epochs: the baselines' budget
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-1),
}


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))


def train(
    method: str, optimizer: str = "sgd", steps: int = EPOCHS * BATCHES, **settings
) -> tuple[baselines.Baseline, list[dict]]:
    """Run the method (its whole budget by default) on random data; one record of masks and pruned weights
    per step."""
    model = tiny()
    pruner = baselines.build(method, model, TARGET, EPOCHS - 1, 1, BATCHES, seed=0, **settings)
    opt = OPTIMIZERS[optimizer](model.parameters())
    pruner.attach(opt)
    generator = torch.Generator().manual_seed(1)
    history = [{"masks": pruner.masks(), "kept": pruner.kept()}]
    for _ in range(steps):
        x = torch.randn(8, 12, generator=generator)
        y = torch.randint(0, 4, (8,), generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.after_backward()
        opt.step()
        pruner.end_step()
        masks = pruner.masks()
        pruned = [w.detach()[~masks[n]] for n, w in pruner.masked_weights().items()]
        history.append({"masks": masks, "kept": pruner.kept(), "pruned_values": torch.cat(pruned)})
    return pruner, history


def change_steps(history: list[dict]) -> list[int]:
    """Steps (completed) after which some mask differs from the one before."""
    return [
        step
        for step in range(1, len(history))
        if any(
            not torch.equal(history[step]["masks"][n], history[step - 1]["masks"][n])
            for n in history[0]["masks"]
        )
    ]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_each_method_reaches_the_exact_target_and_pruned_weights_stay_zero(method, optimizer):
    pruner, history = train(method, optimizer)
    want = round((1 - TARGET) * pruner.total)
    assert pruner.kept() == want == history[-1]["kept"]
    assert all(torch.count_nonzero(record["pruned_values"]) == 0 for record in history[1:])
    assert max(len(record["pruned_values"]) for record in history[1:]) > 0
    # the squashed model holds the same zeros
    model = pruner.squash()
    assert sum(int(torch.count_nonzero(m.weight)) for m in model if isinstance(m, nn.Linear)) <= want


def test_magnitude_prunes_once_at_its_epoch():
    _, history = train("magnitude", prune_epoch=2)
    assert change_steps(history) == [2 * BATCHES]
    assert history[2 * BATCHES - 1]["kept"] == history[0]["kept"]


def test_random_and_rigl_hold_the_target_from_step_zero():
    for method in ("random", "rigl"):
        pruner, history = train(method, update_every=3)
        want = round((1 - TARGET) * pruner.total)
        assert {record["kept"] for record in history} == {want}, method
    assert change_steps(train("random")[1]) == []


def test_rigl_moves_connections_at_update_steps_only_and_keeps_each_layers_count():
    pruner, history = train("rigl", update_every=3, end_epoch=3)
    changes = change_steps(history)
    assert changes and set(changes) <= {s for s in range(3, 3 * BATCHES, 3)}
    layer_counts = {tuple(int(m.sum()) for m in record["masks"].values()) for record in history}
    assert len(layer_counts) == 1
    shapes = [list(m.shape) for m in history[0]["masks"].values()]
    assert list(layer_counts.pop()) == baselines.erk_counts(shapes, pruner.target_count)


def test_gmp_follows_the_cubic_schedule_at_its_update_steps():
    pruner, history = train("gmp", start_epoch=1, end_epoch=3, update_every=2)
    start, end = BATCHES, 3 * BATCHES
    assert set(change_steps(history)) <= {*range(start, end, 2), end}
    kept = [record["kept"] for record in history]
    assert kept == sorted(kept, reverse=True) and kept[end] == pruner.target_count
    progress = (start + 4 - start) / (end - start)
    assert kept[start + 4] == round(pruner.total * (1 - baselines.cubic(0.0, TARGET, progress)))


def test_taylor_prunes_at_epoch_ends_only():
    pruner, history = train("taylor", end_epoch=3)
    assert change_steps(history) == [BATCHES, 2 * BATCHES, 3 * BATCHES]
    assert history[3 * BATCHES]["kept"] == pruner.target_count


def test_imp_prunes_a_fifth_of_what_remains_per_round_and_rewinds():
    pruner, history = train("imp", rewind_epoch=0)
    assert change_steps(history) == pruner.ends[:-1]
    counts = [history[end]["kept"] for end in pruner.ends[:-1]]
    assert counts == pruner.counts and counts[-1] == pruner.target_count
    assert counts[0] == round(0.8 * pruner.total)
    # right after a round, every weight is back at the rewind point (here: the initialisation), masked
    rewound, _ = train("imp", rewind_epoch=0, steps=pruner.ends[0])
    masks = rewound.masks()
    for (name, weight), (_, start) in zip(
        rewound.model.named_parameters(), tiny().named_parameters(), strict=True
    ):
        expected = start.detach() * masks[name] if name in masks else start.detach()
        assert torch.equal(weight.detach(), expected), name


def test_imp_replays_the_lr_schedule_in_each_round():
    pruner = baselines.build("imp", tiny(), TARGET, EPOCHS - 1, 1, BATCHES, rewind_epoch=1)
    first, second = pruner.ends[0], pruner.ends[1]
    assert pruner.schedule_progress(0.0) == 0.0
    assert pruner.schedule_progress(first / BATCHES) == pytest.approx(1.0)  # the rewind point
    assert pruner.schedule_progress((second - 1e-9) / BATCHES) == pytest.approx(EPOCHS)


def test_erk_counts_sum_exactly_and_cap_small_layers_at_dense():
    counts = baselines.erk_counts([[1000, 784], [10, 1000], [3, 3]], 20_000)
    assert sum(counts) == 20_000
    assert counts[2] == 9 and counts[1] < 10_000


def test_method_key_resolves_against_exact_target():
    assert load_recipe(SMOKE)["method"] == "hyperflux"
    assert load_recipe(SMOKE, ["hyperflux.exact_target=false"])["method"] == "hyperflux-paper"
    with pytest.raises(RecipeError, match="method hyperflux-paper means exact_target false"):
        load_recipe(SMOKE, ["method=hyperflux-paper"])
    with pytest.raises(RecipeError, match="'method': expected one of"):
        load_recipe(SMOKE, ["method=obd"])
    with pytest.raises(RecipeError, match=r"'baseline\.prune_epoch': 40 is past the budget of 30 epochs"):
        load_recipe(SMOKE, ["method=magnitude", "baseline.prune_epoch=40"])
    with pytest.raises(RecipeError, match="method gmp needs a target sparsity"):
        load_recipe(SMOKE, ["method=gmp", "hyperflux.target_sparsity=null", "hyperflux.pressure=1"])


@pytest.mark.parametrize("method", [*BASELINE_METHODS, "hyperflux-paper"])
def test_run_recipe_runs_each_method(method, tmp_path):
    extra = ["hyperflux.exact_target=false"] if method == "hyperflux-paper" else []
    recipe = load_recipe(
        SMOKE, [f"method={method}", "hyperflux.pruning_epochs=2", "hyperflux.regrowth_epochs=1", *extra]
    )
    summary = run_recipe(recipe, tmp_path, quiet=True, log=io.StringIO())
    assert summary["method"] == method and summary["epochs"] == 3
    if method != "hyperflux-paper":
        assert summary["kept"] == round(0.1 * summary["total"])
        assert load_run(tmp_path).counts() == (summary["kept"], summary["total"])
        assert summary["final_accuracy"] > 30


@pytest.mark.parametrize("method", ["imp", "rigl"])
def test_a_stopped_and_resumed_baseline_run_equals_an_uninterrupted_one(method, tmp_path):
    recipe = load_recipe(
        SMOKE,
        [
            f"method={method}",
            "hyperflux.pruning_epochs=2",
            "hyperflux.regrowth_epochs=1",
            "optimizer.name=sgd",
        ],
    )
    whole = run_recipe(recipe, tmp_path / "whole", quiet=True, log=io.StringIO())
    run_recipe(recipe, tmp_path / "parts", quiet=True, stop_after=1, log=io.StringIO())
    resumed = run_recipe(recipe, tmp_path / "parts", resume=True, quiet=True, log=io.StringIO())
    assert resumed["final_accuracy"] == whole["final_accuracy"]
    a, b = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "parts" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [
        [
            {k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
            for line in path.read_text().splitlines()
        ]
        for path in (tmp_path / "whole" / "metrics.jsonl", tmp_path / "parts" / "metrics.jsonl")
    ]
    assert rows[0] == rows[1]
