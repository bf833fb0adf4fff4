"""The run folder: metrics appended every epoch, an atomic checkpoint, the resolved recipe, the final outputs.

Layout: `recipe.yaml`, `metrics.jsonl` (one object per epoch, with per-layer densities), `metrics.csv` (the
scalar columns), `checkpoint.pt`, and at the end `model.safetensors`, `summary.json` and the report.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import secrets
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save

from hyperflux import recipe as recipes

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

CHECKPOINT = "checkpoint.pt"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
RECIPE = "recipe.yaml"
TMP_SUFFIX = ".tmp"  # of a file being written, renamed into place when whole (`atomic_write`)
LOCK = ".lock"  # held by the process training into the folder (`exclusive`)
SUMMARY = "summary.json"
MODEL = "model.safetensors"
REPORT = "report.html"
SPARSE_MODEL = "model.sparse.safetensors"  # `hyperflux export` beside the model
ONNX_MODEL = "model.onnx"
CHECKPOINT_FORMAT = 1


class RunError(Exception):
    """A run folder that cannot be used as asked (missing, already used, unreadable)."""


def atomic_write(path: Path, write: Callable[[BinaryIO], object] | str | bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename: a kill leaves old or new.
    `write` writes the content to the open file, or is the content itself (text or bytes)."""
    if isinstance(write, str | bytes):
        data = write.encode() if isinstance(write, str) else write
        write = lambda handle: handle.write(data)  # noqa: E731
    # a name of its own, so that two writers of one file (a user's report beside the run's) never share it;
    # made with the process's umask, as an ordinary write would be
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        with open(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666), "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _jsonl(row: Mapping[str, Any]) -> str:
    return json.dumps(row, default=_json_default) + "\n"


def _csv_rows(rows: list[Mapping[str, Any]], header: list[str] | None) -> str:
    """Rows' scalar columns as CSV lines under `header`, or, with none yet, under the first row's columns
    (the header line included)."""
    scalars = [
        {k: "" if v is None else v for k, v in r.items() if not isinstance(v, dict | list)} for r in rows
    ]
    text = io.StringIO()
    if scalars:
        writer = csv.DictWriter(
            text, fieldnames=header or list(scalars[0]), restval="", extrasaction="ignore"
        )
        if header is None:
            writer.writeheader()
        writer.writerows(scalars)
    return text.getvalue()


def _csv_before(path: Path, epochs: int) -> bytes:
    """The CSV file's header and its rows of epochs up to `epochs`, as they are."""
    if not path.exists():
        return b""
    with open(path, newline="") as handle:
        lines = handle.read().splitlines(keepends=True)
    if not lines:
        return b""
    column = next(csv.reader(lines[:1])).index("epoch")
    kept = [line for line in lines[1:] if int(next(csv.reader([line]))[column]) <= epochs]
    return "".join(lines[:1] + kept).encode()


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """Hold the run folder `path` for this process while the block runs: a second process training into it
    would interleave its metrics and checkpoints with this one's. An advisory lock (`.lock` in the folder),
    released by the system when the process ends however it ends; none where fcntl is missing (Windows)."""
    path = Path(path)
    if fcntl is None or (path.exists() and not path.is_dir()):  # a file: RunFolder.check says so
        yield
        return
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with open(path / LOCK, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(
                    f"{path}: another hyperflux process is running in this folder; wait for it to end or give "
                    "another --out"
                ) from None
            except OSError:  # a file system without locks (some network mounts): run unguarded, as before
                pass
            for stale in path.glob(f".*{TMP_SUFFIX}"):  # left by a kill mid-write
                stale.unlink(missing_ok=True)
            yield
    finally:
        if made and [p.name for p in path.iterdir()] == [LOCK]:  # a run that failed to start leaves no folder
            (path / LOCK).unlink()
            path.rmdir()


def in_progress(path: str | Path) -> bool:
    """Whether a process is training into the run folder now (it holds the folder's `.lock`); read-only, so
    that a folder this process may not write is asked too."""
    lock = Path(path) / LOCK
    if fcntl is None or not lock.is_file():
        return False
    try:
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:  # unreadable, or a file system without locks
        pass
    return False


class RunFolder:
    """One run's files. With `writer=False` (every rank but 0 of a distributed run) the checks and reads run
    as usual but nothing is written, so N ranks can share one folder."""

    def __init__(self, path: str | Path, *, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer

    def file(self, name: str) -> Path:
        return self.path / name

    def has_checkpoint(self) -> bool:
        return self.file(CHECKPOINT).exists()

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse to mix a new run into an old one by accident; writes nothing (`start` does, once the run's
        recipe has built)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path} is a file, not a run folder; give --out a folder")
        if resume:
            if not self.has_checkpoint():
                raise RunError(
                    f"{self.path}: no {CHECKPOINT} to resume from; a run stopped before its first checkpoint "
                    "starts again without --resume"
                )
            return
        # metrics alone are a run stopped before its first checkpoint: nothing to resume, so it starts over
        used = [name for name in (CHECKPOINT, SUMMARY, MODEL) if self.file(name).exists()]
        if used and not overwrite:
            raise RunError(
                f"{self.path} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                "or --out for another folder"
            )

    def start(self, recipe: Mapping[str, Any]) -> None:
        """Create the folder and save the recipe, removing what an earlier run there left: its outputs and
        what commands made from them (`clear_derived`)."""
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        for name in (CHECKPOINT, METRICS_JSONL, METRICS_CSV, SUMMARY, MODEL):
            self.file(name).unlink(missing_ok=True)
        self.clear_derived()
        atomic_write(self.file(RECIPE), recipes.dump(recipes.saved_form(recipe)))

    def clear_derived(self) -> None:
        """Remove what commands made from the run's outputs (report, plots, exports): a new run, or one that
        goes on, would leave them describing another model."""
        if not self.writer:
            return
        from hyperflux.report import report_files  # matplotlib, imported by a run only

        for name in (SPARSE_MODEL, ONNX_MODEL, *report_files()):
            self.file(name).unlink(missing_ok=True)

    # ------------------------------------------------------------- metrics
    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """One epoch: the full row to JSONL, its scalar columns to CSV. The first row's columns are the CSV's:
        a later row fills them by name (empty where it lacks one; a column it adds is in the JSONL only)."""
        if not self.writer:
            return
        with open(self.file(METRICS_JSONL), "a") as handle:
            handle.write(_jsonl(row))
        path = self.file(METRICS_CSV)
        header = None
        if path.exists() and path.stat().st_size:
            with open(path, newline="") as handle:
                header = next(csv.reader(handle), None)
        with open(path, "a", newline="") as handle:
            handle.write(_csv_rows([row], header))

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows written so far. A last row cut short (the run killed while writing it) is dropped, as resume
        drops any row past the checkpoint; a damaged row elsewhere is an error naming the file and line."""
        path = self.file(METRICS_JSONL)
        if not path.exists():
            return []
        text = path.read_text()
        lines = text.splitlines()
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                if number == len(lines) and not text.endswith("\n"):
                    break
                raise RunError(f"{path}, line {number}: not a metrics row ({error})") from None
        return rows

    def truncate_metrics(self, epochs: int) -> None:
        """Drop rows past `epochs` (written by a run killed between its metrics and its checkpoint), and a last
        row cut short. Both files are replaced whole (CSV first), never emptied and refilled, so a kill here
        loses nothing the checkpoint covers; what matches is left alone. The JSONL is the record: a CSV that
        differs from it (deleted, cut short) is written again from it, while a JSONL missing rows of the
        checkpoint's epochs is warned of, the CSV keeping its own rows up to the checkpoint."""
        if not self.writer:
            return
        path, csv_path = self.file(METRICS_JSONL), self.file(METRICS_CSV)
        rows = [r for r in self.read_metrics() if r["epoch"] <= epochs]
        missing = sorted(set(range(1, epochs + 1)) - {r["epoch"] for r in rows})
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            warnings.warn(
                f"{path} lacks the rows of epochs {shown} of the checkpoint's {epochs}: the run goes on from its "
                "checkpoint, and its metrics and report without them",
                stacklevel=2,
            )
            expected = _csv_before(csv_path, epochs)  # what the CSV holds of the checkpoint's epochs
        else:
            expected = _csv_rows(rows, None).encode()
        if (csv_path.read_bytes() if csv_path.exists() else b"") != expected:  # bytes: csv's \r\n
            atomic_write(csv_path, expected)
        jsonl = "".join(_jsonl(row) for row in rows)
        if (path.read_text() if path.exists() else "") != jsonl:
            atomic_write(path, jsonl)

    # ------------------------------------------------------------- checkpoint and outputs
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        if not self.writer:
            return

        def write(handle) -> None:
            buffer = io.BytesIO()
            torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
            handle.write(buffer.getbuffer())

        atomic_write(self.file(CHECKPOINT), write)

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The checkpoint to resume from; one that cannot be read says that only --overwrite goes on."""
        try:
            return read_checkpoint(self.file(CHECKPOINT), map_location)
        except RunError as error:
            raise RunError(f"{error}; the run cannot resume from it: --overwrite starts it again") from None

    def save_model(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        if not self.writer:
            return
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        atomic_write(self.file(MODEL), save(tensors, metadata={"format": "pt"}))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        if not self.writer:
            return
        text = json.dumps(summary, indent=2, default=_json_default) + "\n"
        atomic_write(self.file(SUMMARY), text)

    def read_summary(self) -> dict[str, Any] | None:
        path = self.file(SUMMARY)
        return json.loads(path.read_text()) if path.exists() else None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: no such checkpoint")
    try:
        # torch.load does not check the zip's CRCs: damaged bytes inside would load as changed tensors
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated or foreign file: torch raises many kinds
        raise RunError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None
    if damaged is not None:
        raise RunError(f"{path}: damaged checkpoint ({damaged} fails its checksum)")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path}: not a hyperflux run checkpoint")
    return state
