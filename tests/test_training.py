"""The trainer: a stopped and resumed run equals an uninterrupted one, NaN stops cleanly, schedules, decay."""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hyperflux import Hyperflux, data
from hyperflux.models import build as build_model_by_name
from hyperflux.recipe import RecipeError, load_recipe
from hyperflux.runfiles import RunError, RunFolder, exclusive
from hyperflux.sparsifier import FLUX_HIST_EDGES
from hyperflux.training import Trainer, TrainingError, load_run, resolve_device, run_recipe, use_channels_last
from pruned_models import denormals_survive

SMOKE = Path(__file__).parent.parent / "recipes" / "smoke-digits.yaml"
# SGD with weight decay and a controller step every 20 batches: the paths the smoke recipe leaves out
SHORT = ["hyperflux.pruning_epochs=3", "hyperflux.regrowth_epochs=2"]
SGD = ["optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.weight_decay=5e-4", "train.controller_every=20"]


def recipe(*assignments: str) -> dict:
    return load_recipe(SMOKE, [*SHORT, *assignments])


def rows(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "elapsed_s")} for line in lines]


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    expected = run_recipe(recipe(*SGD), whole, quiet=True)
    assert run_recipe(recipe(*SGD), parts, quiet=True, stop_after=2) is None
    assert not (parts / "summary.json").exists()
    checkpoint = torch.load(parts / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2
    # a row written after the checkpoint by a run killed in between is dropped on resume
    with open(parts / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"epoch": 3, "stale": True}) + "\n")
    resumed = run_recipe(recipe(*SGD), parts, quiet=True, resume=True)

    assert resumed["final_accuracy"] == expected["final_accuracy"]
    assert resumed["per_layer"] == expected["per_layer"]
    assert resumed["kept"] == expected["kept"]
    a, b = load_file(whole / "model.safetensors"), load_file(parts / "model.safetensors")
    assert (
        a.keys() == b.keys() == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"}
    )
    for key in a:
        assert torch.equal(a[key], b[key]), key
    end_a = torch.load(whole / "checkpoint.pt", weights_only=True)["model"]
    end_b = torch.load(parts / "checkpoint.pt", weights_only=True)["model"]
    logits = [k for k in end_a if k.endswith("logits")]
    assert len(logits) == 3
    for key in end_a:  # masks (logits) and stored weights alike
        assert torch.equal(end_a[key], end_b[key]), key
    assert rows(whole) == rows(parts)
    assert [r["epoch"] for r in rows(parts)] == [1, 2, 3, 4, 5]


def test_resume_refuses_a_changed_recipe_and_a_fresh_run_refuses_a_used_folder(tmp_path):
    run_recipe(recipe(), tmp_path, quiet=True, stop_after=1)
    with pytest.raises(RunError, match=r"recipe differs .*\(optimizer\.lr 0\.005 -> 0\.1\); .* --overwrite"):
        Trainer(recipe("optimizer.lr=0.1"), tmp_path, resume=True, quiet=True)
    with pytest.raises(RunError, match="already holds a run"):
        Trainer(recipe(), tmp_path, quiet=True)
    with pytest.raises(RunError, match=re.escape("no checkpoint.pt to resume from")):
        Trainer(recipe(), tmp_path / "empty", resume=True, quiet=True)
    model_only = (
        tmp_path / "model-only"
    )  # the layout `hyperflux eval` reads: a model file is a used folder too
    model_only.mkdir()
    (model_only / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(RunError, match="already holds a run"):
        Trainer(recipe(), model_only, quiet=True)
    assert (model_only / "model.safetensors").read_bytes() == b"weights"


def test_a_checkpoint_with_damaged_bytes_is_refused_not_loaded(tmp_path):
    import struct
    import zipfile

    run_recipe(recipe(), tmp_path, quiet=True, stop_after=1)
    path = tmp_path / "checkpoint.pt"
    with zipfile.ZipFile(path) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)  # a tensor's bytes
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack(
        "<HH", data[largest.header_offset + 26 : largest.header_offset + 30]
    )
    data[largest.header_offset + 30 + name_length + extra_length + largest.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(
        RunError, match=r"damaged checkpoint .* cannot resume from it: --overwrite starts it again"
    ):
        Trainer(recipe(), tmp_path, resume=True, quiet=True)


def test_a_checkpoint_that_reads_but_does_not_fit_is_a_run_error(tmp_path):
    run_recipe(recipe(), tmp_path, quiet=True, stop_after=1)
    path = tmp_path / "checkpoint.pt"
    good = torch.load(path, weights_only=True)
    fc1 = next(key for key in good["model"] if key.endswith("original"))
    for broken, message in (
        ({k: v for k, v in good.items() if k != "rng"}, "missing 'rng'"),
        ({**good, "hyperflux": None}, "cannot resume from its files"),
        ({**good, "model": {**good["model"], fc1: torch.zeros(3, 3)}}, "size mismatch"),
        ({**good, "epoch": 99}, "the checkpoint is at epoch 99 of 5"),
    ):
        torch.save(broken, path)
        with pytest.raises(RunError, match=message):
            Trainer(recipe(), tmp_path, resume=True, quiet=True)
    torch.save(good, path)
    (tmp_path / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    with pytest.raises(RunError, match="cannot resume from its files \\(missing 'epoch'\\)"):
        Trainer(recipe(), tmp_path, resume=True, quiet=True)


def test_a_second_process_cannot_train_into_a_folder_in_use(tmp_path):
    """Two runs into one folder would interleave metrics and checkpoints: the second fails at once, and the
    folder is free again when the first process ends."""
    import subprocess
    import sys
    import textwrap

    holder = textwrap.dedent(
        f"""
        import sys, time
        from hyperflux.runfiles import exclusive
        with exclusive({str(tmp_path)!r}):
            print("held", flush=True)
            sys.stdin.readline()
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match="another hyperflux process is running in this folder"):
            run_recipe(recipe(), tmp_path, quiet=True)
        assert not (tmp_path / "metrics.jsonl").exists()  # nothing written
    finally:
        process.communicate("\n", timeout=30)
    assert run_recipe(recipe(), tmp_path, quiet=True, stop_after=1) is None  # free again


def test_the_folder_is_held_through_the_report_and_a_failed_start_leaves_none(tmp_path):
    from hyperflux.runfiles import exclusive

    held = []

    def after(folder):
        try:
            with exclusive(folder):
                held.append(False)
        except RunError:
            held.append(True)

    run_recipe(
        recipe("hyperflux.pruning_epochs=1", "hyperflux.regrowth_epochs=0"),
        tmp_path / "run",
        quiet=True,
        after=after,
    )
    assert held == [True]
    with pytest.raises(RunError, match=re.escape("no checkpoint.pt to resume from")):
        run_recipe(recipe(), tmp_path / "typo", quiet=True, resume=True)
    assert not (tmp_path / "typo").exists()


def test_a_file_system_without_locks_trains_unguarded(tmp_path, monkeypatch):
    import errno

    from hyperflux import runfiles

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runfiles.fcntl, "flock", no_locks)
    assert run_recipe(recipe(), tmp_path, quiet=True, stop_after=1) is None


def test_a_run_stopped_before_its_first_checkpoint_starts_again_without_resume(tmp_path):
    """Killed after its first metrics row but before the checkpoint: nothing to resume, so the same command
    runs again (the interrupt message says so) instead of each error pointing at the other."""
    run_recipe(recipe(), tmp_path, quiet=True, stop_after=1)
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.raises(RunError, match="starts again without --resume"):
        Trainer(recipe(), tmp_path, resume=True, quiet=True)
    run_recipe(recipe(), tmp_path, quiet=True)
    assert [r["epoch"] for r in rows(tmp_path)] == [1, 2, 3, 4, 5]


def test_a_row_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    expected = run_recipe(recipe(), tmp_path / "whole", quiet=True)
    parts = tmp_path / "parts"
    run_recipe(recipe(), parts, quiet=True, stop_after=1)
    with open(parts / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 2, "lr": 0.001, "loss": 0.6')  # killed while writing the next row
    resumed = run_recipe(recipe(), parts, quiet=True, resume=True)
    assert resumed["final_accuracy"] == expected["final_accuracy"]
    assert rows(parts) == rows(tmp_path / "whole")
    (parts / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "lo\n{"epoch": 3}\n')
    with pytest.raises(RunError, match=r"metrics\.jsonl, line 2: not a metrics row"):
        RunFolder(parts).read_metrics()  # damage before the last row is not a torn write


def test_resume_rewrites_the_metrics_only_to_drop_rows_and_never_empties_them(tmp_path):
    """With nothing past the checkpoint the metrics files stay as they are; rows past it go by replacing each
    file whole (emptied and refilled row by row, a kill in between lost epochs the checkpoint covers)."""
    run_recipe(recipe(), tmp_path, quiet=True, stop_after=2)
    folder = RunFolder(tmp_path)
    names = ("metrics.jsonl", "metrics.csv")
    for name in names:
        os.utime(tmp_path / name, ns=(10**18, 10**18))  # a time no write here would give them
    folder.truncate_metrics(2)
    assert all((tmp_path / name).stat().st_mtime_ns == 10**18 for name in names)
    csv_before = (tmp_path / "metrics.csv").read_text()
    folder.truncate_metrics(1)
    assert [r["epoch"] for r in folder.read_metrics()] == [1]
    assert (tmp_path / "metrics.csv").read_text() == "".join(csv_before.splitlines(keepends=True)[:2])
    assert all((tmp_path / name).stat().st_mtime_ns != 10**18 for name in names)


def test_overwrite_replaces_a_run_only_once_the_new_recipe_builds_and_clears_what_was_made_from_it(tmp_path):
    run_recipe(recipe(), tmp_path, quiet=True, stop_after=1)
    old = {name: (tmp_path / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "recipe.yaml")}
    with pytest.raises(ValueError, match="matches no prunable tensor"):
        Trainer(recipe("hyperflux.names=fc9"), tmp_path, overwrite=True, quiet=True)
    assert {name: (tmp_path / name).read_bytes() for name in old} == old
    derived = ["report.html", "density.png", "flux_hist.png", "model.sparse.safetensors", "model.onnx"]
    for name in derived:
        (tmp_path / name).write_bytes(b"from the old run")
    (tmp_path / "notes.txt").write_text("the user's own")
    run_recipe(recipe("seed=1"), tmp_path, quiet=True, overwrite=True, stop_after=1)
    assert not any((tmp_path / name).exists() for name in derived)
    assert (tmp_path / "notes.txt").exists() and load_recipe(tmp_path / "recipe.yaml")["seed"] == 1


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("model.hidden=[]", "lenet300 on digits"),
        ("model.hidden=[-5,64]", "lenet300 on digits"),
        ("model={name: vgg19}", "vgg19 on digits"),  # 8x8 images: too small for its pooling
    ],
)
def test_a_model_the_data_cannot_run_is_a_recipe_error_before_training(assignment, message, tmp_path):
    with pytest.raises(RecipeError, match=re.escape(f"recipe key 'model': {message}")):
        Trainer(recipe(assignment), tmp_path, quiet=True)
    assert not (tmp_path / "recipe.yaml").exists()


def test_a_device_name_torch_does_not_know_is_a_recipe_error():
    with pytest.raises(
        RecipeError, match="recipe key 'device': expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"
    ):
        resolve_device("gpu")
    with pytest.raises(RecipeError, match=r"^device: expected auto, cpu, cuda, cuda:N or mps, got 'meta'"):
        resolve_device("meta", what="device")  # a torch device no run can train or evaluate on


def test_a_resumed_run_clears_the_exports_and_report_of_the_epoch_it_stopped_at(tmp_path):
    run_recipe(recipe(), tmp_path, quiet=True, stop_after=1)
    derived = ["report.html", "density.png", "model.sparse.safetensors", "model.onnx"]
    for name in derived:
        (tmp_path / name).write_bytes(b"made from the stopped run")
    run_recipe(recipe(), tmp_path, quiet=True, resume=True, stop_after=2)
    assert not any((tmp_path / name).exists() for name in derived)
    trainer = Trainer(recipe(), tmp_path, resume=True, quiet=True)
    train_epoch = trainer._train_epoch

    def exported_meanwhile():  # `hyperflux export` from the last checkpoint while the run goes on
        for name in derived:
            (tmp_path / name).write_bytes(b"made from an epoch of the run")
        return train_epoch()

    trainer._train_epoch = exported_meanwhile
    with exclusive(tmp_path):
        trainer.run()  # the run that finishes clears them
    assert not any((tmp_path / name).exists() for name in derived)
    for name in derived:
        (tmp_path / name).write_bytes(b"made from the finished run")
    run_recipe(recipe(), tmp_path, quiet=True, resume=True)  # retrains nothing: what was made from it holds
    assert all((tmp_path / name).exists() for name in derived)


def test_amp_asked_for_on_the_cpu_is_said_to_train_in_float32(tmp_path):
    with pytest.warns(UserWarning, match="amp: bf16 runs on CUDA only; this cpu run trains in float32"):
        trainer = Trainer(recipe("amp=bf16"), tmp_path, quiet=True)
    assert trainer.amp_dtype is None


def test_non_finite_loss_stops_and_leaves_the_last_checkpoint(tmp_path):
    run_recipe(recipe(), tmp_path, quiet=True, stop_after=1)
    before = hashlib.sha256((tmp_path / "checkpoint.pt").read_bytes()).hexdigest()
    trainer = Trainer(recipe(), tmp_path, resume=True, quiet=True)
    with torch.no_grad():
        next(iter(trainer.hf.weight_parameters())).fill_(float("nan"))  # an injected NaN
    with pytest.raises(TrainingError, match=r"non-finite in epoch 2, .*last good checkpoint \(epoch 1\)"):
        trainer.run()
    assert hashlib.sha256((tmp_path / "checkpoint.pt").read_bytes()).hexdigest() == before
    assert [r["epoch"] for r in rows(tmp_path)] == [1]
    # in regrowth the lr in effect is lr_reset's, and a resume would refuse a changed one
    run_recipe(recipe(), tmp_path / "late", quiet=True, stop_after=4)
    late = Trainer(recipe(), tmp_path / "late", resume=True, quiet=True)
    with torch.no_grad():
        next(iter(late.hf.weight_parameters())).fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"Lower optimizer\.lr_reset .* start again with --overwrite"):
        late.run()


def test_learning_rate_follows_the_two_cosine_phases(tmp_path):
    trainer = Trainer(recipe(), tmp_path, quiet=True)
    opt = trainer.recipe["optimizer"]
    assert trainer.weight_lr(0, 0) == pytest.approx(opt["lr"])
    assert trainer.weight_lr(2, trainer.batches - 1) == pytest.approx(opt["lr_end"], rel=0.01)
    assert trainer.weight_lr(3, 0) == pytest.approx(opt["lr_reset"])
    assert trainer.weight_lr(4, trainer.batches - 1) == pytest.approx(opt["lr_final"], rel=0.05)
    lrs = [trainer.weight_lr(e, b) for e in range(3) for b in range(trainer.batches)]
    assert lrs == sorted(lrs, reverse=True)


def test_controller_every_counts_periods_but_phases_keep_their_epochs(tmp_path):
    trainer = Trainer(recipe("train.controller_every=20"), tmp_path, quiet=True)
    assert trainer.batches == 45 and trainer.periods == 3
    assert trainer.hf.pruning_epochs == 9 and trainer.hf.regrowth_epochs == 6
    assert trainer.hf.freeze_after == 3  # exact mode's default, half the 2 regrowth epochs, in periods
    # the defaults count epochs, converted to periods: the paper's 50 epochs, 3 regrowth epochs' 1
    for settings, periods in (("hyperflux.exact_target=false", 150), ("hyperflux.regrowth_epochs=3", 3)):
        other = Trainer(recipe("train.controller_every=20", settings), tmp_path / settings, quiet=True)
        assert other.hf.freeze_after == periods, settings
    trainer.stop_after = 1
    trainer.run()
    assert trainer.hf.period == 3  # stepped every 15 batches
    trainer.stop_after = None
    summary = trainer.run()
    assert abs(summary["sparsity"] - 0.9) < 1e-4
    assert trainer.hf.squashed


def test_metrics_rows_carry_flips_per_layer_and_the_flux_histogram(tmp_path):
    # three controller periods per epoch: the row sums the flips of all three, the histogram is the last one's
    summary = run_recipe(recipe("train.controller_every=20"), tmp_path, quiet=True)
    totals = {layer["name"]: layer["total"] for layer in summary["per_layer"]}
    metrics = rows(tmp_path)
    kept = dict(totals)  # every weight present at the start
    frozen_from = next((r["epoch"] for r in metrics if r["phase"] == "frozen"), None)
    trim_epoch = frozen_from - 1 if frozen_from else metrics[-1]["epoch"]  # whose last step froze the masks
    for row in metrics:
        assert list(row["layer_pruned"]) == list(row["layer_regrown"]) == list(row["layers"]) == list(totals)
        assert sum(row["layer_pruned"].values()) == row["pruned"]
        assert sum(row["layer_regrown"].values()) == row["regrown"]
        for name in totals:
            kept[name] += row["layer_regrown"][name] - row["layer_pruned"][name]
        # the flips add up to the masks, the exact trim at freeze included
        assert kept == {name: round(d * totals[name]) for name, d in row["layers"].items()}
        hist = row["flux_hist"]
        assert hist["edges"] == list(FLUX_HIST_EDGES)
        assert len(hist["survivors"]) == len(hist["pruned"]) == len(FLUX_HIST_EDGES) + 1
        present = sum(round(d * totals[name]) for name, d in row["layers"].items())
        if row["epoch"] != trim_epoch:  # the histogram is counted before the trim that freezes the masks
            assert sum(hist["survivors"]) == present
        assert sum(hist["survivors"]) + sum(hist["pruned"]) == row["total"] == sum(totals.values())
        assert row["pressure"] is not None and "flux_min" in row
    assert frozen_from is not None and sum(row["pruned"] for row in metrics) > 0.5 * summary["total"]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert not {"layers", "layer_pruned", "layer_regrown", "flux_hist"} & set(header)


def test_without_flux_sampling_rows_have_no_histogram(tmp_path):
    run_recipe(recipe("hyperflux.flux_every=0"), tmp_path, quiet=True, stop_after=1)
    (row,) = rows(tmp_path)
    assert "flux_hist" not in row and row["flux_min"] is None
    assert sum(row["layer_pruned"].values()) == row["pruned"]


def test_weight_decay_reaches_present_weights_only(tmp_path):
    trainer = Trainer(recipe(*SGD), tmp_path, quiet=True)
    name, weight = next(iter(trainer.masked.items()))
    with torch.no_grad():
        trainer.hf.gates[0].logits[0, :5] = -1.0  # close five gates
        weight.grad = torch.zeros_like(weight)
    trainer._decay_present(lr=0.1)
    mask = trainer.hf.masks()[name]
    assert torch.equal(weight.grad, 5e-4 * weight.detach() * mask)
    assert (weight.grad[0, :5] == 0).all() and (weight.grad[0, 5:] != 0).all()
    # the optimiser itself decays no masked weight, but does decay the other weights
    groups = trainer.weight_optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 5e-4]
    old = load_recipe(SMOKE, [*SHORT, *SGD, "optimizer.decay_pruned_weights=true"])
    authors = Trainer(old, tmp_path / "authors", quiet=True)
    assert authors.present_decay == 0.0
    assert authors.weight_optimizer.param_groups[0]["weight_decay"] == 5e-4


def test_dense_training_uses_the_same_recipe(tmp_path):
    summary = run_recipe(recipe("dense.epochs=2", "dense.lr=0.01"), tmp_path, dense=True, quiet=True)
    assert summary["method"] == "dense"
    assert summary["density"] == 1.0 and summary["epochs"] == 2
    assert summary["final_accuracy"] > 80
    state = load_file(tmp_path / "model.safetensors")
    assert "fc1.weight" in state and not any("parametrizations" in k for k in state)
    # the dense model is a valid starting point for a prune
    start = run_recipe(recipe(f"model.init_checkpoint={tmp_path}"), tmp_path / "pruned", quiet=True)
    assert start["final_accuracy"] > 80
    # a checkpoint of another architecture is a one-line recipe error, not a traceback
    with pytest.raises(RecipeError, match=r"does not fit the model \(size mismatch for fc1\.weight"):
        run_recipe(
            recipe(f"model.init_checkpoint={tmp_path}", "model.hidden=[32, 16]"), tmp_path / "x", quiet=True
        )


def test_a_holdout_run_evaluates_on_training_samples_set_aside(tmp_path):
    log = io.StringIO()
    run_recipe(recipe("data.holdout=300"), tmp_path / "holdout", quiet=True, stop_after=1, log=log)
    assert "holdout " in log.getvalue() and "test " not in log.getvalue()
    trainer = Trainer(recipe("data.holdout=300"), tmp_path / "again", quiet=True)
    assert len(trainer.train_loader.dataset) == 1437 - 300
    assert sum(len(labels) for _, labels in trainer.test_loader) == 300


def test_metrics_csv_keeps_its_columns_when_rows_differ(tmp_path):
    folder = RunFolder(tmp_path)
    folder.append_metrics({"epoch": 1, "loss": 0.5, "flux_min": None, "layers": {"a": 1.0}})
    folder.append_metrics({"loss": 0.25, "epoch": 2, "new_key": 7, "flux_min": -1.0})  # reordered, one more
    folder.append_metrics({"epoch": 3, "flux_min": 2.0})  # one fewer
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["epoch,loss,flux_min", "1,0.5,", "2,0.25,-1.0", "3,,2.0"]
    assert [row["epoch"] for row in folder.read_metrics()] == [1, 2, 3]
    assert folder.read_metrics()[1]["new_key"] == 7  # the JSONL keeps everything


def test_a_run_saved_before_a_recipe_key_existed_still_resumes(tmp_path):
    assert run_recipe(recipe(), tmp_path, quiet=True, stop_after=1) is None
    path = tmp_path / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["recipe"]["data"]["holdout"]  # as a run started before `data.holdout` was added
    torch.save(checkpoint, path)
    assert run_recipe(recipe(), tmp_path, quiet=True, resume=True) is not None
    checkpoint["recipe"]["data"]["holdout"] = 300  # a real change is still refused
    torch.save(checkpoint, path)
    (tmp_path / "summary.json").unlink()
    with pytest.raises(RunError, match=re.escape("(data.holdout 300 -> 0)")):
        run_recipe(recipe(), tmp_path, quiet=True, resume=True)


@pytest.mark.parametrize(
    ("setting", "model", "device", "expected"),
    [
        ("auto", torch.nn.Conv2d(1, 2, 3), "cpu", True),
        ("auto", torch.nn.Linear(4, 2), "cpu", False),
        ("auto", torch.nn.Conv2d(1, 2, 3), "cuda", False),
        ("on", torch.nn.Linear(4, 2), "cuda", True),
        ("off", torch.nn.Conv2d(1, 2, 3), "cpu", False),
    ],
)
def test_channels_last_is_chosen_for_conv_models_on_the_cpu(setting, model, device, expected):
    assert use_channels_last(setting, model, torch.device(device)) is expected


def test_a_conv_model_trains_channels_last_unless_turned_off(tmp_path):
    spec = yaml.safe_load(SMOKE.read_text()) | {"model": {"name": "resnet18", "width": 0.0625}}
    conv_recipe = tmp_path / "conv.yaml"
    conv_recipe.write_text(yaml.safe_dump(spec))
    summaries, first_rows = {}, {}
    for setting in ("auto", "off"):
        trainer = Trainer(
            load_recipe(conv_recipe, [*SHORT, f"channels_last={setting}"]), tmp_path / setting, quiet=True
        )
        conv = next(
            m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1
        )
        stored = conv.parametrizations.weight  # (with one input channel both layouts are the same strides)
        assert stored.original.is_contiguous(memory_format=torch.channels_last) is (setting == "auto")
        assert stored[0].logits.stride() == stored.original.stride()  # masks take the weights' layout
        summaries[setting] = trainer.run()
        first_rows[setting] = rows(tmp_path / setting)[0]
        saved = load_file(tmp_path / setting / "model.safetensors")
        assert saved["conv1.weight"].is_contiguous()  # files hold plain row-major tensors either way
    # the exact-target trim writes into channels-last logits too
    assert summaries["auto"]["kept"] == summaries["off"]["kept"] == round(0.1 * summaries["off"]["total"])


def test_a_prepared_conv_model_computes_the_same_in_both_layouts():
    torch.manual_seed(0)
    model = build_model_by_name("resnet18", in_channels=1, image_size=8, width=0.0625)
    hf = Hyperflux(model, 0.9, pruning_epochs=2)
    with torch.no_grad():
        for gate in hf.gates:  # close a third of the gates, so that the masks matter
            gate.logits.copy_(torch.rand_like(gate.logits) - 0.33)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    losses = []
    for net, images in ((model, x), (last, x.contiguous(memory_format=torch.channels_last))):
        loss = torch.nn.functional.cross_entropy(net(images), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), b in zip(model.named_parameters(), last.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("dense", [False, True])
def test_grad_clip_bounds_every_trained_parameter(tmp_path, dense):
    # a vanishing clip norm with plain SGD: nothing the weight optimiser holds may move, biases included
    clipped = recipe(
        "train.grad_clip=1e-12", "optimizer.name=sgd", "optimizer.momentum=0.0", "optimizer.lr=0.1"
    )
    trainer = Trainer(clipped, tmp_path, dense=dense, quiet=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "logits" not in k}
    trainer.run()
    after = trainer.model.state_dict()
    for key, value in before.items():
        final = after[key.replace(".parametrizations.weight.original", ".weight")]  # squashed: plain keys
        present = final != 0  # squash() zeroed the pruned weights; the present ones must not have moved
        assert torch.allclose(final[present], value[present], atol=1e-9), key


@pytest.mark.parametrize("dense", [False, True])
def test_every_method_trains_with_denormals_flushed_and_leaves_them_as_they_were(tmp_path, dense):
    """Pruned weights' optimiser moments decay through denormals, which the CPU computes many times slower."""
    trainer = Trainer(recipe(), tmp_path, dense=dense, quiet=True)
    survived = []
    trainer.weight_optimizer.register_step_pre_hook(lambda *_: survived.append(denormals_survive()))
    trainer.stop_after = 1
    trainer.run()
    assert survived and not any(survived)
    assert denormals_survive()


def test_loading_a_run_repeats_none_of_its_training_time_warnings(tmp_path):
    with pytest.warns(UserWarning, match="in 3 periods the trajectory reaches"):
        run_recipe(recipe(), tmp_path, quiet=True, stop_after=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_run(tmp_path).hf is not None


def test_the_summary_records_the_lr_end_a_run_derived(tmp_path):
    summary = run_recipe(recipe("optimizer.lr_end=null", "optimizer.lr=0.003"), tmp_path, quiet=True)
    assert summary["recipe"]["optimizer"]["lr_end"] == pytest.approx(1e-4)
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["optimizer"]["lr_end"] is None


def test_a_run_that_ends_far_from_its_target_says_so(tmp_path):
    """The paper's form on a budget too short for its target ends far off it; the run says so at its end, and
    an exact-target run, which ends on it, says nothing."""
    short = ["hyperflux.pruning_epochs=2", "hyperflux.regrowth_epochs=1", "hyperflux.target_sparsity=0.95"]
    with pytest.warns(UserWarning, match=r"the run ended at \d+\.\d\d% sparsity against a target of 95\.00%"):
        summary = run_recipe(
            load_recipe(SMOKE, [*short, "method=hyperflux-paper"]), tmp_path / "p", quiet=True
        )
    assert abs(summary["sparsity"] - 0.95) > 0.01
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_recipe(load_recipe(SMOKE, short), tmp_path / "e", quiet=True)
    assert not [w for w in caught if "the run ended at" in str(w.message)]


def test_an_unreadable_test_image_keeps_the_epochs_training(tmp_path, monkeypatch):
    """A corrupt image in val/ surfaces at the first evaluation, after a whole epoch of training (hours on
    ImageNet): the epoch is checkpointed, without a test accuracy, before the error is raised."""
    import hyperflux.training as training

    real = training.evaluate

    def unreadable(*args, **kwargs):
        raise data.DataError("val/cat/0.png: not a readable image; replace or remove it")

    monkeypatch.setattr(training, "evaluate", unreadable)
    with pytest.raises(data.DataError, match="not a readable image"):
        run_recipe(recipe(), tmp_path, quiet=True)
    assert [(r["epoch"], r["test_accuracy"]) for r in rows(tmp_path)] == [(1, None)]
    monkeypatch.setattr(training, "evaluate", real)
    summary = run_recipe(recipe(), tmp_path, quiet=True, resume=True)
    assert [r["epoch"] for r in rows(tmp_path)] == [1, 2, 3, 4, 5]
    assert summary["final_accuracy"] > 50


def test_run_files_are_written_with_the_processs_permissions_and_no_temporary_left(tmp_path):
    """Atomic writes go through a temporary file of their own name: the file renamed into place gets the
    permissions an ordinary write would, and a kill's leftover is removed when a run next holds the folder."""
    from hyperflux.runfiles import atomic_write

    umask = os.umask(0o022)
    os.umask(umask)
    run_recipe(recipe(), tmp_path, quiet=True, stop_after=1)
    for name in ("checkpoint.pt", "recipe.yaml"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
    atomic_write(tmp_path / "notes.txt", "twice")
    atomic_write(tmp_path / "notes.txt", "written")
    assert (tmp_path / "notes.txt").read_text() == "written"
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / ".checkpoint.pt.0123abcd.tmp").write_bytes(b"a kill's half-written checkpoint")
    run_recipe(recipe(), tmp_path, quiet=True, resume=True, stop_after=1)
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_progress_bar_prints_the_figures_of_the_batch_it_reaches(tmp_path, monkeypatch):
    """Figures set on a timer of their own lagged the bar's prints: it showed an earlier batch's loss."""
    import hyperflux.training as training

    printed, set_at = [], []

    class Recorded(training.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})
            self.mininterval = 0  # a print at every batch

        def set_postfix(self, *args, **kwargs):
            set_at.append(self.n)
            super().set_postfix(*args, **kwargs)

        def display(self, *args, **kwargs):
            if set_at:
                printed.append((self.n, set_at[-1]))
            return super().display(*args, **kwargs)

    monkeypatch.setattr(training, "tqdm", Recorded)
    run_recipe(recipe("hyperflux.pruning_epochs=1", "hyperflux.regrowth_epochs=0"), tmp_path, quiet=True)
    during = [(n, at) for n, at in printed if n > 1]
    assert len(during) > 20 and all(at == n - 1 for n, at in during)


def csv_epochs(folder: Path) -> list[str]:
    with open(folder / "metrics.csv", newline="") as handle:
        return [r["epoch"] for r in csv.DictReader(handle)]


def test_resume_writes_a_lost_csv_again_and_warns_of_metrics_rows_lost(tmp_path):
    """A deleted metrics.csv went on with the resumed epochs only; a deleted metrics.jsonl went on in
    silence, the report then plotting a run that began later."""
    whole = tmp_path / "whole"
    run_recipe(recipe(), whole, quiet=True)
    csv_lost, jsonl_lost = tmp_path / "csv", tmp_path / "jsonl"
    for folder in (csv_lost, jsonl_lost):
        run_recipe(recipe(), folder, quiet=True, stop_after=2)
    (csv_lost / "metrics.csv").unlink()
    run_recipe(recipe(), csv_lost, quiet=True, resume=True)
    assert csv_epochs(csv_lost) == list("12345")
    (jsonl_lost / "metrics.jsonl").unlink()
    with open(jsonl_lost / "metrics.csv", newline="") as handle:
        last = handle.read().splitlines(keepends=True)[-1]
    with open(jsonl_lost / "metrics.csv", "a", newline="") as handle:  # epoch 3's, before a kill
        handle.write(last.replace("2", "3", 1))
    with pytest.warns(
        UserWarning, match=r"metrics\.jsonl lacks the rows of epochs 1, 2 of the checkpoint's 2"
    ):
        run_recipe(recipe(), jsonl_lost, quiet=True, resume=True)
    assert [r["epoch"] for r in rows(jsonl_lost)] == [3, 4, 5]
    assert csv_epochs(jsonl_lost) == list("12345")


def test_no_progress_bar_is_drawn_into_a_log_file_and_the_epoch_lines_are(tmp_path, capsys):
    """Where stderr is not a terminal (a batch job's log) the bar's redraws were one long line of \\r."""
    import hyperflux.training as training

    run_recipe(recipe(), tmp_path, quiet=False)
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "it/s" not in captured.err
    lines = [line for line in (captured.out + captured.err).splitlines() if line.startswith("epoch ")]
    assert len(lines) == 5
    # the run's time to go, which the bar (the epoch's) does not give
    assert all(re.search(r"  eta (\d+m\d\ds|\d+s)$", line) for line in lines[:4]) and "eta" not in lines[4]
    assert [training._duration(s) for s in (41.4, 192, 7500)] == ["41s", "3m12s", "2h05m"]


def test_an_unreadable_test_image_is_raised_on_every_rank_after_the_evaluations_sum(monkeypatch):
    """Raised on one rank before the all-reduce, the others waited in it for ever."""
    import hyperflux.training as training

    model = torch.nn.Linear(4, 2)
    good = [(torch.randn(3, 4), torch.tensor([0, 1, 0]))]
    calls = []

    def other_rank_failed(totals):
        calls.append(totals.clone())
        return totals + torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=totals.dtype)

    monkeypatch.setattr(training.distributed, "all_sum", other_rank_failed)
    with pytest.raises(data.DataError, match="another rank could not read a test image"):
        training.evaluate(model, good, torch.device("cpu"))

    def unreadable():
        yield good[0]
        raise data.DataError("val/cat/0.png: not a readable image")

    monkeypatch.setattr(
        training.distributed, "all_sum", lambda totals: calls.append(totals.clone()) or totals
    )
    with pytest.raises(data.DataError, match=r"val/cat/0\.png"):
        training.evaluate(model, unreadable(), torch.device("cpu"))
    assert len(calls) == 2 and calls[1][3] == 1  # this rank joined the sum, flagging its failure


def test_a_model_of_ones_own_is_named_package_module_factory(tmp_path, monkeypatch):
    """The CLI and recipes took the registry's models only: `model.name: package.module:Factory` builds one's
    own, given the data's sizes it asks for and the recipe's other model keys."""
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes, hidden=16):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))\n"
        "def not_a_model(**kwargs):\n"
        "    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    own = recipe("model.name=my_models:tiny", "model.hidden=24")
    summary = run_recipe(own, tmp_path / "run", quiet=True)
    assert summary["sparsity"] == pytest.approx(0.9, abs=5e-4)
    assert [layer["shape"] for layer in summary["per_layer"]] == [[24, 64], [10, 24]]
    assert load_run(tmp_path / "run").model[1].out_features == 24  # rebuilt from the saved recipe
    with pytest.raises(RecipeError, match=r"'model.width': my_models:tiny takes no width"):
        recipe("model.name=my_models:tiny", "model.width=2")
    with pytest.raises(RecipeError, match=r"returned a int object, not a torch.nn.Module"):
        Trainer(recipe("model.name=my_models:not_a_model"), tmp_path / "bad", quiet=True)
