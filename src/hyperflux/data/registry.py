"""The data registry a recipe names: `load(name, root)` returns both splits and what a model needs to know."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hyperflux.data.cache import DEBIAN_FASHION_MNIST, cache_dir
from hyperflux.data.cifar import CIFAR10, CIFAR100, load_cifar
from hyperflux.data.folder import FolderLoader, FolderSet, load_image_folder
from hyperflux.data.idx import FASHION_MNIST, MNIST, load_idx_family
from hyperflux.data.sets import BatchLoader, DataError, ImageSet, RandomCropFlip

DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class DataBundle:
    """Train and test splits of one data set, normalised by the training split's statistics (image folders:
    by ImageNet's, without reading every image first; their images are served as RGB).

    `augment` says whether `loader("train", ...)` applies the set's training augmentation (CIFAR: random crop
    with padding 4 and horizontal flip; folders: random resized crop and flip).
    """

    name: str
    train: ImageSet | FolderSet
    test: ImageSet | FolderSet
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool | None = None,
        drop_last: bool = False,
        device: str | torch.device | None = None,
        num_workers: int = 0,
    ) -> BatchLoader | FolderLoader:
        """Batches of `split` ("train" or "test"); the train split is shuffled by default, the test split not.

        In-memory sets move to `device` once, so every batch is gathered there; folders decode on the CPU.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        dataset = self.train if split == "train" else self.test
        shuffle = split == "train" if shuffle is None else shuffle
        if isinstance(dataset, FolderSet):
            return FolderLoader(
                dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, num_workers=num_workers
            )
        if device is not None:
            dataset = dataset.to(device)
        augment = RandomCropFlip() if self.augment and split == "train" else None
        return BatchLoader(
            dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, augment=augment
        )


def read_digits() -> tuple[ImageSet, ImageSet]:
    """scikit-learn's 8x8 digits (1797 images, values 0..16) in a fixed stratified 1437 / 360 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None]
    train_x, test_x, train_y, test_y = train_test_split(
        images,
        digits.target,
        test_size=DIGITS_TEST_SIZE,
        random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    return (
        ImageSet(torch.from_numpy(train_x), torch.from_numpy(train_y)),
        ImageSet(torch.from_numpy(test_x), torch.from_numpy(test_y)),
    )


def read_mnist(root: Path | None) -> tuple[ImageSet, ImageSet]:
    return load_idx_family(MNIST, [root if root is not None else cache_dir()])


def read_fashion_mnist(root: Path | None) -> tuple[ImageSet, ImageSet]:
    return load_idx_family(FASHION_MNIST, [root] if root is not None else [DEBIAN_FASHION_MNIST, cache_dir()])


@dataclass(frozen=True)
class Entry:
    read: Callable[[Path | None], tuple[ImageSet, ImageSet]]
    num_classes: int
    augment: bool
    as_32x3: bool = False


REGISTRY: dict[str, Entry] = {
    "digits": Entry(lambda root: read_digits(), 10, augment=False),
    "mnist": Entry(read_mnist, 10, augment=False),
    "mnist-32": Entry(read_mnist, 10, augment=False, as_32x3=True),
    "fashion-mnist": Entry(read_fashion_mnist, 10, augment=False),
    "fashion-mnist-32": Entry(read_fashion_mnist, 10, augment=False, as_32x3=True),
    "cifar10": Entry(lambda root: load_cifar(CIFAR10, root or cache_dir()), 10, augment=True),
    "cifar100": Entry(lambda root: load_cifar(CIFAR100, root or cache_dir()), 100, augment=True),
}
IMAGE_FOLDER = "imagefolder"


def names() -> list[str]:
    """Every name `load` accepts."""
    return [*REGISTRY, IMAGE_FOLDER]


HOLDOUT_SEED = 0  # the holdout and subset are the same whatever the run's seed, so runs on them compare


def load(
    name: str,
    root: str | Path | None = None,
    *,
    augment: bool | None = None,
    image_size: int = 224,
    holdout: int = 0,
    train_subset: int | None = None,
    test_split: bool = False,
) -> DataBundle:
    """Data set `name` from `root` (default: where `fetch` puts it), both splits, with its metadata.

    `augment` overrides the set's default training augmentation; `image_size` applies to "imagefolder" only
    (the other sets have their native size; the "-32" names give the 32x32x3 view of the 28x28 sets).
    `holdout` > 0 sets that many training samples aside (a fixed random choice) and serves them as the test
    split, for choosing settings without looking at the test set; the statistics come from the rest.
    `train_subset` trains on that many samples of the (remaining) training split, a fixed random choice, for
    budgets where a full epoch costs too much; the test split stays whole. `test_split` serves the real test
    split even with a holdout, normalised as the run that trained without it saw its data.
    """
    root_path = Path(root).expanduser() if root is not None else None
    if holdout < 0:
        raise ValueError(f"holdout must be >= 0, got {holdout}")
    if train_subset is not None and train_subset < 1:
        raise ValueError(f"train_subset must be >= 1, got {train_subset}")
    if name == IMAGE_FOLDER:
        if holdout or train_subset is not None:
            raise DataError("holdout and train_subset are supported for in-memory sets, not imagefolder")
        if root_path is None:
            raise DataError(
                "imagefolder needs root: a folder holding train/<class>/<image> and val/<class>/<image>"
            )
        augment = True if augment is None else augment
        train_folder, test_folder = load_image_folder(root_path, image_size, augment)
        return DataBundle(
            name=name,
            train=train_folder,
            test=test_folder,
            num_classes=len(train_folder.classes),
            in_channels=3,
            image_size=image_size,
            mean=train_folder.mean,
            std=train_folder.std,
            augment=augment,
        )
    if name not in REGISTRY:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(names())}")
    entry = REGISTRY[name]
    train, test = entry.read(root_path)
    if holdout:
        if holdout >= len(train):
            raise DataError(f"holdout {holdout} leaves no training samples: {name} has {len(train)}")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
        train, held = (
            train.subset(order[:-holdout].sort().values),
            train.subset(order[-holdout:].sort().values),
        )
        test = test if test_split else held
    if train_subset is not None:
        if train_subset > len(train):
            raise DataError(f"train_subset {train_subset} is more than the {len(train)} training samples")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(HOLDOUT_SEED + 1))
        train = train.subset(order[:train_subset].sort().values)
    if entry.as_32x3:
        train, test = train.view(pad=2, channels=3), test.view(pad=2, channels=3)
    mean, std = train.channel_stats()
    channels, height, _ = train.shape
    return DataBundle(
        name=name,
        train=train.with_stats(mean, std),
        test=test.with_stats(mean, std),
        num_classes=entry.num_classes,
        in_channels=channels,
        image_size=height,
        mean=mean,
        std=std,
        augment=entry.augment if augment is None else augment,
    )
