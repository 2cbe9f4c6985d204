"""The evidence scripts end to end on real MNIST: scripts/debias_mnist.py trains Kim et al.'s
network under LNTL at two levels, each model a Ray task beside the other, each row recorded with
its warm-up's baseline, the per-epoch state each kept cleared once its row is stored; with
``--in-process`` it trains EnD on EnD's own network where Ray is not installed (a GPU box);
scripts/ndr_odd_even.py extends a finished run to more epochs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(command: list[str]) -> None:
    """Run an evidence script single-threaded from the repository root; it must exit 0."""
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_debias_mnist_trains_lntl_on_kim_et_als_network_and_clears_its_epoch_state(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "scripts" / "debias_mnist.py"), "--task", "colored_mnist",
               "--arch", "lntl-cnn", "--regularizers", "lntl", "--levels", "0.05", "0.03", "--epochs", "2",
               "--warmup-epochs", "1", "--optimizer", "sgd", "--lr", "0.01", "--train-size", "512",
               "--eval-size", "500", "--out", str(out)]
    run_script(command)
    result = json.loads((out / "colored_mnist.json").read_text())
    assert result["settings"]["arch"] == "lntl-cnn" and result["settings"]["warmup_epochs"] == 1
    assert [row["level"] for row in result["rows"]] == [0.03, 0.05]  # table order, not finish order
    rows = {row["level"]: row for row in result["rows"]}
    for row in rows.values():
        assert row["regularizer"] == "lntl" and row["reg_loss"] > 0 and 0 <= row["unbiased_acc"] <= 1
        assert 0 <= row["warmup_unbiased_acc"] <= 1  # the pretrained baseline LNTL unlearned from
    assert rows[0.05]["published_acc"] == pytest.approx(0.9618)
    assert rows[0.03]["published_acc"] == pytest.approx(0.9137)
    assert not list((out / "state").iterdir())  # each epoch state went once its row was written
    # Nothing is left unfinished, so an interim reading of the same command has no row.
    run_script([*command, "--interim"])
    assert json.loads((out / "colored_mnist.interim.json").read_text())["rows"] == []


@pytest.mark.slow
def test_debias_mnist_in_process_trains_without_ray_on_ends_network(tmp_path: Path) -> None:
    out = tmp_path / "run"
    arguments = ["--task", "biased_mnist", "--protocol", "rebias", "--arch", "end-cnn",
                 "--regularizers", "end", "--levels", "0.99", "--reg-option", "end.activation=pre",
                 "--epochs", "1", "--train-size", "128", "--val-size", "64", "--eval-size", "100",
                 "--in-process", "--device", "cpu", "--out", str(out)]
    # Importing Ray (or Zarr) fails in this interpreter, as on a machine that lacks them.
    blocked = ("import runpy, sys; sys.modules['ray'] = sys.modules['zarr'] = None; "
               f"sys.argv = ['debias_mnist.py', *{arguments!r}]; "
               "runpy.run_path('scripts/debias_mnist.py', run_name='__main__')")
    run_script([sys.executable, "-c", blocked])
    result = json.loads((out / "biased_mnist.json").read_text())
    assert result["settings"]["arch"] == "end-cnn" and result["settings"]["select"] == "best_val"
    (row,) = result["rows"]
    assert row["regularizer"] == "end" and row["reg_loss"] > 0 and row["best_epoch"] == 1
    assert row["published_acc"] == pytest.approx(0.96)


@pytest.mark.slow
def test_the_gpu_harness_runs_the_cells_it_is_given(tmp_path: Path, data_root: Path) -> None:
    """scripts/debias_gpu.sh, here on the CPU: CELLS picks the runs, each cell's own flags (one
    point each of an α/β search) name its folder, EXTRA's flags join every run's (its and the
    cells' --reg-option add to end.activation=pre), and each run's row is printed."""
    extra = ("--epochs 1 --train-size 128 --val-size 64 --eval-size 100 --device cpu "
             "--reg-option end.beta=0.4")
    cells = "end-cnn end 0.99 --reg-option end.alpha=0.2;end-cnn end 0.99 --reg-option end.alpha=0.3"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "CELLS": cells, "EXTRA": extra}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "debias_gpu.sh"), str(data_root), str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("end-cnn end 0.99 --reg-option end.alpha=0.2 biased_mnist.json")
    for alpha in (0.2, 0.3):
        folder = tmp_path / f"end-cnn_end_0.99_reg-option_end.alpha={alpha}"
        result = json.loads((folder / "biased_mnist.json").read_text())
        options = result["settings"]["reg_options"]
        assert options == {"end": {"activation": "pre", "alpha": alpha, "beta": 0.4}}
        assert [row["regularizer"] for row in result["rows"]] == ["end"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [  # only the cells it was given
        "end-cnn_end_0.99_reg-option_end.alpha=0.2", "end-cnn_end_0.99_reg-option_end.alpha=0.3"]


def _ndr_run(out: Path, epochs: int) -> dict:
    command = [sys.executable, str(ROOT / "scripts" / "ndr_odd_even.py"), "--gammas", "1",
               "--train-size", "1000", "--test-size", "1000", "--epochs", str(epochs), "--eval-every", "1",
               "--out", str(out)]
    run_script(command)
    return json.loads((out / "ndr_odd_even.json").read_text())["rows"][0]


@pytest.mark.slow
def test_ndr_odd_even_extends_a_finished_run_to_the_weights_of_a_longer_one(tmp_path: Path) -> None:
    """Table I's 500 epochs span sessions: a 1-epoch run extended to 2 ends where a 2-epoch run
    does, and keeps the test readings of its first epoch in its trajectory."""
    _ndr_run(tmp_path / "extended", 1)
    extended = _ndr_run(tmp_path / "extended", 2)
    straight = _ndr_run(tmp_path / "straight", 2)
    assert [reading["epoch"] for reading in extended["trajectory"]] == [1, 2]
    assert extended["trajectory"] == straight["trajectory"]
    for key in ("parity_acc", "ndr_R", "digit_leakage"):
        assert extended[key] == straight[key]
    progress = json.loads((tmp_path / "extended" / "ndr_odd_even.progress.json").read_text())
    assert progress["1"] == extended["trajectory"]
