"""The gate's forward and straight-through gradients, and the pressure's gradient, against hand-computed values."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import hyperflux
from hyperflux import kernels
from hyperflux.gate import _GateFunction
from pruned_models import LinearTwice, denormals_survive


def python_gate(weight, logits, scale):
    return _GateFunction.apply(weight, logits, scale, None)


# the C++ gate (hyperflux.kernels) must build on this machine, or the path training takes goes untested
GATES = {"python": python_gate, "compiled": lambda *args: kernels.gate_op()(*args)}


@pytest.mark.parametrize("gate", GATES)
def test_gate_forward_and_gradients_by_hand(gate):
    weight = torch.tensor([[0.5, -2.0], [3.0, 0.25]], requires_grad=True)
    logits = torch.tensor([[0.1, -0.3], [0.0, -1e-6]], requires_grad=True)
    out = GATES[gate](weight, logits, 0.25)
    assert torch.equal(out, torch.tensor([[0.5, 0.0], [3.0, 0.0]]))  # m >= 0 opens, m = 0 included

    upstream = torch.tensor([[1.0, 2.0], [-1.0, 4.0]])
    out.backward(upstream)
    # dL/dW = H(m) * g ; dL/dm = c * W * g, for open and closed gates alike
    assert torch.equal(weight.grad, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    assert torch.allclose(logits.grad, 0.25 * torch.tensor([[0.5, -4.0], [-3.0, 1.0]]))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "linear"])
@pytest.mark.parametrize("wanted", [(True, True), (True, False), (False, True)])
def test_the_compiled_gate_equals_the_python_gate(layout, wanted):
    """Values and both gradients bit for bit, in a conv weight's two layouts and a Linear's, with either input
    frozen, for an upstream gradient of another layout (an expanded scalar from `sum()`) and one that comes
    back through a product."""
    torch.manual_seed(0)
    shape = (70, 45) if layout == "linear" else (8, 3, 3, 3)
    weight, logits = torch.randn(shape), torch.randn(shape)
    logits.view(-1)[0] = 0.0  # the gate's edge: m = 0 is open
    weight.view(-1)[1:9] = 0.0  # c * W * g is a zero of either sign: the Python gate's addcmul makes it +0
    if layout == "channels_last":
        weight, logits = (t.contiguous(memory_format=torch.channels_last) for t in (weight, logits))
    x, upstream = torch.randn(5, 45), torch.randn(shape)
    results = []
    for gate in GATES.values():
        w, m = (t.clone().requires_grad_(want) for t, want in zip((weight, logits), wanted, strict=True))
        out = gate(w, m, 0.3)
        through = torch.nn.functional.linear(x, out) if layout == "linear" else out * upstream
        through.sum().backward(retain_graph=True)
        first = [None if t.grad is None else t.grad.clone() for t in (w, m)]
        for t in (w, m):
            t.grad = None
        out.sum().backward()
        results.append((out.detach(), first, [None if t.grad is None else t.grad for t in (w, m)]))
    (out_py, first_py, sum_py), (out_c, first_c, sum_c) = results
    assert torch.equal(out_py, out_c) and out_c.stride() == weight.stride()
    for a, b in zip(first_py + sum_py, first_c + sum_c, strict=True):
        assert (a is None and b is None) or (torch.equal(a, b) and torch.equal(a.signbit(), b.signbit()))


@pytest.mark.parametrize("case", ["float64", "float16", "bfloat16", "layouts differ"])
def test_beyond_float32_on_one_layout_the_compiled_gate_takes_aten_ops_and_equals_the_python_gate(case):
    """The path CUDA takes too: the C++ autograd node computing with ATen ops instead of its loops; half types
    (a model cast after it was prepared) get dL/dm rounded once, as the Python gate's addcmul does."""
    torch.manual_seed(0)
    dtype = getattr(torch, case) if case != "layouts differ" else torch.float32
    weight, logits, upstream = (torch.randn(8, 3, 3, 3).to(dtype) for _ in range(3))
    logits.view(-1)[0] = 0.0
    weight.view(-1)[1:5] = 0.0
    if case == "layouts differ":
        weight = weight.contiguous(memory_format=torch.channels_last)
    results = []
    for gate in GATES.values():
        w, m = weight.clone().requires_grad_(), logits.clone().requires_grad_()
        out = gate(w, m, 0.3)
        (out * upstream).sum().backward()
        results.append((out.detach(), w.grad, m.grad))
    for python, compiled in zip(*results, strict=True):
        assert torch.equal(python, compiled) and torch.equal(python.signbit(), compiled.signbit())
    flux = torch.full(weight.shape, 0.5)
    w, m = weight.clone().requires_grad_(), logits.clone().requires_grad_()
    (kernels.gate_op()(w, m, 0.3, flux) * upstream).sum().backward()
    torch.testing.assert_close(flux, 0.5 - weight.float() * upstream.float())  # accumulated in float32
    assert torch.equal(w.grad, results[0][1])


def test_the_compiled_gate_has_second_derivatives():
    """Under create_graph (gradient penalties, Hessian-vector products) the gradients must be differentiable
    in turn, and equal the Python gate's."""
    torch.manual_seed(0)
    weight, logits, x = torch.randn(7, 5), torch.randn(7, 5), torch.randn(3, 5)
    results = []
    for gate in GATES.values():
        w, m = weight.clone().requires_grad_(), logits.clone().requires_grad_()
        loss = torch.tanh(torch.nn.functional.linear(x, gate(w, m, 0.25))).sum()
        grad_w, grad_m = torch.autograd.grad(loss, (w, m), create_graph=True)
        penalty = grad_w.square().sum() + grad_m.square().sum()
        results.append((grad_w, grad_m, *torch.autograd.grad(penalty, (w, m))))
    for python, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, python)


def test_training_steps_take_the_compiled_gate_which_adds_the_flux_of_sampled_batches():
    model = nn.Linear(6, 4)
    hf = hyperflux.Hyperflux(model, 0.5, pruning_epochs=3, flux_every=2)
    weight = model.parametrizations.weight.original.detach().clone()
    xs = torch.randn(4, 3, 6).unbind()
    nodes = []
    for x in xs:
        out = model(x)
        # addmm <- t() <- the gate; a Python Function's node has no name() in some torch versions (2.11)
        nodes.append(out.grad_fn.next_functions[-1][0].next_functions[0][0])
        out.sum().backward()
    names = [node.name() if type(node).__name__ == "CppFunction" else type(node).__name__ for node in nodes]
    assert all("CppNode" in name and "GateFunction" in name for name in names), names
    gate = hf.gates[0]
    assert gate.flux_batches == 2  # batches 0 and 2
    # dL/dW_eff of sum(x W^T + b) is ones^T x: the flux -W * g of batches 0 and 2, summed
    expected = sum(-(weight * (torch.ones(4, 3) @ x)) for x in (xs[0], xs[2]))
    torch.testing.assert_close(gate.flux_sum, expected)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_the_compiled_gates_flux_equals_minus_w_times_its_upstream_gradient(layout):
    torch.manual_seed(0)
    weight, logits, upstream = (torch.randn(8, 3, 3, 3) for _ in range(3))
    if layout == "channels_last":
        weight, logits = (t.contiguous(memory_format=torch.channels_last) for t in (weight, logits))
    flux = torch.full_like(weight, 0.5)  # an accumulator already holding earlier batches
    w, m = weight.clone().requires_grad_(), logits.clone().requires_grad_()
    out = kernels.gate_op()(w, m, 0.25, flux)
    (out * upstream).sum().backward()
    torch.testing.assert_close(flux, 0.5 - weight * upstream)
    assert torch.equal(w.grad, upstream * (logits >= 0))  # the gradients are unchanged by the flux
    torch.testing.assert_close(m.grad, 0.25 * weight * upstream)
    # under create_graph the backward is built from ATen ops, and adds the flux all the same
    w.grad = m.grad = None
    out = kernels.gate_op()(w, m, 0.25, flux)
    _, grad_m = torch.autograd.grad((out * upstream).sum(), (w, m), create_graph=True)
    torch.testing.assert_close(flux, 0.5 - 2 * weight * upstream)
    assert grad_m.requires_grad
    with pytest.raises(RuntimeError, match="flux must be a float32 tensor of the weight's shape"):
        kernels.gate_op()(w, m, 0.25, torch.zeros(8, 3, 3))


def test_gate_scale_is_configurable_and_logits_init_in_range():
    torch.manual_seed(0)
    model = nn.Linear(50, 40)
    hf = hyperflux.Hyperflux(model, 0.9, pruning_epochs=5, grad_scale=0.5, init_logit=0.2)
    logits = next(hf.mask_parameters())
    values = logits.detach()
    assert logits.shape == model.parametrizations.weight.original.shape
    assert float(values.min()) >= 0.2 and float(values.max()) <= 0.5
    assert float(values.max()) > 0.45 and float(values.min()) < 0.25  # the whole interval is used
    x = torch.randn(3, 50)
    model(x).sum().backward()
    weight = model.parametrizations.weight.original
    expected = 0.5 * weight.detach() * (torch.ones(3, 40).T @ x)  # c * W * dL/dW_eff
    assert torch.allclose(logits.grad, expected, atol=1e-5)


def _two_layer():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _two_layer_under_pressure(pressure: float, device: str = "cpu", **options):
    """The two-layer model prepared with a constant pressure, so that every step feels it."""
    model = _two_layer().to(device)
    hf = hyperflux.Hyperflux(
        model,
        None,
        pruning_epochs=3,
        exact_target=False,
        scheduler=hyperflux.PressureScheduler.constant(pressure),
        **options,
    )
    return model, hf


def _pressure_only_grads(hf):
    return [g.logits.grad.clone() for g in hf.gates]


def test_pressure_loss_value_and_gradient_on_every_logit():
    _model, hf = _two_layer_under_pressure(2.0)
    n = hf.total
    assert n == 6 * 5 + 5 * 3
    term = hf.pressure_loss()
    logits = list(hf.mask_parameters())
    assert torch.allclose(term, 2.0 * sum(m.sum() for m in logits) / n)
    term.backward()
    for m in logits:
        assert torch.allclose(m.grad, torch.full_like(m, 2.0 / n))


def _step_under_pressure(optimizers, attach, layers=3) -> tuple[list[torch.Tensor], float]:
    """One step of the two-layer model under pressure 3 with `pressure_loss()` in the loss, its optimisers
    `optimizers(hf)`, of which `attach(hf, opts)` attaches some: how far each layer's logits moved, and the loss.
    The forward pass runs the model's first `layers` modules."""
    model, hf = _two_layer_under_pressure(3.0)
    opts = optimizers(hf)
    attach(hf, opts)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    loss = model[:layers](x).pow(2).mean() + hf.pressure_loss()
    for opt in opts:
        opt.zero_grad()
    loss.backward()
    before = [m.detach().clone() for m in hf.mask_parameters()]
    for opt in opts:
        opt.step()
    return [b - m.detach() for b, m in zip(before, hf.mask_parameters(), strict=True)], float(loss)


def _nothing_attached(hf, opts) -> None:
    pass


@pytest.mark.parametrize("flush", [True, False])
def test_attached_optimizer_applies_the_same_pressure_gradient_once_per_step(flush):
    def one(hf):
        return [torch.optim.SGD(hf.param_groups(lr=0.0, mask_lr=1.0))]

    plain, plain_loss = _step_under_pressure(one, _nothing_attached)
    fused, fused_loss = _step_under_pressure(one, lambda hf, opts: hf.attach(*opts, flush_denormals=flush))
    assert plain_loss == pytest.approx(fused_loss)
    for a, b in zip(plain, fused, strict=True):
        assert torch.allclose(a, b, atol=1e-7)


def test_an_attached_optimiser_presses_a_layer_the_forward_pass_skipped_as_the_loss_does():
    """An auxiliary head or a branch not taken this step: its logits have no gradient, and the pressure alone
    moves them, with or without `attach()`."""

    def one(hf):
        return [torch.optim.SGD(hf.param_groups(lr=0.0, mask_lr=1.0))]

    plain, _ = _step_under_pressure(one, _nothing_attached, layers=1)
    attached, _ = _step_under_pressure(one, lambda hf, opts: hf.attach(*opts), layers=1)
    assert plain[1].abs().min() > 0  # the skipped layer moved under the loss's pressure
    for a, b in zip(plain, attached, strict=True):
        torch.testing.assert_close(b, a)


def test_logits_no_attached_optimiser_holds_take_the_pressure_through_the_loss():
    """One optimiser per layer's logits, only the first attached: its logits get P / N from its step, the
    second layer's from `pressure_loss()` in the loss, so both move as with nothing attached."""

    def per_layer(hf):
        return [torch.optim.SGD([m], lr=1.0) for m in hf.mask_parameters()]

    plain, plain_loss = _step_under_pressure(per_layer, _nothing_attached)
    mixed, mixed_loss = _step_under_pressure(per_layer, lambda hf, opts: hf.attach(opts[0]))
    assert mixed_loss == pytest.approx(plain_loss)
    for a, b in zip(plain, mixed, strict=True):
        torch.testing.assert_close(b, a)


def test_zero_pressure_gives_no_graph_and_no_gradient():
    model = _two_layer()
    hf = hyperflux.Hyperflux(model, 0.5, pruning_epochs=3)
    assert hf.pressure == 0.0  # first period trains without pressure (method.md s. 3)
    term = hf.pressure_loss()
    assert float(term) == 0.0 and not term.requires_grad


def test_per_layer_pressure_scale():
    _model, hf = _two_layer_under_pressure(1.0, overrides={"2": {"pressure_scale": 0.5}})
    hf.pressure_loss().backward()
    first, second = hf.mask_parameters()
    assert torch.allclose(first.grad, torch.full_like(first, 1.0 / hf.total))
    assert torch.allclose(second.grad, torch.full_like(second, 0.5 / hf.total))


def test_flux_is_sampled_and_reported_in_pressure_units():
    model = nn.Linear(4, 2, bias=False)
    hf = hyperflux.Hyperflux(model, 0.5, pruning_epochs=3, flux_every=1, grad_scale=0.25)
    x = torch.tensor([[1.0, 2.0, 0.0, -1.0]])
    model(x).sum().backward()
    weight = model.parametrizations.weight.original.detach()
    grad_eff = torch.ones(2, 1) @ x
    expected = -(weight * grad_eff) * 0.25 * hf.total
    stats = hf.stats()
    assert stats["flux_batches"] == 1
    assert stats["flux_min"] == pytest.approx(float(expected.min()), rel=1e-5)
    assert stats["flux_mean"] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_a_layer_used_twice_in_a_batch_reports_the_flux_of_both_uses():
    model = LinearTwice(3)
    hf = hyperflux.Hyperflux(model, 0.5, pruning_epochs=3, flux_every=1, grad_scale=1.0)
    x = torch.tensor([[1.0, -2.0, 0.5]])
    model(x).sum().backward()  # one batch, two uses: the weight's gradient is the sum of both
    weight = model.fc.parametrizations.weight.original.detach()
    hidden = x @ weight.t()
    grad = torch.ones(3, 1) @ hidden + (weight.t() @ torch.ones(3, 1)) @ x
    stats = hf.stats()
    assert stats["flux_batches"] == 1
    assert stats["flux_mean"] == pytest.approx(float((-(weight * grad) * hf.total).mean()), rel=1e-5)


def test_add_to_grads_rounds_as_torch_add_does_in_any_layout_and_dtype():
    grads = [
        torch.randn(301, 7),  # not a multiple of any vector width or of the thread count
        torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last),
        torch.randn(9, dtype=torch.float64),  # not the compiled loop's: ATen's add_
        torch.randn(6, 4).t(),  # not dense in memory order: the same
    ]
    values = [1.0 / 3.0, 2.5e-7, 1.0 / 7.0, -0.1]
    expected = [g.clone().add_(v) for g, v in zip(grads, values, strict=True)]
    versions = [g._version for g in grads]
    assert not kernels.add_to_grads(grads, values)  # no flush asked: nothing to undo
    for grad, want, version in zip(grads, expected, versions, strict=True):
        assert torch.equal(grad, want)
        assert grad._version > version  # autograd sees the write, as it sees torch's add_


def test_add_to_grads_off_the_cpu_takes_torch_foreach_and_still_flushes_when_asked():
    elsewhere = [torch.empty(5, device="meta")]
    assert not kernels.add_to_grads(elsewhere, [1.0])
    assert denormals_survive()
    if kernels.load():
        assert kernels.add_to_grads(elsewhere, [1.0], flush=True)  # it was off: the caller turns it off
        assert not denormals_survive()
        kernels.stop_flushing()
    assert denormals_survive()


def test_flush_denormals_flushes_on_every_thread_and_restores():
    assert denormals_survive()
    with hyperflux.flush_denormals():
        assert (torch.full((1 << 20,), 1e-39) * 1.0).count_nonzero() == 0  # not one thread kept the slow path
        with hyperflux.flush_denormals():
            pass
        assert not denormals_survive()  # a nested block leaves the outer one's setting
    assert denormals_survive()
    with hyperflux.flush_denormals(enabled=False):
        assert denormals_survive()


@pytest.mark.parametrize("flush", [True, False])
def test_attached_optimizer_steps_with_denormals_flushed(flush):
    """A pruned weight's gradient is zero, so its Adam mean decays by beta1 a step: from a denormal it reaches
    zero at once when flushed, and stays denormal otherwise. Outside the step nothing is flushed."""
    model = _two_layer()
    hf = hyperflux.Hyperflux(model, 0.5, pruning_epochs=3)
    opt = torch.optim.Adam(hf.param_groups(lr=1e-3))
    hf.attach(opt, flush_denormals=flush)
    seen = []
    opt.register_step_pre_hook(lambda *_: seen.append(denormals_survive()))
    weight = next(iter(hf.masked_weights().values()))
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    opt.state[weight]["exp_avg"].fill_(1e-39)
    weight.grad.zero_()
    opt.step()
    assert seen == [not flush] * 2
    assert bool((opt.state[weight]["exp_avg"] == 0).all()) is flush
    assert denormals_survive()


def _gated_linear(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(64, 48)
    hf = hyperflux.Hyperflux(model, 0.5, pruning_epochs=3)
    with torch.no_grad():
        hf.gates[0].logits.uniform_(-1, 1)
    return model, hf


def test_the_compiled_gate_writes_each_step_where_the_last_one_did_once_that_memory_is_free():
    """Released gradients (zero_grad(set_to_none=True)) give their memory to the next step's, which then
    page-faults no fresh memory in. The weight's gradient needs none: it is written over the incoming one."""
    model, hf = _gated_linear()
    gate = hf.gates[0]
    x = torch.randn(8, 64)
    pointers = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        (model(x) ** 2).sum().backward()
        pointers.append(gate.logits.grad.data_ptr())
        assert pointers[-1] == gate._slots[1].data_ptr()
        assert gate._slots[0].numel() == 0
    assert pointers[0] == pointers[1] == pointers[2]


def _incoming_gradient(how: str, model: nn.Module, x: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Backpropagates into the gate with dL/dW_eff reaching it in one of the ways below. Returns what something
    other than the gate still holds, as pairs of the tensor and the values it must still have, and dL/dW_eff."""
    # a Linear's weight gradient, which only the gate's node holds, or which a hook keeps too
    if how in ("free", "hooked"):
        weight, kept = model.weight, []
        if how == "hooked":
            weight.register_hook(kept.append)
        (F.linear(x, weight) ** 2).sum().backward()
        incoming = (2 * F.linear(x, weight.detach())).t() @ x
        return [(tensor, incoming) for tensor in kept], incoming
    given = torch.randn(48, 64)
    snapshot = given.clone()
    if how == "given":  # the caller passes it in and keeps it
        model.weight.backward(given)
        return [(given, snapshot)], snapshot
    # shared: one tensor handed to two gates (the sum's backward passes its gradient on to both terms)
    (model.weight + model.weight).backward(given)
    return [(given, snapshot)], 2 * snapshot


@pytest.mark.parametrize("how", ["free", "hooked", "given", "shared"])
def test_the_weight_gradient_takes_the_incoming_memory_only_when_nothing_else_holds_it(how):
    """Where the incoming gradient is the node's alone, dL/dW is written over it and the gate keeps no memory
    for it; a gradient that a hook, the caller or another gate still holds keeps its values."""
    model, hf = _gated_linear()
    x = torch.randn(8, 64)
    before = hf.gates[0].logits.detach().clone()
    held, incoming = _incoming_gradient(how, model, x)
    for tensor, values in held:
        assert torch.allclose(tensor, values, rtol=1e-5, atol=1e-4)
    original = hf.masked_weights()["weight"]
    assert torch.allclose(original.grad, incoming * (before >= 0), rtol=1e-5, atol=1e-4)
    assert torch.allclose(
        hf.gates[0].logits.grad, hf.gates[0].scale * original.detach() * incoming, rtol=1e-5, atol=1e-4
    )
    if kernels.load():
        assert (hf.gates[0]._slots[0].numel() == 0) is (how == "free")
        assert original.grad._base is None


@pytest.mark.parametrize("keep", ["accumulated", "retained", "referenced"])
def test_memory_something_still_holds_is_never_written(keep):
    """Kept gradients accumulate, a retained graph backpropagates again, a kept masked weight keeps its values:
    the same numbers as the Python gate gives, and the memory a slot holds stays that of the first step."""

    def run(compiled: bool):
        model, hf = _gated_linear(1)
        if not compiled:
            hf.gates[0].forward = lambda weight: python_gate(weight, hf.gates[0].logits, hf.gates[0].scale)
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
        weights = []
        for step in range(3):
            if keep != "accumulated":
                model.zero_grad(set_to_none=True)
            weights.append(model.weight)  # referenced: held across the steps below
            loss = (model(x * (step + 1)) ** 2).sum()
            loss.backward(retain_graph=keep == "retained")
            if keep == "retained":
                loss.backward()
            with torch.no_grad():
                hf.gates[0].logits.sub_(0.1)  # the next step's gate differs
        grads = (hf.masked_weights()["weight"].grad.clone(), hf.gates[0].logits.grad.clone())
        if compiled and keep == "accumulated":  # later steps' gradients were added in, their memory let go
            assert hf.gates[0]._slots[1].data_ptr() == hf.gates[0].logits.grad.data_ptr()
        return grads, [w.detach().clone() for w in weights]

    (compiled_grads, compiled_weights), (python_grads, python_weights) = run(True), run(False)
    for a, b in zip(compiled_grads, python_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(compiled_weights, python_weights, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(compiled_weights[0], compiled_weights[2])


def test_a_copied_gate_carries_none_of_the_kept_memory():
    model, hf = _gated_linear()
    (model(torch.randn(8, 64)) ** 2).sum().backward()
    assert hf.gates[0]._slots[1].numel() == 64 * 48  # the logits' gradient's memory is kept
    clone = copy.deepcopy(model)
    assert all(slot.numel() == 0 for slot in clone.parametrizations.weight[0]._slots)
    assert torch.equal(clone(torch.ones(2, 64)), model(torch.ones(2, 64)))


def test_masks_off_the_cpu_step_without_touching_the_cpu_flag():
    """A GPU computes denormals at full speed; its host-bound steps should not pay for setting the CPU's flag."""
    seen = []
    for device in ("meta", "cpu"):
        model = _two_layer()
        hf = hyperflux.Hyperflux(model, 0.5, pruning_epochs=3)
        opt = torch.optim.SGD(hf.param_groups(lr=0.0), lr=0.0)
        hf.attach(opt)
        model.to(device)  # the hooks look at where the logits live
        opt.register_step_pre_hook(lambda *_: seen.append(denormals_survive()))
        opt.step()
        assert denormals_survive()
    assert seen == [True, False]


def test_a_step_that_raises_leaves_denormals_flushed_only_until_the_next_step_ends():
    model = _two_layer()
    hf = hyperflux.Hyperflux(model, 0.5, pruning_epochs=3)
    opt = torch.optim.Adam(hf.param_groups(lr=1e-3))
    hf.attach(opt)
    model(torch.randn(4, 6)).sum().backward()
    handle = opt.register_step_pre_hook(lambda *_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        opt.step()
    handle.remove()
    opt.step()
    assert denormals_survive()


def test_the_weight_is_read_without_the_parametrization_lists_call(monkeypatch):
    """The prepared module's weight skips torch's property path (two module calls and attribute lookups that
    raise): the same value and gradients as torch's ParametrizationList, which it never calls."""
    model, hf = _gated_linear()
    calls = []
    torch_forward = parametrize.ParametrizationList.forward
    monkeypatch.setattr(
        parametrize.ParametrizationList, "forward", lambda self: calls.append(1) or torch_forward(self)
    )
    params = (model.parametrizations.weight.original, hf.gates[0].logits)
    x = torch.randn(8, 64)
    model(x).square().sum().backward()
    ours = [model.weight.detach()] + [p.grad.clone() for p in params]
    assert calls == []
    for p in params:
        p.grad = None
    torch_weight = model.parametrizations.weight()
    F.linear(x, torch_weight, model.bias).square().sum().backward()
    assert len(calls) == 1
    for a, b in zip(ours, [torch_weight.detach()] + [p.grad for p in params], strict=True):
        assert torch.equal(a, b)


def test_the_weight_getter_leaves_caching_and_stacked_parametrizations_to_torch():
    model, _hf = _gated_linear()
    with parametrize.cached():
        assert model.weight is model.weight
    assert model.weight is not model.weight
    gated = model.weight.detach()

    class Double(nn.Module):
        def forward(self, weight):
            return 2 * weight

    parametrize.register_parametrization(model, "weight", Double())
    assert torch.equal(model.weight, 2 * gated)
    # the setter is torch's (right_inverse down the chain), not that of a read-only property
    with pytest.raises(RuntimeError, match="right_inverse"):
        model.weight = torch.ones(48, 64)


def test_squash_removes_the_weight_getter():
    model, hf = _gated_linear()
    weight = model.weight.detach().clone()
    hf.squash()
    assert type(model) is nn.Linear and isinstance(model.weight, nn.Parameter)
    assert torch.equal(model.weight, weight)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_an_optimizer_under_grad_scaler_feels_the_same_pressure(optimizer, fused, device):
    """GradScaler unscales a plain optimiser's gradients before its step, but hands a fused one its gradients
    still scaled, with `grad_scale` for its kernel to divide by: the pressure added before that kernel must be
    scaled too, or it arrives 1 / scale as strong."""

    (plain, _), (scaled, _) = (_one_step(optimizer, fused, device, scaled) for scaled in (False, True))
    for want, got in zip(plain, scaled, strict=True):
        assert torch.allclose(want.cpu(), got.cpu(), rtol=0, atol=1e-6)


def _one_step(optimizer: str, fused: bool, device: str, scaled: bool, overflow: bool = False):
    """The two-layer model's mask logits and sampled flux after one attached step, under GradScaler or not
    (with `overflow`, the scaler's step is skipped for an infinite gradient, then a second batch is stepped)."""
    model, hf = _two_layer_under_pressure(50.0, device, flux_every=1)
    cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    opt = cls(hf.param_groups(lr=0.1, mask_lr=0.1), lr=0.1, fused=fused)
    hf.attach(opt)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0) if scaled else None
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0)).to(device)
    for batch in (x * torch.inf, x) if overflow else (x,):
        opt.zero_grad()
        loss = model(batch).pow(2).mean()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return [m.detach().clone() for m in hf.mask_parameters()], [g.mean_flux() for g in hf.gates]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("fused", [True, False])
def test_the_flux_under_grad_scaler_is_that_of_the_unscaled_step(fused, device):
    """The sampled flux is taken from the logits' gradient at the attached step, unscaled as the optimiser
    sees it: in the backward pass it carried the loss scale, and a skipped batch's infinities stayed in it."""
    _, plain = _one_step("adam", fused, device, scaled=False)
    for overflow in (False, True):
        _, scaled = _one_step("adam", fused, device, scaled=True, overflow=overflow)
        for want, got in zip(plain, scaled, strict=True):
            assert torch.allclose(want.cpu(), got.cpu(), rtol=1e-6, atol=1e-6)
    assert all(flux.abs().max() > 1e-3 for flux in plain)  # a flux to compare


def test_an_attached_step_takes_the_flux_of_its_accumulated_batches():
    """Attached, a sampled step's flux is that of the gradient the step applies: two half batches accumulated
    (each loss halved) give the flux of the whole batch, counted once, and frozen logits get that gradient
    for the batch alone; unattached, the backward pass adds it."""
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))

    def flux(attach: bool, halves: bool, frozen: bool = False) -> tuple[list[torch.Tensor], int]:
        model, hf = _two_layer_under_pressure(50.0, flux_every=1)
        opt = torch.optim.SGD(hf.param_groups(lr=0.0, mask_lr=0.0), lr=0.0)
        if attach:
            hf.attach(opt)
        if frozen:
            hf._freeze()
        for part in x.chunk(2) if halves else (x,):
            (model(part).pow(2).mean() / (2 if halves else 1)).backward()
        opt.step()
        return [g.mean_flux() for g in hf.gates], hf.stats()["flux_batches"]

    whole, batches = flux(attach=False, halves=False)
    assert batches == 1 and all(f.abs().max() > 1e-3 for f in whole)
    for attach, frozen in ((True, False), (True, True), (False, True)):
        got, batches = flux(attach, halves=False, frozen=frozen)
        assert batches == 1
        for want, have in zip(whole, got, strict=True):
            torch.testing.assert_close(have, want)
    accumulated, batches = flux(attach=True, halves=True)
    assert batches == 1
    for want, have in zip(whole, accumulated, strict=True):
        torch.testing.assert_close(have, want)
    # unattached, each half batch is a sample of its own: their mean, half the step's flux
    separate, batches = flux(attach=False, halves=True)
    assert batches == 2
    for want, have in zip(whole, separate, strict=True):
        torch.testing.assert_close(have, want / 2)


@pytest.mark.parametrize("compiled", [True, False])
def test_add_to_grads_multiplies_each_value_by_the_scale(monkeypatch, compiled):
    if not compiled:  # torch's path: a GPU's gradients, or no compiled kernels
        monkeypatch.setattr(kernels, "load", lambda: False)
    grads = [torch.randn(301, 7), torch.randn(9)]
    expected = [grads[0] + 0.25 * 512.0, grads[1] - 3.0 * 512.0]
    kernels.add_to_grads(grads, [0.25, -3.0], scale=torch.tensor(512.0))
    for grad, want in zip(grads, expected, strict=True):
        assert torch.equal(grad, want)


def test_a_deep_copy_of_the_prepared_model_outlives_squash():
    """torch removes a parametrization by deleting the property from the class it made for the module, which a
    deep copy shares: a copy taken before `squash()` (an EMA model, say) must still run, masked."""
    model = _two_layer()
    hf = hyperflux.Hyperflux(model, 0.5, pruning_epochs=3)
    with torch.no_grad():
        for gate in hf.gates:
            gate.logits.uniform_(-1, 1)
    copy_ = copy.deepcopy(model)
    x = torch.randn(4, 6)
    masked = model(x).detach()
    hf.squash()
    assert torch.equal(copy_(x), masked)
    assert torch.equal(model(x), masked)
    assert isinstance(model[0].weight, nn.Parameter) and type(model[0]) is nn.Linear


def test_attach_refuses_an_optimizer_without_logits_and_warns_when_they_share_a_group():
    model, hf = _two_layer_under_pressure(1.0)
    weights = list(hf.weight_parameters())
    with pytest.raises(ValueError, match="holds no mask logits"):
        hf.attach(torch.optim.SGD(weights, lr=0.1))
    with pytest.warns(UserWarning, match=r"share an optimiser group .*lr 0.1, weight_decay 0\)"):
        hf.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    _, hf = _two_layer_under_pressure(1.0)
    with pytest.warns(UserWarning, match=r"weight_decay 0.01"):
        hf.attach(torch.optim.AdamW([{"params": list(hf.mask_parameters())}], weight_decay=0.01))
    _, hf = _two_layer_under_pressure(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.attach(torch.optim.AdamW(hf.param_groups(lr=0.1, weight_decay=0.01)))


def test_frozen_logits_lend_their_gradient_to_a_flux_batch_and_never_move():
    """Frozen masks stay as they are while the attached step reads the flux of sampled batches from a gradient
    the frozen logits get for those batches alone: taken back before the optimiser (Adam, whose moments would
    move a logit even with a zero gradient) sees it."""
    model, hf = _two_layer_under_pressure(5.0, flux_every=2)
    opt = torch.optim.Adam(hf.param_groups(lr=0.1, mask_lr=0.1))
    hf.attach(opt)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # the logits' Adam moments are under way
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    hf._freeze()
    frozen = [m.detach().clone() for m in hf.mask_parameters()]
    for _ in range(4):
        opt.zero_grad(set_to_none=False)
        model(x).pow(2).mean().backward()
        opt.step()
        # between steps frozen logits need a gradient only for a flux batch coming next (batches 4 and 6)
        coming = hf.meter.batches % 2 == 0
        assert all(m.requires_grad == coming and m.grad is None for m in hf.mask_parameters())
    assert all(torch.equal(m, f) for m, f in zip(hf.mask_parameters(), frozen, strict=True))
    assert hf.stats()["flux_batches"] == 4  # batches 0 and 2 before the freeze, 4 and 6 after


def test_a_frozen_step_reads_the_scalers_overflow_flag_only_when_it_takes_the_flux():
    """`found_inf` of a fused optimiser under GradScaler is a GPU tensor: reading it is a sync, paid on flux
    steps only."""
    reads = []

    class FoundInf:
        def __bool__(self) -> bool:
            reads.append(1)
            return False

    model, hf = _two_layer_under_pressure(1.0, flux_every=8)
    opt = torch.optim.Adam(hf.param_groups(lr=1e-3))
    # the flag is there for the attached step alone: a non-fused Adam refuses one of its own
    opt.register_step_pre_hook(lambda o, *_: setattr(o, "found_inf", FoundInf()))
    hf.attach(opt)
    opt.register_step_pre_hook(lambda o, *_: delattr(o, "found_inf"))
    hf._freeze()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    for _ in range(16):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert len(reads) == 2  # batches 0 and 8
