"""Generation survives what kills it, with the real Ray, Zarr and MNIST: a SIGKILLed Ray worker
is retried, a SIGKILLed driver's run resumes and trains every model once, and ``--address``
joins a running cluster instead of starting its own instance."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from modelzoo.lease import LEASE_ENV, read_lease
from modelzoo.zoo import open_zoo

CLI = [sys.executable, "-m", "detector.cli"]
LEASE_S = 3  # seconds a killed driver's store lease outlives it in the resume tests


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
