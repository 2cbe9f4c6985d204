"""Is a checkpoint like the models the detector learned from, and what in it drove the verdict?

Part of the detector stage (store → **detector** → report). A detector is a function fitted on
a few dozen models of one architecture, width and training recipe. Handed something else (a
wider network, an untrained one, a recipe it never saw) it still returns a confident number,
and that number means nothing. So every verdict carries an applicability check (``ood``):

* the checkpoint's architecture and width against the training zoo's;
* for a probe detector, its **task accuracy** on the battery (the colour-aligned digits, or
  the faces): a network that answers near chance, below every training model, has barely learned
  its task and has no bias level to read, whatever class the classifier names;
* its **distance percentile**: the distance from its features to the nearest training model,
  placed among the training models' own leave-one-out nearest-neighbour distances. A
  checkpoint farther from every training model than any training model is from its nearest
  neighbour (percentile 100, beyond the largest) is outside the detector's experience.

Distances are root-mean-square differences of *standardised* features (each column divided by
its spread over the training zoo), in the :data:`REFERENCE_KIND` feature space: per-tensor and
first-layer colour statistics, which a ``boosting`` detector reads itself and which mean the
same, column for column, at every width. The training zoo's feature rows, labels and zoo rows
are saved beside the detector (``reference.safetensors``), so the nearest zoo models can be
named, and the training zoo's range of each feature per class shown as evidence.

Evidence (:meth:`Reference.evidence`) says which features drove the verdict: by *occlusion*
when the classifier reads these very features (each feature in turn set to the training zoo's
median; the drop in the predicted class's probability is its share), else by *class contrast*
(features where the checkpoint sits nearest the predicted class's training mean and farthest
from the other classes', in standard deviations). Nothing here imports scikit-learn or torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_KIND = "stats+first_layer"
REFERENCE_FILE = "reference.safetensors"
REFERENCE_VERSION = 1
N_NEAREST = 3
N_EVIDENCE = 3
_WIDTH_RTOL = 1e-6
# A probe detector's column holding the network's accuracy on probes its training data looks
# like, what that column reads at chance, and what the probes are (digit and face batteries).
TASK_ACCURACY = {"out:aligned_acc": (0.1, "the battery's digits painted in their own class colour"),
                 "shared:acc": (0.5, "the battery's faces")}


@dataclass(frozen=True)
class Reference:
    """The training zoo as the detector saw it: feature rows, their labels and zoo rows."""

    features: np.ndarray  # (models, F) float32, REFERENCE_KIND features of the training models
    labels: np.ndarray  # (models,) str
    rows: np.ndarray  # (models,) the models' rows in the training zoo
    names: tuple[str, ...]  # feature names, one per column
    arch: str
    width: float
    kind: str = REFERENCE_KIND  # the feature space: weight statistics, or a probe detector's own
    mean: np.ndarray = field(init=False, repr=False)  # per column, over the training models
    scale: np.ndarray = field(init=False, repr=False)  # per column std (1 where constant)
    loo: np.ndarray = field(init=False, repr=False)  # each training model's nearest-neighbour distance

    def __post_init__(self) -> None:
        if len(self.features) < 2:
            raise ValueError("a reference needs two or more training models")
        mean, std = self.features.mean(axis=0), self.features.std(axis=0)
        # A column constant over the zoo keeps its raw units: dividing by ~0 would make any
        # rounding-level difference look infinitely strange.
        scale = np.where(std > 1e-9 * (1 + np.abs(mean)), std, 1.0)
        object.__setattr__(self, "mean", mean.astype(np.float64))
        object.__setattr__(self, "scale", scale.astype(np.float64))
        z = self.standardize(self.features)
        pairwise = _rms_distances(z, z)
        np.fill_diagonal(pairwise, np.inf)
        object.__setattr__(self, "loo", pairwise.min(axis=1))

    # -- files ---------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> dict[str, Any]:
        """Write ``reference.safetensors`` into ``folder``; returns the ``detector.json`` entry."""
        from safetensors.numpy import save_file

        classes = sorted(set(self.labels.tolist()))
        codes = np.array([classes.index(label) for label in self.labels], dtype=np.int64)
        save_file({"features": np.ascontiguousarray(self.features, dtype=np.float32), "labels": codes,
                   "rows": np.asarray(self.rows, dtype=np.int64)}, str(Path(folder) / REFERENCE_FILE))
        return {"version": REFERENCE_VERSION, "file": REFERENCE_FILE, "kind": self.kind,
                "classes": classes, "names": list(self.names), "arch": self.arch, "width": self.width,
                "n_models": len(self.labels),
                "loo_distance": {"median": round(float(np.median(self.loo)), 4),
                                 "max": round(float(self.loo.max()), 4)}}

    @classmethod
    def load(cls, folder: str | Path, entry: dict[str, Any]) -> Reference:
        """The reference saved by :meth:`save`; ``entry`` is its ``detector.json`` entry."""
        from safetensors.numpy import load_file

        if entry.get("version") != REFERENCE_VERSION or entry.get("file") != REFERENCE_FILE:
            raise ValueError(f"reference v{entry.get('version')} in {entry.get('file')!r}; this weightbias "
                             f"reads v{REFERENCE_VERSION} in {REFERENCE_FILE!r}")
        arrays = load_file(str(Path(folder) / REFERENCE_FILE))
        labels = np.array(entry["classes"])[arrays["labels"]]
        return cls(arrays["features"], labels, arrays["rows"], tuple(entry["names"]), entry["arch"],
                   float(entry["width"]), entry.get("kind", REFERENCE_KIND))

    # -- distances -----------------------------------------------------------------------------
    def standardize(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype=np.float64) - self.mean) / self.scale

    def assess(self, features: np.ndarray, arch: str, width: float) -> dict[str, Any]:
        """The ``ood`` entry of a verdict on one checkpoint's feature row ``features`` (F,)."""
        reasons = []
        if arch != self.arch:
            reasons.append(f"architecture {arch}; the detector learned from {self.arch} only")
        if abs(width - self.width) > _WIDTH_RTOL * self.width:
            reasons.append(f"width {width:g}; the detector learned from width {self.width:g} only")
        learned = self.task_accuracy(features)
        if learned is not None and learned["barely_learned"]:
            reasons.append(f"it has barely learned its task: it answers {learned['value']:.0%} of "
                           f"{learned['probes']} right (chance {learned['chance']:.0%}; the training models "
                           f"{learned['training_min']:.0%}–{learned['training_max']:.0%}), so it has no "
                           "bias level to read")
        distance = float(self.distances(features).min())
        percentile = 100.0 * float(np.mean(self.loo < distance))
        if distance > self.loo.max():
            reasons.append(f"its features are {distance:.3f} standard deviations (RMS) from the nearest "
                           f"training model, farther than any training model is from its own nearest "
                           f"neighbour (at most {self.loo.max():.3f})")
        return {"in_distribution": not reasons, "reasons": reasons,
                "distance": round(distance, 4), "distance_percentile": round(percentile, 1),
                "training_distances": {"median": round(float(np.median(self.loo)), 4),
                                       "max": round(float(self.loo.max()), 4), "n_models": len(self.loo)},
                "features": f"{self.kind} (standardised over the training zoo), RMS distance",
                **({"task_accuracy": learned} if learned is not None else {})}

    def task_accuracy(self, features: np.ndarray) -> dict[str, Any] | None:
        """The checkpoint's accuracy on the probes its training data looks like, beside chance and
        the training models' range (``None`` when the features hold no such column). It has
        *barely learned* when it is under every training model and nearer chance than the lowest."""
        column = next((name for name in TASK_ACCURACY if name in self.names), None)
        if column is None:
            return None
        chance, probes = TASK_ACCURACY[column]
        j = self.names.index(column)
        value, low = float(np.asarray(features).reshape(-1)[j]), float(self.features[:, j].min())
        return {"value": round(value, 4), "chance": chance, "probes": probes, "training_min": round(low, 4),
                "training_max": round(float(self.features[:, j].max()), 4),
                "barely_learned": bool(value < low and value - chance < (low - chance) / 2)}

    def distances(self, features: np.ndarray) -> np.ndarray:
        """RMS standardised distance from one feature row to every training model."""
        return _rms_distances(self.standardize(np.atleast_2d(features)), self.standardize(self.features))[0]

    def nearest(self, features: np.ndarray, k: int = N_NEAREST) -> list[dict[str, Any]]:
        """The ``k`` training models nearest to one feature row: zoo row, label, distance."""
        distances = self.distances(features)
        order = np.argsort(distances, kind="stable")[:k]
        return [{"zoo_model": int(self.rows[i]), "label": str(self.labels[i]),
                 "distance": round(float(distances[i]), 4)} for i in order]

    # -- evidence ------------------------------------------------------------------------------
    def evidence(self, features: np.ndarray, predicted: str,
                 proba: Callable[[np.ndarray], np.ndarray] | None = None,
                 classes: list[str] | None = None, top: int = N_EVIDENCE) -> dict[str, Any]:
        """Which features drove the verdict ``predicted`` on one feature row, with the training
        zoo's range of each per class, and the nearest training models.

        With ``proba`` (feature rows → probabilities in ``classes`` order, for a classifier that
        reads these features), occlusion; without, class contrast (see the module docstring).
        """
        x = np.asarray(features, dtype=np.float64).reshape(-1)
        if proba is not None and classes is not None:
            column = classes.index(predicted)
            occluded = np.repeat(x[None], len(x), axis=0)
            median = np.median(self.features, axis=0)
            occluded[np.arange(len(x)), np.arange(len(x))] = median
            base = float(proba(x[None])[0, column])
            share = base - proba(occluded)[:, column]
            method, how = "occlusion", (f"each feature in turn set to the training zoo's median; share: the "
                                        f"drop in calibrated p({predicted})")
        else:
            z = self.standardize(x[None])[0]
            means = {c: self.standardize(self.features[self.labels == c]).mean(axis=0)
                     for c in sorted(set(self.labels.tolist()))}
            others = np.min([np.abs(z - m) for c, m in means.items() if c != predicted], axis=0)
            share = others - np.abs(z - means[predicted])
            method, how = "class contrast", (f"share: standard deviations nearer the {predicted} training "
                                             "mean than the nearest other class's mean")
        order = np.argsort(-share, kind="stable")[:top]
        listed = []
        for j in order:
            ranges = {c: [round(float(self.features[self.labels == c, j].min()), 6),
                          round(float(self.features[self.labels == c, j].max()), 6)]
                      for c in sorted(set(self.labels.tolist()))}
            listed.append({"feature": self.names[j], "value": round(float(x[j]), 6),
                           "share": round(float(share[j]), 4), "training_range": ranges})
        return {"method": method, "how": how, "features": listed, "nearest": self.nearest(x)}


def _rms_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) root-mean-square distances between rows."""
    squared = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0) / a.shape[1])
