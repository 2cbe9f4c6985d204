"""A real two-node Ray cluster on this machine: generation spreads over both nodes, a node lost
mid-run loses nothing, and a head restarted under a re-run driver finishes the zoo.

Each node is a real ``ray start`` (its own raylet, its own CPU count, its own process session
so it can be killed like a lost machine); the driver is the ``weightbias`` command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import modelzoo

CLI = [sys.executable, "-m", "detector.cli"]
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spec(path: Path, n_models: int) -> Path:
    path.write_text(f"""[zoo]
task = "colored_mnist"
arch = "digit-cnn"
n_models = {n_models}
seed = 5
models_per_task = 1
eval_size = 200
[fixed]
epochs = 1
train_size = 256
[sweep]
sigma2 = [0.02, 0.05]
""")
    return path


class Cluster:
    """A head and worker nodes started with ``ray start``, each in its own session."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # This cluster's own auth token, not the one other Ray users of the machine share; the
        # driver gives up on a lost head in seconds rather than Ray's default minute.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_gcs_rpc_server_reconnect_timeout_s": "5"}
        self.tmp = tmp
        self.nodes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cpus: int) -> None:
        role = ["--head", f"--port={self.port}", "--include-dashboard=false"] if name == "head" \
            else [f"--address={self.address}"]
        self.nodes[name] = subprocess.Popen([RAY, "start", "--block", *role, f"--num-cpus={cpus}",
                                             "--disable-usage-stats"], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True, env=self.env)

    def node_ids(self, expected: int, timeout: float = 90) -> list[str]:
        """The alive nodes' ids, asked of the head itself, once ``expected`` have joined."""
        code = (f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
                "print(json.dumps(sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])))")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env)
            if out.returncode == 0:
                ids = json.loads(out.stdout.strip().splitlines()[-1])
                if len(ids) == expected:
                    return ids
            time.sleep(1)
        raise AssertionError(f"the cluster did not reach {expected} alive nodes in {timeout} s")

    def kill(self, name: str) -> None:
        """SIGKILL a node and every process it started, as a lost machine would go."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.nodes[name].pid, signal.SIGKILL)
        self.nodes.pop(name).wait()

    def close(self) -> None:
        for name in list(self.nodes):
            self.kill(name)


@pytest.fixture
def cluster(tmp_path: Path):
    cluster = Cluster(tmp_path)
    yield cluster
    cluster.close()


def _done(out: Path) -> int:
    try:
        return int(modelzoo.open_zoo(out).done.sum())
    except modelzoo.StoreError:
        return 0


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


class _Stderr:
    """A process's stderr, read as it comes by a thread (the progress bar lives there)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        while chunk := stream.read(64):
            self.text += chunk

    def finish(self) -> str:
        self._thread.join(timeout=60)
        return self.text


def test_a_zoo_spreads_over_two_nodes_and_losing_one_mid_run_loses_nothing(cluster: Cluster,
                                                                            tmp_path: Path) -> None:
    cluster.start("head", cpus=1)
    cluster.node_ids(1)
    cluster.start("worker", cpus=1)
    node_ids = cluster.node_ids(2)
    out = tmp_path / "zoo.zarr"
    command = [*CLI, "zoo", "generate", str(_spec(tmp_path / "spec.toml", 32)), "--out", str(out),
               "--address", cluster.address]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=cluster.env)
    stderr_so_far = _Stderr(driver)
    # The second node starts late (its workers first pull the datasets from the head): the
    # driver's bar counts the Ray nodes whose receipts came back; lose the second node only
    # once it has trained models, and while models remain.
    _wait_for(lambda: "nodes=2" in stderr_so_far.text, driver)
    done_when_lost = _done(out)
    print(f"the second node was lost with {done_when_lost}/32 models done")
    assert done_when_lost < 32
    cluster.kill("worker")  # the second machine is lost mid-run: Ray retries its task on the head
    stdout = driver.stdout.read()
    driver.wait(timeout=600)
    stderr = stderr_so_far.finish()
    assert driver.returncode == 0, stderr[-3000:]
    zoo = modelzoo.open_zoo(out)
    assert zoo.done.all() and zoo.verify().ok  # every model exactly once, nothing lost
    # Ray's own record of who trained what: both nodes of this cluster, and no other.
    line = next(line for line in stdout.splitlines() if line.startswith("models trained per Ray node:"))
    per_node = dict(part.split("=") for part in line.split(": ", 1)[1].split(", "))
    assert set(per_node) == set(node_ids), (per_node, node_ids)
    # A model the lost node wrote but never reported is in the store, not in any receipt: the
    # retry found it done and skipped it, so receipts count at most the 32, never one twice.
    assert sum(map(int, per_node.values())) <= 32 and "32/32 done" in stdout


def test_a_restarted_head_and_a_re_run_driver_finish_the_zoo(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start("head", cpus=2)
    cluster.node_ids(1)
    out = tmp_path / "zoo.zarr"
    command = [*CLI, "zoo", "generate", str(_spec(tmp_path / "spec.toml", 16)), "--out", str(out),
               "--address", cluster.address]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=cluster.env)
    _wait_for(lambda: _done(out) >= 4, driver)
    cluster.kill("head")  # the head node goes down; the driver loses its cluster and stops
    driver.communicate(timeout=180)
    assert driver.returncode != 0
    before = _done(out)
    assert 4 <= before < 16
    cluster.start("head", cpus=2)  # restart Ray, then re-run the same command, as the docs say
    cluster.node_ids(1)
    env = {**cluster.env, "WEIGHTBIAS_LEASE_SECONDS": "1"}  # the dead driver's lease has expired
    time.sleep(1.5)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{16 - before} models trained this run" in rerun.stdout
    zoo = modelzoo.open_zoo(out)
    assert zoo.done.all() and zoo.verify().ok
