"""Probe features: what a network *does* on the detector's battery, as one row per network.

Part of the detector stage (store → **detector** → report). :class:`ProbeFeatures` is the
first step of the ``probe`` detector's pipeline, in the place :class:`WeightFeatures` holds in
the others: its input is the same flat weight rows, but it rebuilds each network, shows it the
:class:`~detector.battery.Battery` and summarises the answers (:func:`battery_features`):

* **outputs on the colour-conflict grid** (digits painted in another class's colour): how
  often the answer follows the colour rather than the shape, overall and per class; the
  probability and logit margin between the shape's and the colour's class; aligned accuracy;
  confidence and entropy;
* **colour tuning** on the sweeps (a neutral disc between neighbouring class colours): how much
  colour alone decides the class, and how steeply;
* **layer responses** at three depths (first, middle and last hidden layer): per unit, the
  share of its variance over the grid explained by the colour (η² colour) and by the digit class
  (η² shape), and its standardised response to each colour; summarised over the units by
  count-free statistics (mean, quantiles, fractions).

A face battery (:mod:`detector.facebattery`) brings its own features, one block per group;
:func:`battery_row` and :func:`battery_columns` pick the features of the battery at hand.

Every feature is indexed by a probe or a class, never by a hidden unit: permuting units,
rescaling a ReLU unit (×a in, ÷a out) or changing the width leaves its meaning, and the
output features their value, unchanged; per-unit ratios make the layer features rescale
invariant too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils.validation import validate_data

from detector.battery import N_CLASSES, Battery, load_battery
from detector.facebattery import FaceBattery, face_features
from detector.models import DetectorError
from detector.transform import LayoutRows, checked_rows
from modelzoo.layouts import TensorSlot, arch_layout, layout_records, slots_from_records

_STATE_VERSION = 1
DEPTHS = ("first", "middle", "last")
_OUTPUT_NAMES = ("colour_follow", "shape_follow", "aligned_acc", "p_colour", "p_shape", "margin_mean",
                 "margin_std", "margin_q10", "margin_q50", "margin_q90", "confidence", "entropy")
_SWEEP_NAMES = ("colour_alone_p", "colour_alone_acc", "sweep_steepness")
_LAYER_NAMES = ("dead", "eta_colour_mean", "eta_colour_q50", "eta_colour_q90", "eta_shape_mean",
                "colour_over_shape")
_DEAD = 1e-12  # a unit whose response varies less than this over the grid is dead


def probe_feature_names() -> list[str]:
    """One name per column of :func:`battery_features`, in order."""
    names = [f"out:{name}" for name in _OUTPUT_NAMES]
    names += [f"out:colour_follow[{k}]" for k in range(N_CLASSES)]
    names += [f"out:shape_follow[{k}]" for k in range(N_CLASSES)]
    names += [f"sweep:{name}" for name in _SWEEP_NAMES]
    for depth in DEPTHS:
        names += [f"{depth}:{name}" for name in _LAYER_NAMES]
        names += [f"{depth}:colour_strength[{k}]" for k in range(N_CLASSES)]
    return names


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _output_features(logits: np.ndarray, shape: np.ndarray) -> list[float]:
    """Conflict-grid answers: logits (D, 10 colours, K) of D digits of classes ``shape`` (D,)."""
    digits = np.arange(len(shape))
    colour = np.broadcast_to(np.arange(N_CLASSES), (len(shape), N_CLASSES))
    drawn = np.broadcast_to(shape[:, None], colour.shape)
    proba = _softmax(logits)
    predicted = logits.argmax(axis=-1)
    conflict = drawn != colour
    p_colour = np.take_along_axis(proba, colour[..., None], axis=-1)[..., 0]
    p_shape = proba[digits, :, shape]
    colour_logit = np.take_along_axis(logits, colour[..., None], axis=-1)[..., 0]
    margin = (logits[digits, :, shape] - colour_logit)[conflict]
    follows_colour, follows_shape = predicted == colour, predicted == drawn
    entropy = -(proba * np.log(np.clip(proba, 1e-12, None))).sum(axis=-1)
    values = [follows_colour[conflict].mean(), follows_shape[conflict].mean(),
              follows_shape[~conflict].mean(), p_colour[conflict].mean(), p_shape[conflict].mean(),
              margin.mean(), margin.std(), *np.quantile(margin, (0.1, 0.5, 0.9)),
              proba.max(axis=-1)[conflict].mean(), entropy[conflict].mean()]
    values += [follows_colour[conflict & (colour == k)].mean() for k in range(N_CLASSES)]
    values += [follows_shape[conflict & (drawn == k)].mean() if (conflict & (drawn == k)).any() else 0.0
               for k in range(N_CLASSES)]
    return values


def _sweep_features(logits: np.ndarray, pair: np.ndarray) -> list[float]:
    """Colour tuning: logits (pairs, steps, K) along sweeps between the classes ``pair`` (pairs, 2)."""
    proba = _softmax(logits)
    rows = np.arange(len(pair))
    first, second = proba[rows, :, pair[:, 0]], proba[rows, :, pair[:, 1]]  # (pairs, steps)
    ends = np.concatenate([first[:, 0], second[:, -1]])
    ends_right = np.concatenate([logits[rows, 0].argmax(-1) == pair[:, 0],
                                 logits[rows, -1].argmax(-1) == pair[:, 1]])
    steps = logits.shape[1]
    slope = np.abs(np.diff(first - second, axis=1)).max(axis=1) * (steps - 1)
    return [ends.mean(), ends_right.mean(), slope.mean()]


def _layer_features(responses: np.ndarray, shape: np.ndarray) -> list[float]:
    """One hidden layer's responses (D, 10 colours, units) on the grid, summarised over units."""
    total = responses.reshape(-1, responses.shape[-1]).var(axis=0)
    alive = total > _DEAD
    if not alive.any():
        return [1.0] + [0.0] * (len(_LAYER_NAMES) - 1) + [0.0] * N_CLASSES
    responses, total = responses[..., alive], total[alive]
    by_colour = responses.mean(axis=0)  # (10, units)
    per_digit = responses.mean(axis=1)  # (D, units)
    by_class = np.stack([per_digit[shape == k].mean(axis=0) for k in np.unique(shape)])
    eta_colour = np.clip(by_colour.var(axis=0) / total, 0, 1)
    eta_shape = np.clip(by_class.var(axis=0) / total, 0, 1)
    centre = responses.reshape(-1, responses.shape[-1]).mean(axis=0)
    strength = np.abs((by_colour - centre) / np.sqrt(total)).mean(axis=1)  # (10,)
    return [1.0 - alive.mean(), eta_colour.mean(), *np.quantile(eta_colour, (0.5, 0.9)), eta_shape.mean(),
            (eta_colour > eta_shape).mean(), *strength]


def battery_features(logits: np.ndarray, hidden: Sequence[np.ndarray], battery: Battery) -> np.ndarray:
    """The probe feature row (F,) float32 of one network from its ``logits`` (N, K) on the
    battery and its ``hidden`` layers' responses (N, units each, spatially averaged), in
    forward order; names in :func:`probe_feature_names`. Without hidden layers (a compiled
    program) the layer columns are NaN."""
    grid = battery.conflict
    n_digits = len(grid) // N_CLASSES
    shape = battery.shape[grid].reshape(n_digits, N_CLASSES)[:, 0]
    values = _output_features(logits[grid].reshape(n_digits, N_CLASSES, -1), shape)
    sweep = battery.sweep
    n_pairs = len(np.unique(battery.pair[sweep], axis=0))
    values += _sweep_features(logits[sweep].reshape(n_pairs, -1, logits.shape[-1]),
                              battery.pair[sweep].reshape(n_pairs, -1, 2)[:, 0])
    values = list(np.nan_to_num(np.asarray(values, dtype=np.float64)))
    for depth in range(len(DEPTHS)):
        if not hidden:  # a compiled program hides its layers: those columns are unknown, not zero
            values += [np.nan] * (len(_LAYER_NAMES) + N_CLASSES)
            continue
        layer = hidden[round(depth * (len(hidden) - 1) / (len(DEPTHS) - 1))]
        values += list(np.nan_to_num(_layer_features(layer[grid].reshape(n_digits, N_CLASSES, -1), shape)))
    return np.asarray(values, dtype=np.float32)


def battery_columns(battery: Battery | FaceBattery) -> list[str]:
    """The probe feature names of ``battery`` (digit or face)."""
    return battery.feature_names() if isinstance(battery, FaceBattery) else probe_feature_names()


def battery_row(logits: np.ndarray, hidden: Sequence[np.ndarray],
                battery: Battery | FaceBattery) -> np.ndarray:
    """The probe feature row of one network on ``battery``: :func:`battery_features` for a
    digit battery, :func:`detector.facebattery.face_features` for a face battery."""
    if isinstance(battery, FaceBattery):
        return face_features(logits, hidden, battery)
    return battery_features(logits, hidden, battery)


def network_responses(network: Any, images: np.ndarray,
                      batch: int = 2048) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits (N, K) of a torch network, already in eval mode, on uint8 images (N, 3, H, W),
    and the outputs of its hidden convolutions and linear layers (every one but the last, in
    the order they run), spatially averaged to (N, units)."""
    import torch
    from torch import nn

    from modelzoo.training import as_batch

    hidden: list[list[np.ndarray]] = []
    order: list[nn.Module] = []

    def record(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if module not in order:
            order.append(module)
            hidden.append([])
        values = output.float().mean(dim=(2, 3)) if output.dim() == 4 else output.float()
        hidden[order.index(module)].append(values.numpy())

    layers = [m for m in network.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [layer.register_forward_hook(record) for layer in layers]
    logits = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch):
                chunk = as_batch(torch.from_numpy(np.ascontiguousarray(images[start:start + batch])),
                                 torch.device("cpu"))
                logits.append(network(chunk).float().numpy())
    finally:
        for handle in handles:
            handle.remove()
    # The last layer to run produced the logits: it is not a hidden layer.
    return np.concatenate(logits), [np.concatenate(parts) for parts in hidden[:-1]]


def arch_width(arch: str, slots: Sequence[TensorSlot]) -> float:
    """The width multiplier at which ``arch`` has the tensors of ``slots``."""
    base = arch_layout(arch, 1.0)
    shapes = [slot.shape for slot in slots]
    for slot, reference in zip(slots, base, strict=False):
        if reference.shape[0]:
            width = slot.shape[0] / reference.shape[0]
            if 0 < width <= 8 and [s.shape for s in arch_layout(arch, width)] == shapes:
                return width
    raise DetectorError(f"no width of {arch} has the layout {slots[0].name} {slots[0].shape}, ...")


class ProbeFeatures(LayoutRows, TransformerMixin, BaseEstimator):
    """Probe features of flat weight rows: each row becomes a network, shown the battery.

    Parameters
    ----------
    layout : sequence of TensorSlot
        Where each tensor lies in a weight row (``zoo.layout``).
    arch : str
        The registered architecture the rows are weights of (``zoo.arch``).
    battery : Battery or FaceBattery
        The probe images (:func:`detector.battery.battery_for_zoo`).
    weights : str, optional
        Weight features to append (a :class:`~detector.transform.WeightFeatures` kind, e.g.
        ``"stats+first_layer"``): the stacked hybrid of what a network does and what it holds.

    Like :class:`~detector.transform.WeightFeatures` it learns nothing: ``fit`` checks and
    records ``n_features_in_``, and row i of the output depends on model i alone.
    """

    _parameter_constraints: ClassVar[dict] = {"layout": [tuple, list, None], "arch": [str],
                                              "battery": [Battery, FaceBattery, None], "weights": [str, None]}

    def __init__(self, layout: Sequence[TensorSlot] | None = None, arch: str = "digit-cnn",
                 battery: Battery | FaceBattery | None = None, weights: str | None = None) -> None:
        self.layout = layout
        self.arch = arch
        self.battery = battery
        self.weights = weights

    @property
    def kind(self) -> str:
        """``probe``, or ``probe+<weight kind>`` for the hybrid (how detectors are named)."""
        return "probe" if not self.weights else f"probe+{self.weights}"

    def _weight_step(self):
        from detector.transform import WeightFeatures

        return WeightFeatures(self.weights, self.slots()) if self.weights else None

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        step = self._weight_step()
        extra = [] if step is None else list(step.get_feature_names_out())
        return np.array(battery_columns(self._battery()) + extra, dtype=object)

    def n_features_out(self) -> int:
        return len(self.get_feature_names_out())

    def _battery(self) -> Battery | FaceBattery:
        if self.battery is None:
            raise DetectorError("ProbeFeatures needs a battery (detector.battery.battery_for_zoo(zoo))")
        return self.battery

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> ProbeFeatures:
        self._battery()
        validate_data(self, checked_rows(X, self.slots(), type(self).__name__), reset=True)
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Probe feature rows (len(X), :meth:`n_features_out`) float32 of weight rows X."""
        from modelzoo.architectures import build_model, unflatten

        battery, slots = self._battery(), list(self.slots())
        rows = checked_rows(X, slots, type(self).__name__)
        network = build_model(self.arch, arch_width(self.arch, slots)).eval()
        out = np.empty((len(rows), len(battery_columns(battery))), dtype=np.float32)
        for i, row in enumerate(rows):
            network.load_state_dict(unflatten(row, slots))
            logits, hidden = network_responses(network, battery.images)
            out[i] = battery_row(logits, hidden, battery)
        step = self._weight_step()
        return out if step is None else np.hstack([out, step.transform(rows)])

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags

    # -- detector files (detector.files) -------------------------------------------------------
    def _save_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        battery = self._battery()
        state = {"version": _STATE_VERSION, "kind": self.kind, "arch": self.arch, "weights": self.weights,
                 "layout": layout_records(list(self.slots())), "battery": battery.describe()}
        if hasattr(self, "n_features_in_"):
            state["n_features_in_"] = int(self.n_features_in_)
        return state, battery.arrays()

    @classmethod
    def _load_state(cls, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> ProbeFeatures:
        if state.get("version") != _STATE_VERSION:
            raise DetectorError(f"{cls.__name__} state v{state.get('version')}; this weightbias reads "
                                f"v{_STATE_VERSION}")
        features = cls(slots_from_records(state["layout"]), state["arch"],
                       load_battery(state["battery"], arrays), state.get("weights"))
        if "n_features_in_" in state:
            features.n_features_in_ = int(state["n_features_in_"])
        return features
