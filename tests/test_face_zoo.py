"""Face gender zoos end to end: spec checks, skewed training sets, per-group metrics in the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fairtrain.metrics import representation_leakage
from modelzoo.architectures import build_model
from modelzoo.checkpoints import model_state_dict
from modelzoo.faces import GROUPS
from modelzoo.generation import generate
from modelzoo.spec import SpecError, parse_spec
from modelzoo.training import training_data
from modelzoo.zoo import open_zoo


def face_spec_dict(**fixed) -> dict:
    return {
        "zoo": {"task": "face_gender", "arch": "gender-cnn", "dataset": "utkface_crop_part1",
                "n_models": 4, "seed": 2, "models_per_task": 2},
        "fixed": {"epochs": 2, "train_size": 120, "batch_size": 32, "skew": 0.8, "pool": "A", **fixed},
        "sweep": {"bias_group": ["east_asian", "african_indian", "caucasian", "balanced"]},
    }


@pytest.mark.parametrize(("edit", "message"), [
    (lambda raw: raw["zoo"].update(arch="digit-cnn"), "zoo.arch: digit-cnn does not fit task face_gender"),
    (lambda raw: raw["zoo"].pop("dataset"), "zoo.dataset: task face_gender needs a face folder"),
    (lambda raw: raw["fixed"].update(pool="all"), "pool: face_gender trains on pool A or B"),
    (lambda raw: raw["sweep"].update(bias_group=["nordic"]), "sweep.bias_group: value 'nordic'"),
    (lambda raw: raw["fixed"].update(skew=1.5), "fixed.skew: value 1.5 must be in (0, 1]"),
    (lambda raw: raw["fixed"].update(sigma2=0.02), "fixed.sigma2: unknown axis for task face_gender"),
])
def test_face_specs_are_checked_before_any_work(edit, message: str) -> None:
    raw = face_spec_dict()
    edit(raw)
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(raw)


def test_mnist_tasks_refuse_the_face_architecture() -> None:
    raw = {"zoo": {"task": "colored_mnist", "arch": "gender-cnn", "n_models": 1}, "fixed": {"sigma2": 0.02}}
    with pytest.raises(SpecError, match=r"zoo\.arch: gender-cnn does not fit task colored_mnist"):
        parse_spec(raw)


@pytest.mark.slow
def test_face_zoo_records_per_group_accuracy(ray_local, tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "faces.zarr"
    # A fairtrain regularizer sees the three groups as the sensitive attribute.
    spec = parse_spec(face_spec_dict(regularizer="grad", gamma=0.1))
    summary = generate(spec, out, data_dir=data_root, progress=False)
    assert summary.n_trained == 4
    zoo = open_zoo(out)
    assert list(zoo.column("config/bias_group")) == ["east_asian", "african_indian", "caucasian", "balanced"]
    assert [zoo.config(i).bias_level for i in range(4)] == list(zoo.column("config/bias_group"))
    assert zoo.attrs["groups"] == list(GROUPS)
    assert zoo.attrs["input"]["shape"] == [3, 48, 48]
    assert zoo.attrs["data_source"].endswith("utkface_crop_part1")
    per_group = zoo.column("metrics/per_group_acc")
    assert per_group.shape == (4, 3)
    assert zoo.column("metrics/per_class_acc").shape == (4, 2)
    assert (zoo.column("metrics/reg_loss") != 0).all()
    # The biased test set of a favouring model is its own group's part of the balanced test set.
    assert np.allclose(zoo.column("metrics/biased_acc")[:3], per_group[np.arange(3), np.arange(3)])

    # Every stored metric again, computed here from the stored weights on the balanced test set.
    test = training_data(zoo.spec, zoo.config(0), data_root).test_unbiased
    images = torch.from_numpy(test.images).float() / 255
    half = len(test) // 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the zoo's one-CPU tasks ran
    try:
        outputs = []
        for index in range(4):
            model = build_model(zoo.arch, zoo.width).eval()
            model.load_state_dict(model_state_dict(zoo, index))
            with torch.no_grad():
                features = model.features(images)
                outputs.append((features.numpy(), model.fc2(features).argmax(1).numpy() == test.labels))
    finally:
        torch.set_num_threads(threads)
    for index, (features, correct) in enumerate(outputs):
        by_group = [correct[test.bias == g].mean() for g in range(len(GROUPS))]
        np.testing.assert_allclose(per_group[index], by_group, atol=1e-6)
        assert zoo.column("metrics/unbiased_acc")[index] == pytest.approx(correct.mean(), abs=1e-6)
        # The group probe ran on these bottleneck features (half fit, half scored).
        probe = representation_leakage(features[:half], test.bias[:half], features[half:], test.bias[half:])
        one_image = 1 / (len(test) - half)
        assert zoo.column("metrics/leakage")[index] == pytest.approx(probe.accuracy, abs=one_image)
    assert zoo.verify().ok


@pytest.mark.slow
def test_infeasible_skew_fails_clearly_and_stores_nothing(ray_local, tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "too_big.zarr"
    with pytest.raises(Exception, match="east_asian images but bias_group='east_asian'"):
        generate(parse_spec(face_spec_dict(train_size=5000)), out, data_dir=data_root, max_models=1,
                 progress=False)
    assert not out.exists()  # the store this run made is removed with its refusal
