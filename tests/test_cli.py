"""The command line on digits: exit codes, files written, summary fields, one-line errors."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hyperflux import cli, models
from hyperflux.cli import main

SMOKE = str(Path(__file__).parent.parent / "recipes" / "smoke-digits.yaml")
SHORT = ["--set", "hyperflux.pruning_epochs=3", "--set", "hyperflux.regrowth_epochs=2"]
RUN_FILES = {
    "recipe.yaml",
    "metrics.jsonl",
    "metrics.csv",
    "checkpoint.pt",
    "model.safetensors",
    "summary.json",
    "report.html",
    "density.png",
    "pressure.png",
    "accuracy.png",
    "layers.png",
}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """The full smoke recipe, as shipped: 90% sparsity on digits."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    assert main(["prune", SMOKE, "--out", str(out), "--quiet"]) == 0
    return out


def test_prune_writes_the_run_folder_and_a_complete_summary(smoke_run):
    assert {p.name for p in smoke_run.iterdir()} >= RUN_FILES
    summary = json.loads((smoke_run / "summary.json").read_text())
    for key in (
        "final_accuracy",
        "sparsity",
        "density",
        "target_sparsity",
        "per_layer",
        "epochs",
        "wall_time_s",
    ):
        assert key in summary
    assert summary["method"] == "hyperflux" and summary["seed"] == 0
    assert summary["recipe"]["name"] == "smoke-digits"
    assert summary["target_sparsity"] == 0.9 and summary["epochs"] == 30
    assert summary["density"] + summary["sparsity"] == pytest.approx(1.0)
    assert summary["kept"] == round(0.1 * summary["total"])  # exact mode: the requested count
    assert sum(layer["kept"] for layer in summary["per_layer"]) == summary["kept"]
    assert {layer["name"] for layer in summary["per_layer"]} == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert summary["final_accuracy"] > 90
    # an MLP uses each weight once per sample: its MACs are its weight counts
    assert summary["macs"]["dense_macs_per_sample"] == summary["total"]
    assert summary["macs"]["sparse_macs_per_sample"] == summary["kept"]
    metrics = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["test_accuracy"] == summary["final_accuracy"]
    assert len((smoke_run / "metrics.csv").read_text().splitlines()) == 31  # header + 30 epochs


def test_eval_reads_checkpoint_folder_and_safetensors_alike(smoke_run, capsys):
    summary = json.loads((smoke_run / "summary.json").read_text())
    expected = f"test accuracy {summary['final_accuracy']:.2f}%"
    sparsity = f"sparsity {100 * summary['sparsity']:.3f}%"
    for target in (smoke_run, smoke_run / "checkpoint.pt", smoke_run / "model.safetensors"):
        assert main(["eval", str(target), "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        assert expected in out and sparsity in out, (target, out)


def test_eval_evaluates_as_the_run_did_in_its_memory_order(smoke_run, capsys, monkeypatch):
    """A convolutional run trained and evaluated itself in channels-last (and, on CUDA, its autocast dtype):
    eval takes the same settings, so that it reads the accuracy the run reported, at the run's speed."""
    from hyperflux import training

    seen = []
    original = training.evaluate
    monkeypatch.setattr(training, "use_channels_last", lambda setting, model, device: True)
    monkeypatch.setattr(
        training,
        "evaluate",
        lambda model, loader, device, amp=None, channels_last=False: (
            seen.append((amp, channels_last)) or original(model, loader, device, amp, channels_last)
        ),
    )
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert main(["eval", str(smoke_run), "--device", "cpu", "--threads", "1"]) == 0
    assert f"test accuracy {summary['final_accuracy']:.2f}%" in capsys.readouterr().out
    assert seen == [(None, True)]


def test_a_method_set_on_the_command_line_gets_its_own_default_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["prune", SMOKE, *SHORT, "--set", "method=random", "--quiet", "--no-report"]) == 0
    assert (tmp_path / "runs" / "smoke-digits-random" / "summary.json").is_file()
    assert not (tmp_path / "runs" / "smoke-digits").exists()
    assert (
        main(["prune", SMOKE, *SHORT, "--set", "method=null", "--quiet", "--no-report", "--stop-after", "1"])
        == 0
    )
    assert (tmp_path / "runs" / "smoke-digits" / "checkpoint.pt").is_file()  # no method chosen: the recipe's


def test_warnings_read_as_one_cli_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["prune", SMOKE, *SHORT, "--set", "amp=bf16", "--out", str(out), "--quiet", "--stop-after", "1"])
        == 0
    )
    err = capsys.readouterr().err
    assert "hyperflux prune: warning: amp: bf16 runs on CUDA only" in err
    assert "UserWarning" not in err and ".py:" not in err


def test_resume_and_overwrite_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prune", SMOKE, "--resume", "--overwrite"])
    assert exit_.value.code == 2
    assert "not allowed with argument --resume" in capsys.readouterr().err


def test_resuming_a_finished_run_says_it_had_finished(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", SMOKE, *SHORT, "--out", str(out), "--quiet", "--no-report"]) == 0
    assert "had finished already" not in capsys.readouterr().out
    assert main(["prune", SMOKE, *SHORT, "--out", str(out), "--quiet", "--no-report", "--resume"]) == 0
    assert f"{out} had finished already: nothing was trained" in capsys.readouterr().out


def test_under_torchrun_rank_0_alone_warns_and_each_error_names_its_rank(tmp_path, monkeypatch, capsys):
    from hyperflux import distributed

    launch = {"LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for name, value in {**launch, "RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.launched_by_torchrun()
    cli._one_line_warning("prune")("a warning", UserWarning, "f.py", 1)
    assert main(["eval", str(tmp_path / "nowhere")]) == 2  # fails before any process group is joined
    err = capsys.readouterr().err
    assert "warning" not in err and "hyperflux eval: error (rank 1): " in err
    monkeypatch.setenv("RANK", "0")
    cli._one_line_warning("prune")("a warning", UserWarning, "f.py", 1)
    assert capsys.readouterr().err == "hyperflux prune: warning: a warning\n"


def test_a_missing_recipe_file_is_named_as_missing(smoke_run, tmp_path, capsys):
    missing = tmp_path / "nothere.yaml"
    assert main(["eval", str(smoke_run / "model.safetensors"), "--recipe", str(missing)]) != 0
    assert f"{missing}: no such recipe file" in one_line_error(capsys)


def test_commands_on_an_unfinished_run_say_which_epoch_they_read(smoke_run, tmp_path, capsys):
    assert main(["eval", str(smoke_run), "--device", "cpu"]) == 0
    assert "stopped at" not in capsys.readouterr().err  # a finished run: nothing to say
    part = tmp_path / "part"
    assert main(["prune", SMOKE, *SHORT, "--out", str(part), "--quiet", "--stop-after", "2"]) == 0
    capsys.readouterr()
    for command in (["eval", str(part)], ["summary", str(part)], ["export", str(part), "--format", "sparse"]):
        assert main(command) == 0
        err = capsys.readouterr().err
        assert f"hyperflux {command[0]}: note: {part} stopped at epoch 2 of 5" in err, (command, err)


def test_summary_prints_the_per_layer_table_and_macs(smoke_run, capsys):
    for target in (smoke_run, smoke_run / "model.safetensors"):
        assert main(["summary", str(target)]) == 0
        out = capsys.readouterr().out
        for name in ("fc1.weight", "fc2.weight", "fc3.weight", "total"):
            assert name in out
        macs = out.split("MACs/sample dense")[1]  # the MAC table follows the mask table
        summary = json.loads((smoke_run / "summary.json").read_text())
        assert f"{summary['kept']:,}" in macs.splitlines()[-1]


def test_train_and_a_stopped_run(tmp_path, capsys):
    assert (
        main(["train", SMOKE, *SHORT, "--set", "dense.epochs=1", "--out", str(tmp_path / "d"), "--quiet"])
        == 0
    )
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["method"] == "dense"
    out = tmp_path / "a run"  # the hint quotes what a shell would split
    assert main(["prune", SMOKE, *SHORT, "--out", str(out), "--quiet", "--stop-after", "1"]) == 0
    hint = shlex.split(capsys.readouterr().out.split("continue with: ")[1])
    assert hint[-1] == "--resume" and hint[hint.index("--out") - 4 :] == [
        *SHORT,
        "--out",
        str(out),
        "--resume",
    ]
    assert main(["prune", SMOKE, *SHORT, "--out", str(out), "--quiet"]) == 2
    assert "already holds a run" in one_line_error(capsys)
    assert main(["prune", SMOKE, *SHORT, "--out", str(out), "--quiet", "--resume"]) == 0
    assert (out / "summary.json").exists()


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["prune", "missing.yaml"], 2, "missing.yaml: no such recipe file"),
        (
            ["prune", SMOKE, "--set", "optimizer.lr=abc"],
            2,
            "recipe key 'optimizer.lr': expected a positive number",
        ),
        (["prune", SMOKE, "--set", "model.widht=2"], 2, "recipe key 'model.widht': lenet300 takes no widht"),
        (["prune", SMOKE, "--set", "data.name=mnist", "--set", "data.root=/nonexistent"], 1, "/nonexistent"),
        (["prune", SMOKE, "--set", "hyperflux.names=conv.*"], 2, "matches no prunable tensor"),
        (["eval", "/nonexistent/run"], 2, "no such file"),
        (["report", "/nonexistent/run"], 2, "no metrics.jsonl"),
        (["data", "fetch", "imagenet2"], 1, "unknown data set 'imagenet2'"),
    ],
)
def test_user_errors_end_with_one_line_and_a_status(tmp_path, capsys, argv, status, message):
    argv = [*argv, "--out", str(tmp_path / "run")] if argv[0] == "prune" else argv
    assert main(argv) == status
    assert message in one_line_error(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["prune"], "the following arguments are required: RECIPE"), (["frobnicate"], "invalid choice")],
)
def test_usage_errors_end_with_one_line_and_status_2(capsys, argv, message):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert message in one_line_error(capsys)


def test_a_diverging_run_stops_with_one_line(tmp_path, capsys):
    argv = ["prune", SMOKE, *SHORT, "--set", "optimizer.lr=1e30", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 1
    assert "loss became non-finite in epoch 1" in one_line_error(capsys)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("command", ["prune", "train", "eval", "summary", "report", "data", "data fetch"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as caught:
        main([*command.split(), "--help"])
    assert caught.value.code == 0
    assert "usage: hyperflux" in capsys.readouterr().out


def test_python_dash_m_runs_the_same_cli():
    done = subprocess.run(
        [sys.executable, "-m", "hyperflux", "prune", "missing.yaml"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "hyperflux prune: error: missing.yaml: no such recipe file"
    done = subprocess.run(
        [sys.executable, "-m", "hyperflux", "--version"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stdout.startswith("hyperflux ")


def test_a_holdout_run_says_holdout_wherever_it_reports_accuracy(tmp_path, capsys):
    out = tmp_path / "holdout"
    assert main(["prune", SMOKE, *SHORT, "--set", "data.holdout=300", "--out", str(out), "--quiet"]) == 0
    assert "final holdout accuracy" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["evaluated_on"] == "holdout"
    assert main(["eval", str(out)]) == 0
    assert capsys.readouterr().out.startswith("holdout accuracy")
    assert main(["eval", str(out), "--test-split"]) == 0
    assert capsys.readouterr().out.split("images")[0].endswith("360 digits ")  # the whole test split
    assert "final holdout accuracy (last epoch)" in (out / "report.html").read_text()


def test_path_mistakes_are_one_line_errors(tmp_path, smoke_run, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["prune", SMOKE, *SHORT, "--out", str(afile), "--quiet"]) == 2
    assert f"{afile} is a file, not a run folder" in one_line_error(capsys)
    assert main(["export", str(smoke_run), "--format", "sparse", "--out", str(tmp_path)]) == 2  # a folder
    one_line_error(capsys)
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind


def test_bench_threads_and_eval_device_errors_are_one_line(smoke_run, capsys):
    assert main(["bench", str(smoke_run), "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in one_line_error(capsys)
    assert main(["eval", str(smoke_run), "--device", "meta"]) == 2
    assert "device: expected auto, cpu, cuda, cuda:N or mps, got 'meta'" in one_line_error(capsys)


def test_export_says_larger_when_the_sparse_file_is(tmp_path, capsys):
    torch.manual_seed(0)
    model = models.build("lenet300", num_classes=10, in_channels=1, image_size=8, hidden=(128, 64))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))  # dense: nothing to store sparsely
    shutil.copy(SMOKE, tmp_path / "recipe.yaml")
    assert main(["export", str(tmp_path / "model.safetensors"), "--format", "sparse"]) == 0
    assert re.search(r"\d\.\d\dx larger\)$", capsys.readouterr().out.strip())


def test_an_interrupt_says_resume_goes_on_only_from_a_saved_checkpoint(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_prune", interrupted)
    assert main(["prune", SMOKE]) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "--resume once it has saved a checkpoint" in err and "run the same command again" in err


def test_a_closed_output_pipe_ends_quietly_and_another_broken_pipe_is_an_error(monkeypatch, capsys):
    """`hyperflux bench ... | head`: the reader closing stdout's pipe is no error; a broken pipe of a worker or
    socket is one."""

    def piped(args):
        raise BrokenPipeError(32, "Broken pipe")

    class ClosedPipe(io.StringIO):
        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_kernels", piped)
    assert main(["kernels"]) == cli.EXIT_INPUT  # stdout still open: the error is someone else's
    assert "Broken pipe" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdout", ClosedPipe())  # no file descriptor to point at /dev/null either
    assert main(["kernels"]) == 0
    assert capsys.readouterr().err == ""


def test_an_interrupted_prune_prints_the_command_that_continues_it(tmp_path, monkeypatch, capsys):
    from hyperflux import training

    original = training.Trainer._train_epoch
    epochs = []

    def interrupted_in_the_second_epoch(self, *args, **kwargs):
        epochs.append(self.epoch)
        if len(epochs) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(training.Trainer, "_train_epoch", interrupted_in_the_second_epoch)
    out = tmp_path / "run"
    assert main(["prune", SMOKE, *SHORT, "--out", str(out), "--quiet"]) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err.strip()
    assert err.startswith("hyperflux prune: interrupted; continue with: hyperflux prune ")
    assert shlex.split(err.split("continue with: ")[1])[3:] == [*SHORT, "--out", str(out), "--resume"]
    # replacing that run and interrupted in its first epoch: the checkpoint there is the old run's
    epochs[:] = [0]
    assert main(["prune", SMOKE, *SHORT, "--out", str(out), "--quiet", "--overwrite"]) == cli.EXIT_INTERRUPTED
    assert (
        capsys.readouterr().err.strip().endswith("interrupted; no checkpoint yet: run the same command again")
    )


def test_sigterm_during_a_run_ends_it_as_an_interrupt_does():
    """Batch schedulers stop jobs with SIGTERM, which ended a run without saying how to resume it."""
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(cli.Terminated), cli._terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_full_disk_mid_run_is_a_run_failure_that_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    import errno

    import hyperflux.training as training

    out = tmp_path / "run"
    assert (
        main(["prune", SMOKE, "--set", "hyperflux.pruning_epochs=2", "--out", str(out), "--stop-after", "1"])
        == 0
    )
    capsys.readouterr()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training, "run_recipe", full)
    argv = ["prune", SMOKE, "--set", "hyperflux.pruning_epochs=2", "--out", str(out), "--resume"]
    assert main(argv) == cli.EXIT_RUN
    err = capsys.readouterr().err
    assert (
        "No space left on device; free space or mend the disk, then continue with: hyperflux prune" in err
        and "--resume" in err
    )

    def missing(*args, **kwargs):
        raise OSError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(training, "run_recipe", missing)
    assert main(argv) == cli.EXIT_INPUT  # another OS error stays a matter of the input


def test_commands_on_a_run_still_training_say_so(tmp_path, capsys):
    from hyperflux.runfiles import exclusive, in_progress

    out = tmp_path / "run"
    assert (
        main(["prune", SMOKE, "--set", "hyperflux.pruning_epochs=2", "--out", str(out), "--stop-after", "1"])
        == 0
    )
    capsys.readouterr()
    assert main(["summary", str(out)]) == 0
    assert "stopped at epoch 1 of 12 (continue the run with --resume)" in capsys.readouterr().err
    with exclusive(out):  # the lock a training process holds
        assert in_progress(out)
        assert main(["summary", str(out)]) == 0
        assert "is training (its last checkpoint: epoch 1 of 12)" in capsys.readouterr().err
    assert not in_progress(out)
