"""detector: reads weights and judges them (last stage of the flow: store → **detector** → report).

A detector is a scikit-learn :class:`~sklearn.pipeline.Pipeline` from flat weight rows to a
class per model: :class:`WeightFeatures` (weights → features) or :class:`ProbeFeatures` (what
the network does on a probe battery: :class:`Battery` for digits, :class:`FaceBattery` for
faces), then a classifier (:mod:`detector.models`: ``probe``, ``rescaled``, ``hybrid``,
``boosting``, ``deepsets``, ``dense``, ``layer_conv``). Around it:
:func:`train_detector` / :func:`evaluate_detector` on zoos (a chunk of weights at a time),
:func:`save_detector` / :func:`load_detector` (folders loaded without unpickling),
:func:`score_checkpoints` / :func:`score_checkpoint` for a user's own checkpoints, whatever
their layers are called (a calibrated probability, whether the checkpoint is like the
detector's training models, the evidence; :class:`Scorer` loads a detector once),
:func:`insidebias` from activations on probe images, and :func:`compare`, the regularizer
report (:mod:`detector.report`). The ``weightbias`` command line (:mod:`detector.cli`) only
parses, calls these and prints.

Names are imported on first use, so ``import detector`` loads neither torch nor scikit-learn.

Example
-------
Half of 40 small digit-cnns get a louder first layer; boosting on weight statistics tells
them apart from the weights alone:

>>> import numpy as np
>>> import detector
>>> from modelzoo.layouts import arch_layout
>>> layout = arch_layout("digit-cnn", 0.25)
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(0, 0.05, (40, layout[-1].offset + layout[-1].size)).astype(np.float32)
>>> X[1::2, : layout[0].size] *= 3
>>> y = np.array(["unbiased", "biased"] * 20)
>>> model = detector.make_detector("boosting", layout, max_iter=20).fit(X, y)
>>> model.predict(X[:4]).tolist()
['unbiased', 'biased', 'unbiased', 'biased']

On a zoo (trains on pool A, scores on pool B, saves the folder ``det``):

>>> pipeline, info = detector.train_detector("zoo.zarr", target="biased", out="det")  # doctest: +SKIP
>>> info["heldout"]["accuracy"]  # doctest: +SKIP
0.98
>>> result = detector.score_checkpoint("mine.pt", "det")  # doctest: +SKIP
>>> result["verdict"], result["ood"]["in_distribution"]  # doctest: +SKIP
('biased', True)
"""

from __future__ import annotations

from modelzoo._lazy import lazy_exports

_EXPORTS = {
    "DetectorError": "detector.models", "DETECTORS": "detector.models", "make_detector": "detector.models",
    "for_layout": "detector.models",
    "DETECTOR_NAMES": "detector.names", "TARGETS": "detector.names", "SPLITS": "detector.names",
    "WeightFeatures": "detector.transform",
    "LayerConvClassifier": "detector.heads", "DeepSetsClassifier": "detector.heads",
    "train_detector": "detector.workflow", "evaluate_detector": "detector.workflow",
    "fit_on_zoo": "detector.workflow",
    "labels": "detector.evaluate", "split_rows": "detector.evaluate", "zoo_features": "detector.evaluate",
    "save_detector": "detector.files", "load_detector": "detector.files",
    "DetectorFileError": "detector.files",
    "score_checkpoint": "detector.scoring", "checkpoint_weights": "detector.scoring",
    "checkpoint_insidebias": "detector.scoring", "score_checkpoints": "detector.scoring",
    "Scorer": "detector.scoring", "verdict_lines": "detector.verdicts",
    "Reference": "detector.applicability", "wilson_interval": "detector.calibration",
    "calibrate": "detector.calibration", "TreeEnsemble": "detector.trees",
    "insidebias": "detector.activations", "InsideBiasResult": "detector.activations",
    "InsideBiasError": "detector.activations", "probe_images": "detector.activations",
    "read_probe_folder": "detector.activations",
    "compare": "detector.report",
    "behaviour_ceiling": "detector.ceiling",
    "ProbeFeatures": "detector.probing", "LogisticHead": "detector.ordinal", "Battery": "detector.battery",
    "battery_for_task": "detector.battery", "battery_for_zoo": "detector.battery",
    "recalibrate_detector": "detector.recalibrate",
    "FaceBattery": "detector.facebattery", "face_battery": "detector.facebattery",
    "GroupScorer": "detector.groupscore",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
