"""The CUDA paths: gate, pressure and AMP training on the GPU, state moving between devices, export and
sparse inference of a model that lives on the GPU. Skipped where no CUDA device is present (this project's
build machines have none; they run on a GPU machine when one is lent)."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperflux import Hyperflux, load_sparse, save_sparse, to_sparse_inference
from hyperflux.gate import FluxMeter, HardGate
from hyperflux.recipe import load_recipe
from hyperflux.sparse_inference import SparseLinear, plan_sparse_inference, sample_ms
from hyperflux.training import run_recipe
from pruned_models import digits_split

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

SMOKE = Path(__file__).parent.parent / "recipes" / "smoke-digits.yaml"
SHORT = ["hyperflux.pruning_epochs=3", "hyperflux.regrowth_epochs=2"]


@pytest.fixture(scope="module")
def digits():
    return digits_split("cuda")


def small_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def test_gate_forward_and_gradients_on_cuda_equal_the_cpus():
    torch.manual_seed(0)
    weight, logits, upstream = torch.randn(3, 37, 19).unbind()
    results = []
    for device in ("cpu", "cuda"):
        w = weight.to(device, copy=True).requires_grad_()
        gate = HardGate(logits.to(device), 0.25, FluxMeter(0))  # on the CPU, the compiled gate
        out = gate(w)
        out.backward(upstream.to(device))
        results.append((out.detach().cpu(), w.grad.cpu(), gate.logits.grad.cpu()))
    for cpu, cuda in zip(*results, strict=True):
        assert torch.equal(cpu, cuda)
    out, grad_w, grad_m = results[1]
    open_gate = (logits >= 0).float()
    assert torch.equal(out, weight * open_gate)
    assert torch.equal(grad_w, upstream * open_gate)
    assert torch.allclose(grad_m, 0.25 * weight * upstream)


@pytest.mark.parametrize("fused", [False, True])  # fused: GradScaler leaves the unscaling to Adam's kernel
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_a_run_under_amp_on_cuda_hits_its_exact_target(digits, amp, fused):
    (x, y), (test_x, test_y) = digits
    model = small_mlp().cuda()
    hf = Hyperflux(model, 0.9, 12, 6, exact_target=True, mask_lr=1e-2)
    opt = torch.optim.Adam(hf.param_groups(lr=5e-3), fused=fused)
    hf.attach(opt)
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
    records = []
    for epoch in range(hf.total_epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).cuda()
        for i in range(0, len(x), 32):
            idx = order[i : i + 32]
            with torch.autocast("cuda", dtype=amp):
                loss = F.cross_entropy(model(x[idx]).float(), y[idx], label_smoothing=0.1)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        records.append(hf.step(opt))
    assert all(gate.logits.is_cuda for gate in hf.gates)
    # the flux is read unscaled at the attached step: finite, and without fp16's loss scale of 2 ** 16
    flux = [r["flux_mean"] for r in records if r["flux_mean"] is not None]
    assert flux and all(math.isfinite(f) and abs(f) < 1e3 for f in flux)
    assert abs(hf.sparsity() - 0.9) <= 0.0005
    with torch.no_grad():
        masked_out = model(test_x)
    squashed = hf.squash()
    weights = [m.weight for m in squashed if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert abs(zeros / sum(w.numel() for w in weights) - 0.9) <= 0.0005
    with torch.no_grad():
        out = squashed(test_x)
    assert torch.equal(out, masked_out)
    accuracy = float((out.argmax(1) == test_y).float().mean())
    assert accuracy > 0.85


def test_sparsifier_state_moves_from_cuda_to_cpu():
    model = small_mlp().cuda()
    hf = Hyperflux(model, 0.8, 4, 2)
    opt = torch.optim.Adam(hf.param_groups(lr=1e-2))
    hf.attach(opt)
    x, y = torch.randn(64, 64, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    for _ in range(3):
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        hf.step(opt)
    state, model_state = hf.state_dict(), model.state_dict()

    cpu_model = small_mlp(seed=1)
    cpu_hf = Hyperflux(cpu_model, 0.8, 4, 2)
    cpu_model.load_state_dict({k: v.cpu() for k, v in model_state.items()})
    cpu_hf.load_state_dict(state)
    for name, mask in hf.masks().items():
        assert torch.equal(cpu_hf.masks()[name], mask.cpu()), name
    assert cpu_hf.stats()["density"] == hf.stats()["density"]
    assert cpu_hf.pressure == hf.pressure
    with torch.no_grad():
        assert torch.allclose(cpu_model(x.cpu()), model(x).cpu(), atol=1e-5)


def test_a_model_moved_to_cuda_after_preparation_steps_and_reports_there():
    """The masks' snapshot of the last step and the period's flux follow the model to its new device."""
    model = small_mlp()
    hf = Hyperflux(model, 0.8, 4, 2, flux_every=1)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    F.cross_entropy(model(x), y).backward()  # one flux batch on the CPU
    model.cuda()
    opt = torch.optim.Adam(hf.param_groups(lr=1e-2))
    hf.attach(opt)
    for _ in range(3):
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(x.cuda()), y.cuda()).backward()
            opt.step()
        record = hf.step(opt)
        assert record["flux_mean"] is not None and math.isfinite(record["flux_mean"])
    assert record["kept"] == sum(int(m.sum()) for m in hf.masks().values())
    assert all(g.flux_sum.is_cuda for g in hf.gates)


@pytest.mark.parametrize("amp", ["off", "fp16", "bf16"])
def test_the_trainer_prunes_on_cuda_and_a_cuda_run_resumes_on_the_cpu(tmp_path, amp):
    cuda = load_recipe(SMOKE, [*SHORT, "device=cuda", f"amp={amp}"])
    assert run_recipe(cuda, tmp_path, quiet=True, stop_after=2) is None
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True, map_location="cpu")
    assert checkpoint["epoch"] == 2
    cpu = load_recipe(SMOKE, [*SHORT, "device=cpu", f"amp={amp}"])
    summary = run_recipe(cpu, tmp_path, quiet=True, resume=True)
    assert summary["device"] == "cpu"
    assert abs(summary["sparsity"] - 0.9) <= 0.0005
    assert summary["final_accuracy"] > 0.5


def test_a_cuda_model_saves_sparse_and_loads_on_the_cpu(tmp_path):
    model = small_mlp().cuda()
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(torch.rand_like(layer.weight) < 0.05)
    path = save_sparse(model, tmp_path / "model.hfsparse")
    loaded = load_sparse(path, small_mlp(seed=1))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.cpu()), name


def test_sparse_inference_on_cuda_equals_the_dense_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(torch.rand_like(layer.weight) < 0.02)
    model = model.cuda().eval()
    x = torch.randn(256, 784, device="cuda")
    plan = plan_sparse_inference(model, x, repeats=3)
    for choice in plan:
        choice.sparse, choice.min_batch = True, 1  # every layer, whatever the measurements said
    sparse = to_sparse_inference(model, plan=plan)
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == 3
    with torch.no_grad():
        for batch in (1, 3, 256):
            out = sparse(x[:batch])
            assert out.is_cuda
            assert torch.allclose(out, model(x[:batch]), atol=1e-5, rtol=1e-5), batch


def test_timings_on_cuda_wait_for_the_kernels():
    a = torch.randn(4096, 4096, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a @ a
    start.record()
    for _ in range(10):
        a @ a
    end.record()
    torch.cuda.synchronize()
    kernel_ms = start.elapsed_time(end) / 10
    (samples,) = sample_ms([lambda: a @ a], repeats=3, device="cuda")
    assert min(samples) >= 0.8 * kernel_ms, (samples, kernel_ms)


def test_torch_compile_of_a_prepared_model_on_cuda_matches_eager():
    model = small_mlp().cuda()
    Hyperflux(model, 0.5, 2, 1, flux_every=0)
    x = torch.randn(32, 64, device="cuda")
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model)(x)
    compiled.sum().backward()
    assert torch.allclose(compiled, eager, atol=1e-5)
    for got, expected in zip((p.grad for p in model.parameters()), eager_grads, strict=True):
        assert torch.allclose(got, expected, atol=1e-5)
