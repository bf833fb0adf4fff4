"""torchrun with two CPU processes (gloo): identical masks on every rank after every epoch, rank-0-only files,
the single-process result, and resume across world sizes; plus the rank sharding of the batch loader."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperflux import distributed
from hyperflux.cli import main
from hyperflux.data.sets import BatchLoader, ImageSet, RandomCropFlip

SMOKE = str(Path(__file__).parent.parent / "recipes" / "smoke-digits.yaml")
# freeze_after=1: the masks freeze after the first regrowth epoch and one more epoch trains, so the DDP wrapper
# is rebuilt mid-run (a stale one would wait forever for the frozen logits' gradients)
SHORT = [
    "--set",
    "hyperflux.pruning_epochs=3",
    "--set",
    "hyperflux.regrowth_epochs=2",
    "--set",
    "hyperflux.freeze_after=1",
]
RANK0_FILES = {
    ".lock",  # rank 0 holds the folder while it trains
    "recipe.yaml",
    "metrics.jsonl",
    "metrics.csv",
    "checkpoint.pt",
    "model.safetensors",
    "summary.json",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(out: Path, *extra: str) -> str:
    """`torchrun --nproc_per_node 2 -m hyperflux prune` on the smoke recipe; returns its output."""
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_ENV}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "hyperflux",
        "prune",
        SMOKE,
        *SHORT,
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["prune", SMOKE, *SHORT, "--out", str(out), "--quiet", "--no-report"]) == 0
    return out


def test_two_ranks_keep_identical_masks_and_match_one_process(tmp_path, single):
    out = tmp_path / "ddp"
    stdout = torchrun(out, "--no-report")
    assert {p.name for p in out.iterdir()} == RANK0_FILES
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]  # one writer: no duplicated rows
    assert stdout.count("epoch 1/5") == 1  # epoch lines from rank 0 only
    for row in rows:
        hashes = row["mask_hashes"]
        assert len(hashes) == 2 and hashes[0] == hashes[1], row["epoch"]
    assert [r["phase"] for r in rows] == ["pruning"] * 3 + ["regrowth", "frozen"]

    summary = json.loads((out / "summary.json").read_text())
    expected = json.loads((single / "summary.json").read_text())
    assert summary["world_size"] == 2 and expected["world_size"] == 1
    # exact-target mode ends at the same count; the paths agree to float rounding (halves summed by DDP)
    assert summary["kept"] == expected["kept"]
    assert abs(summary["sparsity"] - expected["sparsity"]) < 1e-3
    for ours, theirs in zip(rows, metrics(single), strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        assert ours["density"] == pytest.approx(theirs["density"], abs=1e-3)
        # the flux of the ranks' halves of each sampled batch, averaged: the single process's figures
        assert ours["flux_batches"] == theirs["flux_batches"]
        if theirs["flux_mean"] is None:
            assert ours["flux_mean"] is None
        else:
            assert ours["flux_mean"] == pytest.approx(theirs["flux_mean"], rel=1e-3, abs=1e-6)


def test_a_rank_whose_first_eval_share_is_empty_finishes(tmp_path):
    """An eval batch of one, split over two ranks, leaves rank 1 an empty share: the MAC count at the end takes
    the test split's first sample on every rank instead of failing there after training."""
    out = tmp_path / "run"
    quick = ["--set", "hyperflux.pruning_epochs=1", "--set", "hyperflux.regrowth_epochs=1"]
    torchrun(out, "--no-report", "--set", "train.eval_batch_size=1", *quick)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["macs"]["dense_macs_per_sample"] > summary["macs"]["sparse_macs_per_sample"] > 0


def test_a_run_resumes_on_another_world_size(tmp_path, single):
    out = tmp_path / "resumed"
    assert (
        main(["prune", SMOKE, *SHORT, "--out", str(out), "--quiet", "--no-report", "--stop-after", "2"]) == 0
    )
    torchrun(out, "--resume", "--no-report")
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert "mask_hashes" not in rows[1] and len(rows[2]["mask_hashes"]) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == json.loads((single / "summary.json").read_text())["kept"]
    # the two processes carried on from the checkpoint (logits, optimisers, schedule), not from fresh state
    for ours, theirs in zip(rows, metrics(single), strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        assert ours["density"] == pytest.approx(theirs["density"], abs=1e-3)


def test_shards_of_a_global_batch_are_the_single_process_batch():
    images = torch.randint(0, 256, (23, 1, 6, 6), dtype=torch.uint8)
    dataset = ImageSet(images, torch.arange(23) % 10, mean=(0.5,), std=(0.25,))
    whole = BatchLoader(dataset, 8, shuffle=True, seed=3, augment=RandomCropFlip(padding=2))
    whole.set_epoch(4)
    shards = [whole.shard(rank, 3) for rank in range(3)]
    for shard in shards:
        shard.set_epoch(4)
    for index, (batch, *parts) in enumerate(zip(whole, *shards, strict=True)):
        assert sum(len(p[1]) for p in parts) == len(batch[1]) == whole.global_size(index)
        assert max(len(p[1]) for p in parts) - min(len(p[1]) for p in parts) <= 1
        assert torch.equal(torch.cat([p[0] for p in parts]), batch[0])  # augmented as one process would
        assert torch.equal(torch.cat([p[1] for p in parts]), batch[1])
    assert len(shards[2]) == len(whole) == 3
    with pytest.raises(ValueError, match="rank"):
        whole.shard(3, 3)


SKIPPED_LAYER = """
import gc, json, os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
import hyperflux


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.last = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x, skip):
        h = self.first(x).relu()
        return h if skip else self.last(h)


def flux(rank, attach):
    torch.manual_seed(0)
    net = Net()
    hf = hyperflux.Hyperflux(net, 0.5, pruning_epochs=2, flux_every=1)
    ddp = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    optimizer = torch.optim.SGD(hf.param_groups(lr=0.0), lr=0.0)
    if attach:
        hf.attach(optimizer)
    torch.manual_seed(1 + rank)
    for _ in range(4):
        loss = ddp(torch.randn(8, 4), rank == 1).pow(2).mean()  # rank 1 skips the last layer
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    hf._sync_flux()
    result = [g.flux_batches for g in hf.gates], hf.gates[1].mean_flux().flatten().tolist()
    # this DDP's reducer torn down on both ranks before the next one is built on the same group
    del ddp
    gc.collect()
    dist.barrier()
    return result


def worker(rank, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {str(attach): flux(rank, attach) for attach in (True, False)}
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(results, handle)
    # both ranks past every collective before either tears the group down: a rank that left first aborted
    # the other's gloo threads about one run in five ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
"""


def test_the_flux_of_a_layer_one_rank_skips_is_averaged_as_ddp_averages_its_gradient(tmp_path):
    """Without attach() each rank's flux comes from its own backward pass; a rank that skipped the layer adds
    zeros, as DDP averages its gradient in, so both forms report the same flux and keep the batch count."""
    script, out = tmp_path / "skip.py", tmp_path / "out.json"
    script.write_text(SKIPPED_LAYER)
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_ENV}
    done = subprocess.run(
        [sys.executable, str(script), str(free_port()), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    (attached_counts, attached), (own_counts, own) = results["True"], results["False"]
    assert attached_counts == own_counts == [4, 4]
    assert torch.allclose(torch.tensor(own), torch.tensor(attached), rtol=1e-5, atol=1e-9)


def test_helpers_are_no_ops_without_a_process_group(monkeypatch):
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched_by_torchrun()
    assert not distributed.init_from_env(torch.device("cpu"))
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    value = torch.tensor([1.5, 2.0])
    assert distributed.all_sum(value) is value and value.tolist() == [1.5, 2.0]
    assert distributed.gather("x") == ["x"]
    distributed.barrier()
