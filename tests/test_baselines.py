"""The baseline methods: exact target counts, masks that change only when each method says, pruned weights
that stay exactly zero under momentum, weight decay and AdamW, and each method run end to end by a recipe."""

from __future__ import annotations

import copy
import io
import json
import math
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


def test_rigl_drops_the_smallest_weights_and_grows_the_largest_gradients():
    model = tiny()
    pruner = baselines.build(
        "rigl", model, TARGET, EPOCHS - 1, 1, BATCHES, seed=0, update_every=3, end_epoch=3
    )
    opt = OPTIMIZERS["sgd"](model.parameters())
    pruner.attach(opt)
    generator = torch.Generator().manual_seed(1)
    checked = 0
    for step in range(1, 3 * BATCHES):
        x, y = torch.randn(8, 12, generator=generator), torch.randint(0, 4, (8,), generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.after_backward()
        grads = {n: g.clone() for n, g in pruner.grad.items()}  # the dense gradients RigL grows by
        opt.step()
        magnitudes = {n: w.detach().abs().clone() for n, w in pruner.masked_weights().items()}
        before = pruner.masks()
        pruner.end_step()
        after = pruner.masks()
        if step % 3:
            assert all(torch.equal(before[n], after[n]) for n in before)
            continue
        fraction = 0.3 * (1 + math.cos(math.pi * step / (3 * BATCHES))) / 2
        for name, mask in before.items():
            # the rule written out with plain sorting: keep the largest |W| of the active weights, then grow the
            # largest |gradient| among all the others (just-dropped ones included), as many as were dropped
            active = mask.flatten().nonzero().flatten()
            drop = round(fraction * len(active))
            order = magnitudes[name].flatten()[active].argsort(descending=True)
            expected = torch.zeros(mask.numel(), dtype=torch.bool)
            expected[active[order[: len(active) - drop]]] = True
            candidates = (~expected).nonzero().flatten()
            growth = grads[name].flatten()[candidates].argsort(descending=True)[:drop]
            expected[candidates[growth]] = True
            assert torch.equal(after[name].flatten(), expected), (step, name)
        checked += 1
    assert checked == 4


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


def test_taylor_prunes_every_update_every_steps_and_reaches_the_target_at_the_end_step():
    pruner, history = train("taylor", end_epoch=3, update_every=4)
    end = 3 * BATCHES  # 15: not a multiple of 4, so the last update is the end step's own
    assert change_steps(history) == [4, 8, 12, end]
    assert history[end]["kept"] == pruner.target_count
    progress = 8 / end
    assert history[8]["kept"] == round(pruner.total * (1 - baselines.cubic(0.0, TARGET, progress)))


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


def test_imp_gives_the_final_mask_its_share_of_the_budget():
    """With `final_share`, the last round trains for that share of the steps and the rounds before it split
    the rest evenly; the masks still change at the rounds' ends only and end at the target."""
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 5))
    pruner = baselines.build("imp", model, 0.9, 30, 10, 10, seed=0, final_share=0.5)
    rounds = len(pruner.counts) + 1
    assert pruner.ends[-1] == 400 and pruner.ends[-2] == 200  # 40 epochs of 10 steps, half for the final mask
    lengths = [b - a for a, b in zip([0, *pruner.ends[:-2]], pruner.ends[:-1], strict=True)]
    assert len(lengths) == rounds - 1 and max(lengths) - min(lengths) <= 1 and sum(lengths) == 200
    even = baselines.build("imp", copy.deepcopy(model), 0.9, 30, 10, 10, seed=0)
    assert even.ends == [round((j + 1) * 400 / rounds) for j in range(rounds)]
    pruner, history = train("imp", rewind_epoch=0, final_share=0.5)
    assert pruner.ends[-2] == EPOCHS * BATCHES // 2 and change_steps(history) == pruner.ends[:-1]
    assert history[-1]["kept"] == pruner.target_count
    with pytest.raises(ValueError, match=r"only 20 steps, 2 of them before the final share"):
        baselines.build("imp", tiny(), TARGET, EPOCHS - 1, 1, BATCHES, seed=0, final_share=0.9)
    for share in (0.001, 0, -0.2, 1.0):  # no step for the final mask, or no share at all
        with pytest.raises(ValueError, match=r"final_share must be in \(0, 1\) and give the final mask"):
            baselines.build("imp", tiny(), TARGET, EPOCHS - 1, 1, BATCHES, seed=0, final_share=share)


def test_imp_prunes_at_least_one_weight_a_round_down_to_a_target_of_one():
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    pruner = baselines.build("imp", model, 7 / 8, 3, 1, 50, seed=0)
    assert pruner.counts == [6, 5, 4, 3, 2, 1] and pruner.target_count == 1  # 20% of 4 or fewer rounds to 0


def test_rigl_keeps_the_mask_of_a_layer_no_batch_reached():
    """An auxiliary head or a branch not taken: no gradient to grow by, so that layer's mask stays."""
    model = tiny()
    pruner = baselines.build("rigl", model, TARGET, EPOCHS - 1, 1, BATCHES, seed=0, update_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner.attach(opt)
    before = pruner.masks()
    for _ in range(4):
        opt.zero_grad()
        model[:4](torch.randn(8, 12)).pow(2).mean().backward()  # the last layer never runs
        pruner.after_backward()
        opt.step()
        pruner.end_step()
    assert torch.equal(pruner.masks()["4.weight"], before["4.weight"])
    assert not torch.equal(pruner.masks()["0.weight"], before["0.weight"])  # the layers that ran moved


def test_a_state_of_another_model_is_refused_by_name():
    state = baselines.build("gmp", tiny(), TARGET, EPOCHS - 1, 1, BATCHES, seed=0).state_dict()
    wider = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 4))
    other = baselines.build("gmp", wider, TARGET, EPOCHS - 1, 1, BATCHES, seed=0)
    with pytest.raises(ValueError, match=r"mask for 0\.weight has shape \(24, 12\), the weight \(48, 12\)"):
        other.load_state_dict(state)
    deeper = nn.Sequential(*tiny(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="holds 3 masks, this model 4"):
        baselines.build("gmp", deeper, TARGET, EPOCHS - 1, 1, BATCHES, seed=0).load_state_dict(state)


def test_imp_rewinds_batchnorm_statistics_with_the_weights():
    """As the reference implementation restores the whole state: running means and variances too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 4))
    pruner = baselines.build("imp", model, TARGET, EPOCHS - 1, 1, 20, rewind_epoch=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner.attach(opt)
    saved = None
    for step in range(pruner.ends[0]):
        if step == pruner.rewind_step:
            saved = [b.clone() for b in model.buffers()]
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 12)), torch.randint(0, 4, (8,))).backward()
        pruner.after_backward()
        opt.step()
        pruner.end_step()
    assert pruner.steps == pruner.ends[0] and 0 < pruner.rewind_step < pruner.ends[0]
    for buffer, want in zip(model.buffers(), saved, strict=True):
        assert torch.equal(buffer, want)
    restored = baselines.build("imp", copy.deepcopy(model), TARGET, EPOCHS - 1, 1, 20, rewind_epoch=1)
    restored.load_extra_state(pruner.extra_state())
    assert all(torch.equal(a, b) for a, b in zip(restored.rewind_buffers, saved, strict=True))


def test_imp_replays_the_lr_schedule_in_each_round():
    pruner = baselines.build("imp", tiny(), TARGET, EPOCHS - 1, 1, BATCHES, rewind_epoch=1)
    first, second = pruner.ends[0], pruner.ends[1]
    assert pruner.schedule_progress(0.0) == 0.0
    assert pruner.schedule_progress(first / BATCHES) == pytest.approx(1.0)  # the rewind point
    last = (second - 1 - first) / (second - first)  # the round's last step, just short of the schedule's end
    assert pruner.schedule_progress((second - 1) / BATCHES) == pytest.approx(1 + last * (EPOCHS - 1))
    # the trainer's progress, epoch + batch / batches, is no exact multiple of 1 / batches in floats: each
    # round's first step must still replay from the rewind point (9 batches: 1 + 6/9 is 14.999... steps)
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 5))
    nine = baselines.build("imp", model, 0.9, 3, 1, 9, rewind_epoch=1)
    assert 15 in nine.ends
    for end in nine.ends[:-1]:
        assert nine.schedule_progress(end // 9 + (end % 9) / 9) == pytest.approx(1.0), end


def watch(method: str, stats_every: int = 1, **settings) -> tuple[list[dict], dict[int, dict]]:
    """Run the method's budget like `train`, calling `stats()` every `stats_every` steps; returns the records
    and, by step, each mask change with the masks before and after and the importances the decision saw,
    computed here: |W| after the optimiser step, and the mean |W * g| since Taylor's last update step (g the
    dense gradient)."""
    model = tiny()
    pruner = baselines.build(method, model, TARGET, EPOCHS - 1, 1, BATCHES, seed=0, **settings)
    opt = OPTIMIZERS["sgd"](model.parameters())
    pruner.attach(opt)
    weights = pruner.masked_weights()
    taylor = {name: torch.zeros_like(w) for name, w in weights.items()}
    every, accumulated = settings.get("update_every") or BATCHES, 0
    generator = torch.Generator().manual_seed(1)
    records, events = [], {}
    for step in range(1, EPOCHS * BATCHES + 1):
        x = torch.randn(8, 12, generator=generator)
        y = torch.randint(0, 4, (8,), generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for name, w in weights.items():
                taylor[name] += (w * w.grad).abs()
        accumulated += 1
        pruner.after_backward()
        opt.step()
        before = pruner.masks()
        magnitude = {name: w.detach().abs().clone() for name, w in weights.items()}
        pruner.end_step()
        after = pruner.masks()
        if any(not torch.equal(before[n], after[n]) for n in before):
            mean_taylor = {name: t / accumulated for name, t in taylor.items()}
            events[step] = {"before": before, "after": after, "magnitude": magnitude, "taylor": mean_taylor}
        if step % every == 0:
            accumulated = 0
            for t in taylor.values():
                t.zero_()
        if step % stats_every == 0:
            records.append(pruner.stats())
    return records, events


def threshold(kind: str, event: dict) -> float:
    """Magnitude: the largest |W| removed; Taylor: the smallest mean |W * g| kept."""
    if kind == "magnitude":
        removed = [event["magnitude"][n][event["before"][n] & ~event["after"][n]] for n in event["before"]]
        return float(torch.cat(removed).max())
    return float(torch.cat([event["taylor"][n][event["after"][n]] for n in event["before"]]).min())


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("magnitude", {"prune_epoch": 2}),
        ("gmp", {"update_every": 2}),
        ("imp", {"rewind_epoch": 0}),
        ("taylor", {}),
        ("taylor", {"update_every": 4, "end_epoch": 3}),
    ],
)
def test_importance_min_is_the_threshold_of_each_pruning_decision(method, settings):
    records, events = watch(method, **settings)
    kind = "taylor" if method == "taylor" else "magnitude"
    assert len(events) >= (1 if method == "magnitude" else 2)
    for step, record in enumerate(records, 1):
        assert record["importance_kind"] == kind
        event = events.get(step)
        layer_flips = [(layer["pruned"], layer["regrown"]) for layer in record["layers"]]
        if event is None:  # no decision in this step: nothing to report
            assert record["importance_min"] is None, step
            assert record["pruned"] == record["regrown"] == 0
            assert layer_flips == [(0, 0)] * 3
            continue
        value = record["importance_min"]
        assert value == pytest.approx(threshold(kind, event), rel=1e-6), step
        before, after = event["before"], event["after"]
        assert layer_flips == [(int((before[n] & ~after[n]).sum()), 0) for n in before]
        assert record["pruned"] == sum(p for p, _ in layer_flips) > 0
        # and it is a threshold: the kept weights score at least the removed ones
        scores = event[kind]
        kept = torch.cat([scores[n][after[n]] for n in before])
        removed = torch.cat([scores[n][before[n] & ~after[n]] for n in before])
        assert float(removed.max()) <= value * (1 + 1e-6) and float(kept.min()) >= value * (1 - 1e-6)


def test_importance_min_reports_the_latest_decision_since_the_last_stats_call():
    records, events = watch("gmp", stats_every=BATCHES, update_every=2)
    assert len(records) == EPOCHS
    windows = []
    for epoch, record in enumerate(records):
        window = [s for s in events if epoch * BATCHES < s <= (epoch + 1) * BATCHES]
        if not window:
            assert record["importance_min"] is None and record["pruned"] == 0
            continue
        windows.append(len(window))
        assert record["importance_min"] == pytest.approx(
            threshold("magnitude", events[max(window)]), rel=1e-6
        )
        pruned = sum(
            int((events[s]["before"][n] & ~events[s]["after"][n]).sum())
            for s in window
            for n in events[s]["before"]
        )
        assert record["pruned"] == pruned == sum(layer["pruned"] for layer in record["layers"])
    assert windows and min(windows) >= 2  # several decisions between two calls: the latest one is reported


@pytest.mark.parametrize("method", ["rigl", "random"])
def test_rigl_and_random_report_flips_per_layer_and_no_importance(method):
    records, events = watch(method, update_every=3, end_epoch=3)
    assert bool(events) == (method == "rigl") and 1 not in events
    # the mask at the target is set at attach(), before the first step, and reported once, in the first record
    first = records[0]
    assert (
        first["pruned"] == sum(layer["pruned"] for layer in first["layers"]) == first["total"] - first["kept"]
    )
    for step, record in enumerate(records, 1):
        assert record["importance_kind"] is None and record["importance_min"] is None
        flips = [(layer["pruned"], layer["regrown"]) for layer in record["layers"]]
        if step in events:
            # RigL keeps each layer's count: every weight dropped in a layer is matched by one grown there
            assert all(p == r for p, r in flips) and sum(p for p, _ in flips) == record["pruned"] > 0
        elif step > 1:
            assert flips == [(0, 0)] * 3


def test_erk_counts_sum_exactly_and_cap_small_layers_at_dense():
    counts = baselines.erk_counts([[1000, 784], [10, 1000], [3, 3]], 20_000)
    assert sum(counts) == 20_000
    assert counts[2] == 9 and counts[1] < 10_000


def test_method_key_resolves_against_exact_target():
    assert load_recipe(SMOKE)["method"] == "hyperflux"
    assert load_recipe(SMOKE, ["hyperflux.exact_target=false"])["method"] == "hyperflux-paper"
    # a method set on the command line decides over the file's exact_target; set both, they must agree
    paper = load_recipe(SMOKE, ["method=hyperflux-paper"])
    assert paper["method"] == "hyperflux-paper" and paper["hyperflux"]["exact_target"] is False
    with pytest.raises(
        RecipeError,
        match=r"method hyperflux-paper means exact_target false.*--set hyperflux\.exact_target=false",
    ):
        load_recipe(SMOKE, ["method=hyperflux-paper", "hyperflux.exact_target=true"])
    # no method set (null) leaves the file's exact_target deciding, as before
    paper_file = load_recipe(SMOKE.parent / "resnet50-cifar10.yaml", ["method=null"])
    assert paper_file["method"] == "hyperflux-paper" and paper_file["hyperflux"]["exact_target"] is False
    with pytest.raises(RecipeError, match="'method': expected one of"):
        load_recipe(SMOKE, ["method=obd"])
    with pytest.raises(RecipeError, match=r"'baseline\.prune_epoch': 40 is past the budget of 30 epochs"):
        load_recipe(SMOKE, ["method=magnitude", "baseline.prune_epoch=40"])
    short = ["hyperflux.pruning_epochs=2", "hyperflux.regrowth_epochs=1"]
    with pytest.raises(
        RecipeError, match=r"'baseline\.start_epoch': 2 is not before the schedule's default end"
    ):
        load_recipe(SMOKE, ["method=gmp", *short, "baseline.start_epoch=2"])  # it would never prune
    assert load_recipe(SMOKE, ["method=gmp", *short, "baseline.start_epoch=2", "baseline.end_epoch=3"])
    assert load_recipe(
        SMOKE, ["method=rigl", *short, "baseline.start_epoch=2"]
    )  # rigl has no start: no check
    with pytest.raises(RecipeError, match=r"'baseline\.rewind_epoch': must come before the end"):
        load_recipe(SMOKE, ["method=imp", *short, "baseline.rewind_epoch=3"])
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
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # the telemetry of every method's metrics rows
        assert set(row["layer_pruned"]) == set(row["layer_regrown"]) == set(row["layers"])
        assert sum(row["layer_pruned"].values()) == row["pruned"]
        assert sum(row["layer_regrown"].values()) == row["regrown"]
        if method in ("magnitude", "gmp", "imp", "taylor"):
            assert row["importance_kind"] == ("taylor" if method == "taylor" else "magnitude")
            assert (row["importance_min"] is None) == (row["pruned"] == 0), row["epoch"]
            assert row["importance_min"] is None or row["importance_min"] > 0
        elif method in ("rigl", "random"):
            assert row["importance_kind"] is None and row["importance_min"] is None
    # every flip is counted, the exact trim at freeze time included
    assert sum(row["pruned"] - row["regrown"] for row in rows) == summary["total"] - summary["kept"]


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


@pytest.mark.parametrize("method", ["taylor", "rigl"])
def test_an_overflowed_gradient_neither_scores_nor_grows_weights(method):
    """A gradient with infinities and NaNs (an fp16 step the loss scaler skips) adds nothing to Taylor's
    importance and offers nothing to RigL's growth: read as such, it would outrank every real value."""
    model = tiny()
    pruner = baselines.build(method, model, TARGET, EPOCHS - 1, 1, BATCHES, seed=0, update_every=1)
    weight = next(iter(pruner.masked_weights().values()))
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    weight.grad[0, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    pruner.after_backward()
    seen = pruner.score if method == "taylor" else pruner.grad
    values = next(iter(seen.values()))
    assert torch.isfinite(values).all() and values[0, :3].eq(0).all()
    assert values[0, 3:].gt(0).any()  # the finite rest of the gradient counts as ever
