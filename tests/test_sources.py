"""MNIST source: real IDX files, the data-root lookup order, download, and bad files."""

from __future__ import annotations

import functools
import gzip
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from modelzoo.sources import (
    MIRROR_ENV,
    MNIST_FILES,
    DataSourceError,
    load_mnist,
    md5sum,
    read_idx,
    read_mnist_folder,
    read_mnist_npz,
)


def test_reads_the_real_idx_files(mnist, data_root: Path) -> None:
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_images.dtype == np.uint8
    assert mnist.test_images.shape == (10000, 28, 28)
    assert np.bincount(mnist.train_labels).tolist()[:3] == [5923, 6742, 5958]
    for name, md5 in MNIST_FILES.values():
        assert md5sum(data_root / "mnist" / name) == md5


def test_raw_idx_and_npz_match_gz(mnist, data_root: Path, tmp_path: Path) -> None:
    name = MNIST_FILES["test_labels"][0]
    raw = tmp_path / name.removesuffix(".gz")
    raw.write_bytes(gzip.decompress((data_root / "mnist" / name).read_bytes()))
    np.testing.assert_array_equal(read_idx(raw), mnist.test_labels)
    npz = tmp_path / "mnist.npz"
    np.savez(npz, x_train=mnist.train_images[:100], y_train=mnist.train_labels[:100],
             x_test=mnist.test_images[:50], y_test=mnist.test_labels[:50])
    small = read_mnist_npz(npz)
    np.testing.assert_array_equal(small.test_images, mnist.test_images[:50])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad_magic"])
def test_damaged_file_names_the_file(data_root: Path, tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "mnist"
    shutil.copytree(data_root / "mnist", folder)
    target = folder / MNIST_FILES["train_labels"][0]
    if damage == "truncate":
        target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes())[:-100]))
    elif damage == "garbage":
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    else:
        target.write_bytes(gzip.compress(b"\x01\x02\x03\x04" + b"\x00" * 64))
    with pytest.raises(DataSourceError, match=r"train-labels-idx1-ubyte\.gz"):
        read_mnist_folder(folder)


def test_explicit_root_without_mnist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="no mnist/ folder"):
        load_mnist(tmp_path)


def test_env_var_and_cache_are_used(monkeypatch, data_root: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("WEIGHTBIAS_DATA", str(data_root))
    assert load_mnist().origin == str(data_root / "mnist")
    monkeypatch.delenv("WEIGHTBIAS_DATA")
    monkeypatch.setenv("WEIGHTBIAS_CACHE", str(tmp_path))
    shutil.copytree(data_root / "mnist", tmp_path / "mnist")
    assert load_mnist(allow_download=False, allow_demo=False).origin == str(tmp_path / "mnist")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path):
    """A local HTTP mirror on 127.0.0.1 serving the files of tmp_path/'served'."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_from_mirror_checks_md5(monkeypatch, mirror, data_root: Path, tmp_path: Path) -> None:
    served, url = mirror
    for name, _ in MNIST_FILES.values():
        shutil.copy(data_root / "mnist" / name, served / name)
    monkeypatch.delenv("WEIGHTBIAS_DATA")
    monkeypatch.setenv("WEIGHTBIAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(MIRROR_ENV, url)
    mnist = load_mnist(allow_demo=False)
    assert mnist.train_images.shape == (60000, 28, 28)
    assert (tmp_path / "cache" / "mnist" / MNIST_FILES["train_images"][0]).is_file()


def test_download_with_wrong_md5_is_refused(monkeypatch, mirror, data_root: Path, tmp_path: Path) -> None:
    served, url = mirror
    for name, _ in MNIST_FILES.values():
        shutil.copy(data_root / "mnist" / name, served / name)
    (served / MNIST_FILES["test_labels"][0]).write_bytes(b"tampered")
    monkeypatch.delenv("WEIGHTBIAS_DATA")
    monkeypatch.setenv("WEIGHTBIAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(MIRROR_ENV, url)
    with pytest.raises(DataSourceError, match="md5"):
        load_mnist(allow_demo=False)
    assert not (tmp_path / "cache" / "mnist" / MNIST_FILES["test_labels"][0]).exists()


def test_offline_falls_back_to_demo_digits_loudly(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WEIGHTBIAS_DATA")
    monkeypatch.setenv("WEIGHTBIAS_CACHE", str(tmp_path))
    monkeypatch.setenv(MIRROR_ENV, "http://127.0.0.1:9/")  # discard port: nothing listens
    with pytest.warns(UserWarning, match="DEMO ONLY"):
        demo = load_mnist()
    assert demo.is_demo and demo.train_images.shape[1:] == (28, 28)
    assert set(np.unique(demo.train_labels)) == set(range(10))
