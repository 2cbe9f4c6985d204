"""The names the command line offers as choices: detectors, targets, splits.

Plain tuples in a module that imports nothing, so ``weightbias --help`` builds its parser
without loading scikit-learn or torch. The registries they name live in
:mod:`detector.models` (``DETECTORS``) and :mod:`detector.evaluate` (``labels``,
``split_rows``); ``tests/test_detector_sklearn.py`` checks that the two agree.
"""

from __future__ import annotations

#: Detectors by name, as :func:`detector.models.make_detector` builds them.
DETECTOR_NAMES = ("boosting", "deepsets", "dense", "layer_conv", "probe", "rescaled", "hybrid")
#: Detectors whose features mean the same at every width of an architecture.
WIDTH_INDEPENDENT = ("boosting", "deepsets", "probe", "rescaled", "hybrid")
#: What a detector can be trained to predict (:func:`detector.evaluate.labels`).
TARGETS = ("bias_level", "biased", "regularizer")
#: How a zoo's models are split into training and held-out models (:func:`detector.evaluate.split_rows`).
SPLITS = ("pool", "random")
