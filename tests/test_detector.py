"""Meta-detectors, detector files, labels and splits, and scoring checkpoints from plain PyTorch."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
import torch
from sklearn.preprocessing import FunctionTransformer
from torch import nn

from detector.cli import main
from detector.evaluate import labels, score_detector, split_rows
from detector.files import DetectorFileError, load_detector, save_detector
from detector.models import DETECTORS, DetectorError, WeightSet, make_detector
from detector.scoring import recognize_architecture
from modelzoo.architectures import build_model, flatten, layout
from modelzoo.generate import generate
from modelzoo.spec import parse_spec
from modelzoo.store import ZooStore
from tests.conftest import tiny_spec_dict

FAST = {"layer_conv": {"epochs": 60}, "deepsets": {"epochs": 150}, "dense": {"max_iter": 200}}


def colour_signal_weights(n: int, width: float = 1.0, seed: int = 0) -> tuple[WeightSet, np.ndarray]:
    """Digit-cnns around one initialisation (as models fine-tuned from a shared start are); half
    get their first layer's red filters scaled up 2.5×, the weight-space trace a colour shortcut
    leaves. Labels: "biased" for those, "unbiased" for the rest."""
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
    return WeightSet(weights, slots, "digit-cnn", width), y


@pytest.fixture(scope="module")
def signal() -> tuple[WeightSet, np.ndarray, WeightSet, np.ndarray]:
    train, y_train = colour_signal_weights(100, seed=1)
    test, y_test = colour_signal_weights(40, seed=2)
    return train, y_train, test, y_test


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detectors_learn_from_weights_and_survive_a_save(name: str, signal, tmp_path: Path) -> None:
    train, y_train, test, y_test = signal
    detector = make_detector(name, **FAST.get(name, {})).fit(train, y_train)
    scores = score_detector(detector, test, y_test)
    if detector.needs_exact_layout:
        # Raw-weight baselines see 600 informative of 49,562 inputs from 100 models: they must
        # fit their training set and rank held-out models better than chance, no more.
        assert detector.score(train, y_train) >= 0.9 and scores.auc > 0.5, (name, scores)
    else:
        assert scores.accuracy >= 0.75, f"{name} held-out accuracy {scores.accuracy}"
    assert sum(map(sum, scores.confusion)) == len(y_test)
    save_detector(detector, tmp_path / "det", {"target": "biased"})
    loaded, meta = load_detector(tmp_path / "det")
    assert meta["detector"] == name and meta["target"] == "biased"
    np.testing.assert_allclose(loaded.predict_proba(test), detector.predict_proba(test), rtol=1e-5, atol=1e-6)


def test_exact_layout_detectors_refuse_another_width_and_invariant_ones_take_it(signal) -> None:
    train, y_train, _, _ = signal
    half, y_half = colour_signal_weights(20, width=0.5, seed=3)
    with pytest.raises(DetectorError, match=r"exact digit-cnn width 1 layout; got width 0\.5"):
        make_detector("dense", max_iter=50).fit(train, y_train).predict(half)
    boosting = make_detector("boosting").fit(train, y_train)
    assert score_detector(boosting, half, y_half).accuracy >= 0.75


def test_bad_detector_input_is_refused_early(signal) -> None:
    train, y_train, _, _ = signal
    with pytest.raises(DetectorError, match="single class"):
        make_detector("boosting").fit(train, np.full(len(y_train), "biased"))
    with pytest.raises(DetectorError, match="one label per model"):
        make_detector("boosting").fit(train, y_train[:-1])
    with pytest.raises(DetectorError, match="not fitted yet"):
        make_detector("deepsets").predict(train)
    with pytest.raises(DetectorError, match="unknown detector 'svm'"):
        make_detector("svm")
    bad = train.weights.copy()
    bad[3, 10] = np.nan
    with pytest.raises(DetectorError, match=r"models \[3\] have NaN or Inf"):
        WeightSet(bad, train.slots, "digit-cnn")


def test_detector_files_refuse_other_versions_and_untrusted_code(signal, tmp_path: Path) -> None:
    train, y_train, _, _ = signal
    folder = save_detector(make_detector("boosting").fit(train, y_train), tmp_path / "det")
    meta = json.loads((folder / "detector.json").read_text())
    (folder / "detector.json").write_text(json.dumps(meta | {"feature_version": 0}))
    with pytest.raises(DetectorFileError, match=r"weight features v0.*retrain"):
        load_detector(folder)
    (folder / "detector.json").write_text(json.dumps(meta))
    # A skops file that would call an arbitrary function is refused before anything is built.
    (folder / "model.skops").write_bytes(sio.dumps(FunctionTransformer(os.system)))
    with pytest.raises(DetectorFileError, match="outside the allow-list"):
        load_detector(folder)
    with pytest.raises(DetectorFileError, match="not a detector folder"):
        load_detector(tmp_path)


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


def test_architecture_is_recognised_from_a_plain_state_dict() -> None:
    assert recognize_architecture(PlainDigitNet().state_dict()) == ("digit-cnn", 1.0)
    assert recognize_architecture(PlainDigitNet(12).state_dict()) == ("digit-cnn", 0.5)
    renamed = {k.replace("conv", "layer"): v for k, v in PlainDigitNet().state_dict().items()}
    with pytest.raises(DetectorError, match=r"match no known architecture.*digit-cnn: conv1\.weight"):
        recognize_architecture(renamed)


def test_score_reads_plain_checkpoints_and_refuses_bad_ones(signal, tmp_path: Path, capsys) -> None:
    train, y_train, _, _ = signal
    folder = save_detector(make_detector("boosting").fit(train, y_train), tmp_path / "det",
                           {"target": "biased", "heldout": {"accuracy": 0.9}})
    user = PlainDigitNet()
    torch.manual_seed(0)
    for module in (user.conv1,):
        nn.init.uniform_(module.weight, -0.1, 0.1)
    with torch.no_grad():
        user.conv1.weight[:, 0] *= 1.6
    torch.save(user.state_dict(), tmp_path / "mine.pt")
    assert main(["score", str(tmp_path / "mine.pt"), "--detector", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"verdict", "probability", "predicted", "detector", "arch"} <= set(result)
    assert result["arch"] == "digit-cnn" and result["verdict"] in ("biased", "unbiased")
    assert 0 <= result["probability"] <= 1 and result["detector"]["heldout"]["accuracy"] == 0.9

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
    for name, message in [("bomb.pt", "refused"), ("short.pt", "not a readable"), ("nan.pt", "NaN or Inf"),
                          ("other.pt", "match no known architecture")]:
        assert main(["score", str(tmp_path / name), "--detector", str(folder)]) == 2
        assert message in capsys.readouterr().err
    assert not marker.exists(), "a checkpoint's pickled code must never run"


def test_labels_splits_and_evaluate_on_a_real_zoo(ray_local, tmp_path: Path, capsys) -> None:
    out = tmp_path / "zoo.zarr"
    generate(parse_spec(tiny_spec_dict(n_models=8, models_per_task=4)), out, progress=False)
    store = ZooStore.open(out)
    sigma2, pools = store.field("config/sigma2"), store.field("config/pool")
    assert list(labels(store, "biased")) == ["biased" if s == 0.02 else "unbiased" for s in sigma2]
    assert set(labels(store, "bias_level")) == {"0.02", "0.05"}
    train, test = split_rows(store, "pool")
    assert set(pools[train]) == {"A"} and set(pools[test]) == {"B"} and len(train) + len(test) == 8
    assert main(["detector", "train", str(out), "--out", str(tmp_path / "det"), "--target", "biased",
                 "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["heldout"]["n_models"] == 4 and trained["zoo"]["n_train"] == 4
    assert main(["detector", "evaluate", str(tmp_path / "det"), str(out), "--pool", "B", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["scores"]["accuracy"] == trained["heldout"]["accuracy"]
    assert main(["detector", "train", str(out), "--out", str(tmp_path / "x"), "--levels", "0.9"]) == 2
    assert "--levels ['0.9'] not in the zoo" in capsys.readouterr().err


STRONG, WEAK = 0.005, 0.5  # σ²: colour nearly fixed by the digit, or barely related to it


@pytest.fixture(scope="module")
def real_zoo(ray_local, tmp_path_factory) -> Path:
    """24 half-width digit-cnns, trained for real on strongly or weakly colour-biased data."""
    out = tmp_path_factory.mktemp("real") / "zoo.zarr"
    spec = tiny_spec_dict(n_models=24, models_per_task=4, train_size=1024, epochs=2)
    spec["zoo"] |= {"width": 0.5, "eval_size": 200}
    spec["sweep"]["sigma2"] = [STRONG, WEAK]
    generate(parse_spec(spec), out, progress=False)
    return out


def train_plainly(mnist, sigma2: float, seed: int) -> PlainDigitNet:
    """A user's training script: their own model and loop, nothing of weightbias but the data."""
    from modelzoo.datasets import load_imageset

    data = load_imageset(mnist, "colored_mnist", "train", sigma2, "B", seed=0)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(data.labels), generator=generator)[:1024]
    images = torch.as_tensor(data.images[rows.numpy()]).float() / 255
    targets = torch.as_tensor(data.labels[rows.numpy()]).long()
    torch.manual_seed(seed)
    model = PlainDigitNet(12)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(2):
        for batch in torch.randperm(len(targets), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), targets[batch]).backward()
            optimizer.step()
    return model


def test_detector_from_a_real_zoo_judges_held_out_models_and_plain_pytorch_ones(
        real_zoo: Path, mnist, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "det"
    assert main(["detector", "train", str(real_zoo), "--out", str(folder), "--detector", "deepsets",
                 "--target", "biased", "--json"]) == 0
    heldout = json.loads(capsys.readouterr().out)["heldout"]  # trained on pool A, tested on pool B
    assert heldout["n_models"] == 12 and heldout["accuracy"] >= 0.75, heldout  # chance: 0.5

    for sigma2, verdict in [(STRONG, "biased"), (WEAK, "unbiased")]:
        path = tmp_path / f"user_{sigma2}.pt"
        torch.save(train_plainly(mnist, sigma2, seed=11).state_dict(), path)
        assert main(["score", str(path), "--detector", str(folder), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert (result["arch"], result["width"]) == ("digit-cnn", 0.5)
        assert result["verdict"] == verdict, (sigma2, result)
