"""Scoring checkpoints a user hands over: any names, any wrapping, an honest verdict.

The checkpoints here come from a plain PyTorch training loop written in this file, as a
user would write it: their own module names (``stem``, ``mid``, ``top``, ``hidden``, ``out``,
or an ``nn.Sequential``), their own draw of coloured digits (MNIST test digits, which no zoo
model trains on) and their own recipe (batch 50, learning rate 1.5e-3, where the zoo uses 64
and 2e-3), saved the ways training code saves them. The detector is trained on a real zoo,
generated once for the module. Nothing is mocked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file
from torch import nn

from detector.applicability import REFERENCE_KIND, Reference
from detector.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    wilson_interval,
)
from detector.cli import main
from detector.files import save_detector
from detector.models import for_layout, make_detector
from detector.scoring import Scorer, score_checkpoints
from detector.sethead import SetHead
from detector.transform import WeightFeatures
from detector.trees import TreeEnsemble, export_trees
from detector.verdicts import verdict_lines
from detector.workflow import train_detector
from modelzoo.architectures import build_model, flatten, layout, unflatten
from modelzoo.datasets import render_colored_mnist
from modelzoo.generation import generate
from modelzoo.spec import parse_spec
from modelzoo.zoo import open_zoo
from tests.conftest import tiny_spec_dict

STRONG, WEAK = 0.005, 0.5  # σ²: colour nearly fixed by the digit, or barely related to it


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TheirNet(nn.Module):
    """A user's digit classifier: IFBiD's layer shapes under names of their own choosing."""

    def __init__(self, c: int = 12) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 5)
        self.mid = nn.Conv2d(c, 2 * c, 3)
        self.top = nn.Conv2d(2 * c, 64 * c // 24, 3)
        self.hidden = nn.Linear(64 * c // 24, 128 * c // 24)
        self.out = nn.Linear(128 * c // 24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.stem, self.mid, self.top):
            x = nn.functional.max_pool2d(torch.relu(conv(x)), 2)
        return self.out(torch.relu(self.hidden(x.flatten(1))))


def train_their_way(mnist, sigma2: float, random_colours: bool, seed: int, c: int = 12) -> TheirNet:
    """The user's script: 1,000 MNIST *test* digits coloured their way, batch 50, Adam 1.5e-3, 2 epochs."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(np.arange(2000, 10000), 1000, replace=False)
    data = render_colored_mnist(mnist.test_images[rows], mnist.test_labels[rows], sigma2, random_colours, rng)
    images, targets = torch.as_tensor(data.images).float() / 255, torch.as_tensor(data.labels)
    torch.manual_seed(seed)
    model = TheirNet(c)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.5e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in range(2):
        for batch in torch.randperm(len(targets), generator=order).split(50):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), targets[batch]).backward()
            optimizer.step()
    return model


def as_sequential(model: TheirNet) -> nn.Sequential:
    """The same network written as one nn.Sequential (tensors named 0.weight, 3.weight, ...)."""
    pool = (nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(model.stem, *pool, model.mid, *pool, model.top, *pool, nn.Flatten(), model.hidden,
                         nn.ReLU(), model.out)


def save_every_way(model: TheirNet, folder: Path) -> list[Path]:
    """The checkpoint as training code really writes it, one file per wrapping."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    files = {
        "plain.pt": state,
        "dataparallel.pt": {f"module.{k}": v for k, v in state.items()},
        "compiled.pth": {f"_orig_mod.{k}": v for k, v in state.items()},
        "lightning.ckpt": {"epoch": 2, "global_step": 40, "pytorch-lightning_version": "2.4.0",
                           "state_dict": {f"model.{k}": v for k, v in state.items()},
                           "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1.5e-3}]}],
                           "hyper_parameters": {"lr": 1.5e-3, "batch_size": 50}},
        "model_state_dict.pt": {"model_state_dict": state, "epoch": 2, "optimizer_state_dict": {"state": {}}},
        "sequential.pt": as_sequential(model).state_dict(),
    }
    paths = []
    for name, content in files.items():
        torch.save(content, folder / name)
        paths.append(folder / name)
    save_file(state, str(folder / "weights.safetensors"))
    return [*paths, folder / "weights.safetensors"]


# ---------------------------------------------------------------- pieces, on synthetic weights


def signal_weights(n: int, width: float = 0.5, classes: int = 2, seed: int = 0):
    """Digit-cnns around one initialisation; class k has its red conv1 filters scaled by 1 + 0.8k."""
    torch.manual_seed(7)
    base = build_model("digit-cnn", width)
    slots = tuple(layout(base))
    rng = np.random.default_rng(seed)
    noise = 0.01 * rng.standard_normal((n, sum(s.size for s in slots)), dtype=np.float32)
    weights = flatten(base)[None] + noise
    label = np.arange(n) % classes
    conv1 = weights[:, : slots[0].size].reshape(n, *slots[0].shape)
    conv1[:, :, 0] *= (1 + 0.8 * label)[:, None, None, None]
    weights[:, : slots[0].size] = conv1.reshape(n, -1)
    return weights, np.array(["unbiased", "biased", "very"])[label], slots, base


@pytest.mark.parametrize("classes", [2, 3])
def test_exported_trees_give_scikit_learns_probabilities(classes: int) -> None:
    weights, y, slots, _ = signal_weights(60, classes=classes)
    pipeline = make_detector("boosting", slots, max_iter=40).fit(weights, y)
    state, arrays = export_trees(pipeline[-1])
    trees = TreeEnsemble.from_arrays(state, arrays)
    test, _, _, _ = signal_weights(20, classes=classes, seed=5)
    features = pipeline[0].transform(test)
    np.testing.assert_allclose(trees.predict_proba(features), pipeline[-1].predict_proba(features), atol=1e-9)
    assert list(trees.classes) == pipeline.classes_.tolist()


def test_a_deepsets_head_read_from_its_arrays_gives_its_probabilities_at_any_width(tmp_path: Path) -> None:
    weights, y, slots, _ = signal_weights(40)
    pipeline = make_detector("deepsets", slots, epochs=10).fit(weights, y)
    folder = save_detector(pipeline, tmp_path / "det")
    meta = json.loads((folder / "detector.json").read_text())
    head = SetHead.from_step(meta["steps"][1], load_file(str(folder / "arrays.safetensors")))
    for width in (0.5, 1.0):
        test, _, test_slots, _ = signal_weights(6, width=width, seed=3)
        moved = for_layout(pipeline, test_slots)
        np.testing.assert_allclose(head.predict_proba(moved[0].transform(test), moved[0].set_sizes()),
                                   moved.predict_proba(test), atol=1e-9)


def test_calibration_softens_an_overconfident_detector_without_changing_its_verdicts() -> None:
    assert [round(b, 3) for b in wilson_interval(8, 8)] == [0.676, 1.0]  # "100%" of 8 is not 100%
    assert [round(b, 3) for b in wilson_interval(9, 12)] == [0.468, 0.911]
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 400)
    right = rng.random(400) < 0.75  # a detector right 3 times in 4 that always says 0.99
    said = np.where(right, truth, 1 - truth)
    proba = np.where(said[:, None] == np.arange(2), 0.99, 0.01)
    temperature = fit_temperature(proba, truth)
    calibrated = apply_temperature(proba, temperature)
    assert temperature > 2 and (calibrated.argmax(axis=1) == proba.argmax(axis=1)).all()
    assert expected_calibration_error(calibrated, truth) < 0.03
    assert expected_calibration_error(proba, truth) > 0.2


def test_a_network_that_barely_learned_its_task_is_outside_the_detectors_experience() -> None:
    rng = np.random.default_rng(0)
    names = ("out:aligned_acc", "out:colour_follow", "sweep:slope")
    train = np.column_stack([rng.uniform(0.9, 0.99, 40), rng.uniform(0, 1, 40), rng.normal(size=40)])
    train[0, 0], train[1, 0] = 0.9, 0.99
    reference = Reference(train.astype(np.float32), np.array(["0.02", "0.05"] * 20), np.arange(40), names,
                          "digit-cnn", 1.0, kind="probe")
    typical = train[5].copy()
    seen = reference.assess(typical, "digit-cnn", 1.0)
    assert seen["in_distribution"] and seen["task_accuracy"]["barely_learned"] is False

    dead = typical.copy()
    dead[0] = 0.11  # an untrained network: one class for every digit
    verdict = reference.assess(dead, "digit-cnn", 1.0)
    assert verdict["in_distribution"] is False and verdict["task_accuracy"]["barely_learned"]
    assert verdict["reasons"][0] == (
        "it has barely learned its task: it answers 11% of the battery's digits painted in their own "
        "class colour right (chance 10%; the training models 90%–99%), so it has no bias level to read")
    weaker = typical.copy()
    weaker[0] = 0.6  # under every training model, yet far above chance: a weaker model, not an empty one
    assert reference.assess(weaker, "digit-cnn", 1.0)["task_accuracy"]["barely_learned"] is False

    weight_only = Reference(train[:, 1:].astype(np.float32), reference.labels, reference.rows, names[1:],
                            "digit-cnn", 1.0)
    assert "task_accuracy" not in weight_only.assess(typical[1:], "digit-cnn", 1.0)


@pytest.fixture(scope="module")
def small_detector(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """A boosting and a deepsets detector (with their training features) on synthetic half-width
    weights, and one more weight row drawn like their unbiased training rows."""
    weights, y, slots, _ = signal_weights(60)
    features = WeightFeatures(REFERENCE_KIND, slots)
    reference = Reference(features.transform(weights), y, np.arange(len(y)),
                          tuple(features.get_feature_names_out()), "digit-cnn", 0.5)
    info = {"target": "biased", "zoo": {"arch": "digit-cnn", "width": 0.5,
                                        "n_train_per_class": {"biased": 30, "unbiased": 30}}}
    root = tmp_path_factory.mktemp("small")
    folders = [save_detector(make_detector(name, slots, **params).fit(weights, y), root / name, info,
                             reference=reference)
               for name, params in [("boosting", {"max_iter": 40}), ("deepsets", {"epochs": 30})]]
    return *folders, signal_weights(2, seed=9)[0][0]


def their_copy(row: np.ndarray) -> TheirNet:
    """A flat digit-cnn weight row loaded into the user's network, layer by layer."""
    theirs = TheirNet(12)
    ours = unflatten(row, layout(build_model("digit-cnn", 0.5)))
    theirs.load_state_dict(dict(zip(theirs.state_dict(), ours.values(), strict=True)))
    return theirs


def test_many_files_in_one_call_one_bad_one_refused_the_rest_scored(small_detector, tmp_path: Path,
                                                                   capsys) -> None:
    folder, _, base = small_detector
    good = tmp_path / "ckpts"
    save_every_way(their_copy(base), good)
    with_bn = {**their_copy(base).state_dict(), "bn.weight": torch.ones(12), "bn.bias": torch.zeros(12),
               "bn.running_mean": torch.zeros(12), "bn.running_var": torch.ones(12),
               "bn.num_batches_tracked": torch.tensor(5)}
    bad = tmp_path / "batchnorm.pt"
    torch.save(with_bn, bad)
    assert main(["score", str(good), str(bad), "--detector", str(folder), "--json"]) == 2
    out, err = capsys.readouterr()
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == 8 and results[-1]["checkpoint"] == str(bad)
    refused = results[-1]
    assert set(refused) == {"checkpoint", "refused"}
    assert "tensors the architectures lack: bn." in refused["refused"]
    assert f"{bad}: tensors the architectures lack" in err
    scored = results[:-1]
    assert {Path(r["checkpoint"]).name for r in scored} == {p.name for p in good.iterdir()}
    assert len({json.dumps(r["probabilities"]) for r in scored}) == 1  # every wrapping: the same model
    assert all(r["ood"]["in_distribution"] for r in scored), [r["ood"] for r in scored]

    assert main(["score", str(good), str(bad), "--detector", str(folder)]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "7 scored, 1 refused" and any(line.startswith("checkpoint  ") for line in lines)
    assert any(line.startswith(f"{bad}: refused: tensors the") for line in lines)
    assert main(["score", str(good / "plain.pt"), "--detector", str(folder), "--arch", "digit-cnn"]) == 0
    assert main(["score", str(tmp_path / "nothing"), "--detector", str(folder)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_one_checkpoint_is_scored_without_importing_scikit_learn(small_detector, tmp_path: Path) -> None:
    boosting, deepsets, row = small_detector
    torch.save(their_copy(row).state_dict(), tmp_path / "theirs.pt")
    code = (f"import sys; from detector.scoring import score_checkpoint; "
            f"print([score_checkpoint({str(tmp_path / 'theirs.pt')!r}, det)['evidence']['method'] "
            f"for det in ({str(boosting)!r}, {str(deepsets)!r})], "
            "sorted(m for m in sys.modules if m.startswith(('sklearn', 'skops'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['occlusion', 'class contrast'] []", out


# ---------------------------------------------------------------- a real zoo, real users


@pytest.fixture(scope="module")
def zoo_detector(ray_local, tmp_path_factory) -> tuple[Path, Path, Path]:
    """24 half-width digit-cnns trained on strongly (σ² .005) or weakly (.5) colour-biased digits,
    and two detectors trained on pool A's 12 (tested on pool B's): (zoo, boosting, deepsets)."""
    root = tmp_path_factory.mktemp("real")
    spec = tiny_spec_dict(n_models=24, models_per_task=4, train_size=1024, epochs=2)
    spec["zoo"] |= {"width": 0.5, "eval_size": 200}
    spec["sweep"]["sigma2"] = [STRONG, WEAK]
    generate(parse_spec(spec), root / "zoo.zarr", progress=False)
    for name in ("boosting", "deepsets"):
        train_detector(root / "zoo.zarr", detector=name, target="biased", out=root / name)
    return root / "zoo.zarr", root / "boosting", root / "deepsets"


@pytest.fixture(scope="module")
def their_models(mnist) -> dict[str, TheirNet]:
    torch.manual_seed(3)
    return {"strong": train_their_way(mnist, STRONG, False, seed=1),
            "random": train_their_way(mnist, WEAK, True, seed=2),
            "wide": train_their_way(mnist, STRONG, False, seed=4, c=24),
            "untrained": TheirNet(12)}


@pytest.mark.slow
def test_training_reports_an_interval_and_a_calibration_fitted_on_the_training_pool(
        zoo_detector, tmp_path: Path, capsys) -> None:
    zoo_path, folder, _ = zoo_detector
    assert main(["detector", "train", str(zoo_path), "--detector", "boosting", "--target", "biased",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("  held-out accuracy ") and "(95% CI " in printed[1]
    assert printed[1].endswith(", n=12)")
    assert printed[2].startswith("  calibration: temperature ") and "held-out ECE " in printed[2]
    assert printed[3] == "  trained on only 6 models per class: verdicts will say so"
    meta = json.loads((folder / "detector.json").read_text())
    heldout, calibration = meta["heldout"], meta["calibration"]
    low, high = heldout["accuracy_ci"]
    assert heldout["n_models"] == 12 and low < heldout["accuracy"] <= high
    assert calibration["method"] == "temperature" and calibration["folds"] == 5
    assert "12 training models" in calibration["fitted_on"]
    after = calibration["heldout"]
    assert after["log_loss_after"] <= after["log_loss_before"] and after["ece_after"] <= after["ece_before"]
    rows = Scorer(folder).reference.rows
    assert set(open_zoo(zoo_path).column("config/pool")[rows]) == {"A"}  # nothing of the held-out pool B
    assert meta["zoo"]["n_train_per_class"] == {"biased": 6, "unbiased": 6}
    assert meta["predictor"]["kind"] == "trees"


@pytest.mark.slow
def test_outside_checkpoints_in_every_wrapping_get_the_right_verdicts(zoo_detector, their_models,
                                                                     tmp_path: Path) -> None:
    # deepsets: 12 of 12 held-out models right, and 18 of 18 of these users' models over six seeds
    # (boosting, 10 of 12 held out, misjudged 3 of 18, all three flagged outside its experience).
    _, _, folder = zoo_detector
    for name, verdict in [("strong", "biased"), ("random", "unbiased")]:
        paths = save_every_way(their_models[name], tmp_path / name)
        results = list(score_checkpoints([tmp_path / name], folder))
        assert [Path(r["checkpoint"]).name for r in results] == sorted(p.name for p in paths)
        for result in results:
            assert result["verdict"] == verdict, (name, result["checkpoint"], result["probabilities"])
            assert (result["arch"], result["width"]) == ("digit-cnn", 0.5)
        result = results[0]
        assert set(result["ood"]) >= {"in_distribution", "reasons", "distance_percentile"}
        evidence = result["evidence"]
        assert evidence["method"] == "class contrast" and len(evidence["features"]) == 3
        assert all(set(f["training_range"]) == {"biased", "unbiased"} for f in evidence["features"])
        assert [set(n) for n in evidence["nearest"]] == [{"zoo_model", "label", "distance"}] * 3
        lines = verdict_lines(result)
        assert "trained on only 6 models per class" in lines[0] and "95% CI" in lines[0]
        assert lines[1].startswith("  why (class contrast): ") and "nearest zoo models: #" in lines[1]


@pytest.mark.slow
def test_another_width_and_an_untrained_network_are_outside_the_detectors_experience(
        zoo_detector, their_models, tmp_path: Path, capsys) -> None:
    _, folder, _ = zoo_detector  # boosting: scored from its trees, evidence by occlusion
    for name, reason in [("wide", "width 1; the detector learned from width 0.5 only"),
                         ("untrained", "farther than any training model is from its own nearest neighbour")]:
        torch.save(their_models[name].state_dict(), tmp_path / f"{name}.pt")
        assert main(["score", str(tmp_path / f"{name}.pt"), "--detector", str(folder), "--json"]) == 0
        ood = json.loads(capsys.readouterr().out)["ood"]
        assert ood["in_distribution"] is False and ood["distance_percentile"] == 100.0, ood
        assert any(reason in r for r in ood["reasons"]), ood["reasons"]
        assert main(["score", str(tmp_path / f"{name}.pt"), "--detector", str(folder)]) == 0
        line = capsys.readouterr().out.splitlines()[0]
        assert "outside the detector's experience" in line and "uncalibrated p = " in line
        assert " (p = " not in line, line
    evidence = next(score_checkpoints([tmp_path / "wide.pt"], folder))["evidence"]
    assert evidence["method"] == "occlusion" and len(evidence["nearest"]) == 3
