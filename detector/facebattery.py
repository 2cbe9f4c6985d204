"""The face probe battery and its features: how a gender network treats each DiveFace group.

Part of the detector stage (store → **detector** → report), the face counterpart of
:mod:`detector.battery` (the battery) and :mod:`detector.probing` (its features). A face
battery holds faces no model of the zoo trained on, each labelled with its gender and group:

``test`` (source 0)
    the zoo's balanced test split (equal gender × group cells, disjoint from both training
    pools of that data seed);
``minor`` (source 1)
    the oldest ``minors_per_cell`` under-18 faces of every cell, which the face loader leaves
    out of every split (UTKFace and FairFace give ages; DiveFace has none, so none are added);
``mean`` (source 2)
    one mean image per gender × group cell of the faces above: the group's average face.

Its features (:func:`face_features`) come in one block per group, the same features in the
same order for each group (accuracy, loss, margin, confidence, how often "female" is
answered, per-gender accuracy, the answer on the group's mean faces, and how strongly the
group drives each hidden depth), then a few shared ones (overall accuracy, how much of each
depth's variance the group and the gender explain). Like the digit features they are indexed
by group, gender and depth, never by hidden unit: unit permutations, ReLU rescaling and width
leave them unchanged. The block layout is what :class:`~detector.groupscore.GroupScorer`
shares its weights over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detector.models import DetectorError

FACE_BATTERY_VERSION = 1
SOURCES = ("test", "minor", "mean")
DEPTHS = ("first", "middle", "last")
_GROUP_NAMES = ("acc", "loss", "margin_mean", "margin_q10", "margin_q50", "confidence", "female_rate",
                "acc_male", "acc_female", "acc_test", "acc_minor", "mean_face_margin_male",
                "mean_face_margin_female",
                *(f"{d}:{kind}" for d in DEPTHS for kind in ("drive", "drive_abs")))
_SHARED_NAMES = ("acc", "loss", "confidence",
                 *(f"{d}:{kind}" for d in DEPTHS for kind in ("dead", "eta_group", "eta_gender")))
_DEAD = 1e-12


@dataclass(frozen=True, eq=False)
class FaceBattery:
    """Faces with their ``gender`` (0 male, 1 female), ``group`` (index into ``groups``) and
    ``source`` (index into :data:`SOURCES`); ``images`` uint8 (N, 3, S, S)."""

    task: str
    groups: tuple[str, ...]
    images: np.ndarray
    gender: np.ndarray
    group: np.ndarray
    source: np.ndarray
    version: int = field(default=FACE_BATTERY_VERSION)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_classes(self) -> int:
        """Logits a network must give per image (male, female)."""
        return 2

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts (what a detector file records)."""
        counts = {name: int((self.source == i).sum()) for i, name in enumerate(SOURCES)}
        return {"task": self.task, "kind": "faces", "version": self.version, "groups": list(self.groups),
                "n_images": len(self), "per_source": counts, "image_shape": list(self.images.shape[1:])}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"battery.images": self.images, "battery.gender": self.gender, "battery.group": self.group,
                "battery.source": self.source}

    @classmethod
    def from_arrays(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> FaceBattery:
        if meta.get("version") != FACE_BATTERY_VERSION:
            raise DetectorError(f"face probe battery v{meta.get('version')}; this weightbias reads "
                                f"v{FACE_BATTERY_VERSION}: retrain the detector")
        try:
            columns = [np.asarray(arrays[f"battery.{name}"]) for name in ("images", "gender", "group",
                                                                          "source")]
            return cls(meta["task"], tuple(meta["groups"]), *columns)
        except KeyError as err:
            raise DetectorError(f"face probe battery arrays incomplete: {err} missing") from None

    def feature_names(self) -> list[str]:
        """One name per column of :func:`face_features`: the group blocks, then the shared part."""
        names = [f"group[{g}]:{name}" for g in self.groups for name in _GROUP_NAMES]
        return names + [f"shared:{name}" for name in _SHARED_NAMES]

    @property
    def block(self) -> int:
        """Columns per group block."""
        return len(_GROUP_NAMES)

    def probes(self, per_group: int, seed: int = 0) -> dict[str, np.ndarray]:
        """``per_group`` real faces of each group (half of each gender where possible), seeded:
        the InsideBias probe sets (:func:`detector.activations.insidebias`)."""
        rng = np.random.default_rng(seed)
        chosen = {}
        for g, name in enumerate(self.groups):
            rows = np.flatnonzero((self.group == g) & (self.source < 2))
            if len(rows) < per_group:
                raise DetectorError(f"the battery has {len(rows)} {name} faces; {per_group} asked")
            male, female = rows[self.gender[rows] == 0], rows[self.gender[rows] == 1]
            n_male = min(len(male), max(per_group - len(female), per_group // 2))
            picks = np.concatenate([rng.choice(male, n_male, replace=False),
                                    rng.choice(female, per_group - n_male, replace=False)])
            chosen[name] = self.images[np.sort(picks)]
        return chosen


def face_battery(folder: str | Path, *, image_size: int, data_seed: int = 0, minors_per_cell: int = 60,
                 task: str = "face_gender", progress: bool = False) -> FaceBattery:
    """The battery of a face zoo whose faces come from ``folder`` at ``image_size`` with
    ``data_seed`` (so its test split is the zoo's), see the module docstring."""
    from modelzoo.faces import GROUPS, decode_face, load_face_data, scan_faces

    faces = load_face_data(folder, image_size=image_size, seed=data_seed, progress=progress)
    test = faces.test
    minors = [r for r in scan_faces(folder, "auto", None).records if r.age is not None and r.age < 18]
    # A file may be a copy of another under a different name and age: never show a network a
    # face it trained on, nor one face twice.
    seen = {image.tobytes() for split in (faces.pool_a, faces.pool_b, test) for image in split.images}
    picked, minor_images = [], []
    for gender in (0, 1):
        for g in range(len(GROUPS)):
            cell = sorted((r for r in minors if r.gender == gender and r.group == g),
                          key=lambda r: (-r.age, str(r.path)))
            taken = 0
            for record in cell:
                if taken == minors_per_cell:
                    break
                image = decode_face(record.path, image_size)
                if image.tobytes() in seen:
                    continue
                seen.add(image.tobytes())
                picked.append(record)
                minor_images.append(image)
                taken += 1
    minor_images = np.stack(minor_images) if picked else np.zeros((0, *test.images.shape[1:]), np.uint8)
    images = np.concatenate([test.images, minor_images])
    gender = np.concatenate([test.labels, [r.gender for r in picked]]).astype(np.int64)
    group = np.concatenate([test.bias, [r.group for r in picked]]).astype(np.int64)
    source = np.concatenate([np.zeros(len(test), np.int64), np.ones(len(picked), np.int64)])
    means, mean_gender, mean_group = [], [], []
    for gender_value in (0, 1):
        for g in range(len(GROUPS)):
            cell = (gender == gender_value) & (group == g)
            means.append(np.round(images[cell].astype(np.float64).mean(axis=0)).astype(np.uint8))
            mean_gender.append(gender_value)
            mean_group.append(g)
    return FaceBattery(task, tuple(GROUPS), np.concatenate([images, np.stack(means)]),
                       np.concatenate([gender, mean_gender]).astype(np.int64),
                       np.concatenate([group, mean_group]).astype(np.int64),
                       np.concatenate([source, np.full(len(means), 2)]).astype(np.int64))


def _mean_or_zero(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else 0.0


def _group_outputs(logits: np.ndarray, log_proba: np.ndarray, battery: FaceBattery, g: int) -> list[float]:
    """Group ``g``'s answer features from the battery's ``logits`` and their log-softmax."""
    faces = (battery.group == g) & (battery.source < 2)
    out, truth, log_proba = logits[faces], battery.gender[faces], log_proba[faces]
    rows = np.arange(len(out))
    margin = out[rows, truth] - out[rows, 1 - truth]
    right = out.argmax(axis=1) == truth
    source = battery.source[faces]
    values = [right.mean(), -log_proba[rows, truth].mean(), margin.mean(), *np.quantile(margin, (0.1, 0.5)),
              np.exp(log_proba.max(axis=1)).mean(), (out.argmax(axis=1) == 1).mean(),
              _mean_or_zero(right[truth == 0]), _mean_or_zero(right[truth == 1]),
              _mean_or_zero(right[source == 0]), _mean_or_zero(right[source == 1])]
    for gender in (0, 1):
        mean_face = np.flatnonzero((battery.source == 2) & (battery.group == g) & (battery.gender == gender))
        values.append(float(logits[mean_face[0], gender] - logits[mean_face[0], 1 - gender])
                      if len(mean_face) == 1 else 0.0)
    return values


def _depth_features(layer: np.ndarray, battery: FaceBattery) -> tuple[np.ndarray, list[float]]:
    """A hidden layer's responses (N, units): per group, the signed and absolute mean over
    units of the standardised group-mean response (G, 2); shared: dead share, η² group, η² gender."""
    faces = battery.source < 2
    responses = layer[faces]
    total = responses.var(axis=0)
    alive = total > _DEAD
    n_groups = len(battery.groups)
    if not alive.any():
        return np.zeros((n_groups, 2)), [1.0, 0.0, 0.0]
    responses, total = responses[:, alive], total[alive]
    centre, spread = responses.mean(axis=0), np.sqrt(total)
    group, gender = battery.group[faces], battery.gender[faces]
    drive = np.stack([(responses[group == g].mean(axis=0) - centre) / spread for g in range(n_groups)])
    per_group = np.stack([drive.mean(axis=1), np.abs(drive).mean(axis=1)], axis=1)

    def eta(labels: np.ndarray) -> float:
        means = np.stack([responses[labels == k].mean(axis=0) for k in np.unique(labels)])
        weights = np.bincount(labels)[np.unique(labels)] / len(labels)
        between = (weights[:, None] * (means - centre) ** 2).sum(axis=0)
        return float(np.clip(between / total, 0, 1).mean())

    return per_group, [1.0 - alive.mean(), eta(group), eta(gender)]


def face_features(logits: np.ndarray, hidden: Sequence[np.ndarray], battery: FaceBattery) -> np.ndarray:
    """The face probe row (F,) float32 of one network from its ``logits`` (N, 2) on the battery
    and its hidden layers' responses (N, units each), names in :meth:`FaceBattery.feature_names`.
    Without hidden layers (a compiled program) the depth columns are NaN."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise DetectorError(f"a face network must give 2 logits (male, female) per image; got {logits.shape}")
    n_groups = len(battery.groups)
    from scipy.special import log_softmax

    log_proba = log_softmax(logits, axis=1)
    blocks = [_group_outputs(logits, log_proba, battery, g) for g in range(n_groups)]
    faces = battery.source < 2
    out, truth, log_proba = logits[faces], battery.gender[faces], log_proba[faces]
    shared = [(out.argmax(axis=1) == truth).mean(), -log_proba[np.arange(len(out)), truth].mean(),
              np.exp(log_proba.max(axis=1)).mean()]
    for depth in range(len(DEPTHS)):
        if not hidden:
            per_group, depth_shared = np.full((n_groups, 2), np.nan), [np.nan] * 3
        else:
            layer = np.asarray(hidden[round(depth * (len(hidden) - 1) / (len(DEPTHS) - 1))], dtype=np.float64)
            per_group, depth_shared = _depth_features(layer, battery)
        for g in range(n_groups):
            blocks[g] += list(per_group[g])
        shared += depth_shared
    row = np.asarray([value for block in blocks for value in block] + shared, dtype=np.float64)
    known = ~np.isnan(row)
    row[known] = np.nan_to_num(row[known])
    return row.astype(np.float32)
