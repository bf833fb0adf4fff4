"""Every selection rule and every error it promises."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperflux import Hyperflux, PressureScheduler
from pruned_models import Attending


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv1d(4, 4, 1))
        self.embed = nn.Embedding(10, 4)
        self.fc1 = nn.Linear(8, 6)
        self.head = nn.Linear(6, 2)


def names_of(hf):
    return [t.name for t in hf.targets]


def test_default_selects_linear_and_conv_weights_only():
    hf = Hyperflux(Net(), 0.9, pruning_epochs=2)
    assert names_of(hf) == ["features.0.weight", "features.3.weight", "fc1.weight", "head.weight"]
    assert hf.total == 4 * 3 * 9 + 4 * 4 + 8 * 6 + 6 * 2


def test_module_types_opt_in_an_embedding():
    hf = Hyperflux(Net(), 0.9, pruning_epochs=2, modules=(nn.Embedding,))
    assert names_of(hf) == ["embed.weight"]


def test_names_accept_exact_tensor_and_module_names_and_regexes():
    assert names_of(Hyperflux(Net(), 0.9, pruning_epochs=2, names=["fc1.weight"])) == ["fc1.weight"]
    assert names_of(Hyperflux(Net(), 0.9, pruning_epochs=2, names="head")) == ["head.weight"]
    assert names_of(Hyperflux(Net(), 0.9, pruning_epochs=2, names=[r"features\..*"])) == [
        "features.0.weight",
        "features.3.weight",
    ]


def test_ignore_list_and_model_default_ignore():
    assert names_of(Hyperflux(Net(), 0.9, pruning_epochs=2, ignore=["head", r"features\.0"])) == [
        "features.3.weight",
        "fc1.weight",
    ]
    net = Net()
    net.hyperflux_ignore = ("head",)
    assert "head.weight" not in names_of(Hyperflux(net, 0.9, pruning_epochs=2))
    net = Net()
    net.hyperflux_ignore = ("head",)
    assert "head.weight" in names_of(Hyperflux(net, 0.9, pruning_epochs=2, ignore=[]))  # explicit overrides


def test_a_submodules_own_ignore_holds_inside_a_wrapper():
    """A ViT's patch embedding and head stay dense when the ViT is a wrapper's submodule (a LightningModule's
    `self.model`, DataParallel's `module`), its patterns read relative to it."""
    from hyperflux.models.vit import VisionTransformer

    def vit() -> VisionTransformer:
        return VisionTransformer(4, 3, 8, dim=16, num_heads=2, patch_size=4, depth=1)

    alone = names_of(Hyperflux(vit(), 0.9, pruning_epochs=2))
    assert alone and not any(name.startswith(("patch_embed", "head")) for name in alone)
    wrapper = nn.Module()
    wrapper.model = vit()
    wrapper.head = nn.Linear(4, 2)  # the wrapper's own head: the ViT's patterns do not reach it
    assert names_of(Hyperflux(wrapper, 0.9, pruning_epochs=2)) == [f"model.{name}" for name in alone] + [
        "head.weight"
    ]


def test_overrides_and_minimum_density():
    hf = Hyperflux(
        Net(),
        0.5,
        pruning_epochs=2,
        min_density=0.05,
        overrides={"head": {"min_density": 0.3, "pressure_scale": 2.0}},
    )
    by_name = {t.name: t for t in hf.targets}
    assert by_name["head.weight"].min_density == 0.3 and by_name["head.weight"].pressure_scale == 2.0
    assert by_name["fc1.weight"].min_density == 0.05 and by_name["fc1.weight"].pressure_scale == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": ["nope"]}, "names pattern 'nope' matches no prunable tensor"),
        ({"ignore": ["nope"]}, "ignore pattern 'nope' matches no prunable tensor"),
        ({"names": ["("]}, "not a valid regular expression"),
        ({"overrides": {"nope": {"min_density": 0.1}}}, "overrides pattern 'nope'"),
        ({"overrides": {"fc1": {"sparsity": 0.1}}}, "unknown key"),
        ({"overrides": {"fc1": {"min_density": 1.5}}}, r"min_density must be in \[0.0, 1.0\]"),
        ({"overrides": {"fc1": {"pressure_scale": -1}}}, "pressure_scale must be finite"),
        ({"min_density": -0.1}, "min_density"),
        ({"ignore": [".*"]}, "nothing to prune in Net"),
        ({"min_density": 0.6}, "minimum densities keep"),
        ({"overrides": {"fc1": 0.5}}, r"overrides\['fc1'\] must map setting names to values"),
        ({"modules": nn.Linear}, "modules must be a non-empty sequence"),
        ({"grad_scale": float("nan")}, "grad_scale must be a finite number > 0"),
        ({"init_logit": float("inf")}, "init_logit must be a finite number > 0"),
        ({"mask_lr": float("nan")}, "mask_lr must be a finite number >= 0"),
        ({"regrowth_mask_lr": -1e-3}, "regrowth_mask_lr must be a finite number >= 0"),
        ({"regrowth_delta": -1.0}, "regrowth_delta must be a finite number > 0"),
        ({"regrowth_decay": 1.5}, r"regrowth_decay must be in \(0, 1\]"),
        ({"delta": float("nan")}, "delta must be a finite number > 0"),
        ({"aggressivity": float("inf")}, "aggressivity must be a finite number > 0"),
        ({"freeze_after": 1.5}, "freeze_after must be an integer >= 0"),
        ({"flux_every": 2.5}, "flux_every must be an integer >= 0"),
    ],
)
def test_selection_errors_say_what_and_where(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Hyperflux(Net(), 0.5, pruning_epochs=2, **kwargs)


@pytest.mark.parametrize("target", [0.0, 1.0, -0.2, 98.0])
def test_target_outside_open_unit_interval(target):
    with pytest.raises(ValueError, match="target_sparsity must be a fraction"):
        Hyperflux(Net(), target, pruning_epochs=2)


def test_nothing_to_prune():
    with pytest.raises(ValueError, match="nothing to prune in Sequential"):
        Hyperflux(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), 0.9, pruning_epochs=2)


def test_non_float_weight():
    layer = nn.Linear(3, 3)
    layer.weight = nn.Parameter(torch.ones(3, 3, dtype=torch.int64), requires_grad=False)
    with pytest.raises(ValueError, match=r"weight has dtype torch.int64"):
        Hyperflux(nn.Sequential(layer), 0.9, pruning_epochs=2)


def test_tied_weights_and_double_preparation():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    with pytest.raises(ValueError, match="tied weights"):
        Hyperflux(nn.Sequential(a, b), 0.9, pruning_epochs=2)
    with pytest.raises(ValueError, match="tied weights"):  # ignoring one leaves the other shared
        Hyperflux(nn.Sequential(a, b), 0.9, pruning_epochs=2, ignore=["1"])
    # a language model's head tied to its embedding, which is not a masked module type
    embedding, body, head = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    lm = nn.Sequential(embedding, body, head)
    with pytest.raises(ValueError, match=r"2\.weight is the same tensor as 0\.weight \(tied weights\)"):
        Hyperflux(lm, 0.5, pruning_epochs=2)
    assert [t.name for t in Hyperflux(lm, 0.5, pruning_epochs=2, ignore=["2"]).targets] == ["1.weight"]
    # one layer applied twice is not tied to another: its one mask serves both uses
    twice = nn.Linear(4, 4)
    reused = nn.Sequential(twice, nn.ReLU(), twice)
    hf = Hyperflux(reused, 0.5, pruning_epochs=2)
    assert names_of(hf) == ["0.weight"] and hf.total == 16
    hf.gates[0].logits.data[0] = -1.0
    x = torch.randn(3, 4)
    masked = twice.parametrizations.weight.original.detach() * (hf.gates[0].logits.detach() >= 0)
    torch.testing.assert_close(
        reused(x), F.linear(F.relu(F.linear(x, masked, twice.bias)), masked, twice.bias)
    )
    model = nn.Sequential(nn.Linear(4, 4))
    Hyperflux(model, 0.9, pruning_epochs=2)
    with pytest.raises(ValueError, match="already has a hyperflux mask"):
        Hyperflux(model, 0.9, pruning_epochs=2)


def test_weights_under_another_parametrization_or_not_yet_initialised_are_refused_with_the_way_out():
    normed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    torch.nn.utils.parametrizations.weight_norm(normed[0])
    with pytest.raises(
        ValueError, match=r"0\.weight is already parametrized \(_WeightNorm\).*remove_parametrizations"
    ):
        Hyperflux(normed, 0.5, pruning_epochs=2)
    assert names_of(Hyperflux(normed, 0.5, pruning_epochs=2, ignore="0")) == ["1.weight"]
    with pytest.raises(ValueError, match=r"0\.weight is not initialised yet \(a lazy module\)"):
        Hyperflux(nn.Sequential(nn.LazyLinear(4)), 0.5, pruning_epochs=2)


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")
def test_hook_computed_weights_and_sparse_embeddings_are_refused_before_any_layer_is_masked():
    hooked = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    torch.nn.utils.weight_norm(hooked[1])  # the old, hook-based weight norm: `weight` is a plain tensor
    with pytest.raises(
        ValueError, match=r"1\.weight is not a parameter but a tensor a hook computes.*remove_weight_norm"
    ):
        Hyperflux(hooked, 0.5, pruning_epochs=2)
    assert not torch.nn.utils.parametrize.is_parametrized(hooked[0])  # refused before the first was masked
    assert names_of(Hyperflux(hooked, 0.5, pruning_epochs=2, ignore="1")) == ["0.weight"]
    frozen = nn.Linear(4, 4)
    weight = frozen.weight.detach()
    del frozen.weight
    frozen.register_buffer("weight", weight)  # a weight kept as a buffer is masked as before
    assert names_of(Hyperflux(nn.Sequential(frozen, nn.Linear(4, 2)), 0.5, pruning_epochs=2)) == [
        "0.weight",
        "1.weight",
    ]
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"0\.weight belongs to an embedding with sparse=True"):
        Hyperflux(model, 0.5, pruning_epochs=2, modules=[nn.Embedding, nn.Linear])


def test_bad_epochs_and_modes():
    with pytest.raises(ValueError, match="pruning_epochs"):
        Hyperflux(nn.Linear(3, 3), 0.9, pruning_epochs=0)
    for bad in (-1, None, 1.5):
        with pytest.raises(ValueError, match="regrowth_epochs must be"):
            Hyperflux(nn.Linear(3, 3), 0.9, pruning_epochs=2, regrowth_epochs=bad)
    with pytest.raises(ValueError, match="pruning_epochs must be an integer >= 1"):
        Hyperflux(nn.Linear(3, 3), 0.9, pruning_epochs=float("inf"))
    with pytest.raises(ValueError, match="target_sparsity is required"):
        Hyperflux(nn.Linear(3, 3), None, pruning_epochs=2)
    with pytest.raises(ValueError, match=r"expected a torch\.nn\.Module"):
        Hyperflux("model", 0.9, pruning_epochs=2)
    # a trajectory for another target, or longer than pruning: the controller and the trim would disagree
    for other in (PressureScheduler(0.5, 2), PressureScheduler(0.9, 3)):
        with pytest.raises(ValueError, match="give both the same target"):
            Hyperflux(nn.Linear(3, 3), 0.9, pruning_epochs=2, scheduler=other)
    shorter = PressureScheduler(0.9, 4)  # reaches the target within the first 4 of 6 periods, then holds it
    assert Hyperflux(nn.Linear(3, 3), 0.9, pruning_epochs=6, scheduler=shorter).scheduler is shorter


def test_a_floor_is_min_density_of_the_layer_without_float_noise():
    # 0.07 * 100 is 7.000000000000001 in floats: the floor is 7 weights, so a 93% target with 7% floors fits
    model = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
    hf = Hyperflux(model, 0.93, pruning_epochs=2, min_density=0.07)
    assert [t.floor for t in hf.targets] == [7, 7]


def test_closing_a_period_with_floors_does_not_run_the_gates():
    """`step()` checks each layer's floor by counting its weights, not by computing the masked weight (whose
    gate, right after a flux batch, would lend frozen logits a gradient)."""
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    hf = Hyperflux(model, 0.5, pruning_epochs=1, regrowth_epochs=2, min_density=0.05, freeze_after=0)
    calls = []
    for gate in hf.gates:
        gate.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 10))
    assert len(calls) == 2
    hf.step(), hf.step()
    assert len(calls) == 2 and [t.floor for t in hf.targets] == [8, 3]


def test_attention_opts_in_its_input_projections():
    packed = Hyperflux(Attending(), 0.9, pruning_epochs=2, modules=(nn.Linear, nn.MultiheadAttention))
    assert names_of(packed) == ["attn.in_proj_weight", "attn.out_proj.weight", "context.weight"]
    separate = Hyperflux(Attending(kdim=4), 0.9, pruning_epochs=2, modules=(nn.MultiheadAttention,))
    assert names_of(separate) == ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"]
    named = Hyperflux(
        Attending(), 0.9, pruning_epochs=2, modules=(nn.MultiheadAttention,), names=r".*in_proj.*"
    )
    assert names_of(named) == ["attn.in_proj_weight"]
    # the default leaves attention's input projections alone: its output projection is a Linear
    assert names_of(Hyperflux(Attending(), 0.9, pruning_epochs=2)) == [
        "attn.out_proj.weight",
        "context.weight",
    ]


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_are_refused_for_their_masks_would_not_reach_them(kind):

    def model():
        return nn.Sequential(kind(4, 4), nn.Linear(4, 2))

    with pytest.raises(ValueError, match=rf"{kind.__name__} layers cannot be masked.*_flat_weights"):
        Hyperflux(model(), 0.5, pruning_epochs=2, modules=(kind, nn.Linear))
    assert names_of(Hyperflux(model(), 0.5, pruning_epochs=2)) == ["1.weight"]
    assert names_of(Hyperflux(model(), 0.5, pruning_epochs=2, modules=(kind, nn.Linear), ignore="0")) == [
        "1.weight"
    ]


@pytest.mark.parametrize("kind", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_recurrent_cells_opt_in_and_their_masks_reach_the_cell(kind):
    """A cell reads its weights at every call, so, unlike nn.LSTM, its masks reach the forward pass."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"cell": kind(4, 6), "head": nn.Linear(6, 2)})

    def run(x):
        out = model["cell"](x)
        return model["head"](out[0] if isinstance(out, tuple) else out)

    hf = Hyperflux(model, 0.5, pruning_epochs=2, modules=(nn.Linear, kind))
    assert names_of(hf) == ["cell.weight_ih", "cell.weight_hh", "head.weight"]
    gate = model["cell"].parametrizations.weight_ih[0]
    with torch.no_grad():
        gate.logits[:, :2] = -1.0  # close the gates of the first two inputs
    x = torch.randn(3, 4)
    y = run(x)
    assert torch.allclose(y, run(x * torch.tensor([0.0, 0.0, 1.0, 1.0])))  # they no longer count
    y.sum().backward()
    assert gate.logits.grad is not None and gate.logits.grad.abs().sum() > 0
    squashed = hf.squash()
    assert set(squashed.state_dict()) == {
        "cell.weight_ih",
        "cell.weight_hh",
        "cell.bias_ih",
        "cell.bias_hh",
        "head.weight",
        "head.bias",
    }
    assert torch.equal(run(x), y)


def test_a_module_type_with_nothing_to_mask_is_refused_with_its_parameters():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            return x @ self.W

    model = nn.Sequential(Scaled(), nn.Linear(3, 2))
    with pytest.raises(
        ValueError, match=r"no Scaled layer has a tensor hyperflux can mask \(0's own parameters: W\)"
    ):
        Hyperflux(model, 0.5, pruning_epochs=2, modules=(nn.Linear, Scaled))
    with pytest.raises(ValueError, match=r"no LayerNorm layer .*parameters: none"):
        Hyperflux(
            nn.Sequential(nn.LayerNorm(3, elementwise_affine=False), nn.Linear(3, 2)),
            0.5,
            pruning_epochs=2,
            modules=(nn.Linear, nn.LayerNorm),
        )
    assert names_of(Hyperflux(model, 0.5, pruning_epochs=2)) == ["1.weight"]


def test_layers_of_unselected_types_larger_than_the_masked_ones_warn_and_the_summary_says_the_share():
    """By default an embedding and a recurrent layer stay dense: a text model's reported 90% sparsity would
    be that of its small head alone. Layers chosen by type or by name are the user's choice: no warning."""

    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(1000, 32)
            self.rnn = nn.GRU(32, 32, batch_first=True)
            self.head = nn.Linear(32, 2)

    with pytest.warns(
        UserWarning,
        match=r"masks 64 weights, and layers .* hold 38,144 more, dense \(largest: embed\.weight "
        r"\(Embedding, 32,000\)",
    ):
        hf = Hyperflux(Text(), 0.9, pruning_epochs=2)
    assert "masked: 64 of the model's 38,402 parameters (0.2%)" in hf.summary()
    mlp = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opted = Hyperflux(Text(), 0.9, pruning_epochs=20, modules=(nn.Linear, nn.Embedding))
        Hyperflux(mlp, 0.9, pruning_epochs=20, names=["4"])
        Hyperflux(Text(), 0.9, pruning_epochs=20, names=["head"])
    assert "(83.5%)" in opted.summary()


def test_a_model_with_a_lazy_layer_it_does_not_mask_is_prepared():
    model = nn.Sequential(nn.Linear(4, 8), nn.LazyBatchNorm1d(), nn.Linear(8, 2))
    hf = Hyperflux(model, 0.5, pruning_epochs=2)
    assert names_of(hf) == ["0.weight", "2.weight"] and hf.model_numel == 32 + 8 + 16 + 2
