"""Meta-detectors: learn what bias a model carries from its weights alone (IFBiD), sklearn-style.

Stage of the flow: store → **detector** → report. A detector is fitted on a
:class:`WeightSet` (flat weight rows of one architecture, plus its layout) and a label per
model (σ² or ρ as classes, the favoured face group, biased vs not, the regularizer), then
``predict``/``predict_proba``/``score`` new weight sets, as scikit-learn classifiers do.

Four detectors, selectable by name (:data:`DETECTORS`):

* ``dense`` — IFBiD's first baseline: a dense MLP on the raw, standardised flat weights.
  Tied to one exact layout; breaks under a permutation of hidden units.
* ``layer_conv`` — IFBiD's second baseline: each layer's flattened weights go through their
  own small 1-D convolutional block, the blocks' pooled outputs are concatenated, then a
  dense head. Also tied to one layout.
* ``boosting`` — gradient boosting on per-tensor statistics and first-layer colour statistics
  (the strong simple baseline of Unterthiner et al. 2020). Permutation invariant, and the
  features have the same meaning at any width.
* ``deepsets`` — a permutation-invariant network: each hidden unit is described by its
  incoming and outgoing weights, a shared per-layer encoder embeds every unit, mean and max
  pooling over units make the layer's summary (so any width fits), a head classifies.

Every detector learns from feature rows it computes from each model's weights alone
(:meth:`WeightDetector.features`: the raw weights for ``dense`` and ``layer_conv``,
statistics for the others), so ``fit``/``predict`` also take those rows precomputed, as a
:class:`FeatureSet`: :func:`detector.evaluate.zoo_features` builds one chunk by chunk from a
zoo larger than memory, never holding its weight matrix.

Fitted detectors are saved by :mod:`detector.files` without pickling code.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from detector.features import UNIT_DESCRIPTORS, feature_names, find_layers, neuron_sets, weight_features
from modelzoo.architectures import TensorSlot
from modelzoo.errors import WeightbiasError


class DetectorError(WeightbiasError, ValueError):
    """Input a detector cannot take: wrong architecture, bad labels, an unfitted detector."""


def _model_rows(values: np.ndarray, name: str, columns: str) -> np.ndarray:
    """``values`` as float32 (models, columns), refusing another shape or a row with NaN/Inf."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise DetectorError(f"{name} must be (models, {columns}), got shape {values.shape}")
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if bad.size:
        raise DetectorError(f"models {bad[:10].tolist()} have NaN or Inf {name}; they cannot be scored")
    return values.astype(np.float32, copy=False)


@dataclass(frozen=True)
class WeightSet:
    """Flat weight rows of models that share one architecture, with the layout they follow."""

    weights: np.ndarray
    slots: tuple[TensorSlot, ...]
    arch: str
    width: float = 1.0

    def __post_init__(self) -> None:
        weights = _model_rows(self.weights, "weights", "parameters")
        expected = sum(slot.size for slot in self.slots)
        if weights.shape[1] != expected:
            raise DetectorError(f"weights have {weights.shape[1]} parameters but the {self.arch} "
                                f"(width {self.width:g}) layout has {expected}")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "slots", tuple(self.slots))

    def __len__(self) -> int:
        return len(self.weights)

    def subset(self, rows: np.ndarray) -> WeightSet:
        return WeightSet(self.weights[rows], self.slots, self.arch, self.width)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(slot.name for slot in self.slots)


@dataclass(frozen=True)
class FeatureSet:
    """A detector's feature rows for some models (row i from model i's weights alone), with the
    layout of the weights they came from.

    ``kind`` is the :attr:`WeightDetector.feature_kind` of the detectors that compute and read
    them; ``fit``/``predict`` take a FeatureSet of their own kind in place of a :class:`WeightSet`.
    """

    features: np.ndarray
    kind: str
    slots: tuple[TensorSlot, ...]
    arch: str
    width: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", _model_rows(self.features, "features", "features"))
        object.__setattr__(self, "slots", tuple(self.slots))

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, rows: np.ndarray) -> FeatureSet:
        return FeatureSet(self.features[rows], self.kind, self.slots, self.arch, self.width)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(slot.name for slot in self.slots)


class WeightDetector(ClassifierMixin, BaseEstimator, metaclass=ABCMeta):
    """Shared checks: what a detector was fitted on, and what it will accept to predict."""

    #: True when the detector reads the exact flat layout (raw weights), False when it reads
    #: features that mean the same at any width.
    needs_exact_layout = True
    #: Names what :meth:`features` computes; a :class:`FeatureSet` given to fit/predict must match.
    feature_kind = "raw"

    def features(self, X: WeightSet) -> np.ndarray:
        """The feature rows (len(X), F) this detector learns from: here the raw flat weights.

        Row i depends on model i's weights alone and on no fitted state, so rows computed a
        chunk of models at a time equal rows computed all at once."""
        return X.weights

    def feature_set(self, X: WeightSet | FeatureSet) -> FeatureSet:
        """``X`` as this detector's features; a FeatureSet of its kind passes through as it is."""
        if isinstance(X, FeatureSet):
            if X.kind != self.feature_kind:
                raise DetectorError(f"these are {X.kind!r} features; a {type(self).__name__} reads "
                                    f"{self.feature_kind!r} features (compute them with its features())")
            return X
        if not isinstance(X, WeightSet):
            raise DetectorError(f"X must be a WeightSet or a FeatureSet, got {type(X).__name__}")
        return FeatureSet(self.features(X), self.feature_kind, X.slots, X.arch, X.width)

    def fit(self, X: WeightSet | FeatureSet, y) -> WeightDetector:
        X = self.feature_set(X)
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(X):
            raise DetectorError(f"y must hold one label per model ({len(X)}), got shape {y.shape}")
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DetectorError(f"y has a single class {self.classes_.tolist()}; a detector needs two "
                                "or more")
        self.arch_, self.width_ = X.arch, X.width
        self.tensor_names_ = X.tensor_names
        self.layout_shapes_ = tuple(slot.shape for slot in X.slots)
        self._fit(X, encoded)
        return self

    def predict_proba(self, X: WeightSet | FeatureSet) -> np.ndarray:
        self._check_input(X)
        return self._proba(self.feature_set(X))

    def predict(self, X: WeightSet | FeatureSet) -> np.ndarray:
        proba = self.predict_proba(X)  # checks first: an unfitted detector has no classes_
        return self.classes_[proba.argmax(axis=1)]

    def _check_input(self, X: WeightSet | FeatureSet) -> None:
        if not hasattr(self, "classes_"):
            raise DetectorError(f"this {type(self).__name__} is not fitted yet; call fit first")
        if not isinstance(X, WeightSet | FeatureSet):
            raise DetectorError(f"X must be a WeightSet or a FeatureSet, got {type(X).__name__}")
        if X.arch != self.arch_ or X.tensor_names != self.tensor_names_:
            raise DetectorError(f"this detector reads {self.arch_} models; got {X.arch} "
                                f"(tensors {', '.join(X.tensor_names[:3])}, ...)")
        shapes = tuple(slot.shape for slot in X.slots)
        if self.needs_exact_layout and shapes != self.layout_shapes_:
            raise DetectorError(f"this {type(self).__name__} reads the exact {self.arch_} width "
                                f"{self.width_:g} layout; got width {X.width:g}. Use a width-independent "
                                "detector (boosting, deepsets) across widths")

    @abstractmethod
    def _fit(self, X: FeatureSet, y: np.ndarray) -> None:
        """Fit on this detector's features and labels already encoded as 0..len(classes_) - 1."""

    @abstractmethod
    def _proba(self, X: FeatureSet) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``."""


class DenseDetector(WeightDetector):
    """IFBiD's dense baseline: standardised raw weights → MLP (scikit-learn)."""

    name = "dense"

    def __init__(self, hidden: int = 128, alpha: float = 1e-3, max_iter: int = 300, random_state: int = 0):
        self.hidden = hidden
        self.alpha = alpha
        self.max_iter = max_iter
        self.random_state = random_state

    def _fit(self, X: FeatureSet, y: np.ndarray) -> None:
        self.model_: Pipeline = make_pipeline(
            StandardScaler(),
            MLPClassifier((self.hidden,), alpha=self.alpha, max_iter=self.max_iter,
                          early_stopping=len(y) >= 50, random_state=self.random_state))
        self.model_.fit(X.features, y)

    def _proba(self, X: FeatureSet) -> np.ndarray:
        return self.model_.predict_proba(X.features)


class BoostingDetector(WeightDetector):
    """Gradient boosting on per-tensor statistics and first-layer colour statistics."""

    name = "boosting"
    needs_exact_layout = False
    feature_kinds = ("stats", "first_layer")
    feature_kind = "+".join(feature_kinds)

    def __init__(self, max_iter: int = 300, learning_rate: float = 0.05, min_samples_leaf: int = 4,
                 random_state: int = 0):
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.min_samples_leaf = min_samples_leaf  # small: a zoo may hold only tens of models per class
        self.random_state = random_state

    def features(self, X: WeightSet) -> np.ndarray:
        return np.hstack([weight_features(X.weights, list(X.slots), kind) for kind in self.feature_kinds])

    def _fit(self, X: FeatureSet, y: np.ndarray) -> None:
        self.model_ = HistGradientBoostingClassifier(
            max_iter=self.max_iter, learning_rate=self.learning_rate, min_samples_leaf=self.min_samples_leaf,
            early_stopping=False, random_state=self.random_state)
        self.model_.fit(X.features, y)

    def _proba(self, X: FeatureSet) -> np.ndarray:
        return self.model_.predict_proba(X.features)


class _TorchDetector(WeightDetector):
    """Full-batch Adam training of a small torch network, seeded; weights kept as tensors."""

    def _train(self, build: Callable[[], nn.Module], inputs: list[torch.Tensor], y: np.ndarray) -> None:
        torch.manual_seed(self.random_state)  # before building: the initial weights are seeded too
        network = build()
        target = torch.as_tensor(y, dtype=torch.long)
        optimizer = torch.optim.Adam(network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        network.train()
        for _ in range(self.epochs):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(network(*inputs), target)
            loss.backward()
            optimizer.step()
        network.eval()
        self.network_ = network

    @torch.no_grad()
    def _softmax(self, inputs: list[torch.Tensor]) -> np.ndarray:
        return torch.softmax(self.network_(*inputs), dim=1).numpy()


class LayerConvNet(nn.Module):
    """One 1-D conv block per layer over its flattened weights; pooled, concatenated, classified."""

    def __init__(self, n_layers: int, n_classes: int, channels: int = 8, pooled: int = 16, hidden: int = 64):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(1, channels, 9, stride=4), nn.ReLU(), nn.AdaptiveMaxPool1d(pooled))
            for _ in range(n_layers))
        self.head = nn.Sequential(nn.Linear(n_layers * channels * pooled, hidden), nn.ReLU(),
                                  nn.Linear(hidden, n_classes))

    def forward(self, *layers: torch.Tensor) -> torch.Tensor:
        pooled = [block(layer[:, None, :]).flatten(1)
                  for block, layer in zip(self.blocks, layers, strict=True)]
        return self.head(torch.cat(pooled, dim=1))


class LayerConvDetector(_TorchDetector):
    """IFBiD's per-layer convolutional baseline on the raw weights of each layer (weight and
    bias of a layer concatenated), standardised per layer."""

    name = "layer_conv"

    def __init__(self, epochs: int = 300, lr: float = 1e-3, weight_decay: float = 1e-4,
                 random_state: int = 0):
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.random_state = random_state

    def _layers(self, X: FeatureSet) -> list[np.ndarray]:
        spans: dict[str, list[TensorSlot]] = {}
        for slot in X.slots:
            spans.setdefault(slot.name.rsplit(".", 1)[0], []).append(slot)
        return [np.hstack([X.features[:, s.offset : s.offset + s.size] for s in slots])
                for slots in spans.values()]

    def _inputs(self, X: FeatureSet) -> list[torch.Tensor]:
        return [torch.from_numpy((layer - mean) / std) for layer, mean, std
                in zip(self._layers(X), self.means_, self.stds_, strict=True)]

    def _fit(self, X: FeatureSet, y: np.ndarray) -> None:
        layers = self._layers(X)
        self.means_ = [layer.mean(axis=0) for layer in layers]
        self.stds_ = [layer.std(axis=0) + 1e-6 for layer in layers]
        self._train(lambda: LayerConvNet(len(layers), len(self.classes_)), self._inputs(X), y)

    def _proba(self, X: FeatureSet) -> np.ndarray:
        return self._softmax(self._inputs(X))


class DeepSetsNet(nn.Module):
    """Shared per-layer unit encoder φ, mean+max pooling over units, head ρ on the summaries
    (and on the first-layer statistics, which are already invariant)."""

    def __init__(self, n_layers: int, unit_dim: int, extra_dim: int, n_classes: int, hidden: int = 32):
        super().__init__()
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Linear(unit_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
            for _ in range(n_layers))
        self.head = nn.Sequential(nn.Linear(n_layers * 2 * hidden + extra_dim, 2 * hidden), nn.ReLU(),
                                  nn.Linear(2 * hidden, n_classes))

    def forward(self, extra: torch.Tensor, *layers: torch.Tensor) -> torch.Tensor:
        summaries = []
        for encoder, units in zip(self.encoders, layers, strict=True):
            embedded = encoder(units)  # (models, units, hidden)
            summaries += [embedded.mean(dim=1), embedded.amax(dim=1)]
        return self.head(torch.cat([extra, *summaries], dim=1))


class DeepSetsDetector(_TorchDetector):
    """Permutation-invariant detector over neurons (DeepSets), valid at any width."""

    name = "deepsets"
    needs_exact_layout = False
    feature_kind = "first_layer+units"

    def __init__(self, epochs: int = 400, lr: float = 3e-3, weight_decay: float = 1e-4,
                 random_state: int = 0):
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.random_state = random_state

    def features(self, X: WeightSet) -> np.ndarray:
        """First-layer statistics, then each hidden layer's unit descriptors (unit by unit)."""
        slots = list(X.slots)
        units = [layer.reshape(len(X), -1) for layer in neuron_sets(X.weights, slots)]
        return np.hstack([weight_features(X.weights, slots, "first_layer"), *units])

    @staticmethod
    def _split(X: FeatureSet) -> tuple[np.ndarray, list[np.ndarray]]:
        """First-layer statistics (models, F) and per hidden layer (models, units, descriptors)."""
        slots = list(X.slots)
        start = len(feature_names(slots, "first_layer"))
        # Contiguous copies: numpy's float32 sums then run in the same order as on neuron_sets' arrays.
        extra, layers = np.ascontiguousarray(X.features[:, :start]), []
        for layer in find_layers(slots)[:-1]:
            stop = start + layer.n_out * len(UNIT_DESCRIPTORS)
            units = X.features[:, start:stop].reshape(len(X), layer.n_out, len(UNIT_DESCRIPTORS))
            layers.append(np.ascontiguousarray(units))
            start = stop
        if start != X.features.shape[1]:
            raise DetectorError(f"{X.features.shape[1]} deepsets features do not fit the {X.arch} layout "
                                f"(width {X.width:g}), which makes {start}")
        return extra, layers

    def _inputs(self, X: FeatureSet) -> list[torch.Tensor]:
        extra, layers = self._split(X)
        extra = (extra - self.extra_mean_) / self.extra_std_
        units = [(layer - mean) / std
                 for layer, mean, std in zip(layers, self.unit_means_, self.unit_stds_, strict=True)]
        return [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in (extra, *units)]

    def _fit(self, X: FeatureSet, y: np.ndarray) -> None:
        extra, layers = self._split(X)
        self.extra_mean_, self.extra_std_ = extra.mean(axis=0), extra.std(axis=0) + 1e-6
        self.unit_means_ = [layer.mean(axis=(0, 1)) for layer in layers]
        self.unit_stds_ = [layer.std(axis=(0, 1)) + 1e-6 for layer in layers]
        self._train(lambda: DeepSetsNet(len(layers), layers[0].shape[2], extra.shape[1], len(self.classes_)),
                    self._inputs(X), y)

    def _proba(self, X: FeatureSet) -> np.ndarray:
        return self._softmax(self._inputs(X))


DETECTORS: dict[str, type[WeightDetector]] = {
    cls.name: cls for cls in (DenseDetector, LayerConvDetector, BoostingDetector, DeepSetsDetector)
}


def make_detector(name: str, **params) -> WeightDetector:
    """A detector by name, e.g. ``make_detector("boosting", max_iter=200)``."""
    if name not in DETECTORS:
        raise DetectorError(f"unknown detector {name!r}; known: {sorted(DETECTORS)}")
    return DETECTORS[name](**params)
