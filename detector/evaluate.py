"""Detector evaluation: labels and splits from a zoo, and the scores that answer the open problem.

Part of the detector stage (store → **detector** → report). Splits are always by model
(a model's weights are one sample). The split that matters is ``pool``: train on models of
one training pool and test on models of the other (IFBiD's open problem: an independent
reproduction fell to chance there); ``random`` is the in-pool split for comparison. A
per-regularizer breakdown shows whether a fairness regularizer hides bias from a detector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, roc_auc_score
from tqdm.auto import tqdm

from detector.models import DetectorError, WeightDetector, WeightSet
from modelzoo.store import ZooStore

TARGETS = ("bias_level", "biased", "regularizer")
SPLITS = ("pool", "random")
CHUNK_MODELS = 512


def zoo_weights(store: ZooStore, rows: np.ndarray, progress: bool = False) -> WeightSet:
    """The weight rows ``rows`` of a zoo, read chunk by chunk, as a :class:`WeightSet`."""
    rows = np.asarray(rows, dtype=np.int64)
    weights = np.empty((len(rows), store.n_params), dtype=np.float32)
    array = store.group["weights"]
    starts = range(0, len(rows), CHUNK_MODELS)
    for start in tqdm(starts, desc="reading weights", unit="chunk", disable=not progress):
        chunk = rows[start : start + CHUNK_MODELS]
        weights[start : start + len(chunk)] = array.get_orthogonal_selection((chunk, slice(None)))
    return WeightSet(weights, tuple(store.layout), store.spec.arch, store.spec.width)


def labels(store: ZooStore, target: str) -> np.ndarray:
    """Every model's label for ``target``, as strings (the classes a detector predicts).

    * ``bias_level``: σ² or ρ (MNIST tasks) or the favoured face group;
    * ``biased``: "biased" for the stronger half of the bias levels (the smaller σ², the
      larger ρ) or a face model that favours a group; "unbiased" otherwise;
    * ``regularizer``: the fairness regularizer it was trained with ("none" for vanilla).
    """
    if target not in TARGETS:
        raise DetectorError(f"unknown target {target!r}; known: {list(TARGETS)}")
    spec = store.spec
    if target == "regularizer":
        return store.field("config/regularizer")
    level = store.field(f"config/{spec.bias_level}")
    if spec.task == "face_gender":
        return level if target == "bias_level" else np.where(level == "balanced", "unbiased", "biased")
    if target == "bias_level":
        return np.array([f"{v:g}" for v in level])
    values = np.unique(level)  # ascending: strong bias first for σ², last for ρ
    if len(values) < 2:
        raise DetectorError(f"target 'biased' needs two or more {spec.bias_level} levels; "
                            f"the zoo has {values}")
    half = len(values) // 2
    strong = values[:half] if spec.task == "colored_mnist" else values[len(values) - half:]
    return np.where(np.isin(level, strong), "biased", "unbiased")


def split_rows(store: ZooStore, split: str, train_pool: str = "A", seed: int = 0,
               test_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) among the zoo's done models, split by model."""
    if split not in SPLITS:
        raise DetectorError(f"unknown split {split!r}; known: {list(SPLITS)}")
    done = np.flatnonzero(store.done)
    if split == "pool":
        pools = store.field("config/pool")[done]
        if train_pool not in pools or len(np.unique(pools)) < 2:
            raise DetectorError(f"a pool split needs models of pool {train_pool} and of another pool; "
                                f"the zoo has pools {sorted(set(pools))}")
        return done[pools == train_pool], done[pools != train_pool]
    order = np.random.default_rng(seed).permutation(done)
    n_test = max(1, round(test_fraction * len(order)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


@dataclass(frozen=True)
class Scores:
    """How a detector did on held-out models."""

    n_models: int
    accuracy: float
    balanced_accuracy: float
    auc: float
    classes: list[str]
    confusion: list[list[int]]  # rows: true class, columns: predicted class, in ``classes`` order

    def to_dict(self) -> dict:
        return {"n_models": self.n_models, "accuracy": round(self.accuracy, 4),
                "balanced_accuracy": round(self.balanced_accuracy, 4), "auc": round(self.auc, 4),
                "classes": self.classes, "confusion": self.confusion}


def score_detector(detector: WeightDetector, X: WeightSet, y: np.ndarray) -> Scores:
    """Accuracy, balanced accuracy, AUC (one-vs-rest for more than two classes), confusion."""
    y = np.asarray(y).astype(str)
    unknown = sorted(set(y) - set(detector.classes_.astype(str)))
    if unknown:
        raise DetectorError(f"held-out labels {unknown} were never seen in training "
                            f"(the detector knows {detector.classes_.tolist()})")
    proba = detector.predict_proba(X)
    classes = detector.classes_.astype(str)
    predicted = classes[proba.argmax(axis=1)]
    auc = float("nan")
    if len(set(y)) > 1:
        if len(classes) == 2:
            auc = roc_auc_score(y == classes[1], proba[:, 1])
        elif len(set(y)) == len(classes):
            auc = roc_auc_score(y, proba, multi_class="ovr", labels=classes)
    return Scores(len(y), float(accuracy_score(y, predicted)), float(balanced_accuracy_score(y, predicted)),
                  float(auc), classes.tolist(), confusion_matrix(y, predicted, labels=classes).tolist())


def breakdown(detector: WeightDetector, X: WeightSet, y: np.ndarray, by: np.ndarray) -> dict[str, dict]:
    """Held-out scores per value of ``by`` (e.g. each regularizer): does one hide the bias?"""
    return {str(value): score_detector(detector, X.subset(by == value), y[by == value]).to_dict()
            for value in np.unique(by)}
