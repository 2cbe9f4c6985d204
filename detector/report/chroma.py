"""The chromatic energy fraction: how much of a first convolution's weight tells colours apart.

Write each filter's kernel ``w[c]`` (channel c = R, G, B) as its channel mean ``w̄`` (what it sees
of brightness) plus the rest (what it sees of colour); the measure is Σ‖w − w̄‖² / Σ‖w‖² over all
filters. 0 is a colour-blind first layer, about 2/3 an untrained one (channels independent), 1 pure
colour opponency.
"""

from __future__ import annotations

import numpy as np
import torch

from detector.features import find_layers
from detector.report.options import CompareError
from modelzoo.architectures import TensorSlot, build_model, flatten, layout

INIT_REFERENCE_MODELS = 8


def chromatic_fraction(weights: np.ndarray, slots: list[TensorSlot]) -> np.ndarray:
    """Per model (row of ``weights``), the share of first-convolution weight energy that tells
    colours apart; NaN for an all-zero first layer."""
    first = find_layers(list(slots))[0]
    if not first.is_conv or first.n_in < 2:
        raise CompareError(f"colour sensitivity needs a first convolution over 2+ input channels; "
                           f"{first.name!r} has weight shape {first.weight.shape}")
    start, stop = first.weight.offset, first.weight.offset + first.weight.size
    w = np.asarray(weights, dtype=np.float64)[:, start:stop]
    w = w.reshape(len(w), first.n_out, first.n_in, -1)
    chroma = ((w - w.mean(axis=2, keepdims=True)) ** 2).sum(axis=(1, 2, 3))
    total = (w * w).sum(axis=(1, 2, 3))
    return np.divide(chroma, total, out=np.full(len(w), np.nan), where=total > 0)


def init_chromatic_fraction(arch: str, width: float, n_models: int = INIT_REFERENCE_MODELS) -> float:
    """Mean chromatic fraction of freshly initialised models: where training starts from."""
    with torch.random.fork_rng():  # seeding here must not change the caller's random stream
        rows = []
        for seed in range(n_models):
            torch.manual_seed(seed)
            model = build_model(arch, width)
            rows.append(flatten(model))
    return float(chromatic_fraction(np.stack(rows), layout(model)).mean())
