"""Scoring checkpoints a user wrote in plain PyTorch: the architecture read from the
state_dict's structure whatever its names, verdicts at any width, and the ``score`` command's
JSON and its refusals of pickled code, truncated files, NaN and foreign tensors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from detector.cli import main
from detector.files import save_detector
from detector.models import make_detector
from detector.scoring import score_checkpoint
from modelzoo.architectures import build_model
from modelzoo.recognition import RecognitionError, recognize
from tests.conftest import PlainDigitNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_architecture_is_recognised_from_a_plain_state_dict() -> None:
    def arch_width(state_dict: dict) -> tuple[str, float]:
        recognized = recognize(state_dict)
        return recognized.arch, recognized.width

    assert arch_width(PlainDigitNet().state_dict()) == ("digit-cnn", 1.0)
    assert arch_width(PlainDigitNet(12).state_dict()) == ("digit-cnn", 0.5)
    renamed = {k.replace("conv", "layer"): v for k, v in PlainDigitNet().state_dict().items()}
    assert arch_width(renamed) == ("digit-cnn", 1.0)  # by structure: the names do not matter
    with pytest.raises(RecognitionError, match=r"tensors the architectures lack: bn\.running_mean"):
        recognize({**PlainDigitNet().state_dict(), "bn.running_mean": torch.zeros(24)})


def _user_model(width: int = 24, red: float = 1.0) -> PlainDigitNet:
    """A user's model around the signal's initialisation, its red conv1 filters scaled by ``red``."""
    model = PlainDigitNet(width)
    torch.manual_seed(7)
    model.load_state_dict(build_model("digit-cnn", width / 24).state_dict())
    with torch.no_grad():
        model.conv1.weight[:, 0] *= red
    return model


def test_score_judges_plain_checkpoints_at_any_width(signal, tmp_path: Path) -> None:
    train, y_train, _, _, slots = signal
    fitted = make_detector("boosting", slots, max_iter=50).fit(train, y_train)
    folder = save_detector(fitted, tmp_path / "det", {"target": "biased", "heldout": {"accuracy": 0.9}})
    for width, red, verdict in [(24, 2.5, "biased"), (24, 1.0, "unbiased"), (12, 2.5, "biased")]:
        torch.save(_user_model(width, red).state_dict(), tmp_path / "mine.pt")
        result = score_checkpoint(tmp_path / "mine.pt", folder)
        assert (result["arch"], result["width"]) == ("digit-cnn", width / 24)
        assert result["verdict"] == verdict == result["predicted"], (width, red, result)
        assert result["probability"] == pytest.approx(result["probabilities"]["biased"], abs=1e-4)
        assert (result["probability"] > 0.5) == (verdict == "biased")
        assert result["detector"] | {"path": None} == {"path": None, "name": "boosting", "target": "biased",
                                                       "heldout": {"accuracy": 0.9}, "trained_on": None,
                                                       "calibration": None, "min_train_per_class": None}
        assert result["ood"]["in_distribution"] is None  # saved without the training zoo's features


def test_score_command_prints_json_and_refuses_bad_checkpoints(signal, tmp_path: Path, capsys) -> None:
    train, y_train, _, _, slots = signal
    fitted = make_detector("boosting", slots, max_iter=20).fit(train, y_train)
    folder = save_detector(fitted, tmp_path / "det")
    user = _user_model(red=2.5)
    torch.save(user.state_dict(), tmp_path / "mine.pt")
    assert main(["score", str(tmp_path / "mine.pt"), "--detector", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == score_checkpoint(tmp_path / "mine.pt", folder)
    assert main(["score", str(tmp_path / "mine.pt"), "--detector", str(folder)]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'mine.pt'}: biased (p = ")

    marker = tmp_path / "pwned"

    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "bomb.pt").write_bytes(pickle.dumps({"conv1.weight": Bomb()}))
    (tmp_path / "short.pt").write_bytes((tmp_path / "mine.pt").read_bytes()[:200])
    nan_state = user.state_dict()
    nan_state["fc1.bias"][0] = float("nan")
    torch.save(nan_state, tmp_path / "nan.pt")
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pt")
    torch.save({k: torch.full_like(v, 1e37) for k, v in user.state_dict().items()}, tmp_path / "huge.pt")
    for name, message in [("bomb.pt", "never unpickled"), ("short.pt", "not a readable"),
                          ("nan.pt", "NaN or Inf"), ("huge.pt", "reach |w| = 1e+37, far beyond any trained"),
                          ("other.pt", "tensors the architectures lack: w")]:
        assert main(["score", str(tmp_path / name), "--detector", str(folder)]) == 2
        assert message in capsys.readouterr().err
    assert not marker.exists(), "a checkpoint's pickled code must never run"
