"""ColoredMNIST and Biased-MNIST rendering (DESIGN §2), determinism and the HDF5 cache."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import ray

from modelzoo.datasets import (
    BAHNG_COLORS,
    KIM_COLORS,
    DatasetError,
    cache_path,
    grayscale,
    jittered_colors,
    lntl_color_target,
    load_imageset,
    nearest_color,
    pool_indices,
    read_imageset,
    render_biased_mnist,
    render_colored_mnist,
)


def _stroke_colors(imageset, gray):
    """Recover each image's colour from its brightest stroke pixel (gray 255 → colour × 255)."""
    flat_gray = gray.reshape(len(gray), -1)
    brightest = flat_gray.argmax(1)
    rgb = imageset.images.reshape(len(gray), 3, -1)[np.arange(len(gray)), :, brightest]
    return rgb / flat_gray[np.arange(len(gray)), brightest][:, None]


def _truncated_normal_mean(mu: float, sigma: float) -> float:
    """Mean of N(mu, sigma²) truncated to (0, 1): what resampling into (0, 1) produces."""
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    a, b = (0 - mu) / sigma, (1 - mu) / sigma
    return mu + sigma * (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))


def test_colored_mnist_follows_kim(mnist) -> None:
    gray, labels = mnist.train_images[:3000], mnist.train_labels[:3000]
    sets = {s2: render_colored_mnist(gray, labels, s2, False, np.random.default_rng(0))
            for s2 in (0.02, 0.05)}
    strong = sets[0.02]
    # The group is the colour actually drawn (nearest mean colour), not the digit it was drawn for.
    np.testing.assert_array_equal(strong.bias, nearest_color(strong.colors))
    assert 0.15 < (strong.bias != labels).mean() < 0.23  # DESIGN §2: 18.6% at σ² 0.02
    assert (sets[0.05].bias != labels).mean() > 0.35  # and 42.7% at 0.05
    assert np.abs(_stroke_colors(strong, gray) - strong.colors).max() < 0.02
    assert (strong.images.transpose(0, 2, 3, 1)[gray == 0] == 0).all(), "background must stay black"
    colors = _stroke_colors(strong, gray)
    assert ((colors >= 0) & (colors <= 1.0 + 1 / 255)).all()  # uint8 rounding at the edges
    for digit in range(10):
        expected = [_truncated_normal_mean(m / 255, 0.02**0.5) for m in KIM_COLORS[digit]]
        assert np.abs(colors[labels == digit].mean(0) - expected).max() < 0.03
    spread = {s2: _stroke_colors(s, gray)[labels == 1].std(0).mean() for s2, s in sets.items()}
    assert spread[0.02] < spread[0.05], "smaller sigma2 must mean tighter colours"


def test_jitter_resamples_into_the_open_unit_interval() -> None:
    means = np.repeat(KIM_COLORS[[2, 9]], 5000, axis=0)  # (253,233,16) and (128,0,0): edge-heavy
    colors = jittered_colors(means, 0.05, np.random.default_rng(0))
    assert ((colors > 0) & (colors < 1)).all()


def test_colored_mnist_unbiased_test_ignores_label(mnist) -> None:
    test = render_colored_mnist(mnist.test_images, mnist.test_labels, 0.02, True,
                                np.random.default_rng(1))
    agreement = (test.bias == test.labels).mean()
    assert 0.07 < agreement < 0.13, agreement
    # Every colour group is well represented (the nearest-colour groups are not exactly tenths:
    # some mean colours sit closer together than others).
    assert np.bincount(test.bias, minlength=10).min() > 500


def test_grayscale_keeps_each_images_digit_and_group_and_takes_its_luma(mnist) -> None:
    """Kim et al.'s Gray control: the same images without their colour, in three equal channels."""
    colored = render_colored_mnist(mnist.train_images[:200], mnist.train_labels[:200], 0.02, False,
                                   np.random.default_rng(0))
    gray = grayscale(colored)
    assert gray.images.shape == colored.images.shape and gray.images.dtype == np.uint8
    assert (gray.images == gray.images[:, :1]).all()
    r, g, b = colored.images[7, :, 14, 14].astype(float)  # a stroke pixel
    assert colored.images[7, :, 14, 14].any()
    assert abs(int(gray.images[7, 0, 14, 14]) - (0.299 * r + 0.587 * g + 0.114 * b)) <= 0.5
    assert (gray.labels == colored.labels).all() and (gray.bias == colored.bias).all()
    background = colored.images.max(axis=1) == 0
    assert (gray.images[:, 0][background] == 0).all() and (gray.images[:, 0][~background] > 0).mean() > 0.9


def test_biased_mnist_follows_bahng(mnist) -> None:
    gray, labels = mnist.train_images[:20000], mnist.train_labels[:20000]
    data = render_biased_mnist(gray, labels, 0.99, np.random.default_rng(0))
    kept = data.bias == data.labels
    assert abs(kept.mean() - 0.99) < 0.005
    assert (data.images.transpose(0, 2, 3, 1)[gray > 0] == 255).all(), "digits are binarised to white"
    first = data.images[:, :, 0, 0]  # a corner pixel: background in every MNIST image
    np.testing.assert_array_equal(first, BAHNG_COLORS[data.bias].astype(np.uint8))
    others = data.bias[~kept]
    assert (others != data.labels[~kept]).all()
    unbiased = render_biased_mnist(gray, labels, 0.1, np.random.default_rng(0))
    assert abs((unbiased.bias == unbiased.labels).mean() - 0.1) < 0.01


def test_pools_are_disjoint_halves() -> None:
    a, b = pool_indices(60000, "A"), pool_indices(60000, "B")
    assert a[0] == 0 and a[-1] == 29999 and b[0] == 30000 and b[-1] == 59999
    with pytest.raises(DatasetError, match="pool"):
        pool_indices(60000, "C")


def test_rendering_is_deterministic_and_cached(mnist, tmp_path) -> None:
    def load(seed: int = 5, cache_dir=tmp_path):
        return load_imageset(mnist, "colored_mnist", "test_unbiased", 0.03, seed=seed, cache_dir=cache_dir)

    first = load()
    path = cache_path(mnist, "colored_mnist", "test_unbiased", 0.03, "all", 5, tmp_path)
    assert path.is_file() and len(first) == 10000
    # Deterministic: a render into an empty cache gives the same bytes.
    fresh = load(cache_dir=tmp_path / "other")
    np.testing.assert_array_equal(first.images, fresh.images)
    np.testing.assert_array_equal(first.bias, fresh.bias)

    # Cached: a second load leaves the file alone (same inode, same mtime) and reads it, which
    # a sentinel no render can produce (label 11, an inverted pixel) shows.
    before = path.stat()
    again = load()
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "the cache was rewritten"
    np.testing.assert_array_equal(first.images, again.images)
    pixel = first.images[0, 0, 14, 14]
    with h5py.File(path, "r+") as h5:
        h5["labels"][0] = 11
        h5["images"][0, 0, 14, 14] = 255 - pixel
    marked = load()
    assert marked.labels[0] == 11 and marked.images[0, 0, 14, 14] == 255 - pixel
    np.testing.assert_array_equal(marked.images[1:], first.images[1:])

    other_seed = load(seed=6)
    assert not np.array_equal(first.images, other_seed.images)
    assert cache_path(mnist, "colored_mnist", "test_unbiased", 0.03, "all", 6, tmp_path) != path
    with pytest.raises(DatasetError, match="sigma2"):
        load_imageset(mnist, "colored_mnist", "train", 1.5, "A", cache_dir=tmp_path)


def test_a_damaged_cache_entry_is_rendered_again(mnist, tmp_path) -> None:
    path = cache_path(mnist, "biased_mnist", "test_biased", 0.99, "all", 2, tmp_path)
    first = load_imageset(mnist, "biased_mnist", "test_biased", 0.99, seed=2, cache_dir=tmp_path)
    path.write_bytes(b"not an HDF5 file")
    again = load_imageset(mnist, "biased_mnist", "test_biased", 0.99, seed=2, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(read_imageset(path).images, first.images)  # and written back whole


@ray.remote
def _render_in_worker(mnist, cache_dir):
    imageset = load_imageset(mnist, "biased_mnist", "train", 0.995, "A", seed=3, cache_dir=cache_dir)
    return imageset.images.sum(dtype=np.int64), imageset.bias


@pytest.mark.slow
def test_concurrent_ray_workers_share_one_cache_entry(ray_local, mnist, tmp_path) -> None:
    mnist_ref = ray.put(mnist)
    results = ray.get([_render_in_worker.remote(mnist_ref, tmp_path) for _ in range(4)])
    sums = {int(total) for total, _ in results}
    assert len(sums) == 1
    for _, bias in results[1:]:
        np.testing.assert_array_equal(bias, results[0][1])
    leftovers = [p for p in (tmp_path / "datasets").iterdir() if p.suffix != ".h5"]
    assert leftovers == [], "no temporary files may remain"
    # One entry, whole: whichever worker's write landed last, it reads back as what they all saw.
    entry, = (tmp_path / "datasets").glob("*.h5")
    cached = read_imageset(entry)
    assert int(cached.images.sum(dtype=np.int64)) == sums.pop()
    np.testing.assert_array_equal(cached.bias, results[0][1])


def test_lntl_target_is_the_nearest_pixels_colour_in_eight_bins_with_zero_channels_ignored() -> None:
    images = np.zeros((2, 3, 28, 28), dtype=np.uint8)
    images[0, :, 1, 1] = np.array([255, 64, 31])  # the pixel the top-left 14×14 cell samples
    images[0, :, 0, 0] = 255  # a pixel of the same cell that nearest sampling passes over
    images[1, 0, 10:12, 20:22] = 200  # a red-only patch, elsewhere black
    target = lntl_color_target(images)
    assert target.shape == (2, 3, 14, 14)
    assert target[0, :, 0, 0].tolist() == [7, 2, 0]  # 255//32, 64//32, 31//32, not averaged with (0, 0)
    assert target[1, :, 5, 10].tolist() == [6, -1, -1]  # green and blue at 0: nothing to learn there
    assert (target[0, :, 1:, :] == -1).all() and (target[1, :, 0, 0] == -1).all()  # background ignored
