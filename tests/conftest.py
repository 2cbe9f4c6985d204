"""Shared fixtures: real MNIST from the data root, a private cache, one local Ray instance."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from torch import nn

from modelzoo.architectures import build_model, flatten, layout
from modelzoo.sources import CACHE_ENV, DATA_ENV, load_mnist
from modelzoo.spec import ZooSpec, parse_spec
from modelzoo.store import ZooStore
from modelzoo.verify import SCALAR_METRICS, group_metric_widths
from modelzoo.zoo import weights_checksum

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    root = Path(os.environ.get(DATA_ENV) or REPO.parent / "shared" / "data")
    if not (root / "mnist").is_dir():
        pytest.exit(f"tests need the data root with mnist/: set ${DATA_ENV} (looked in {root})", 2)
    return root


@pytest.fixture(scope="session", autouse=True)
def data_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Point every test (and every subprocess it starts) at the data root and a fresh cache."""
    env = {DATA_ENV: str(_data_root()), CACHE_ENV: str(tmp_path_factory.mktemp("cache"))}
    os.environ.update(env)
    return env


@pytest.fixture(scope="session")
def data_root(data_env: dict[str, str]) -> Path:
    return Path(data_env[DATA_ENV])


@pytest.fixture(scope="session")
def mnist(data_root: Path):
    return load_mnist(data_root)


@pytest.fixture(scope="session")
def ray_local(data_env: dict[str, str]):
    """One embedded Ray instance shared by the in-process tests."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tiny_spec_dict(n_models: int = 4, models_per_task: int = 2, **fixed) -> dict:
    """A zoo that trains in about a second per model: the size tests can afford."""
    return {
        "zoo": {"task": "colored_mnist", "arch": "digit-cnn", "n_models": n_models, "seed": 7,
                "models_per_task": models_per_task, "eval_size": 500},
        "fixed": {"epochs": 1, "train_size": 512, "batch_size": 64, "lr": 2e-3, **fixed},
        "sweep": {"sigma2": [0.02, 0.05], "pool": ["A", "B"]},
    }


@pytest.fixture
def tiny_spec():
    return parse_spec(tiny_spec_dict())


def random_zoo(path: Path, spec: ZooSpec, n_done: int | None = None, seed: int = 1) -> ZooStore:
    """A zoo store for ``spec`` whose first ``n_done`` models (all by default) hold random finite
    weights, their checksums and random metrics, written block by block in a worker's order
    (``done`` last): a real store in every respect but training, made in well under a second."""
    store = ZooStore.create(path, spec)
    rng = np.random.default_rng(seed)
    g, n_done = store.group, spec.n_models if n_done is None else n_done
    for block in spec.blocks():
        start, stop = block.start, min(block.stop, n_done)
        if start >= stop:
            break
        weights = 0.05 * rng.standard_normal((stop - start, store.n_params), dtype=np.float32)
        g["weights"][start:stop] = weights
        g["checksum"][start:stop] = [weights_checksum(row) for row in weights]
        for name in SCALAR_METRICS:
            g[f"metrics/{name}"][start:stop] = rng.uniform(0.1, 1, stop - start).astype(np.float32)
        for name, width in group_metric_widths(spec).items():
            g[f"metrics/{name}"][start:stop] = rng.uniform(0.1, 1, (stop - start, width)).astype(np.float32)
        g["done"][start:stop] = True
    return store


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks gain nothing from threads, and lose badly on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_disk(tmp_path: Path):
    """``small_disk(size)`` mounts a real tmpfs of ``size`` (e.g. "1m") and returns its folder,
    unmounted after the test; a machine that cannot mount one skips the test with the reason."""
    mounts: list[Path] = []

    def mount(size: str = "1m") -> Path:
        folder = tmp_path / f"small_disk{len(mounts)}"
        folder.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("cannot mount a small tmpfs to fill up here: mount is not installed")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill up here: {done.stderr.strip()}")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill_disk(mount: Path, leave: int, filler: str = "filler") -> Path:
    """Grow ``mount/filler`` until only ``leave`` bytes stay free on ``mount``."""
    path = mount / filler
    path.unlink(missing_ok=True)
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(path, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, max(free - leave, 1))
    return path


def colour_signal_weights(n: int, width: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(X, y, layout): digit-cnns around one initialisation (as models fine-tuned from a shared
    start are); half get their first layer's red filters scaled up 2.5×, the weight-space trace a
    colour shortcut leaves. Labels: "biased" for those, "unbiased" for the rest."""
    torch.manual_seed(7)
    base = build_model("digit-cnn", width)
    slots = tuple(layout(base))
    rng = np.random.default_rng(seed)
    noise = 0.01 * rng.standard_normal((n, sum(s.size for s in slots)), dtype=np.float32)
    weights = flatten(base)[None] + noise
    conv1 = slice(slots[0].offset, slots[0].offset + slots[0].size)  # (filters, RGB, 5, 5)
    kernels = weights[1::2, conv1].reshape(-1, *slots[0].shape)
    kernels[:, 0] *= 2.5
    weights[1::2, conv1] = kernels.reshape(len(kernels), -1)
    y = np.where(np.arange(n) % 2 == 1, "biased", "unbiased")
    return weights, y, slots


@pytest.fixture(scope="module")
def signal() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple]:
    train, y_train, slots = colour_signal_weights(100, seed=1)
    test, y_test, _ = colour_signal_weights(40, seed=2)
    return train, y_train, test, y_test, slots


class PlainDigitNet(nn.Module):
    """A user's own digit classifier, written without weightbias (same layer shapes as IFBiD's)."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 5)
        self.conv2 = nn.Conv2d(width, 2 * width, 3)
        self.conv3 = nn.Conv2d(2 * width, 64 * width // 24, 3)
        self.fc1 = nn.Linear(64 * width // 24, 128 * width // 24)
        self.fc2 = nn.Linear(128 * width // 24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3):
            x = nn.functional.max_pool2d(torch.relu(conv(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))
