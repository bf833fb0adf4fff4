"""The torchrun side of the trainer: join the process group torchrun describes, and the few collectives a run
needs. Every helper is a no-op without a process group, so the same code path serves one process or N.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Variables torchrun (torch.distributed.run) sets for every worker it starts.
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True in a worker of a multi-process torchrun launch (a single-process launch trains as usual)."""
    return all(name in os.environ for name in TORCHRUN_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def launch_rank() -> int | None:
    """This process's rank in a multi-process torchrun launch, else None; known before any group is joined."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else None


def init_from_env(device: torch.device, timeout_s: float = 1800.0) -> bool:
    """Join torchrun's process group (NCCL for CUDA, gloo otherwise); True when this call created it.

    The caller that created the group destroys it (`close`); a group the user's own code set up is left alone.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True when collectives must run: a process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank; after the group is closed, the one torchrun gave it."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0)) if launched_by_torchrun() else 0


def is_main() -> bool:
    """The rank that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place, and return it (NaN anywhere makes the sum NaN everywhere)."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (a small picklable object), in rank order, on every rank."""
    if not active():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
