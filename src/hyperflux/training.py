"""The trainer behind `hyperflux prune` and `hyperflux train`: a plain PyTorch loop around the public API.

One epoch: set the weights' learning rate (cosine per phase, method.md section 4), train on every batch
(weights and mask optimisers both step), call `hf.step()` once per period, evaluate on the test split, append
the metrics and write the checkpoint. A resumed run replays exactly: data order depends only on (seed, epoch),
and the checkpoint holds every other source of state, RNGs included.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from hyperflux import baselines, data, distributed, models
from hyperflux.baselines import Baseline
from hyperflux.kernels import flush_denormals
from hyperflux.macs import MacCount, count_macs
from hyperflux.modes import eval_mode
from hyperflux.recipe import (
    BASELINE_METHODS,
    RecipeError,
    changes_since,
    effective,
    evaluation_split,
    load_recipe,
    lr_end,
)
from hyperflux.runfiles import CHECKPOINT, MODEL, RECIPE, RunError, RunFolder, exclusive, read_checkpoint
from hyperflux.scheduler import PressureScheduler
from hyperflux.selection import select_targets
from hyperflux.sparsifier import Hyperflux, default_freeze_after
from hyperflux.table import text_table

# Keys of the recipe that may change between a run and its resume: where it runs, not what it computes.
RESUMABLE_CHANGES = ("device", "threads", "data.root", "data.num_workers")
# Batches between two reads of the running loss (each read waits for the device).
CHECK_EVERY = 10


class TrainingError(Exception):
    """The run cannot go on (a non-finite loss); the last good checkpoint is left as it was."""


# ----------------------------------------------------------------- building blocks
def resolve_device(name: str, what: str = "recipe key 'device'") -> torch.device:
    """The device `name` asks for (`what` names where it came from, for the error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise RecipeError(f"{what}: expected auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"{what}: {name} asked for, but no CUDA device is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RecipeError(f"{what}: {name} asked for, but MPS is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def cosine(start: float, end: float, progress: float) -> float:
    """Cosine interpolation from `start` (progress 0) to `end` (progress 1)."""
    return end + (start - end) * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) / 2


def load_weights(
    model: nn.Module, path: str | Path, where: str = "recipe key 'model.init_checkpoint'"
) -> None:
    """Dense weights into a plain model: a `.safetensors` file, a state dict, a run checkpoint or run folder;
    `where` names what asked for them in the error when the file does not fit."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MODEL
    if not path.exists():
        raise RecipeError(f"{where}: {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file fails in many ways
        raise RecipeError(f"{where}: {path} is not a readable checkpoint ({type(error).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensors of other shapes: the first line names the first of them
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        raise RecipeError(
            f"{where}: {path} does not fit the model ({lines[0] if lines else error})"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys[:3], result.unexpected_keys[:3]
        raise RecipeError(
            f"{where}: {path} does not fit the model (missing {missing}, unexpected {unexpected})"
        )


def load_data(recipe: dict[str, Any], *, test_split: bool = False) -> data.DataBundle:
    """The recipe's data; `test_split` serves the test split even where the recipe holds a holdout out."""
    spec = recipe["data"]
    return data.load(
        spec["name"],
        spec["root"],
        augment=spec["augment"],
        image_size=spec["image_size"],
        holdout=spec["holdout"],
        train_subset=spec["train_subset"],
        test_split=test_split,
    )


def build_model(recipe: dict[str, Any], bundle: data.DataBundle, *, init: bool = True) -> nn.Module:
    """The recipe's model for this data; `init` loads `model.init_checkpoint` (a dense run skips it)."""
    spec = recipe["model"]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    name = kwargs.pop("name")
    kwargs.pop("init_checkpoint")
    try:
        model = models.build(name, bundle.num_classes, bundle.in_channels, bundle.image_size, **kwargs)
        # one input of the data's shape through it, so that a model these inputs do not fit fails here, not
        # mid-epoch
        size = bundle.image_size
        with torch.no_grad(), eval_mode(model):
            model(torch.zeros(1, bundle.in_channels, size, size))
    except (TypeError, ValueError, IndexError, RuntimeError) as error:
        raise RecipeError(f"recipe key 'model': {name} on {bundle.name}: {error}") from None
    if init and spec["init_checkpoint"]:
        load_weights(model, spec["init_checkpoint"])
    return model


def selection(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe's tensor selection, as keyword arguments of `Hyperflux` and `select_targets`."""
    spec = recipe["hyperflux"]
    return {
        "modules": tuple(getattr(nn, name) for name in spec["modules"]),
        "names": spec["names"],
        "ignore": spec["ignore"],
        "overrides": spec["overrides"],
        "min_density": spec["min_density"],
    }


def build_sparsifier(recipe: dict[str, Any], model: nn.Module, periods_per_epoch: int = 1) -> Hyperflux:
    """The recipe's `Hyperflux`; with several periods per epoch, epoch counts and the per-epoch mask-lr
    decay are converted to periods, so the phases last as many epochs as the recipe says."""
    spec = recipe["hyperflux"]
    scheduler = None
    if spec["pressure"] is not None:
        scheduler = PressureScheduler.constant(spec["pressure"])
    elif spec["pressure_schedule"] is not None:
        scheduler = PressureScheduler.from_schedule(spec["pressure_schedule"])
    freeze_after = spec["freeze_after"]
    if freeze_after is None:  # the default counts epochs here, not periods
        freeze_after = default_freeze_after(spec["regrowth_epochs"], spec["exact_target"])
    return Hyperflux(
        model,
        spec["target_sparsity"],
        spec["pruning_epochs"] * periods_per_epoch,
        spec["regrowth_epochs"] * periods_per_epoch,
        **selection(recipe),
        exact_target=spec["exact_target"],
        scheduler=scheduler,
        delta=spec["delta"],
        regrowth_delta=spec["regrowth_delta"],
        aggressivity=spec["aggressivity"],
        exponent=spec["exponent"],
        grad_scale=spec["grad_scale"],
        init_logit=spec["init_logit"],
        mask_lr=spec["mask_lr"],
        regrowth_mask_lr=spec["regrowth_mask_lr"],
        regrowth_decay=spec["regrowth_decay"] ** (1 / periods_per_epoch),
        freeze_after=freeze_after * periods_per_epoch,
        flux_every=spec["flux_every"],
    )


def periods_per_epoch(recipe: dict[str, Any], batches: int) -> int:
    """How many times per epoch `hf.step()` runs: once, or every `train.controller_every` batches."""
    every = recipe["train"]["controller_every"] or batches
    return math.ceil(batches / min(every, batches))


def adam(params: list[dict[str, Any]], **options: Any) -> torch.optim.Optimizer:
    """Adam (or AdamW via `cls`), fused where this torch and device allow it (several times faster on CPU)."""
    cls = options.pop("cls", torch.optim.Adam)
    try:
        return cls(params, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, **options)


def method_name(recipe: dict[str, Any], dense: bool) -> str:
    return "dense" if dense else recipe["method"]


def build_baseline(recipe: dict[str, Any], model: nn.Module, batches: int) -> Baseline:
    """The recipe's baseline method on the same selection and epoch budget as its hyperflux run."""
    spec = selection(recipe)
    del spec["overrides"], spec["min_density"]
    hf = recipe["hyperflux"]
    return baselines.build(
        recipe["method"],
        model,
        hf["target_sparsity"],
        hf["pruning_epochs"],
        hf["regrowth_epochs"],
        batches,
        seed=recipe["seed"],
        **spec,
        **recipe["baseline"],
    )


def amp_dtype(recipe: dict[str, Any], device: torch.device) -> torch.dtype | None:
    """The autocast dtype a run trains and evaluates in: the recipe's `amp`, on CUDA only."""
    amp = recipe["amp"] if device.type == "cuda" else "off"
    return {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def use_channels_last(setting: str, model: nn.Module, device: torch.device) -> bool:
    """Whether to train in the channels-last memory format: `auto` means for convolutional models on the CPU,
    where oneDNN's convolutions and, above all, max-pooling run much faster on channels-last tensors than on
    NCHW ones (`python benchmarks/channels_last.py`). On CUDA it pays mainly under AMP, so it is left to `on`."""
    if setting != "auto":
        return setting == "on"
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch of inputs on `device`, image batches in channels-last order when asked."""
    if channels_last and images.dim() == 4:
        return images.to(device, memory_format=torch.channels_last, non_blocking=True)
    return images.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[float, float]:
    """Accuracy (percent) and mean cross-entropy on every batch of `loader`; in a distributed run each rank
    passes its shard and the counts are summed over ranks. An image a rank cannot read is a `DataError` on
    every rank, after the sum, so that no rank is left waiting in it."""
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    failure = None
    with eval_mode(model):
        try:
            for images, labels in loader:
                images = to_device(images, device, channels_last)
                labels = labels.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(images).float()
                loss_sum += F.cross_entropy(logits, labels, reduction="sum")
                correct += (logits.argmax(1) == labels).sum()
                seen += len(labels)
        except data.DataError as error:
            failure = error
    totals = distributed.all_sum(
        torch.stack(
            [correct.double(), loss_sum, loss_sum.new_tensor(seen), loss_sum.new_tensor(failure is not None)]
        )
    )
    correct_all, loss_all, seen_all, failed = totals.tolist()
    if failure is not None:
        raise failure
    if failed:
        raise data.DataError("another rank could not read a test image (its error names the file)")
    return 100.0 * correct_all / max(seen_all, 1), loss_all / max(seen_all, 1)


def _duration(seconds: float) -> str:
    """2h05m, 3m12s or 41s."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _value_at(recipe: Any, key: str) -> Any:
    """The value of a dotted recipe key, or None where the recipe has none."""
    for part in key.split("."):
        recipe = recipe.get(part) if isinstance(recipe, Mapping) else None
    return recipe


def mask_digest(pruner: Hyperflux | Baseline) -> str:
    """A short hash of every keep-mask: equal digests on all ranks mean the ranks hold the same masks."""
    digest = hashlib.sha256()
    for mask in pruner.masks().values():
        digest.update(mask.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------- the trainer
class Trainer:
    """Runs one recipe into one run folder: `hyperflux prune` (dense=False) or `hyperflux train` (dense=True).

    `stop_after` ends this invocation after that many epochs (checkpoint written), as a time-limited job
    would; `--resume` continues it.

    Under torchrun (its environment variables set, more than one process) it joins the process group and
    trains with DistributedDataParallel: `train.batch_size` stays the global batch, split over the ranks;
    losses, accuracies and the flux are summed over ranks; rank 0 alone writes files and prints.
    """

    def __init__(
        self,
        recipe: dict[str, Any],
        out: str | Path,
        *,
        dense: bool = False,
        resume: bool = False,
        overwrite: bool = False,
        quiet: bool = False,
        stop_after: int | None = None,
        log: TextIO | None = None,
    ) -> None:
        self.recipe = recipe
        self.dense = dense
        self.quiet = quiet
        self.stop_after = stop_after
        self.log = log if log is not None else sys.stdout
        if recipe["threads"]:
            torch.set_num_threads(recipe["threads"])
        self.device = resolve_device(recipe["device"])
        if distributed.launched_by_torchrun() and self.device.type == "cuda":
            self.device = torch.device("cuda", distributed.local_rank())
            torch.cuda.set_device(self.device)
        self.owns_group = distributed.init_from_env(self.device)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.main = self.rank == 0
        self.files = RunFolder(out, writer=self.main)
        self.checkpoint = self.files.load_checkpoint() if resume and self.files.has_checkpoint() else None
        if self.checkpoint is not None:
            with self._unusable_checkpoint():
                self._check_resumable(self.checkpoint)
        self.files.check(resume=resume, overwrite=overwrite)

        self.amp_dtype = amp_dtype(recipe, self.device)
        if self.amp_dtype is None and recipe["amp"] != "off" and self.main:
            warnings.warn(
                f"amp: {recipe['amp']} runs on CUDA only; this {self.device.type} run trains in float32",
                stacklevel=2,
            )
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 else None
        seed_everything(recipe["seed"])

        spec = recipe["data"]
        self.bundle = load_data(recipe)
        train = recipe["train"]
        loader_options = {"device": self.device, "num_workers": spec["num_workers"]}
        self.train_loader = self.bundle.loader(
            "train", train["batch_size"], seed=recipe["seed"], **loader_options
        )
        self.test_loader = self.bundle.loader("test", train["eval_batch_size"], **loader_options)
        if self.world > 1:
            self.train_loader, self.test_loader = (
                self._shard(self.train_loader),
                self._shard(self.test_loader),
            )
        self.batches = len(self.train_loader)
        self.periods = periods = periods_per_epoch(recipe, self.batches)

        self.model = build_model(recipe, self.bundle, init=not dense).to(self.device)
        self.channels_last = use_channels_last(recipe["channels_last"], self.model, self.device)
        if self.channels_last:  # before the masks exist, so that logits and flux take the weights' layout
            self.model = self.model.to(memory_format=torch.channels_last)
        self.method = method_name(recipe, dense)
        self.baseline = (
            build_baseline(recipe, self.model, self.batches) if self.method in BASELINE_METHODS else None
        )
        self.hf = (
            None if dense or self.baseline is not None else build_sparsifier(recipe, self.model, periods)
        )
        # what masks the model, whichever method: masks, counts, stats and the squashed model
        self.pruner: Hyperflux | Baseline | None = self.hf if self.hf is not None else self.baseline
        self._build_optimizers()
        self.own_dense_schedule = dense and recipe["dense"]["epochs"] is not None
        self.epochs = epoch_budget(recipe, dense)

        self.epoch = 0
        self.elapsed = 0.0
        self.last_eval: tuple[float, float] | None = None
        self.finished_before = resume and self.files.read_summary() is not None
        if self.checkpoint is not None:
            with self._unusable_checkpoint():
                self._restore(self.checkpoint)
                self.files.truncate_metrics(self.epoch)
        self.net = self._wrap()
        # only now, the recipe having built: a recipe that fails leaves an old run untouched; a finished run
        # resumed retrains nothing, so what was made from it holds
        if not resume:
            self.files.start(recipe)
        elif self.epoch < self.epochs:
            self.files.clear_derived()

    # ------------------------------------------------------------- setup
    @contextlib.contextmanager
    def _unusable_checkpoint(self) -> Iterator[None]:
        """A checkpoint or metrics file that reads but does not fit this run (keys missing, tensors of other
        shapes, rows that are not rows) is a `RunError` naming the folder, not a traceback from deep inside."""
        try:
            yield
        except (RunError, torch.cuda.OutOfMemoryError):
            raise
        except (KeyError, TypeError, AttributeError, IndexError, ValueError, RuntimeError) as error:
            detail = f"missing {error}" if isinstance(error, KeyError) else " ".join(str(error).split())
            raise RunError(f"{self.files.path}: cannot resume from its files ({detail})") from None

    def _check_resumable(self, checkpoint: dict[str, Any]) -> None:
        kind = "train" if self.dense else "prune"
        if checkpoint["kind"] != kind:
            raise RunError(
                f"{self.files.path} holds a `{checkpoint['kind']}` run; resume it with that command"
            )
        changed = [k for k in changes_since(checkpoint["recipe"], self.recipe) if k not in RESUMABLE_CHANGES]
        if changed:
            shown = ", ".join(
                f"{key} {_value_at(checkpoint['recipe'], key)!r} -> {_value_at(self.recipe, key)!r}"
                for key in changed[:4]
            ) + (", ..." if len(changed) > 4 else "")
            raise RunError(
                f"the recipe differs from the one {self.files.path} was started with ({shown}); resume with the "
                "same recipe, or start again with --overwrite"
            )

    def _shard(self, loader: Any) -> Any:
        return loader.shard(self.rank, self.world)

    def _wrap(self) -> nn.Module:
        """The model as the training step calls it: itself, or in DDP when several ranks train.

        DDP registers the parameters that require grad when it is built, and the freeze turns the mask logits
        off; a wrapper built before would wait for their gradients forever. So the trainer builds a new
        wrapper whenever `hf.frozen` flips: cheaper than `find_unused_parameters=True`, which walks the
        autograd graph on every step.
        """
        self.wrapped_frozen = self.hf is not None and self.hf.frozen
        if self.world == 1:
            return self.model
        self.net = None  # the old wrapper's reducer lets go of its parameter hooks first
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    def _build_optimizers(self) -> None:
        """Weights (SGD or Adam/AdamW) in groups by decay, and the mask logits in their own Adam.

        Masked weights get weight decay from the trainer, on present weights only (method.md section 6),
        unless `decay_pruned_weights` hands it to the optimiser as the authors' code did. A baseline re-zeroes
        its pruned weights after every step, so the optimiser's own decay is right for it.
        """
        opt = self.recipe["optimizer"]
        wd = opt["weight_decay"]
        self.masked = self.pruner.masked_weights() if self.pruner is not None else {}
        self.present_decay = wd if self.hf is not None and not opt["decay_pruned_weights"] else 0.0
        masked_ids = {id(p) for p in self.masked.values()}
        params = list(self.hf.weight_parameters()) if self.hf is not None else list(self.model.parameters())
        others = [p for p in params if id(p) not in masked_ids]
        groups = [
            {"params": list(self.masked.values()), "weight_decay": wd - self.present_decay},
            {"params": [p for p in others if p.ndim > 1], "weight_decay": wd},
            {
                "params": [p for p in others if p.ndim <= 1],
                "weight_decay": wd if opt["decay_bias_and_norm"] else 0.0,
            },
        ]
        groups = [g for g in groups if g["params"]]
        self.decoupled = opt["name"] == "adamw"
        if opt["name"] == "sgd":
            self.weight_optimizer = torch.optim.SGD(
                groups,
                lr=opt["lr"],
                momentum=opt["momentum"],
                nesterov=opt["nesterov"] and opt["momentum"] > 0,
            )
        else:
            cls = torch.optim.AdamW if self.decoupled else torch.optim.Adam
            self.weight_optimizer = adam(groups, cls=cls, lr=opt["lr"], betas=tuple(opt["betas"]))
        self.optimizers = [self.weight_optimizer]
        if self.hf is not None:
            spec = self.recipe["hyperflux"]
            self.mask_optimizer = adam(
                [{"params": list(self.hf.mask_parameters()), "weight_decay": 0.0}],
                lr=spec["mask_lr"],
                betas=tuple(spec["mask_betas"]),
            )
            self.hf.attach(self.mask_optimizer)
            self.optimizers.append(self.mask_optimizer)
        if self.baseline is not None:
            self.baseline.attach(self.weight_optimizer)

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.hf is not None:
            self.hf.load_state_dict(state["hyperflux"])
        if self.baseline is not None:
            self.baseline.load_state_dict(state["baseline"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        if not 0 <= int(state["epoch"]) <= self.epochs:
            raise RunError(f"{self.files.path}: the checkpoint is at epoch {state['epoch']} of {self.epochs}")
        self.epoch = int(state["epoch"])
        self.elapsed = float(state["elapsed_s"])
        self.last_eval = tuple(state["last_eval"]) if state["last_eval"] is not None else None

    def _state(self) -> dict[str, Any]:
        return {
            "kind": "train" if self.dense else "prune",
            "epoch": self.epoch,
            "recipe": self.recipe,
            "model": self.model.state_dict(),
            "hyperflux": self.hf.state_dict() if self.hf is not None else None,
            "baseline": self.baseline.state_dict() if self.baseline is not None else None,
            "optimizers": [o.state_dict() for o in self.optimizers],
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),
            "elapsed_s": self.elapsed,
            "last_eval": list(self.last_eval) if self.last_eval is not None else None,
        }

    # ------------------------------------------------------------- schedules
    def weight_lr(self, epoch: int, batch: int) -> float:
        """Cosine lr -> lr_end over pruning, then lr_reset -> lr_final over regrowth (per batch); IMP replays
        this schedule in each of its rounds."""
        _, start, end, done = self._lr_phase(epoch, batch)
        return cosine(start, end, done)

    def _lr_phase(self, epoch: int, batch: int) -> tuple[str, float, float, float]:
        """The recipe key of the lr schedule in effect at this batch, its cosine's start and end, and the
        fraction of it done."""
        progress = epoch + batch / self.batches
        if self.own_dense_schedule:
            spec = self.recipe["dense"]
            return "dense.lr", spec["lr"], spec["lr_end"], progress / self.epochs
        if self.baseline is not None:
            progress = self.baseline.schedule_progress(progress)
        opt = self.recipe["optimizer"]
        pruning, regrowth = (
            self.recipe["hyperflux"]["pruning_epochs"],
            self.recipe["hyperflux"]["regrowth_epochs"],
        )
        if progress < pruning or regrowth == 0:
            return "optimizer.lr", opt["lr"], lr_end(opt), progress / pruning
        return "optimizer.lr_reset", opt["lr_reset"], opt["lr_final"], (progress - pruning) / regrowth

    # ------------------------------------------------------------- one batch
    def _decay_present(self, lr: float) -> None:
        """Weight decay on the masked tensors' present weights only."""
        if self.decoupled:
            self.hf.decay_present_weights(lr * self.present_decay)
        else:
            self.hf.decay_present_weights(self.present_decay, into_grad=True)

    def _train_step(
        self, images: torch.Tensor, labels: torch.Tensor, lr: float, global_size: int
    ) -> torch.Tensor:
        """One optimiser step on a batch (this rank's share of a global batch of `global_size` samples);
        returns (loss sum, correct) of the share."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.net(images)
        smoothing = self.recipe["train"]["label_smoothing"]
        if self.world == 1:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
            loss_sum = loss.detach().double() * len(labels)
        else:
            summed = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing, reduction="sum")
            # DDP averages the ranks' gradients; this scale makes that average the global batch's mean,
            # even when the shares differ in size (the last batch)
            loss = summed * (self.world / global_size)
            loss_sum = summed.detach().double()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
        else:
            loss.backward()
        if self.baseline is not None:
            self.baseline.after_backward()
        if self.present_decay and not self.decoupled:
            self._decay_present(lr)
        clip = self.recipe["train"]["grad_clip"]
        if clip is not None:
            weights = [p for group in self.weight_optimizer.param_groups for p in group["params"]]
            nn.utils.clip_grad_norm_(weights, clip)
        for optimizer in self.optimizers:
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        if self.baseline is not None:
            self.baseline.end_step()
        if self.present_decay and self.decoupled:
            self._decay_present(lr)
        correct = (logits.detach().argmax(1) == labels).sum()
        return torch.stack([loss_sum, correct.double()])

    # ------------------------------------------------------------- one epoch
    def _check_finite(self, total: torch.Tensor, batch: int) -> None:
        """Stop on a non-finite loss; summed over ranks, so every rank stops at the same batch."""
        if not math.isfinite(float(distributed.all_sum(total[0].clone()))):
            saved = (
                f"the last good checkpoint (epoch {self.epoch}) is untouched in {self.files.path}"
                if self.files.has_checkpoint()
                else "no checkpoint had been written yet"
            )
            key = self._lr_phase(self.epoch, batch - 1)[0]
            raise TrainingError(
                f"the loss became non-finite in epoch {self.epoch + 1}, batch {batch}; stopped, and {saved}. "
                f"Lower {key} (the lr of this epoch; or check the data) and start again with --overwrite: "
                "--resume goes on with the same recipe."
            )

    def _postfix(self, total: torch.Tensor, seen: int) -> dict[str, str]:
        values = total.tolist()
        fields = {"loss": f"{values[0] / seen:.4f}", "acc": f"{100 * values[1] / seen:.2f}%"}
        if self.pruner is not None:
            target = self.pruner.expected_density()
            fields["density"] = f"{100 * self.pruner.density():.2f}%" + (
                f"/{100 * target:.2f}%" if target is not None else ""
            )
        if self.hf is not None:
            fields["P"] = f"{self.hf.pressure:.3g}"
        return fields

    def _train_epoch(self) -> dict[str, Any]:
        epoch = self.epoch
        self.model.train()
        self.train_loader.set_epoch(epoch)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        seen = 0
        periods: list[dict[str, Any]] = []
        lr = self.weight_lr(epoch, 0)
        bar = tqdm(
            total=self.batches,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            leave=False,
            # None: shown where stderr is a terminal; a log file gets the epoch lines, not the bar's redraws
            disable=True if self.quiet or not self.main else None,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
            miniters=1,  # prints as soon as mininterval has passed, the moment the figures below are set for
        )
        # every method's pruned weights have moments decaying through denormals: on the CPU, all train with
        # them flushed (a GPU computes them at full speed)
        with bar, flush_denormals(enabled=self.device.type == "cpu"):
            for batch, (images, labels) in enumerate(self.train_loader):
                lr = self.weight_lr(epoch, batch)
                for group in self.weight_optimizer.param_groups:
                    group["lr"] = lr
                images = to_device(images, self.device, self.channels_last)
                labels = labels.to(self.device, non_blocking=True)
                global_size = self.train_loader.global_size(batch) if self.world > 1 else len(labels)
                total += self._train_step(images, labels, lr, global_size)
                seen += len(labels)
                last = batch + 1 == self.batches
                # `periods` evenly spaced steps, the last one closing the epoch
                period_ends = (
                    batch + 1
                ) * self.periods // self.batches > batch * self.periods // self.batches
                if self.hf is not None and period_ends:
                    periods.append(self.hf.step(self.weight_optimizer))
                    if self.hf.frozen != self.wrapped_frozen:
                        self.net = self._wrap()
                if (batch + 1) % CHECK_EVERY == 0 or last:
                    self._check_finite(total, batch + 1)
                # the figures of this batch, set only when the bar is about to print (the density counts every
                # mask): what it shows is never those of an earlier refresh
                if not bar.disable and (last or time.time() - bar.last_print_t >= bar.mininterval):
                    bar.set_postfix(self._postfix(total, seen), refresh=False)
                bar.update()
        if self.world > 1:
            total = distributed.all_sum(torch.cat([total, total.new_tensor([seen])]))
            seen = int(total[2])
        values = total.tolist()
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            "loss": values[0] / seen,
            "train_accuracy": 100 * values[1] / seen,
        }
        if self.pruner is None:
            return {**row, "phase": "dense", "density": 1.0, "sparsity": 0.0}
        if self.baseline is not None:
            stats = self.baseline.stats()
            row |= {k: v for k, v in stats.items() if k != "layers"}
            row["layers"] = {layer["name"]: layer["density"] for layer in stats["layers"]}
            row["layer_pruned"] = {layer["name"]: layer["pruned"] for layer in stats["layers"]}
            row["layer_regrown"] = {layer["name"]: layer["regrown"] for layer in stats["layers"]}
            return self._check_ranks(row)
        stats = {k: v for k, v in periods[-1].items() if k != "layers"}
        stats["pruned"] = sum(p["pruned"] for p in periods)
        stats["regrown"] = sum(p["regrown"] for p in periods)
        if stats["flux_hist"] is None:  # no sampled batch in the last period: a row has a histogram or none
            del stats["flux_hist"]
        row |= stats
        names = [layer["name"] for layer in periods[-1]["layers"]]
        for key in ("pruned", "regrown"):
            row[f"layer_{key}"] = {
                name: sum(p["layers"][i][key] for p in periods) for i, name in enumerate(names)
            }
        # after the step: the trim at freeze time (exact mode) shows in the epoch that made it
        row["kept"] = self.hf.kept()
        row["density"] = row["kept"] / self.hf.total
        row["sparsity"] = 1 - row["density"]
        row["pressure_loss"] = float(self.hf.pressure_loss())
        row["layers"] = {layer["name"]: layer["density"] for layer in periods[-1]["layers"]}
        return self._check_ranks(row)

    def _check_ranks(self, row: dict[str, Any]) -> dict[str, Any]:
        """In a distributed run, every rank must end the epoch with the same masks."""
        if self.world > 1:
            row["mask_hashes"] = distributed.gather(mask_digest(self.pruner))
            if len(set(row["mask_hashes"])) > 1:
                raise TrainingError(
                    f"the masks differ between ranks after epoch {row['epoch']} ({row['mask_hashes']}); "
                    "every rank must run the same recipe, code and torch build"
                )
        return row

    def _epoch_line(self, row: dict[str, Any]) -> str:
        parts = [
            f"epoch {row['epoch']:>{len(str(self.epochs))}}/{self.epochs}",
            f"{row['phase']:<8}",
            f"loss {row['loss']:.4f}",
            f"train {row['train_accuracy']:.2f}%",
        ]
        if row.get("test_accuracy") is not None:
            parts.append(f"{evaluation_split(self.recipe)} {row['test_accuracy']:.2f}%")
        if self.pruner is not None:
            target = row["expected_density"]
            parts.append(
                f"density {100 * row['density']:.3f}%"
                + (f" (target {100 * target:.3f}%)" if target is not None else "")
            )
        if self.hf is not None:
            parts.append(f"P {row['pressure']:.4g}")
        parts.append(f"lr {row['lr']:.3g}")
        parts.append(f"{row['time_s']:.1f}s")
        remaining = self.epochs - row["epoch"]
        if remaining:  # the run's, at the mean epoch so far (the bar's covers only the epoch under way)
            parts.append(f"eta {_duration(remaining * row['elapsed_s'] / row['epoch'])}")
        return "  ".join(parts)

    # ------------------------------------------------------------- the run
    def run(self) -> dict[str, Any] | None:
        """Train to the end and write the outputs; returns the summary, or None when `stop_after` ended it."""
        done_here = 0
        while self.epoch < self.epochs:
            if self.stop_after is not None and done_here >= self.stop_after:
                return None
            start = time.perf_counter()
            row = self._train_epoch()
            evaluate_now = (self.epoch + 1) % self.recipe["train"][
                "eval_every"
            ] == 0 or self.epoch + 1 == self.epochs
            failure = None
            if evaluate_now:
                try:
                    self.last_eval = evaluate(
                        self.model, self.test_loader, self.device, self.amp_dtype, self.channels_last
                    )
                # an unreadable test image: the epoch's training is kept (checkpointed) before it is raised
                except data.DataError as error:
                    failure, evaluate_now = error, False
            row["test_accuracy"], row["test_loss"] = self.last_eval if evaluate_now else (None, None)
            row["time_s"] = time.perf_counter() - start
            self.elapsed += row["time_s"]
            row["elapsed_s"] = self.elapsed
            self.epoch += 1
            done_here += 1
            # metrics first: a kill before the checkpoint leaves a row that resume drops
            self.files.append_metrics(row)
            self.files.save_checkpoint(self._state())
            distributed.barrier()  # no rank runs ahead of the checkpoint rank 0 is writing
            if self.main:
                tqdm.write(self._epoch_line(row), file=self.log)
            if failure is not None:
                raise failure
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Write `model.safetensors` (masks baked in, original keys) and `summary.json`."""
        if self.last_eval is None:
            self.last_eval = evaluate(
                self.model, self.test_loader, self.device, self.amp_dtype, self.channels_last
            )
        # an export or report made from a checkpoint while the run went on describes an earlier model; those of
        # a run that had finished before this process (resumed, it retrains nothing) describe this one
        if not self.finished_before:
            self.files.clear_derived()
        # the test split's first sample on every rank: a rank's own share of it may be empty
        macs = count_macs(
            self.model, first_sample(self.bundle.loader("test", 1), self.device, self.channels_last)
        )
        if self.pruner is not None:
            stats = self.pruner.stats()
            layers = [
                {k: layer[k] for k in ("name", "shape", "total", "kept", "density")}
                for layer in stats["layers"]
            ]
            kept, total = stats["kept"], stats["total"]
            self.files.save_model(self.pruner.squash().state_dict())
        else:
            layers = dense_layers(self.model, self.recipe)
            kept, total = sum(layer["kept"] for layer in layers), sum(layer["total"] for layer in layers)
            self.files.save_model(self.model.state_dict())
        summary = {
            "final_accuracy": self.last_eval[0],
            "evaluated_on": evaluation_split(self.recipe),
            "final_test_loss": self.last_eval[1],
            "sparsity": 1 - kept / total,
            "density": kept / total,
            "kept": kept,
            "total": total,
            "target_sparsity": None if self.dense else self.recipe["hyperflux"]["target_sparsity"],
            "per_layer": layers,
            "macs": macs.as_dict(),
            "epochs": self.epochs,
            "wall_time_s": self.elapsed,
            "method": self.method,
            "seed": self.recipe["seed"],
            "model": self.recipe["model"]["name"],
            "data": self.recipe["data"]["name"],
            "device": str(self.device),
            "world_size": self.world,
            "recipe": effective(self.recipe),  # the lr_end it used, derived or not
        }
        self.files.write_summary(summary)
        target = summary["target_sparsity"]
        if target is not None and abs(summary["sparsity"] - target) > 0.01 and self.main:
            # the paper's form ends near its target, by design; this far off, the budget was the likely cause
            warnings.warn(
                f"the run ended at {100 * summary['sparsity']:.2f}% sparsity against a target of "
                f"{100 * target:.2f}%: the paper's form (exact_target: false) ends near the target, not on it, "
                "and a short pruning budget may leave it far off; exact_target: true ends on it",
                stacklevel=2,
            )
        distributed.barrier()
        return summary


def first_sample(loader, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """The first sample of `loader` as a batch of one, on `device`: the input MAC counts are measured on."""
    images, _ = next(iter(loader))
    return to_device(images[:1], device, channels_last)


def dense_layers(model: nn.Module, recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-layer counts of non-zero weights over the tensors the recipe would mask."""
    spec = selection(recipe)
    spec.pop("overrides")
    layers = []
    for target in select_targets(model, **spec):
        weight = getattr(target.module, target.param_name).detach()
        kept = int(torch.count_nonzero(weight))
        layers.append(
            {
                "name": target.name,
                "shape": list(weight.shape),
                "total": weight.numel(),
                "kept": kept,
                "density": kept / weight.numel(),
            }
        )
    return layers


def run_recipe(
    recipe: dict[str, Any],
    out: str | Path,
    *,
    dense: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    stop_after: int | None = None,
    log: TextIO | None = None,
    after: Callable[[Path], Any] | None = None,
) -> dict[str, Any] | None:
    """Prune (or, dense=True, train) as `recipe` says into `out`; `after(out)` runs when the run completes
    (on rank 0 alone in a distributed run). The folder is this process's until it returns (rank 0's, under
    torchrun): another run into it fails at once."""
    writer = distributed.launch_rank() in (None, 0)
    with exclusive(out) if writer else contextlib.nullcontext():
        trainer = Trainer(
            recipe,
            out,
            dense=dense,
            resume=resume,
            overwrite=overwrite,
            quiet=quiet,
            stop_after=stop_after,
            log=log,
        )
        try:
            summary = trainer.run()
        finally:
            if trainer.owns_group:
                distributed.close()
        if summary is not None and after is not None and trainer.main:
            after(Path(out))  # the report, written while the folder is still held
    return summary


@dataclass
class LoadedRun:
    """A model read back from a run (with its sparsifier when the checkpoint has one), ready to evaluate."""

    recipe: dict[str, Any]
    model: nn.Module
    hf: Hyperflux | None
    bundle: data.DataBundle
    device: torch.device
    stopped_at: tuple[int, int] | None = None  # (epoch, epochs) of a checkpoint whose run has not finished

    def counts(self) -> tuple[int, int]:
        """(kept, total) over the masked tensors: open gates, or non-zero weights of a plain model."""
        if self.hf is not None:
            return self.hf.kept(), self.hf.total
        layers = dense_layers(self.model, self.recipe)
        return sum(layer["kept"] for layer in layers), sum(layer["total"] for layer in layers)

    def macs(self) -> MacCount:
        """MACs per sample of the model on the first test image, dense and with its present weights."""
        # a CPU loader: only the one sample goes to the device, not the whole in-memory test set
        return count_macs(self.model, first_sample(self.bundle.loader("test", 1), self.device))

    def table(self) -> str:
        if self.hf is not None:
            return self.hf.summary()
        layers = dense_layers(self.model, self.recipe)
        rows = [
            (
                layer["name"],
                "x".join(map(str, layer["shape"])),
                f"{layer['kept']:,}",
                f"{layer['total']:,}",
                f"{100 * layer['density']:.2f}%",
            )
            for layer in layers
        ]
        kept, total = self.counts()
        rows.append(("total", "", f"{kept:,}", f"{total:,}", f"{100 * kept / total:.2f}%"))
        return text_table(("layer", "shape", "kept", "total", "density"), rows, left=2)


def epoch_budget(recipe: dict[str, Any], dense: bool) -> int:
    """The epochs a run trains for: a dense run's own `dense.epochs`, else pruning + regrowth."""
    if dense and recipe["dense"]["epochs"] is not None:
        return recipe["dense"]["epochs"]
    return recipe["hyperflux"]["pruning_epochs"] + recipe["hyperflux"]["regrowth_epochs"]


def load_run(path: str | Path, recipe_path: str | Path | None = None, device: str = "cpu") -> LoadedRun:
    """A run's model from `checkpoint.pt`, a run folder (its checkpoint, else its model), or a
    `model.safetensors` with its recipe (`recipe_path`, default: `recipe.yaml` beside it)."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in (CHECKPOINT, MODEL) if (path / name).exists()]
        if not found:
            raise RunError(f"{path}: neither {CHECKPOINT} nor {MODEL}; is this a run folder?")
        path = found[0]
    if not path.exists():
        raise RunError(f"{path}: no such file")
    target = resolve_device(device, what="device")
    if path.suffix == ".safetensors":
        if recipe_path and not Path(recipe_path).exists():
            raise RunError(f"{recipe_path}: no such recipe file")
        recipe_file = Path(recipe_path) if recipe_path else path.parent / RECIPE
        if not recipe_file.exists():
            raise RunError(f"{path}: a model file needs its recipe; pass --recipe (no {recipe_file})")
        recipe = load_recipe(recipe_file)
        bundle = load_data(recipe)
        model = build_model(recipe, bundle, init=False)
        load_weights(model, path, where=f"the model of {recipe_file}")
        return LoadedRun(recipe, model.to(target), None, bundle, target)
    state = read_checkpoint(path)
    recipe = state["recipe"]
    bundle = load_data(recipe)
    model = build_model(recipe, bundle, init=False).to(target)
    hf = None
    # a baseline's checkpoint holds plain weights, pruned ones stored as zeros
    if state["kind"] == "prune" and recipe.get("method") not in BASELINE_METHODS:
        batches = len(bundle.loader("train", recipe["train"]["batch_size"]))
        with warnings.catch_warnings():  # the trajectory's training-time notice, not news to a finished run
            warnings.filterwarnings("ignore", message=r"in \d+ periods? the trajectory reaches")
            hf = build_sparsifier(recipe, model, periods_per_epoch(recipe, batches))
    model.load_state_dict(state["model"])
    if hf is not None:
        hf.load_state_dict(state["hyperflux"])
    epochs = epoch_budget(recipe, dense=state["kind"] == "train")
    stopped = (int(state["epoch"]), epochs) if int(state["epoch"]) < epochs else None
    return LoadedRun(recipe, model, hf, bundle, target, stopped)
