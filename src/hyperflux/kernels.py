"""Optional compiled CPU kernels (`csrc/kernels.cpp`), built on first use with the machine's C++ compiler.

torch's sparse CSR matmul wants the batch transposed and runs one scalar loop per non-zero; the compiled
kernel reads the batch as it is, a tile of rows at a time, and vectorises across the tile (2.5-3x faster
than torch's on LeNet-300-100 and 4096-wide layers at batch 256, BENCHMARKS.md). It is built once per
machine into torch's extension cache (`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`), in
about 15 s. Where no compiler is found, or with `HYPERFLUX_KERNELS=0`, everything falls back to torch's own
sparse kernels, with one warning that says why.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _arch_flags() -> list[str]:
    """AVX2 and FMA where this CPU has them (named explicitly, not -march=native, so that a build cached in a
    home folder shared by different machines is only ever loaded by CPUs that can run it)."""
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        return ["-mavx2", "-mfma"]
    return []


@functools.cache
def sparse_linear_op():
    """`torch.ops.hyperflux.sparse_linear`, building it on the first call; None where it cannot be built."""
    if os.environ.get("HYPERFLUX_KERNELS", "1") == "0":
        return None
    arch = _arch_flags()
    try:
        from torch.utils.cpp_extension import load

        load(
            name="hyperflux_kernels" + ("_avx2" if arch else ""),
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", *arch],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # no compiler, no ninja, a read-only cache: torch's kernels still work
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(
            f"hyperflux: the compiled sparse kernel is unavailable ({type(error).__name__}: {reason}); "
            "using torch's sparse CSR matmul instead, which is slower",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return torch.ops.hyperflux.sparse_linear
