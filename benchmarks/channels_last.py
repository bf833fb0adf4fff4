"""Training step time of the shipped conv models in NCHW against channels-last memory order, on the CPU.

The trainer switches conv models on the CPU to channels-last (`channels_last: auto`); this measures why. Each
model is prepared with hyperflux (as a pruning run trains it) in both layouts from the same initial weights, and
the two take alternating steps on the same random batch; the ratio is the median over rounds. The max-pooling row
times LeNet-5's first pooling alone (forward, on a tensor that needs a gradient, as in training).

    .venv/bin/python benchmarks/channels_last.py [--rounds 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import hyperflux
from hyperflux.models import build
from hyperflux.runfiles import atomic_write

BATCH = 128
MODELS = {"lenet5": {"in_channels": 3}, "resnet18": {"in_channels": 3, "width": 0.25}}  # the shipped recipes


class Step:
    """One prepared model, its optimiser and a fixed batch, in one memory layout."""

    def __init__(self, model: torch.nn.Module, channels_last: bool, x: torch.Tensor, y: torch.Tensor) -> None:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(memory_format=layout)
        hf = hyperflux.Hyperflux(self.model, 0.9, pruning_epochs=10)
        self.optimizer = torch.optim.Adam(hf.param_groups(lr=1e-3))
        hf.attach(self.optimizer)
        self.x, self.y = x.contiguous(memory_format=layout), y

    def __call__(self) -> float:
        start = time.perf_counter()
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def alternate(first, second, rounds: int) -> tuple[float, float, float]:
    """Median seconds of each and the median ratio second / first, the order flipping every round."""
    pairs = []
    for i in range(rounds):
        if i % 2 == 0:
            a, b = first(), second()
        else:
            b, a = second(), first()
        pairs.append((a, b))
    return (
        statistics.median(a for a, _ in pairs),
        statistics.median(b for _, b in pairs),
        statistics.median(b / a for a, b in pairs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "channels_last.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    records = []
    for name, options in MODELS.items():
        torch.manual_seed(0)
        model = build(name, image_size=32, **options)
        x, y = torch.randn(BATCH, options["in_channels"], 32, 32), torch.randint(0, 10, (BATCH,))
        nchw, last = Step(copy.deepcopy(model), False, x, y), Step(model, True, x, y)
        for step in (nchw, last):  # warm-up: allocator, oneDNN primitive caches
            step()
        nchw_s, last_s, ratio = alternate(nchw, last, args.rounds)
        records.append(
            {"case": f"{name} training step", "nchw_ms": 1e3 * nchw_s, "channels_last_ms": 1e3 * last_s}
        )
        records[-1]["speedup"] = 1 / ratio

    activations = torch.randn(BATCH, 20, 28, 28, requires_grad=True)  # LeNet-5's first conv output at 32x32
    in_last = activations.detach().contiguous(memory_format=torch.channels_last).requires_grad_()

    def pool(t: torch.Tensor):
        def run() -> float:
            start = time.perf_counter()
            F.max_pool2d(t, 2)
            return time.perf_counter() - start

        return run

    nchw_s, last_s, ratio = alternate(pool(activations), pool(in_last), max(args.rounds, 25))
    records.append(
        {
            "case": "max_pool2d 128x20x28x28",
            "nchw_ms": 1e3 * nchw_s,
            "channels_last_ms": 1e3 * last_s,
            "speedup": 1 / ratio,
        }
    )

    print(f"{'case':<28} {'NCHW ms':>9} {'channels-last ms':>17} {'speed-up':>9}")
    for r in records:
        print(f"{r['case']:<28} {r['nchw_ms']:>9.2f} {r['channels_last_ms']:>17.2f} {r['speedup']:>8.2f}x")
    meta = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or 'cpu'}, {args.threads} thread(s)",
        "torch": torch.__version__,
        "command": f"python benchmarks/channels_last.py --rounds {args.rounds} --threads {args.threads}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rounded = [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in records]
    atomic_write(args.out, json.dumps({"meta": meta, "records": rounded}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
