"""Data sources: find the data root and read MNIST from it.

This is the first stage of the flow (source → dataset → trainer → store → detector).
It only locates and decodes raw files; colouring and caching live in
:mod:`modelzoo.datasets`.

Lookup order for MNIST (DESIGN §2): an explicit ``data_dir``, then ``$WEIGHTBIAS_DATA``,
then the user cache (``$WEIGHTBIAS_CACHE`` or ``~/.cache/weightbias``), then an
md5-checked download into the cache, and last, for a quick demo only, scikit-learn's
bundled 8×8 digits upscaled to 28×28, with a loud warning.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from modelzoo.errors import WeightbiasError

DATA_ENV = "WEIGHTBIAS_DATA"
CACHE_ENV = "WEIGHTBIAS_CACHE"
MIRROR_ENV = "WEIGHTBIAS_MNIST_MIRROR"

MNIST_FILES: dict[str, tuple[str, str]] = {
    # split/kind: (file name, md5 of the original .gz)
    "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
}
DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32}


class DataSourceError(WeightbiasError, RuntimeError):
    """Raised when data cannot be found or a data file is malformed; names the file."""


@dataclass(frozen=True)
class MNIST:
    """Grayscale MNIST: images (N, 28, 28) uint8 and labels (N,) int64 per split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    origin: str

    @property
    def is_demo(self) -> bool:
        return self.origin.startswith("sklearn-digits")

    @cached_property
    def fingerprint(self) -> str:
        """Short content hash, so caches and zoos made from different data never mix."""
        digest = hashlib.blake2b(digest_size=8)
        for array in (self.train_labels, self.test_labels, self.train_images, self.test_images):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


def user_cache_dir() -> Path:
    """Where downloads and rendered datasets are cached."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "weightbias"


def read_idx(path: str | Path) -> np.ndarray:
    """Decode one IDX file (gzip-compressed or raw) into a numpy array."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataSourceError(f"{path}: cannot read IDX file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataSourceError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DataSourceError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]]).newbyteorder(">")
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise DataSourceError(
            f"{path}: truncated or oversized IDX body: header says {shape} "
            f"({expected} bytes) but file holds {len(raw) - header_end} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape).astype(dtype.newbyteorder("="))


def _mnist_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def read_mnist_folder(folder: str | Path) -> MNIST:
    """Read the four IDX files (``.gz`` or raw) or a single ``mnist.npz`` from ``folder``."""
    folder = Path(folder)
    npz = folder / "mnist.npz"
    if npz.is_file():
        return read_mnist_npz(npz)
    arrays = {}
    for key, (name, _) in MNIST_FILES.items():
        path = _mnist_file(folder, name)
        if path is None:
            raise DataSourceError(f"{folder}: missing MNIST file {name} (or its uncompressed form)")
        arrays[key] = read_idx(path)
    mnist = MNIST(**_checked(arrays, str(folder)), origin=str(folder))
    return mnist


def read_mnist_npz(path: str | Path) -> MNIST:
    """Read Keras-style ``mnist.npz`` (x_train, y_train, x_test, y_test)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {
                "train_images": npz["x_train"],
                "train_labels": npz["y_train"],
                "test_images": npz["x_test"],
                "test_labels": npz["y_test"],
            }
    except (OSError, ValueError, KeyError) as err:
        raise DataSourceError(f"{path}: not a readable mnist.npz ({err})") from err
    return MNIST(**_checked(arrays, str(path)), origin=str(path))


def _checked(arrays: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or len(images) != len(labels):
            raise DataSourceError(
                f"{where}: {split} images {images.shape} do not match labels {labels.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DataSourceError(f"{where}: {split} labels outside 0..9")
    return {
        key: (value.astype(np.uint8) if "images" in key else value.astype(np.int64))
        for key, value in arrays.items()
    }


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_mnist(target: Path, mirrors: tuple[str, ...] | None = None, timeout: float = 20) -> Path:
    """Download the four MNIST files into ``target``, checking each md5; returns ``target``."""
    if mirrors is None:
        override = os.environ.get(MIRROR_ENV)
        mirrors = (override,) if override else DEFAULT_MIRRORS
    target.mkdir(parents=True, exist_ok=True)
    for name, md5 in MNIST_FILES.values():
        dest = target / name
        if dest.is_file() and md5sum(dest) == md5:
            continue
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            try:
                _fetch(url, dest, timeout)
            except (urllib.error.URLError, OSError, TimeoutError) as err:
                errors.append(f"{url}: {err}")
                continue
            got = md5sum(dest)
            if got == md5:
                break
            dest.unlink()
            errors.append(f"{url}: md5 {got} != expected {md5}")
        else:
            raise DataSourceError(f"could not download {name}: " + "; ".join(errors))
    return target


def _fetch(url: str, dest: Path, timeout: float) -> None:
    # Download beside the target and rename, so a killed download never looks complete.
    with urllib.request.urlopen(url, timeout=timeout) as response:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(response, out)
    os.replace(tmp, dest)


def sklearn_digits_as_mnist() -> MNIST:
    """scikit-learn's 1,797 bundled 8×8 digits, upscaled to 28×28. A demo, not MNIST."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images / 16.0 * 255.0).astype(np.float32)
    # Nearest-neighbour upscale 8→24, then pad to 28 so digits sit centred like MNIST's.
    big = np.kron(small, np.ones((3, 3), dtype=np.float32))
    big = np.pad(big, ((0, 0), (2, 2), (2, 2))).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    cut = 1500
    return MNIST(big[:cut], labels[:cut], big[cut:], labels[cut:], origin="sklearn-digits (demo)")


def find_mnist_folder(data_dir: str | Path | None = None) -> Path | None:
    """Return the first folder holding MNIST along the lookup order, or None."""
    explicit = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if explicit:
        root = Path(explicit).expanduser()
        if not root.is_dir():
            where = "--data-dir" if data_dir is not None else f"${DATA_ENV}"
            raise DataSourceError(f"{where} points to {root}, which is not a folder")
        folder = root / "mnist"
        if not folder.is_dir():
            raise DataSourceError(
                f"data root {root} has no mnist/ folder (expected {folder} with the IDX files)"
            )
        return folder
    cached = user_cache_dir() / "mnist"
    if cached.is_dir() and any(cached.iterdir()):
        return cached
    return None


def load_mnist(data_dir: str | Path | None = None, *, allow_download: bool = True,
               allow_demo: bool = True) -> MNIST:
    """Load MNIST along DESIGN §2's lookup order (see module docstring)."""
    folder = find_mnist_folder(data_dir)
    if folder is not None:
        return read_mnist_folder(folder)
    if allow_download:
        try:
            return read_mnist_folder(download_mnist(user_cache_dir() / "mnist"))
        except DataSourceError as err:
            download_error = str(err)
    else:
        download_error = "download disabled"
    if not allow_demo:
        raise DataSourceError(
            f"MNIST not found: pass --data-dir ROOT or set ${DATA_ENV} (ROOT/mnist/ holds the "
            f"IDX files); download failed: {download_error}"
        )
    warnings.warn(
        "\n" + "!" * 78 + "\nMNIST NOT FOUND and could not be downloaded "
        f"({download_error}).\nFalling back to scikit-learn's 8x8 digits upscaled to 28x28: "
        "a DEMO ONLY, not MNIST.\nPass --data-dir ROOT or set $WEIGHTBIAS_DATA for real results.\n"
        + "!" * 78,
        stacklevel=2,
    )
    return sklearn_digits_as_mnist()
