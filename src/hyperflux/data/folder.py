"""ImageNet-style folders (`root/train/<class>/<image>`, `root/val/<class>/<image>`), decoded with Pillow.

Too big for memory, so these go through a torch DataLoader (workers decode in parallel). Each sample's
random crop and flip come from a generator seeded by (seed, epoch, index), so the epoch is reproducible with
any number of workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hyperflux.data.sets import DataError, GlobalBatches, Normalizer, epoch_generator

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEST_FOLDER_NAMES = ("val", "test", "validation")
WORKER_ERROR_PREFIX = f"{DataError.__module__}.{DataError.__qualname__}:"
LAYOUT_HINT = "expected root/train/<class>/<image> and root/val/<class>/<image>; point root at such a folder"


def list_classes(folder: Path) -> list[str]:
    """The class folders, sorted; hidden ones (`.ipynb_checkpoints`) are not classes."""
    classes = (
        sorted(e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))
        if folder.is_dir()
        else []
    )
    if not classes:
        raise DataError(f"{folder}: no class folders ({LAYOUT_HINT})")
    return classes


def list_samples(folder: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """(path, class index) of every image under `folder/<class>/`, sorted: the order never depends on disk.
    Hidden files and folders (macOS's `._name.png`, `.ipynb_checkpoints/`) are not images of the set."""
    samples = []
    for label, name in enumerate(classes):
        class_folder = folder / name
        if not class_folder.is_dir():
            continue
        files = sorted(
            path
            for path in class_folder.rglob("*")
            if path.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in path.relative_to(class_folder).parts)
        )
        samples.extend((path, label) for path in files)
    if not samples:
        raise DataError(f"{folder}: no images with extensions {', '.join(IMAGE_EXTENSIONS)} ({LAYOUT_HINT})")
    return samples


def random_resized_box(
    width: int, height: int, rng: random.Random, scale: tuple[float, float] = (0.08, 1.0)
) -> tuple[int, int, int, int]:
    """A crop box of random area fraction and aspect ratio (3/4..4/3), as in Inception / ResNet training."""
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_width, crop_height = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left, top = rng.randint(0, width - crop_width), rng.randint(0, height - crop_height)
            return left, top, left + crop_width, top + crop_height
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


class FolderSet(Dataset):
    """Images of an ImageFolder split as uint8 (3, size, size) tensors: random resized crop and flip when
    augmenting (training), else resize to size/0.875 and centre crop (evaluation)."""

    def __init__(
        self,
        folder: Path,
        classes: Sequence[str],
        image_size: int,
        *,
        augment: bool,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.folder = folder
        self.classes = list(classes)
        self.samples = list_samples(folder, self.classes)
        self.labels = torch.tensor([label for _, label in self.samples])
        self.image_size = image_size
        self.augment = augment
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.seed = 0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        try:
            with Image.open(path) as opened:
                image = opened
                if image.mode.startswith("I"):  # 16-bit (PNG, TIFF): scaled to 8 bits, which convert() clips
                    image = image.convert("I").point(lambda value: value / 256).convert("L")
                image = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"{path}: not a readable image ({error}); replace or remove it") from error
        size = self.image_size
        if self.augment:
            rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
            box = random_resized_box(*image.size, rng)
            image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            short_side = round(size / 0.875)
            width, height = image.size
            scale = short_side / min(width, height)
            image = image.resize(
                (max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BILINEAR
            )
            left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
        pixels = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1), label


class FolderLoader(GlobalBatches):
    """Normalised (x, y) batches of a `FolderSet` through a DataLoader, in a seeded order per `set_epoch`,
    sharded over ranks like `BatchLoader`."""

    def __init__(
        self,
        dataset: FolderSet,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(
            dataset,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
        )
        self.num_workers = num_workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # workers receive a copy of the dataset when the iterator starts, so the epoch travels with it
        self.dataset.seed, self.dataset.epoch = self.seed, self.epoch
        count = len(self.dataset)
        order = (
            torch.randperm(count, generator=epoch_generator(self.seed, self.epoch))
            if self.shuffle
            else torch.arange(count)
        )
        global_batches = list(order.split(self.batch_size))
        if self.drop_last and global_batches and len(global_batches[-1]) < self.batch_size:
            global_batches.pop()
        shares = [batch.tensor_split(self.world_size)[self.rank].tolist() for batch in global_batches]
        batches = iter(
            DataLoader(
                self.dataset,
                batch_sampler=[share for share in shares if share],
                num_workers=self.num_workers,
                persistent_workers=False,
            )
        )
        normalize = Normalizer(self.dataset.mean, self.dataset.std)
        try:
            for share in shares:
                if share:
                    images, labels = next(batches)
                    yield normalize(images), labels
                else:  # a last global batch smaller than the world: this rank's share is empty, as in memory
                    image, label = self.dataset[0]
                    yield (
                        normalize(image.new_empty((0, *image.shape))),
                        torch.empty(0, dtype=torch.as_tensor(label).dtype),
                    )
        except DataError as error:
            # a worker's error arrives wrapped in its traceback; keep the one-line message for the user
            raise DataError(
                str(error).strip().splitlines()[-1].removeprefix(f"{WORKER_ERROR_PREFIX} ")
            ) from None


def load_image_folder(root: Path, image_size: int, augment: bool = True) -> tuple[FolderSet, FolderSet]:
    """Train and test `FolderSet`s of an ImageNet-style root; labels follow the sorted train/ folders."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder ({LAYOUT_HINT})")
    classes = list_classes(root / "train")
    test_folder = next((root / name for name in TEST_FOLDER_NAMES if (root / name).is_dir()), None)
    if test_folder is None:
        raise DataError(f"{root}: no val/ (or test/) folder ({LAYOUT_HINT})")
    unknown = sorted(set(list_classes(test_folder)) - set(classes))
    if unknown:
        raise DataError(f"{test_folder}: classes {unknown[:3]} are not in {root / 'train'} ({LAYOUT_HINT})")
    train = FolderSet(root / "train", classes, image_size, augment=augment)
    counts = torch.bincount(train.labels, minlength=len(classes)).tolist()
    empty = [name for name, count in zip(classes, counts, strict=True) if not count]
    if empty:  # a class no training image shows would still be an output the model can never learn
        raise DataError(
            f"{root / 'train'}: class folders {empty[:3]} hold no images; add images or remove them ({LAYOUT_HINT})"
        )
    return train, FolderSet(test_folder, classes, image_size, augment=False)
