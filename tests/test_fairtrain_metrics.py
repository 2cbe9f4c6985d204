"""fairtrain.metrics: cross-checked against fairlearn, plus properties that a wrong metric would break."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fairlearn.metrics import MetricFrame
from fairlearn.metrics import demographic_parity_difference as fl_demographic_parity
from fairlearn.metrics import equal_opportunity_difference as fl_equal_opportunity
from fairlearn.metrics import equalized_odds_difference as fl_equalized_odds
from sklearn.metrics import accuracy_score

from fairtrain.metrics import (
    audc,
    centroid_recoverability,
    demographic_parity_difference,
    discrimination_accuracy_curve,
    equal_opportunity_difference,
    equalized_odds_difference,
    gpa,
    group_accuracy,
    knn_consistency,
    pca_energy,
    representation_leakage,
    zemel_discrimination,
)

SEEDS_AND_GROUPS = [(seed, n_groups) for seed in range(3) for n_groups in (2, 3, 5)]


def random_binary_case(seed: int, n_groups: int, n: int = 400):
    """Labels, predictions and groups with group-dependent rates, so the differences are not ~0."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, n)
    base = rng.uniform(0.2, 0.8, n_groups)[groups]
    y_true = (rng.random(n) < base).astype(int)
    flip = rng.uniform(0.05, 0.4, n_groups)[groups]
    y_pred = np.where(rng.random(n) < flip, 1 - y_true, y_true)
    return y_true, y_pred, groups


# --------------------------------------------------------------------------- agreement with fairlearn


@pytest.mark.parametrize(("seed", "n_groups"), SEEDS_AND_GROUPS)
def test_group_metrics_match_fairlearn(seed: int, n_groups: int):
    y_true, y_pred, groups = random_binary_case(seed, n_groups)
    assert demographic_parity_difference(y_pred, groups) == pytest.approx(
        fl_demographic_parity(y_true, y_pred, sensitive_features=groups), abs=1e-12)
    assert equal_opportunity_difference(y_true, y_pred, groups) == pytest.approx(
        fl_equal_opportunity(y_true, y_pred, sensitive_features=groups), abs=1e-12)
    assert equalized_odds_difference(y_true, y_pred, groups) == pytest.approx(
        fl_equalized_odds(y_true, y_pred, sensitive_features=groups), abs=1e-12)
    assert demographic_parity_difference(y_pred, groups) > 0.01  # the case is not trivially fair


@pytest.mark.parametrize(("seed", "n_groups"), SEEDS_AND_GROUPS)
def test_group_accuracy_matches_fairlearn_metricframe(seed: int, n_groups: int):
    rng = np.random.default_rng(100 + seed)
    groups = rng.choice(np.array(["a", "b", "c", "d", "e"][:n_groups]), 300)
    y_true = rng.integers(0, 4, 300)  # multiclass: accuracy needs no binary labels
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 4, 300))
    frame = MetricFrame(metrics=accuracy_score, y_true=y_true, y_pred=y_pred, sensitive_features=groups)
    result = group_accuracy(y_true, y_pred, groups)
    assert result["per_group"] == pytest.approx(frame.by_group.to_dict(), abs=1e-12)
    assert result["overall"] == pytest.approx(frame.overall, abs=1e-12)
    assert result["gap"] == pytest.approx(frame.difference(), abs=1e-12)
    assert result["std"] == pytest.approx(np.std(frame.by_group.to_numpy()), abs=1e-12)
    assert gpa(y_true, y_pred, groups) == pytest.approx(1 - frame.difference(), abs=1e-12)


def test_group_accuracy_keys_are_plain_python_values():
    result = group_accuracy([1, 0, 1, 1], [1, 1, 1, 0], np.array([3, 3, 7, 7]))
    assert result["per_group"] == {3: 0.5, 7: 0.5}
    assert all(type(key) is int for key in result["per_group"])
    assert result["gap"] == 0.0
    assert gpa([1, 0, 1, 1], [1, 0, 1, 0], [0, 0, 1, 1]) == 0.5


def test_accepts_torch_tensors():
    y_true, y_pred, groups = random_binary_case(0, 3)
    from_tensors = equalized_odds_difference(torch.from_numpy(y_true), torch.from_numpy(y_pred),
                                             torch.from_numpy(groups))
    assert from_tensors == equalized_odds_difference(y_true, y_pred, groups)


# --------------------------------------------------------------------------- Zemel's metrics


def test_zemel_discrimination_is_the_gap_between_group_means():
    scores = np.array([0.9, 0.7, 0.2, 0.4, 0.5, 0.5])
    assert zemel_discrimination(scores[:4], [0, 0, 1, 1]) == pytest.approx(0.5)  # |0.8 − 0.3|
    assert zemel_discrimination(scores, [0, 0, 1, 1, 2, 2]) == pytest.approx(0.5)  # max − min
    _, y_pred, groups = random_binary_case(1, 3)
    assert zemel_discrimination(y_pred, groups) == pytest.approx(
        demographic_parity_difference(y_pred, groups))


def test_knn_consistency_constant_predictor_is_one_and_random_is_lower():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    assert knn_consistency(X, np.ones(300), k=5) == 1.0
    assert knn_consistency(X, rng.integers(0, 2, 300), k=5) < 0.7  # ≈ 0.5 for a coin flip
    smooth = (X[:, 0] > 0).astype(int)  # similar inputs get the same answer
    assert knn_consistency(X, smooth, k=5) > 0.85


def test_knn_consistency_excludes_the_sample_itself_even_when_duplicated():
    # points 0 and 1 coincide; if i counted itself, k=1 would give each point its own prediction
    X = np.array([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [10.0, 1.0]])
    y_pred = np.array([0, 1, 1, 1])
    # neighbours: 0→1, 1→0, 2→3, 3→2: |0−1| + |1−0| + 0 + 0 over 4 samples
    assert knn_consistency(X, y_pred, k=1) == pytest.approx(0.5)
    # a lone point whose only neighbour differs: consistency must not be 1
    assert knn_consistency([[0.0], [5.0]], [0, 1], k=1) == 0.0


# --------------------------------------------------------------------------- AUDC


def test_discrimination_accuracy_curve_points_match_fairlearn_and_sklearn():
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 3, 200)
    y_true = (rng.random(200) < 0.3 + 0.2 * groups).astype(int)
    scores = np.round(0.5 * y_true + 0.1 * groups + rng.normal(0, 0.3, 200), 1)  # ties on purpose
    curve = discrimination_accuracy_curve(y_true, scores, groups)
    assert len(curve.thresholds) == len(np.unique(scores)) + 1
    for threshold, accuracy, discrimination in zip(curve.thresholds, curve.accuracy, curve.discrimination,
                                                   strict=True):
        y_pred = (scores >= threshold).astype(int)
        assert accuracy == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
        assert discrimination == pytest.approx(
            fl_demographic_parity(y_true, y_pred, sensitive_features=groups), abs=1e-12)


def test_audc_hand_computed():
    # a perfect classifier that is also fair: area 0
    assert audc([1, 0, 1, 0], [0.9, 0.2, 0.8, 0.1], [0, 0, 1, 1]) == 0.0
    # perfect only by favouring group 0: D(a) = 1 on (0.75, 1], 0.5 on (0.5, 0.75], 0 below
    assert audc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == pytest.approx(0.375)
    # useless constant score: accuracy never beats 0.5, so D = 1 above it
    assert audc([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)


def test_audc_prefers_a_score_that_ignores_the_group():
    rng = np.random.default_rng(7)
    groups = rng.integers(0, 2, 1000)
    y_true = rng.integers(0, 2, 1000)
    signal = y_true + rng.normal(0, 0.8, 1000)
    fair, biased = audc(y_true, signal, groups), audc(y_true, signal + 1.5 * groups, groups)
    # The group shift adds discrimination at every threshold it moves: about 0.1 more area
    # (0.27 against 0.37 here; 0.26-0.30 against 0.36-0.38 over seeds 0-4).
    assert biased > fair + 0.05, (fair, biased)


# --------------------------------------------------------------------------- representations


def test_leakage_near_chance_for_independent_features_and_near_one_when_s_is_encoded():
    rng = np.random.default_rng(0)
    s = rng.choice(3, 1200, p=[0.5, 0.3, 0.2])
    noise = rng.normal(size=(1200, 8))
    blind = representation_leakage(noise[:800], s[:800], noise[800:], s[800:])
    assert blind.chance == pytest.approx(np.mean(s[800:] == 0))
    assert abs(blind.accuracy - blind.chance) < 0.06
    encoded = noise.copy()
    encoded[:, 2] += 4.0 * s
    leaky = representation_leakage(encoded[:800], s[:800], encoded[800:], s[800:])
    assert leaky.accuracy > 0.95
    assert leaky.above_chance > 0.4


def test_centroid_recoverability_separated_vs_identical_groups():
    rng = np.random.default_rng(1)
    groups = np.repeat([0, 1, 2], 100)
    means = np.array([[0.0, 0.0, 0.0], [8.0, 0.0, 0.0], [0.0, 8.0, 0.0]])
    separated = centroid_recoverability(means[groups] + rng.normal(size=(300, 3)), groups)
    assert separated.adjusted_rand > 0.95
    assert separated.matching_accuracy > 0.98
    assert separated.centroid_distances.shape == (3, 3)
    np.testing.assert_allclose(separated.centroid_distances, separated.centroid_distances.T)
    np.testing.assert_allclose(np.diag(separated.centroid_distances), 0.0)
    assert separated.centroid_distances[1, 2] == pytest.approx(8 * np.sqrt(2), rel=0.05)

    mixed = centroid_recoverability(rng.normal(size=(300, 3)), groups)
    assert abs(mixed.adjusted_rand) < 0.05
    assert mixed.matching_accuracy < 0.5  # chance is 1/3, a little more from the best matching
    assert mixed.centroid_distances.max() < 0.5


def test_pca_energy_is_monotone_and_reaches_one():
    rng = np.random.default_rng(2)
    low_rank = rng.normal(size=(200, 2)) @ rng.normal(size=(2, 10))  # rank 2 in 10 dimensions
    energy = pca_energy(low_rank)
    assert energy.shape == (10,)
    assert np.all(np.diff(energy) >= 0)
    assert energy[-1] == pytest.approx(1.0)
    assert energy[1] == pytest.approx(1.0)  # two components carry everything
    spread = pca_energy(rng.normal(size=(500, 10)), n_components=3)
    assert spread.shape == (3,)
    assert 0.25 < spread[-1] < 0.45  # isotropic: about 3/10 of the variance


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("call", "message"), [
    (lambda: demographic_parity_difference([0, 1, 1], [0, 1]), "groups has 2 entries but y_pred has 3"),
    (lambda: demographic_parity_difference([], []), "y_pred is empty"),
    (lambda: demographic_parity_difference([0, 1, 1], [4, 4, 4]), "groups must hold at least two"),
    (lambda: demographic_parity_difference([0, 2, 1], [0, 1, 1]), r"y_pred must be binary.*2"),
    (lambda: equal_opportunity_difference([0.5, 1, 0], [0, 1, 1], [0, 1, 1]), "y_true must be binary"),
    (lambda: equal_opportunity_difference([0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 1, 2]),
     "y_true has no samples with label 1 in group"),
    (lambda: equalized_odds_difference([1, 1, 0, 1], [0, 1, 1, 1], [0, 0, 1, 1]),
     "y_true has no samples with label 0 in group"),
    (lambda: group_accuracy([1, 0], [1, 0, 1], [0, 1, 1]), "y_pred has 3 entries but y_true has 2"),
    (lambda: group_accuracy([[1, 0]], [[1, 0]], [0, 1]), "y_true must be 1-D"),
    (lambda: zemel_discrimination(["x", "y"], [0, 1]), "y_pred_or_scores must be numeric"),
    (lambda: audc([0, 1], [0.1, np.nan], [0, 1]), "scores contains NaN"),
    (lambda: knn_consistency(np.zeros((4, 2)), [0, 1, 1, 0], k=4), "k must be an integer in"),
    (lambda: knn_consistency(np.zeros(4), [0, 1, 1, 0]), "X must be 2-D"),
    (lambda: representation_leakage(np.zeros((4, 2)), [1, 1, 1, 1], np.zeros((2, 2)), [0, 1]),
     "s_train must hold at least two"),
    (lambda: representation_leakage(np.zeros((4, 2)), [0, 1, 0, 1], np.zeros((2, 3)), [0, 1]),
     "features_test has 3 features"),
    (lambda: centroid_recoverability(np.zeros((4, 2)), [0, 1, 0]), "groups has 3 entries but features"),
    (lambda: pca_energy(np.ones((5, 3))), "features has zero variance"),
    (lambda: pca_energy(np.eye(3), n_components=4), "n_components must be in"),
])
def test_bad_input_names_the_argument(call, message: str):
    with pytest.raises(ValueError, match=message):
        call()
