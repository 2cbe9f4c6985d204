"""``rescaled`` weight features: a weights-only view that survives unit order, ReLU rescaling and width.

Part of the detector stage (store → **detector** → report), a feature kind of
:mod:`detector.features`. Scaling a ReLU unit's incoming weights and bias by *a* > 0 and its
outgoing weights by 1/*a* leaves the network's function unchanged, yet moves most per-tensor
statistics; halving the width moves per-weight means and spreads with the init scale. Here
each hidden unit *u* is described only by quantities that neither changes:

* its **importance** m_u = ‖w_in‖·‖w_out‖, divided by the layer's mean importance;
* its **normalised bias** b_u / ‖w_in‖ (where its ReLU switches on);
* in the first layer, its **colour direction**: the mean of its kernel on each input channel
  over ‖w_in‖ (its response to a flat patch of that colour, scale-free);
* in the last hidden layer, its **class direction** w_out / ‖w_out‖ (which class it votes for).

A layer's units are pooled without counting them: quantiles, and importance-weighted means
and spreads, so the columns keep their meaning at any width; colour and class directions stay
indexed by channel and class, which a bias detector needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations, pairwise

import numpy as np

from modelzoo.layouts import TensorSlot

SCALAR_QUANTILES = (0.1, 0.5, 0.9)
_TINY = 1e-12


def canonical(weights: np.ndarray, layers: Sequence[tuple[TensorSlot, TensorSlot]]) -> np.ndarray:
    """Weight rows (N, P) moved to one representative of their ReLU-rescaling orbit: layer by
    layer, each hidden unit's incoming weights and bias are divided by their joint norm and the
    next layer's weights that read the unit multiplied by it (same function). Rows that differ
    only by rescaling become equal, so every feature of them is rescale invariant."""
    out = np.array(weights, dtype=np.float64)
    n = len(out)
    for (weight, bias), (following, _) in pairwise(layers):
        units = weight.shape[0]
        w_in = out[:, weight.offset:weight.offset + weight.size].reshape(n, units, weight.size // units)
        b = out[:, bias.offset:bias.offset + bias.size]
        scale = np.sqrt((w_in * w_in).sum(axis=2) + b * b)
        scale = np.where(scale > _TINY, scale, 1.0)
        out[:, weight.offset:weight.offset + weight.size] = (w_in / scale[..., None]).reshape(n, weight.size)
        out[:, bias.offset:bias.offset + bias.size] = b / scale
        # The next layer reads each unit through one input channel (or, after a flatten, through
        # that channel's block of consecutive columns).
        columns = slice(following.offset, following.offset + following.size)
        block = following.size // (following.shape[0] * units)
        w_next = out[:, columns].reshape(n, following.shape[0], units, block)
        out[:, columns] = (w_next * scale[:, None, :, None]).reshape(n, following.size)
    return out


def _weighted(values: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Importance-weighted mean and std over units: values (N, units, d), weight (N, units)."""
    w = weight / np.maximum(weight.sum(axis=1, keepdims=True), _TINY)
    mean = np.einsum("nu,nud->nd", w, values)
    spread = np.sqrt(np.maximum(np.einsum("nu,nud->nd", w, (values - mean[:, None]) ** 2), 0))
    return mean, spread


def rescaled_features(incoming: Sequence[np.ndarray], biases: Sequence[np.ndarray],
                      outgoing: Sequence[np.ndarray], first_channels: int, n_classes: int) -> np.ndarray:
    """The ``rescaled`` columns (N, F) from each hidden layer's incoming (N, units, fan-in),
    bias (N, units) and outgoing (N, units, fan-out) weights, in forward order; the first
    layer's fan-in is ``first_channels`` input channels × kernel, the last layer's fan-out the
    ``n_classes`` output units."""
    parts = []
    last = len(incoming) - 1
    for depth, (w_in, bias, w_out) in enumerate(zip(incoming, biases, outgoing, strict=True)):
        in_norm = np.sqrt((w_in * w_in).sum(axis=2))
        out_norm = np.sqrt((w_out * w_out).sum(axis=2))
        importance = in_norm * out_norm
        relative = importance / np.maximum(importance.mean(axis=1, keepdims=True), _TINY)
        threshold = bias / np.maximum(in_norm, _TINY)
        threshold_mean, threshold_std = _weighted(threshold[..., None], importance)
        parts += [np.quantile(relative, SCALAR_QUANTILES, axis=1).T,
                  np.quantile(threshold, SCALAR_QUANTILES, axis=1).T,
                  (threshold > 0).mean(axis=1, keepdims=True), threshold_mean, threshold_std]
        if depth == 0:
            n, units = w_in.shape[:2]
            per_channel = w_in.reshape(n, units, first_channels, w_in.shape[2] // first_channels).mean(axis=3)
            colour = per_channel / np.maximum(in_norm[..., None], _TINY)
            pairs = list(combinations(range(first_channels), 2))
            contrast = np.stack([colour[..., i] - colour[..., j] for i, j in pairs], axis=-1) if pairs else \
                np.zeros((n, units, 0))
            for values in (colour, np.abs(contrast)):
                parts += list(_weighted(values, importance))
        if depth == last:
            direction = w_out[..., :n_classes] / np.maximum(out_norm[..., None], _TINY)
            parts += list(_weighted(direction, importance))
    return np.nan_to_num(np.concatenate(parts, axis=1)).astype(np.float32)


def rescaled_names(layer_names: Sequence[str], first_channels: int, n_classes: int) -> list[str]:
    """One name per column of :func:`rescaled_features`."""
    channels = ["R", "G", "B"] if first_channels == 3 else [f"c{c}" for c in range(first_channels)]
    names = []
    last = len(layer_names) - 1
    for depth, layer in enumerate(layer_names):
        names += [f"{layer}:importance_q{round(100 * q)}" for q in SCALAR_QUANTILES]
        names += [f"{layer}:threshold_q{round(100 * q)}" for q in SCALAR_QUANTILES]
        names += [f"{layer}:threshold_positive", f"{layer}:threshold_wmean", f"{layer}:threshold_wstd"]
        if depth == 0:
            contrasts = [f"{channels[i]}-{channels[j]}" for i, j in combinations(range(first_channels), 2)]
            for label, keys in (("colour", channels), ("|contrast|", contrasts)):
                names += [f"{layer}:{label}[{k}]_{stat}" for stat in ("wmean", "wstd") for k in keys]
        if depth == last:
            names += [f"{layer}:class[{c}]_{stat}" for stat in ("wmean", "wstd") for c in range(n_classes)]
    return names
