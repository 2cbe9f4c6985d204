"""Scoring: tell a user whether a checkpoint they trained carries hidden bias.

Last stage of the flow (detector → **report**). A checkpoint from anywhere (a state_dict in
``.pt``, ``.safetensors`` or ``.h5``, read without unpickling) is matched to one of our
architectures by its tensor names and shapes, flattened in layout order and given to a
trained detector (at another width than the detector's zoo, if the detector is width
independent); with probe images per group, InsideBias ratios come alongside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.activations import insidebias, probe_images, read_probe_folder
from detector.files import load_detector
from detector.models import DetectorError, for_layout
from modelzoo.architectures import ARCHITECTURES, build_model, layout
from modelzoo.checkpoints import load_checkpoint
from modelzoo.layouts import TensorSlot

UNBIASED_CLASSES = ("unbiased", "balanced")


def recognize_architecture(state_dict: dict[str, torch.Tensor], arch: str | None = None) -> tuple[str, float]:
    """(architecture, width) whose layout has exactly these tensor names and shapes, in any
    order (safetensors and HDF5 hand tensors back sorted by name)."""
    candidates = [arch] if arch else list(ARCHITECTURES)
    for name in candidates:
        if name not in ARCHITECTURES:
            raise DetectorError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
        reference = build_model(name).state_dict()
        if set(state_dict) != set(reference):
            continue
        first = next(iter(reference))
        if state_dict[first].dim() == 0:
            continue
        width = state_dict[first].shape[0] / reference[first].shape[0]
        if not 0 < width <= 8:
            continue
        model = build_model(name, width)
        if all(tuple(state_dict[key].shape) == tuple(r.shape) for key, r in model.state_dict().items()):
            return name, width
    expected = "; ".join(f"{name}: {', '.join(list(build_model(name).state_dict())[:4])}, ..."
                         for name in candidates if name in ARCHITECTURES)
    raise DetectorError(f"the checkpoint's tensors ({', '.join(list(state_dict)[:4])}, ...) match no known "
                        f"architecture at any width; expected {expected}")


@dataclass(frozen=True)
class CheckpointWeights:
    """One checkpoint flattened: a (1, P) weight row in the order of ``layout``."""

    weights: np.ndarray
    layout: tuple[TensorSlot, ...]
    arch: str
    width: float


def checkpoint_weights(state_dict: dict[str, torch.Tensor], arch: str | None = None) -> CheckpointWeights:
    """One checkpoint as a one-row weight array in layout order (NaN/Inf weights are refused by name)."""
    name, width = recognize_architecture(state_dict, arch)
    slots = layout(build_model(name, width))
    tensors = {slot.name: state_dict[slot.name] for slot in slots}  # layout order, not the file's
    bad = [key for key, tensor in tensors.items() if not torch.isfinite(tensor.float()).all()]
    if bad:
        raise DetectorError(f"the checkpoint has NaN or Inf weights in {', '.join(bad)}; not scored")
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors.values()]).numpy()[None]
    return CheckpointWeights(flat, tuple(slots), name, width)


def score_checkpoint(checkpoint: str | Path, detector_dir: str | Path, probes: str | Path | None = None,
                     arch: str | None = None) -> dict[str, Any]:
    """The verdict on one checkpoint: predicted class, probabilities, the detector's own
    held-out accuracy and, with a probe folder, InsideBias ratios."""
    state_dict = load_checkpoint(checkpoint)
    weights = checkpoint_weights(state_dict, arch)
    detector, meta = load_detector(detector_dir)
    proba = for_layout(detector, weights.layout).predict_proba(weights.weights)[0]
    classes = [str(c) for c in detector.classes_]
    predicted = classes[int(proba.argmax())]
    unbiased = [c for c in classes if c in UNBIASED_CLASSES]
    if unbiased:  # a biased-vs-not detector, or a face detector that knows "balanced"
        probability = 1 - sum(float(proba[classes.index(c)]) for c in unbiased)
        verdict = "unbiased" if predicted in unbiased else "biased"
    else:  # e.g. σ² levels: every class is some bias; report the level
        probability, verdict = float(proba.max()), f"{meta.get('target', 'class')} {predicted}"
    result = {
        "checkpoint": str(checkpoint), "arch": weights.arch, "width": weights.width,
        "detector": {"path": str(detector_dir), "name": meta.get("detector"), "target": meta.get("target"),
                     "heldout": meta.get("heldout"), "trained_on": meta.get("zoo")},
        "verdict": verdict, "probability": round(probability, 4), "predicted": predicted,
        "probabilities": {c: round(float(p), 4) for c, p in zip(classes, proba, strict=True)},
    }
    if probes is not None:
        model = build_model(weights.arch, weights.width)
        model.load_state_dict(state_dict)
        images = read_probe_folder(probes, model.input_shape[-1])
        result["insidebias"] = insidebias(model, images).to_dict()
    return result


def verdict_line(result: dict[str, Any]) -> str:
    """One line a person reads first."""
    heldout = (result["detector"].get("heldout") or {}).get("accuracy")
    trust = f" (detector's held-out accuracy {heldout:.1%})" if heldout is not None else ""
    probabilities = ", ".join(f"{c} {p:.2f}" for c, p in result["probabilities"].items())
    return (f"{result['checkpoint']}: {result['verdict']} (p = {result['probability']:.2f}) "
            f"[{probabilities}]{trust}; arch {result['arch']} width {result['width']:g}")


def checkpoint_insidebias(checkpoint: str | Path, *, dataset: str = "utkface_crop_part1",
                          data_dir: str | Path | None = None, per_group: int = 5,
                          seed: int = 0) -> dict[str, Any]:
    """InsideBias of a face checkpoint on ``per_group`` probes per group of a face dataset's
    balanced test set (``dataset``: a folder under ``<data root>/faces/``, or a path)."""
    from modelzoo.faces import GROUPS, find_face_folder, load_face_data

    state_dict = load_checkpoint(checkpoint)
    weights = checkpoint_weights(state_dict)
    model = build_model(weights.arch, weights.width)
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    faces = load_face_data(find_face_folder(dataset, data_dir), image_size=model.input_shape[-1])
    probes = probe_images(faces.test, GROUPS, per_group, seed)
    return {"checkpoint": str(checkpoint), "per_group": per_group, **insidebias(model, probes).to_dict()}
