"""End to end with the real Ray, Zarr and MNIST: generate, resume, verify, export, determinism."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from modelzoo.checkpoints import CheckpointError, load_checkpoint, model_state_dict, save_checkpoint
from modelzoo.datasets import load_imageset
from modelzoo.generation import generate
from modelzoo.lease import LEASE_ENV, read_lease
from modelzoo.spec import parse_spec
from modelzoo.store import StaleRunError, ZooStore
from modelzoo.training import ModelResult, train_model, training_data
from modelzoo.zoo import StoreError, open_zoo
from tests.conftest import random_zoo, tiny_spec_dict

CLI = [sys.executable, "-m", "detector.cli"]
LEASE_S = 3  # seconds a killed driver's store lease outlives it in the resume tests


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


def _done_count(path: Path) -> int:
    try:
        return int(np.asarray(zarr.open_group(path, mode="r")["done"][:]).sum())
    except Exception:  # store not created yet
        return 0


def _write_spec(path: Path, n_models: int, models_per_task: int) -> Path:
    path.write_text(f"""
[zoo]
task = "colored_mnist"
arch = "digit-cnn"
n_models = {n_models}
seed = 3
models_per_task = {models_per_task}
eval_size = 300
[fixed]
epochs = 1
train_size = 384
[sweep]
sigma2 = [0.02, 0.05]
""")
    return path


def _session_pids(session: int) -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(pid) for pid, sid in (line.split() for line in ps.splitlines()) if int(sid) == session]


def _kill_session(driver: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (Ray workers lead their own groups)."""
    for pid in [driver.pid, *_session_pids(driver.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 30
    while _session_pids(driver.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _session_pids(driver.pid), "processes of the killed run survived"


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


def _worker_pids(session: int) -> list[int]:
    """Ray task workers of the driver that leads ``session`` (never another run's workers)."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(maxsplit=2) for line in ps.splitlines()]
    return [int(pid) for pid, sid, args in rows if int(sid) == session and "ray::train_block" in args]


@pytest.mark.slow
def test_killed_ray_worker_is_retried_and_nothing_is_lost(tmp_path: Path) -> None:
    spec_path = _write_spec(tmp_path / "spec.toml", n_models=12, models_per_task=3)
    out = tmp_path / "worker_killed.zarr"
    command = [*CLI, "zoo", "generate", str(spec_path), "--out", str(out), "--num-cpus", "2"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    deadline = time.time() + 240
    while _done_count(out) < 1 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.1)
    victims = _worker_pids(driver.pid)
    assert victims and _done_count(out) < 12, "a worker must be busy when it is killed"
    os.kill(victims[0], signal.SIGKILL)
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr[-2000:]
    assert "will be retried" in stdout + stderr, "Ray must have seen the worker die and retried"
    zoo = open_zoo(out)
    assert zoo.done.all() and zoo.verify().ok
    assert "12/12 done" in stdout


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_trains_every_model_once(tmp_path: Path) -> None:
    spec_path = _write_spec(tmp_path / "spec.toml", n_models=12, models_per_task=1)
    out = tmp_path / "killed.zarr"
    command = [*CLI, "zoo", "generate", str(spec_path), "--out", str(out), "--num-cpus", "2"]
    # A short store lease, so the resume need not wait a minute for the dead driver's to expire.
    env = {**os.environ, LEASE_ENV: str(LEASE_S)}
    # Own session, so the kill takes the driver and the local Ray instance it started.
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env=env)
    deadline = time.time() + 240
    while _done_count(out) < 3 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    _kill_session(driver)
    zoo = open_zoo(out)
    done_at_kill = zoo.done.copy()
    assert 3 <= done_at_kill.sum() < 12, "the kill must land mid-run"
    before = {i: zoo.model_weights(i).copy() for i in np.flatnonzero(done_at_kill)}

    lease = read_lease(out)
    assert lease is not None and lease["pid"] == driver.pid, "the killed driver held the store's lease"
    time.sleep(max(0.0, lease["renewed"] + LEASE_S + 0.5 - time.time()))  # it can no longer renew it
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    trained_now = int(rerun.stdout.split(" models trained this run")[0].split()[-1])
    zoo = open_zoo(out)
    assert zoo.done.all()
    assert trained_now == 12 - done_at_kill.sum(), "each model trained exactly once overall"
    for i, weights in before.items():
        np.testing.assert_array_equal(zoo.model_weights(i), weights)
    assert zoo.verify().ok
    info = json.loads(subprocess.run([*CLI, "zoo", "info", str(out), "--json"], capture_output=True,
                                     text=True, check=True).stdout)
    assert {k: info[k] for k in ("n_models", "n_done", "n_params", "arch", "task")} == {
        "n_models": 12, "n_done": 12, "n_params": 49_562, "arch": "digit-cnn", "task": "colored_mnist"}


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes() -> list[tuple[int, int, int, str]]:
    """(pid, parent pid, session id, command line) of every process on the machine."""
    # -ww: whole command lines, whatever width the terminal (or $COLUMNS) says.
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,sid=,args="], capture_output=True, text=True).stdout
    rows = [row for row in (line.split(maxsplit=3) for line in ps.splitlines()) if len(row) == 4]
    return [(int(pid), int(ppid), int(sid), args) for pid, ppid, sid, args in rows]


def _is_ray_node(args: str) -> bool:
    """A raylet or GCS server: what starting a Ray instance (a head or an embedded one) runs."""
    program = args.split(maxsplit=1)[0]
    return program.endswith(("/raylet/raylet", "/gcs/gcs_server"))


@pytest.mark.slow
def test_generate_joins_an_existing_cluster_with_address(tmp_path: Path) -> None:
    port = _free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # This cluster's own auth token, not the one in ~/.ray that other Ray users of the machine share.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env)
    try:
        spec_path = _write_spec(tmp_path / "spec.toml", n_models=4, models_per_task=2)
        out = tmp_path / "cluster.zarr"
        command = [*CLI, "zoo", "generate", str(spec_path), "--out", str(out),
                   "--address", f"127.0.0.1:{port}"]
        log = tmp_path / "driver.log"
        deadline = time.time() + 120
        while True:  # the head takes a few seconds to accept drivers
            # Its own session, so any Ray instance the CLI started would show up in it.
            with open(log, "w") as sink:
                driver = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                          start_new_session=True, env=env)
                own_instance, workers = set(), {}
                while driver.poll() is None:
                    for pid, ppid, sid, args in _processes():
                        if sid == driver.pid and _is_ray_node(args):
                            own_instance.add(args.split(maxsplit=1)[0])
                        if "ray::train_block" in args and sid in (head.pid, driver.pid):
                            workers[pid] = (ppid, sid)
                    time.sleep(0.2)
            if driver.returncode == 0 or time.time() > deadline:
                break
            time.sleep(2)
        assert driver.returncode == 0, log.read_text()[-2000:]
        assert open_zoo(out).done.all()

        # The head's own state says it did the work: the processes that trained the models
        # were the head raylet's workers, and the head's session logged the CLI as a driver.
        head_raylets = {pid: args for pid, _, sid, args in _processes()
                        if sid == head.pid and args.split(maxsplit=1)[0].endswith("/raylet/raylet")}
        assert len(head_raylets) == 1, head_raylets
        (raylet_pid, raylet_args), = head_raylets.items()
        assert not own_instance, f"the CLI started its own Ray instance: {sorted(own_instance)}"
        assert workers, "no train_block worker was seen while the CLI ran"
        assert {sid for _, sid in workers.values()} == {head.pid}, workers
        assert {ppid for ppid, _ in workers.values()} == {raylet_pid}, workers
        session_dir = Path(raylet_args.split("--session_dir=", 1)[1].split()[0])
        driver_logs = list((session_dir / "logs").glob(f"python-core-driver-*_{driver.pid}.log"))
        assert driver_logs, f"the head's session {session_dir} has no log of driver {driver.pid}"
    finally:
        _kill_session(head)


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
