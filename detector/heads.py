"""Torch-backed classifier heads for weight features, as scikit-learn estimators.

The last step of the ``layer_conv`` and ``deepsets`` detectors (:mod:`detector.models`). Each
is a plain :class:`~sklearn.base.ClassifierMixin` estimator on a feature array: parameters
validated by ``_parameter_constraints`` before any work, ``validate_data`` and
``check_is_fitted`` at the door, ``classes_`` and ``n_features_in_`` after ``fit``. How the
columns group into layers or sets is a constructor parameter (``layer_sizes``, ``set_sizes``);
left at None, all columns form one group, so a head also works on any feature array (that is
how scikit-learn's own estimator checks run on it).

Training is full-batch Adam on standardised inputs for ``epochs`` steps, seeded from
``random_state`` inside :func:`torch.random.fork_rng`, so fitting is reproducible and leaves
the caller's random stream alone. Fitted state is numpy arrays plus the network's
``state_dict``, which is all :mod:`detector.files` saves (safetensors, no pickle).
"""

from __future__ import annotations

import copy
from abc import ABCMeta, abstractmethod
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from detector.models import DetectorError

_STATE_VERSION = 1
_EPS = 1e-6  # added to every std: a constant input column must not divide by zero


class _TorchClassifier(ClassifierMixin, BaseEstimator, metaclass=ABCMeta):
    """What both heads share: validation, seeded full-batch training, probabilities, saving."""

    _parameter_constraints: ClassVar[dict] = {
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "random_state": ["random_state"],
    }
    _structure_params: ClassVar[tuple[str, ...]] = ()  # tuple-valued parameters (JSON gives lists back)
    _state_arrays: ClassVar[tuple[str, ...]] = ()  # fitted numpy attributes saved as arrays

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> _TorchClassifier:
        """Standardise X, then train the network to predict y (any labels, two classes or more)."""
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DetectorError(f"y has one class {self.classes_.tolist()}; a detector needs two or more")
        self._check_structure(X.shape[1])
        self._fit_scaling(X)
        inputs = self._inputs(X)
        target = torch.as_tensor(encoded, dtype=torch.long)
        rng = self.random_state
        seed = rng if isinstance(rng, Integral) else int(check_random_state(rng).randint(2**31 - 1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))  # before building: the initial weights are seeded too
            network = self._network(len(self.classes_))
            optimizer = torch.optim.Adam(network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            network.train()
            for _ in range(self.epochs):
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(network(*inputs), target).backward()
                optimizer.step()
        # Kept and run in float64: float32 rounding would make a model's probabilities depend on
        # which other models share its batch (scikit-learn checks subset invariance to 1e-7).
        self.network_ = network.double().eval()
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (models, classes), columns in the order of ``classes_``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        with torch.no_grad():
            logits = self.network_(*(x.double() for x in self._inputs(X)))
        return torch.softmax(logits, dim=1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row."""
        check_is_fitted(self)
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    # -- what a subclass says ------------------------------------------------------------------
    @abstractmethod
    def _check_structure(self, n_features: int) -> None:
        """Each head says this for its own structure."""

    @abstractmethod
    def _fit_scaling(self, X: np.ndarray) -> None:
        """Each head says this for its own structure."""

    @abstractmethod
    def _inputs(self, X: np.ndarray) -> list[torch.Tensor]:
        """Each head says this for its own structure."""

    @abstractmethod
    def _network(self, n_classes: int) -> nn.Module:
        """Each head says this for its own structure."""

    # -- detector files (detector.files) -------------------------------------------------------
    def _save_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-ready parameters and fitted values, and the arrays (network weights included)."""
        check_is_fitted(self)
        params = self.get_params(deep=False)
        if not isinstance(params["random_state"], Integral | None):
            params["random_state"] = None  # a RandomState is not data; refitting a loaded head reseeds
        for name in self._structure_params:
            params[name] = None if params[name] is None else [int(v) for v in params[name]]
        state = {"version": _STATE_VERSION, "params": params, "classes": self.classes_.tolist(),
                 "n_features_in_": int(self.n_features_in_)}
        arrays = {name: np.asarray(getattr(self, name)) for name in self._state_arrays}
        arrays |= {f"network.{k}": v.detach().numpy() for k, v in self.network_.state_dict().items()}
        return state, arrays

    @classmethod
    def _load_state(cls, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> _TorchClassifier:
        if state.get("version") != _STATE_VERSION:
            raise DetectorError(f"{cls.__name__} state v{state.get('version')}; this weightbias reads "
                                f"v{_STATE_VERSION}")
        params = dict(state["params"])
        for name in cls._structure_params:
            params[name] = None if params[name] is None else tuple(params[name])
        head = cls(**params)
        head.classes_ = np.array(state["classes"])
        head.n_features_in_ = int(state["n_features_in_"])
        head._check_structure(head.n_features_in_)
        for name in cls._state_arrays:
            setattr(head, name, arrays[name])
        network = head._network(len(head.classes_)).double()
        weights = {k.removeprefix("network."): torch.from_numpy(v.copy())
                   for k, v in arrays.items() if k.startswith("network.")}
        network.load_state_dict(weights)  # strict: a missing or extra tensor is an error
        head.network_ = network.eval()
        return head


def _positive_sizes(name: str, sizes: Any) -> tuple[int, ...]:
    sizes = tuple(sizes)
    if not sizes or not all(isinstance(s, Integral) and s > 0 for s in sizes):
        raise DetectorError(f"{name} must be a non-empty tuple of positive ints, got {sizes!r}")
    return tuple(int(s) for s in sizes)


class LayerConvNet(nn.Module):
    """One 1-D conv block per layer over its flattened weights; pooled, concatenated, classified."""

    KERNEL = 9

    def __init__(self, n_layers: int, n_classes: int, channels: int = 8, pooled: int = 16, hidden: int = 64):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(1, channels, self.KERNEL, stride=4), nn.ReLU(),
                          nn.AdaptiveMaxPool1d(pooled))
            for _ in range(n_layers))
        self.head = nn.Sequential(nn.Linear(n_layers * channels * pooled, hidden), nn.ReLU(),
                                  nn.Linear(hidden, n_classes))

    def forward(self, *layers: torch.Tensor) -> torch.Tensor:
        pooled = []
        for block, layer in zip(self.blocks, layers, strict=True):
            short = self.KERNEL - layer.shape[1]  # a layer shorter than the kernel is zero-padded
            layer = nn.functional.pad(layer, (0, short)) if short > 0 else layer
            pooled.append(block(layer[:, None, :]).flatten(1))
        return self.head(torch.cat(pooled, dim=1))


class LayerConvClassifier(_TorchClassifier):
    """IFBiD's per-layer convolutional baseline: each layer's columns (its raw weights and bias,
    standardised column by column) through its own 1-D conv block, then a dense head.

    Parameters
    ----------
    layer_sizes : tuple of int, default=None
        Columns per layer, in order (:func:`detector.models.layer_sizes` of a layout); they
        must add up to the number of features. None: all columns are one layer.
    epochs : int, default=300
        Full-batch Adam steps.
    lr : float, default=1e-3
        Adam's learning rate.
    weight_decay : float, default=1e-4
        Adam's L2 penalty.
    random_state : int, RandomState instance or None, default=0
        Seeds the initial weights.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    mean_, scale_ : ndarray of shape (n_features_in_,)
        Column means and standard deviations (+1e-6) of the training features.
    network_ : LayerConvNet
    """

    _parameter_constraints: ClassVar[dict] = {**_TorchClassifier._parameter_constraints,
                                              "layer_sizes": [tuple, list, None]}
    _structure_params = ("layer_sizes",)
    _state_arrays = ("mean_", "scale_")

    def __init__(self, layer_sizes: tuple[int, ...] | None = None, epochs: int = 300, lr: float = 1e-3,
                 weight_decay: float = 1e-4, random_state: int | None = 0) -> None:
        self.layer_sizes = layer_sizes
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.random_state = random_state

    def _sizes(self) -> tuple[int, ...]:
        return (self.n_features_in_,) if self.layer_sizes is None else _positive_sizes("layer_sizes",
                                                                                       self.layer_sizes)

    def _check_structure(self, n_features: int) -> None:
        if self.layer_sizes is None:
            return
        if sum(_positive_sizes("layer_sizes", self.layer_sizes)) != n_features:
            raise DetectorError(f"layer_sizes add up to {sum(self.layer_sizes)} columns; X has {n_features}")

    def _fit_scaling(self, X: np.ndarray) -> None:
        self.mean_ = X.mean(axis=0)
        self.scale_ = X.std(axis=0) + np.float32(_EPS)

    def _inputs(self, X: np.ndarray) -> list[torch.Tensor]:
        scaled = (X - self.mean_) / self.scale_
        bounds = np.cumsum(self._sizes())[:-1]
        return [torch.from_numpy(np.ascontiguousarray(part)) for part in np.split(scaled, bounds, axis=1)]

    def _network(self, n_classes: int) -> nn.Module:
        return LayerConvNet(len(self._sizes()), n_classes)


class DeepSetsNet(nn.Module):
    """Per set a shared element encoder φ, mean+max pooling over its elements, and a head ρ on
    the summaries and the extra (already invariant) columns."""

    def __init__(self, n_sets: int, element_dim: int, extra_dim: int, n_classes: int, hidden: int = 32):
        super().__init__()
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Linear(element_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
            for _ in range(n_sets))
        self.head = nn.Sequential(nn.Linear(n_sets * 2 * hidden + extra_dim, 2 * hidden), nn.ReLU(),
                                  nn.Linear(2 * hidden, n_classes))

    def forward(self, extra: torch.Tensor, *sets: torch.Tensor) -> torch.Tensor:
        summaries = []
        for encoder, elements in zip(self.encoders, sets, strict=True):
            embedded = encoder(elements)  # (models, elements, hidden)
            summaries += [embedded.mean(dim=1), embedded.amax(dim=1)]
        return self.head(torch.cat([extra, *summaries], dim=1))


class DeepSetsClassifier(_TorchClassifier):
    """A permutation-invariant classifier over sets (DeepSets): for weights, each hidden layer's
    units, so the same fitted head reads any width (:meth:`with_set_sizes`).

    Columns are ``n_extra`` extra columns, then each set's elements one after another, each
    element ``element_dim`` columns (``first_layer+units`` features: 30 first-layer
    statistics, then per hidden unit its 7 descriptors).

    Parameters
    ----------
    n_extra : int, default=0
        Leading columns given to the head as they are (standardised).
    set_sizes : tuple of int, default=None
        Elements per set. None: the remaining columns are one set.
    element_dim : int, default=1
        Columns per element.
    epochs : int, default=400
    lr : float, default=3e-3
    weight_decay : float, default=1e-4
    random_state : int, RandomState instance or None, default=0

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    extra_mean_, extra_scale_ : ndarray of shape (n_extra,)
    element_mean_, element_scale_ : ndarray of shape (n_sets, element_dim)
        Per set, the mean and std (+1e-6) of each element column over models and elements:
        no per-element statistic, so a set of another size standardises the same way.
    network_ : DeepSetsNet
    """

    _parameter_constraints: ClassVar[dict] = {**_TorchClassifier._parameter_constraints,
                                              "n_extra": [Interval(Integral, 0, None, closed="left")],
                                              "set_sizes": [tuple, list, None],
                                              "element_dim": [Interval(Integral, 1, None, closed="left")]}
    _structure_params = ("set_sizes",)
    _state_arrays = ("extra_mean_", "extra_scale_", "element_mean_", "element_scale_")

    def __init__(self, n_extra: int = 0, set_sizes: tuple[int, ...] | None = None, element_dim: int = 1,
                 epochs: int = 400, lr: float = 3e-3, weight_decay: float = 1e-4,
                 random_state: int | None = 0) -> None:
        self.n_extra = n_extra
        self.set_sizes = set_sizes
        self.element_dim = element_dim
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.random_state = random_state

    def _sizes(self, n_features: int) -> tuple[int, ...]:
        if self.set_sizes is not None:
            return _positive_sizes("set_sizes", self.set_sizes)
        rest = n_features - self.n_extra
        if rest <= 0 or rest % self.element_dim:
            raise DetectorError(f"{rest} columns after n_extra={self.n_extra} do not make elements of "
                                f"element_dim={self.element_dim}")
        return (rest // self.element_dim,)

    def _check_structure(self, n_features: int) -> None:
        need = self.n_extra + sum(self._sizes(n_features)) * self.element_dim
        if need != n_features:
            raise DetectorError(f"n_extra={self.n_extra}, set_sizes={self.set_sizes} and element_dim="
                                f"{self.element_dim} make {need} columns; X has {n_features}")

    def _split(self, X: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Extra columns (models, n_extra) and per set (models, elements, element_dim)."""
        extra, start, sets = X[:, : self.n_extra], self.n_extra, []
        for size in self._sizes(X.shape[1]):
            stop = start + size * self.element_dim
            sets.append(X[:, start:stop].reshape(len(X), size, self.element_dim))
            start = stop
        return extra, sets

    def _fit_scaling(self, X: np.ndarray) -> None:
        extra, sets = self._split(X)
        self.extra_mean_, self.extra_scale_ = extra.mean(axis=0), extra.std(axis=0) + np.float32(_EPS)
        self.element_mean_ = np.stack([s.mean(axis=(0, 1)) for s in sets])
        self.element_scale_ = np.stack([s.std(axis=(0, 1)) for s in sets]) + np.float32(_EPS)

    def _inputs(self, X: np.ndarray) -> list[torch.Tensor]:
        extra, sets = self._split(X)
        parts = [(extra - self.extra_mean_) / self.extra_scale_]
        parts += [(s - mean) / scale for s, mean, scale in zip(sets, self.element_mean_, self.element_scale_,
                                                                strict=True)]
        return [torch.from_numpy(np.ascontiguousarray(p, dtype=np.float32)) for p in parts]

    def _network(self, n_classes: int) -> nn.Module:
        return DeepSetsNet(len(self._sizes(self.n_features_in_)), self.element_dim, self.n_extra, n_classes)

    def with_set_sizes(self, set_sizes: tuple[int, ...]) -> DeepSetsClassifier:
        """This fitted head reading sets of other sizes (a model of another width): the same
        encoders, pooling and head, a new column split. The copy shares the network."""
        check_is_fitted(self)
        sizes = _positive_sizes("set_sizes", set_sizes)
        if len(sizes) != len(self.element_mean_):
            raise DetectorError(f"this head was fitted on {len(self.element_mean_)} sets; got {len(sizes)}")
        moved = copy.copy(self)
        moved.set_sizes = sizes
        moved.n_features_in_ = self.n_extra + sum(sizes) * self.element_dim
        return moved
