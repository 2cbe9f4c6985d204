"""Meta-detectors on weight rows, detector files, labels and splits, and the train/evaluate
workflow on a zoo (the command line where it is under test); scoring plain PyTorch checkpoints
is in test_score_plain_checkpoints.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
import torch
import zarr
from sklearn.preprocessing import FunctionTransformer
from torch import nn

from detector import files
from detector.battery import digit_battery
from detector.cli import main
from detector.evaluate import labels, rows_at_levels, score_detector, split_rows
from detector.files import DetectorFileError, load_detector, save_detector
from detector.models import DETECTORS, DetectorError, for_layout, make_detector, runs_networks
from detector.recalibrate import recalibrate_detector, reference_spec
from detector.verdicts import verdict_lines
from detector.workflow import evaluate_detector, train_detector
from modelzoo.architectures import build_model, flatten, layout
from modelzoo.generation import generate
from modelzoo.spec import parse_spec
from modelzoo.store import ZooStore
from modelzoo.training import ModelResult
from modelzoo.zoo import StoreError, open_zoo
from tests.conftest import PlainDigitNet, colour_signal_weights, tiny_spec_dict

FAST = {"layer_conv": {"epochs": 60}, "deepsets": {"epochs": 150}, "dense": {"max_iter": 200}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_weight_zoo(path: Path, n_models: int = 12) -> Path:
    """A zoo store written by hand, no training: fresh digit-cnns, conv1 scaled 1.8× for σ² 0.02
    (the biased level); the last model is left unfinished."""
    store = ZooStore.create(path, parse_spec(tiny_spec_dict(n_models=n_models, models_per_task=2)))
    for i in range(n_models - 1):
        torch.manual_seed(100 + i)
        model = build_model("digit-cnn")
        if store.config(i).bias_level == 0.02:
            with torch.no_grad():
                model.conv1.weight.mul_(1.8)
        store.write_model(i, ModelResult(flatten(model), {"unbiased_acc": 0.5}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detectors_learn_from_weights(name: str, signal, mnist) -> None:
    train, y_train, test, y_test, slots = signal
    context = {}
    if runs_networks(name):  # what a louder first layer does to the battery's answers
        context = {"arch": "digit-cnn", "battery": digit_battery("colored_mnist", mnist.test_images,
                                                                  mnist.test_labels, per_class=3, steps=3)}
    detector = make_detector(name, slots, **context, **FAST.get(name, {})).fit(train, y_train)
    scores = score_detector(detector, test, y_test)
    if not DETECTORS[name].width_independent:
        # Raw-weight baselines see 600 informative of 49,562 inputs from 100 models: they must
        # fit their training set and rank held-out models better than chance, no more.
        assert detector.score(train, y_train) >= 0.9 and scores.auc > 0.5, (name, scores)
    else:
        assert scores.accuracy >= 0.75, f"{name} held-out accuracy {scores.accuracy}"
    assert np.sum(scores.confusion) == len(y_test) and scores.classes == ["biased", "unbiased"]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # 2 iterations: not the point
def test_exact_layout_detectors_refuse_another_width_and_invariant_ones_take_it(signal) -> None:
    train, y_train, _, _, slots = signal
    half, y_half, half_slots = colour_signal_weights(20, width=0.5, seed=3)
    dense = make_detector("dense", slots, max_iter=2).fit(train[:20], y_train[:20])
    with pytest.raises(DetectorError, match=r"dense detector reads the exact layout.*\(24, 3, 5, 5\).*"
                                            r"\(12, 3, 5, 5\): another width"):
        for_layout(dense, half_slots)
    with pytest.raises(DetectorError, match=r"weight rows must have shape \(models, 49562\)"):
        dense.predict(half)
    boosting = make_detector("boosting", slots, max_iter=50).fit(train, y_train)
    assert for_layout(boosting, slots) is boosting
    assert score_detector(for_layout(boosting, half_slots), half, y_half).accuracy >= 0.75
    gender = tuple(layout(build_model("gender-cnn")))
    with pytest.raises(DetectorError, match="another architecture"):
        for_layout(boosting, gender)


def test_bad_detector_input_is_refused_early(signal) -> None:
    train, y_train, _, _, slots = signal
    with pytest.raises(DetectorError, match="y has one class"):
        make_detector("deepsets", slots, epochs=1).fit(train, np.full(len(y_train), "biased"))
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        make_detector("boosting", slots).fit(train, y_train[:-1])
    with pytest.raises(DetectorError, match="unknown detector 'svm'"):
        make_detector("svm", slots)
    bad = train.copy()
    bad[3, 10] = np.nan
    bad[5, 0] = np.inf
    with pytest.raises(DetectorError, match=r"models \[3, 5\] have NaN or Inf"):
        make_detector("boosting", slots).fit(bad, y_train)


def test_detector_files_refuse_other_versions_damage_and_untrusted_code(signal, tmp_path: Path) -> None:
    train, y_train, _, _, slots = signal
    fitted = make_detector("boosting", slots, max_iter=10).fit(train, y_train)
    folder = save_detector(fitted, tmp_path / "det")
    meta = json.loads((folder / "detector.json").read_text())
    good_skops = (folder / "classifier.skops").read_bytes()

    def refused(change: dict, message: str, sign: bool = True) -> None:
        changed = meta | change
        if sign:  # as a crafted folder would: digest recomputed, so the deeper checks must hold
            changed["integrity"] = dict(meta["integrity"], json=files._json_digest(changed))
        (folder / "detector.json").write_text(json.dumps(changed))
        with pytest.raises(DetectorFileError, match=message):
            load_detector(folder)
        (folder / "detector.json").write_text(json.dumps(meta))

    refused({"feature_version": 0}, r"weight features v0.*retrain")
    refused({"format_version": 2}, r"v2; this weightbias reads weightbias-detector v3: retrain")
    # Edited by hand, the digest gives it away: swapped classes, an impossible accuracy.
    refused({"classes": meta["classes"][::-1]}, "detector.json was changed after", sign=False)
    refused({"heldout": {"accuracy": 1.5}}, "detector.json was changed after", sign=False)
    steps = meta["steps"]
    refused({"steps": [steps[0], steps[1] | {"class": "builtins.eval"}]}, r"'builtins.eval'.*allow-list")
    refused({"steps": [steps[0], steps[1] | {"file": "../../etc/passwd"}]}, "names no file of its own")
    refused({"steps": [steps[0] | {"state": steps[0]["state"] | {"version": 9}}, steps[1]]}, "state v9")
    def crafted_skops(data: bytes) -> None:  # replaced, with the digests recomputed to match
        (folder / "classifier.skops").write_bytes(data)
        crafted = json.loads(json.dumps(meta))
        crafted["integrity"]["files"]["classifier.skops"] = files._file_digest(folder / "classifier.skops")
        crafted["integrity"]["json"] = files._json_digest(crafted)
        (folder / "detector.json").write_text(json.dumps(crafted))

    # A skops file that would call an arbitrary function is refused before anything is built.
    crafted_skops(sio.dumps(FunctionTransformer(os.system)))
    with pytest.raises(DetectorFileError, match="outside the allow-list"):
        load_detector(folder)
    crafted_skops(sio.dumps(FunctionTransformer()))  # trusted, wrong class
    with pytest.raises(DetectorFileError, match=r"declares a sklearn\.ensemble"):
        load_detector(folder)
    (folder / "detector.json").write_text(json.dumps(meta))
    (folder / "classifier.skops").write_bytes(good_skops[: len(good_skops) // 2])
    with pytest.raises(DetectorFileError, match=r"classifier\.skops was changed or damaged"):
        load_detector(folder)
    with pytest.raises(DetectorFileError, match="not a detector folder"):
        load_detector(tmp_path)
    (folder / "classifier.skops").write_bytes(good_skops)
    assert load_detector(folder)[0].score(train, y_train) == 1.0


def test_labels_splits_and_levels_of_a_zoo(tmp_path: Path) -> None:
    zoo = open_zoo(write_weight_zoo(tmp_path / "zoo.zarr", n_models=12))
    sigma2, pools = zoo.column("config/sigma2"), zoo.column("config/pool")
    assert list(labels(zoo, "biased")) == ["biased" if s == 0.02 else "unbiased" for s in sigma2]
    assert list(labels(zoo, "bias_level")) == [f"{s:g}" for s in sigma2]
    assert set(labels(zoo, "regularizer")) == {"none"}
    train, test = split_rows(zoo, "pool")
    assert set(pools[train]) == {"A"} and set(pools[test]) == {"B"}
    assert sorted([*train, *test]) == list(range(11))  # model 11 is not done
    train, test = split_rows(zoo, "random", seed=1)
    assert len(test) == 3 and not set(train) & set(test) and len(train) + len(test) == 11
    assert set(sigma2[rows_at_levels(zoo, train, ["0.05"])]) == {0.05}
    with pytest.raises(DetectorError, match=r"levels \['0.9'\] not in the zoo"):
        rows_at_levels(zoo, train, ["0.9"])
    with pytest.raises(DetectorError, match="unknown target 'colour'"):
        labels(zoo, "colour")
    with pytest.raises(DetectorError, match="needs models of pool C"):
        split_rows(zoo, "pool", train_pool="C")


def test_train_and_evaluate_a_detector_on_a_zoo(tmp_path: Path) -> None:
    zoo = write_weight_zoo(tmp_path / "zoo.zarr", n_models=24)
    pipeline, info = train_detector(zoo, detector="boosting", target="biased", out=tmp_path / "det",
                                    params={"max_iter": 50})
    assert info["heldout"]["accuracy"] == 1.0 and info["heldout"]["n_models"] == 11  # pool B, one not done
    assert info["zoo"] | {"path": None, "spec_digest": None} == {
        "path": None, "spec_digest": None, "task": "colored_mnist", "arch": "digit-cnn", "width": 1.0,
        "n_train": 12, "n_heldout": 11, "n_train_per_class": {"biased": 6, "unbiased": 6}}
    low, high = info["heldout"]["accuracy_ci"]  # 11 of 11 right: the Wilson interval, not "100%"
    assert (round(low, 3), high) == (0.741, 1.0)
    assert info["calibration"]["method"] == "temperature" and info["calibration"]["folds"] == 5
    evaluated = evaluate_detector(tmp_path / "det", zoo, pool="B")
    assert evaluated["scores"] == info["heldout"] and evaluated["target"] == "biased"
    assert evaluate_detector(pipeline, zoo, pool="B", target="biased")["scores"] == info["heldout"]
    assert evaluate_detector(tmp_path / "det", zoo, pool="A")["scores"]["n_models"] == 12
    with pytest.raises(DetectorError, match=r"levels \['0.9'\] not in the zoo"):
        train_detector(zoo, levels=["0.9"])


def test_detector_commands_train_and_evaluate(tmp_path: Path, capsys) -> None:
    zoo = write_weight_zoo(tmp_path / "zoo.zarr", n_models=8)
    assert main(["detector", "train", str(zoo), "--out", str(tmp_path / "det"), "--target", "biased",
                 "--detector", "boosting", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["heldout"]["n_models"] == 3 and trained["zoo"]["n_train"] == 4
    assert trained["out"] == str(tmp_path / "det") and (tmp_path / "det" / "detector.json").is_file()
    assert main(["detector", "evaluate", str(tmp_path / "det"), str(zoo), "--pool", "B", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scores"] == trained["heldout"]
    assert main(["detector", "evaluate", str(tmp_path / "det"), str(zoo), "--pool", "B"]) == 0
    assert capsys.readouterr().out.startswith(f"boosting detector (biased) on {zoo} pool B\n  n=3  accuracy")
    assert main(["detector", "train", str(zoo), "--out", str(tmp_path / "x"), "--levels", "0.9"]) == 2
    assert "levels ['0.9'] not in the zoo" in capsys.readouterr().err


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


def train_plainly(mnist, sigma2: float, seed: int, channels: int = 12) -> PlainDigitNet:
    """A user's training script: their own model and loop, nothing of weightbias but the data."""
    from modelzoo.datasets import load_imageset

    data = load_imageset(mnist, "colored_mnist", "train", sigma2, "B", seed=0)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(data.labels), generator=generator)[:1024]
    images = torch.as_tensor(data.images[rows.numpy()]).float() / 255
    targets = torch.as_tensor(data.labels[rows.numpy()]).long()
    torch.manual_seed(seed)
    model = PlainDigitNet(channels)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(2):
        for batch in torch.randperm(len(targets), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), targets[batch]).backward()
            optimizer.step()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deepsets", "probe"])
def test_detector_from_a_real_zoo_judges_held_out_models_and_plain_pytorch_ones(
        name: str, real_zoo: Path, mnist, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "det"
    assert main(["detector", "train", str(real_zoo), "--out", str(folder), "--detector", name,
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
        # a linear head is a seed ensemble: the share of its members behind the verdict
        assert (0 < result["agreement"] <= 1) if name == "probe" else "agreement" not in result
        if name == "probe" and result["ood"]["in_distribution"]:
            assert "of the detector's ensemble members agree" in verdict_lines(result)[0]


@pytest.mark.slow
def test_a_probe_detector_recalibrated_for_another_width_trains_its_own_reference_models(
        real_zoo: Path, mnist, tmp_path: Path, capsys) -> None:
    det, quarter = tmp_path / "det", tmp_path / "det_quarter"
    assert main(["detector", "train", str(real_zoo), "--out", str(det), "--detector", "probe",
                 "--target", "biased"]) == 0
    assert main(["detector", "recalibrate", str(det), "--width", "0.25", "--out", str(quarter),
                 "--per-class", "2", "--num-cpus", "2", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert entry["width"] == 0.25 and entry["from_width"] == 0.5 and entry["n_reference"] == 4
    assert entry["cut_points_after"] != entry["cut_points_before"]
    reference = open_zoo(entry["reference_store"])  # trained here, with the detector's zoo recipe
    assert reference.width == 0.25 and reference.done.all()
    assert reference.spec.fixed["epochs"] == 2 and reference.spec.fixed["train_size"] == 1024

    path = tmp_path / "quarter.pt"
    torch.save(train_plainly(mnist, STRONG, seed=5, channels=6).state_dict(), path)
    assert main(["score", str(path), "--detector", str(det), "--json"]) == 0
    original = json.loads(capsys.readouterr().out)
    assert original["ood"]["in_distribution"] is False
    assert any("width 0.25" in reason for reason in original["ood"]["reasons"])
    # no calibrated p at an unseen width, but where it falls among the training models
    assert set(original["percentiles"]) == {"biased", "unbiased"}
    assert 0 <= original["percentiles"]["biased"] <= 100
    assert 0 < original["agreement"] <= 1
    assert main(["score", str(path), "--detector", str(quarter)]) == 0
    line = capsys.readouterr().out
    assert "cut points refitted for width 0.25 on 4 reference models" in line
    assert not any("width 0.25; the detector" in part for part in line.split(";"))
    # The user's recipe in the zoo's place: the reference models train with it, the verdict says so.
    own_recipe = tmp_path / "det_quarter_sgd"
    assert main(["detector", "recalibrate", str(det), "--width", "0.25", "--out", str(own_recipe),
                 "--per-class", "2", "--num-cpus", "2", "--recipe", "optimizer=sgd", "lr=0.01",
                 "--json"]) == 0
    entry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert entry["recipe"] == {"optimizer": "sgd", "lr": 0.01} and entry["n_reference"] == 4
    reference = open_zoo(entry["reference_store"])
    assert set(reference.column("config/optimizer")) == {"sgd"} and reference.spec.fixed["epochs"] == 2
    assert main(["score", str(path), "--detector", str(own_recipe)]) == 0
    assert "cut points refitted for width 0.25 and optimizer sgd, lr 0.01 on 4" in capsys.readouterr().out

    boosting = tmp_path / "boosting"
    assert main(["detector", "train", str(real_zoo), "--out", str(boosting), "--detector", "boosting",
                 "--target", "biased"]) == 0
    with pytest.raises(DetectorError, match="no cut points to refit"):
        recalibrate_detector(boosting, 0.25, tmp_path / "never")


def test_reference_models_for_another_recipe_train_with_the_users_recipe_in_the_zoos_place(
        tmp_path: Path, capsys) -> None:
    zoo_spec = tiny_spec_dict(n_models=8, epochs=2)
    zoo_spec["sample"] = {"lr": {"log_uniform": [1e-3, 3e-3]}, "batch_size": {"choice": [32, 64]}}
    del zoo_spec["fixed"]["lr"], zoo_spec["fixed"]["batch_size"]
    recipe = {"optimizer": "sgd", "lr": 0.005, "epochs": 5, "train_size": 768}
    spec = parse_spec(reference_spec(zoo_spec, 1.0, 3, "A", recipe))
    assert spec.n_models == 6 and spec.sample == {"batch_size": {"choice": [32, 64]}}
    for index in range(spec.n_models):
        config = spec.config(index)
        assert (config.optimizer, config.lr, config.epochs, config.train_size, config.pool) == (
            "sgd", 0.005, 5, 768, "A")
    assert sorted({spec.config(i).bias_level for i in range(6)}) == [0.02, 0.05]  # the zoo's own levels
    zoo_spec["sweep"]["sigma2"] = [0.02, 0.03, 0.05]
    only_known = parse_spec(reference_spec(zoo_spec, 1.0, 3, "A", recipe, levels=["0.02", "0.05"]))
    assert only_known.n_models == 6  # no reference model at a level the detector does not predict
    with pytest.raises(DetectorError, match=r"either --zoo .* or --recipe"):
        recalibrate_detector(tmp_path / "det", 1.0, tmp_path / "out", zoo=tmp_path / "zoo.zarr",
                             recipe={"epochs": 5})
    with pytest.raises(SystemExit):
        main(["detector", "recalibrate", str(tmp_path / "det"), "--width", "1", "--out", str(tmp_path / "o"),
              "--recipe", "epochs"])
    assert "expected AXIS=VALUE (e.g. epochs=5), got 'epochs'" in capsys.readouterr().err


def test_damaged_models_are_named_by_their_numbers_in_the_zoo(tmp_path: Path) -> None:
    path = write_weight_zoo(tmp_path / "zoo.zarr", n_models=14)
    weights = zarr.open_group(path, mode="r+")["weights"]
    for model in (5, 9):  # both in pool A, the training pool
        row = weights[model]
        row[0] = np.nan
        weights[model] = row
    with pytest.raises(StoreError, match=r"models \[5, 9\] have NaN or Inf weights"):
        train_detector(path, detector="boosting")


def test_evaluating_a_pool_the_zoo_lacks_is_one_clear_error(tmp_path: Path) -> None:
    path = write_weight_zoo(tmp_path / "zoo.zarr")
    pipeline, _ = train_detector(path, detector="boosting", params={"max_iter": 5})
    with pytest.raises(DetectorError, match=r"no finished model of pool 'C'; it has pools \['A', 'B'\]"):
        evaluate_detector(pipeline, path, pool="C")


def test_the_behaviour_ceiling_reads_stored_metrics_across_pools(tmp_path: Path) -> None:
    from detector.ceiling import behaviour_ceiling
    from tests.conftest import random_zoo

    zoo = random_zoo(tmp_path / "zoo.zarr", parse_spec(tiny_spec_dict(n_models=40, models_per_task=4)))
    # Behaviour that follows the bias level (σ² 0.02: colour-led, low unbiased accuracy), with noise.
    level = np.array([zoo.config(i).bias_level for i in range(40)])
    rng = np.random.default_rng(0)
    shapes = (("unbiased_acc", 0.3, 0.7), ("biased_acc", 0.95, 0.6), ("leakage", 0.9, 0.4))
    for metric, strong, weak in shapes:
        zoo.group[f"metrics/{metric}"][:] = np.where(level == 0.02, strong, weak) + rng.normal(0, 0.05, 40)
    ceiling = behaviour_ceiling(open_zoo(zoo.path))
    for direction in ("A→B", "B→A"):
        assert ceiling[direction]["accuracy"] >= 0.9 and ceiling[direction]["n_models"] == 20
    for metric in ("unbiased_acc", "biased_acc", "leakage"):  # no signal left: about chance
        zoo.group[f"metrics/{metric}"][:] = rng.uniform(0.1, 1, 40)
    assert behaviour_ceiling(open_zoo(zoo.path))["A→B"]["accuracy"] < 0.8
