"""MAC counts: per layer and per sample, by hand on small models, for prepared, squashed and dense models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hyperflux
from hyperflux import count_macs
from pruned_models import Attending, LinearTwice


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)
    )


def test_dense_and_sparse_macs_per_sample_by_hand():
    net = small_net()
    with torch.no_grad():
        net[0].weight.view(-1)[:20] = 0  # 34 of 54 conv weights left
        net[4].weight.view(-1)[10:] = 0  # 10 of 240 linear weights left
    count = count_macs(net, torch.randn(7, 2, 4, 4))
    # each conv weight is used once per output position (4 x 4), each linear weight once per sample
    assert [(layer.name, layer.dense, layer.sparse) for layer in count.layers] == [
        ("0", 54 * 16, 34 * 16),
        ("4", 240, 10),
    ]
    assert (count.dense, count.sparse) == (54 * 16 + 240, 34 * 16 + 10)
    assert count.reduction == pytest.approx((54 * 16 + 240) / (34 * 16 + 10))
    assert count.as_dict()["sparse_macs_per_sample"] == 34 * 16 + 10
    assert count.table().splitlines()[-1].split()[:3] == ["total", f"{count.dense:,}", f"{count.sparse:,}"]


def test_a_prepared_model_counts_its_open_gates_as_its_squashed_form_does():
    net = small_net()
    hf = hyperflux.Hyperflux(net, 0.5, pruning_epochs=2)
    with torch.no_grad():
        for gate in hf.gates:
            gate.logits.copy_(torch.rand_like(gate.logits) - 0.5)
    x = torch.randn(3, 2, 4, 4)
    net.train()
    running_mean = net[1].running_mean.clone()
    prepared = count_macs(net, x)
    assert net.training  # the count runs in eval mode and gives the mode back
    assert torch.equal(net[1].running_mean, running_mean)  # and leaves batch-norm statistics alone
    conv_open = int(hf.gates[0].mask().sum())
    assert prepared.layers[0].sparse == conv_open * 16
    squashed = count_macs(hf.squash(), x)
    assert prepared == squashed


def test_positions_and_repeated_calls_are_counted():
    model = LinearTwice(4)
    with torch.no_grad():
        model.fc.weight.view(-1)[:6] = 0  # 10 of 16 weights left
    count = count_macs(model, torch.randn(2, 6, 4))  # 6 positions per sample, the layer applied twice
    assert (count.layers[0].dense, count.layers[0].sparse) == (2 * 6 * 16, 2 * 6 * 10)


@pytest.mark.parametrize("kdim", [None, 4], ids=["packed", "separate"])
def test_attention_counts_each_projection_once_per_token_of_its_input(kdim):
    model = Attending(kdim)  # 5 query tokens over 5 context tokens of size kdim (8 when packed)
    size = kdim or 8
    with torch.no_grad():
        weight = model.attn.in_proj_weight if kdim is None else model.attn.k_proj_weight
        weight.view(-1)[:7] = 0
    count = count_macs(model, torch.randn(3, 5, 8))
    layers = {layer.name: (layer.dense, layer.sparse) for layer in count.layers}
    # query and output projections 8 x 8, key and value 8 x size, each once per token
    dense = 5 * (8 * 8 + 8 * size + 8 * size + 8 * 8)
    assert layers == {"context": (5 * 8 * size, 5 * 8 * size), "attn": (dense, dense - 5 * 7)}


def test_a_transformer_layer_counts_its_attention_and_feed_forward():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    count = count_macs(layer, torch.randn(2, 5, 8))
    layers = {row.name: row.dense for row in count.layers}
    assert layers == {"self_attn": 5 * 4 * 8 * 8, "linear1": 5 * 8 * 16, "linear2": 5 * 16 * 8}


def test_bad_examples_and_models_without_counted_layers_are_errors():
    with pytest.raises(ValueError, match="at least one sample"):
        count_macs(small_net(), torch.randn(0, 2, 4, 4))
    with pytest.raises(ValueError, match="no Linear or Conv layer"):
        count_macs(nn.Sequential(nn.ReLU()), torch.randn(2, 3))
