"""Detector folders are written whole or not at all, only where they belong, and are refused
once changed: real files, a real full tmpfs, the real CLI in this process."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from detector.cli import main
from detector.files import DetectorFileError, load_detector, save_detector
from detector.models import make_detector
from tests.conftest import fill_disk
from tests.test_detector import colour_signal_weights, write_weight_zoo


@pytest.fixture(scope="module")
def fitted():
    train, y_train, slots = colour_signal_weights(60, seed=1)
    return make_detector("boosting", slots, max_iter=10).fit(train, y_train), train, y_train


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_a_bad_out_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    zoo = write_weight_zoo(tmp_path / "zoo.zarr")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.csv").write_text("1,2")
    (tmp_path / "mixed").mkdir()  # looks like a detector, holds the user's notes too
    (tmp_path / "mixed" / "detector.json").write_text('{"my": "own config"}')
    (tmp_path / "mixed" / "notes.txt").write_text("precious")
    for out, reason in [(tmp_path / "notes.txt", "is a file, not a folder"),
                        (tmp_path / "mine", "holds other files"),
                        (tmp_path / "mixed", "holds other files (notes.txt)"),
                        (zoo, "lies inside the Zarr store"),
                        (zoo / "det", "lies inside the Zarr store")]:
        code, err = _run(capsys, "detector", "train", str(zoo), "--out", str(out), "--detector", "boosting")
        assert code == 2 and reason in err and "Traceback" not in err, err
    assert (tmp_path / "notes.txt").read_text() == "mine" and os.listdir(tmp_path / "mine") == ["a.csv"]
    assert (tmp_path / "mixed" / "notes.txt").read_text() == "precious"
    assert not (zoo / "det").exists() and not (zoo / "detector.json").exists()


def test_a_read_only_place_is_refused_before_training(tmp_path: Path, small_disk,
                                                     capsys: pytest.CaptureFixture) -> None:
    import subprocess

    zoo = write_weight_zoo(tmp_path / "zoo.zarr")
    mount = small_disk("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    code, err = _run(capsys, "detector", "train", str(zoo), "--out", str(mount / "det"),
                     "--detector", "boosting")
    assert code == 2 and "cannot write in" in err and "(read-only)" in err and "Traceback" not in err, err


def test_a_changed_folder_is_refused_by_score_and_evaluate(tmp_path: Path, fitted,
                                                           capsys: pytest.CaptureFixture) -> None:
    detector, train, y_train = fitted
    folder = save_detector(detector, tmp_path / "det")
    assert load_detector(folder)[0].score(train, y_train) == 1.0
    meta = json.loads((folder / "detector.json").read_text())
    changes = {"classes": meta["classes"][::-1], "heldout": {"accuracy": 1.5}, "target": "regularizer",
               "extra": 1}
    for key, value in changes.items():
        (folder / "detector.json").write_text(json.dumps(meta | {key: value}))
        with pytest.raises(DetectorFileError, match=r"detector\.json was changed after"):
            load_detector(folder)
    (folder / "detector.json").write_text(json.dumps(meta))
    for name in sorted(meta["integrity"]["files"]):
        original = (folder / name).read_bytes()
        (folder / name).write_bytes(os.urandom(len(original)))
        with pytest.raises(DetectorFileError, match=re.escape(f"{name} was changed or damaged")):
            load_detector(folder)
        (folder / name).unlink()
        with pytest.raises(DetectorFileError, match=re.escape(f"{name} is missing")):
            load_detector(folder)
        (folder / name).write_bytes(original)
    assert load_detector(folder)[0].score(train, y_train) == 1.0


def test_a_full_disk_leaves_no_partial_detector_and_keeps_the_old_one(small_disk, fitted) -> None:
    detector, train, y_train = fitted
    mount = small_disk("1m")
    folder = save_detector(detector, mount / "det")
    kept = {f.name: f.read_bytes() for f in folder.iterdir()}
    fill_disk(mount, leave=8192)  # room for a little, not for a whole detector
    with pytest.raises(DetectorFileError, match=r"cannot write the detector \(No space left on device"):
        save_detector(detector, mount / "det")
    with pytest.raises(DetectorFileError, match="No space left on device"):
        save_detector(detector, mount / "new")
    assert sorted(p.name for p in mount.iterdir()) == ["det", "filler"]  # no partial folder
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == kept
    np.testing.assert_array_equal(load_detector(folder)[0].predict(train), y_train)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".h5"])
def test_a_checkpoint_written_to_a_full_disk_is_one_clear_error_and_leaves_nothing(
        small_disk, suffix: str) -> None:
    from modelzoo.architectures import build_model
    from modelzoo.checkpoints import CheckpointError, save_checkpoint

    mount = small_disk("1m")
    fill_disk(mount, leave=20 * 1024)  # room for the start of a checkpoint, not all of it
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint \(No space left on device\)"):
        save_checkpoint(build_model("digit-cnn").state_dict(), mount / f"m{suffix}")
    assert sorted(p.name for p in mount.iterdir()) == ["filler"]


def test_face_probes_are_refused_for_a_model_no_face_task_trains(tmp_path: Path) -> None:
    import torch
    from PIL import Image

    from detector.models import DetectorError
    from detector.scoring import score_checkpoint
    from detector.workflow import train_detector
    from modelzoo.architectures import build_model

    zoo = write_weight_zoo(tmp_path / "zoo.zarr")
    train_detector(zoo, detector="boosting", out=tmp_path / "det", params={"max_iter": 5})
    torch.save(build_model("digit-cnn").state_dict(), tmp_path / "digits.pt")
    for group in ("g1", "g2"):
        (tmp_path / "probes" / group).mkdir(parents=True)
        Image.new("RGB", (60, 60), (120, 90, 60)).save(tmp_path / "probes" / group / "face.png")
    with pytest.raises(DetectorError, match="a digit-cnn, which no face task trains"):
        score_checkpoint(tmp_path / "digits.pt", tmp_path / "det", probes=tmp_path / "probes")
