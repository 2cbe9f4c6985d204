"""Detector files: save a fitted meta-detector and load it back without unpickling code.

Part of the detector stage. A detector is a folder::

    DET/detector.json        what it is: name, hyper-parameters, classes, target, the
                             architecture and layout it reads, feature version, the zoo it
                             was trained on and its held-out scores
    DET/model.safetensors    torch detectors: network weights and standardisation arrays
    DET/model.skops          scikit-learn detectors: skops format, loaded with an explicit
                             allow-list of scikit-learn types (anything else is refused)

Loading checks the format and feature versions and refuses a mismatch with a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import skops.io as sio
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from detector.features import FEATURE_VERSION
from detector.models import (
    DETECTORS,
    DeepSetsDetector,
    DeepSetsNet,
    DetectorError,
    LayerConvDetector,
    LayerConvNet,
    WeightDetector,
)

FORMAT = "weightbias-detector"
FORMAT_VERSION = 1
# The only non-builtin types a scikit-learn detector file may hold.
TRUSTED_SKOPS_TYPES = [
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    "sklearn._loss.link.Interval",
    "sklearn._loss.link.LogitLink",
    "sklearn._loss.link.MultinomialLogit",
    "sklearn._loss.loss.HalfBinomialLoss",
    "sklearn._loss.loss.HalfMultinomialLoss",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.preprocessing._label.LabelBinarizer",
    "collections.OrderedDict",
]
_TORCH_ARRAYS = {"layer_conv": ("means_", "stds_"),
                 "deepsets": ("extra_mean_", "extra_std_", "unit_means_", "unit_stds_")}


class DetectorFileError(DetectorError):
    """A detector folder that is missing, damaged, of another version, or holds untrusted code."""


def save_detector(detector: WeightDetector, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write a fitted detector (and ``info``: target, zoo, held-out scores...) to folder ``path``."""
    if not hasattr(detector, "classes_"):
        raise DetectorError("only a fitted detector can be saved")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "feature_version": FEATURE_VERSION,
        "detector": detector.name, "params": detector.get_params(),
        "classes": [c.item() if isinstance(c, np.generic) else c for c in detector.classes_],
        "arch": detector.arch_, "width": detector.width_, "tensor_names": list(detector.tensor_names_),
        "layout_shapes": [list(s) for s in detector.layout_shapes_], **(info or {}),
    }
    if detector.name in _TORCH_ARRAYS:
        tensors = {f"network.{k}": v.contiguous() for k, v in detector.network_.state_dict().items()}
        for attr in _TORCH_ARRAYS[detector.name]:
            value = getattr(detector, attr)
            items = value if isinstance(value, list) else [value]
            meta.setdefault("array_counts", {})[attr] = len(items) if isinstance(value, list) else None
            for i, array in enumerate(items):
                tensors[f"{attr}.{i}"] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        save_file(tensors, str(path / "model.safetensors"))
    else:
        (path / "model.skops").write_bytes(sio.dumps(detector.model_))
    (path / "detector.json").write_text(json.dumps(meta, indent=2))
    return path


def read_detector_info(path: str | Path) -> dict[str, Any]:
    """The detector's ``detector.json``, checked for format and feature version."""
    path = Path(path)
    meta_file = path / "detector.json"
    if not meta_file.is_file():
        raise DetectorFileError(f"{path}: not a detector folder (no detector.json); train one with "
                                "`weightbias detector train`")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DetectorFileError(f"{meta_file}: unreadable ({err})") from err
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise DetectorFileError(f"{path}: format {meta.get('format')!r} v{meta.get('format_version')}; "
                                f"this weightbias reads {FORMAT} v{FORMAT_VERSION}")
    if meta.get("feature_version") != FEATURE_VERSION:
        raise DetectorFileError(f"{path}: trained on weight features v{meta.get('feature_version')}; this "
                                f"weightbias computes v{FEATURE_VERSION}: retrain the detector")
    if meta.get("detector") not in DETECTORS:
        raise DetectorFileError(f"{path}: unknown detector {meta.get('detector')!r}")
    return meta


def load_detector(path: str | Path) -> tuple[WeightDetector, dict[str, Any]]:
    """The fitted detector saved in folder ``path`` and its ``detector.json``."""
    path = Path(path)
    meta = read_detector_info(path)
    detector = DETECTORS[meta["detector"]](**meta["params"])
    detector.classes_ = np.array(meta["classes"])
    detector.arch_, detector.width_ = meta["arch"], meta["width"]
    detector.tensor_names_ = tuple(meta["tensor_names"])
    detector.layout_shapes_ = tuple(tuple(s) for s in meta["layout_shapes"])
    try:
        if meta["detector"] in _TORCH_ARRAYS:
            _load_torch(detector, meta, load_file(str(path / "model.safetensors")))
        else:
            data = (path / "model.skops").read_bytes()
            untrusted = set(sio.get_untrusted_types(data=data)) - set(TRUSTED_SKOPS_TYPES)
            if untrusted:
                raise DetectorFileError(f"{path}: model.skops holds types outside the allow-list "
                                        f"{sorted(untrusted)}; refused")
            detector.model_ = sio.loads(data, trusted=TRUSTED_SKOPS_TYPES)
    except DetectorFileError:
        raise
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError, TypeError) as err:
        raise DetectorFileError(f"{path}: damaged detector file ({err})") from err
    return detector, meta


def _load_torch(detector: WeightDetector, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    for attr in _TORCH_ARRAYS[detector.name]:
        count = meta["array_counts"][attr]
        arrays = [tensors[f"{attr}.{i}"].numpy() for i in range(count or 1)]
        setattr(detector, attr, arrays if count is not None else arrays[0])
    n_classes = len(detector.classes_)
    if isinstance(detector, LayerConvDetector):
        network = LayerConvNet(len(detector.means_), n_classes)
    elif isinstance(detector, DeepSetsDetector):
        network = DeepSetsNet(len(detector.unit_means_), len(detector.unit_means_[0]),
                              len(detector.extra_mean_), n_classes)
    state = {k.removeprefix("network."): v for k, v in tensors.items() if k.startswith("network.")}
    network.load_state_dict(state)
    network.eval()
    detector.network_ = network
