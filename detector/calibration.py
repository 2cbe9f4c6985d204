"""How sure a verdict is: calibrated probabilities and honest held-out accuracy.

Part of the detector stage (store → **detector** → report). A detector fitted on a few dozen
models says p(biased) = 1.00 about almost anything: boosting with hundreds of trees, or a
network trained to zero loss, is sure of its training set and so of everything near it. Two
remedies, both computed at training time and saved in ``detector.json`` as plain numbers:

* **Temperature scaling** (Guo et al. 2017): the probabilities ``p`` become ``p^(1/T)``,
  renormalised. One number ``T``, fitted by minimum log-loss on *out-of-fold* predictions
  of the training split (each training model scored by a clone of the pipeline that did not
  see it: :func:`out_of_fold_proba`), never on the held-out models, which stay an honest test.
  The targets are Laplace-smoothed (:func:`fit_temperature`), so a spotless record on a few
  models never sharpens a detector into certainty. The temperature keeps the predicted class
  (the order of the probabilities does not change), so a calibrated detector gives the same
  verdicts with truthful confidence. For two classes it is
  Platt scaling without an intercept: an intercept would move the threshold, which a split of
  12 models cannot support.
* **Wilson intervals** (:func:`wilson_interval`): "100% held-out accuracy" on 8 models is a
  95% interval of 68-100%; the interval says so, the bare rate does not.

Everything here but :func:`out_of_fold_proba` is numpy, so applying a calibration while
scoring imports nothing new.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_P_FLOOR = 1e-7  # probabilities are clipped here before taking logs: log(0) is no evidence
_LOG10_T = np.linspace(-1.0, 2.0, 601)  # temperatures 0.1 .. 100 searched, 0.005 decades apart
ECE_BINS = 10
MIN_FOLDS = 2


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a rate ``successes / n`` (95% for z = 1.96); (0, 1) for n = 0.

    >>> [round(bound, 3) for bound in wilson_interval(8, 8)]  # "100%" on 8 held-out models
    [0.676, 1.0]
    """
    if n <= 0:
        return 0.0, 1.0
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``proba`` (rows, classes) tempered: each row ∝ p^(1/T)."""
    logs = np.log(np.clip(np.asarray(proba, dtype=np.float64), _P_FLOOR, 1.0)) / temperature
    logs -= logs.max(axis=1, keepdims=True)
    tempered = np.exp(logs)
    return tempered / tempered.sum(axis=1, keepdims=True)


def log_loss(proba: np.ndarray, y_index: np.ndarray) -> float:
    """Mean negative log-probability of the true classes."""
    picked = np.asarray(proba)[np.arange(len(y_index)), y_index]
    return float(-np.log(np.clip(picked, _P_FLOOR, 1.0)).mean())


def fit_temperature(proba: np.ndarray, y_index: np.ndarray) -> float:
    """The temperature of least log-loss on (out-of-fold) probabilities ``proba`` with true
    class indices ``y_index``, against Laplace-smoothed targets; a grid search, so the result
    is deterministic and bounded.

    Why smoothed: a detector right on all 8 of its out-of-fold models would otherwise be told
    to grow ever surer (the log-loss of n right answers falls to 0 as T → 0), which 8 models
    cannot justify. The smoothed target gives the true class (s + 1) / (n + 2) where s = n,
    Laplace's rule of succession, so a perfect record on n models earns confidence near
    (n + 1) / (n + 2), no more.
    """
    proba = np.asarray(proba, dtype=np.float64)
    n, k = proba.shape
    epsilon = min(1.0, k / ((k - 1) * (n + 2)))
    targets = np.full((n, k), epsilon / k)
    targets[np.arange(n), y_index] += 1 - epsilon
    logs = [np.log(np.clip(apply_temperature(proba, 10.0**t), _P_FLOOR, 1.0)) for t in _LOG10_T]
    losses = [-(targets * log).sum(axis=1).mean() for log in logs]
    return float(10.0 ** _LOG10_T[int(np.argmin(losses))])


def expected_calibration_error(proba: np.ndarray, y_index: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: over ``bins`` equal-width bins of the top probability, the models-weighted mean gap
    between the bin's confidence and its accuracy."""
    proba = np.asarray(proba)
    if not len(proba):
        return float("nan")
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_index
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    gap = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            gap += inside.sum() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(gap / len(proba))


def out_of_fold_proba(steps: Any, features: np.ndarray, y: np.ndarray, folds: int = 5,
                      seed: int = 0) -> tuple[np.ndarray, int] | tuple[None, int]:
    """Every training model's probabilities from a clone of ``steps`` (the pipeline after its
    feature step) fitted on the other folds: (oof proba, folds used).

    Folds are stratified and seeded; their number is at most the smallest class's count (each
    fold's fit must see every class). (None, 0) when a class has fewer than two models.
    """
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold

    classes, counts = np.unique(y, return_counts=True)
    folds = int(min(folds, counts.min()))
    if folds < MIN_FOLDS or len(classes) < 2:
        return None, 0
    oof = np.zeros((len(y), len(classes)))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, y):
        fitted = clone(steps).fit(features[train], y[train])
        oof[test] = fitted.predict_proba(features[test])
    return oof, folds


def calibrate(steps: Any, features: np.ndarray, y: np.ndarray, classes: np.ndarray, heldout_proba: np.ndarray,
              heldout_y: np.ndarray, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """The ``calibration`` entry of a detector: a temperature fitted on the training split's
    out-of-fold probabilities, and the held-out ECE and log-loss before and after it."""
    classes = np.asarray(classes).astype(str)
    index = {c: i for i, c in enumerate(classes)}
    oof, used = out_of_fold_proba(steps, features, np.asarray(y).astype(str), folds, seed)
    heldout_index = np.array([index[c] for c in np.asarray(heldout_y).astype(str)], dtype=int)
    entry: dict[str, Any] = {"method": "temperature", "fitted_on": f"out-of-fold predictions of the "
                             f"{len(y)} training models ({used}-fold, stratified, seed {seed})",
                             "folds": used}
    if oof is None:
        entry |= {"method": "none", "temperature": 1.0,
                  "fitted_on": "nothing: a class has fewer than 2 training models"}
        temperature = 1.0
    else:
        temperature = round(fit_temperature(oof, np.array([index[c] for c in np.asarray(y).astype(str)])), 4)
        entry["temperature"] = temperature
    calibrated = apply_temperature(heldout_proba, temperature)
    entry["heldout"] = {
        "n_models": len(heldout_index),
        "ece_before": _round(expected_calibration_error(heldout_proba, heldout_index)),
        "ece_after": _round(expected_calibration_error(calibrated, heldout_index)),
        "log_loss_before": _round(log_loss(heldout_proba, heldout_index)) if len(heldout_index) else None,
        "log_loss_after": _round(log_loss(calibrated, heldout_index)) if len(heldout_index) else None}
    return entry


def _round(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 4)
