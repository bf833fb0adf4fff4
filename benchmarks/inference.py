"""Dense against sparse inference on CPU, and dense against compressed file size.

For LeNet-300-100 at 90/98/99% sparsity and a 4096-wide MLP (three 4096x4096 layers) at 98%, the pruned
model is converted with `to_sparse_inference` (measured per layer on a batch of 256) and both forms are timed
at batch 1 and 256, alternating in one process: `--repeats` rounds of one dense and one sparse sample; the
times are medians, the ratio the median of the rounds' ratios. The masks are random at the
given sparsity, uniform over the Linear weights: timing depends on the count and spread of the non-zeros, not
on which weights a training run keeps (a trained mask is less uniform per layer; `hyperflux bench` measures a
real run). Writes `benchmarks/results/inference.json` and prints a table.

    .venv/bin/python benchmarks/inference.py [--threads 1] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import warnings
from datetime import date
from pathlib import Path

import torch
from torch import nn

from hyperflux import kernels, models
from hyperflux.export import file_sizes
from hyperflux.runfiles import atomic_write
from hyperflux.sparse_inference import compare_ms, plan_sparse_inference, to_sparse_inference

RESULTS = Path(__file__).parent / "results" / "inference.json"
BATCHES = (1, 256)


def mlp4096() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096)
    )


CASES = [
    (
        "lenet300",
        lambda: models.build("lenet300", num_classes=10, in_channels=1, image_size=28),
        (1, 28, 28),
        0.90,
    ),
    (
        "lenet300",
        lambda: models.build("lenet300", num_classes=10, in_channels=1, image_size=28),
        (1, 28, 28),
        0.98,
    ),
    (
        "lenet300",
        lambda: models.build("lenet300", num_classes=10, in_channels=1, image_size=28),
        (1, 28, 28),
        0.99,
    ),
    ("mlp4096", mlp4096, (4096,), 0.98),
]


@torch.no_grad()
def prune_randomly(model: nn.Module, sparsity: float, generator: torch.Generator) -> None:
    """Zero exactly round(sparsity * n) weights of every Linear, chosen uniformly at random."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            flat = module.weight.view(-1)
            flat[torch.randperm(flat.numel(), generator=generator)[: round(sparsity * flat.numel())]] = 0


@torch.no_grad()
def run_case(name: str, build, shape: tuple[int, ...], sparsity: float, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = build().eval()
    prune_randomly(model, sparsity, torch.Generator().manual_seed(1))
    example = torch.randn(max(BATCHES), *shape)
    plan = plan_sparse_inference(model, example, repeats=repeats)
    sparse = to_sparse_inference(model, plan=plan)
    error = float((sparse(example) - model(example)).abs().max())
    dense_bytes, sparse_bytes = file_sizes(model)
    layers = [
        {
            "name": choice.name,
            "shape": list(choice.shape),
            "density": choice.density,
            "sparse": choice.sparse,
            "reason": choice.reason,
            "timings": {
                str(batch): {"dense_ms": d, "sparse_ms": s} for batch, (d, s) in choice.timings.items()
            },
        }
        for choice in plan
    ]
    records = []
    for batch in BATCHES:
        x = example[:batch]
        timing = compare_ms(model, sparse, x, repeats)
        records.append(
            {
                "model": name,
                "sparsity": sparsity,
                "batch": batch,
                "dense_ms": timing.dense_ms,
                "sparse_ms": timing.sparse_ms,
                "ratio": timing.ratio,
                "file_ratio": dense_bytes / sparse_bytes,
                "dense_bytes": dense_bytes,
                "sparse_bytes": sparse_bytes,
                "max_abs_error": error,
                "layers": layers,
            }
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    records = [r for case in CASES for r in run_case(*case, args.repeats)]
    environment = {
        "date": date.today().isoformat(),
        "command": f"python benchmarks/inference.py --threads {args.threads} --repeats {args.repeats}",
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "masks": "random, uniform per Linear layer at the given sparsity",
        "kernels": kernels.describe(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps({"environment": environment, "records": records}, indent=1) + "\n")
    print(
        f"{'model':<9} {'sparsity':>8} {'batch':>5} {'dense ms':>9} {'sparse ms':>9} {'ratio':>6} {'file':>6}  sparse layers"
    )
    for r in records:
        converted = ",".join(layer["name"] for layer in r["layers"] if layer["sparse"]) or "-"
        print(
            f"{r['model']:<9} {100 * r['sparsity']:>7.0f}% {r['batch']:>5} {r['dense_ms']:>9.3f} "
            f"{r['sparse_ms']:>9.3f} {r['ratio']:>5.2f}x {r['file_ratio']:>5.1f}x  {converted}"
        )
    print(
        f"threads {args.threads}, load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after -> {args.out}"
    )


if __name__ == "__main__":
    main()
