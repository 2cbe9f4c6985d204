"""Detector evaluation: labels and splits from a zoo, features read chunk by chunk, and scores.

Part of the detector stage (store → **detector** → report). Splits are always by model
(a model's weights are one sample). The split that matters is ``pool``: train on models of
one training pool and test on models of the other (IFBiD's open problem: an independent
reproduction fell to chance there); ``random`` is the in-pool split for comparison. A
per-regularizer breakdown shows whether a fairness regularizer hides bias from a detector.

Weights are read a chunk of models at a time. :func:`zoo_features` keeps only what a detector
learns from (its :class:`~detector.transform.WeightFeatures` output), so a detector that reads
weight statistics trains and scores on a zoo far larger than memory; one that reads raw
weights needs them all and is refused, by name and size, when they would not fit the memory
budget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, roc_auc_score
from tqdm.auto import tqdm

from detector.calibration import wilson_interval
from detector.models import DetectorError
from detector.names import SPLITS, TARGETS
from detector.transform import WeightFeatures
from modelzoo.zoo import CHUNK_MODELS, Zoo, open_zoo


def as_zoo(zoo: Zoo | str | Path) -> Zoo:
    """``zoo`` itself, or the zoo store at that path opened for reading."""
    return zoo if isinstance(zoo, Zoo) else open_zoo(zoo)


def labels(zoo: Zoo, target: str) -> np.ndarray:
    """Every model's label for ``target``, as strings (the classes a detector predicts).

    * ``bias_level``: σ² or ρ (MNIST tasks) or the favoured face group;
    * ``biased``: "biased" for models the task calls biased (the stronger half of the bias
      levels: the smaller σ², the larger ρ; a face model that favours a group), else "unbiased";
    * ``regularizer``: the fairness regularizer it was trained with ("none" for vanilla).
    """
    if target not in TARGETS:
        raise DetectorError(f"unknown target {target!r}; known: {list(TARGETS)}")
    if target == "regularizer":
        return zoo.column("config/regularizer").astype(str)
    level = zoo.column(f"config/{zoo.task.bias_level}")
    if target == "bias_level":
        return np.array([level_label(v) for v in level.tolist()])
    if len(np.unique(level)) < 2:
        raise DetectorError(f"target 'biased' needs two or more {zoo.task.bias_level} levels; "
                            f"the zoo has {np.unique(level).tolist()}")
    return np.where(zoo.task.biased(level), "biased", "unbiased")


def level_label(value: float | str) -> str:
    """A bias level as a detector's class: σ² or ρ in ``%g`` form ("0.02"), a face group as is."""
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def split_rows(zoo: Zoo, split: str, train_pool: str = "A", seed: int = 0,
               test_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) among the zoo's done models, split by model."""
    if split not in SPLITS:
        raise DetectorError(f"unknown split {split!r}; known: {list(SPLITS)}")
    done = np.flatnonzero(zoo.done)
    if split == "pool":
        pools = zoo.column("config/pool")[done]
        if train_pool not in pools or len(np.unique(pools)) < 2:
            raise DetectorError(f"a pool split needs models of pool {train_pool} and of another pool; "
                                f"the zoo has pools {sorted(set(pools.tolist()))}")
        return done[pools == train_pool], done[pools != train_pool]
    order = np.random.default_rng(seed).permutation(done)
    n_test = max(1, round(test_fraction * len(order)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def rows_at_levels(zoo: Zoo, rows: np.ndarray, levels: list[str] | None) -> np.ndarray:
    """The models of ``rows`` at bias levels ``levels`` (as :func:`labels` writes them); all if None."""
    if not levels:
        return rows
    values = labels(zoo, "bias_level")
    known = set(values[rows].tolist())
    missing = sorted(set(levels) - known)
    if missing:
        raise DetectorError(f"levels {missing} not in the zoo; it has {sorted(known)}")
    return rows[np.isin(values[rows], levels)]


def zoo_features(zoo: Zoo, rows: np.ndarray, features: WeightFeatures, progress: bool = False,
                 chunk_models: int = CHUNK_MODELS, memory_budget: float | None = None) -> np.ndarray:
    """``features`` of the done models ``rows`` (len(rows), F) float32, computed chunk by chunk.

    Only one chunk of weight rows (``chunk_models`` models) is in memory at a time; what is kept
    is the features: 160 numbers per digit-cnn for ``boosting``, 1,878 for ``deepsets``, but all
    49,562 weights for ``dense`` and ``layer_conv``, which read them raw. Before reading any
    weights, a :class:`DetectorError` refuses a call whose features plus one chunk of weights
    would exceed ``memory_budget`` bytes (default :func:`default_memory_budget`).
    """
    rows = zoo.checked_rows(rows)
    n_features = features.n_features_out()
    _check_budget(features.kind, len(rows), n_features, min(chunk_models, len(rows)) * zoo.n_params,
                  default_memory_budget() if memory_budget is None else memory_budget)
    out = np.empty((len(rows), n_features), dtype=np.float32)
    start = 0
    with tqdm(total=len(rows), unit="model", desc=f"{features.kind} features", disable=not progress) as bar:
        for chunk_rows, chunk in zoo.weight_chunks(rows, chunk_models):
            out[start : start + len(chunk_rows)] = features.transform(chunk)
            start += len(chunk_rows)
            bar.update(len(chunk_rows))
    return out


def default_memory_budget() -> float | None:
    """Half the machine's physical memory in bytes (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def _check_budget(kind: str, n_models: int, n_features: int, chunk_values: int, budget: float | None) -> None:
    need = 4 * (n_models * n_features + chunk_values)  # float32
    if budget is None or need <= budget:
        return
    advice = ("its features are the raw weights; use a detector that reads weight statistics "
              "(boosting, deepsets), fewer models (--levels, --pool)" if "raw" in kind.split("+")
              else "use fewer models (--levels, --pool)")
    raise DetectorError(f"{kind} features keep {n_features:,} numbers per model: {n_models:,} models need "
                        f"{_size(need)}, over the memory budget of {_size(budget)}; {advice}, or raise "
                        "--memory-budget-gb")


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Scores:
    """How a detector did on held-out models."""

    n_models: int
    accuracy: float
    balanced_accuracy: float
    auc: float
    classes: list[str]
    confusion: list[list[int]]  # rows: true class, columns: predicted class, in ``classes`` order
    bootstrap_ci: tuple[float, float] | None = None  # 95% percentile interval, models resampled

    @property
    def accuracy_ci(self) -> tuple[float, float] | None:
        """95% Wilson interval of the accuracy: on 8 models, 8 right is 68-100%, not "100%"."""
        if not self.n_models:
            return None
        correct = sum(self.confusion[i][i] for i in range(len(self.classes)))
        return wilson_interval(correct, self.n_models)

    def to_dict(self) -> dict[str, Any]:
        ci = self.accuracy_ci
        return {"n_models": self.n_models, "accuracy": round(self.accuracy, 4),
                "accuracy_ci": None if ci is None else [round(ci[0], 4), round(ci[1], 4)],
                "accuracy_bootstrap_ci": None if self.bootstrap_ci is None else
                [round(self.bootstrap_ci[0], 4), round(self.bootstrap_ci[1], 4)],
                "balanced_accuracy": round(self.balanced_accuracy, 4), "auc": round(self.auc, 4),
                "classes": self.classes, "confusion": self.confusion}


def scores(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> Scores:
    """Accuracy, balanced accuracy, AUC (one-vs-rest for more than two classes; NaN where a
    class is missing from ``y``), confusion, of probabilities ``proba`` (columns: ``classes``)."""
    y, classes = np.asarray(y).astype(str), np.asarray(classes).astype(str)
    unknown = sorted(set(y.tolist()) - set(classes.tolist()))
    if unknown:
        raise DetectorError(f"held-out labels {unknown} were never seen in training "
                            f"(the detector knows {classes.tolist()})")
    predicted = classes[proba.argmax(axis=1)] if len(y) else y
    auc = float("nan")
    if len(set(y.tolist())) > 1:
        if len(classes) == 2:
            auc = roc_auc_score(y == classes[1], proba[:, 1])
        elif len(set(y.tolist())) == len(classes):
            auc = roc_auc_score(y, proba, multi_class="ovr", labels=classes)
    if not len(y):
        empty = [[0] * len(classes) for _ in classes]
        return Scores(0, float("nan"), float("nan"), auc, classes.tolist(), empty)
    return Scores(len(y), float(accuracy_score(y, predicted)), float(balanced_accuracy_score(y, predicted)),
                  float(auc), classes.tolist(), confusion_matrix(y, predicted, labels=classes).tolist(),
                  bootstrap_interval(y == predicted))


def bootstrap_interval(correct: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the accuracy, resampling models (not checkpoints
    or features): the spread a detector's row would show on another draw of held-out models.
    Resampling n right-or-wrong models draws the number right from Binomial(n, accuracy), which
    is how it is drawn here, in constant memory at any zoo size."""
    n = len(correct)
    right = np.random.default_rng(seed).binomial(n, float(np.mean(correct)), resamples)
    low, high = np.quantile(right / n, (0.025, 0.975))
    return float(low), float(high)


def score_detector(detector: Any, X: np.ndarray, y: np.ndarray) -> Scores:
    """:func:`scores` of a fitted detector (or any classifier with ``classes_``) on X."""
    return scores(y, detector.predict_proba(X), detector.classes_)


def breakdown(y: np.ndarray, proba: np.ndarray, classes: np.ndarray, by: np.ndarray) -> dict[str, dict]:
    """Held-out scores per value of ``by`` (e.g. each regularizer): does one hide the bias?"""
    return {str(value): scores(y[by == value], proba[by == value], classes).to_dict()
            for value in np.unique(by)}
