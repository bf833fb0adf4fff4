"""Phases, observation, floors, the exact target, state, squash and compile of `Hyperflux`."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperflux import Hyperflux, PressureScheduler, kernels, sparsifier
from hyperflux.sparsifier import FLUX_HIST_EDGES
from pruned_models import Attending


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def set_logits(hf, values):
    with torch.no_grad():
        for gate, value in zip(hf.gates, values, strict=True):
            gate.logits.copy_(value)


def test_paper_phases_release_pressure_reset_decay_and_freeze_the_mask_lr():
    model = mlp()
    hf = Hyperflux(
        model,
        0.5,
        pruning_epochs=3,
        regrowth_epochs=4,
        exact_target=False,
        freeze_after=2,
        mask_lr=1e-3,
        regrowth_mask_lr=5e-3,
        regrowth_decay=0.5,
    )
    opt = torch.optim.Adam(hf.param_groups(lr=1e-3))
    hf.attach(opt)
    mask_group = opt.param_groups[1]
    phases, lrs, pressures = [], [], []
    for _ in range(hf.total_epochs):
        hf.step()
        phases.append(hf.phase)
        lrs.append(mask_group["lr"])
        pressures.append(hf.pressure)
    assert phases == ["pruning", "pruning", "regrowth", "regrowth", "frozen", "frozen", "done"]
    # pruning keeps the user's lr; regrowth resets to 5e-3 and halves each period; frozen means 0
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-3, 2.5e-3, 0.0, 0.0, 0.0])
    assert pressures[2:] == [0.0] * 5  # the paper releases the pressure at once, no off-by-one epoch
    assert all(not m.requires_grad for m in hf.mask_parameters())
    model(torch.randn(2, 8)).sum().backward()  # a flux batch: the attached step takes its gradient back
    opt.step()
    assert all(not m.requires_grad and m.grad is None for m in hf.mask_parameters())
    model(torch.randn(2, 8)).sum().backward()  # any other batch: no gradient at all
    assert all(m.grad is None for m in hf.mask_parameters())


@pytest.mark.parametrize("regrowth_mask_lr", [None, 0.01])
def test_the_mask_lr_given_to_param_groups_is_the_runs_own(regrowth_mask_lr):
    """`param_groups(mask_lr=...)` replaces the constructor's mask lr: `hf.mask_lr` reports what the group
    runs with, and regrowth resets to it (or to `regrowth_mask_lr`, when given) and decays from there."""
    hf = Hyperflux(
        mlp(),
        0.5,
        pruning_epochs=2,
        regrowth_epochs=3,
        exact_target=False,
        regrowth_decay=0.5,
        regrowth_mask_lr=regrowth_mask_lr,
    )
    opt = torch.optim.Adam(hf.param_groups(lr=1e-3, mask_lr=0.05))
    hf.attach(opt)
    ran, reported = [], []
    for _ in range(4):
        ran.append(opt.param_groups[1]["lr"])
        reported.append(hf.mask_lr)
        hf.step()
    reset = regrowth_mask_lr or 0.05
    assert ran == pytest.approx([0.05, 0.05, reset, reset / 2])
    assert reported == pytest.approx(ran)


def test_exact_mode_keeps_the_controller_at_lower_gain_during_regrowth():
    hf = Hyperflux(mlp(), 0.5, pruning_epochs=2, regrowth_epochs=10, delta=0.3)
    hf.step(), hf.step()
    assert hf.phase == "regrowth" and hf.scheduler.delta == pytest.approx(0.1)
    gamma = hf.scheduler.gamma
    hf.step()  # still fully dense: too dense, so the pressure keeps rising
    assert hf.scheduler.gamma == pytest.approx(gamma + 0.1 + hf.scheduler.boost_up - 0.1 / 4)
    assert hf.pressure > 0


def test_stats_count_pruned_and_regrown_on_a_scripted_mask_sequence():
    hf = Hyperflux(mlp(), 0.5, pruning_epochs=10, exact_target=False)
    first, second = (g.logits.detach().clone() for g in hf.gates)
    first.view(-1)[:10] = -1.0  # prune 10
    set_logits(hf, [first, second])
    s = hf.step()
    assert (s["pruned"], s["regrown"], s["kept"]) == (10, 0, hf.total - 10)
    assert s["layers"][0]["pruned"] == 10 and s["layers"][1]["pruned"] == 0
    closed, now = hf.summary(s).splitlines(), hf.summary().splitlines()
    assert closed[-1].strip() == "pruned, regrown and flux: as the record given counts them"
    assert now[-1].strip() == "pruned, regrown and flux: since the last step()"
    assert closed[2].split()[5] == "10" and now[2].split()[5] == "0"  # the first layer's pruned column
    first.view(-1)[:4] = 1.0  # regrow 4
    second.view(-1)[:7] = -1.0  # prune 7
    set_logits(hf, [first, second])
    s = hf.stats()
    assert (s["pruned"], s["regrown"]) == (7, 4)
    assert s["density"] == pytest.approx((hf.total - 13) / hf.total)
    assert s["layers"][1]["density"] == pytest.approx(1 - 7 / 64)
    assert hf.density() + hf.sparsity() == 1.0
    table = hf.summary()
    assert "0.weight" in table and "2.weight" in table and "total" in table and f"{hf.total - 13:,}" in table


def flips(record):
    """(global, per-layer) (pruned, regrown) of a stats record."""
    return (record["pruned"], record["regrown"]), [
        (layer["pruned"], layer["regrown"]) for layer in record["layers"]
    ]


def test_stats_count_flips_per_layer_over_a_scripted_sequence_of_periods():
    hf = Hyperflux(mlp(), 0.5, pruning_epochs=10, exact_target=False)
    first, second = (g.logits.detach().clone() for g in hf.gates)
    first.view(-1)[:10] = -1.0
    set_logits(hf, [first, second])
    assert flips(hf.step()) == ((10, 0), [(10, 0), (0, 0)])
    first.view(-1)[:4] = 1.0  # regrow 4 of the 10
    first.view(-1)[20:23] = -1.0  # prune 3 more
    second.view(-1)[:7] = -1.0
    set_logits(hf, [first, second])
    assert flips(hf.stats()) == ((10, 4), [(3, 4), (7, 0)])
    assert flips(hf.step()) == ((10, 4), [(3, 4), (7, 0)])  # the same period, closed
    # counts start again at every step, and compare the masks at its start and end
    second.view(-1)[:2] = 1.0  # regrow 2
    first.view(-1)[50] = -1.0  # closed and reopened within the period: no flip
    set_logits(hf, [first, second])
    first.view(-1)[50] = 1.0
    set_logits(hf, [first, second])
    record = hf.step()
    assert flips(record) == ((0, 2), [(0, 0), (0, 2)])
    assert record["kept"] == hf.total - 9 - 5
    assert [layer["kept"] for layer in record["layers"]] == [128 - 9, 64 - 5]
    assert flips(hf.stats()) == ((0, 0), [(0, 0), (0, 0)])


@pytest.fixture(params=["compiled", "torch"])
def stats_path(request, monkeypatch):
    """stats() both ways: the compiled pass for float32 CPU masks (which must build here, or the path training
    takes goes untested) and torch ops, which other devices and dtypes take."""
    if request.param == "compiled":
        assert kernels.stats_ops() is not None
    else:
        monkeypatch.setattr(sparsifier, "stats_ops", lambda: None)
    return request.param


def test_the_compiled_stats_of_an_empty_tensor_keep_their_flux_part():
    """An empty tensor's data pointer may be null; the flux part is there whenever a flux is given."""
    gate_stats, _ = kernels.stats_ops()
    empty = torch.empty(0, 5)
    edges = [float(e) for e in FLUX_HIST_EDGES]
    with_flux = gate_stats(empty, empty.bool(), empty.clone(), 1, 1.0, edges)
    assert with_flux is not None and len(with_flux) == 6 + 2 * (len(edges) + 1)
    assert with_flux[:3].tolist() == [0.0, 0.0, 0.0] and with_flux[6:].sum() == 0
    assert len(gate_stats(empty, empty.bool(), None, 1, 1.0, edges)) == 3


def set_flux(gate, flux, batches=2):
    """Make `gate.mean_flux() * c * N` equal `flux` (pressure units), as if `batches` batches were sampled."""
    gate.flux_sum = (flux * batches / (gate.scale * FLUX_TOTAL)).float()
    gate.flux_batches = batches


FLUX_TOTAL = 128 + 64  # weights masked by mlp()


def bin_of(value: float) -> int:
    """The bin a value falls in, counted independently of the code under test: the edges at or below it."""
    return sum(edge <= value for edge in FLUX_HIST_EDGES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flux_statistics_equal_those_of_the_pooled_values(seed, stats_path):
    """The global flux statistics equal the naive ones over all surviving (or pruned) weights pooled: the
    1% quantile exactly (one of the values), minimum and histograms exactly, means to float rounding."""
    generator = torch.Generator().manual_seed(seed)
    hf = Hyperflux(mlp(seed), 0.5, pruning_epochs=10, exact_target=False)
    set_logits(hf, [torch.randn(g.logits.shape, generator=generator) for g in hf.gates])
    # flux over several decades and both signs, many values in one bin, a few repeated values
    for gate in hf.gates:
        values = torch.randn(gate.logits.shape, generator=generator) * 10 ** torch.randint(
            -3, 3, gate.logits.shape, generator=generator
        )
        values.view(-1)[:5] = 0.25
        set_flux(gate, values)
    units = hf.grad_scale * hf.total
    fluxes = [g.mean_flux() * units for g in hf.gates]
    masks = [g.mask() for g in hf.gates]
    alive = torch.cat([f[m] for f, m in zip(fluxes, masks, strict=True)])
    dead = torch.cat([f[~m] for f, m in zip(fluxes, masks, strict=True)])
    stats = hf.stats()
    k = max(1, -(-len(alive) // 100))
    assert stats["flux_p01"] == float(alive.sort().values[k - 1])
    assert stats["flux_min"] == float(alive.min())
    assert stats["flux_mean"] == pytest.approx(float(alive.double().mean()), rel=1e-5)
    assert stats["flux_mean_pruned"] == pytest.approx(float(dead.double().mean()), rel=1e-5)
    assert stats["flux_hist"]["survivors"] == [sum(bin_of(float(v)) == b for v in alive) for b in range(40)]
    assert stats["flux_hist"]["pruned"] == [sum(bin_of(float(v)) == b for v in dead) for b in range(40)]
    for layer, flux, mask in zip(stats["layers"], fluxes, masks, strict=True):
        assert layer["kept"] == int(mask.sum()) and isinstance(layer["kept"], int)
        assert layer["flux_min"] == float(flux[mask].min())
        assert layer["flux_mean"] == pytest.approx(float(flux[mask].double().mean()), rel=1e-5)


def test_flux_histogram_edges_are_fixed_symmetric_half_decades():
    edges = FLUX_HIST_EDGES
    assert len(edges) == 39 and edges[19] == 0.0
    assert edges[20:] == pytest.approx([10 ** (k / 2) for k in range(-12, 7)], rel=1e-12)
    assert edges[:19] == tuple(-e for e in reversed(edges[20:]))
    assert [bin_of(v) for v in (-2000.0, -0.02, 0.0, 2e-5, 0.5, 5.0, 5000.0)] == [0, 10, 20, 23, 32, 34, 39]


def test_flux_histogram_counts_survivors_and_pruned_weights_in_their_bins(stats_path):
    hf = Hyperflux(mlp(), 0.5, pruning_epochs=10, exact_target=False)
    assert hf.total == FLUX_TOTAL
    assert hf.stats()["flux_hist"] is None  # no batch sampled yet
    first, second = (g.logits.detach().clone() for g in hf.gates)
    first.view(-1)[:10] = -1.0
    second.view(-1)[:6] = -1.0
    set_logits(hf, [first, second])
    flux = torch.empty(128)
    flux[:5], flux[5:10] = -0.02, 0.0  # pruned
    flux[10:60], flux[60:126], flux[126], flux[127] = 5.0, 2e-5, -2000.0, 5000.0  # surviving
    set_flux(hf.gates[0], flux.view(16, 8))
    set_flux(hf.gates[1], torch.full((4, 16), 0.5))

    hist = hf.stats()["flux_hist"]
    assert hist["edges"] == list(FLUX_HIST_EDGES)
    assert len(hist["survivors"]) == len(hist["pruned"]) == 40
    assert all(isinstance(c, int) for c in hist["survivors"] + hist["pruned"])
    survivors, pruned = [0] * 40, [0] * 40
    for value, count in ((5.0, 50), (2e-5, 66), (-2000.0, 1), (5000.0, 1), (0.5, 58)):
        survivors[bin_of(value)] += count
    for value, count in ((-0.02, 5), (0.0, 5), (0.5, 6)):
        pruned[bin_of(value)] += count
    assert hist["survivors"] == survivors and hist["pruned"] == pruned
    assert sum(hist["survivors"]) == hf.kept() == 128 - 10 + 64 - 6
    assert sum(hist["pruned"]) == 16

    # a tensor without sampled flux is left out of the counts
    hf.gates[1].flux_sum, hf.gates[1].flux_batches = None, 0
    hist = hf.stats()["flux_hist"]
    assert sum(hist["survivors"]) == 118 and sum(hist["pruned"]) == 10
    assert hist["survivors"][bin_of(0.5)] == 0 and hist["pruned"][bin_of(0.0)] == 5
    hf.step()  # resets the flux
    assert hf.stats()["flux_hist"] is None


def test_compiled_and_torch_stats_agree_on_a_conv_in_channels_last_with_nan_and_infinite_flux(monkeypatch):
    """Bit for bit, the sums to float64 rounding: NaN falls in the last bin and makes the minimum NaN, as
    torch.bucketize and amin have it; infinities take the end bins."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    model = model.to(memory_format=torch.channels_last)
    hf = Hyperflux(model, 0.5, pruning_epochs=4, exact_target=False)
    assert not hf.gates[0].logits.is_contiguous()
    set_logits(hf, [torch.randn(g.logits.shape) for g in hf.gates])
    flux = torch.randn(hf.gates[0].logits.shape) * 10.0 ** torch.randint(-7, 4, hf.gates[0].logits.shape)
    flux.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    set_flux(hf.gates[0], flux.contiguous(memory_format=torch.channels_last))
    hf.gates[0].flux_sum = hf.gates[0].flux_sum.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        hf.gates[0].logits[0, 0, 0, 0] = 1.0  # the NaN survives; the Linear has no flux and is left out
    compiled = hf.stats()
    monkeypatch.setattr(sparsifier, "stats_ops", lambda: None)
    plain = hf.stats()
    for key in ("flux_hist", "kept", "pruned", "regrown", "flux_p01"):
        assert compiled[key] == plain[key], key
    assert compiled["flux_hist"]["survivors"][-1] >= 2  # the NaN and +inf
    for stats in (compiled, plain):  # the layer's NaN minimum is the model's too
        assert math.isnan(stats["layers"][0]["flux_min"]) and math.isnan(stats["flux_min"])
    assert compiled["flux_mean_pruned"] == pytest.approx(plain["flux_mean_pruned"], rel=1e-12)
    assert [layer["kept"] for layer in compiled["layers"]] == [layer["kept"] for layer in plain["layers"]]


def test_minimum_density_reopens_the_best_pruned_weights_and_lifts_the_pressure():
    hf = Hyperflux(mlp(), 0.5, pruning_epochs=5, min_density=0.25, exact_target=False)
    first, second = (g.logits.detach().clone() for g in hf.gates)
    first.fill_(-1.0)
    first.view(-1)[:5] = -0.01  # the five best pruned weights, and 27 more needed at 25% of 128
    first.view(-1)[5:32] = torch.linspace(-0.5, -0.1, 27)
    set_logits(hf, [first, second])
    hf.step()
    mask = hf.gates[0].mask().view(-1)
    assert int(mask.sum()) == 32 and bool(mask[:32].all())
    assert hf.layer_scales == [0.0, 1.0]


@pytest.mark.parametrize("direction", ["trim", "refill"])
def test_exact_target_closes_at_the_requested_count(direction):
    hf = Hyperflux(mlp(), 0.75, pruning_epochs=1, regrowth_epochs=1)
    first, second = (g.logits.detach().clone() for g in hf.gates)
    torch.manual_seed(3)
    first.uniform_(-1, 1), second.uniform_(-1, 1)
    if direction == "refill":
        first -= 0.9
        second -= 0.9
    set_logits(hf, [first, second])
    order = torch.cat([first.view(-1), second.view(-1)])
    kept_at_start = hf.kept()
    records = [hf.step(), hf.step()]
    assert hf.phase == "done"
    want = round(0.25 * hf.total)
    assert hf.kept() == want
    # the trim's flips are in the records, and each record describes the masks its period leaves
    pruned, regrown = sum(r["pruned"] for r in records), sum(r["regrown"] for r in records)
    assert hf.total - pruned + regrown == want  # flips count from the all-present start
    by_hand = hf.total - kept_at_start
    if direction == "trim":
        assert pruned > by_hand and regrown == 0
    else:
        assert pruned == by_hand and regrown > 0
    assert records[-1]["kept"] == want
    assert [layer["kept"] for layer in records[-1]["layers"]] == [int(g.mask().sum()) for g in hf.gates]
    kept = torch.cat([g.mask().view(-1) for g in hf.gates])
    # exactly the highest-logit weights survive
    assert torch.equal(kept, order >= order.topk(want).values.min())


@pytest.mark.parametrize("direction", ["trim", "refill"])
def test_the_exact_trim_writes_logits_of_any_layout(direction):
    """A model moved to channels-last has 4-d logits whose flat view is a copy: the trim must write the
    chosen gates in the logits themselves, as in contiguous ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    hf = Hyperflux(model, 0.7, pruning_epochs=1, regrowth_epochs=1)
    model.to(memory_format=torch.channels_last)
    assert not hf.gates[0].logits.is_contiguous() and hf.gates[1].logits.is_contiguous()
    with torch.no_grad():
        for gate in hf.gates:
            gate.logits.uniform_(-1, 1).sub_(0.0 if direction == "trim" else 0.9)
    order = torch.cat([g.logits.detach().flatten() for g in hf.gates])
    hf.step()
    hf.step()
    want = round(0.3 * hf.total)
    kept = torch.cat([g.mask().flatten() for g in hf.gates])
    assert int(kept.sum()) == want
    assert torch.equal(kept, order >= order.topk(want).values.min())


def train(model, hf, opt, periods, data, start=0):
    x, y = data
    for period in range(start, start + periods):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(period))
        for i in range(0, len(x), 16):
            idx = order[i : i + 16]
            loss = F.cross_entropy(model(x[idx]), y[idx]) + hf.pressure_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        hf.step(opt)


def make_run(seed=0):
    model = mlp(seed)
    hf = Hyperflux(model, 0.6, pruning_epochs=4, regrowth_epochs=3, mask_lr=0.05, flux_every=3)
    opt = torch.optim.Adam(hf.param_groups(lr=1e-2))
    return model, hf, opt


def test_resume_from_state_dicts_continues_bit_identically():
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(96, 8, generator=g), torch.randint(0, 4, (96,), generator=g))
    model, hf, opt = make_run()
    train(model, hf, opt, 3, data)
    checkpoint = copy.deepcopy(
        {
            "model": model.state_dict(),
            "hf": hf.state_dict(),
            "opt": opt.state_dict(),
            "rng": torch.get_rng_state(),
        }
    )
    train(model, hf, opt, 4, data, start=3)

    model2, hf2, opt2 = make_run(
        seed=1
    )  # different initial weights: everything must come from the checkpoint
    model2.load_state_dict(checkpoint["model"])
    hf2.load_state_dict(checkpoint["hf"])
    opt2.load_state_dict(checkpoint["opt"])
    torch.set_rng_state(checkpoint["rng"])
    train(model2, hf2, opt2, 4, data, start=3)

    assert hf.phase == hf2.phase == "done"
    for (k, a), (k2, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert hf.state_dict()["scheduler"] == hf2.state_dict()["scheduler"]
    assert hf.last_stats == hf2.last_stats


def test_state_dict_rejects_another_configuration():
    _, hf, _ = make_run()
    other = Hyperflux(mlp(), 0.7, pruning_epochs=4, regrowth_epochs=3)
    with pytest.raises(ValueError, match="target"):
        other.load_state_dict(hf.state_dict())
    wrong_names = Hyperflux(nn.Sequential(nn.Linear(8, 16)), 0.6, pruning_epochs=4, regrowth_epochs=3)
    with pytest.raises(ValueError, match="tensors"):
        wrong_names.load_state_dict(hf.state_dict())
    # the same names on tensors of other shapes: refused here, not at the next step() inside a kernel
    wider = Hyperflux(
        nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)), 0.6, pruning_epochs=4, regrowth_epochs=3
    )
    with pytest.raises(ValueError, match=r"snapshot for 0\.weight has shape \(16, 8\), the tensor \(32, 8\)"):
        wider.load_state_dict(hf.state_dict())
    # a state from exact mode's regrowth carries the regrowth gain: another one is refused
    regrowing = Hyperflux(mlp(), 0.6, pruning_epochs=1, regrowth_epochs=3)
    regrowing.step()
    with pytest.raises(ValueError, match=r"regrowth runs at delta 0\.0999+\d*, this sparsifier's at 0\.05"):
        Hyperflux(mlp(), 0.6, pruning_epochs=1, regrowth_epochs=3, regrowth_delta=0.05).load_state_dict(
            regrowing.state_dict()
        )
    partial = {k: v for k, v in hf.state_dict().items() if k != "snapshot"}
    with pytest.raises(ValueError, match="lacks snapshot"):
        Hyperflux(mlp(), 0.6, pruning_epochs=4, regrowth_epochs=3).load_state_dict(partial)


def test_a_resumed_run_keeps_its_own_pressure_scales_and_the_saved_release_of_a_floor():
    _, hf, _ = make_run()
    saved = hf.state_dict()
    scaled = Hyperflux(
        mlp(), 0.6, pruning_epochs=4, regrowth_epochs=3, overrides={"0": {"pressure_scale": 0.0}}
    )
    scaled.load_state_dict(saved)
    assert scaled.layer_scales == [0.0, 1.0]
    floored = Hyperflux(
        mlp(), 0.6, pruning_epochs=4, regrowth_epochs=3, overrides={"2": {"min_density": 0.5}}
    )
    floored.load_state_dict({**saved, "layer_scales": [1.0, 0.0]})  # the second layer was held at its floor
    assert floored.layer_scales == [1.0, 0.0]


def test_squash_bakes_zeros_keeps_original_keys_and_outputs():
    model = mlp()
    dense_keys = list(model.state_dict())
    hf = Hyperflux(model, 0.5, pruning_epochs=3)
    first, second = (g.logits.detach().clone() for g in hf.gates)
    first.view(-1)[::3] = -1.0
    set_logits(hf, [first, second])
    x = torch.randn(5, 8)
    with torch.no_grad():
        masked_out = model(x)
    squashed = hf.squash()
    assert squashed is model
    assert list(model.state_dict()) == dense_keys
    assert not hasattr(model[0], "parametrizations")
    assert int((model[0].weight == 0).sum()) >= 128 // 3
    assert torch.equal(model(x), masked_out)
    fresh = mlp(5)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), masked_out)
    with pytest.raises(RuntimeError, match="squashed"):
        hf.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_get_float32_logits_that_move_by_the_mask_lr(dtype):
    """In bf16 a logit of 0.2-0.5 moves in steps of 2**-9: Adam's first step of 1e-3 would round to 0 or to
    twice its size. The logits are float32 whatever the weights are."""
    model = mlp().to(dtype)
    hf = Hyperflux(model, 0.5, pruning_epochs=3, mask_lr=1e-3)
    assert all(g.logits.dtype is torch.float32 for g in hf.gates)
    # the masks' group alone, whose first step is +-lr exactly with this eps (in float16 it would be 0)
    optimizer = torch.optim.Adam(hf.param_groups()[1:], eps=1e-12)
    hf.attach(optimizer)
    before = [g.logits.detach().clone() for g in hf.gates]
    loss = F.cross_entropy(model(torch.randn(32, 8, dtype=dtype)).float(), torch.randint(0, 4, (32,)))
    loss.backward()
    assert all(g.logits.grad.dtype is torch.float32 for g in hf.gates)
    optimizer.step()
    for gate, old in zip(hf.gates, before, strict=True):
        torch.testing.assert_close((gate.logits - old).abs(), torch.full_like(old, 1e-3), atol=1e-6, rtol=0)
    state = hf.state_dict()
    other_model = mlp(1).to(dtype)
    other = Hyperflux(other_model, 0.5, pruning_epochs=3)
    other_model.load_state_dict(model.state_dict())
    other.load_state_dict(state)
    x = torch.randn(5, 8, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(other_model(x), model(x))
        masked = model(x)
    squashed = hf.squash()
    assert squashed[0].weight.dtype is dtype
    assert torch.equal(squashed(x), masked)


@pytest.mark.parametrize("kdim", [None, 4], ids=["packed", "separate"])
def test_attention_input_projections_are_masked_trained_and_squashed(kdim):
    """nn.MultiheadAttention reads its input projections as attributes at every call, so their gates reach its
    forward pass; with one projection per input, one module holds three parametrizations."""
    model = Attending(kdim)
    dense = copy.deepcopy(model)
    dense_keys = list(model.state_dict())
    hf = Hyperflux(model, 0.5, pruning_epochs=3, modules=(nn.MultiheadAttention,))
    names = [t.param_name for t in hf.targets]
    for gate in hf.gates:
        with torch.no_grad():
            gate.logits.view(-1)[::2] = -1.0
    with torch.no_grad():
        for name, gate in zip(names, hf.gates, strict=True):
            getattr(dense.attn, name).mul_(gate.mask())
    x = torch.randn(3, 5, 8)
    out = model(x)
    assert torch.equal(out, dense(x))
    out.square().sum().backward()
    assert all(gate.logits.grad is not None and gate.logits.grad.abs().sum() > 0 for gate in hf.gates)
    twin = copy.deepcopy(model)  # an EMA copy, say
    hf.squash()
    assert list(model.state_dict()) == dense_keys
    assert torch.equal(model(x), dense(x))
    assert torch.equal(twin(x), dense(x))
    # the squashed model's plain checkpoint loads into a prepared model
    prepared = Attending(kdim)
    Hyperflux(prepared, 0.5, pruning_epochs=3, modules=(nn.MultiheadAttention,))
    prepared.load_state_dict(model.state_dict())
    for name in names:
        assert torch.equal(getattr(prepared.attn.parametrizations, name).original, getattr(model.attn, name))


def test_dense_checkpoint_loads_into_a_prepared_model_and_keeps_its_masks():
    source = mlp(7)
    dense_state = source.state_dict()
    model = mlp(0)
    hf = Hyperflux(model, 0.5, pruning_epochs=3)
    first, second = (g.logits.detach().clone() for g in hf.gates)
    first.view(-1)[:20] = -1.0
    set_logits(hf, [first, second])
    model.load_state_dict(dense_state)  # strict: plain keys map onto the parametrized ones
    assert torch.equal(model[0].parametrizations.weight.original, dense_state["0.weight"])
    assert int(hf.gates[0].mask().sum()) == 128 - 20
    x = torch.randn(3, 8)
    expected = F.linear(
        F.relu(F.linear(x, dense_state["0.weight"] * hf.gates[0].mask(), dense_state["0.bias"])),
        dense_state["2.weight"],
        dense_state["2.bias"],
    )
    assert torch.allclose(model(x), expected, atol=1e-6)
    # and a prepared checkpoint still round-trips with its logits
    prepared_state = copy.deepcopy(model.state_dict())
    other = mlp(1)
    Hyperflux(other, 0.5, pruning_epochs=3).model.load_state_dict(prepared_state)
    assert torch.equal(other(x), model(x))


def test_torch_compile_of_a_prepared_model_matches_eager():
    model = mlp()
    hf = Hyperflux(model, 0.5, pruning_epochs=3, flux_every=0)
    first, second = (g.logits.detach().clone() for g in hf.gates)
    first.view(-1)[::2] = -1.0
    set_logits(hf, [first, second])
    x = torch.randn(4, 8)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="inductor")
    out = compiled(x)
    out.sum().backward()
    assert torch.allclose(out, eager, atol=1e-6)
    for p, g in zip(model.parameters(), eager_grads, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_a_compiled_prepared_model_trains_without_recompiling():
    torch._dynamo.reset()
    model = mlp()
    hf = Hyperflux(model, 0.5, pruning_epochs=3)  # flux sampling on: its counter must not reach the graph
    optimizer = torch.optim.Adam(hf.param_groups(lr=1e-2, mask_lr=0.05))
    hf.attach(optimizer)
    compiled = torch.compile(model, backend="eager")
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))

    def train_step() -> None:
        loss = F.cross_entropy(compiled(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    train_step()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(10):
            train_step()


def compile_mlp(model: nn.Module, part: str) -> nn.Module:
    """The mlp compiled whole (`part` "model"), or its two Linear layers compiled inside the eager model;
    returns what to call."""
    if part == "model":
        return torch.compile(model, backend="eager")
    for layer in (model[0], model[2]):
        layer.compile(backend="eager")
    return model


@pytest.mark.parametrize("compiled_part", ["model", "layers"])
@pytest.mark.parametrize("optimizers", [1, 2])
def test_a_compiled_model_samples_the_flux_at_its_attached_steps_as_eager_does(optimizers, compiled_part):
    """Compiled code cannot count batches, so the attached step counts itself: every flux_every-th step
    takes the flux, as eager training samples every flux_every-th batch; two attached optimisers (one per
    layer) share one count. With only the layers compiled the model's own hook counts, and the gates, which
    run inside compiled code, still get the flux. A resumed run counts on from its state."""
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))

    def train(compile_: bool, steps: int, state: dict | None = None):
        torch._dynamo.reset()
        model = mlp()
        hf = Hyperflux(model, 0.5, pruning_epochs=3, flux_every=4)
        groups = hf.param_groups(lr=1e-2, mask_lr=0.05)
        if optimizers == 1:
            opts = [torch.optim.Adam(groups)]
        else:  # the weights and the first layer's logits in one, the second layer's logits in the other
            logits = groups[1]["params"]
            opts = [
                torch.optim.Adam([groups[0], {**groups[1], "params": logits[:1]}]),
                torch.optim.Adam([{**groups[1], "params": logits[1:]}]),
            ]
        hf.attach(*opts)
        if state is not None:
            model.load_state_dict(state["model"])
            hf.load_state_dict(state["hf"])
            for opt, opt_state in zip(opts, state["opts"], strict=True):
                opt.load_state_dict(opt_state)
        forward = compile_mlp(model, compiled_part) if compile_ else model
        for _ in range(steps):
            loss = F.cross_entropy(forward(x), y)
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
        return hf, {
            "model": model.state_dict(),
            "hf": hf.state_dict(),
            "opts": [o.state_dict() for o in opts],
        }

    eager, _ = train(False, 10)
    compiled, _ = train(True, 10)
    assert [g.flux_batches for g in compiled.gates] == [3, 3]  # steps 0, 4 and 8
    for want, got in zip(eager.gates, compiled.gates, strict=True):
        assert got.flux_batches == want.flux_batches
        torch.testing.assert_close(got.mean_flux(), want.mean_flux())
    _, halfway = train(True, 5)
    resumed, _ = train(True, 5, halfway)
    for want, got in zip(compiled.gates, resumed.gates, strict=True):
        assert got.flux_batches == want.flux_batches
        torch.testing.assert_close(got.mean_flux(), want.mean_flux())


def test_torch_export_of_a_prepared_and_of_a_squashed_model_matches_eager():
    model = mlp()
    hf = Hyperflux(model, 0.5, pruning_epochs=3)
    first, second = (g.logits.detach().clone() for g in hf.gates)
    first.view(-1)[::2] = -1.0
    set_logits(hf, [first, second])
    model.eval()
    x, other = torch.randn(4, 8), torch.randn(6, 8)
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module()
    assert torch.equal(exported(other), model(other))  # the masks are in the exported graph
    squashed = hf.squash()
    assert torch.equal(torch.export.export(squashed, (x,)).module()(x), squashed(x))


def test_constant_pressure_prunes_and_does_not_need_a_target():
    model = mlp()
    hf = Hyperflux(
        model,
        None,
        pruning_epochs=50,
        exact_target=False,
        scheduler=PressureScheduler.constant(5.0),
        mask_lr=0.05,
    )
    opt = torch.optim.Adam(hf.param_groups(lr=1e-2))
    hf.attach(opt)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    train(model, hf, opt, 5, data)
    assert hf.density() < 0.9
    assert hf.stats()["target_sparsity"] is None and "target -" in hf.summary()


@pytest.mark.parametrize("into_grad", [False, True])
def test_weight_decay_reaches_present_weights_only(into_grad):
    model = mlp()
    hf = Hyperflux(model, 0.5, pruning_epochs=3)
    first, second = (g.logits.detach().clone() for g in hf.gates)
    first.view(-1)[:50] = -1.0
    set_logits(hf, [first, second])
    weight = hf.masked_weights()["0.weight"]
    assert weight is model[0].parametrizations.weight.original
    before = weight.detach().clone()
    weight.grad = torch.zeros_like(weight)
    hf.decay_present_weights(0.1, into_grad=into_grad)
    present = hf.gates[0].mask()
    changed = weight.grad if into_grad else before - weight.detach()
    assert torch.allclose(changed[present], 0.1 * before[present])
    assert torch.equal(changed[~present], torch.zeros_like(changed[~present]))


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_step_clears_the_momentum_of_pruned_weights_only(kind):
    model = mlp()
    hf = Hyperflux(model, 0.5, pruning_epochs=5)
    weights = torch.optim.Adam(hf.weight_parameters(), lr=1e-3)
    if kind == "sgd":
        weights = torch.optim.SGD(hf.weight_parameters(), lr=1e-3, momentum=0.9)
    model(torch.randn(4, 8)).sum().backward()
    weights.step()
    first, second = (g.logits.detach().clone() for g in hf.gates)
    first.view(-1)[:30] = -1.0
    set_logits(hf, [first, second])
    key = "exp_avg" if kind == "adam" else "momentum_buffer"
    state = weights.state[hf.masked_weights()["0.weight"]]
    before = state[key].clone()
    hf.step(weights)  # pruned during this period: momentum kept until the next step
    assert torch.equal(state[key], before)
    hf.step(weights)
    pruned = ~hf.gates[0].mask()
    assert torch.equal(state[key][pruned], torch.zeros(30))
    assert torch.equal(state[key][~pruned], before[~pruned])
    if kind == "adam":
        assert torch.count_nonzero(state["exp_avg_sq"][pruned]) > 0  # the second moment is left alone


def test_the_exact_trim_stops_at_a_layers_floor():
    hf = Hyperflux(mlp(), 0.75, pruning_epochs=1, regrowth_epochs=1, overrides={"0": {"min_density": 0.25}})
    with torch.no_grad():
        hf.gates[0].logits.fill_(0.01)  # the trim's first choice ...
        hf.gates[1].logits.fill_(1.0)
    hf.step()
    hf.step()
    assert hf.kept() == round(0.25 * hf.total)
    assert [int(g.mask().sum()) for g in hf.gates] == [32, 16]  # ... stops at layer 0's floor (25% of 128)


def test_param_groups_give_the_logits_their_own_lr_and_no_weight_decay():
    hf = Hyperflux(mlp(), 0.5, pruning_epochs=3)
    weights, masks = hf.param_groups(lr=0.1, weight_decay=0.5, mask_lr=0.02, betas=(0.8, 0.9))
    assert (weights["lr"], weights["weight_decay"], weights["betas"]) == (0.1, 0.5, (0.8, 0.9))
    assert (masks["lr"], masks["weight_decay"]) == (0.02, 0.0)
    assert {id(p) for p in masks["params"]} == {id(p) for p in hf.mask_parameters()}
    assert not {id(p) for p in weights["params"]} & {id(p) for p in masks["params"]}


@pytest.mark.parametrize("compiled_part", ["model", "layers"])
def test_a_compiled_model_reads_the_flux_of_frozen_masks_as_eager_does(compiled_part):
    """Compiled code never thaws frozen logits for a flux batch, as the eager gate does, so the attached step
    before one does: the frozen phase of a compiled model gets the flux figures of eager training, with masks
    and logits that never move and no gradient left on them for the optimiser."""
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))

    def train(compile_: bool):
        torch._dynamo.reset()
        model = mlp()
        hf = Hyperflux(model, 0.5, pruning_epochs=1, regrowth_epochs=2, freeze_after=0, flux_every=3)
        opt = torch.optim.Adam(hf.param_groups(lr=1e-2, mask_lr=0.05))
        hf.attach(opt)
        forward = compile_mlp(model, compiled_part) if compile_ else model
        frozen = None
        for step in range(13):
            if step == 5:  # batches 0-4 pruning (0 and 3 sampled), then frozen: 6, 9 and 12 sampled
                hf.step()
                assert hf.frozen
                frozen = [m.detach().clone() for m in hf.mask_parameters()]
            loss = F.cross_entropy(forward(x), y)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            assert all(m.grad is None for m in hf.mask_parameters()) or frozen is None
        assert all(torch.equal(m, f) for m, f in zip(hf.mask_parameters(), frozen, strict=True))
        return hf

    eager, compiled = train(False), train(True)
    assert [g.flux_batches for g in compiled.gates] == [3, 3]
    for want, got in zip(eager.gates, compiled.gates, strict=True):
        torch.testing.assert_close(got.mean_flux(), want.mean_flux())


def test_loading_a_pruning_state_into_a_frozen_run_leaves_its_logits_training():
    """A frozen run's step thaws the logits for the coming flux batch; loading an earlier (pruning) state over
    it must not leave them marked for refreezing, which would stop them at the next flux batch."""
    model = mlp()
    hf = Hyperflux(model, 0.5, pruning_epochs=1, regrowth_epochs=2, freeze_after=0, flux_every=2)
    opt = torch.optim.Adam(hf.param_groups(lr=1e-2, mask_lr=0.05))
    hf.attach(opt)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))

    def train_step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    pruning = hf.state_dict(), copy.deepcopy(opt.state_dict())
    hf.step()
    train_step()
    train_step()  # frozen: batches 0 and 1; the step thaws the logits for batch 2
    assert all(m.requires_grad for m in hf.mask_parameters())
    hf.load_state_dict(pruning[0])
    opt.load_state_dict(pruning[1])  # the mask lr the freeze set to 0 back
    before = [m.detach().clone() for m in hf.mask_parameters()]
    train_step()  # batch 2, sampled: the pruning logits take their step
    assert all(m.requires_grad for m in hf.mask_parameters())
    assert all(not torch.equal(m, b) for m, b in zip(hf.mask_parameters(), before, strict=True))


@pytest.mark.parametrize("passed", ["positional", "keyword"])
def test_an_attached_step_with_a_closure_applies_the_pressure_to_the_gradients_the_closure_made(passed):
    """The closure recomputes the gradients inside `optimizer.step`, after the step's pre-hook: the pressure
    must join them there, as it joins the gradients of a plain step."""
    data = [(torch.randn(8, 8), torch.randint(0, 4, (8,))) for _ in range(3)]
    runs = []
    for closing in (False, True):
        model = mlp()
        hf = Hyperflux(model, 0.5, pruning_epochs=5, scheduler=PressureScheduler.constant(50.0))
        opt = torch.optim.SGD(hf.param_groups(lr=0.1), lr=0.1)
        hf.attach(opt)
        for x, y in data:

            def closure(x=x, y=y, model=model, opt=opt):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            if not closing:
                closure()
                opt.step()
            elif passed == "positional":
                opt.step(closure)
            else:
                opt.step(closure=closure)
        runs.append((hf, [g.logits.detach().clone() for g in hf.gates]))
    (plain, expected), (closed, logits) = runs
    moved = [(a - b).abs().max() for a, b in zip(expected, [g.logits for g in mlp_gates()], strict=True)]
    assert all(m > 5e-4 for m in moved)  # the pressure moved every logit: 3 steps of mask lr * P / N
    for got, want in zip(logits, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert closed.meter.batches == plain.meter.batches == 3


def mlp_gates():
    """The gates of a freshly prepared `mlp()`, at their initial logits."""
    return Hyperflux(mlp(), 0.5, pruning_epochs=5).gates


def test_step_refuses_what_is_not_an_optimizer_and_checks_the_loss_forms_groups():
    model = mlp()
    hf = Hyperflux(model, 0.5, pruning_epochs=2, regrowth_epochs=1)
    with pytest.raises(TypeError, match=r"hf\.step\(\) takes the optimisers .* got a float"):
        hf.step(0.1)
    shared = torch.optim.AdamW(model.parameters())  # the logits decayed with the weights
    with pytest.warns(UserWarning, match="share an optimiser group with other parameters or weight decay"):
        hf.step(shared)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.pressure_loss()  # the loss form: the pressure is in the loss (see the test after the next)
        hf.step(shared)  # warned once per optimiser
        # attached, an optimiser passed to step() may hold the logits without stepping them (the transformers
        # integration leaves them in the Trainer's groups): nothing to warn of
        model = mlp()
        attached = Hyperflux(model, 0.5, pruning_epochs=2, regrowth_epochs=1)
        attached.attach(torch.optim.Adam(attached.param_groups()))
        attached.step(torch.optim.AdamW(model.parameters()))
        # and a run without regrowth has no mask lr to schedule when it freezes
        loss_form = Hyperflux(mlp(), 0.5, pruning_epochs=2)
        for _ in range(2):
            loss_form.pressure_loss()
            loss_form.step()
        assert loss_form.frozen


def test_step_warns_once_past_the_end_and_of_a_mask_lr_schedule_it_cannot_apply():
    hf = Hyperflux(mlp(), 0.5, pruning_epochs=1, regrowth_epochs=4)
    with pytest.warns(UserWarning, match="no optimiser is attached or passed to hf.step"):
        hf.step()
    for _ in range(4):
        hf.step()
    with pytest.warns(UserWarning, match=r"past the end of the schedule \(5 periods\)"):
        hf.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.step()
    assert hf.phase == "done"


def test_the_state_holds_the_flux_sum_itself_and_none_for_a_period_without_flux():
    """A checkpoint taken right after `step()` (the trainer's) carries no model-sized zeros, and one taken
    mid-period restores the sum exactly, not as a mean times its count."""
    model = mlp()
    hf = Hyperflux(model, 0.5, pruning_epochs=3, flux_every=1)
    opt = torch.optim.Adam(hf.param_groups(lr=1e-3))
    hf.attach(opt)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 8)), torch.randint(0, 4, (8,))).backward()
        opt.step()
    state = hf.state_dict()
    assert [b for b in state["flux_batches"]] == [3, 3]
    assert all(torch.equal(saved, g.flux_sum) for saved, g in zip(state["flux_sum"], hf.gates, strict=True))
    other = Hyperflux(mlp(1), 0.5, pruning_epochs=3, flux_every=1)
    other.load_state_dict(state)
    assert all(torch.equal(a.flux_sum, b.flux_sum) for a, b in zip(other.gates, hf.gates, strict=True))
    hf.step()
    after = hf.state_dict()
    assert after["flux_sum"] == [None, None]
    other.load_state_dict(after)
    assert all(g.flux_sum is None and g.flux_batches == 0 for g in other.gates)


def test_step_refuses_non_finite_logits_or_weights_naming_the_layer():
    """One NaN loss turns every logit it reaches NaN, which reads as a closed gate: the period would report
    density 0 and the trim would rank the NaNs."""
    model = mlp()
    hf = Hyperflux(model, 0.5, pruning_epochs=3)
    opt = torch.optim.Adam(hf.param_groups(lr=1e-3))
    hf.attach(opt)
    opt.zero_grad()
    (model(torch.randn(4, 8)).sum() * float("nan")).backward()
    opt.step()
    with pytest.raises(FloatingPointError, match=r"0\.weight \(mask logits\), 0\.weight \(weights\)"):
        hf.step()
    clean = Hyperflux(mlp(), 0.5, pruning_epochs=3)
    with torch.no_grad():
        clean.masked_weights()["2.weight"][0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"in 2\.weight \(weights\): a non-finite loss"):
        clean.step()


def test_a_target_that_keeps_no_weight_is_refused_and_a_trim_that_empties_a_layer_warns():
    with pytest.raises(ValueError, match="keeps no weight of the 192 selected"):
        Hyperflux(mlp(), 0.999, pruning_epochs=2)
    hf = Hyperflux(mlp(), 0.99, pruning_epochs=1, regrowth_epochs=1)  # keeps 2 of 192
    with torch.no_grad():
        hf.gates[0].logits.fill_(1.0)
        hf.gates[1].logits.fill_(0.5)  # the trim closes this layer first
    with pytest.warns(UserWarning, match=r"the exact trim left 2\.weight with no weight"):
        hf.step()  # regrowth of one period: frozen and trimmed at once
    assert hf.frozen and [int(g.mask().sum()) for g in hf.gates] == [2, 0]


def test_a_period_whose_pressure_reached_no_logit_warns_once():
    """Without attach() or pressure_loss() in the loss the method prunes nothing itself, and exact-target mode's
    trim at the freeze would prune everything at once, looking like success."""
    model = mlp()
    hf = Hyperflux(model, 0.5, pruning_epochs=4)
    opt = torch.optim.Adam(hf.param_groups(lr=1e-3))

    def train_one_step(with_pressure: bool) -> None:
        opt.zero_grad()
        loss = F.cross_entropy(model(torch.randn(8, 8)), torch.randint(0, 4, (8,)))
        (loss + hf.pressure_loss() if with_pressure else loss).backward()
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_one_step(False)
        hf.step(opt)  # P = 0 in the first period: nothing to reach the logits
        hf.scheduler.gamma = 1.0  # the controller raised the pressure (the density is far above the target)
        train_one_step(True)
        hf.step(opt)  # in the loss: applied
        hf.scheduler.gamma = 1.0
    train_one_step(False)
    with pytest.warns(UserWarning, match=r"pressure of this period \(P = 1\) reached no mask logit"):
        hf.step(opt)
    hf.scheduler.gamma = 1.0
    train_one_step(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.step(opt)  # once
    attached = Hyperflux(mlp(), 0.5, pruning_epochs=4)
    attached.attach(torch.optim.Adam(attached.param_groups(lr=1e-3)))
    attached.scheduler.gamma = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attached.step()
