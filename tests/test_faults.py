"""Real store faults during zoo generation: a full disk, a store root cannot write, a corrupted chunk.

The faults are real, not mocked: a size-limited tmpfs that runs out of space (ENOSPC), the
immutable attribute (``chattr +i``, which stops root too: EPERM), and garbage bytes in a
weights chunk. Each test drives ``weightbias zoo generate``/``verify`` through the CLI entry
point in this process (so the shared Ray instance is reused) and checks the same things: a
clear one-line error, no model marked done without valid data (``verify`` is ok), and a
re-run that completes the zoo with every model stored exactly once. A fault the machine
cannot make (no mount, no ``chattr``) skips its test with the reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from detector.cli import main
from modelzoo.spec import load_spec
from modelzoo.store import ZooStore
from modelzoo.zoo import open_zoo
from tests.conftest import fill_disk, random_zoo

N_MODELS = 4
SPEC = f"""
[zoo]
task = "colored_mnist"
arch = "digit-cnn"
n_models = {N_MODELS}
seed = 11
models_per_task = 1
eval_size = 200
[fixed]
epochs = 1
train_size = 256
[sweep]
sigma2 = [0.02, 0.05]
"""


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fault_spec") / "spec.toml"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="module")
def half_zoo(ray_local, spec_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real zoo with models 0 and 1 done and 2, 3 still to train (copied by each test)."""
    out = tmp_path_factory.mktemp("fault_zoo") / "half.zarr"
    assert main(["zoo", "generate", str(spec_path), "--out", str(out), "--max-models", "2"]) == 0
    assert list(open_zoo(out).done) == [True, True, False, False]
    return out


@pytest.fixture
def untrained_half_zoo(spec_path: Path, tmp_path: Path) -> Path:
    """The same store with random weights for models 0 and 1 (no training): for what needs no Ray."""
    out = tmp_path / "untrained.zarr"
    random_zoo(out, load_spec(spec_path), n_done=2)
    return out


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _trained(stdout: str) -> int:
    return int(re.search(r"(\d+) models trained this run", stdout).group(1))


def _done_weights(path: Path) -> dict[int, np.ndarray]:
    zoo = open_zoo(path)
    return {int(i): zoo.model_weights(int(i)).copy() for i in np.flatnonzero(zoo.done)}


def _assert_one_line_error(err: str, store: Path, reason: str) -> None:
    line = next(x for x in err.splitlines() if x.startswith("weightbias: error:"))
    assert str(store) in line and reason in line, line
    assert "Traceback" not in err


def _assert_kept(path: Path, before: dict[int, np.ndarray]) -> None:
    """Models done before the fault are still done with the same weights; nothing done is broken."""
    report = open_zoo(path).verify()
    assert report.ok, report.problems
    after = _done_weights(path)
    assert set(before) <= set(after)
    for index, weights in before.items():
        np.testing.assert_array_equal(after[index], weights)


def _sh(*command: str) -> subprocess.CompletedProcess:
    if shutil.which(command[0]) is None:
        return subprocess.CompletedProcess(command, 127, "", f"{command[0]} is not installed")
    return subprocess.run(command, capture_output=True, text=True)


@pytest.mark.slow  # trains models with Ray (half_zoo, then the re-run)
def test_disk_full_fails_clearly_and_a_rerun_after_freeing_space_completes(
        half_zoo: Path, spec_path: Path, small_disk, capsys: pytest.CaptureFixture) -> None:
    mount = small_disk("8m")
    out = mount / "zoo.zarr"
    shutil.copytree(half_zoo, out)
    before = _done_weights(out)
    generate = ("zoo", "generate", str(spec_path), "--out", str(out))

    # No space at all: the driver's first write into the store fails before any training,
    # and so does creating a new store.
    filler = fill_disk(mount, leave=0)
    code, _, err = _run(capsys, *generate)
    assert code == 2
    _assert_one_line_error(err, out, "No space left on device")
    _assert_kept(out, before)
    assert open_zoo(out).done.sum() == 2
    fresh = mount / "fresh.zarr"
    code, _, err = _run(capsys, "zoo", "generate", str(spec_path), "--out", str(fresh))
    assert code == 2
    _assert_one_line_error(err, fresh, "No space left on device")
    assert not fresh.exists()  # nothing half-made stands in the way of the advised re-run

    # Room for about one more model: the disk fills up while workers write their models.
    chunk = (half_zoo / "weights" / "c" / "0" / "0").stat().st_size
    fill_disk(mount, leave=int(1.6 * chunk))
    code, _, err = _run(capsys, *generate)
    assert code == 2
    assert "No space left on device" in err and str(out) in err
    _assert_kept(out, before)
    done_after_fault = int(open_zoo(out).done.sum())
    assert done_after_fault < N_MODELS, "the disk must fill up before the zoo is complete"
    with capsys.disabled():  # how far the run got is worth seeing in a -s run
        print(f"\ndisk full: {done_after_fault}/{N_MODELS} done when the disk filled up; "
              f"error: {err.strip().splitlines()[-1][:300]}")

    filler.unlink()
    code, stdout, err = _run(capsys, *generate)
    assert code == 0, err
    assert _trained(stdout) == N_MODELS - done_after_fault, "every model trained exactly once"
    assert open_zoo(out).done.all()
    _assert_kept(out, before)


@pytest.mark.slow  # trains models with Ray (half_zoo, then the re-run)
def test_a_write_failure_in_a_worker_is_reported_without_a_traceback(
        half_zoo: Path, spec_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "zoo.zarr"
    shutil.copytree(half_zoo, out)
    chunks = out / "weights" / "c"
    if _sh("chattr", "+i", str(chunks)).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        # Only the weights chunks are frozen: the driver's writes pass, a worker's write fails.
        code, _, err = _run(capsys, "zoo", "generate", str(spec_path), "--out", str(out),
                            "--max-models", "1")
    finally:
        _sh("chattr", "-i", str(chunks))
    assert code == 2 and "Operation not permitted" in err
    assert open_zoo(out).verify().ok and open_zoo(out).done.sum() == 2
    assert "Traceback" not in err and 'File "' not in err


@pytest.mark.slow  # trains models with Ray (half_zoo, then the re-run)
def test_unwritable_store_fails_clearly_and_completes_once_writable(
        half_zoo: Path, spec_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "zoo.zarr"
    shutil.copytree(half_zoo, out)
    before = _done_weights(out)
    frozen = _sh("chattr", "-R", "+i", str(out))
    if frozen.returncode != 0:
        pytest.skip(f"chattr +i is not supported on this file system: {frozen.stderr.strip()}")
    try:
        with pytest.raises(PermissionError):  # root included: chmod would not stop us
            (out / "probe").write_text("x")
        code, _, err = _run(capsys, "zoo", "generate", str(spec_path), "--out", str(out))
        assert code == 2
        _assert_one_line_error(err, out, "Operation not permitted")
    finally:
        _sh("chattr", "-R", "-i", str(out))
    _assert_kept(out, before)
    assert open_zoo(out).done.sum() == 2

    code, stdout, err = _run(capsys, "zoo", "generate", str(spec_path), "--out", str(out))
    assert code == 0, err
    assert _trained(stdout) == N_MODELS - 2
    assert open_zoo(out).done.all()
    _assert_kept(out, before)


@pytest.mark.slow  # trains models with Ray (half_zoo, then the re-run)
def test_corrupted_chunks_are_named_by_verify_and_exactly_their_models_retrained(
        half_zoo: Path, spec_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "zoo.zarr"
    shutil.copytree(half_zoo, out)
    before = _done_weights(out)
    # Model 0's chunk becomes garbage; model 1's is cut in half, as by a crash of the disk.
    (out / "weights" / "c" / "0" / "0").write_bytes(b"\x00garbage" * 64)
    truncated = out / "weights" / "c" / "1" / "0"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])

    code, stdout, err = _run(capsys, "zoo", "verify", str(out))
    assert code == 1
    assert "models 0..0: unreadable chunk" in err and "models 1..1: unreadable chunk" in err
    assert "2 problem(s)" in stdout

    # A resumed run must not keep garbage marked done: it marks those two models not done and
    # retrains exactly them (capped at two models, so nothing else may be trained).
    code, stdout, err = _run(capsys, "zoo", "generate", str(spec_path), "--out", str(out),
                             "--max-models", "2")
    assert code == 0, err
    assert "models [0, 1] are unreadable or fail their checksum" in caplog.text
    assert _trained(stdout) == 2
    assert list(open_zoo(out).done) == [True, True, False, False]
    _assert_kept(out, before)  # retrained deterministically to the very same weights


def test_a_flipped_byte_inside_a_chunk_is_caught_and_forgotten(untrained_half_zoo: Path) -> None:
    out = untrained_half_zoo
    chunk = out / "weights" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))

    # Either the codec fails or the CRC does; both name model 1 and nothing else.
    problems = open_zoo(out).verify().problems
    assert len(problems) == 1 and re.match(r"models? 1(\.\.1)?: ", problems[0]), problems
    store = ZooStore.open(out, mode="r+")
    assert store.forget_broken_models() == [1]
    assert list(store.done) == [True, False, False, False]
    assert open_zoo(out).verify().ok
