"""ONNX export: the file runs in onnxruntime with the model's outputs, at any batch size."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hyperflux import Hyperflux, models, to_sparse_inference
from hyperflux.cli import main
from hyperflux.onnx_export import export_onnx
from hyperflux.sparse_inference import plan_sparse_inference
from pruned_models import random_prune

onnxruntime = pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)"
)

RECIPES = Path(__file__).parent.parent / "recipes"


pytestmark = pytest.mark.usefixtures("one_thread")


def pruned(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    return random_prune(models.build(name, num_classes=10, in_channels=1, image_size=size), 0.9)


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_onnxruntime_gives_the_model_outputs_at_any_batch(tmp_path, name):
    model = pruned(name, 28)
    path = tmp_path / "model.onnx"
    assert export_onnx(model, torch.randn(2, 1, 28, 28), path) <= 1e-4
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 1, 28, 28)
    (out,) = session.run(["output"], {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-4, rtol=0)


def test_batch_first_attention_exports_through_its_unfused_path(tmp_path):
    """In eval mode a batch-first encoder layer runs torch's fused kernel, which the exporter cannot trace."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(random_prune(layer, 0.9), nn.Flatten(), nn.Linear(5 * 16, 3))
    x = torch.randn(2, 5, 16)
    assert export_onnx(model, x, tmp_path / "m.onnx") <= 1e-4
    assert torch.backends.mha.get_fastpath_enabled()  # as it was


def test_cli_export_onnx(tmp_path, capsys):
    shutil.copy(RECIPES / "smoke-digits.yaml", tmp_path / "recipe.yaml")
    torch.manual_seed(0)
    model = models.build("lenet300", num_classes=10, in_channels=1, image_size=8, hidden=(128, 64))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    out = tmp_path / "exported.onnx"
    assert main(["export", str(tmp_path / "model.safetensors"), "--format", "onnx", "--out", str(out)]) == 0
    assert out.exists() and "onnxruntime max |diff|" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 8, 8)
    (result,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(result), model(x), atol=1e-4, rtol=0)


def test_export_leaves_a_training_model_in_training_mode(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    export_onnx(model, torch.randn(3, 4), tmp_path / "m.onnx")
    assert model.training and all(m.training for m in model.modules())
    model[1].eval()  # a submodule the user had put in eval mode stays there
    export_onnx(model, torch.randn(3, 4), tmp_path / "m.onnx")
    assert model.training and not model[1].training


def test_a_model_with_its_masks_or_sparse_kernels_is_refused_before_a_file_is_written(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    hf = Hyperflux(model, 0.5, pruning_epochs=2)
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"0 still has its masks.*hf\.squash\(\)"):
        export_onnx(model, torch.randn(3, 16), path, check=False)
    squashed = hf.squash()
    plan = plan_sparse_inference(squashed, max_density=1.0)
    for choice in plan:
        choice.sparse = True
    converted = to_sparse_inference(squashed, plan=plan)
    with pytest.raises(ValueError, match="0 runs hyperflux's sparse kernels"):
        export_onnx(converted, torch.randn(3, 16), path, check=False)
    assert not path.exists()
    normed = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    torch.nn.utils.parametrizations.weight_norm(normed[0])  # torch's own parametrization exports as before
    assert export_onnx(normed, torch.randn(3, 16), path) <= 1e-4


def test_a_file_that_fails_its_check_is_not_written(tmp_path, monkeypatch):
    model = pruned("lenet300", 8)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"an earlier export")
    real = torch.onnx.export

    def drifting(model, args, f, **kwargs):  # an exporter whose graph computes something else
        real(nn.Sequential(model, nn.Hardtanh(-1e-3, 1e-3)), args, f, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", drifting)
    with pytest.raises(ValueError, match=r"onnxruntime's output differs.*not written"):
        export_onnx(model, torch.randn(2, 1, 8, 8), path)
    assert path.read_bytes() == b"an earlier export" and not list(tmp_path.glob(".*.tmp"))


def test_a_file_onnxruntime_cannot_run_is_a_value_error_that_says_why(tmp_path):
    """onnxruntime's CPU convolutions are float32 only: a float64 model exported but failed in its session
    with onnxruntime's own error type."""
    model = pruned("lenet5", 28).double()
    path = tmp_path / "model.onnx"
    with pytest.raises(ValueError, match=r"onnxruntime cannot run the exported model .* not torch\.float64"):
        export_onnx(model, torch.randn(2, 1, 28, 28, dtype=torch.float64), path)
    assert not path.exists() and not list(tmp_path.glob(".*.tmp"))
    assert export_onnx(model.float(), torch.randn(2, 1, 28, 28), path) < 1e-4


def test_dynamic_axes_beyond_the_batch_are_exported_and_checked(tmp_path):
    """A fully convolutional net exported with variable height and width runs in onnxruntime at other sizes."""
    torch.manual_seed(0)
    model = random_prune(
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
        ),
        0.5,
    )
    path = tmp_path / "m.onnx"
    axes = {0: "batch", -2: "height", -1: "width"}
    assert export_onnx(model, torch.randn(2, 1, 8, 6), path, dynamic_axes=axes) <= 1e-4
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 13, 5)
    (out,) = session.run(["output"], {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-4, rtol=0)


def test_an_axis_the_exporter_fixed_is_refused_and_nothing_written(tmp_path):
    """The TorchScript exporter bakes attention's sequence length into its reshapes: asked for a dynamic
    sequence axis, the export is refused rather than written to fail at another length."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(random_prune(layer, 0.9), nn.Linear(16, 3))
    x, path = torch.randn(2, 5, 16), tmp_path / "m.onnx"
    with pytest.raises(
        ValueError, match=r"not on it doubled along its dynamic axes \{0: 'batch', 1: 'tokens'\}"
    ):
        export_onnx(model, x, path, dynamic_axes={0: "batch", 1: "tokens"})
    assert list(tmp_path.iterdir()) == []
    assert export_onnx(model, x, path) <= 1e-4  # its batch axis alone is dynamic


def test_dynamic_axes_the_model_cannot_vary_or_that_are_not_axes_are_refused(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(5 * 16, 3))
    x, path = torch.randn(2, 5, 16), tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"the model itself does not run .* \(on \(4, 10, 16\): mat1"):
        export_onnx(model, x, path, dynamic_axes={0: "batch", 1: "tokens"})
    for axes, message in [
        ({3: "x"}, r"3 is not an axis of the 3-dimensional example \(2, 5, 16\)"),
        ({-4: "x"}, r"-4 is not an axis"),
        ({True: "x"}, r"True is not an axis"),
        ({0: ""}, r"axis 0 needs a name"),
        ({2: "x", -1: "y"}, r"axis -1 is given twice \(as 2 too\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            export_onnx(model, x, path, dynamic_axes=axes)
    assert list(tmp_path.iterdir()) == []
