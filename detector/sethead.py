"""A fitted DeepSets head as plain arrays: score one checkpoint without importing scikit-learn.

Part of the detector stage. The ``deepsets`` detector's classifier
(:class:`~detector.heads.DeepSetsClassifier`) is a scikit-learn estimator around a small torch
network, and its module imports scikit-learn, which costs more than reading and judging a
checkpoint (see :mod:`detector.trees` for the same reason behind boosting's export). What the
fitted head computes needs neither: standardise the extra columns and each set's elements,
run each set through its two-layer ReLU encoder, pool by mean and max, and a two-layer head
gives the logits. The detector file already holds every array that takes
(``arrays.safetensors``: ``classifier.extra_mean_`` ... ``classifier.network.*``), so
:class:`SetHead` reads them from there and repeats the forward pass in numpy, in the head's own
arithmetic (inputs standardised in float32, the network in float64), which gives the
classifier's probabilities to 1e-9 (``tests/test_scoring.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SetHead:
    """The arrays of a fitted DeepSetsClassifier and its forward pass, for any set sizes."""

    n_extra: int
    element_dim: int
    classes: tuple
    extra_mean: np.ndarray
    extra_scale: np.ndarray
    element_mean: np.ndarray  # (sets, element_dim)
    element_scale: np.ndarray
    encoders: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]  # per set: W0, b0, W1, b1
    head: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

    @classmethod
    def from_step(cls, step: dict[str, Any], arrays: dict[str, np.ndarray]) -> SetHead:
        """The head saved as pipeline step ``step`` (its ``detector.json`` record) in ``arrays``."""
        state, prefix = step["state"], f"{step['name']}."
        if state.get("version") != 1:
            raise ValueError(f"DeepSetsClassifier state v{state.get('version')}; this weightbias reads v1")
        get = {key.removeprefix(prefix): value for key, value in arrays.items() if key.startswith(prefix)}
        n_sets = len(get["element_mean_"])
        encoders = tuple(tuple(get[f"network.encoders.{i}.{layer}.{part}"] for layer in (0, 2)
                               for part in ("weight", "bias")) for i in range(n_sets))
        head = tuple(get[f"network.head.{layer}.{part}"] for layer in (0, 2) for part in ("weight", "bias"))
        params = state["params"]
        return cls(int(params["n_extra"]), int(params["element_dim"]), tuple(state["classes"]),
                   get["extra_mean_"], get["extra_scale_"], get["element_mean_"], get["element_scale_"],
                   encoders, head)

    @property
    def classes_(self) -> np.ndarray:
        return np.array(self.classes)

    def predict_proba(self, X: np.ndarray, set_sizes: tuple[int, ...]) -> np.ndarray:
        """Class probabilities of feature rows X (``first_layer+units`` of a layout whose hidden
        layers have ``set_sizes`` units), columns in the order of ``classes``."""
        X = np.asarray(X, dtype=np.float32)
        columns = self.n_extra + sum(set_sizes) * self.element_dim
        if len(set_sizes) != len(self.encoders) or X.shape[1] != columns:
            raise ValueError(f"feature rows of {X.shape[1]} columns do not make {self.n_extra} extra columns "
                             f"and sets of sizes {set_sizes} with {self.element_dim} columns per element")
        extra = ((X[:, : self.n_extra] - self.extra_mean) / self.extra_scale).astype(np.float64)
        summaries, start = [], self.n_extra
        for size, mean, scale, (w0, b0, w1, b1) in zip(set_sizes, self.element_mean, self.element_scale,
                                                       self.encoders, strict=True):
            stop = start + size * self.element_dim
            elements = ((X[:, start:stop].reshape(len(X), size, self.element_dim) - mean) / scale)
            hidden = _relu(_relu(elements.astype(np.float64) @ w0.T + b0) @ w1.T + b1)
            summaries += [hidden.mean(axis=1), hidden.max(axis=1)]
            start = stop
        w0, b0, w1, b1 = self.head
        logits = _relu(np.concatenate([extra, *summaries], axis=1) @ w0.T + b0) @ w1.T + b1
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)
