"""Fairness metrics: how fair a trained model's predictions and representations are.

Read at the end of the trainer stage of the flow (dataset → **trainer** + regularizer → store →
detector): given a model's predictions, scores or frozen bottleneck features on a labelled test
set, these plain functions return the numbers the store records and the reports compare.

Three families, all over numpy arrays (array-likes and CPU/GPU torch tensors are accepted):

- group fairness of predictions — per-group accuracy, demographic parity, equal opportunity and
  equalized odds (max − min over groups, as fairlearn defines them), Zemel's discrimination,
  GPA and AUDC;
- individual fairness — kNN consistency (Zemel et al. 2013);
- what a representation still knows about the sensitive attribute — a fresh probe's accuracy
  (leakage), K-means centroid recoverability and PCA energy (NDR, Tartaglione & Grangetto 2020).

Inputs are validated at the door: every error names the argument at fault.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment  # scipy ships with scikit-learn
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

# --------------------------------------------------------------------------- validation


def _as_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        array = np.asarray(x)
    except Exception as error:  # ragged lists and the like
        raise ValueError(f"{name} could not be read as an array: {error}") from error
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    return array


def _vector(x, name: str) -> np.ndarray:
    array = _as_array(x, name)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def _numeric(array: np.ndarray, name: str) -> np.ndarray:
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _matrix(x, name: str) -> np.ndarray:
    array = _as_array(x, name)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples × features), got shape {array.shape}")
    return _numeric(array, name)


def _binary(x, name: str) -> np.ndarray:
    array = _vector(x, name)
    values = np.unique(array)
    if not np.isin(values, [0, 1]).all():
        shown = ", ".join(map(str, values[:5])) + (", …" if len(values) > 5 else "")
        raise ValueError(f"{name} must be binary (0/1), found values [{shown}]")
    return array.astype(np.int64)


def _same_length(**arrays: np.ndarray) -> None:
    (first, reference), *rest = arrays.items()
    for name, array in rest:
        if len(array) != len(reference):
            raise ValueError(f"{name} has {len(array)} entries but {first} has {len(reference)}")


def _group_index(groups, name: str = "groups") -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct group labels, each sample's index into them); at least two groups."""
    labels, index = np.unique(_vector(groups, name), return_inverse=True)
    if len(labels) < 2:
        raise ValueError(f"{name} must hold at least two groups, found only {labels[0]!r}")
    return labels, index


def _per_group_mean(values: np.ndarray, index: np.ndarray, n_groups: int) -> np.ndarray:
    return np.bincount(index, weights=values, minlength=n_groups) / np.bincount(index, minlength=n_groups)


def _key(label) -> object:
    # np.int64(3) → 3, np.str_("a") → "a": dict keys that print and serialise cleanly
    return label.item() if isinstance(label, np.generic) else label


# --------------------------------------------------------------------------- group fairness


def group_accuracy(y_true, y_pred, groups) -> dict:
    """Accuracy within each group, and how unequal it is.

    Labels may be multiclass; accuracy is the fraction of exact matches.

    Returns
    -------
    dict
        ``per_group`` ({group: accuracy}), ``overall`` accuracy, ``gap`` (max − min of the
        per-group accuracies, fairlearn's ``accuracy_score_difference``) and ``std`` (population
        standard deviation, ddof=0, across groups: every group counts once, whatever its size).
    """
    y_true, y_pred = _vector(y_true, "y_true"), _vector(y_pred, "y_pred")
    labels, index = _group_index(groups)
    _same_length(y_true=y_true, y_pred=y_pred, groups=index)
    correct = (y_true == y_pred).astype(np.float64)
    per_group = _per_group_mean(correct, index, len(labels))
    return {
        "per_group": {_key(g): float(a) for g, a in zip(labels, per_group, strict=True)},
        "overall": float(correct.mean()),
        "gap": float(per_group.max() - per_group.min()),
        "std": float(per_group.std()),
    }


def demographic_parity_difference(y_pred, groups) -> float:
    """max − min over groups of the selection rate P(ŷ = 1 | group); binary predictions."""
    y_pred = _binary(y_pred, "y_pred")
    labels, index = _group_index(groups)
    _same_length(y_pred=y_pred, groups=index)
    rates = _per_group_mean(y_pred.astype(np.float64), index, len(labels))
    return float(rates.max() - rates.min())


def _conditional_rate_difference(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray,
                                 index: np.ndarray, condition: int, rate_name: str) -> float:
    """max − min over groups of P(ŷ = 1 | y = condition, group)."""
    mask = y_true == condition
    counts = np.bincount(index[mask], minlength=len(labels))
    if (counts == 0).any():
        # fairlearn silently scores such a group 0; an undefined rate should stop the caller instead
        missing = ", ".join(repr(_key(g)) for g in labels[counts == 0])
        raise ValueError(f"y_true has no samples with label {condition} in group(s) {missing}: "
                         f"the {rate_name} is undefined there")
    rates = np.bincount(index[mask], weights=y_pred[mask], minlength=len(labels)) / counts
    return float(rates.max() - rates.min())


def _binary_triplet(y_true, y_pred, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    y_true, y_pred = _binary(y_true, "y_true"), _binary(y_pred, "y_pred")
    labels, index = _group_index(groups)
    _same_length(y_true=y_true, y_pred=y_pred, groups=index)
    return y_true, y_pred.astype(np.float64), labels, index


def equal_opportunity_difference(y_true, y_pred, groups) -> float:
    """max − min over groups of the true positive rate P(ŷ = 1 | y = 1, group); binary labels.

    Raises ValueError when a group has no positive samples (its TPR is undefined).
    """
    y_true, y_pred, labels, index = _binary_triplet(y_true, y_pred, groups)
    return _conditional_rate_difference(y_true, y_pred, labels, index, 1, "true positive rate")


def equalized_odds_difference(y_true, y_pred, groups) -> float:
    """The larger of the TPR difference and the FPR difference (fairlearn's ``worst_case``).

    Raises ValueError when a group lacks positive or negative samples.
    """
    y_true, y_pred, labels, index = _binary_triplet(y_true, y_pred, groups)
    return max(_conditional_rate_difference(y_true, y_pred, labels, index, 1, "true positive rate"),
               _conditional_rate_difference(y_true, y_pred, labels, index, 0, "false positive rate"))


def zemel_discrimination(y_pred_or_scores, groups) -> float:
    """Zemel et al. (2013)'s discrimination: the gap between groups' mean prediction.

    For a binary sensitive attribute it is |mean ŷ over group a − mean ŷ over group b|, exactly as
    published. For more than two groups we take max − min of the group means (the largest pairwise
    gap), which reduces to the published formula for two. Predictions may be hard labels (then
    it equals :func:`demographic_parity_difference`) or scores/probabilities.
    """
    values = _numeric(_vector(y_pred_or_scores, "y_pred_or_scores"), "y_pred_or_scores")
    labels, index = _group_index(groups)
    _same_length(y_pred_or_scores=values, groups=index)
    means = _per_group_mean(values, index, len(labels))
    return float(means.max() - means.min())


def gpa(y_true, y_pred, groups) -> float:
    """Group accuracy parity: 1 − (max − min) of the per-group accuracies, in [0, 1].

    Our definition (Cerrato et al. name the metric but we could not pin down their formula):
    1 means every group is served equally well, 0 that one group is always right and another
    always wrong. We chose the parity form over e.g. the geometric mean of group accuracies so the
    number measures *parity only* — overall accuracy is reported separately — and so it can be
    checked against fairlearn (``1 − accuracy_score_difference``).
    """
    return 1.0 - group_accuracy(y_true, y_pred, groups)["gap"]


@dataclass(frozen=True)
class DiscriminationAccuracyCurve:
    """One point per decision threshold: predict 1 when score ≥ threshold (∞ = predict all 0)."""

    thresholds: np.ndarray
    accuracy: np.ndarray
    discrimination: np.ndarray


def discrimination_accuracy_curve(y_true, scores, groups) -> DiscriminationAccuracyCurve:
    """Accuracy and Zemel discrimination of ``score ≥ t`` for every distinct threshold t.

    Thresholds run from +∞ (all negative) down to the smallest score (all positive), so both
    constant classifiers — accuracy = a class rate, discrimination = 0 — are on the curve.
    """
    y_true = _binary(y_true, "y_true")
    scores = _numeric(_vector(scores, "scores"), "scores")
    labels, index = _group_index(groups)
    _same_length(y_true=y_true, scores=scores, groups=index)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    # k = how many top-scored samples are predicted positive; only run ends of tied scores count
    run_ends = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True]) + 1
    k = np.r_[0, run_ends]
    true_pos = np.r_[0, np.cumsum(y_true[order])][k]
    n, n_neg = len(y_true), int((y_true == 0).sum())
    accuracy = (true_pos + n_neg - (k - true_pos)) / n
    one_hot = index[order][:, None] == np.arange(len(labels))
    selected = np.vstack([np.zeros(len(labels)), np.cumsum(one_hot, axis=0)])[k]
    rates = selected / np.bincount(index, minlength=len(labels))
    return DiscriminationAccuracyCurve(thresholds=np.r_[np.inf, sorted_scores[run_ends - 1]],
                                       accuracy=accuracy, discrimination=rates.max(1) - rates.min(1))


def audc(y_true, scores, groups) -> float:
    """Area under the discrimination–accuracy curve, in [0, 1]; lower is better.

    Our definition (Cerrato et al. report an AUDC; we could not pin down their exact formula).
    Sweep the decision threshold over the scores (:func:`discrimination_accuracy_curve`); for
    every accuracy level a in [0, 1] take D(a), the smallest discrimination among thresholds
    whose accuracy is at least a — the accuracy/fairness Pareto front — and integrate D over a.
    Accuracy levels no threshold reaches count as discrimination 1, the worst possible, so a
    model cannot lower its AUDC by being less accurate. D is a step function, integrated exactly
    (no trapezoid: the points between two thresholds are not reachable by any one classifier).

    Why this form: a single accuracy/discrimination pair depends on an arbitrary threshold; the
    area summarises the whole trade-off a score offers. It is 0 only when one threshold is both
    perfectly accurate and perfectly fair, and grows with both error and discrimination.
    """
    curve = discrimination_accuracy_curve(y_true, scores, groups)
    order = np.argsort(-curve.accuracy, kind="stable")
    accuracy = curve.accuracy[order]
    front = np.minimum.accumulate(curve.discrimination[order])
    widths = accuracy - np.r_[accuracy[1:], 0.0]
    return float((1.0 - accuracy[0]) + np.sum(front * widths))


# --------------------------------------------------------------------------- individual fairness


def knn_consistency(X, y_pred, k: int = 5) -> float:
    """Zemel et al. (2013)'s consistency: 1 − mean_i |ŷ_i − mean of ŷ over i's k nearest neighbours|.

    Neighbours are Euclidean in ``X`` and never include sample i itself, even when another
    sample sits at the same point (DESIGN §5); a duplicate of i is a genuine neighbour. 1 means
    similar inputs always get similar predictions. ``y_pred`` may be labels in {0, 1} or scores.
    """
    X = _matrix(X, "X")
    y_pred = _numeric(_vector(y_pred, "y_pred"), "y_pred")
    _same_length(X=X, y_pred=y_pred)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k < len(X):
        raise ValueError(f"k must be an integer in [1, {len(X) - 1}] for {len(X)} samples, got {k!r}")
    # kneighbors() without a query excludes each sample by index, not by distance
    neighbours = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(return_distance=False)
    return float(1.0 - np.abs(y_pred - y_pred[neighbours].mean(axis=1)).mean())


# --------------------------------------------------------------------------- representations


@dataclass(frozen=True)
class Leakage:
    """Probe accuracy on the sensitive attribute, and what a probe that learned nothing scores."""

    accuracy: float
    chance: float

    @property
    def above_chance(self) -> float:
        return self.accuracy - self.chance


def representation_leakage(features_train, s_train, features_test, s_test, max_iter: int = 1000) -> Leakage:
    """How well a fresh linear probe recovers the sensitive attribute from frozen features.

    A new logistic regression (on standardized features) is fitted on the training split and
    scored on the test split. ``chance`` is the test accuracy of always answering the training
    split's majority class (scikit-learn's ``DummyClassifier``): the floor a probe reaches
    from class priors alone, so ``accuracy − chance`` is what the features give away.
    """
    features_train = _matrix(features_train, "features_train")
    features_test = _matrix(features_test, "features_test")
    s_train, s_test = _vector(s_train, "s_train"), _vector(s_test, "s_test")
    _same_length(features_train=features_train, s_train=s_train)
    _same_length(features_test=features_test, s_test=s_test)
    if features_train.shape[1] != features_test.shape[1]:
        raise ValueError(f"features_test has {features_test.shape[1]} features but features_train has "
                         f"{features_train.shape[1]}")
    if len(np.unique(s_train)) < 2:
        raise ValueError("s_train must hold at least two sensitive classes to train a probe")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    accuracy = probe.fit(features_train, s_train).score(features_test, s_test)
    majority = DummyClassifier(strategy="most_frequent").fit(features_train, s_train)
    chance = majority.score(features_test, s_test)
    return Leakage(accuracy=float(accuracy), chance=float(chance))


@dataclass(frozen=True)
class Recoverability:
    """Whether unsupervised clustering of the features rediscovers the sensitive groups."""

    groups: np.ndarray  # the row/column order of centroid_distances
    centroid_distances: np.ndarray  # Euclidean distances between the true groups' mean features
    adjusted_rand: float  # K-means clusters vs true groups; 0 = chance, 1 = identical partitions
    matching_accuracy: float  # fraction of samples in the right group under the best cluster→group map


def _best_matching_total(counts: np.ndarray) -> float:
    """Largest sum of a square matrix over one-to-one row→column assignments."""
    rows, columns = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, columns].sum())


def centroid_recoverability(features, groups, seed: int = 0) -> Recoverability:
    """K-means with K = number of groups on the features, compared with the true groups (NDR).

    Tartaglione & Grangetto (2020) show a debiased bottleneck no longer clusters by the bias
    attribute. We report the distances between true group centroids (how far apart the groups
    sit) and two agreement scores between K-means clusters and groups: the adjusted Rand index
    (chance-corrected, ≈ 0 when features carry no group structure) and the best-matching
    accuracy (clusters mapped one-to-one onto groups to maximise agreement; its chance level is
    roughly the largest group's share, a little more from the maximisation).
    """
    features = _matrix(features, "features")
    labels, index = _group_index(groups)
    _same_length(features=features, groups=index)
    n_groups = len(labels)
    if len(features) < n_groups:
        raise ValueError(f"features has {len(features)} samples, fewer than the {n_groups} groups")
    centroids = np.stack([features[index == g].mean(axis=0) for g in range(n_groups)])
    distances = np.linalg.norm(centroids[:, None, :] - centroids[None, :, :], axis=-1)
    clusters = KMeans(n_clusters=n_groups, n_init=10, random_state=seed).fit_predict(features)
    counts = np.zeros((n_groups, n_groups), dtype=np.int64)
    np.add.at(counts, (clusters, index), 1)
    return Recoverability(groups=labels, centroid_distances=distances,
                          adjusted_rand=float(adjusted_rand_score(index, clusters)),
                          matching_accuracy=_best_matching_total(counts) / len(features))


def pca_energy(features, n_components: int | None = None) -> np.ndarray:
    """Cumulative fraction of variance explained by the top principal components.

    Entry i is the share of total variance in the first i + 1 components: non-decreasing, and
    ending at 1 when ``n_components`` is None (all min(samples, features) components). The NDR
    paper reads it to see whether information is spread over many directions or compressed into
    a few.
    """
    features = _matrix(features, "features")
    limit = min(features.shape)
    if n_components is not None and (isinstance(n_components, bool) or not 1 <= n_components <= limit):
        raise ValueError(f"n_components must be in [1, {limit}] for features of shape {features.shape}, "
                         f"got {n_components!r}")
    if not (features.var(axis=0) > 0).any():
        raise ValueError("features has zero variance: every sample is the same point")
    ratios = PCA(n_components=n_components or limit).fit(features).explained_variance_ratio_
    return np.minimum(np.cumsum(ratios), 1.0)  # rounding can overshoot 1 by an ulp
