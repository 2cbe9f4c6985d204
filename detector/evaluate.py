"""Detector evaluation: labels and splits from a zoo, and the scores that answer the open problem.

Part of the detector stage (store → **detector** → report). Splits are always by model
(a model's weights are one sample). The split that matters is ``pool``: train on models of
one training pool and test on models of the other (IFBiD's open problem: an independent
reproduction fell to chance there); ``random`` is the in-pool split for comparison. A
per-regularizer breakdown shows whether a fairness regularizer hides bias from a detector.

Weights are read a chunk of models at a time. :func:`zoo_features` keeps only what a detector
learns from, so a detector that reads weight statistics trains and scores on a zoo far larger
than memory; one that reads raw weights needs them all and is refused, by name and size, when
they would not fit the memory budget.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, roc_auc_score
from tqdm.auto import tqdm

from detector.models import DetectorError, FeatureSet, WeightDetector, WeightSet
from modelzoo.store import ZooStore

TARGETS = ("bias_level", "biased", "regularizer")
SPLITS = ("pool", "random")
CHUNK_MODELS = 512


def zoo_weights(store: ZooStore, rows: np.ndarray, progress: bool = False) -> WeightSet:
    """The weight rows ``rows`` of a zoo, read chunk by chunk, as a :class:`WeightSet`.

    All of them end up in memory; :func:`zoo_features` keeps only a detector's features."""
    rows = _checked_rows(store, rows)
    weights = np.empty((len(rows), store.n_params), dtype=np.float32)
    with tqdm(total=len(rows), unit="model", desc="reading weights", disable=not progress) as bar:
        for start, chunk in _read_chunks(store, rows, CHUNK_MODELS):
            weights[start : start + len(chunk)] = chunk.weights
            bar.update(len(chunk))
    return WeightSet(weights, tuple(store.layout), store.spec.arch, store.spec.width)


def weight_chunks(store: ZooStore, rows: np.ndarray, chunk_models: int = CHUNK_MODELS) -> Iterator[WeightSet]:
    """The weight rows ``rows`` of a zoo (done models), in order, as WeightSets of at most
    ``chunk_models`` models; each is read from the store only when the one before is consumed."""
    for _, chunk in _read_chunks(store, _checked_rows(store, rows), chunk_models):
        yield chunk


def _read_chunks(store: ZooStore, rows: np.ndarray, chunk_models: int) -> Iterator[tuple[int, WeightSet]]:
    """(position in ``rows``, WeightSet) for checked ``rows``, ``chunk_models`` at a time."""
    if chunk_models < 1:
        raise DetectorError(f"chunk_models must be at least 1, got {chunk_models}")
    array, slots = store.group["weights"], tuple(store.layout)
    for start in range(0, len(rows), chunk_models):
        chunk = rows[start : start + chunk_models]
        yield start, WeightSet(array.get_orthogonal_selection((chunk, slice(None))), slots, store.spec.arch,
                               store.spec.width)


def zoo_features(store: ZooStore, rows: np.ndarray, detector: WeightDetector, progress: bool = False,
                 chunk_models: int = CHUNK_MODELS, memory_budget: float | None = None) -> FeatureSet:
    """``detector``'s feature rows of the zoo models ``rows``, computed chunk by chunk.

    Only one chunk of weight rows (``chunk_models`` models) is in memory at a time; what is kept
    is the features: 160 numbers per digit-cnn for ``boosting``, 1,878 for ``deepsets``, but all
    49,562 weights for ``dense`` and ``layer_conv``, which read them raw. Before reading any
    weights, a :class:`DetectorError` refuses a call whose features plus one chunk of weights
    would exceed ``memory_budget`` bytes (default :func:`default_memory_budget`).
    """
    rows = _checked_rows(store, rows)
    slots = tuple(store.layout)
    zero = WeightSet(np.zeros((1, store.n_params), np.float32), slots, store.spec.arch, store.spec.width)
    n_features = detector.features(zero).shape[1]
    _check_budget(detector, len(rows), n_features, min(chunk_models, len(rows)) * store.n_params,
                  default_memory_budget() if memory_budget is None else memory_budget)
    features = np.empty((len(rows), n_features), dtype=np.float32)
    with tqdm(total=len(rows), unit="model", desc=f"{detector.name} features", disable=not progress) as bar:
        for start, chunk in _read_chunks(store, rows, chunk_models):
            features[start : start + len(chunk)] = detector.features(chunk)
            bar.update(len(chunk))
    return FeatureSet(features, detector.feature_kind, slots, store.spec.arch, store.spec.width)


def default_memory_budget() -> float | None:
    """Half the machine's physical memory in bytes (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def _check_budget(detector: WeightDetector, n_models: int, n_features: int, chunk_values: int,
                  budget: float | None) -> None:
    need = 4 * (n_models * n_features + chunk_values)  # float32
    if budget is None or need <= budget:
        return
    advice = ("its features are the raw weights; use a detector that reads weight statistics "
              "(boosting, deepsets), fewer models (--levels, --pool)" if detector.feature_kind == "raw"
              else "use fewer models (--levels, --pool)")
    raise DetectorError(f"the {detector.name} detector keeps {n_features:,} numbers per model: {n_models:,} "
                        f"models need {_size(need)}, over the memory budget of {_size(budget)}; {advice}, "
                        "or raise --memory-budget-gb")


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def _checked_rows(store: ZooStore, rows: np.ndarray) -> np.ndarray:
    """``rows`` as int64 model indices, refused by name if outside the zoo or not done."""
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise DetectorError(f"rows must be a 1-D array of model indices, got shape {rows.shape} "
                            f"dtype {rows.dtype}")
    rows = rows.astype(np.int64, copy=False)  # an empty list arrives as float
    done = store.done
    outside = rows[(rows < 0) | (rows >= len(done))]
    if outside.size:
        raise DetectorError(f"models {outside[:10].tolist()} lie outside the zoo's {len(done)} models")
    not_done = np.unique(rows[~done[rows]])
    if not_done.size:
        raise DetectorError(f"models {not_done[:10].tolist()} of {store.path} are not done (no weights "
                            "yet); finish generating the zoo first")
    return rows


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


def score_detector(detector: WeightDetector, X: WeightSet | FeatureSet, y: np.ndarray) -> Scores:
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


def breakdown(detector: WeightDetector, X: WeightSet | FeatureSet, y: np.ndarray,
              by: np.ndarray) -> dict[str, dict]:
    """Held-out scores per value of ``by`` (e.g. each regularizer): does one hide the bias?"""
    return {str(value): score_detector(detector, X.subset(by == value), y[by == value]).to_dict()
            for value in np.unique(by)}
