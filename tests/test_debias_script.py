"""scripts/debias_mnist.py end to end on real MNIST: Kim et al.'s network under LNTL, its row
recorded with its warm-up's baseline, and the per-epoch state it kept while training cleared
once the row is stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_debias_mnist_trains_lntl_on_kim_et_als_network_and_clears_its_epoch_state(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "scripts" / "debias_mnist.py"), "--task", "colored_mnist",
               "--arch", "lntl-cnn", "--regularizers", "lntl", "--levels", "0.05", "--epochs", "2",
               "--warmup-epochs", "1", "--optimizer", "sgd", "--lr", "0.01", "--train-size", "512",
               "--eval-size", "500", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "colored_mnist.json").read_text())
    assert result["settings"]["arch"] == "lntl-cnn" and result["settings"]["warmup_epochs"] == 1
    (row,) = result["rows"]
    assert row["regularizer"] == "lntl" and row["reg_loss"] > 0 and 0 <= row["unbiased_acc"] <= 1
    assert row["published_acc"] == pytest.approx(0.9618)
    assert 0 <= row["warmup_unbiased_acc"] <= 1  # the pretrained baseline LNTL unlearned from
    assert not list((out / "state").iterdir())  # the model's epoch state went once its row was written
