"""The probe detector: its battery, invariant probe features, the ordinal head, its files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone
from torch import nn

from detector.battery import Battery, battery_for_task, digit_battery, task_colours
from detector.files import load_detector, save_detector
from detector.models import DetectorError, for_layout, make_detector
from detector.ordinal import LogisticHead
from detector.probing import ProbeFeatures, arch_width, network_responses, probe_feature_names
from modelzoo.architectures import build_model, flatten
from modelzoo.datasets import paint
from modelzoo.layouts import arch_layout


@pytest.fixture(scope="module")
def battery(mnist) -> Battery:
    return digit_battery("colored_mnist", mnist.test_images, mnist.test_labels, per_class=3, steps=5)


def test_a_digit_battery_paints_test_digits_in_every_class_colour(mnist, battery: Battery) -> None:
    grid, sweep = battery.conflict, battery.sweep
    assert len(grid) == 3 * 10 * 10 and len(sweep) == 10 * 5 and len(battery) == 350
    assert np.array_equal(np.bincount(battery.shape[grid]), np.full(10, 30))
    assert np.array_equal(np.bincount(battery.colour[grid]), np.full(10, 30))
    # each grid image is a test digit painted in its colour by the dataset code itself
    first = battery.images[grid[:10]]
    red = task_colours("colored_mnist")[:1]
    match = [i for i in range(len(mnist.test_images))
             if np.array_equal(paint("colored_mnist", mnist.test_images[i:i + 1], red), first[:1])]
    assert match and mnist.test_labels[match[0]] == battery.shape[grid[0]]
    assert len({img.tobytes() for img in first}) == 10  # ten colours, ten different images
    # sweeps start at one class colour and end at the next
    start = battery.images[sweep[0]].reshape(3, -1).max(axis=1)
    assert np.allclose(start / 255, task_colours("colored_mnist")[0], atol=1 / 255)
    again = digit_battery("colored_mnist", mnist.test_images, mnist.test_labels, per_class=3, steps=5)
    assert np.array_equal(again.images, battery.images)
    restored = Battery.from_arrays(battery.describe(), {k: v.copy() for k, v in battery.arrays().items()})
    assert np.array_equal(restored.images, battery.images) and np.array_equal(restored.pair, battery.pair)
    with pytest.raises(DetectorError, match="battery v"):
        Battery.from_arrays({**battery.describe(), "version": 0}, battery.arrays())
    with pytest.raises(DetectorError, match="face_gender"):
        battery_for_task("face_gender")


def _rescaled_and_permuted(model: nn.Module) -> nn.Module:
    """The same function with conv2's units permuted and one fc1 unit scaled ×4 in, ÷4 out."""
    other = build_model("digit-cnn", 0.5)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        order = torch.randperm(other.conv2.out_channels, generator=torch.Generator().manual_seed(0))
        other.conv2.weight.copy_(other.conv2.weight[order])
        other.conv2.bias.copy_(other.conv2.bias[order])
        other.conv3.weight.copy_(other.conv3.weight[:, order])
        other.fc1.weight[3] *= 4
        other.fc1.bias[3] *= 4
        other.fc2.weight[:, 3] /= 4
    return other


def test_probe_features_ignore_unit_order_and_relu_rescaling(battery: Battery) -> None:
    torch.manual_seed(0)
    model = build_model("digit-cnn", 0.5)
    layout = arch_layout("digit-cnn", 0.5)
    rows = np.stack([flatten(model), flatten(_rescaled_and_permuted(model))])
    features = ProbeFeatures(layout, "digit-cnn", battery).fit(rows)
    out = features.transform(rows)
    assert out.shape == (2, len(probe_feature_names())) and np.isfinite(out).all()
    moved = np.array(probe_feature_names())[~np.isclose(out[0], out[1], atol=1e-4)]
    assert not len(moved), moved
    # the weights themselves moved: a weight detector sees two different networks
    assert not np.allclose(rows[0], rows[1])
    # any width gives the same columns
    wide = build_model("digit-cnn", 1.0)
    features.set_params(layout=arch_layout("digit-cnn", 1.0))
    assert features.transform(flatten(wide)[None]).shape == (1, 83)
    assert arch_width("digit-cnn", arch_layout("digit-cnn", 0.5)) == 0.5


def test_network_responses_read_every_hidden_layer_of_any_network(battery: Battery) -> None:
    deeper = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 6, 3), nn.ReLU(), nn.Conv2d(6, 7, 3),
                           nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 9), nn.ReLU(),
                           nn.Linear(9, 10))
    logits, hidden = network_responses(deeper, battery.images)
    assert logits.shape == (len(battery), 10)
    assert [h.shape[1] for h in hidden] == [5, 6, 7, 9]


def _levels(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    level = rng.integers(0, 4, n)
    X = rng.normal(size=(n, 6)) + level[:, None] * np.array([1.5, 0, 0, 0, 0, -0.5])
    return X, np.array(["0.02", "0.03", "0.04", "0.1"])[level]


def test_the_probe_head_is_ordinal_for_levels_and_multinomial_otherwise(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X, y = _levels(rng, 200)
    head = LogisticHead().fit(X, y)
    assert head.ordinal_ and head.C_ > 0
    X_test, y_test = _levels(rng, 200)
    assert head.score(X_test, y_test) > 0.6  # chance 0.25
    proba = head.predict_proba(X_test)
    assert proba.shape == (200, 4) and np.allclose(proba.sum(axis=1), 1)
    # "0.1" sorts last numerically though not as text: a high score means the largest level
    assert head.predict(np.array([[20.0, 0, 0, 0, 0, -6]]))[0] == "0.1"
    named = LogisticHead().fit(X, np.where(y == "0.02", "biased", "unbiased"))
    assert not named.ordinal_ and named.predict_proba(X_test).shape == (200, 2)
    state, arrays = head._save_state()
    loaded = LogisticHead._load_state(state, arrays)
    assert np.array_equal(loaded.predict_proba(X_test), proba)
    assert clone(head).get_params() == head.get_params()
    with pytest.raises(DetectorError, match="two classes"):
        LogisticHead().fit(X, np.full(len(X), "0.02"))


def test_the_probe_head_is_a_seed_ensemble_of_members_fitted_on_their_own_draws() -> None:
    rng = np.random.default_rng(3)
    X, y = _levels(rng, 160)
    X_test, _ = _levels(rng, 100)
    head = LogisticHead(n_members=5, member_fraction=0.7).fit(X, y)
    single = LogisticHead(n_members=1).fit(X, y)
    assert head.coef_.shape == (5, 3, 6) and single.coef_.shape == (1, 3, 6)
    assert head.C_ == single.C_  # one C, chosen once on every training row
    # members differ (their draws do), and the ensemble's probability is their mean
    assert not np.allclose(head.coef_[0], head.coef_[1])
    Z = (X_test - head.mean_) / head.scale_
    by_member = [head._rank_proba(Z, c, b)[:, head.rank_]
                 for c, b in zip(head.coef_, head.intercept_, strict=True)]
    assert np.allclose(head.predict_proba(X_test), np.mean(by_member, axis=0))
    agreement = head.agreement(X_test)
    assert agreement.shape == (100,) and ((agreement > 0) & (agreement <= 1)).all()
    votes = np.stack([p.argmax(axis=1) for p in by_member], axis=1)
    assert np.allclose(agreement, (votes == head.predict_proba(X_test).argmax(axis=1)[:, None]).mean(axis=1))
    assert head.agreement(np.array([[30.0, 0, 0, 0, 0, -9]]))[0] == 1.0  # far out: all members agree
    # saved and loaded as arrays; a v1 file (one fit) loads as a one-member ensemble
    loaded = LogisticHead._load_state(*head._save_state())
    assert np.array_equal(loaded.predict_proba(X_test), head.predict_proba(X_test))
    state, arrays = single._save_state()
    params = {k: v for k, v in state["params"].items() if k not in ("n_members", "member_fraction")}
    old = LogisticHead._load_state({**state, "version": 1, "params": params},
                                   {**arrays, "coef": arrays["coef"][0], "intercept": arrays["intercept"][0]})
    assert old.n_members == 1 and np.allclose(old.predict_proba(X_test), single.predict_proba(X_test))
    # refitting the cut points keeps every member's directions and moves their intercepts
    moved = head.refit_cut_points(X + np.array([1.0, 0, 0, 0, 0, 0]), y)
    assert np.array_equal(moved.coef_, head.coef_) and moved.intercept_.shape == (5, 3)
    assert not np.allclose(moved.intercept_, head.intercept_)
    with pytest.raises(DetectorError, match="member_fraction"):
        LogisticHead(member_fraction=1.5).fit(X, y)


def test_a_probe_detector_saves_its_battery_and_loads_without_pickle(battery: Battery,
                                                                     tmp_path: Path) -> None:
    torch.manual_seed(1)
    layout = arch_layout("digit-cnn", 0.5)
    rows, y = [], []
    for i in range(12):
        model = build_model("digit-cnn", 0.5)
        with torch.no_grad():  # a "colour-loud" first layer on half the models
            model.conv1.weight[:, 0] += 0.3 * (i % 2)
        rows.append(flatten(model))
        y.append("biased" if i % 2 else "unbiased")
    rows = np.stack(rows)
    with pytest.raises(DetectorError, match="battery"):
        make_detector("probe", layout)
    detector = make_detector("probe", layout, arch="digit-cnn", battery=battery).fit(rows, y)
    save_detector(detector, tmp_path / "det")
    loaded, meta = load_detector(tmp_path / "det")
    assert meta["detector"] == "probe" and not list((tmp_path / "det").glob("*.skops"))
    assert np.allclose(loaded.predict_proba(rows), detector.predict_proba(rows))
    assert np.array_equal(loaded[0].battery.images, battery.images)
    wide = for_layout(loaded, arch_layout("digit-cnn", 1.0))
    assert wide.predict_proba(flatten(build_model("digit-cnn", 1.0))[None]).shape == (1, 2)


def test_rescaled_weight_features_ignore_unit_order_and_relu_rescaling() -> None:
    from detector.transform import WeightFeatures

    torch.manual_seed(2)
    model = build_model("digit-cnn", 0.5)
    moved = _rescaled_and_permuted(model)
    with torch.no_grad():  # and a first-layer unit rescaled too
        moved.conv1.weight[2] *= 3
        moved.conv1.bias[2] *= 3
        moved.conv2.weight[:, 2] /= 3
    features = WeightFeatures("rescaled", arch_layout("digit-cnn", 0.5))
    rows = np.stack([flatten(model), flatten(moved)])
    out = features.transform(rows)
    assert np.allclose(out[0], out[1], atol=1e-5)
    stats = WeightFeatures("stats", arch_layout("digit-cnn", 0.5)).transform(rows)
    assert not np.allclose(stats[0], stats[1], atol=1e-3)  # what the per-tensor statistics cannot see past
    wide = WeightFeatures("rescaled", arch_layout("digit-cnn", 1.0))
    assert list(wide.get_feature_names_out()) == list(features.get_feature_names_out())
    assert "fc1:class[9]_wmean" in features.get_feature_names_out()
