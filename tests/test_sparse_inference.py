"""Sparse inference: converted layers and models give the dense outputs; the plan converts only what it should."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hyperflux
from hyperflux import kernels, models, sparse_inference
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


@pytest.fixture(params=["compiled", "torch"])
def kernel(request, monkeypatch):
    """Runs a test on hyperflux's compiled kernel and again on torch's CSR matmul (its fallback)."""
    if request.param == "torch":
        monkeypatch.setattr(sparse_inference, "sparse_linear_op", lambda: None)
    else:  # this machine has a compiler: the kernel must build, or the fast path goes untested
        assert kernels.sparse_linear_op() is not None
    return request.param


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("min_batch", [1, 4])
def test_sparse_linear_equals_dense_for_every_input_shape(bias, min_batch, kernel):
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
def test_a_chain_of_sparse_layers_passes_the_transposed_layout_on(dtype, kernel):
    if kernel == "compiled" and dtype is torch.float64:
        pytest.skip("the compiled kernel is float32; float64 takes torch's path")
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
def test_sparse_conv_equals_dense(options, kernel):
    torch.manual_seed(0)
    conv = prune(nn.Conv2d(6, 10, **({"kernel_size": 3} | options)), 0.9)
    sparse = SparseConv2d(conv)
    with torch.no_grad():
        # many output pixels (tiles), and one or two in all (the kernel's row-major gather path)
        inputs = [torch.randn(3, 6, 11, 9), torch.randn(1, 6, 7, 7), torch.randn(6, 8, 8)]
        for n in (1, 2):
            span = [conv.dilation[i] * (conv.kernel_size[i] - 1) + 1 - 2 * conv.padding[i] for i in (0, 1)]
            inputs.append(torch.randn(n, 6, max(span[0], 1), max(span[1], 1)))
        for x in inputs:
            close(sparse(x), conv(x))


def test_a_conv_without_a_sparse_form_is_refused_and_left_dense():
    grouped = prune(nn.Conv2d(4, 4, 3, groups=2), 0.95)
    with pytest.raises(ValueError):
        SparseConv2d(grouped)
    (choice,) = plan_sparse_inference(nn.Sequential(grouped), torch.randn(2, 4, 6, 6))
    assert not choice.sparse and "no sparse form" in choice.reason


@pytest.mark.parametrize("threads", [1, 2])
def test_the_compiled_kernel_equals_linear_on_every_tile_shape(threads):
    """Batches of 1-2 rows (gathers), 3-8, 9-16 and more (tiles of 8, 16, 32, full and short), widths that are
    not a multiple of the 8-wide transpose, empty weight rows, no bias, row-major, feature-major and other
    input layouts, and split output features when a batch has fewer tiles than threads."""
    op = kernels.sparse_linear_op()
    assert op is not None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    for out_features, in_features in [(37, 13), (300, 784), (5, 4099)]:
        # scaled as an initialised layer is, so that outputs are of order 1 and float rounding stays under ATOL
        mask = torch.rand(out_features, in_features) < 0.1
        weight = torch.randn(out_features, in_features) * mask / (0.1 * in_features) ** 0.5
        weight[out_features // 2] = 0  # a row with no weights left
        csr = sparse_inference._csr(weight)
        for bias in (torch.randn(out_features), None):
            for batch in (0, 1, 2, 3, 7, 8, 9, 16, 17, 31, 32, 33, 100):
                layouts = [
                    torch.randn(batch, in_features),  # row-major
                    torch.randn(in_features, batch).t(),  # feature-major, as a sparse layer returns
                    torch.randn(in_features, batch + 5)[:, :batch].t(),  # feature-major, rows further apart
                    torch.randn(batch, 2 * in_features)[:, ::2],  # neither: copied row-major
                ]
                for x in layouts:
                    out = op(x, csr.crow_indices(), csr.col_indices(), csr.values(), bias, in_features)
                    close(out, torch.nn.functional.linear(x, weight, bias))
                    if batch > 2:  # written feature-major, for the next sparse layer
                        assert out.t().is_contiguous()


OTHER_BUILD = """
import torch
from hyperflux import kernels, sparse_inference
op = kernels.sparse_linear_op()
assert op is not None
torch.manual_seed(0)
for out_features, in_features in [(37, 13), (300, 784)]:
    weight = torch.randn(out_features, in_features) * (torch.rand(out_features, in_features) < 0.1) / 3
    csr = sparse_inference._csr(weight)
    for batch in (1, 3, 8, 9, 17, 40):
        for x in (torch.randn(batch, in_features), torch.randn(in_features, batch).t()):
            out = op(x, csr.crow_indices(), csr.col_indices(), csr.values(), None, in_features)
            torch.testing.assert_close(out, x @ weight.t(), atol=1e-5, rtol=0)
"""


@pytest.mark.parametrize("arch", ["avx2", "generic"])
def test_the_other_builds_of_the_kernel(arch):
    """The build this CPU does not pick (8-wide tiles with AVX2; plain C++ without vector extensions), in a
    fresh process because a process holds one build of the op."""
    if arch == "avx2" and not {"avx2", "fma"} <= kernels._cpu_flags():
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "HYPERFLUX_KERNEL_ARCH": arch}
    done = subprocess.run([sys.executable, "-c", OTHER_BUILD], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_bad_kernel_arch_is_named(monkeypatch):
    monkeypatch.setenv("HYPERFLUX_KERNEL_ARCH", "sse9")
    with pytest.raises(ValueError, match="HYPERFLUX_KERNEL_ARCH"):
        kernels.load.__wrapped__()


@pytest.mark.parametrize("threads", [1, 2])
def test_the_compiled_kernel_refuses_a_wrong_width_and_takes_no_outputs(threads):
    torch.set_num_threads(threads)
    op = kernels.sparse_linear_op()
    csr = sparse_inference._csr(torch.eye(6)[:4])
    with pytest.raises(RuntimeError, match="x has 5 features, the weight 6"):
        op(torch.randn(3, 5), csr.crow_indices(), csr.col_indices(), csr.values(), None, 6)
    conv = SparseConv2d(prune(nn.Conv2d(64, 8, 3), 0.9))
    with pytest.raises(RuntimeError, match="features"):
        conv(torch.randn(4, 2, 12, 12))  # two channels where the weight has 64
    empty = SparseLinear(nn.Linear(5, 0))  # no outputs, fewer than the threads' parts
    assert empty(torch.randn(4, 5)).shape == (4, 0)


def test_the_kernels_command_builds_and_names_them(capsys, monkeypatch):
    from hyperflux.cli import main

    assert main(["kernels"]) == 0
    assert capsys.readouterr().out.strip() == f"compiled ({kernels._arch()[0].lstrip('_')})"
    monkeypatch.setattr(kernels, "load", lambda: False)
    assert main(["kernels"]) == 1
    assert "plain PyTorch" in capsys.readouterr().out


def test_the_pip_ninja_is_found_without_an_activated_environment(monkeypatch):
    import ninja

    monkeypatch.setenv("PATH", "/nonexistent")
    kernels._put_ninja_on_path()
    assert shutil.which("ninja") == str(Path(ninja.BIN_DIR) / "ninja")


def test_a_stale_build_lock_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    kernels._clear_stale_lock(lock)  # fresh: a build may be running
    assert lock.exists()
    os.utime(lock, (0, 0))
    with pytest.warns(UserWarning, match="stale build lock"):
        kernels._clear_stale_lock(lock)
    assert not lock.exists()


def test_the_kernel_falls_back_to_torch_with_a_warning(monkeypatch, tmp_path, capsys):
    import torch.utils.cpp_extension

    def no_compiler(**_):
        raise RuntimeError("Error building extension 'hyperflux_kernels'\nc++: not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there: the notice is printed
    with pytest.warns(RuntimeWarning, match=r"compiled C\+\+ kernels are unavailable .*Error building"):
        assert kernels.load.__wrapped__() is False
    assert "compiling its C++ kernels" in capsys.readouterr().err
    monkeypatch.setenv("HYPERFLUX_KERNELS", "0")
    assert kernels.load.__wrapped__() is False
    assert kernels.describe() == "plain PyTorch (HYPERFLUX_KERNELS=0)"


def every_layer_sparse(model: nn.Module) -> list[LayerChoice]:
    plan = plan_sparse_inference(model, max_density=1.0)  # modelled; then force every layer
    for choice in plan:
        choice.sparse = True
    return plan


@pytest.mark.parametrize(
    ("name", "size", "channels"), [("lenet300", 28, 1), ("lenet5", 28, 1), ("resnet18", 16, 3)]
)
def test_a_fully_converted_model_gives_the_dense_outputs(name, size, channels, kernel):
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


def test_a_converted_model_deep_copies_into_an_independent_equal_model():
    """torch cannot deep-copy a sparse CSR tensor; EMA copies and trainers that clone models need it."""
    torch.manual_seed(0)
    model = prune(models.build("lenet5", num_classes=10, in_channels=1, image_size=28), 0.9)
    fast = to_sparse_inference(model, plan=every_layer_sparse(model))
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        expected = fast(x)  # fills the kernel caches, which the copy must not share
        twin = copy.deepcopy(fast)
        close(twin(x), expected)
        for layer in twin.modules():
            if isinstance(layer, SparseLinear | SparseConv2d):
                layer.weight.values().zero_()
        assert torch.equal(fast(x), expected)
        assert not torch.equal(twin(x), expected)


def test_a_converted_model_loads_the_state_of_one_with_other_counts_of_non_zeros():
    x = torch.randn(5, 1, 28, 28)
    converted = []
    for seed, sparsity in ((0, 0.9), (1, 0.8)):
        torch.manual_seed(seed)
        model = prune(models.build("lenet5", num_classes=10, in_channels=1, image_size=28), sparsity)
        converted.append((to_sparse_inference(model, plan=every_layer_sparse(model)), model))
    (fast, _), (other, other_dense) = converted
    with torch.no_grad():
        fast(x)  # fills the kernel caches, which must not outlive the old weights
        fast.load_state_dict(other.state_dict())
        close(fast(x), other_dense(x))
    assert fast.fc1.density == pytest.approx(other.fc1.density)


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


def test_a_linear_layers_crossover_is_measured_in_the_rows_it_compares_at_run_time(monkeypatch):
    """For (batch, tokens, features) inputs a Linear sees batch * tokens rows: the planner measures rows."""
    seen = []

    def record(choice, dense, sparse, x, repeats):
        seen.append(tuple(x.shape))
        return x.shape[0] >= 8  # faster sparse from 8 rows on

    monkeypatch.setattr(sparse_inference, "_faster", record)
    linear = prune(nn.Linear(16, 16), 0.95)
    (choice,) = plan_sparse_inference(nn.Sequential(linear), torch.randn(3, 5, 16))
    assert seen == [(15, 16), (1, 16), (2, 16), (4, 16), (8, 16)] and choice.min_batch == 8


def test_an_unbatched_image_example_plans_convolutions_on_a_batch_of_one(monkeypatch):
    seen = []

    def record(choice, dense, sparse, x, repeats):
        seen.append(tuple(x.shape))
        dense(x), sparse(x)  # both take it
        return True

    monkeypatch.setattr(sparse_inference, "_faster", record)
    torch.manual_seed(0)
    model = prune(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), 0.95)
    plan = plan_sparse_inference(model, torch.randn(3, 12, 12))
    assert seen == [(1, 3, 12, 12), (1, 8, 10, 10)]
    assert all(choice.sparse for choice in plan)


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


def test_transformer_layers_keep_their_feed_forward_dense_for_their_fused_eval_path():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    model = prune(nn.Sequential(layer, nn.Linear(32, 10)), 0.98).eval()
    fast = to_sparse_inference(model, plan=every_layer_sparse(model))
    assert [type(m) for m in fast[0].modules() if isinstance(m, nn.Linear)] == [
        nn.modules.linear.NonDynamicallyQuantizableLinear,  # attention's out_proj
        nn.Linear,
        nn.Linear,
    ]
    assert isinstance(fast[1], SparseLinear)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        close(fast(x), model(x))
    # no fused path: a decoder layer, and an encoder layer with sequence-first inputs, convert as before
    for layer in (
        nn.TransformerDecoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True),
        nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64),
    ):
        other = prune(layer, 0.98).eval()
        plan = every_layer_sparse(other)
        assert [choice.name for choice in plan] == ["linear1", "linear2"]
        converted = to_sparse_inference(other, plan=plan)
        inputs = (x, x) if isinstance(layer, nn.TransformerDecoderLayer) else (x,)  # target and memory
        with torch.no_grad():
            close(converted(*inputs), other(*inputs))


def test_a_model_with_its_masks_is_refused():
    model = models.build("lenet300", num_classes=10, in_channels=1, image_size=8, hidden=(16, 8))
    hf = hyperflux.Hyperflux(model, target_sparsity=0.9, pruning_epochs=2)
    with pytest.raises(ValueError, match="squash"):
        to_sparse_inference(model)
    x = torch.randn(3, 1, 8, 8)
    squashed = hf.squash()
    with torch.no_grad():
        close(to_sparse_inference(squashed, plan=every_layer_sparse(squashed))(x), squashed(x))


def test_a_layer_under_another_parametrization_stays_dense_and_is_not_taken_for_masks():
    from torch.nn.utils.parametrizations import weight_norm  # torch's own parametrization, not a mask

    model = nn.Sequential(prune(nn.Linear(32, 16), 0.9), nn.ReLU(), weight_norm(nn.Linear(16, 4))).eval()
    plan = every_layer_sparse(model)
    assert [choice.name for choice in plan] == ["0"]
    converted = to_sparse_inference(model, plan=plan)
    assert isinstance(converted[0], SparseLinear) and not isinstance(converted[2], SparseLinear)
    x = torch.randn(5, 32)
    with torch.no_grad():
        close(converted(x), model(x))


def test_timing_samples_alternate_and_tell_a_slow_call_from_a_fast_one():
    import time

    calls = []
    slow = lambda: (calls.append("slow"), time.sleep(2e-3))  # noqa: E731
    fast = lambda: calls.append("fast")  # noqa: E731
    samples = sparse_inference.sample_ms([slow, fast], repeats=5, sample_s=1e-3)
    assert [len(s) for s in samples] == [5, 5]
    assert min(samples[0]) >= 2.0 > max(samples[1])
    # after the two warm-up and two loop-sizing calls, one block of calls per function per round, in turn
    rounds = calls[4:]
    assert rounds[0] == "slow" and rounds.count("slow") == 5 and rounds[-1] == "fast"
    assert sparse_inference.median_ms([slow], repeats=3, sample_s=1e-3)[0] >= 2.0


def test_a_loaded_state_or_a_move_reaches_the_kernel_after_it_has_run(kernel):
    """The kernel's CSR arrays are looked up once per weight: a state loaded into the same weight (in place)
    or a weight put there by `.to()` must be what the next call reads."""
    torch.manual_seed(0)
    first, second = nn.Linear(20, 7), nn.Linear(20, 7)
    with torch.no_grad():
        first.weight.mul_(torch.rand(7, 20) < 0.3)
        pattern = torch.zeros(140)
        pattern[torch.randperm(140)[: int(first.weight.count_nonzero())]] = 1  # same count: copy_ takes it
        second.weight.mul_(pattern.view(7, 20))
    sparse, x = SparseLinear(first), torch.randn(5, 20)
    with torch.no_grad():
        close(sparse(x), first(x))
        sparse.load_state_dict(SparseLinear(second).state_dict())
        close(sparse(x), second(x))
        moved = sparse.to(torch.float64).to(torch.float32)  # new buffer objects
        close(moved(x), second(x))


def _with_batchnorm() -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        return prune(
            nn.Sequential(nn.Linear(64, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 10)), 0.95
        )


def test_planning_runs_the_model_as_for_inference_and_leaves_its_mode_and_statistics():
    """A model in training mode (as after `squash()`): the example passes in eval mode, so BatchNorm keeps its
    statistics, and the model comes back in the mode it had."""
    model = _with_batchnorm().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = to_sparse_inference(model, torch.randn(32, 64), repeats=1, inplace=True)
    assert converted.training
    for key, value in converted.state_dict().items():
        if key in before and value.layout is torch.strided:
            assert torch.equal(value, before[key]), key


def test_a_converted_model_pickles_after_running(tmp_path):
    """`torch.save(model)` after a forward pass: the compiled kernel it looked up is not pickled."""
    model = prune(nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10)), 0.95)
    plan = [LayerChoice("0", "linear", (512, 64), 0.05, True, "")]
    converted = to_sparse_inference(model, plan=plan)
    x = torch.randn(4, 64)
    expected = converted(x)
    torch.save(converted, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert isinstance(loaded[0], SparseLinear)
    assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_stay_dense_on_the_cpu(dtype):
    model = prune(nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10)), 0.95).to(dtype)
    x = torch.randn(8, 64, dtype=dtype)
    plan = plan_sparse_inference(model, x, repeats=1)
    assert not any(choice.sparse for choice in plan)
    assert all(str(dtype) in choice.reason for choice in plan)
    assert torch.equal(to_sparse_inference(model, x, repeats=1)(x), model(x))


def test_planning_keeps_a_frozen_batchnorm_frozen_in_a_training_model():
    model = _with_batchnorm().train()
    model[1].eval()  # frozen statistics, as in fine-tuning
    plan_sparse_inference(model, torch.randn(32, 64), repeats=1)
    assert model.training and not model[1].training


class _KeywordCalls(nn.Module):
    """Calls its layers by keyword, `input=`, as nn.Linear and nn.Conv2d name their argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(input=self.conv(input=x).flatten(1))


def test_layers_called_by_keyword_are_planned_and_converted(kernel):
    torch.manual_seed(0)
    model = prune(_KeywordCalls(), 0.8)
    x = torch.randn(3, 1, 8, 8)
    plan = plan_sparse_inference(model, x)  # the plan reads each layer's input from a keyword call too
    assert len(plan) == 2 and all(3 in choice.timings for choice in plan)  # measured at the example's rows
    measured = to_sparse_inference(model, x)
    fast = to_sparse_inference(model, plan=every_layer_sparse(model))
    assert isinstance(fast.fc, SparseLinear) and isinstance(fast.conv, SparseConv2d)
    with torch.no_grad():
        close(fast(x), model(x))
        close(measured(x), model(x))


def test_a_csr_weight_with_int32_indices_loads_and_runs(kernel):
    torch.manual_seed(0)
    dense = prune(nn.Sequential(nn.Linear(30, 20)), 0.8)
    fast = to_sparse_inference(dense, plan=every_layer_sparse(dense))
    weight = dense[0].weight.detach().to_sparse_csr()
    narrow = torch.sparse_csr_tensor(
        weight.crow_indices().int(),
        weight.col_indices().int(),
        weight.values(),
        weight.shape,
        check_invariants=True,
    )
    fast.load_state_dict({"0.weight": narrow, "0.bias": dense[0].bias.detach()})
    x = torch.randn(6, 30)
    with torch.no_grad():
        close(fast(x), dense(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_converted_model_cast_to_half_precision_computes_in_float32_on_the_cpu(dtype, kernel):
    """torch's CPU sparse matmul has no half-precision kernel: a converted model cast with `.to(dtype)` runs
    its sparse layers on float32 copies of their weights and returns the dtype it was given."""
    torch.manual_seed(0)
    conv = prune(nn.Conv2d(3, 8, 3, padding=1), 0.9)
    linear = prune(nn.Linear(8 * 6 * 6, 10), 0.9)
    dense = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), linear)
    sparse = nn.Sequential(SparseConv2d(conv), nn.ReLU(), nn.Flatten(), SparseLinear(linear)).to(dtype)
    half = copy.deepcopy(dense).to(dtype)
    x = torch.randn(5, 3, 6, 6).to(dtype)
    with torch.no_grad():
        for batch in (x, x[:1]):
            out = sparse(batch)
            assert out.dtype is dtype
            # the dense layers on the same rounded weights and inputs, in float32, each output rounded as
            # the sparse layer rounds it
            hidden = half[0].float()(batch.float()).to(dtype).relu().flatten(1)
            expected = half[3].float()(hidden.float()).to(dtype)
            torch.testing.assert_close(out, expected)
        for model in (sparse, half):  # an in-place change of a buffer reaches the float32 copies
            model[3].bias.add_(5)
        torch.testing.assert_close(
            sparse(x),
            half[3].float()(half[0].float()(x.float()).to(dtype).relu().flatten(1).float()).to(dtype),
        )


def test_a_sparse_conv_returns_a_channels_last_batch_as_conv2d_does(kernel):
    torch.manual_seed(0)
    conv = prune(nn.Conv2d(4, 6, 3, padding=1), 0.9)
    sparse = SparseConv2d(conv)
    x = torch.randn(2, 4, 7, 5)
    with torch.no_grad():
        for batch, channels_last in ((x, False), (x.to(memory_format=torch.channels_last), True)):
            out, expected = sparse(batch), conv(batch)
            assert expected.is_contiguous(memory_format=torch.channels_last) is channels_last
            assert out.is_contiguous(memory_format=torch.channels_last) is channels_last
            assert out.is_contiguous() is not channels_last
            close(out, expected)
