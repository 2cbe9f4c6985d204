"""Weight features: what a weights-only meta-detector sees of each model.

Last stage of the flow (source → dataset → trainer → store → **detector**). A detector in the
IFBiD family (Serna et al. 2022) judges a model from its flat weight vector alone; this module
turns the zoo store's ``weights`` rows (N, P) into feature rows (N, F). Six kinds:

``raw``
    The flat weights as they are: IFBiD's dense-MLP input. Sensitive to neuron order, so a
    detector on them must learn every permutation of an equivalent network.
``stats``
    Per tensor (every weight and bias): mean, std, min, 5/25/50/75/95th percentiles, max,
    mean |w|, L2 norm, skewness and excess kurtosis. Unterthiner et al. 2020 ("Predicting
    neural network accuracy from weights") found such per-layer statistics with gradient
    boosting beat raw flattened weights; they are blind to neuron order by construction.
``first_layer``
    Input-channel statistics of the first convolution: per input channel (R, G, B) its
    weights' mean, std, mean |w|, L2 norm and the spread over filters of each filter's mean on
    that channel; and the same summaries of the per-filter colour contrasts R−G, R−B, G−B.
    A filter's mean over its kernel on a channel is its response to a flat patch of that
    colour, so these say how colour-selective the first layer is: where a colour shortcut
    (ColoredMNIST, Biased-MNIST) lives.
``invariant``
    ``stats`` plus per-unit descriptors of every hidden layer (see :func:`neuron_sets`)
    summarised over its units by order statistics (0/10/25/50/75/90/100th percentiles, mean,
    std), plus the descriptors of the input channels and output units kept in order (those
    carry meaning: a colour, a class). Nothing in it changes when the hidden units of a layer
    are permuted together with the next layer's inputs, a symmetry a trained network's
    function does not see but raw weights do; it also survives a change of architecture width
    better than raw weights, whose length changes.
``rescaled``
    Per-unit quantities no ReLU rescaling or width change moves (importance relative to the
    layer, bias over incoming norm, first-layer colour and last-layer class directions), pooled
    over units without counting them: :mod:`detector.rescaled`.
``units``
    The per-unit descriptors of every hidden layer (see :func:`neuron_sets`), unit by unit,
    layer by layer: the sets a DeepSets detector pools over. Their number grows with width,
    their meaning does not.

Layer structure is read from the layout alone (:func:`find_layers`): ``<name>.weight`` and
``<name>.bias`` pairs of convolutions (out, in, kh, kw) and linear layers (out, in), in layout
order, which is the forward order for the zoo's architectures; the last layer is the output.
Where convolutions meet the first linear layer, the flatten makes that layer's columns
``c*HW .. (c+1)*HW - 1`` belong to channel ``c``.

Bump :data:`FEATURE_VERSION` whenever any feature definition changes: detector files record
it, so a detector never scores features it was not trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations, pairwise

import numpy as np

from detector.rescaled import canonical, rescaled_features, rescaled_names
from modelzoo.layouts import TensorSlot

FEATURE_VERSION = 1
FEATURE_KINDS = ("raw", "stats", "first_layer", "invariant", "units", "rescaled")

# Per-tensor statistics ("stats"): the order of names is the order of columns.
TENSOR_QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
TENSOR_STATS = ("mean", "std", "min", "q05", "q25", "median", "q75", "q95", "max", "mean_abs", "l2",
                "skew", "kurtosis")
# First convolution ("first_layer").
CHANNEL_STATS = ("mean", "std", "mean_abs", "l2", "filter_mean_std")
CONTRAST_STATS = ("mean", "std", "mean_abs", "l2", "max_abs")
# Per-unit descriptors (neuron_sets) and their summaries over a layer's units ("invariant").
UNIT_DESCRIPTORS = ("in_norm", "in_mean", "in_std", "bias", "out_norm", "out_mean", "out_std")
UNIT_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
UNIT_AGGREGATES = ("min", "q10", "q25", "median", "q75", "q90", "max", "mean", "std")
OUTPUT_DESCRIPTORS = ("in_norm", "in_mean", "in_std", "bias")
INPUT_DESCRIPTORS = ("out_norm", "out_mean", "out_std")

# Below this ratio of std to max |w| a tensor counts as constant: its skewness and kurtosis
# are rounding noise, so they are reported as 0 (a detector needs finite, stable features).
_CONSTANT_RTOL = 1e-6
_MAX_ROWS_NAMED = 10


@dataclass(frozen=True)
class Layer:
    """One convolution or linear layer found in a layout: its weight and bias slots."""

    name: str
    weight: TensorSlot
    bias: TensorSlot

    @property
    def is_conv(self) -> bool:
        return len(self.weight.shape) == 4

    @property
    def n_out(self) -> int:
        return self.weight.shape[0]

    @property
    def n_in(self) -> int:
        return self.weight.shape[1]


def find_layers(slots: list[TensorSlot]) -> list[Layer]:
    """The layers of a layout in forward order; the last one is the output layer.

    Every tensor must belong to a conv or linear layer with a bias, and consecutive layers must
    chain (a layer's outputs are the next one's inputs, or, conv → linear, groups of ``HW``
    consecutive inputs). Anything else (batch norm, a missing bias, linear → conv) is refused
    with the tensor named, because the neuron symmetry the invariant features rely on would
    then be different from the one assumed here.
    """
    _check_slots(slots)
    by_name = {slot.name: slot for slot in slots}
    layers: list[Layer] = []
    for slot in slots:
        if slot.name.endswith(".bias") and slot.name.removesuffix(".bias") + ".weight" in by_name:
            continue  # taken with its weight
        stem = slot.name.removesuffix(".weight")
        if not slot.name.endswith(".weight") or len(slot.shape) not in (2, 4):
            raise ValueError(f"layout tensor {slot.name!r} (shape {slot.shape}) is not the weight of a "
                             "conv (out, in, kh, kw) or linear (out, in) layer; layer-wise features "
                             "support plain conv/linear chains only")
        bias = by_name.get(f"{stem}.bias")
        if bias is None or bias.shape != (slot.shape[0],):
            raise ValueError(f"layer {stem!r} needs a bias of shape ({slot.shape[0]},) named "
                             f"'{stem}.bias'; found {bias.shape if bias else 'none'}")
        layers.append(Layer(stem, slot, bias))
    for layer, following in pairwise(layers):
        if following.is_conv and not layer.is_conv:
            raise ValueError(f"layer {following.name!r} is a convolution after linear layer "
                             f"{layer.name!r}; cannot relate their units")
        chained = (following.n_in == layer.n_out if following.is_conv or not layer.is_conv
                   else following.n_in % layer.n_out == 0)
        if not chained:
            raise ValueError(f"layer {following.name!r} has {following.n_in} inputs, which do not match "
                             f"the {layer.n_out} outputs of {layer.name!r}")
    return layers


def weight_features(weights: np.ndarray, slots: list[TensorSlot], kind: str) -> np.ndarray:
    """Feature rows (N, F) float32 of the flat weight rows ``weights`` (N, P), in layout order.

    ``kind`` is one of :data:`FEATURE_KINDS`; :func:`feature_names` names the F columns.
    """
    _check_kind(kind)
    weights = _check_weights(weights, slots)
    _check_finite(weights, np.arange(len(weights)))
    return _compute(weights, slots, kind)


def feature_names(slots: list[TensorSlot], kind: str) -> list[str]:
    """One readable name per column of :func:`weight_features`, e.g. ``conv1.weight:std``."""
    _check_kind(kind)
    _check_slots(slots)
    if kind == "raw":
        return [f"{slot.name}[{j}]" for slot in slots for j in range(slot.size)]
    if kind == "first_layer":
        return _first_layer_names(_first_conv(find_layers(slots)))
    if kind == "units":
        return [f"{layer.name}/unit[{u}]:{d}" for layer in find_layers(slots)[:-1] for u in range(layer.n_out)
                for d in UNIT_DESCRIPTORS]
    if kind == "rescaled":
        layers = find_layers(slots)
        return rescaled_names([layer.name for layer in layers[:-1]], layers[0].n_in, layers[-1].n_out)
    names = [f"{slot.name}:{stat}" for slot in slots for stat in TENSOR_STATS]
    if kind == "invariant":
        names += _invariant_names(find_layers(slots))
    return names


def neuron_sets(weights: np.ndarray, slots: list[TensorSlot]) -> list[np.ndarray]:
    """Per hidden layer, an array (N, units, d) describing each unit: the input of a DeepSets
    model over neurons (one set per layer).

    A unit's descriptor (``d`` = len(:data:`UNIT_DESCRIPTORS`), the same for every layer): L2
    norm, mean and std of its incoming weights, its bias, and L2 norm, mean and std of its
    outgoing weights (the next layer's weights that read it). Each depends only on the unit's
    own weights, so permuting a layer's units permutes the rows of its array and nothing else.
    """
    weights = _check_weights(weights, slots)
    _check_finite(weights, np.arange(len(weights)))
    layers = find_layers(slots)
    return [_unit_descriptors(weights, layer, following).astype(np.float32)
            for layer, following in pairwise(layers)]


# -- validation ----------------------------------------------------------------------------------

def _check_kind(kind: str) -> None:
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; known: {', '.join(FEATURE_KINDS)}")


def _check_slots(slots: list[TensorSlot]) -> None:
    offset = 0
    for slot in slots:
        if slot.offset != offset or slot.size != math.prod(slot.shape):
            raise ValueError(f"layout tensor {slot.name!r} (offset {slot.offset}, size {slot.size}, shape "
                             f"{slot.shape}) does not tile the flat vector (expected offset {offset})")
        offset += slot.size
    if not slots:
        raise ValueError("empty layout: no tensors to describe")


def _check_weights(weights: np.ndarray, slots: list[TensorSlot]) -> np.ndarray:
    _check_slots(slots)
    weights = np.asarray(weights)
    n_params = slots[-1].offset + slots[-1].size
    if weights.ndim != 2 or weights.shape[1] != n_params:
        raise ValueError(f"weights have shape {weights.shape}; the layout needs (N, {n_params}) "
                         "(one flat weight vector per row; for one model pass weights[None])")
    if not np.issubdtype(weights.dtype, np.number):
        raise ValueError(f"weights must be numeric, got dtype {weights.dtype}")
    return weights


def _check_finite(weights: np.ndarray, row_ids: np.ndarray) -> None:
    bad = ~np.isfinite(weights).all(axis=1)
    if bad.any():
        raise ValueError(f"weights of rows {_first(row_ids[bad])} hold NaN or Inf ({int(bad.sum())} of "
                         f"{len(weights)} rows); features of such models would be meaningless")


def _first(values: np.ndarray) -> str:
    listed = ", ".join(str(int(v)) for v in values[:_MAX_ROWS_NAMED])
    return f"[{listed}{', ...' if len(values) > _MAX_ROWS_NAMED else ''}]"


# -- computation ---------------------------------------------------------------------------------

def _compute(weights: np.ndarray, slots: list[TensorSlot], kind: str) -> np.ndarray:
    """The features of validated, finite weight rows; column order follows feature_names."""
    if kind == "raw":
        return np.array(weights, dtype=np.float32)
    if kind == "first_layer":
        return _first_layer_features(weights, _first_conv(find_layers(slots))).astype(np.float32)
    if kind == "units":
        layers = find_layers(slots)
        width = len(UNIT_DESCRIPTORS)
        units = [_unit_descriptors(weights, layer, following).reshape(len(weights), layer.n_out * width)
                 for layer, following in pairwise(layers)]
        return np.concatenate(units, axis=1).astype(np.float32)
    if kind == "rescaled":
        layers = find_layers(slots)
        rows = canonical(weights, [(layer.weight, layer.bias) for layer in layers])
        hidden = list(pairwise(layers))
        return rescaled_features([_incoming(rows, layer) for layer, _ in hidden],
                                 [_tensor(rows, layer.bias) for layer, _ in hidden],
                                 [_outgoing(rows, layer, after) for layer, after in hidden],
                                 layers[0].n_in, layers[-1].n_out)
    parts = [_tensor_stats(_tensor(weights, slot).reshape(len(weights), slot.size)) for slot in slots]
    if kind == "invariant":
        parts += _invariant_parts(weights, find_layers(slots))
    return np.concatenate(parts, axis=1).astype(np.float32)


def _tensor(weights: np.ndarray, slot: TensorSlot) -> np.ndarray:
    """One tensor of every row, shaped (N, *slot.shape)."""
    return weights[:, slot.offset : slot.offset + slot.size].reshape(len(weights), *slot.shape)


def _tensor_stats(x: np.ndarray) -> np.ndarray:
    """TENSOR_STATS of each row of ``x`` (N, size) → (N, 13); moments in float64."""
    quantiles = np.quantile(x, TENSOR_QUANTILES, axis=1)  # (7, N)
    centred = x.astype(np.float64)
    mean = centred.mean(axis=1)
    mean_abs = np.abs(centred).mean(axis=1)
    l2 = np.sqrt(np.einsum("ij,ij->i", centred, centred))
    centred -= mean[:, None]
    squared = centred * centred
    m2 = squared.mean(axis=1)
    centred *= squared
    m3 = centred.mean(axis=1)
    squared *= squared
    m4 = squared.mean(axis=1)
    max_abs = np.maximum(np.abs(quantiles[0]), np.abs(quantiles[-1])).astype(np.float64)
    varies = m2 > (_CONSTANT_RTOL * max_abs) ** 2
    safe_m2 = np.where(varies, m2, 1.0)
    skew = np.where(varies, m3 / safe_m2**1.5, 0.0)
    kurtosis = np.where(varies, m4 / safe_m2**2 - 3.0, 0.0)
    return np.column_stack([mean, np.sqrt(m2), *quantiles, mean_abs, l2, skew, kurtosis])


def _norm_mean_std(x: np.ndarray) -> list[np.ndarray]:
    """L2 norm, mean and std over the last axis."""
    return [np.sqrt(np.einsum("...i,...i->...", x, x)), x.mean(axis=-1), x.std(axis=-1)]


def _incoming(weights: np.ndarray, layer: Layer) -> np.ndarray:
    """(N, units, fan-in): each output unit's incoming weights."""
    return _tensor(weights, layer.weight).reshape(len(weights), layer.n_out, layer.weight.size // layer.n_out)


def _outgoing(weights: np.ndarray, layer: Layer, following: Layer) -> np.ndarray:
    """(N, units, fan-out): the weights of ``following`` that read each unit of ``layer``.

    ``following``'s inputs are grouped per unit: a conv's input channel, or (conv → linear)
    the ``HW`` consecutive columns the flatten made of one channel.
    """
    n, units = len(weights), layer.n_out
    w = _tensor(weights, following.weight).reshape(n, following.n_out, units,
                                                   following.weight.size // (following.n_out * units))
    return w.transpose(0, 2, 1, 3).reshape(n, units, following.weight.size // units)


def _unit_descriptors(weights: np.ndarray, layer: Layer, following: Layer) -> np.ndarray:
    """(N, units, len(UNIT_DESCRIPTORS)) for one hidden layer."""
    incoming = _norm_mean_std(_incoming(weights, layer).astype(np.float64))
    outgoing = _norm_mean_std(_outgoing(weights, layer, following).astype(np.float64))
    bias = _tensor(weights, layer.bias).astype(np.float64)
    return np.stack([*incoming, bias, *outgoing], axis=-1)


def _invariant_parts(weights: np.ndarray, layers: list[Layer]) -> list[np.ndarray]:
    """Hidden units summarised over units; input channels and output units kept in order."""
    n = len(weights)
    parts = []
    for layer, following in pairwise(layers):
        units = _unit_descriptors(weights, layer, following)  # (N, U, D)
        summary = np.concatenate([np.quantile(units, UNIT_QUANTILES, axis=1),
                                  units.mean(axis=1)[None], units.std(axis=1)[None]])  # (A, N, D)
        parts.append(summary.transpose(1, 2, 0).reshape(n, summary.shape[0] * summary.shape[2]))
    first, output = layers[0], layers[-1]
    w = _tensor(weights, first.weight).astype(np.float64)
    per_input = w.swapaxes(1, 2).reshape(n, first.n_in, first.weight.size // first.n_in)
    parts.append(np.stack(_norm_mean_std(per_input), axis=-1).reshape(n, first.n_in * len(INPUT_DESCRIPTORS)))
    per_class = [*_norm_mean_std(_incoming(weights, output).astype(np.float64)),
                 _tensor(weights, output.bias).astype(np.float64)]
    parts.append(np.stack(per_class, axis=-1).reshape(n, output.n_out * len(OUTPUT_DESCRIPTORS)))
    return parts


def _invariant_names(layers: list[Layer]) -> list[str]:
    names = [f"{layer.name}/units:{descriptor}:{aggregate}" for layer in layers[:-1]
             for descriptor in UNIT_DESCRIPTORS for aggregate in UNIT_AGGREGATES]
    first, output = layers[0], layers[-1]
    names += [f"{first.name}/in[{channel}]:{d}" for channel in _channel_names(first.n_in)
              for d in INPUT_DESCRIPTORS]
    names += [f"{output.name}/out[{k}]:{d}" for k in range(output.n_out) for d in OUTPUT_DESCRIPTORS]
    return names


def _first_conv(layers: list[Layer]) -> Layer:
    if not layers[0].is_conv:
        raise ValueError(f"first_layer features need a convolution first; {layers[0].name!r} has weight "
                         f"shape {layers[0].weight.shape}")
    return layers[0]


def _channel_names(n_channels: int) -> list[str]:
    return ["R", "G", "B"] if n_channels == 3 else [f"c{c}" for c in range(n_channels)]


def _first_layer_features(weights: np.ndarray, first: Layer) -> np.ndarray:
    """CHANNEL_STATS per input channel, then CONTRAST_STATS per channel pair."""
    n, n_in = len(weights), first.n_in
    w = _tensor(weights, first.weight).astype(np.float64)
    w = w.reshape(n, first.n_out, n_in, first.weight.size // (first.n_out * n_in))  # (N, out, C, k)
    filter_means = w.mean(axis=3)  # (N, out, C): each filter's response to a flat patch of a colour
    channel = np.stack([w.mean(axis=(1, 3)), w.std(axis=(1, 3)), np.abs(w).mean(axis=(1, 3)),
                        np.sqrt((w * w).sum(axis=(1, 3))), filter_means.std(axis=1)], axis=-1)
    pairs = list(combinations(range(n_in), 2))
    if not pairs:  # a one-channel (grey) input has no colour contrasts
        return channel.reshape(n, n_in * len(CHANNEL_STATS))
    contrast = np.stack([filter_means[:, :, i] - filter_means[:, :, j] for i, j in pairs], axis=-1)
    abs_contrast = np.abs(contrast)
    contrast_stats = np.stack([contrast.mean(axis=1), contrast.std(axis=1), abs_contrast.mean(axis=1),
                               np.sqrt((contrast * contrast).sum(axis=1)), abs_contrast.max(axis=1)],
                              axis=-1)
    return np.concatenate([channel.reshape(n, n_in * len(CHANNEL_STATS)),
                           contrast_stats.reshape(n, len(pairs) * len(CONTRAST_STATS))], axis=1)


def _first_layer_names(first: Layer) -> list[str]:
    channels = _channel_names(first.n_in)
    names = [f"{first.weight.name}[{c}]:{stat}" for c in channels for stat in CHANNEL_STATS]
    names += [f"{first.weight.name}[{channels[i]}-{channels[j]}]:{stat}"
              for i, j in combinations(range(first.n_in), 2) for stat in CONTRAST_STATS]
    return names
