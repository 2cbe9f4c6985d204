"""Scoring: tell a user whether a checkpoint they trained carries hidden bias.

Last stage of the flow (detector → **report**). A checkpoint from anywhere (a state_dict in
``.pt``, ``.safetensors`` or ``.h5``, read without unpickling) is matched to one of our
architectures by its tensor names and shapes, flattened in layout order and given to a
trained detector; with probe images per group, InsideBias ratios come alongside.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from detector.files import load_detector
from detector.insidebias import insidebias, read_probe_folder
from detector.models import DetectorError, WeightSet
from modelzoo.architectures import ARCHITECTURES, build_model, layout
from modelzoo.checkpoints import load_checkpoint

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


def checkpoint_weights(state_dict: dict[str, torch.Tensor], arch: str | None = None) -> WeightSet:
    """One checkpoint as a one-row :class:`WeightSet` (NaN/Inf weights are refused by name)."""
    name, width = recognize_architecture(state_dict, arch)
    slots = layout(build_model(name, width))
    tensors = {slot.name: state_dict[slot.name] for slot in slots}  # layout order, not the file's
    bad = [key for key, tensor in tensors.items() if not torch.isfinite(tensor.float()).all()]
    if bad:
        raise DetectorError(f"the checkpoint has NaN or Inf weights in {', '.join(bad)}; not scored")
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors.values()]).numpy()[None]
    return WeightSet(flat, tuple(slots), name, width)


def score_checkpoint(checkpoint: str | Path, detector_dir: str | Path, probes: str | Path | None = None,
                     arch: str | None = None) -> dict[str, Any]:
    """The verdict on one checkpoint: predicted class, probabilities, the detector's own
    held-out accuracy and, with a probe folder, InsideBias ratios."""
    state_dict = load_checkpoint(checkpoint)
    weights = checkpoint_weights(state_dict, arch)
    detector, meta = load_detector(detector_dir)
    proba = detector.predict_proba(weights)[0]
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
        "detector": {"path": str(detector_dir), "name": meta["detector"], "target": meta.get("target"),
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
