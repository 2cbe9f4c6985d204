"""Networks that are not ours: a user's runnable program, judged by what it does on the battery.

Part of the detector stage (store → **detector** → report). A weight detector can only read
weights laid out as an architecture of the zoo; a probe detector needs only the network's
function, so ``weightbias score`` also takes

* a TorchScript archive (``torch.jit.save``; ``.pt``/``.pth``, recognised by its ``code/``
  folder), loaded with ``torch.jit.load``, which runs TorchScript, never Python pickles;
* a ``torch.export`` program (``.pt2``, ``torch.export.save``), loaded with
  ``torch.export.load``;
* ``--model-def package.module:Class`` plus a state_dict: the user's own class, built with no
  arguments, given the weights read with ``weights_only=True``.

The network must map the battery's images (uint8 scaled to [0, 1], N × 3 × 28 × 28 for the
digit tasks) to one logit per class; that is checked first, with a clear refusal. Hidden-layer
responses are read through forward hooks on ``nn.Conv2d``/``nn.Linear`` modules, which a
``--model-def`` network has; a compiled program runs its layers inside one graph, so its layer
features are set to the detector's training mean and only its answers and colour tuning speak.
Every such verdict says ``ood: uncalibrated architecture`` and gives percentiles among the
detector's training models instead of a probability.
"""

from __future__ import annotations

import importlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from detector.models import DetectorError
from modelzoo.checkpoints import CheckpointError, load_checkpoint

PROGRAM_SUFFIXES = (".pt2",)


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with compiled ``code/``), not a state_dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def is_program(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix.lower() in PROGRAM_SUFFIXES or (path.is_file() and is_torchscript(path))


def load_network(path: str | Path, model_def: str | None = None) -> tuple[Any, str]:
    """The runnable network in ``path`` and what it is (``TorchScript program``,
    ``torch.export program`` or ``module:Class``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if model_def is not None:
        return _user_module(path, model_def), model_def
    try:
        if path.suffix.lower() in PROGRAM_SUFFIXES:
            # A torch.export program keeps the mode it was exported in (it refuses eval()).
            return torch.export.load(str(path)).module(), "torch.export program"
        return torch.jit.load(str(path), map_location="cpu").eval(), "TorchScript program"
    except (RuntimeError, ValueError, KeyError, OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable program ({str(err).splitlines()[0]})") from err


def _user_module(path: Path, model_def: str) -> nn.Module:
    module_name, _, class_name = model_def.partition(":")
    if not module_name or not class_name:
        raise DetectorError(f"--model-def must read package.module:Class, got {model_def!r}")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise DetectorError(f"--model-def {model_def}: cannot import it ({err})") from err
    try:
        network = cls()
    except TypeError as err:
        raise DetectorError(f"--model-def {model_def}: the class must build without arguments "
                            f"({err})") from err
    try:
        network.load_state_dict(load_checkpoint(path))
        network.eval()
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise DetectorError(f"{path}: its tensors do not fit {model_def} ({first})") from err
    return network


def check_network(network: Any, images: np.ndarray, n_classes: int) -> int:
    """The batch size the network takes the battery's images in (a program exported for one
    image at a time gets 1); refuses a network that takes none or gives another number of classes."""
    from modelzoo.training import as_batch

    shape = "×".join(map(str, images.shape[1:]))
    problem = ""
    for batch in (2, 1):
        try:
            with torch.inference_mode():
                logits = network(as_batch(torch.from_numpy(np.ascontiguousarray(images[:batch])),
                                          torch.device("cpu")))
        except Exception as err:  # a user's forward may raise anything on an input it cannot take
            problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            continue
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (batch, n_classes):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise DetectorError(f"the network must give {n_classes} logits per {shape} image; it gave {got}")
        return 2048 if batch == 2 else 1
    raise DetectorError(f"the network does not take the battery's {shape} images ({problem})")


def network_row(pipeline, network: Any) -> tuple[np.ndarray, bool]:
    """A probe detector's feature row (1, F) of a runnable network, and whether its layers were
    read (else their columns hold the training mean)."""
    from detector.probing import ProbeFeatures, battery_row, network_responses

    features, head = pipeline[0], pipeline[-1]
    if not isinstance(features, ProbeFeatures):
        raise DetectorError("only a probe detector judges a network by what it does; this detector reads "
                            "weights of its zoo's architecture (train one with --detector probe)")
    battery = features.battery
    batch = check_network(network, battery.images, battery.n_classes)
    logits, hidden = network_responses(network, battery.images, batch)
    row = battery_row(logits, hidden, battery)
    return np.where(np.isnan(row), head.mean_, row)[None], bool(hidden)


def score_network(scorer: Any, path: Path, model_def: str | None) -> dict[str, Any]:
    """:meth:`detector.scoring.Scorer.score` for a network not of the zoo's architecture: the
    probe detector's answer, uncalibrated, with percentiles among its training models."""
    network, kind = load_network(path, model_def)
    row, layers_read = network_row(scorer.pipeline, network)
    raw = scorer.pipeline[1:].predict_proba(row)[0]
    predicted = scorer.classes[int(raw.argmax())]
    verdict, probability = scorer.verdict_for(raw, predicted)
    reasons = [f"uncalibrated architecture: a {kind}, which the detector's zoo ({scorer.zoo.get('arch')}) "
               "does not hold"]
    if not layers_read:
        reasons.append("its layers run inside one compiled graph: layer features are the training mean")
    raw_by_class = dict(zip(scorer.classes, np.round(raw, 4).tolist(), strict=True))
    return {"checkpoint": str(path), "arch": kind, "width": None, "renamed": {}, "detector": scorer.summary(),
            "verdict": verdict, "predicted": predicted, "probability": None, "probabilities": None,
            "uncalibrated": {"probability": round(probability, 4), "probabilities": raw_by_class},
            "calibrated": False, "percentiles": percentiles(scorer.pipeline[-1], row),
            "ood": {"in_distribution": False, "reasons": reasons, "distance_percentile": None},
            "evidence": None, **agreement(scorer.pipeline[-1], row)}


def agreement(head, row: np.ndarray) -> dict[str, float]:
    """``{"agreement": share}`` of a seed-ensemble head's members that give its answer on ``row``."""
    return {"agreement": round(float(head.agreement(row)[0]), 3)} if hasattr(head, "agreement") else {}


def percentiles(head, row: np.ndarray) -> dict[str, float]:
    """Per class, the share (%) of the detector's training models given a lower probability of it."""
    proba = head.predict_proba(row)[0]
    return {str(c): round(100.0 * float(np.mean(head.train_proba_[:, k] < proba[k])), 1)
            for k, c in enumerate(head.classes_)}
