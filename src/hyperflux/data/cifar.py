"""CIFAR-10 and CIFAR-100 from the standard python pickle folders (`cifar-10-batches-py`, `cifar-100-python`).

No package registry ships CIFAR, so the user supplies the folder (or `hyperflux data fetch cifar10`
downloads it where internet exists). The pickles are the data set's own format; only open folders you trust.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hyperflux.data.sets import DataError, ImageSet


@dataclass(frozen=True)
class CifarLayout:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: bytes
    num_classes: int
    url: str
    md5: str
    fetch_name: str

    @property
    def command(self) -> str:
        return f"hyperflux data fetch {self.fetch_name}"


CIFAR10 = CifarLayout(
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{index}" for index in range(1, 6)),
    test_file="test_batch",
    label_key=b"labels",
    num_classes=10,
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    fetch_name="cifar10",
)

CIFAR100 = CifarLayout(
    title="CIFAR-100",
    folder="cifar-100-python",
    train_files=("train",),
    test_file="test",
    label_key=b"fine_labels",
    num_classes=100,
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    fetch_name="cifar100",
)


def locate_cifar(layout: CifarLayout, root: Path) -> Path:
    """`root` itself when it holds the batches, else `root/<standard folder name>`."""
    for folder in (root, root / layout.folder):
        if (folder / layout.test_file).is_file():
            return folder
    raise DataError(
        f"{layout.title} not found in {root} (expected {layout.folder}/{layout.test_file} and the training "
        f"batches, python version from {layout.url}); get it with `{layout.command}`"
    )


def read_batch(path: Path, layout: CifarLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickle batch as (N, 3, 32, 32) uint8 images and int64 labels, after checking its shape."""
    if not path.is_file():
        raise DataError(
            f"{path}: missing ({layout.title} batch); get the whole folder with `{layout.command}`"
        )
    try:
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[layout.label_key])
    except (
        pickle.UnpicklingError,
        EOFError,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        ImportError,
        LookupError,
    ) as error:  # a damaged pickle can name a module or an encoding that does not exist
        raise DataError(
            f"{path}: not a readable {layout.title} pickle batch ({type(error).__name__}: {error}); "
            f"get it again with `{layout.command}`"
        ) from error
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.ndim != 1 or len(labels) != len(data):
        raise DataError(
            f"{path}: data of shape {data.shape} with labels of shape {labels.shape} (expected (N, 3072) and N "
            f"labels); get it again with `{layout.command}`"
        )
    # a batch written by hand (floats in [0, 1], wider integers) would otherwise be cast to uint8 in silence:
    # blank or wrapped images
    if (
        data.dtype != np.uint8
        and data.size
        and not (np.issubdtype(data.dtype, np.integer) and data.min() >= 0 and data.max() <= 255)
    ):
        raise DataError(
            f"{path}: pixels of dtype {data.dtype} from {data.min()} to {data.max()}; a {layout.title} batch "
            "holds integers 0..255 (uint8), as `(images * 255).round().astype(numpy.uint8)` gives"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: labels of dtype {labels.dtype}; a {layout.title} batch holds integer labels"
        )
    data, labels = data.astype(np.uint8, copy=False), labels.astype(np.int64, copy=False)
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DataError(
            f"{path}: labels outside 0..{layout.num_classes - 1}; get it again with `{layout.command}`"
        )
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar(layout: CifarLayout, root: Path) -> tuple[ImageSet, ImageSet]:
    """Train (all training batches, in file order) and test sets of a CIFAR pickle folder."""
    folder = locate_cifar(layout, root)
    train_parts = [read_batch(folder / name, layout) for name in layout.train_files]
    train = ImageSet(
        torch.cat([images for images, _ in train_parts]), torch.cat([labels for _, labels in train_parts])
    )
    test = ImageSet(*read_batch(folder / layout.test_file, layout))
    return train, test
