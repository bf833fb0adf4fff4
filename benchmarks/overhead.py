"""Training-time overhead of hyperflux: time per epoch of a prepared model against the same model dense.

Rounds alternate (dense, hyperflux, gates only, mask optimiser only; then the reverse order) in one process so
machine noise hits all alike; each ratio is the median over rounds. "Gates only" is the prepared model with both
gate gradients computed but no mask optimiser and no pressure: the share of the overhead that the gate's forward
and backward cost. "Mask optimiser only" is the dense model whose optimiser also steps one logit-shaped tensor per
masked weight, with a stored gradient: the share that the method's mask Adam costs, whatever the gate does.
Peak memory is the exact byte count of what a training step holds.

    .venv/bin/python benchmarks/overhead.py [--pairs 15] [--out benchmarks/results/overhead.json]
    .venv/bin/python benchmarks/overhead.py --profile lenet300   # the torch profiler's table per arm
    .venv/bin/python benchmarks/overhead.py --phases lenet300    # forward / backward / step time per arm
    .venv/bin/python benchmarks/overhead.py --compile            # both models under torch.compile
    python benchmarks/overhead.py --device cuda                  # on a GPU (adds ResNet-18 on 32x32 images)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import hyperflux
from hyperflux import models
from hyperflux.runfiles import atomic_write

BATCH = 128
ARMS = ("dense", "hyperflux", "gates", "mask_optimizer")
# the loss's forward; zero_grad and backward; the optimiser step and its hooks
PHASES = ("forward", "backward", "step")


def lenet300() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def small_conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


# model, samples per epoch, sample shape
CASES = {
    "lenet300": (lenet300, 60_000, (1, 28, 28)),
    "small_conv": (small_conv, 12_800, (1, 28, 28)),
    "resnet18": (lambda: models.build("resnet18"), 12_800, (3, 32, 32)),
}
CPU_CASES = ("lenet300", "small_conv")  # ResNet-18 takes minutes an epoch on a CPU


class Run:
    """One model, its data and optimiser, trained as one of `ARMS`."""

    def __init__(
        self,
        case: str,
        arm: str,
        samples: int | None = None,
        compiled: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        build, default_samples, shape = CASES[case]
        torch.manual_seed(0)
        samples = samples or default_samples
        self.device = torch.device(device)
        self.x = torch.randn(samples, *shape, device=self.device)
        self.y = torch.randint(0, 10, (samples,), device=self.device)
        self.model = build().to(self.device)
        self.hf = None
        self.stored_grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        if arm in ("hyperflux", "gates"):
            # a constant pressure keeps the pressure term live in every step, as mid-pruning
            self.hf = hyperflux.Hyperflux(
                self.model,
                None,
                pruning_epochs=1000,
                exact_target=False,
                scheduler=hyperflux.PressureScheduler.constant(1.0),
            )
            groups = self.hf.param_groups(lr=5e-3)
        else:
            groups = [{"params": list(self.model.parameters()), "lr": 5e-3}]
        # gates: the gates' forward and backward (both gradients) alone, no mask optimiser, no pressure
        self.dropped = [g.logits for g in self.hf.gates] if arm == "gates" else []
        if arm == "gates":
            groups = groups[:1]
        if arm == "mask_optimizer":
            weights = [m.weight for m in self.model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
            self.stored_grads = [
                (nn.Parameter(torch.rand_like(w)), torch.randn_like(w) * 1e-3) for w in weights
            ]
            groups.append({"params": [p for p, _ in self.stored_grads], "lr": 1e-3})
        self.optimizer = torch.optim.Adam(groups, fused=True)
        if arm == "hyperflux":
            self.hf.attach(self.optimizer)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.faults_per_step: list[float] = []  # minor page faults, per epoch
        self.sparsifier_step_s: list[float] = []
        # microseconds a step in each of PHASES, per epoch
        self.phase_us_per_step: list[dict[str, float]] = []

    def epoch(self) -> float:
        """Seconds for one epoch; also records its page faults per step, the time of `hf.step()` and the time
        its steps spent in each phase."""
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        phases = dict.fromkeys(PHASES, 0.0)
        start = time.perf_counter()
        for i in range(0, len(self.x), BATCH):
            began = time.perf_counter()
            loss = F.cross_entropy(self.forward(self.x[i : i + BATCH]), self.y[i : i + BATCH])
            forward_done = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            for param in self.dropped:
                param.grad = None
            loss.backward()
            for param, grad in self.stored_grads:
                param.grad = grad
            backward_done = time.perf_counter()
            self.optimizer.step()
            phases["forward"] += forward_done - began
            phases["backward"] += backward_done - forward_done
            phases["step"] += time.perf_counter() - backward_done
        if self.hf is not None:
            step_start = time.perf_counter()
            self.hf.step()  # once per epoch, as in any training loop
            self.sparsifier_step_s.append(time.perf_counter() - step_start)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the epoch ends when its kernels have run, not when queued
        seconds = time.perf_counter() - start
        steps = -(-len(self.x) // BATCH)
        self.faults_per_step.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps)
        self.phase_us_per_step.append({phase: 1e6 * spent / steps for phase, spent in phases.items()})
        return seconds


def training_memory(run: Run) -> int:
    """Bytes a training step holds at once, counted after its backward pass: parameters, gradients, optimiser
    state, the masks' flux accumulators and kept gate memory, and every tensor autograd saved for that backward
    pass (counted once per storage). The JSON keys say "peak" for this sum; transient buffers inside an operator
    are not in it.

    Counted exactly rather than read from the process's resident size, which on CPU is too coarse and
    too dependent on allocator reuse to compare two small models.
    """
    storages: dict[int, int] = {}

    def count(tensor: torch.Tensor | None) -> None:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        count(tensor)
        return tensor

    run.epoch()  # optimiser state exists from here on
    x, y = run.x[:BATCH].clone(), run.y[:BATCH].clone()  # a view would count the whole data set
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(run.model(x), y)
    loss.backward()
    for param in run.model.parameters():
        count(param)
        count(param.grad)
    for state in run.optimizer.state.values():
        for value in state.values():
            count(value)
    for gate in run.hf.gates if run.hf else []:
        count(gate.flux_sum)
        for slot in gate._slots:  # the memory the compiled gate keeps from step to step
            count(slot)
    return sum(storages.values())


def alternate(runs: tuple[Run, ...], rounds: int) -> list[tuple[float, ...]]:
    """Epoch seconds of every run per round, after one warm-up epoch each; the order flips every round so that
    a drifting machine favours none."""
    for run in runs:
        run.epoch()
    times = []
    for i in range(rounds):
        seconds = {id(run): run.epoch() for run in (runs if i % 2 == 0 else runs[::-1])}
        times.append(tuple(seconds[id(run)] for run in runs))
    return times


def compiled(pairs: int, out: Path) -> None:
    """The dense and hyperflux arms with both models under torch.compile (inductor): how much of the gate's cost
    the compiler fuses away for users who compile their training."""
    records = []
    for case in CPU_CASES:
        times = alternate(tuple(Run(case, arm, compiled=True) for arm in ("dense", "hyperflux")), pairs)
        records.append(
            {
                "model": case,
                "compiled": True,
                "ratio": round(statistics.median(h / d for d, h in times), 4),
                "dense_epoch_s": round(statistics.median(d for d, _ in times), 4),
                "hyperflux_epoch_s": round(statistics.median(h for _, h in times), 4),
                "pairs": pairs,
            }
        )
        print(
            f"{case:<12} compiled: dense {records[-1]['dense_epoch_s']:.3f} s, hyperflux "
            f"{records[-1]['hyperflux_epoch_s']:.3f} s, ratio {records[-1]['ratio']:.3f}"
        )
    write(out, records, f"python benchmarks/overhead.py --compile --pairs {pairs}")


def write(out: Path, records: list[dict], command: str, device: torch.device | None = None) -> None:
    machine = f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip()
    if device is not None and device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    now = datetime.now(UTC)
    meta = {
        "date": now.date().isoformat(),
        "time_utc": now.strftime("%H:%M"),
        "machine": machine,
        "torch": torch.__version__,
        "command": command,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    print(f"wrote {out}")


def profile(case: str, samples: int = 12_800) -> None:
    """Print, per arm, the operators' own CPU time over one epoch (torch profiler), slowest first."""
    from torch.profiler import profile as profiler

    for arm in ARMS:
        run = Run(case, arm, samples)
        run.epoch()
        with profiler() as prof:
            seconds = run.epoch()
        steps = -(-samples // BATCH)
        print(f"\n{case}, {arm}: {1e3 * seconds / steps:.3f} ms a step (profiled)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def phases(case: str, rounds: int, out: Path, samples: int = 25_600) -> None:
    """Microseconds a step spends in each of PHASES, per arm, timed inside real training steps (alternating
    epochs, median over rounds), written to `out`. Timings of single operations in a tight loop run on warm
    caches and without the step's other Python; here they cost several times as much, so look for where a
    step's time goes with this rather than with micro-benchmarks."""
    runs = tuple(Run(case, arm, samples) for arm in ARMS)
    alternate(runs, rounds)
    table = {  # the warm-up epoch left out
        arm: {
            phase: round(statistics.median(e[phase] for e in run.phase_us_per_step[1:]), 1)
            for phase in PHASES
        }
        for arm, run in zip(ARMS, runs, strict=True)
    }
    print(f"{case}: microseconds a step in each phase (median of {rounds} rounds)")
    print(
        f"{'arm':<16}" + "".join(f"{phase:>10}" for phase in PHASES) + f"{'total':>10}" + f"{'vs dense':>10}"
    )
    dense_total = sum(table["dense"].values())
    for arm in ARMS:
        total = sum(table[arm].values())
        cells = "".join(f"{table[arm][phase]:>10.1f}" for phase in PHASES)
        print(f"{arm:<16}{cells}{total:>10.1f}{total / dense_total:>9.3f}x")
    records = [{"model": case, "arm": arm, "samples": samples, "us_per_step": table[arm]} for arm in ARMS]
    write(out, records, f"python benchmarks/overhead.py --phases {case} --pairs {rounds}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=15)  # single pairs here range over 1.02-1.20 (conv net)
    parser.add_argument(
        "--out",
        type=Path,
        help="default: benchmarks/results/overhead.json (overhead_cuda.json with --device cuda)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--profile", choices=list(CASES), help="print where each arm's time goes, then stop")
    parser.add_argument(
        "--phases",
        choices=list(CPU_CASES),
        help="time each phase of a step (forward, backward, optimiser step) per arm; writes overhead_phases.json",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile both models (dense and hyperflux arms only); writes overhead_compiled.json",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device.type != "cpu" and (args.profile or args.compile or args.phases):
        parser.error("--profile, --phases and --compile measure on the CPU only; leave --device out")
    results = Path(__file__).parent / "results"
    out = args.out or results / ("overhead_cuda.json" if device.type == "cuda" else "overhead.json")
    torch.set_num_threads(torch.get_num_threads())
    if args.profile:
        profile(args.profile)
        return
    if args.phases:
        phases(args.phases, args.pairs, out.with_name("overhead_phases.json"))
        return
    if args.compile:
        compiled(args.pairs, out.with_name("overhead_compiled.json"))
        return

    records = []
    for case in CASES if device.type == "cuda" else CPU_CASES:
        runs = tuple(Run(case, arm, device=device) for arm in ARMS)
        dense, pruned = runs[0], runs[1]
        times = alternate(runs, args.pairs)
        dense_s = statistics.median(t[0] for t in times)
        pruned_s = statistics.median(t[1] for t in times)
        ratio, gate_ratio, adam_ratio = (statistics.median(t[i] / t[0] for t in times) for i in (1, 2, 3))
        # how far single pairs stray: this machine's noise, which a median of pairs does not show
        pair_ratios = [t[1] / t[0] for t in times]
        quartiles = statistics.quantiles(pair_ratios, n=4) if len(times) > 1 else pair_ratios * 3
        faults = {
            arm: round(statistics.median(run.faults_per_step[1:]), 1)
            for arm, run in zip(ARMS, runs, strict=True)
        }
        # the timed epochs' hf.step(), read before the memory count adds an epoch of its own
        step_ms = 1e3 * statistics.median(pruned.sparsifier_step_s[1:])
        mem_dense, mem_pruned = training_memory(dense), training_memory(pruned)
        records.append(
            {
                "model": case,
                "ratio": round(ratio, 4),
                "ratio_quartiles": [round(quartiles[0], 4), round(quartiles[2], 4)],
                "gates_only_ratio": round(gate_ratio, 4),
                "mask_optimizer_only_ratio": round(adam_ratio, 4),
                "dense_epoch_s": round(dense_s, 4),
                "hyperflux_epoch_s": round(pruned_s, 4),
                "pairs": args.pairs,
                "peak_memory_dense_mb": round(mem_dense / 2**20, 1),
                "peak_memory_hyperflux_mb": round(mem_pruned / 2**20, 1),
                "peak_memory_ratio": round(mem_pruned / max(mem_dense, 1), 3),
                "page_faults_per_step": faults,  # median over the timed epochs, per arm
                "sparsifier_step_ms": round(step_ms, 2),
            }
        )
    print(
        f"{'model':<12} {'dense s':>8} {'hyperflux s':>12} {'ratio':>7} {'quartiles':>13} {'gates only':>10} "
        f"{'mask opt only':>13} {'mem dense MB':>13} {'mem hf MB':>10} {'mem ratio':>9}"
    )
    for r in records:
        low, high = r["ratio_quartiles"]
        print(
            f"{r['model']:<12} {r['dense_epoch_s']:>8.3f} {r['hyperflux_epoch_s']:>12.3f} {r['ratio']:>7.3f} "
            f"{f'{low:.3f}-{high:.3f}':>13} "
            f"{r['gates_only_ratio']:>10.3f} {r['mask_optimizer_only_ratio']:>13.3f} "
            f"{r['peak_memory_dense_mb']:>13.1f} {r['peak_memory_hyperflux_mb']:>10.1f} {r['peak_memory_ratio']:>9.3f}"
        )
    for r in records:
        faults = ", ".join(f"{arm} {count:g}" for arm, count in r["page_faults_per_step"].items())
        print(f"{r['model']:<12} page faults per step: {faults}; hf.step() {r['sparsifier_step_ms']:.2f} ms")
    command = f"python benchmarks/overhead.py --pairs {args.pairs}" + (
        f" --device {args.device}" if device.type != "cpu" else ""
    )
    write(out, records, command, device)


if __name__ == "__main__":
    main()
