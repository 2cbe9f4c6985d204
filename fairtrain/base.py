"""The small pieces every fairness regularizer is built from: argument checks, pairwise
cosines, balanced weights, binary entropy, gradient reversal, attribute heads.

Part of the trainer stage (dataset → **trainer + regularizer** → store). Where a regularizer
reads its features is :mod:`fairtrain.taps`, the interface :mod:`fairtrain.interface`, the
methods :mod:`fairtrain.methods`, :mod:`fairtrain.adversaries` and :mod:`fairtrain.reweighting`,
the registry and builders :mod:`fairtrain.regularizers`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from modelzoo.errors import WeightbiasError

# Keeps binary entropies and logs finite when a batch mean of σ(τh) saturates at 0 or 1.
EPS = 1e-6


class RegularizerError(WeightbiasError, ValueError):
    """Unknown regularizer or option, missing sensitive labels, or inputs that do not fit together."""


# ----------------------------------------------------------------------------- shared pieces


# Above this a loss term overflows float32 (max ~3.4e38) as soon as R is not tiny.
MAX_WEIGHT = 1e30


def check_gamma(gamma: float, name: str = "gamma") -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not math.isfinite(gamma) \
            or not 0 <= gamma <= MAX_WEIGHT:
        raise RegularizerError(f"{name} must be a finite number in [0, {MAX_WEIGHT:g}], got {gamma!r}")
    return float(gamma)


def check_int(name: str, value: int, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an integer in [minimum, maximum]; sizes a spec chooses get a ``maximum`` so
    that a typo (2**31 clusters) is an error, not a terabyte allocation or an endless loop."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RegularizerError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise RegularizerError(f"{name} must be an integer <= {maximum}, got {value!r}")
    return value


def check_unit(name: str, value: float, low: float = 0.0, high: float = 1.0) -> float:
    if not low <= value <= high:
        raise RegularizerError(f"{name} must lie in [{low}, {high}], got {value}")
    return float(value)


def is_label_tensor(t: torch.Tensor) -> bool:
    return t.dtype == torch.bool or not (t.is_floating_point() or t.is_complex())


def pairwise_cosine(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the per-sample L2-normalized features: g_ij = cos(y_i, y_j)."""
    z = F.normalize(features, dim=1, eps=1e-12)
    return z @ z.T


def lower_pairs(n: int, device: torch.device) -> torch.Tensor:
    """Mask of unordered pairs i > j: each pair counted once, the diagonal never."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(diagonal=-1)


def mean_over_labels(values: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per label ℓ, the mean of ``values`` over masked pairs whose row sample has label ℓ;
    then the mean over labels that own at least one pair. 0 when no label owns a pair."""
    n_labels = int(labels.max()) + 1
    sums = values.new_zeros(n_labels).index_add(0, labels, (values * mask).sum(1))
    counts = values.new_zeros(n_labels).index_add(0, labels, mask.sum(1).to(values.dtype))
    present = counts > 0
    if not present.any():
        return values.new_zeros(())
    return (sums[present] / counts[present]).mean()


def same_label_pairs(labels: torch.Tensor) -> torch.Tensor:
    """(N, N) mask of the pairs i > j whose samples share a label."""
    return (labels[:, None] == labels[None, :]) & lower_pairs(len(labels), labels.device)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask``; 0 when the mask is empty."""
    count = mask.sum()
    return (values * mask).sum() / count if count > 0 else values.new_zeros(())


def ndr_penalty(features: torch.Tensor, sensitive: torch.Tensor) -> torch.Tensor:
    """R = (1/C) Σ_c (1/M_c) Σ_{i<j ∈ c} |g_ij| on normalized features (see :class:`NDR`)."""
    return mean_over_labels(pairwise_cosine(features).abs(), same_label_pairs(sensitive), sensitive)


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(EPS, 1 - EPS)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def group_onehot(groups: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(groups, int(groups.max()) + 1).to(dtype)


def balanced_table(groups: torch.Tensor, strata: torch.Tensor, n_groups: int, n_strata: int) -> torch.Tensor:
    """(n_strata, n_groups) weights N_t / (G_t · N_{t,g}) from counts over a whole training set
    (G_t: groups present in stratum t; 0 for an empty cell), so every group present in a
    stratum carries the same total weight and the stratum keeps its own."""
    cell_count = torch.bincount(strata * n_groups + groups, minlength=n_strata * n_groups)
    cell_count = cell_count.view(n_strata, n_groups).double()
    present = (cell_count > 0).sum(1, keepdim=True).clamp_min(1)
    table = cell_count.sum(1, keepdim=True) / (present * cell_count)
    return torch.where(cell_count > 0, table, torch.zeros_like(table)).float()


def balanced_weights(groups: torch.Tensor, strata: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weights that give every group present in the batch the same total weight.

    w_i = N / (G · N_{g(i)}), so Σ_i w_i = N. With ``strata`` (e.g. the target class), the
    balancing happens inside each stratum instead: w_i = N_t / (G_t · N_{t,g(i)}), which
    leaves the strata's own proportions untouched.
    """
    if strata is None:
        strata = torch.zeros_like(groups)
    n_groups = int(groups.max()) + 1
    cell = strata * n_groups + groups
    cell_count = torch.bincount(cell, minlength=(int(strata.max()) + 1) * n_groups)
    cells_per_stratum = (cell_count.view(-1, n_groups) > 0).sum(1)
    stratum_count = torch.bincount(strata)
    w = stratum_count[strata] / (cells_per_stratum[strata] * cell_count[cell])
    return w.float()


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.weight * grad_output, None


def reverse_gradient(x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by −``weight`` backward."""
    return _ReverseGrad.apply(x, weight)


class GradientReversal(nn.Module):
    """Gradient-reversal layer (Ganin & Lempitsky 2015) as a module: identity forward, −λ·grad back."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reverse_gradient(x, self.weight)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


def make_head(feature_dim: int, num_outputs: int, hidden: int, depth: int = 1,
              batch_norm: bool = False) -> nn.Module:
    """Linear for ``hidden`` 0; else ``depth`` layers of ``hidden`` units (Linear, optional
    BatchNorm, ReLU) before the output layer."""
    if hidden == 0:
        return nn.Linear(feature_dim, num_outputs)
    layers: list[nn.Module] = []
    for width_in in [feature_dim] + [hidden] * (depth - 1):
        layers += [nn.Linear(width_in, hidden), *([nn.BatchNorm1d(hidden)] if batch_norm else []), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, num_outputs))


def frozen_call(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``head`` with detached parameters: gradient reaches ``x`` but never the head."""
    frozen = {name: p.detach() for name, p in head.named_parameters()}
    return torch.func.functional_call(head, frozen, (x,))


def describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
