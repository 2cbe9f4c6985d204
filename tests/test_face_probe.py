"""The face probe detector: a battery of faces no model trained on, group-indexed features that
no unit permutation or rescaling moves, and the group scorer shared by the groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from detector.battery import load_battery
from detector.facebattery import FaceBattery, face_battery
from detector.files import load_detector, save_detector
from detector.groupscore import GroupScorer
from detector.models import DetectorError, detector_name, make_detector
from detector.probing import ProbeFeatures
from modelzoo.architectures import build_model, flatten
from modelzoo.faces import GROUPS, find_face_folder, load_face_data
from modelzoo.layouts import arch_layout

GROUP_NAMES = ("east_asian", "african_indian", "caucasian")


def _blocks(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic face-probe rows: 3 blocks of 4 then 2 shared columns; a model favouring group
    g has a higher first column in block g; group 2 is harder for every model."""
    labels = rng.integers(0, 4, n)  # 3 = balanced
    X = rng.normal(size=(n, 3 * 4 + 2))
    X[:, 8] -= 1.0  # group 2's accuracy column: a hard group, favoured or not
    for g in range(3):
        X[labels == g, 4 * g] += 3.0
    return X, np.array([*GROUP_NAMES, "balanced"])[labels]


def test_the_group_scorer_shares_one_scorer_across_groups_and_saves_as_arrays() -> None:
    rng = np.random.default_rng(0)
    X, y = _blocks(rng, 240)
    head = GroupScorer(GROUP_NAMES, 4).fit(X, y)
    assert head.coef_.shape == (4,) and head.coef_[0] == head.coef_.max() > 0
    X_test, y_test = _blocks(rng, 240)
    assert head.score(X_test, y_test) > 0.75  # chance 0.25
    proba = head.predict_proba(X_test)
    assert proba.shape == (240, 4) and np.allclose(proba.sum(axis=1), 1)
    # the same standing-out seen in another group's block is scored as that group
    row = np.zeros((1, 14))
    for g, name in enumerate(GROUP_NAMES):
        lifted = row.copy()
        lifted[0, 4 * g] = 4.0
        assert head.predict(lifted)[0] == name
    assert head.predict(row)[0] == "balanced"
    state, arrays = head._save_state()
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    assert np.array_equal(GroupScorer._load_state(state, arrays).predict_proba(X_test), proba)
    # a seed ensemble: 15 members on their own draws, their mean the answer, their votes the agreement
    assert head.theta_.shape[0] == 15 and not np.allclose(head.theta_[0], head.theta_[1])
    Z, F = head._standardised(X_test)
    by_member = [head._proba(Z, F, member) for member in head.theta_]
    assert np.allclose(proba, np.mean(by_member, axis=0))
    assert np.allclose(head.agreement(X_test), np.mean(
        np.stack([p.argmax(axis=1) for p in by_member], axis=1) == proba.argmax(axis=1)[:, None], axis=1))
    single = GroupScorer(GROUP_NAMES, 4, n_members=1).fit(X, y)
    state, arrays = single._save_state()  # a v1 file (one fit) loads as a one-member ensemble
    params = {k: v for k, v in state["params"].items() if k not in ("n_members", "member_fraction")}
    old = GroupScorer._load_state({**state, "version": 1, "params": params},
                                  {**arrays, "theta": arrays["theta"][0]})
    assert old.n_members == 1 and np.allclose(old.predict_proba(X_test), single.predict_proba(X_test))
    # a target that names no group is read from the shared and group-symmetric columns
    named = GroupScorer(GROUP_NAMES, 4).fit(X, np.where(y == "balanced", "unbiased", "biased"))
    assert named.score(X_test, np.where(y_test == "balanced", "unbiased", "biased")) > 0.7
    with pytest.raises(DetectorError, match="3 blocks of 5 columns"):
        GroupScorer(GROUP_NAMES, 5).fit(X[:, :12], y)


@pytest.fixture(scope="module")
def faces(data_root: Path) -> tuple[Path, FaceBattery]:
    folder = find_face_folder("utkface_crop_part1", data_root)
    return folder, face_battery(folder, image_size=48, minors_per_cell=8)


@pytest.mark.slow  # decodes the face folder once (~15 s)
def test_a_face_battery_holds_unseen_faces_of_every_group_and_their_means(faces) -> None:
    folder, battery = faces
    data = load_face_data(folder, image_size=48, seed=0, progress=False)
    assert battery.describe()["per_source"] == {"test": len(data.test), "minor": 6 * 8, "mean": 6}
    test = battery.source == 0
    assert np.array_equal(battery.images[test], data.test.images)
    assert np.array_equal(battery.group[test], data.test.bias)
    # no battery face is a face any model of either pool trains on
    pools = {image.tobytes() for image in np.concatenate([data.pool_a.images, data.pool_b.images])}
    assert not pools & {image.tobytes() for image in battery.images[battery.source < 2]}
    minors = battery.source == 1
    assert np.array_equal(np.bincount(battery.group[minors] * 2 + battery.gender[minors]), np.full(6, 8))
    for k in np.flatnonzero(battery.source == 2):
        same = (battery.group == battery.group[k]) & (battery.gender == battery.gender[k])
        cell = (battery.source < 2) & same
        assert np.abs(battery.images[k].astype(float) - battery.images[cell].mean(axis=0)).max() <= 0.5
    restored = load_battery(battery.describe(), {k: v.copy() for k, v in battery.arrays().items()})
    assert isinstance(restored, FaceBattery) and restored.groups == tuple(GROUPS)
    assert np.array_equal(restored.images, battery.images)
    with pytest.raises(DetectorError, match="face probe battery v0"):
        load_battery({**battery.describe(), "version": 0}, battery.arrays())
    probes = battery.probes(5)
    assert sorted(probes) == sorted(GROUPS) and all(p.shape == (5, 3, 48, 48) for p in probes.values())
    with pytest.raises(DetectorError, match="east_asian faces"):
        battery.probes(10_000)


def _rescaled_and_permuted(model: nn.Module) -> nn.Module:
    """The same function: conv3's units permuted, one fc1 unit scaled ×4 in and ÷4 out."""
    other = build_model("gender-cnn", 0.5).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        order = torch.randperm(other.conv3.out_channels, generator=torch.Generator().manual_seed(0))
        other.conv3.weight.copy_(other.conv3.weight[order])
        other.conv3.bias.copy_(other.conv3.bias[order])
        other.conv4.weight.copy_(other.conv4.weight[:, order])
        other.fc1.weight[5] *= 4
        other.fc1.bias[5] *= 4
        other.fc2.weight[:, 5] /= 4
    return other


@pytest.mark.slow  # the faces fixture decodes the face folder
def test_face_probe_features_ignore_unit_order_rescaling_and_width(faces) -> None:
    _, battery = faces
    torch.manual_seed(0)
    model = build_model("gender-cnn", 0.5).eval()
    rows = np.stack([flatten(model), flatten(_rescaled_and_permuted(model))])
    features = ProbeFeatures(arch_layout("gender-cnn", 0.5), "gender-cnn", battery).fit(rows)
    out = features.transform(rows)
    names = features.get_feature_names_out()
    assert out.shape == (2, len(battery.feature_names())) and np.isfinite(out).all()
    moved = names[~np.isclose(out[0], out[1], atol=1e-4)]
    assert not len(moved), moved
    assert "group[caucasian]:acc" in names and "shared:last:eta_group" in names
    features.set_params(layout=arch_layout("gender-cnn", 1.0))
    assert features.transform(flatten(build_model("gender-cnn", 1.0))[None]).shape == (1, len(names))
    # the probe detector of a face zoo puts the group scorer on these features
    detector = make_detector("probe", arch_layout("gender-cnn", 0.5), arch="gender-cnn", battery=battery)
    assert isinstance(detector[-1], GroupScorer) and detector[-1].block == battery.block
    assert detector_name(detector) == "probe"


@pytest.mark.slow  # the faces fixture decodes the face folder
def test_a_face_probe_detector_round_trips_without_pickle(faces, tmp_path: Path) -> None:
    _, battery = faces
    layout = arch_layout("gender-cnn", 0.5)
    rows, y = [], []
    for i in range(9):
        torch.manual_seed(i)
        model = build_model("gender-cnn", 0.5)
        rows.append(flatten(model))
        y.append(GROUP_NAMES[i % 3])
    detector = make_detector("probe", layout, arch="gender-cnn", battery=battery, C=1.0)
    detector.fit(np.stack(rows), np.array(y))
    save_detector(detector, tmp_path / "det", {"detector": "probe"})
    assert not list((tmp_path / "det").glob("*.pkl"))
    loaded, _ = load_detector(tmp_path / "det")
    assert isinstance(loaded[0].battery, FaceBattery)
    assert np.allclose(loaded.predict_proba(np.stack(rows)), detector.predict_proba(np.stack(rows)))


class TheirFaceNet(nn.Module):
    """Someone else's gender network: gender-cnn's shapes at width 0.5 under other names."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 5, padding=2)
        self.blocks = nn.ModuleList([nn.Conv2d(12, 24, 3, padding=1), nn.Conv2d(24, 24, 3, padding=1),
                                     nn.Conv2d(24, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)])
        self.embed = nn.Linear(32, 64)
        self.classify = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.stem(x)), 2)
        for i, block in enumerate(self.blocks):
            x = torch.relu(block(x))
            if i % 2:
                x = nn.functional.max_pool2d(x, 2)
        return self.classify(torch.relu(self.embed(x.mean(dim=(2, 3)))))


@pytest.mark.slow  # a 12-model face zoo and an outside network trained here (~1 min)
def test_a_face_zoo_trains_the_probe_detector_by_default_and_it_scores_an_outside_network(
        ray_local, data_root: Path, tmp_path: Path) -> None:
    from detector.scoring import score_checkpoint
    from detector.workflow import train_detector
    from modelzoo.generation import generate
    from modelzoo.spec import parse_spec

    raw = {"zoo": {"task": "face_gender", "arch": "gender-cnn", "width": 0.5, "dataset": "utkface_crop_part1",
                   "n_models": 12, "seed": 5, "models_per_task": 3},
           "fixed": {"epochs": 3, "train_size": 160, "batch_size": 32, "skew": 0.95},
           "sweep": {"bias_group": ["east_asian", "caucasian", "balanced"], "pool": ["A", "B"]}}
    store = tmp_path / "faces.zarr"
    assert generate(parse_spec(raw), store, data_dir=data_root, progress=False).n_done == 12
    pipeline, info = train_detector(store, out=tmp_path / "det", data_dir=data_root)
    assert info["detector"] == "probe" and isinstance(pipeline[-1], GroupScorer)
    assert info["heldout"]["n_models"] == 6 and sorted(info["heldout"]["classes"]) == [
        "balanced", "caucasian", "east_asian"]

    # their own loop, their own draw: east Asian faces only, SGD, other names
    faces = load_face_data(find_face_folder("utkface_crop_part1", data_root), image_size=48, progress=False)
    keep = np.flatnonzero(faces.pool_b.bias == GROUPS.index("east_asian"))[:200]
    images = torch.from_numpy(faces.pool_b.images[keep]).float() / 255
    genders = torch.from_numpy(faces.pool_b.labels[keep])
    torch.manual_seed(7)
    theirs = TheirFaceNet()
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for batch in torch.randperm(len(keep)).split(25):
            loss = nn.functional.cross_entropy(theirs(images[batch]), genders[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")
    result = score_checkpoint(tmp_path / "theirs.pt", tmp_path / "det")
    assert result["arch"] == "gender-cnn" and result["width"] == 0.5
    assert result["renamed"]["stem.weight"] == "conv1.weight"
    assert result["predicted"] in {"balanced", "caucasian", "east_asian"}
    assert result["verdict"] in {"biased", "unbiased"}  # the face detector knows balanced models
    assert set(result["probabilities"]) == {"balanced", "caucasian", "east_asian"}
    assert result["ood"]["in_distribution"] is not None and result["evidence"]["method"] == "occlusion"
    assert 0 < result["agreement"] <= 1  # the group scorer is a seed ensemble too
    # a face probe verdict reads how well the network does its task on the battery's faces
    task = result["ood"]["task_accuracy"]
    assert task["chance"] == 0.5 and task["probes"] == "the battery's faces" and 0 <= task["value"] <= 1
    assert task["barely_learned"] == ("it has barely learned its task" in " ".join(result["ood"]["reasons"]))
