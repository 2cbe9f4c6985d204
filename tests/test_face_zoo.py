"""Face gender zoos end to end: spec checks, skewed training sets, per-group metrics in the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelzoo.faces import GROUPS
from modelzoo.generate import generate
from modelzoo.spec import SpecError, parse_spec
from modelzoo.store import ZooStore, verify


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
    (lambda raw: raw["fixed"].update(skew=1.0), "fixed.skew: value 1.0 must be in (0, 1)"),
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


def test_face_zoo_records_per_group_accuracy(ray_local, tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "faces.zarr"
    # A fairtrain regularizer sees the three groups as the sensitive attribute.
    spec = parse_spec(face_spec_dict(regularizer="grad", gamma=0.1))
    summary = generate(spec, out, data_dir=data_root, progress=False)
    assert summary.n_trained == 4
    store = ZooStore.open(out)
    assert list(store.field("config/bias_group")) == ["east_asian", "african_indian", "caucasian", "balanced"]
    assert store.group.attrs["groups"] == list(GROUPS)
    assert store.group.attrs["input"]["shape"] == [3, 48, 48]
    assert store.group.attrs["data_source"].endswith("utkface_crop_part1")
    per_group = store.field("metrics/per_group_acc")
    assert per_group.shape == (4, 3) and np.isfinite(per_group).all()
    assert store.field("metrics/per_class_acc").shape == (4, 2)
    assert store.field("metrics/leakage").min() > 0  # the group probe ran on the bottleneck
    assert (store.field("metrics/reg_loss") != 0).all()
    # The biased test set of a favouring model is its own group's part of the balanced test set.
    assert np.allclose(store.field("metrics/biased_acc")[:3], per_group[np.arange(3), np.arange(3)])
    assert verify(out).ok


def test_infeasible_skew_fails_clearly_and_stores_nothing(ray_local, tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "too_big.zarr"
    with pytest.raises(Exception, match="east_asian images but bias_group='east_asian'"):
        generate(parse_spec(face_spec_dict(train_size=5000)), out, data_dir=data_root, max_models=1,
                 progress=False)
    assert not ZooStore.open(out).done.any()
