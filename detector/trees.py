"""Gradient-boosted trees as plain arrays: score one checkpoint without importing scikit-learn.

Part of the detector stage. A ``boosting`` detector's classifier is a scikit-learn
:class:`~sklearn.ensemble.HistGradientBoostingClassifier`, saved in skops format (see
:mod:`detector.files`). Loading it back imports scikit-learn and skops, which takes longer
than reading, recognising and judging a checkpoint put together (about 2-5 s on a
shared 2-core machine, against 3 s for ``import torch``). Yet what a fitted booster
computes is tiny: per tree, walk from the root, going left while ``x[feature] <= threshold``,
and add the leaf's value; the sum plus a baseline is a logit (two classes) or one logit per
class (softmax). :func:`export_trees` writes exactly those numbers (every tree's nodes, one
flat table) when the detector is saved; :class:`TreeEnsemble` reads them back with numpy only,
and gives the same probabilities as the scikit-learn object (``tests/test_scoring.py``
checks it to 1e-9).

Only numeric splits are exported (the detectors here never declare categorical features);
a booster with categorical splits is not exported and is scored through scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TREES_VERSION = 1
PREFIX = "trees."  # array names in the detector's arrays.safetensors


def export_trees(booster: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """(JSON-ready description, arrays) of a fitted HistGradientBoostingClassifier's trees, or
    None if it has categorical splits (then it is scored through scikit-learn)."""
    per_class = booster.n_trees_per_iteration_
    features, thresholds, left, right, leaf, value, missing_left, roots = [], [], [], [], [], [], [], []
    start = 0
    for iteration in booster._predictors:
        for predictor in iteration:
            nodes = predictor.nodes
            if nodes["is_categorical"].any():
                return None
            roots.append(start)
            features.append(nodes["feature_idx"].astype(np.int64))
            thresholds.append(nodes["num_threshold"].astype(np.float64))
            left.append(nodes["left"].astype(np.int64) + start)
            right.append(nodes["right"].astype(np.int64) + start)
            leaf.append(nodes["is_leaf"].astype(bool))
            value.append(nodes["value"].astype(np.float64))
            missing_left.append(nodes["missing_go_to_left"].astype(bool))
            start += len(nodes)
    arrays = {"feature": np.concatenate(features), "threshold": np.concatenate(thresholds),
              "left": np.concatenate(left), "right": np.concatenate(right), "is_leaf": np.concatenate(leaf),
              "value": np.concatenate(value), "missing_left": np.concatenate(missing_left),
              "roots": np.array(roots, dtype=np.int64),
              "baseline": np.asarray(booster._baseline_prediction, dtype=np.float64).reshape(-1)}
    arrays["is_leaf"] = arrays["is_leaf"].astype(np.uint8)  # safetensors has no bool in every reader
    arrays["missing_left"] = arrays["missing_left"].astype(np.uint8)
    state = {"version": TREES_VERSION, "per_iteration": int(per_class),
             "n_features": int(booster.n_features_in_),
             "classes": [c.item() if isinstance(c, np.generic) else c for c in booster.classes_]}
    return state, {f"{PREFIX}{key}": value for key, value in arrays.items()}


@dataclass(frozen=True)
class TreeEnsemble:
    """A fitted booster's trees as arrays; :meth:`predict_proba` is scikit-learn's, in numpy."""

    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    is_leaf: np.ndarray
    value: np.ndarray
    missing_left: np.ndarray
    roots: np.ndarray
    baseline: np.ndarray
    per_iteration: int
    n_features: int
    classes: tuple

    @classmethod
    def from_arrays(cls, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> TreeEnsemble:
        """The ensemble :func:`export_trees` wrote (``arrays`` keyed with :data:`PREFIX`)."""
        if state.get("version") != TREES_VERSION:
            raise ValueError(f"tree export v{state.get('version')}; this weightbias reads v{TREES_VERSION}")
        get = {key.removeprefix(PREFIX): value for key, value in arrays.items() if key.startswith(PREFIX)}
        return cls(get["feature"], get["threshold"], get["left"], get["right"], get["is_leaf"].astype(bool),
                   get["value"], get["missing_left"].astype(bool), get["roots"], get["baseline"],
                   int(state["per_iteration"]), int(state["n_features"]), tuple(state["classes"]))

    @property
    def classes_(self) -> np.ndarray:
        return np.array(self.classes)

    def raw(self, X: np.ndarray) -> np.ndarray:
        """Baseline plus the sum of leaf values: (rows, trees per iteration) logits."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"feature rows must have shape (rows, {self.n_features}), got {X.shape}")
        node = np.broadcast_to(self.roots, (len(X), len(self.roots))).copy()
        rows = np.arange(len(X))[:, None]
        while True:  # every row walks every tree at once, one level per pass
            inner = ~self.is_leaf[node]
            if not inner.any():
                break
            data = X[rows, self.feature[node]]
            go_left = np.where(np.isnan(data), self.missing_left[node], data <= self.threshold[node])
            node = np.where(inner, np.where(go_left, self.left[node], self.right[node]), node)
        leaves = self.value[node].reshape(len(X), -1, self.per_iteration)  # (rows, iterations, per_iter)
        return self.baseline + leaves.sum(axis=1)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes``."""
        raw = self.raw(X)
        if self.per_iteration == 1:  # two classes: a logit for the second
            positive = 1 / (1 + np.exp(-raw[:, 0]))
            return np.column_stack([1 - positive, positive])
        shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
