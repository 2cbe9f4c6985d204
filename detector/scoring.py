"""Scoring: tell a user whether checkpoints they trained carry hidden bias, and how sure that is.

Last stage of the flow (detector → **report**). A checkpoint from anywhere (a state_dict in
``.pt``/``.pth``/``.ckpt``, ``.safetensors`` or ``.h5``, read without unpickling, unwrapped from
Lightning or ``{"model_state_dict": ...}`` dicts by :func:`modelzoo.checkpoints.load_checkpoint`)
is read as one of our architectures by its structure, whatever its tensors are called
(:func:`modelzoo.recognition.recognize`), flattened in layout order and judged by a trained
detector. Each verdict carries what a person needs to trust it or not:

* the probability after the detector's calibration (:mod:`detector.calibration`), and the
  detector's held-out accuracy with its interval and how many models per class it learned from;
* ``ood``: whether the checkpoint is like the detector's training models at all
  (:mod:`detector.applicability`); outside, the line says so and shows no bare probability;
* ``evidence``: the features that drove the verdict, with the training zoo's range per class,
  and the nearest training models.

:class:`Scorer` loads a detector folder once for any number of checkpoints
(:func:`score_checkpoints`). A ``boosting`` detector is scored from its exported trees
(:mod:`detector.trees`), a ``deepsets`` one from its saved arrays (:mod:`detector.sethead`),
and neither imports scikit-learn: for one checkpoint, importing it would cost more than
everything else together. Other detectors (``dense``, ``layer_conv``) load their pipeline.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.applicability import REFERENCE_KIND, Reference
from detector.calibration import apply_temperature
from detector.features import find_layers, weight_features
from detector.files import DetectorFileError, load_detector, read_detector_info
from detector.models import DetectorError
from modelzoo.checkpoints import SUFFIXES, TORCH_SUFFIXES, load_checkpoint
from modelzoo.errors import WeightbiasError
from modelzoo.layouts import TensorSlot, arch_layout, slots_from_records
from modelzoo.recognition import recognize

UNBIASED_CLASSES = ("unbiased", "balanced")
_FEATURES_STEPS = ("detector.transform.WeightFeatures", "detector.probing.ProbeFeatures")
SETHEAD_CLASS = "detector.heads.DeepSetsClassifier"
SCORED_SUFFIXES = (*SUFFIXES, ".pt2")  # .pt2: a torch.export program (detector.networks)


@dataclass(frozen=True)
class CheckpointWeights:
    """One checkpoint read as our architecture: a (1, P) weight row in the order of ``layout``."""

    weights: np.ndarray
    layout: tuple[TensorSlot, ...]
    arch: str
    width: float
    state_dict: dict[str, torch.Tensor]  # our tensor names, layout order
    renamed: dict[str, str]  # the file's name -> ours


# Trained classifiers keep |w| in the tens at most; far beyond, a file holds something else.
MAX_WEIGHT = 1e6


def checkpoint_weights(state_dict: dict[str, torch.Tensor], arch: str | None = None,
                       ordered: bool = True) -> CheckpointWeights:
    """One checkpoint as a one-row weight array in layout order, recognised by structure
    (``ordered``: the mapping keeps the network's own order, as a torch state_dict does)."""
    recognized = recognize(state_dict, arch, ordered)
    slots = tuple(arch_layout(recognized.arch, recognized.width))
    theirs = {ours: name for name, ours in recognized.renamed.items()}
    bad = [theirs[name] for name, tensor in recognized.state_dict.items()
           if not torch.isfinite(tensor.float()).all()]
    if bad:
        raise DetectorError(f"the checkpoint has NaN or Inf weights in {', '.join(bad)}; not scored")
    flat = torch.cat([recognized.state_dict[slot.name].detach().reshape(-1).float() for slot in slots])
    largest = float(flat.abs().max())
    if largest > MAX_WEIGHT:  # the features' squares and products would overflow float32
        raise DetectorError(f"the checkpoint's weights reach |w| = {largest:.3g}, far beyond any trained "
                            f"network's (at most {MAX_WEIGHT:g} is read); not scored")
    return CheckpointWeights(flat.numpy()[None], slots, recognized.arch, recognized.width,
                             recognized.state_dict, recognized.renamed)


def features_of(kind: str, weights: CheckpointWeights) -> np.ndarray:
    """The ``kind`` weight features (``a+b``: side by side) of one checkpoint, (1, F) float32:
    what :class:`~detector.transform.WeightFeatures` computes, without scikit-learn."""
    slots = list(weights.layout)
    parts = [weight_features(weights.weights, slots, part) for part in kind.split("+")]
    return np.hstack(parts).astype(np.float32)


class Scorer:
    """A detector folder loaded once, to score any number of checkpoints with :meth:`score`."""

    def __init__(self, detector_dir: str | Path) -> None:
        self.path = Path(detector_dir)
        self.meta = meta = read_detector_info(self.path)
        self.classes = [str(c) for c in meta["classes"]]
        first = meta["steps"][0]
        if first.get("class") not in _FEATURES_STEPS:
            raise DetectorFileError(f"{self.path}: its first step is a {first.get('class')}, not weight or "
                                    "probe features")
        self.kind = first["state"]["kind"]
        self.layout = slots_from_records(first["state"]["layout"])
        self.zoo = meta.get("zoo") or {}
        self.temperature = float((meta.get("calibration") or {}).get("temperature", 1.0))
        self._pipeline = None
        try:
            self.reference = Reference.load(self.path, meta["reference"]) if "reference" in meta else None
            self.trees = self._trees(meta.get("predictor"))
            self.sethead = self._sethead(meta["steps"])
        except (OSError, KeyError, ValueError, TypeError, IndexError) as err:
            raise DetectorFileError(f"{self.path}: damaged detector file ({type(err).__name__}: "
                                    f"{err})") from err

    def _trees(self, entry: dict[str, Any] | None):
        if not entry or entry.get("kind") != "trees":
            return None
        from safetensors.numpy import load_file

        from detector.files import PREDICTOR
        from detector.trees import TreeEnsemble

        if entry.get("file") != PREDICTOR:
            raise ValueError(f"predictor file {entry.get('file')!r}, expected {PREDICTOR!r}")
        return TreeEnsemble.from_arrays(entry["state"], load_file(str(self.path / PREDICTOR)))

    def _sethead(self, steps: list[dict[str, Any]]):
        if len(steps) != 2 or steps[1].get("class") != SETHEAD_CLASS:
            return None
        from safetensors.numpy import load_file

        from detector.files import ARRAYS
        from detector.sethead import SetHead

        return SetHead.from_step(steps[1], load_file(str(self.path / ARRAYS)))

    @property
    def pipeline(self):
        """The scikit-learn pipeline, loaded on first use (detectors without exported trees)."""
        if self._pipeline is None:
            self._pipeline = load_detector(self.path)[0]
        return self._pipeline

    # -- one checkpoint --------------------------------------------------------------------------
    def score(self, checkpoint: str | Path, arch: str | None = None,
              probes: str | Path | None = None, model_def: str | None = None) -> dict[str, Any]:
        """The verdict on one checkpoint (see the module docstring for what it holds), or on a
        runnable network (a program, or ``model_def``'s class: :mod:`detector.networks`)."""
        from detector.networks import is_program, score_network

        path = Path(checkpoint)
        if model_def is not None or is_program(path):
            return score_network(self, path, model_def)
        ordered = path.suffix.lower() in TORCH_SUFFIXES  # safetensors and HDF5 list names sorted
        weights = checkpoint_weights(load_checkpoint(path), arch, ordered)
        self._check_architecture(weights)
        raw, features = self._raw_proba(weights)
        proba = apply_temperature(raw[None], self.temperature)[0]
        predicted = self.classes[int(proba.argmax())]
        verdict, probability = self.verdict_for(proba, predicted)
        result = {"checkpoint": str(checkpoint), "arch": weights.arch, "width": weights.width,
                  "renamed": {theirs: ours for theirs, ours in weights.renamed.items() if theirs != ours},
                  "detector": self.summary(), "verdict": verdict, "predicted": predicted,
                  "probability": round(probability, 4),
                  "probabilities": dict(zip(self.classes, np.round(proba, 4).tolist(), strict=True)),
                  "uncalibrated": {"probability": round(self.verdict_for(raw, predicted)[1], 4),
                                   "probabilities": dict(zip(self.classes, np.round(raw, 4).tolist(),
                                                             strict=True))},
                  "calibrated": self.temperature != 1.0}
        result |= self._applicability(weights, features, predicted)
        linear = self.trees is None and self.sethead is None and hasattr(self.pipeline[-1], "train_proba_")
        if linear and len(self.pipeline) == 2:
            from detector.networks import agreement

            # Does the verdict rest on which training models each member happened to draw?
            result |= agreement(self.pipeline[-1], features)
        if result["ood"]["in_distribution"] is False and linear:
            from detector.networks import percentiles

            # No probability speaks for it (an unseen width): its place among the training models does.
            result["percentiles"] = percentiles(self.pipeline[-1], features)
        if probes is not None:
            from detector.activations import insidebias, read_probe_folder
            from modelzoo.architectures import build_model

            require_face_model(weights, checkpoint)
            model = build_model(weights.arch, weights.width)
            model.load_state_dict(weights.state_dict)
            images = read_probe_folder(probes, model.input_shape[-1])
            result["insidebias"] = insidebias(model, images).to_dict()
        return result

    def _check_architecture(self, weights: CheckpointWeights) -> None:
        if [s.name for s in weights.layout] != [s.name for s in self.layout]:
            trained = self.zoo.get("arch") or f"{self.layout[0].name}, ... models"
            raise DetectorError(f"a {weights.arch} (width {weights.width:g}) is outside the detector's "
                                f"experience: it learned from {trained} only; not scored")

    def _raw_proba(self, weights: CheckpointWeights) -> tuple[np.ndarray, np.ndarray | None]:
        """Uncalibrated probabilities, and the classifier's features when it is read from arrays
        (boosting's exported trees, a DeepSets head) rather than through scikit-learn."""
        if self.trees is not None:
            features = features_of(self.kind, weights)
            return self.trees.predict_proba(features)[0], features
        if self.sethead is not None:
            features = features_of(self.kind, weights)
            sizes = tuple(layer.n_out for layer in find_layers(list(weights.layout))[:-1])
            return self.sethead.predict_proba(features, sizes)[0], features
        from detector.models import for_layout

        moved = for_layout(self.pipeline, weights.layout)
        features = moved[0].transform(weights.weights)
        return moved[1:].predict_proba(features)[0], features

    def verdict_for(self, proba: np.ndarray, predicted: str) -> tuple[str, float]:
        """The verdict in words and the probability behind it: p(biased) for a detector that
        knows unbiased models, else the predicted class's."""
        unbiased = [c for c in self.classes if c in UNBIASED_CLASSES]
        if unbiased:  # a biased-vs-not detector, or a face detector that knows "balanced"
            p_biased = 1 - sum(float(proba[self.classes.index(c)]) for c in unbiased)
            return ("unbiased" if predicted in unbiased else "biased"), p_biased
        return f"{self.meta.get('target', 'class')} {predicted}", float(proba.max())  # e.g. σ² levels

    def summary(self) -> dict[str, Any]:
        """The detector's part of a verdict: what it is, how it did, what it learned from."""
        per_class = self.zoo.get("n_train_per_class") or {}
        summary = {"path": str(self.path), "name": self.meta.get("detector"),
                   "target": self.meta.get("target"), "heldout": self.meta.get("heldout"),
                   "trained_on": self.meta.get("zoo"),
                   "calibration": self.meta.get("calibration"),
                   "min_train_per_class": min(per_class.values()) if per_class else None}
        if "recalibration" in self.meta:
            summary["recalibration"] = self.meta["recalibration"]
        return summary

    def _applicability(self, weights: CheckpointWeights, features: np.ndarray | None,
                       predicted: str) -> dict[str, Any]:
        if self.reference is None:
            reasons = []
            if self.zoo.get("width") is not None and abs(weights.width - self.zoo["width"]) > 1e-6:
                reasons.append(f"width {weights.width:g}; the detector learned from width "
                               f"{self.zoo['width']:g} only")
            return {"ood": {"in_distribution": False if reasons else None, "distance_percentile": None,
                            "reasons": reasons or ["unknown: the detector folder holds no training features; "
                                                   "retrain it with `weightbias detector train`"]},
                    "evidence": None}
        # Distances in the detector's own feature space when the reference holds it (boosting's
        # statistics, a probe detector's answers), else in the weight statistics.
        own = features is not None and self.reference.kind == self.kind
        row = features[0] if own else features_of(REFERENCE_KIND, weights)[0]
        ood = self.reference.assess(row, weights.arch, weights.width)
        if own:
            predict = self.trees.predict_proba if self.trees is not None else self.pipeline[1:].predict_proba

            def proba(rows: np.ndarray) -> np.ndarray:
                return apply_temperature(predict(rows), self.temperature)

            evidence = self.reference.evidence(row, predicted, proba, self.classes)
        else:
            evidence = self.reference.evidence(row, predicted)
        return {"ood": ood, "evidence": evidence}


def score_checkpoint(checkpoint: str | Path, detector_dir: str | Path, probes: str | Path | None = None,
                     arch: str | None = None, model_def: str | None = None) -> dict[str, Any]:
    """The verdict on one checkpoint (raises a :class:`~modelzoo.errors.WeightbiasError` if refused)."""
    return Scorer(detector_dir).score(checkpoint, arch, probes, model_def)


def checkpoint_files(paths: Iterable[str | Path]) -> list[tuple[Path, str | None]]:
    """Each path as given, a folder as every checkpoint file in it (by suffix, sorted); with
    the reason a path cannot be scored at all (None if it can be tried)."""
    found: list[tuple[Path, str | None]] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SCORED_SUFFIXES)
            empty = f"a folder with no checkpoint files ({', '.join(SCORED_SUFFIXES)})"
            found += [(p, None) for p in inside] or [(path, empty)]
        else:
            found.append((path, None))
    return found


def score_checkpoints(paths: Iterable[str | Path], detector_dir: str | Path, *, arch: str | None = None,
                      probes: str | Path | None = None, model_def: str | None = None,
                      progress: bool = False) -> Iterator[dict[str, Any]]:
    """Verdicts on many checkpoints (files or folders of them), the detector loaded once.

    Yields one result per checkpoint file, in order: :meth:`Scorer.score`'s dict, or
    ``{"checkpoint": ..., "refused": reason}`` for a file that cannot be scored (the others
    still are). A detector folder that cannot be read raises before any checkpoint is read.
    """
    scorer = Scorer(detector_dir)
    files = checkpoint_files(paths)
    if progress and len(files) > 1:
        from tqdm import tqdm

        files = tqdm(files, desc="scoring", unit="checkpoint", file=sys.stderr)
    for path, problem in files:
        if problem is None:
            try:
                yield scorer.score(path, arch, probes, model_def)
                continue
            except WeightbiasError as err:
                problem = str(err).removeprefix(f"{path}: ")
        yield {"checkpoint": str(path), "refused": problem.splitlines()[0] if problem else "refused"}


def require_face_model(weights: CheckpointWeights, path: str | Path) -> None:
    """InsideBias probes are faces (decoded as the face datasets are): refuse any other model."""
    from modelzoo.tasks import get_task

    face_archs = get_task("face_gender").archs
    if weights.arch not in face_archs:
        raise DetectorError(f"{path}: a {weights.arch}, which no face task trains; InsideBias's face probes "
                            f"measure face models ({', '.join(face_archs)}) only")


def checkpoint_insidebias(checkpoint: str | Path, *, dataset: str = "utkface_crop_part1",
                          data_dir: str | Path | None = None, per_group: int = 5,
                          seed: int = 0) -> dict[str, Any]:
    """InsideBias of a face checkpoint on ``per_group`` probes per group of a face dataset's
    balanced test set (``dataset``: a folder under ``<data root>/faces/``, or a path)."""
    from detector.activations import insidebias, probe_images
    from modelzoo.architectures import build_model
    from modelzoo.faces import GROUPS, find_face_folder, load_face_data

    path = Path(checkpoint)
    weights = checkpoint_weights(load_checkpoint(path), ordered=path.suffix.lower() in TORCH_SUFFIXES)
    require_face_model(weights, path)
    model = build_model(weights.arch, weights.width)
    model.load_state_dict({k: v.float() for k, v in weights.state_dict.items()})
    faces = load_face_data(find_face_folder(dataset, data_dir), image_size=model.input_shape[-1])
    probes = probe_images(faces.test, GROUPS, per_group, seed)
    return {"checkpoint": str(checkpoint), "per_group": per_group, **insidebias(model, probes).to_dict()}
