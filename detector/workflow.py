"""Train and evaluate detectors on zoos: the work behind ``weightbias detector train|evaluate``.

Part of the detector stage (store → **detector** → report). The command line only parses,
calls :func:`train_detector` or :func:`evaluate_detector` and prints what they return; a
notebook calls the same functions.

A zoo may be larger than memory, so a detector pipeline is never fitted on the whole weight
matrix: its feature step (stateless, :class:`~detector.transform.WeightFeatures`) runs chunk
by chunk (:func:`~detector.evaluate.zoo_features`) and the steps after it are fitted on the
feature array (:func:`fit_on_zoo`), which gives the same fitted pipeline as ``fit`` on all
weight rows at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from detector.applicability import REFERENCE_KIND, Reference
from detector.calibration import calibrate
from detector.evaluate import as_zoo, breakdown, labels, rows_at_levels, scores, split_rows, zoo_features
from detector.files import check_detector_folder, load_detector, save_detector
from detector.models import PROBE_KIND, DetectorError, detector_name, for_layout, make_detector, runs_networks
from detector.transform import WeightFeatures
from modelzoo.zoo import Zoo


def fit_on_zoo(detector: Pipeline, zoo: Zoo, rows: np.ndarray, y: np.ndarray, *,
               memory_budget: float | None = None, progress: bool = False,
               features: np.ndarray | None = None) -> Pipeline:
    """Fit ``detector`` on the zoo's models ``rows`` with labels ``y``, a chunk of weights at a time.

    Returns ``detector``, fitted: its feature step on one model's weights (it learns nothing,
    so one model or all give the same step), the steps after it on the features of all rows
    (``features``, when the caller has computed them already).
    """
    rows = zoo.checked_rows(rows)
    if features is None:
        features = zoo_features(zoo, rows, detector[0], progress, memory_budget=memory_budget)
    detector[0].fit(zoo.weights(rows[:1]))
    detector[1:].fit(features, y)  # a slice shares its steps with the pipeline: fits them in place
    return detector


def zoo_proba(detector: Pipeline, zoo: Zoo, rows: np.ndarray, *, memory_budget: float | None = None,
              progress: bool = False) -> np.ndarray:
    """``detector``'s class probabilities of the zoo's models ``rows``, a chunk of weights at a
    time; a width-independent detector reads a zoo of another width (:func:`for_layout`)."""
    detector = for_layout(detector, zoo.layout)
    features = zoo_features(zoo, rows, detector[0], progress, memory_budget=memory_budget)
    return detector[1:].predict_proba(features)


def probe_context(detector: str, zoo: Zoo, data_dir: str | Path | None) -> dict[str, Any]:
    """What :func:`make_detector` needs beyond the layout: for the ``probe`` detector, the
    zoo's architecture and the probe battery of its task."""
    if not runs_networks(detector):
        return {}
    from detector.battery import battery_for_zoo

    return {"arch": zoo.arch, "battery": battery_for_zoo(zoo, data_dir)}


def default_detector(task: str) -> str:
    """The detector :func:`train_detector` uses when none is named: ``probe`` where a probe
    battery exists (the digit and face tasks; it ranked best across pools, recipes and widths
    on digits and on which group a face model favours, see docs/detectors.md), ``boosting``
    otherwise."""
    from detector.battery import DIGIT_TASKS, FACE_TASK

    return "probe" if task in (*DIGIT_TASKS, FACE_TASK) else "boosting"


def train_detector(zoo_or_path: Zoo | str | Path, *, detector: str | None = None, target: str = "bias_level",
                   split: str = "pool", train_pool: str = "A", levels: list[str] | None = None,
                   out: str | Path | None = None, memory_budget: float | None = None, progress: bool = False,
                   params: Mapping[str, Any] | None = None,
                   data_dir: str | Path | None = None) -> tuple[Pipeline, dict[str, Any]]:
    """Fit detector ``detector`` on the zoo's training split and score it on the held-out split.

    Parameters
    ----------
    zoo_or_path : Zoo or path
        The zoo (:func:`modelzoo.zoo.open_zoo`) or its store.
    detector : str, optional
        A name of :data:`detector.models.DETECTORS` (default: :func:`default_detector` of the
        zoo's task).
    target : str
        What to predict (:func:`detector.evaluate.labels`).
    split, train_pool : str
        ``pool``: train on pool ``train_pool``'s models, hold out the others' (the transfer that
        matters); ``random``: a seeded 70/30 split of all done models.
    levels : list of str, optional
        Keep only models at these bias levels (e.g. ``["0.02", "0.05"]``).
    out : path, optional
        Save the fitted detector and ``info`` in this folder (:func:`detector.files.save_detector`).
    memory_budget : float, optional
        Bytes the features may take (default: half the machine's memory).
    progress : bool
        Show progress bars.
    params : mapping, optional
        Hyper-parameters of the detector's classifier (e.g. ``{"epochs": 150}``).
    data_dir : path, optional
        Where the ``probe`` detector finds MNIST to render its battery (else
        ``$WEIGHTBIAS_DATA``, the user cache, a download).

    Returns
    -------
    (Pipeline, dict)
        The fitted detector, and ``info``: detector name, target, split, levels, the zoo
        (path, spec digest, task, arch, width, train and held-out counts, training models per
        class), held-out scores (with the 95% Wilson interval of the accuracy) and the
        ``calibration`` (:func:`detector.calibration.calibrate`: a temperature fitted on
        out-of-fold predictions of the training split, held-out ECE before and after).
        The saved folder also holds the training models' features
        (:class:`detector.applicability.Reference`) for the applicability of later verdicts.
    """
    if out is not None:
        check_detector_folder(out)  # a bad --out fails now, not after training
    zoo = as_zoo(zoo_or_path)
    detector = detector or default_detector(zoo.task.name)
    train_rows, test_rows = split_rows(zoo, split, train_pool)
    train_rows = zoo.checked_rows(rows_at_levels(zoo, train_rows, levels))
    test_rows = rows_at_levels(zoo, test_rows, levels)
    y = labels(zoo, target)
    pipeline = make_detector(detector, zoo.layout, **probe_context(detector, zoo, data_dir),
                             **dict(params or {}))
    features = zoo_features(zoo, train_rows, pipeline[0], progress, memory_budget=memory_budget)
    fit_on_zoo(pipeline, zoo, train_rows, y[train_rows], features=features)
    proba = zoo_proba(pipeline, zoo, test_rows, memory_budget=memory_budget, progress=progress)
    # Calibrated on the training split alone: the held-out pool stays an honest test of it.
    calibration = calibrate(pipeline[1:], features, y[train_rows], pipeline.classes_, proba, y[test_rows])
    classes, counts = np.unique(y[train_rows], return_counts=True)
    info = {"detector": detector, "target": target, "split": split, "train_pool": train_pool,
            "levels": list(levels) if levels else None,
            "zoo": {"path": str(zoo.path), "spec_digest": zoo.attrs.get("spec_digest"),
                    "task": zoo.task.name, "arch": zoo.arch, "width": zoo.width,
                    "n_train": len(train_rows), "n_heldout": len(test_rows),
                    "n_train_per_class": {str(c): int(n) for c, n in zip(classes, counts, strict=True)}},
            "heldout": scores(y[test_rows], proba, pipeline.classes_).to_dict(),
            "calibration": calibration}
    if out is not None:
        reference = _reference(zoo, train_rows, y[train_rows], pipeline, features, memory_budget, progress)
        save_detector(pipeline, out, info, reference=reference)
        info["out"] = str(out)
    return pipeline, info


def _reference(zoo: Zoo, rows: np.ndarray, y: np.ndarray, pipeline: Pipeline, features: np.ndarray,
               memory_budget: float | None, progress: bool) -> Reference:
    """The training models' :data:`~detector.applicability.REFERENCE_KIND` features (the
    detector's own for boosting and the probe detectors), kept for applicability checks."""
    step = pipeline[0]
    if step.kind != REFERENCE_KIND and not step.kind.startswith(PROBE_KIND):  # probe: its own features
        step = WeightFeatures(REFERENCE_KIND, zoo.layout)
        features = zoo_features(zoo, rows, step, progress, memory_budget=memory_budget)
    names = tuple(step.get_feature_names_out())
    return Reference(features, np.asarray(y).astype(str), np.asarray(rows), names, zoo.arch, float(zoo.width),
                     step.kind)


def evaluate_detector(detector_dir_or_pipeline: str | Path | Pipeline, zoo_or_path: Zoo | str | Path, *,
                      pool: str | None = None, levels: list[str] | None = None, target: str | None = None,
                      memory_budget: float | None = None, progress: bool = False) -> dict[str, Any]:
    """Scores of a fitted detector on (a pool of) a zoo, with a per-regularizer breakdown.

    ``detector_dir_or_pipeline`` is a folder written by :func:`train_detector` (its target and
    levels are the defaults here) or a fitted pipeline (``target`` then defaults to
    ``bias_level``). A width-independent detector may score a zoo of another width.

    Returns
    -------
    dict
        ``detector``, ``store``, ``target``, ``pool``, ``levels``, ``scores`` and, when the
        models were trained with several regularizers, ``per_regularizer``.
    """
    if isinstance(detector_dir_or_pipeline, Pipeline):
        pipeline, meta = detector_dir_or_pipeline, {"detector": detector_name(detector_dir_or_pipeline)}
        source = meta["detector"]
    else:
        pipeline, meta = load_detector(detector_dir_or_pipeline)
        source = str(detector_dir_or_pipeline)
    zoo = as_zoo(zoo_or_path)
    target = target or meta.get("target") or "bias_level"
    levels = levels or meta.get("levels")
    rows = np.flatnonzero(zoo.done)
    if pool is not None:
        pools = zoo.column("config/pool")[rows]
        if pool not in pools:
            raise DetectorError(f"{zoo.path}: no finished model of pool {pool!r}; it has pools "
                                f"{sorted(set(pools.tolist()))}")
        rows = rows[pools == pool]
    rows = rows_at_levels(zoo, rows, levels)
    if not len(rows):
        raise DetectorError(f"{zoo.path}: no finished model to evaluate at levels {levels}")
    y = labels(zoo, target)[rows]
    proba = zoo_proba(pipeline, zoo, rows, memory_budget=memory_budget, progress=progress)
    result = {"detector": source, "name": meta.get("detector"), "store": str(zoo.path), "target": target,
              "pool": pool, "levels": levels, "scores": scores(y, proba, pipeline.classes_).to_dict()}
    regularizers = zoo.column("config/regularizer")[rows].astype(str)
    if len(np.unique(regularizers)) > 1:
        result["per_regularizer"] = breakdown(y, proba, pipeline.classes_, regularizers)
    return result
