"""Sparse inference: converted layers and models give the dense outputs; the plan converts only what it should."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hyperflux
from hyperflux import models
from hyperflux.sparse_inference import (
    MIN_GAIN,
    LayerChoice,
    SparseConv2d,
    SparseLinear,
    plan_sparse_inference,
    to_sparse_inference,
)
from pruned_models import random_prune as prune

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("min_batch", [1, 4])
def test_sparse_linear_equals_dense_for_every_input_shape(bias, min_batch):
    torch.manual_seed(0)
    linear = prune(nn.Linear(8192, 24, bias=bias), 0.95)  # 8192 inputs: batches run in blocks of 32
    sparse = SparseLinear(linear, min_batch)
    with torch.no_grad():
        for shape in [(8192,), (1, 8192), (3, 8192), (100, 8192), (2, 5, 8192), (0, 8192)]:
            x = torch.randn(shape)
            out = sparse(x)
            assert out.shape == linear(x).shape
            close(out, linear(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_chain_of_sparse_layers_passes_the_transposed_layout_on(dtype):
    torch.manual_seed(0)
    # 4096 inputs run in blocks of 64 columns: blocks of a row-major input, then of a transposed one
    dense = nn.Sequential(
        nn.Linear(4096, 64), nn.ReLU(), nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 10)
    ).to(dtype)
    for layer in dense[::2]:
        prune(layer, 0.9)
    sparse = nn.Sequential(*(SparseLinear(m) if isinstance(m, nn.Linear) else m for m in dense))
    seen = []
    for layer in sparse[2::2]:
        layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].t().is_contiguous()))
    with torch.no_grad():
        for x in (torch.randn(100, 4096, dtype=dtype), torch.randn(4096, 100, dtype=dtype).t()):
            torch.testing.assert_close(sparse(x), dense(x), atol=ATOL, rtol=1e-6)
    assert seen == [True] * 4  # every later layer got the transposed layout it computes in


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"stride": 2, "padding": 1},
        {"padding": (2, 1), "dilation": 2, "bias": False},
        {"kernel_size": (1, 3), "stride": (1, 2)},
    ],
)
def test_sparse_conv_equals_dense(options):
    torch.manual_seed(0)
    conv = prune(nn.Conv2d(6, 10, **({"kernel_size": 3} | options)), 0.9)
    sparse = SparseConv2d(conv)
    with torch.no_grad():
        for x in (torch.randn(3, 6, 11, 9), torch.randn(1, 6, 7, 7), torch.randn(6, 8, 8)):
            close(sparse(x), conv(x))


def test_a_conv_without_a_sparse_form_is_refused_and_left_dense():
    grouped = prune(nn.Conv2d(4, 4, 3, groups=2), 0.95)
    with pytest.raises(ValueError):
        SparseConv2d(grouped)
    (choice,) = plan_sparse_inference(nn.Sequential(grouped), torch.randn(2, 4, 6, 6))
    assert not choice.sparse and "no sparse form" in choice.reason


def every_layer_sparse(model: nn.Module) -> list[LayerChoice]:
    plan = plan_sparse_inference(model, max_density=1.0)  # modelled; then force every layer
    for choice in plan:
        choice.sparse = True
    return plan


@pytest.mark.parametrize(
    ("name", "size", "channels"), [("lenet300", 28, 1), ("lenet5", 28, 1), ("resnet18", 16, 3)]
)
def test_a_fully_converted_model_gives_the_dense_outputs(name, size, channels):
    torch.manual_seed(0)
    kwargs = {"width": 0.125} if name == "resnet18" else {}
    model = prune(models.build(name, num_classes=10, in_channels=channels, image_size=size, **kwargs), 0.9)
    fast = to_sparse_inference(model, plan=every_layer_sparse(model))
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in fast.modules())
    assert any(type(m) is nn.Linear for m in model.modules())  # inplace=False left the model alone
    with torch.no_grad():
        for batch in (1, 5):
            x = torch.randn(batch, channels, size, size)
            close(fast(x), model(x))


def test_the_measured_plan_converts_only_faster_layers():
    model = prune(models.build("lenet300", num_classes=10, in_channels=1, image_size=28), 0.98)
    example = torch.randn(64, 1, 28, 28)
    plan = plan_sparse_inference(model, example, repeats=3)
    assert [choice.name for choice in plan] == ["fc1", "fc2", "fc3"]
    for choice in plan:
        assert choice.timings and choice.reason.startswith("measured")
        if choice.sparse:
            dense_ms, sparse_ms = choice.timings[choice.min_batch if choice.min_batch > 1 else 64]
            assert sparse_ms < (1 - MIN_GAIN) * dense_ms
            if choice.min_batch == 1:
                assert choice.timings[1][1] < (1 - MIN_GAIN) * choice.timings[1][0]
        else:  # kept dense: not 5% faster sparse at some measured batch
            assert any(s >= (1 - MIN_GAIN) * d for d, s in choice.timings.values())
    fast = hyperflux.to_sparse_inference(model, plan=plan)
    with torch.no_grad():
        for x in (example, example[:1]):
            close(fast(x), model(x))


def test_the_modelled_plan_and_max_density():
    model = prune(models.build("lenet5", num_classes=10, in_channels=1, image_size=28), 0.98)
    plan = {choice.name: choice for choice in plan_sparse_inference(model)}
    assert plan["fc1"].sparse  # 500x800 at 2%
    assert not plan["fc2"].sparse and not plan["conv1"].sparse and not plan["conv2"].sparse
    dense = prune(models.build("lenet5", num_classes=10, in_channels=1, image_size=28), 0.5)
    plan = plan_sparse_inference(dense, torch.randn(2, 1, 28, 28), max_density=0.3)
    assert all(not c.sparse and "above max_density" in c.reason and not c.timings for c in plan)


def test_a_bare_linear_becomes_a_sparse_linear():
    linear = prune(nn.Linear(1024, 512), 0.99)
    fast = to_sparse_inference(linear)
    assert isinstance(fast, SparseLinear) and isinstance(linear, nn.Linear)
    x = torch.randn(64, 1024)
    with torch.no_grad():
        close(fast(x), linear(x))


def test_a_model_with_its_masks_is_refused():
    model = models.build("lenet300", num_classes=10, in_channels=1, image_size=8, hidden=(16, 8))
    hf = hyperflux.Hyperflux(model, target_sparsity=0.9, pruning_epochs=2)
    with pytest.raises(ValueError, match="squash"):
        to_sparse_inference(model)
    x = torch.randn(3, 1, 8, 8)
    squashed = hf.squash()
    with torch.no_grad():
        close(to_sparse_inference(squashed, plan=every_layer_sparse(squashed))(x), squashed(x))
