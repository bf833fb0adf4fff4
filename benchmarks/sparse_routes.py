"""Where the time of a sparse Linear goes on CPU: the routes torch offers for one 2%-dense layer, side by side.

For LeNet-300-100's first layer (300x784) at batch 256 and 2% density, times in one process, alternating,
median of `--repeats` samples: the dense product, CSR(W) @ x^T on an input already transposed (the kernel
`SparseLinear` uses), the transposes that route needs (torch's and numpy's copy), and the other layouts torch
accepts (x @ CSR(W^T), x @ CSC(W^T), CSC(W) @ x^T). Writes `benchmarks/results/sparse_routes.json`.

    .venv/bin/python benchmarks/sparse_routes.py [--threads 1] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import torch

from hyperflux.runfiles import atomic_write
from hyperflux.sparse_inference import median_ms

RESULTS = Path(__file__).parent / "results" / "sparse_routes.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(300, 784)
    weight[torch.rand(300, 784) > 0.02] = 0
    x = torch.randn(256, 784)
    xt = x.t().contiguous()
    csr, csc = weight.to_sparse_csr(), weight.to_sparse_csc()
    csr_t, csc_t = weight.t().contiguous().to_sparse_csr(), weight.t().to_sparse_csc()
    routes = {
        "dense x @ W^T": lambda: x @ weight.t(),
        "CSR(W) @ x^T, x^T given": lambda: csr @ xt,
        "transpose x (torch)": lambda: x.t().contiguous(),
        "transpose x (numpy)": lambda: np.ascontiguousarray(x.numpy().T),
        "CSR(W) @ x.t() (torch copies)": lambda: csr @ x.t(),
        "x @ CSR(W^T)": lambda: x @ csr_t,
        "x @ CSC(W^T)": lambda: x @ csc_t,
        "CSC(W) @ x^T": lambda: csc @ xt,
    }
    times = median_ms(list(routes.values()), repeats=args.repeats)
    dense = times[0]
    print(f"{'route (300x784, 2% dense, batch 256)':<36} {'ms':>7} {'dense / route':>13}")
    for name, ms in zip(routes, times, strict=True):
        print(f"{name:<36} {ms:>7.3f} {dense / ms:>12.2f}x")
    record = {
        "meta": {
            "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, torch {torch.__version__}",
            "threads": args.threads,
            "repeats": args.repeats,
            "command": f"python benchmarks/sparse_routes.py --threads {args.threads} --repeats {args.repeats}",
        },
        "routes_ms": dict(zip(routes, times, strict=True)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
