"""End to end with the real Ray, Zarr and MNIST: generate, resume, verify, export, determinism
(killed workers and drivers, and joining a cluster: test_zoo_kills.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from modelzoo.checkpoints import CheckpointError, load_checkpoint, model_state_dict, save_checkpoint
from modelzoo.datasets import load_imageset
from modelzoo.generation import generate
from modelzoo.spec import parse_spec
from modelzoo.store import StaleRunError, ZooStore
from modelzoo.training import ModelResult, train_model, training_data
from modelzoo.zoo import StoreError, open_zoo
from tests.conftest import random_zoo, tiny_spec_dict

CLI = [sys.executable, "-m", "detector.cli"]


@pytest.fixture(scope="module")
def small_zoo(ray_local, tmp_path_factory) -> Path:
    """Four digit-cnns really trained by ``generate`` on Ray (about half a minute)."""
    out = tmp_path_factory.mktemp("zoo") / "tiny.zarr"
    summary = generate(parse_spec(tiny_spec_dict()), out, progress=False)
    assert summary.n_trained == 4
    return out


@pytest.fixture(scope="module")
def untrained_zoo(tmp_path_factory) -> Path:
    """The same zoo's store with random weights in place of training: for the store's own rules."""
    out = tmp_path_factory.mktemp("zoo") / "untrained.zarr"
    random_zoo(out, parse_spec(tiny_spec_dict()))
    return out


@pytest.mark.slow
def test_generate_fills_every_model(small_zoo: Path, data_root: Path) -> None:
    zoo = open_zoo(small_zoo)
    assert zoo.attrs["data_source"] == str(data_root / "mnist")
    assert zoo.done.all()
    weights = zoo.weights(np.arange(4))
    np.testing.assert_array_equal(weights[2], zoo.model_weights(2))
    assert np.isfinite(weights).all() and len({w.tobytes() for w in weights}) == 4
    biased, unbiased = zoo.column("metrics/biased_acc"), zoo.column("metrics/unbiased_acc")
    assert (biased > unbiased).all(), "colour-biased training must score better on biased colours"
    assert biased.mean() > 0.2
    assert zoo.column("metrics/per_class_acc").shape == (4, 10)
    assert set(zoo.column("config/pool")) == {"A", "B"}
    assert zoo.attrs["n_params"] == 49_562 and len(zoo.layout) == 10
    report = zoo.verify()
    assert report.ok and report.n_checked == 4


@pytest.mark.slow
def test_stored_weights_are_deterministic(small_zoo: Path, mnist) -> None:
    """The Ray worker's model equals one trained again here from (spec, index) alone."""
    zoo = open_zoo(small_zoo)
    config = zoo.config(1)
    torch.set_num_threads(1)  # the tiny zoo's tasks ran with one CPU each
    again = train_model(zoo.arch, zoo.width, config, training_data(zoo.spec, config),
                        eval_size=zoo.spec.eval_size)
    np.testing.assert_array_equal(again.weights, zoo.model_weights(1))
    assert again.metrics["unbiased_acc"] == pytest.approx(zoo.column("metrics/unbiased_acc")[1])


class PlainDigitCNN(nn.Module):
    """The DigitWdb network written out in plain PyTorch, independent of modelzoo."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 24, 5), nn.Conv2d(24, 48, 3), nn.Conv2d(48, 64, 3)
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3):
            x = nn.functional.max_pool2d(torch.relu(conv(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.mark.slow
def test_exported_checkpoint_reproduces_stored_accuracy(small_zoo: Path, mnist, tmp_path: Path) -> None:
    index = 2
    out = tmp_path / "model.pt"
    subprocess.run([*CLI, "zoo", "export", str(small_zoo), "--model", str(index), "--out", str(out)],
                   check=True, capture_output=True)
    model = PlainDigitCNN().eval()
    model.load_state_dict(torch.load(out, weights_only=True))
    zoo = open_zoo(small_zoo)
    test = load_imageset(mnist, "colored_mnist", "test_unbiased", zoo.config(index).bias_level)
    n = zoo.spec.eval_size
    with torch.no_grad():
        predicted = model(torch.from_numpy(test.images[:n]).float() / 255).argmax(1).numpy()
    accuracy = (predicted == test.labels[:n]).mean()
    assert accuracy == pytest.approx(zoo.column("metrics/unbiased_acc")[index], abs=1e-6)


@pytest.mark.parametrize("suffix", [".safetensors", ".h5", ".pt"])
def test_checkpoint_formats_roundtrip(untrained_zoo: Path, tmp_path: Path, suffix: str) -> None:
    zoo = open_zoo(untrained_zoo)
    state = model_state_dict(zoo, 0)
    assert sum(t.numel() for t in state.values()) == zoo.n_params
    np.testing.assert_array_equal(torch.cat([t.reshape(-1) for t in state.values()]).numpy(),
                                  zoo.model_weights(0))
    loaded = load_checkpoint(save_checkpoint(state, tmp_path / f"m{suffix}"))
    assert loaded.keys() == state.keys()
    for name in state:
        torch.testing.assert_close(loaded[name], state[name])


def test_broken_and_malicious_checkpoints_are_refused(tmp_path: Path) -> None:
    truncated = tmp_path / "t.safetensors"
    save_checkpoint({"w": torch.ones(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"t\.safetensors"):
        load_checkpoint(truncated)
    marker = tmp_path / "pwned"

    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bomb = tmp_path / "bomb.pt"
    torch.save({"w": torch.ones(1), "payload": Bomb()}, bomb)
    with pytest.raises(CheckpointError, match=r"bomb\.pt"):
        load_checkpoint(bomb)
    assert not marker.exists(), "loading a checkpoint must never run code"


@pytest.mark.slow
def test_max_models_caps_a_run_and_the_rest_resumes(ray_local, tmp_path: Path) -> None:
    spec = parse_spec(tiny_spec_dict(n_models=5, models_per_task=2))
    out = tmp_path / "capped.zarr"
    first = generate(spec, out, max_models=3, progress=False)
    assert first.n_trained == 3 and open_zoo(out).done.sum() == 3
    second = generate(spec, out, progress=False)
    assert second.n_done_before == 3 and second.n_trained == 2
    assert generate(spec, out, progress=False).n_trained == 0


def test_store_refuses_another_spec_and_foreign_folders(untrained_zoo: Path, tmp_path: Path) -> None:
    other = parse_spec(tiny_spec_dict(n_models=6))
    with pytest.raises(StoreError, match="another spec"):
        ZooStore.create(untrained_zoo, other)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a weightbias zoo"):
        ZooStore.create(foreign, other)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_store_records_its_data_and_refuses_other_data(untrained_zoo: Path, data_root: Path,
                                                      tmp_path: Path) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(untrained_zoo, copy)
    store = ZooStore.open(copy, mode="r+")
    store.record_data_source(str(data_root / "mnist"), "fedcba9876543210")
    store.record_data_source(str(data_root / "mnist"), "fedcba9876543210")  # the same data again: fine
    with pytest.raises(StoreError, match="sklearn-digits"):
        ZooStore.open(copy, mode="r+").record_data_source("sklearn-digits (demo)", "0123456789abcdef")
    assert open_zoo(copy).attrs["data_fingerprint"] == "fedcba9876543210"


def test_half_created_store_is_reported_then_rebuilt(tmp_path: Path) -> None:
    spec = parse_spec(tiny_spec_dict())
    path = tmp_path / "half.zarr"
    group = zarr.open_group(path, mode="w")  # what a kill during creation leaves behind
    group.attrs.update({"format": "weightbias-zoo", "format_version": 1, "state": "creating"})
    with pytest.raises(StoreError, match="half-created"):
        open_zoo(path)
    assert ZooStore.create(path, spec).n_models == 4


@pytest.mark.slow
def test_verify_catches_corruption(small_zoo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_zoo, copy)
    group = zarr.open_group(copy, mode="r+")
    row = group["weights"][1]
    row[5] += 1.0
    group["weights"][1] = row
    group["metrics/unbiased_acc"][3] = np.nan
    result = subprocess.run([*CLI, "zoo", "verify", str(copy)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "model 1: weights do not match their checksum" in result.stderr
    assert "model 3: marked done but metrics missing" in result.stderr
    chunk = next(p for p in (copy / "weights").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"\x00garbage")
    assert any("unreadable chunk" in p for p in open_zoo(copy).verify().problems)


def test_orphaned_worker_of_a_superseded_run_cannot_write(untrained_zoo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "fenced.zarr"
    shutil.copytree(untrained_zoo, copy)
    store = ZooStore.open(copy, mode="r+")
    old_run = store.begin_run()
    new_run = store.begin_run()  # a resumed run takes over
    before = store.model_weights(0).copy()
    result = ModelResult(before + 1, {"unbiased_acc": 0.5})
    with pytest.raises(StaleRunError):
        store.write_model(0, result, old_run)
    np.testing.assert_array_equal(open_zoo(copy).model_weights(0), before)
    assert open_zoo(copy).verify().ok
    store.write_model(0, result, new_run)  # the current run still writes
    np.testing.assert_array_equal(open_zoo(copy).model_weights(0), before + 1)


@pytest.mark.slow
def test_biased_mnist_zoo_end_to_end(ray_local, tmp_path: Path) -> None:
    raw = tiny_spec_dict(n_models=2, train_size=2048, lr=3e-3)
    raw["zoo"]["task"] = "biased_mnist"
    raw["sweep"] = {"rho": [0.999, 0.1]}
    out = tmp_path / "biased.zarr"
    assert generate(parse_spec(raw), out, progress=False).n_trained == 2
    zoo = open_zoo(out)
    assert zoo.spec.bias_level == "rho" and list(zoo.column("config/rho")) == [0.999, 0.1]
    assert [zoo.config(i).bias_level for i in range(2)] == [0.999, 0.1]
    biased, unbiased = zoo.column("metrics/biased_acc"), zoo.column("metrics/unbiased_acc")
    assert biased[0] > 0.9, "at rho 0.999 the background colour gives the label away"
    assert biased[0] - unbiased[0] > 0.3
    assert zoo.verify().ok


@pytest.mark.slow
def test_regularizer_axis_trains_and_records_fairness_metrics(ray_local, tmp_path: Path) -> None:
    raw = tiny_spec_dict(n_models=3, models_per_task=3, train_size=1024, lr=3e-3, gamma=1.0, pool="A")
    raw["sweep"] = {"sigma2": [0.02], "regularizer": ["none", "grad", "unsupervised+ndr"]}
    raw["fixed"]["reg"] = {"hidden": 16}  # the grad head's option; the others ignore it
    out = tmp_path / "fair.zarr"
    assert generate(parse_spec(raw), out, progress=False).n_trained == 3
    zoo = open_zoo(out)
    assert list(zoo.column("config/regularizer")) == ["none", "grad", "unsupervised+ndr"]
    assert list(zoo.column("config/reg.hidden")) == [16, 16, 16]
    assert [zoo.config(i).reg_options for i in range(3)] == [{"hidden": 16}] * 3
    reg_loss = zoo.column("metrics/reg_loss")
    assert reg_loss[0] == 0 and (reg_loss[1:] != 0).all()
    leakage = zoo.column("metrics/leakage")
    assert leakage[0] > 0.3, "a colour-biased vanilla model's features must reveal the colour"
    # The probe is scored on the second half of the 500 evaluation images: k/250 for an integer k.
    scored = leakage * (zoo.spec.eval_size // 2)
    np.testing.assert_allclose(scored, np.round(scored), atol=1e-3)
    assert zoo.column("metrics/per_group_acc").shape == (3, 10)
    assert zoo.verify().ok
