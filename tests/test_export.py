"""Compressed checkpoints: exact round trips in every storage form, the file ratio, refused files, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import hyperflux
from hyperflux import models
from hyperflux.cli import main
from hyperflux.export import FORMAT, file_sizes, read_sparse
from hyperflux.sparse_inference import SparseLinear, plan_sparse_inference
from pruned_models import random_prune as prune

RECIPES = Path(__file__).parent.parent / "recipes"


pytestmark = pytest.mark.usefixtures("one_thread")


def lenet300(sparsity: float = 0.98) -> nn.Module:
    torch.manual_seed(0)
    return prune(models.build("lenet300", num_classes=10, in_channels=1, image_size=28), sparsity)


def sparse_tensor(shape: tuple[int, ...], density: float, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(sum(shape))
    values = torch.randn(shape, generator=generator)
    return (values * (torch.rand(shape, generator=generator) < density)).to(dtype)


def forms(path: Path) -> dict[str, str]:
    _, header = read_sparse(path)
    return {entry["name"]: entry["form"] for entry in json.loads(header["tensors"])}


def test_every_storage_form_round_trips_exactly(tmp_path):
    state = {
        "csr": sparse_tensor((300, 784), 0.02),
        "csr_conv": sparse_tensor((50, 20, 5, 5), 0.02),
        "csr_wide": sparse_tensor((4, 40000), 0.01),  # int32 columns
        "bitmask": sparse_tensor((300, 784), 0.10),
        "bitmask_bf16": sparse_tensor((64, 64), 0.3, torch.bfloat16),
        "dense": torch.randn(300),
        "nearly_dense": sparse_tensor((32, 32), 0.99),
        "zeros": torch.zeros(16, 16),
        "scalar": torch.tensor(0.5),
        "empty": torch.zeros(0, 3),
        "steps": torch.tensor(7, dtype=torch.int64),
    }
    path = hyperflux.save_sparse(state, tmp_path / "m.safetensors")
    loaded = hyperflux.load_sparse(path)
    assert list(loaded) == list(state)
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    stored = forms(path)
    assert stored["csr"] == stored["csr_conv"] == stored["csr_wide"] == stored["zeros"] == "csr"
    assert stored["bitmask"] == stored["bitmask_bf16"] == "bitmask"
    assert stored["dense"] == stored["nearly_dense"] == stored["steps"] == stored["scalar"] == "dense"


def test_lenet300_at_98_percent_is_15x_smaller_and_loads_into_a_skeleton(tmp_path):
    model = lenet300(0.98)
    dense_bytes, sparse_bytes = file_sizes(model)
    assert dense_bytes / sparse_bytes >= 15
    path = hyperflux.save_sparse(model, tmp_path / "m.safetensors", metadata={"note": "kept"})
    assert read_sparse(path)[1]["note"] == "kept" and read_sparse(path)[1]["format"] == FORMAT
    skeleton = models.build("lenet300", num_classes=10, in_channels=1, image_size=28)
    assert hyperflux.load_sparse(path, skeleton) is skeleton
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(skeleton(x), model(x))


def test_load_as_a_sparse_inference_model(tmp_path):
    model = lenet300(0.98)
    path = hyperflux.save_sparse(model, tmp_path / "m.safetensors")
    skeleton = models.build("lenet300", num_classes=10, in_channels=1, image_size=28)
    fast = hyperflux.load_sparse(path, skeleton, inference=True)  # modelled choice: fc1 only
    assert isinstance(fast.fc1, SparseLinear) and isinstance(fast.fc3, nn.Linear)
    x = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="skeleton"):
        hyperflux.load_sparse(path, inference=True)


def test_a_model_with_its_masks_is_refused(tmp_path):
    model = models.build("lenet300", num_classes=10, in_channels=1, image_size=8, hidden=(16, 8))
    hyperflux.Hyperflux(model, target_sparsity=0.9, pruning_epochs=2)
    with pytest.raises(ValueError, match=r"squash"):
        hyperflux.save_sparse(model, tmp_path / "m.safetensors")


@pytest.fixture
def saved(tmp_path) -> Path:
    return hyperflux.save_sparse(lenet300(0.98), tmp_path / "m.safetensors")


def untouched_after(path: Path, match: str) -> None:
    skeleton = models.build("lenet300", num_classes=10, in_channels=1, image_size=28)
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        hyperflux.load_sparse(path, skeleton)
    assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_a_truncated_file_is_a_clear_error_and_loads_nothing(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[: int(keep * len(data))])
    untouched_after(saved, "not a readable safetensors file")


def test_foreign_files_are_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"fc1.weight": torch.zeros(2, 2)}, str(plain))
    untouched_after(plain, "not a hyperflux sparse file")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    untouched_after(garbage, "not a readable safetensors file")
    future = tmp_path / "future.safetensors"
    save_file({"x": torch.zeros(1)}, str(future), metadata={"format": FORMAT, "format_version": "99"})
    untouched_after(future, "version '99'")
    with pytest.raises(FileNotFoundError):
        hyperflux.load_sparse(tmp_path / "missing.safetensors")


def test_damaged_contents_are_refused(tmp_path):
    path = hyperflux.save_sparse({"w": sparse_tensor((100, 300), 0.02)}, tmp_path / "m.safetensors")
    _, header = read_sparse(path)

    arrays = load_file(str(path))
    arrays["w:columns"] = arrays["w:columns"][:-1].clone()
    save_file(arrays, str(path), metadata=header)
    with pytest.raises(ValueError, match="disagree"):
        hyperflux.load_sparse(path)


def test_a_file_of_another_model_is_refused(saved):
    other = models.build("lenet300", num_classes=10, in_channels=1, image_size=28, hidden=(200, 100))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit the model"):
        hyperflux.load_sparse(saved, other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_a_converted_or_a_masked_model_is_refused_before_anything_is_copied(saved):
    skeleton = models.build("lenet300", num_classes=10, in_channels=1, image_size=28)
    plan = plan_sparse_inference(skeleton, max_density=1.0)
    for choice in plan:
        choice.sparse = True
    converted = hyperflux.to_sparse_inference(skeleton, plan=plan)
    before = {k: v.clone() for k, v in converted.state_dict().items() if v.layout == torch.strided}
    with pytest.raises(ValueError, match=r"sparse-layout tensor .* load the file into the plain model"):
        hyperflux.load_sparse(saved, converted)
    assert all(torch.equal(before[k], v) for k, v in converted.state_dict().items() if k in before)
    masked = models.build("lenet300", num_classes=10, in_channels=1, image_size=28)
    hyperflux.Hyperflux(masked, target_sparsity=0.9, pruning_epochs=2)
    with pytest.raises(ValueError, match=r"still has its masks: load the file's state"):
        hyperflux.load_sparse(saved, masked)
    masked.load_state_dict(hyperflux.load_sparse(saved))  # as the message says


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A run folder as `load_run` reads it: the smoke recipe and a 90%-sparse model.safetensors."""
    folder = tmp_path_factory.mktemp("digits")
    shutil.copy(RECIPES / "smoke-digits.yaml", folder / "recipe.yaml")
    torch.manual_seed(0)
    model = prune(
        models.build("lenet300", num_classes=10, in_channels=1, image_size=8, hidden=(128, 64)), 0.9
    )
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    return folder


def test_cli_export_sparse_writes_a_file_load_sparse_reads(digits_run, capsys):
    assert main(["export", str(digits_run), "--format", "sparse"]) == 0
    out = digits_run / "model.sparse.safetensors"
    assert str(out) in capsys.readouterr().out

    dense = load_file(str(digits_run / "model.safetensors"))
    loaded = hyperflux.load_sparse(out)
    assert all(torch.equal(loaded[k], v) for k, v in dense.items())


def test_cli_export_makes_a_missing_folder_and_refuses_a_folder_as_the_file(digits_run, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "m.safetensors"
    assert main(["export", str(digits_run), "--format", "sparse", "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["export", str(digits_run), "--format", "sparse", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert f"--out {tmp_path} is a folder; give the file to write" in err and "Traceback" not in err


def test_cli_bench_prints_one_table(digits_run, capsys):
    assert main(["bench", str(digits_run), "--batch", "32", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for row in (
        "latency batch 1 (ms)",
        "latency batch 32 (ms)",
        "throughput batch 32",
        "file (bytes)",
        "fc1",
        "sparse kernels: compiled (",  # says which kernels ran: this machine builds them
    ):
        assert row in out
    weights = [
        t for name, t in load_file(str(digits_run / "model.safetensors")).items() if name.endswith("weight")
    ]
    total, kept = sum(w.numel() for w in weights), sum(int(w.count_nonzero()) for w in weights)
    macs = next(line for line in out.splitlines() if line.startswith("MACs per sample")).split()
    assert macs[3:5] == [f"{total:,}", f"{kept:,}"]  # an MLP uses each weight once per sample


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--format", "sparse"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["bench", str(tmp_path), "--batch", "0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_model_converted_for_sparse_inference_is_refused_with_the_way_out(tmp_path):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.05)
    converted = SparseLinear(linear)
    with pytest.raises(ValueError, match=r"sparse-layout tensor.*save the squashed model before converting"):
        hyperflux.save_sparse(converted, tmp_path / "m.hfs")
    assert not (tmp_path / "m.hfs").exists()
