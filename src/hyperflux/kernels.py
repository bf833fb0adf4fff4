"""Optional compiled kernels (`csrc/kernels.cpp`), built on first use with the machine's C++ compiler.

The sparse-inference product (torch's sparse CSR matmul wants the batch transposed; this one reads it as it is, a
tile of rows at a time, vectorised across the tile; BENCHMARKS.md has the speed-ups), the training gate (one pass
each way instead of two on the CPU, and on any device an autograd node with no Python in its backward, which on a
GPU computes with ATen ops), the sparsifier's per-tensor statistics in one pass, and the denormal flag set on
every intra-op thread. They are built on first use, once per
machine, CPU type and torch version (and again when kernels.cpp changes), into torch's extension cache
(`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`), in 30-60 s. Where no compiler is found
everything runs on plain PyTorch after one warning that says why; `HYPERFLUX_KERNELS=0` asks for plain PyTorch.
`HYPERFLUX_KERNEL_ARCH=avx512|avx2|generic` overrides the vector extensions detected from /proc/cpuinfo (a
build this CPU cannot run then crashes it: the override is for testing and for CPUs misdetected).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
_module: Any = None  # the built extension module, once `load()` has succeeded


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _arch() -> tuple[str, list[str]]:
    """The vector extensions this CPU has, as a build-name suffix and compiler flags: named explicitly, not
    -march=native, so that a build cached in a home folder shared by different machines is only ever loaded
    by CPUs that can run it."""
    builds = {"avx512": ["-mavx2", "-mfma", "-mavx512f"], "avx2": ["-mavx2", "-mfma"], "generic": []}
    chosen = os.environ.get("HYPERFLUX_KERNEL_ARCH")
    if chosen is None:
        flags = _cpu_flags() if platform.machine() in ("x86_64", "AMD64") else set()
        chosen = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "generic"
    if chosen not in builds:
        raise ValueError(f"HYPERFLUX_KERNEL_ARCH must be one of {sorted(builds)}, got {chosen!r}")
    return f"_{chosen}", builds[chosen]


def _disabled() -> bool:
    return os.environ.get("HYPERFLUX_KERNELS", "1") == "0"


@functools.cache
def load() -> bool:
    """Build (first time on a machine) and load the kernels; False, with one warning, where that fails."""
    global _module
    if _disabled():
        return False
    suffix, arch = _arch()
    # torch's and Python's versions in the name: a build against other torch headers or another Python's ABI
    # must never be loaded (its dependency list names only kernels.cpp, so an upgrade would not rebuild it)
    torch_version = re.sub(r"\W", "_", torch.__version__)
    name = (
        f"hyperflux_kernels{suffix}_torch{torch_version}_py{sys.version_info.major}{sys.version_info.minor}"
    )
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
        _clear_stale_lock(folder / "lock")
        if not any(folder.glob("*.so")):
            print(
                f"hyperflux: compiling its C++ kernels into {folder} (once per machine, torch and Python version)",
                file=sys.stderr,
            )
        _module = cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", *arch],
            extra_ldflags=["-fopenmp"],
            is_python_module=True,
        )
    except Exception as error:  # no compiler, no ninja, a read-only cache: plain PyTorch still works
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(
            f"hyperflux: its compiled C++ kernels are unavailable ({type(error).__name__}: {reason}); "
            "using plain PyTorch instead, which is slower",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the one pip installed with hyperflux sits in the environment's bin folder,
    which is not on PATH when a virtual environment's python is run without activating it."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _clear_stale_lock(lock: Path, stale_s: float = 600.0) -> None:
    """torch's build lock outlives a build that was killed, and every later build then waits on it forever; a
    build takes under a minute, so a lock ten minutes old is such a leftover."""
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > stale_s:
        warnings.warn(
            f"hyperflux: removing a stale build lock ({age / 60:.0f} min old): {lock}", stacklevel=3
        )
        lock.unlink(missing_ok=True)


def describe() -> str:
    """Which kernels run here, for reports: "compiled (avx512)" or why plain PyTorch runs instead."""
    if _disabled():
        return "plain PyTorch (HYPERFLUX_KERNELS=0)"
    return f"compiled ({_arch()[0].lstrip('_')})" if load() else "plain PyTorch (no compiled kernels)"


@functools.cache  # looked up at every sparse layer's call
def sparse_linear_op():
    """The compiled `sparse_linear(x, crow, col, val, bias, in_features)` (y = x W^T + b, W in CSR), or None
    where the kernels are unavailable."""
    return _module.sparse_linear if load() else None


@functools.cache  # looked up at every masked layer's forward
def gate_op():
    """The compiled `gate(weight, logits, scale, flux=None, slots=None)`: the hard gate with its gradients and,
    on sampled batches, the flux, the gradients written where float32 CPU `slots` (two tensors the caller keeps)
    hold memory nothing else holds; None where the kernels are unavailable."""
    return _module.gate if load() else None


@functools.cache
def stats_ops():
    """The compiled `(gate_stats, gate_flux_between)` that `Hyperflux.stats()` uses for float32 CPU masks, or
    None where the kernels are unavailable."""
    return (_module.gate_stats, _module.gate_flux_between) if load() else None


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Within the block, CPU arithmetic flushes denormal floats (below 1.2e-38 in float32) to zero, on the
    calling thread and on every thread torch computes on; the previous setting comes back after.

    Why: a pruned weight's gradient is exactly zero, so its optimiser moments decay geometrically (Adam's mean
    by 0.9 a step) and spend some 150 steps as denormals, which x86 CPUs compute many times slower: after a
    large pruning step the optimiser step slowed several-fold. Flushing changes no value above 1.2e-38.
    `torch.set_flush_denormal` sets the calling thread only, and torch's intra-op threads kept the slow path;
    this needs the compiled kernels and does nothing without them (or when `enabled` is False).
    """
    if not enabled or not load():
        yield
        return
    previous = _module.set_flush_denormal(True)
    try:
        yield
    finally:
        if not previous:
            stop_flushing()


def add_to_grads(
    grads: list[torch.Tensor],
    values: list[float],
    flush: bool = False,
    scale: torch.Tensor | None = None,
) -> bool:
    """`grad += value` (times `scale`, when given) for each pair, in place, rounded as torch's `add_` rounds
    it (with `scale`, the value is `value * scale` rounded to float first, which can differ from torch's own
    `add_(scale, alpha=value)` in the last bit): an optimiser step's pressure. With `flush`, denormals are
    flushed on every thread from here on (as in `flush_denormals`), set in the same parallel pass; returns
    whether flushing was off before, that is whether the caller turns it off again (`stop_flushing()`). Off
    the CPU, or without the compiled kernels: torch's foreach add (and, without the kernels, no flushing).

    `scale` is a one-element tensor by which the gradients are still multiplied: AMP's GradScaler leaves a fused
    optimiser's gradients scaled, for its kernel to divide by. On a GPU it is read there, never by the host.

    One call for both: in a LeNet-300-100 training step the foreach add and a separate pass over torch's
    threads for the flag took longer than the add's memory traffic.
    """
    if load() and all(grad.device.type == "cpu" for grad in grads):
        if scale is not None:
            values = [value * float(scale) for value in values]
        was_flushing = _module.add_to_grads(grads, values, flush)
        return flush and not was_flushing
    if scale is not None:
        for grad, value in zip(grads, values, strict=True):
            grad.add_(scale.to(grad.device), alpha=value)
    elif grads:  # a GPU's gradients: one foreach launch for all
        torch._foreach_add_(grads, values)
    return flush and load() and not _module.set_flush_denormal(True)


def stop_flushing() -> None:
    """Denormals computed again on every thread: the end of `flush_denormals`, and what the caller of
    `add_to_grads(..., flush=True)` does once that returned True."""
    _module.set_flush_denormal(False)
