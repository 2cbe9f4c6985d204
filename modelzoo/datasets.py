"""Datasets: colour MNIST into ColoredMNIST or Biased-MNIST, cached in HDF5.

Second stage of the flow (source → **dataset** → trainer → store → detector). An
:class:`ImageSet` is what a trainer consumes: uint8 images (N, 3, 28, 28), digit labels,
and the index of the colour each image got (the bias attribute).

* ColoredMNIST (Kim et al., CVPR 2019): colour on the strokes, black background. Each
  training image of class y takes per-channel colour ~ N(mean_y / 255, σ²), resampled until
  inside (0, 1); smaller σ² means stronger bias. The unbiased test set draws the mean colour
  uniformly from the ten, independent of the label. The sensitive attribute is the colour
  actually drawn, not the class it was drawn for: each image keeps its jittered RGB
  (``ImageSet.colors``) and its group is the nearest of the ten mean colours, which differs
  from the digit in about a fifth of training images at σ² 0.02 and two fifths at 0.05.
  :func:`lntl_color_target` gives LNTL's per-pixel form of the same attribute.
* Biased-MNIST (Bahng et al., ICML 2020): digit binarised to white, colour in the
  background; with probability ρ an image gets its class colour, otherwise one of the other
  nine uniformly. The unbiased test set uses ρ = 0.1.

Rendering is deterministic given its parameters and cached once per parameter set; the
cache file is written beside its final name and renamed, so concurrent renderers (Ray
workers, two CLI runs) never see a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from modelzoo.errors import WeightbiasError
from modelzoo.sources import MNIST, user_cache_dir
from modelzoo.tasks import N_COLORS

KIM_COLORS = np.array(
    [
        (220, 20, 60), (0, 128, 128), (253, 233, 16), (0, 149, 182), (237, 145, 33),
        (145, 30, 188), (70, 240, 240), (250, 197, 187), (210, 245, 60), (128, 0, 0),
    ],
    dtype=np.float64,
)
BAHNG_COLORS = np.array(
    [
        (255, 0, 0), (0, 255, 0), (0, 0, 255), (225, 225, 0), (225, 0, 225),
        (0, 255, 255), (255, 128, 0), (255, 0, 128), (128, 0, 255), (128, 128, 128),
    ],
    dtype=np.float64,
)
assert len(KIM_COLORS) == len(BAHNG_COLORS) == N_COLORS  # both tasks: ten colours, the sensitive groups
TASKS = ("colored_mnist", "biased_mnist")
# "val": a training pool's digits rendered as the unbiased test set is (colour independent of
# the digit; Biased-MNIST at ρ = 0.1), from which a model's validation images are carved.
SPLITS = ("train", "test_biased", "test_unbiased", "val")
UNBIASED_SPLITS = ("test_unbiased", "val")
POOLS = ("A", "B", "all")
BIASED_MNIST_UNBIASED_RHO = 0.1
CACHE_FORMAT_VERSION = 2  # 2: ColoredMNIST groups are the nearest mean colour, and colours are kept
LNTL_SIZE, LNTL_BINS = 14, 8  # LNTL's colour target: a 14×14 map, 8 levels per channel


class DatasetError(WeightbiasError, ValueError):
    """Raised for an unknown task, split or pool, or an out-of-range bias level."""


@dataclass(frozen=True)
class ImageSet:
    """A rendered dataset: images (N, 3, 28, 28) uint8, labels (N,), colour index (N,)."""

    images: np.ndarray
    labels: np.ndarray
    bias: np.ndarray
    colors: np.ndarray | None = None  # ColoredMNIST: each image's drawn RGB in (0, 1), (N, 3)

    def __len__(self) -> int:
        return len(self.labels)


def pool_indices(n_train: int, pool: str) -> np.ndarray:
    """Training-image indices of a pool: A is the first half, B the second (IFBiD)."""
    if pool not in POOLS:
        raise DatasetError(f"pool must be one of {POOLS}, got {pool!r}")
    half = n_train // 2
    if pool == "A":
        return np.arange(0, half)
    if pool == "B":
        return np.arange(half, 2 * half)
    return np.arange(n_train)


def jittered_colors(means: np.ndarray, sigma2: float, rng: np.random.Generator) -> np.ndarray:
    """Per-channel colours ~ N(means/255, σ²), each resampled until strictly inside (0, 1)."""
    centre = means / 255.0
    colors = rng.normal(centre, np.sqrt(sigma2))
    bad = (colors <= 0) | (colors >= 1)
    while bad.any():
        colors[bad] = rng.normal(centre[bad], np.sqrt(sigma2))
        bad = (colors <= 0) | (colors >= 1)
    return colors


def render_colored_mnist(gray: np.ndarray, labels: np.ndarray, sigma2: float, unbiased: bool,
                         rng: np.random.Generator) -> ImageSet:
    """Colour digit strokes: pixel = gray intensity × jittered colour."""
    if not 0 < sigma2 < 1:
        raise DatasetError(f"sigma2 must lie in (0, 1), got {sigma2}")
    drawn_for = rng.integers(0, 10, len(labels)) if unbiased else labels.copy()
    colors = jittered_colors(KIM_COLORS[drawn_for], sigma2, rng)
    return ImageSet(paint("colored_mnist", gray, colors), labels.astype(np.int64),
                    nearest_color(colors), colors.astype(np.float32))


def paint(task: str, gray: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Grey digits (N, 28, 28) in RGB colours (N, 3) in [0, 1], as ``task`` paints them:
    ColoredMNIST multiplies the strokes by the colour (black background); Biased-MNIST makes
    the strokes white on a background of the colour. uint8 (N, 3, 28, 28)."""
    if task == "colored_mnist":
        scaled = gray[:, None].astype(np.float32) * np.asarray(colors).astype(np.float32)[:, :, None, None]
        return np.rint(scaled).astype(np.uint8)
    if task == "biased_mnist":
        background = np.rint(np.asarray(colors, np.float64) * 255.0).astype(np.uint8)[:, :, None, None]
        return np.where((gray > 0)[:, None], np.uint8(255), background).astype(np.uint8)
    raise DatasetError(f"task must be one of {TASKS}, got {task!r}")


def nearest_color(colors: np.ndarray) -> np.ndarray:
    """Index of the nearest of the ten ColoredMNIST mean colours to each RGB row in (0, 1)."""
    distances = ((colors[:, None, :] - KIM_COLORS[None] / 255.0) ** 2).sum(axis=2)
    return distances.argmin(axis=1).astype(np.int64)


def lntl_color_target(images: np.ndarray) -> np.ndarray:
    """LNTL's per-pixel colour target (Kim et al.'s data loader): each image resized to 14×14 by
    nearest pixel (PIL's NEAREST: cell i takes pixel ⌊(i + ½)·28/14⌋), each channel quantised
    ``value // 32`` into 8 bins; a channel at 0 (the black background) is -1, which a loss
    ignores. Returns int64 (N, 3, 14, 14)."""
    height, width = images.shape[2:]
    rows = ((np.arange(LNTL_SIZE) + 0.5) * height / LNTL_SIZE).astype(np.int64)
    cols = ((np.arange(LNTL_SIZE) + 0.5) * width / LNTL_SIZE).astype(np.int64)
    picked = images[:, :, rows][:, :, :, cols].astype(np.int64)
    return np.where(picked == 0, -1, picked // (256 // LNTL_BINS))


def grayscale(images: ImageSet) -> ImageSet:
    """The same images in gray (ITU-R 601 luma, PIL's "L"), kept in three channels: the colour
    networks take them unchanged (Kim et al.'s "Gray" control)."""
    luma = np.tensordot(np.array([0.299, 0.587, 0.114]), images.images.astype(np.float64), axes=(0, 1))
    gray = np.repeat(np.rint(luma).astype(np.uint8)[:, None], 3, axis=1)
    return replace(images, images=gray)


def render_biased_mnist(gray: np.ndarray, labels: np.ndarray, rho: float,
                        rng: np.random.Generator) -> ImageSet:
    """Binarise digits to white on a background that has the class colour with probability ρ."""
    if not 0 <= rho <= 1:
        raise DatasetError(f"rho must lie in [0, 1], got {rho}")
    keep = rng.random(len(labels)) < rho
    # Another colour than the class's, uniformly among the nine others.
    other = (labels + rng.integers(1, 10, len(labels))) % 10
    bias = np.where(keep, labels, other)
    return ImageSet(paint("biased_mnist", gray, BAHNG_COLORS[bias] / 255.0), labels.astype(np.int64),
                    bias.astype(np.int64))


def _render(mnist: MNIST, task: str, split: str, level: float, pool: str, seed: int) -> ImageSet:
    if task not in TASKS:
        raise DatasetError(f"task must be one of {TASKS}, got {task!r}")
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    if split in ("train", "val"):
        index = pool_indices(len(mnist.train_labels), pool)
        gray, labels = mnist.train_images[index], mnist.train_labels[index]
    else:
        gray, labels = mnist.test_images, mnist.test_labels
    # One independent stream per (task, split, pool, level), all derived from `seed`.
    stream = [seed, TASKS.index(task), SPLITS.index(split), POOLS.index(pool), round(level * 1e6)]
    rng = np.random.default_rng(stream)
    if task == "colored_mnist":
        return render_colored_mnist(gray, labels, level, split in UNBIASED_SPLITS, rng)
    rho = BIASED_MNIST_UNBIASED_RHO if split in UNBIASED_SPLITS else level
    return render_biased_mnist(gray, labels, rho, rng)


def cache_path(mnist: MNIST, task: str, split: str, level: float, pool: str, seed: int,
               cache_dir: Path | None = None) -> Path:
    folder = (cache_dir or user_cache_dir()) / "datasets"
    pool_part = pool if split in ("train", "val") else "test"
    name = f"{task}-{split}-{pool_part}-{level:g}-seed{seed}-{mnist.fingerprint}.h5"
    return folder / name


def load_imageset(mnist: MNIST, task: str, split: str, level: float, pool: str = "all",
                  seed: int = 0, cache_dir: Path | None = None) -> ImageSet:
    """Render (task, split, level, pool, seed) once, then read it back from the HDF5 cache."""
    path = cache_path(mnist, task, split, level, pool, seed, cache_dir)
    if path.is_file():
        try:
            return read_imageset(path)
        except (OSError, KeyError):
            pass  # a damaged cache entry is just re-rendered below
    imageset = _render(mnist, task, split, level, pool, seed)
    write_imageset(path, imageset, {"task": task, "split": split, "level": level, "pool": pool,
                                    "seed": seed, "source": mnist.origin})
    return imageset


def write_imageset(path: Path, imageset: ImageSet, attrs: dict) -> None:
    import h5py  # here, not at the top: reading specs and stores must not need it

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("images", data=imageset.images, chunks=True, compression="lzf")
            h5.create_dataset("labels", data=imageset.labels)
            h5.create_dataset("bias", data=imageset.bias)
            if imageset.colors is not None:
                h5.create_dataset("colors", data=imageset.colors)
            h5.attrs.update({**attrs, "format_version": CACHE_FORMAT_VERSION})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_imageset(path: Path) -> ImageSet:
    import h5py  # here, not at the top: reading specs and stores must not need it

    with h5py.File(path, "r") as h5:
        if h5.attrs.get("format_version") != CACHE_FORMAT_VERSION:
            raise KeyError("stale cache format")
        colors = h5["colors"][()] if "colors" in h5 else None
        return ImageSet(h5["images"][()], h5["labels"][()], h5["bias"][()], colors)
