"""Detector files: save a fitted detector pipeline and load it back without unpickling code.

Part of the detector stage. A detector is a folder::

    DET/detector.json       what it is: format and feature versions, one record per pipeline
                            step (its name and class), the classes, and the caller's info
                            (detector name, target, the zoo it was trained on, held-out scores)
    DET/arrays.safetensors  the arrays of weightbias's own steps (torch heads' network weights
                            and standardisation), as ``<step>.<array>``
    DET/<step>.skops        a scikit-learn step (StandardScaler, MLPClassifier,
                            HistGradientBoostingClassifier) in skops format
    DET/predictor.safetensors  a boosting detector's trees as plain arrays
                            (:mod:`detector.trees`): one checkpoint is scored without
                            importing scikit-learn or skops, which take longer than the rest
    DET/reference.safetensors  the training zoo's feature rows, labels and rows, for the
                            applicability check and the evidence of a verdict
                            (:mod:`detector.applicability`)

``detector.json`` ends with an integrity record: the sha256 of every other file and of its own
content. Loading checks it first, so a folder changed after it was saved (classes swapped, a
held-out accuracy edited, a file damaged or replaced) is refused instead of trusted.

Nothing switches on a detector's name. Each step is saved by its class, and only a class on
an allow-list is ever loaded:

* weightbias's own classes (:data:`OWN_TYPES`) say what they are with ``_save_state()`` →
  (JSON-ready state, arrays) and rebuild themselves with the classmethod
  ``_load_state(state, arrays)``; the JSON and safetensors formats hold data only.
* scikit-learn classes (:data:`SKOPS_TYPES`) go through skops, loaded with an explicit
  allow-list of the types they may contain (:data:`TRUSTED_SKOPS_TYPES`) and checked to be
  the class the JSON declares.

Anything else (an unknown class, another format or feature version, a damaged or missing file,
a skops file holding a type outside the allow-list) is refused with :class:`DetectorFileError`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from detector.features import FEATURE_VERSION
from detector.models import DetectorError, detector_name
from modelzoo.atomic import OutputFolderError, check_output_folder, staged_folder

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from sklearn.pipeline import Pipeline

    from detector.applicability import Reference

FORMAT = "weightbias-detector"
# 3: an integrity record (3: digests; 2: a pipeline of steps saved by class; 1: one object by name)
FORMAT_VERSION = 3
ARRAYS = "arrays.safetensors"
PREDICTOR = "predictor.safetensors"
# Our own step classes, by qualified name; each implements _save_state / _load_state.
OWN_TYPES = ("detector.transform.WeightFeatures", "detector.heads.LayerConvClassifier",
             "detector.heads.DeepSetsClassifier", "detector.probing.ProbeFeatures",
             "detector.ordinal.LogisticHead", "detector.groupscore.GroupScorer")
# scikit-learn step classes saved with skops.
SKOPS_TYPES = ("sklearn.preprocessing._data.StandardScaler",
               "sklearn.neural_network._multilayer_perceptron.MLPClassifier",
               "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier")
# The only non-builtin types beyond scikit-learn's estimators a skops step may hold.
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


class DetectorFileError(DetectorError):
    """A detector folder that is missing, damaged, of another version, or holds untrusted code."""


def _qualified(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def check_detector_folder(path: str | Path) -> Path:
    """Refuse, before any work, a ``--out`` a detector may not be written to: a file, a folder
    holding other things, or a place inside a zoo store."""
    try:
        return check_output_folder(path, "detector.json", ("*.safetensors", "*.skops"))
    except OutputFolderError as err:
        raise DetectorFileError(str(err)) from None


def save_detector(detector: Pipeline, path: str | Path, info: dict[str, Any] | None = None,
                  reference: Reference | None = None) -> Path:
    """Write a fitted detector pipeline (and ``info``: target, zoo, held-out scores, calibration...)
    to folder ``path``; with ``reference``, the training zoo's features for applicability checks.

    The folder is written whole under a temporary name beside it, with a digest of every file,
    and then renamed into place: an interrupted or failed save (a full disk) leaves nothing
    behind, and a detector already at ``path`` is replaced only by a complete one."""
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(detector)
    path = check_detector_folder(path)
    try:
        with staged_folder(path) as staging:
            _write_detector(detector, staging, info, reference)
    except OSError as err:
        raise DetectorFileError(f"{path}: cannot write the detector ({err.strerror or err}); nothing was "
                                "written there") from err
    return path


def _write_detector(detector: Pipeline, path: Path, info: dict[str, Any] | None,
                    reference: Reference | None) -> None:
    import skops.io as sio

    steps, arrays = [], {}
    for name, step in detector.steps:
        kind = _qualified(step)
        if kind in OWN_TYPES:
            state, own = step._save_state()
            arrays |= {f"{name}.{key}": np.ascontiguousarray(value) for key, value in own.items()}
            steps.append({"name": name, "class": kind, "state": state})
        elif kind in SKOPS_TYPES:
            (path / f"{name}.skops").write_bytes(sio.dumps(step))
            steps.append({"name": name, "class": kind, "file": f"{name}.skops"})
        else:
            raise DetectorError(f"step {name!r} is a {kind}, which detector files cannot hold; known: "
                                f"{', '.join(OWN_TYPES + SKOPS_TYPES)}")
    save_file(arrays, str(path / ARRAYS))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "feature_version": FEATURE_VERSION,
            "detector": detector_name(detector), "steps": steps,
            "classes": [c.item() if isinstance(c, np.generic) else c for c in detector.classes_],
            **(info or {})}
    predictor = _export_predictor(detector)
    if predictor is not None:
        state, tree_arrays = predictor
        save_file(tree_arrays, str(path / PREDICTOR))
        meta["predictor"] = {"kind": "trees", "file": PREDICTOR, "state": state}
    if reference is not None:
        meta["reference"] = reference.save(path)
    meta["integrity"] = {"files": {f.name: _file_digest(f) for f in sorted(path.iterdir())}}
    meta["integrity"]["json"] = _json_digest(meta)
    (path / "detector.json").write_text(json.dumps(meta, indent=2))


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json_digest(meta: dict[str, Any]) -> str:
    """sha256 of ``meta`` as canonical JSON, its own digest left out."""
    body = dict(meta, integrity={k: v for k, v in meta.get("integrity", {}).items() if k != "json"})
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_integrity(path: Path, meta: dict[str, Any]) -> None:
    """Every file of the folder as it was saved: ``detector.json`` unchanged since (its digest),
    every other file present with its recorded digest. A tampered or damaged folder is refused."""
    integrity = meta.get("integrity")
    if not isinstance(integrity, dict) or not isinstance(integrity.get("files"), dict) \
            or not isinstance(integrity.get("json"), str):
        raise DetectorFileError(f"{path}: detector.json has no integrity record; retrain the detector")
    if _json_digest(meta) != integrity["json"]:
        raise DetectorFileError(f"{path}: detector.json was changed after the detector was saved (its "
                                "digest does not match); restore the folder or retrain the detector")
    for name, digest in integrity["files"].items():
        file = path / str(name)
        if Path(str(name)).name != name or not file.is_file():
            raise DetectorFileError(f"{path}: {name} is missing; restore the folder or retrain the detector")
        if _file_digest(file) != digest:
            raise DetectorFileError(f"{path}: {name} was changed or damaged after the detector was saved "
                                    "(its digest does not match); restore the folder or retrain the detector")


def _export_predictor(detector: Pipeline) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """A features → boosting detector's trees as arrays (:mod:`detector.trees`), else None."""
    from detector.trees import export_trees

    final = detector[-1]
    if len(detector.steps) != 2 or _qualified(final) != SKOPS_TYPES[2]:
        return None
    return export_trees(final)


def read_detector_info(path: str | Path) -> dict[str, Any]:
    """The detector's ``detector.json``, checked for format and feature version."""
    path = Path(path)
    meta_file = path / "detector.json"
    if not meta_file.is_file():
        raise DetectorFileError(f"{path}: not a detector folder (no detector.json); train one with "
                                "`weightbias detector train`")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DetectorFileError(f"{meta_file}: unreadable ({err})") from err
    if not isinstance(meta, dict):
        raise DetectorFileError(f"{meta_file}: not a JSON object")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise DetectorFileError(f"{path}: format {meta.get('format')!r} v{meta.get('format_version')}; "
                                f"this weightbias reads {FORMAT} v{FORMAT_VERSION}: retrain the detector")
    if meta.get("feature_version") != FEATURE_VERSION:
        raise DetectorFileError(f"{path}: trained on weight features v{meta.get('feature_version')}; this "
                                f"weightbias computes v{FEATURE_VERSION}: retrain the detector")
    check_integrity(path, meta)
    steps = meta.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        raise DetectorFileError(f"{path}: detector.json lists no pipeline steps")
    for step in steps:
        name = step.get("name")
        if step.get("class") not in OWN_TYPES + SKOPS_TYPES:
            raise DetectorFileError(f"{path}: step {name!r} is of class {step.get('class')!r}, "
                                    "which is not on the allow-list of detector steps; refused")
        if not isinstance(name, str) or not name.isidentifier() or (
                step["class"] in SKOPS_TYPES and step.get("file") != f"{name}.skops"):
            raise DetectorFileError(f"{path}: step {name!r} names no file of its own; refused")
    return meta


def load_detector(path: str | Path) -> tuple[Pipeline, dict[str, Any]]:
    """The fitted detector pipeline saved in folder ``path``, and its ``detector.json``."""
    from sklearn.pipeline import Pipeline

    path = Path(path)
    meta = read_detector_info(path)
    try:
        arrays = load_file(str(path / ARRAYS))
        steps = [(step["name"], _load_step(path, step, arrays)) for step in meta["steps"]]
        detector = Pipeline(steps)
    except DetectorFileError:
        raise
    except (OSError, SafetensorError, zipfile.BadZipFile, KeyError, ValueError, RuntimeError, TypeError,
            AttributeError) as err:
        raise DetectorFileError(f"{path}: damaged detector file ({type(err).__name__}: {err})") from err
    return detector, meta


def _load_step(path: Path, step: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    """One step, by its class on the allow-list (checked by :func:`read_detector_info`)."""
    kind, name = step["class"], step["name"]
    if kind in OWN_TYPES:
        module, _, qualname = kind.rpartition(".")
        cls = getattr(importlib.import_module(module), qualname)
        prefix = f"{name}."
        own = {key.removeprefix(prefix): value for key, value in arrays.items() if key.startswith(prefix)}
        return cls._load_state(step["state"], own)
    import skops.io as sio

    data = (path / step["file"]).read_bytes()
    untrusted = set(sio.get_untrusted_types(data=data)) - set(TRUSTED_SKOPS_TYPES)
    if untrusted:
        raise DetectorFileError(f"{path}: {step['file']} holds types outside the allow-list "
                                f"{sorted(untrusted)}; refused")
    loaded = sio.loads(data, trusted=TRUSTED_SKOPS_TYPES)
    if _qualified(loaded) != kind:
        raise DetectorFileError(f"{path}: {step['file']} holds a {_qualified(loaded)}, but detector.json "
                                f"declares a {kind}; refused")
    return loaded
