"""In-memory image sets and the batch loader that feeds them to a trainer without a DataLoader's overhead.

The small sets (digits, MNIST, Fashion-MNIST, CIFAR) fit in memory as uint8 tensors, so one gather, one
conversion and one fused normalisation per batch are all an epoch costs; worker processes would add latency.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Self

import numpy as np
import torch
import torch.nn.functional as F


class DataError(Exception):
    """A missing, truncated or corrupt data set; the one-line message names the file, expectation and fix."""


Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class Normalizer:
    """float32 `(x / peak - mean) / std` per channel (peak 255 for uint8, else 1) as one multiply and one
    subtract, constants built once per dtype and device: per-batch overhead is what an MNIST epoch costs.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.constants: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        key = (batch.dtype, batch.device)
        if key not in self.constants:
            peak = 255.0 if batch.dtype == torch.uint8 else 1.0
            std = torch.tensor(self.std, dtype=torch.float64).view(1, -1, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float64).view(1, -1, 1, 1)
            self.constants[key] = (
                (1.0 / (peak * std)).float().to(batch.device),
                (mean / std).float().to(batch.device),
            )
        scale, shift = self.constants[key]
        # a copy even of float32: a batch with repeated channels is an expanded view, not writable in place
        return batch.to(torch.float32, copy=True).mul_(scale).sub_(shift)


@contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Run a batch's small CPU ops on one thread: a 100k-element op gains nothing from a parallel region, and
    on a loaded machine each region can wait milliseconds for a descheduled worker (measured: 15 s vs 0.05 s
    for an MNIST epoch on 2 busy cores). The caller's thread count is back before the batch is yielded."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, epoch), so any epoch can be replayed on resume."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class ImageSet:
    """Images (N, C, H, W) and labels (N,) in memory, with the geometry and normalisation a batch gets.

    `images` are uint8 (0..255) or float already scaled to [0, 1]. `pad` zero-pads every side and `channels`
    repeats a single channel, so a 28x28x1 set can be served as 32x32x3 without storing the bigger copy.
    `mean` / `std` (per output channel, on the [0, 1] scale) normalise the batches the loader yields.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        pad: int = 0,
        channels: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"need images (N, C, H, W) and labels (N,), got {tuple(images.shape)}, {tuple(labels.shape)}"
            )
        stored_channels = images.shape[1]
        if channels is not None and channels != stored_channels and stored_channels != 1:
            raise ValueError(f"can only repeat a single channel, not {stored_channels}")
        self.images = images
        self.labels = labels.long()
        self.pad = pad
        self.channels = channels or stored_channels
        self.mean = tuple(mean) if mean is not None else (0.0,) * self.channels
        self.std = tuple(std) if std is not None else (1.0,) * self.channels
        self.normalize = Normalizer(self.mean, self.std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """One normalised sample, so the set also works with a plain torch DataLoader."""
        batch = self.normalize(self.raw(torch.tensor([index])))
        return batch[0], int(self.labels[index])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the samples as served."""
        _, _, height, width = self.images.shape
        return self.channels, height + 2 * self.pad, width + 2 * self.pad

    def view(self, *, pad: int, channels: int) -> ImageSet:
        """The same storage served with more padding and channels (e.g. the 32x32x3 view of a 28x28x1 set)."""
        return ImageSet(self.images, self.labels, pad=self.pad + pad, channels=channels)

    def to(self, device: torch.device | str) -> ImageSet:
        """A copy whose tensors live on `device`, so batches are gathered there (one transfer per run)."""
        return ImageSet(
            self.images.to(device),
            self.labels.to(device),
            pad=self.pad,
            channels=self.channels,
            mean=self.mean,
            std=self.std,
        )

    def raw(self, index: torch.Tensor) -> torch.Tensor:
        """The samples at `index` in served geometry, still uint8 or [0, 1] float."""
        batch = torch.index_select(self.images, 0, index.to(self.images.device))
        if self.pad:
            batch = F.pad(batch, (self.pad,) * 4)
        if self.channels != batch.shape[1]:
            batch = batch.expand(-1, self.channels, -1, -1)
        return batch

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Exact per-channel mean and std of the samples as served, on the [0, 1] scale.

        uint8 sets use a 256-bin histogram per channel (exact, and one pass); zero padding adds to bin 0.
        """
        count, height, width = len(self), *self.images.shape[2:]
        padded_pixels = count * ((height + 2 * self.pad) * (width + 2 * self.pad) - height * width)
        means, stds = [], []
        for channel in range(self.images.shape[1]):
            plane = self.images[:, channel].reshape(-1).cpu()
            if plane.dtype == torch.uint8:
                # torch's bincount reads the bytes as they are; numpy's widened them to int64 first (a
                # temporary 8 times MNIST's pixels, and seconds at every run's start)
                histogram = torch.bincount(plane, minlength=256).double().numpy()
                histogram[0] += padded_pixels
                values = np.arange(256, dtype=np.float64) / 255.0
                mean = float((histogram * values).sum() / histogram.sum())
                variance = float((histogram * (values - mean) ** 2).sum() / histogram.sum())
            else:
                plane64 = plane.double()
                total = plane64.numel() + padded_pixels
                mean = float(plane64.sum() / total)
                variance = float((((plane64 - mean) ** 2).sum() + padded_pixels * mean**2) / total)
            means.append(mean)
            stds.append(max(variance, 1e-12) ** 0.5)
        if self.channels != self.images.shape[1]:
            means, stds = means * self.channels, stds * self.channels
        return tuple(means), tuple(stds)

    def subset(self, index: torch.Tensor) -> ImageSet:
        """The samples at `index` (a copy), served and normalised as this set."""
        return ImageSet(
            self.images[index],
            self.labels[index],
            pad=self.pad,
            channels=self.channels,
            mean=self.mean,
            std=self.std,
        )

    def with_stats(self, mean: Sequence[float], std: Sequence[float]) -> ImageSet:
        """The same set normalised by the given statistics (a test split takes its training split's)."""
        return ImageSet(self.images, self.labels, pad=self.pad, channels=self.channels, mean=mean, std=std)


class RandomCropFlip:
    """The CIFAR augmentation (random crop after zero padding, random horizontal flip), batched in one gather.

    Works on the raw batch (before normalisation), so the padding is black as in the usual PIL pipeline.
    """

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        self.padding = padding
        self.flip = flip

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        size, channels, height, width = batch.shape
        offsets = torch.randint(0, 2 * self.padding + 1, (2, size), generator=generator).to(batch.device)
        flipped = (torch.rand(size, generator=generator) < 0.5).to(batch.device) if self.flip else None
        # every crop position as a view (B, C, rows, cols, H, W); one gather picks each sample's window
        windows = F.pad(batch, (self.padding,) * 4).unfold(2, height, 1).unfold(3, width, 1)
        sample = torch.arange(size, device=batch.device)[:, None]
        channel = torch.arange(channels, device=batch.device)[None, :]
        cropped = windows[sample, channel, offsets[0][:, None], offsets[1][:, None]]
        if flipped is not None:
            cropped[flipped] = cropped[flipped].flip(3)
        return cropped


class GlobalBatches:
    """What the in-memory and the image-folder loaders share: the global batch count, a seeded epoch, and
    the rank's share of each global batch.

    Sharded (`world_size` > 1), `batch_size` is the global batch: every rank walks the same global batches
    and takes its contiguous share of each (sizes differ by at most one), so N ranks see exactly the samples,
    in the same steps, that one process would, and resuming on another world size changes nothing.
    """

    def __init__(
        self,
        dataset: Sequence,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int,
        world_size: int,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def shard(self, rank: int, world_size: int) -> Self:
        """This loader's share for `rank` of `world_size` (the global batch size stays `batch_size`)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        shard = copy.copy(self)
        shard.rank, shard.world_size = rank, world_size
        return shard

    def global_size(self, batch_index: int) -> int:
        """Samples in global batch `batch_index`, over all ranks (the last one may be short)."""
        return min(self.batch_size, len(self.dataset) - batch_index * self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1


class BatchLoader(GlobalBatches):
    """Normalised (x, y) batches of an `ImageSet` in a seeded order; `set_epoch` picks the epoch's order.

    The order and augmentation of epoch e depend only on (seed, e), so a resumed run sees the same batches.
    """

    def __init__(
        self,
        dataset: ImageSet,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        augment: Augment | None = None,
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
        self.augment = augment

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = epoch_generator(self.seed, self.epoch)
        count = len(self.dataset)
        order = torch.randperm(count, generator=generator) if self.shuffle else torch.arange(count)
        order = order.to(self.dataset.labels.device)
        for batch_index in range(len(self)):
            with one_thread(order.device):
                index = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
                if self.world_size == 1:
                    batch = self.dataset.raw(index)
                    if self.augment is not None:
                        batch = self.augment(batch, generator)
                else:
                    # augment the global batch, then keep this rank's share: every rank advances the
                    # generator alike, and each sample is augmented as one process would augment it
                    shares = index.tensor_split(self.world_size)
                    share = shares[self.rank]
                    if self.augment is not None:
                        start = sum(len(s) for s in shares[: self.rank])
                        batch = self.augment(self.dataset.raw(index), generator)[start : start + len(share)]
                    else:
                        batch = self.dataset.raw(share)
                    index = share
                images, labels = self.dataset.normalize(batch), self.dataset.labels[index]
            yield images, labels
