"""What every fairness regularizer shares: the interface, its checks, and the small pieces
(pairwise cosines, balanced weights, gradient reversal, attribute heads) the methods are built from.

Part of the trainer stage (dataset → **trainer + regularizer** → store). The methods are in
:mod:`fairtrain.methods`, the registry and builders in :mod:`fairtrain.regularizers`.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
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


def check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RegularizerError(f"{name} must be an integer >= {minimum}, got {value!r}")
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


def ndr_penalty(features: torch.Tensor, sensitive: torch.Tensor) -> torch.Tensor:
    """R = (1/C) Σ_c (1/M_c) Σ_{i<j ∈ c} |g_ij| on normalized features (see :class:`NDR`)."""
    gram = pairwise_cosine(features)
    same = sensitive[:, None] == sensitive[None, :]
    return mean_over_labels(gram.abs(), same & lower_pairs(len(sensitive), gram.device), sensitive)


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


# ----------------------------------------------------------------------------- taps


class FeatureTap:
    """Capture the output of a named submodule on every forward pass (a forward hook).

    ``layer`` defaults to the model's ``bottleneck`` attribute. The captured tensor keeps its
    graph, so a regularizer's gradient flows back into the model. Note that it is the
    *module's* output: DigitCNN applies its ReLU inside ``features()``, after ``fc1``, so
    tapping "fc1" gives the pre-activation; pass ``activation=torch.relu`` to get the exact
    bottleneck. A module called twice in one forward keeps the last call's output.
    """

    def __init__(self, model: nn.Module, layer: str | None = None,
                 activation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        layer = layer if layer is not None else getattr(model, "bottleneck", None)
        modules = dict(model.named_modules())
        if not layer or layer not in modules:
            available = [name for name in modules if name]
            raise RegularizerError(f"{type(model).__name__} has no layer {layer!r}; available: {available}")
        self.layer = layer
        self.activation = activation
        self._features: torch.Tensor | None = None
        self._handles = [modules[layer].register_forward_hook(self._capture)]
        self.model = model

    def _capture(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            raise RegularizerError(f"layer {self.layer!r} returned {type(output).__name__}, not a tensor")
        self._features = output if self.activation is None else self.activation(output)

    @property
    def features(self) -> torch.Tensor:
        """The tapped layer's output from the latest forward pass."""
        if self._features is None:
            raise RegularizerError(f"no forward pass through {self.layer!r} since the tap was attached")
        return self._features

    def remove(self) -> None:
        """Detach the hook and drop the last features."""
        for handle in self._handles:
            handle.remove()
        self._features = None

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()



# What a tap applies to the layer's output: "pre" keeps it as the layer gives it (for fc1 and
# the convolutions, the pre-activation), "relu"/"tanh" apply that function.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "pre": None, "relu": torch.relu, "tanh": torch.tanh}


@dataclass(frozen=True)
class Tap:
    """Where a regularizer reads its features: a layer of the model and an activation on its
    output. ``layer=None`` is the model's ``bottleneck`` (``fc1`` in digit-cnn and gender-cnn).
    Each regularizer declares its source's tap as ``default_tap``; the options ``layer`` and
    ``activation`` (spec ``reg.layer``, ``reg.activation``) override it."""

    layer: str | None = None
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise RegularizerError(f"layer must be a layer name, got {self.layer!r}")
        if self.activation not in ACTIVATIONS:
            raise RegularizerError(f"activation must be one of {sorted(ACTIVATIONS)}, "
                                   f"got {self.activation!r}")

    def attach(self, model: nn.Module) -> FeatureTap:
        """A forward hook on ``model`` that captures this tap's features on every pass."""
        return FeatureTap(model, self.layer, ACTIVATIONS[self.activation])

    def shape(self, model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The features' shape per sample at this tap ((C, H, W) for a convolution's map), from
        one forward pass of a blank image in eval mode: no dropout mask, so no random number,
        is drawn."""
        was_training = model.training
        device = next(model.parameters()).device
        model.eval()
        try:
            with torch.no_grad(), self.attach(model) as tap:
                model(torch.zeros(1, *input_shape, device=device))
                return tuple(tap.features.shape[1:])
        finally:
            model.train(was_training)

    def width(self, model: nn.Module, input_shape: tuple[int, ...]) -> int:
        """Features per sample at this tap (C·H·W for a convolution's map)."""
        return math.prod(self.shape(model, input_shape))

    def __str__(self) -> str:
        return f"{self.layer or 'bottleneck'}/{self.activation}"


# ----------------------------------------------------------------------------- interface


class Regularizer(nn.Module, metaclass=ABCMeta):
    """A fairness loss term: ``reg(features, logits, targets, sensitive)`` returns γ·R.

    Subclasses implement :meth:`penalty` (R, before γ) and own every head they need as a
    submodule, so ``reg.parameters()`` is exactly what the trainer adds to its optimizer.
    Inputs are validated here, before any work: features (N, ...) are flattened to (N, D);
    logits must be (N, K), targets and sensitive 1-D integer labels of length N.
    """

    name: str = "regularizer"
    needs_sensitive: bool = True
    default_tap: Tap = Tap()  # where the method's source reads its features
    # True when the tap changes the network's own forward pass (BinaryBernoulli feeds its
    # sampled code on): the hook stays on the model after training.
    alters_forward: bool = False
    # False when the method needs hooks of its own beyond its tap's features (a random draw
    # inside the network, the input images), which a vectorized bank's shared tap lacks.
    vectorizable: bool = True

    @property
    def task_weight(self) -> float:
        """What the trainer multiplies the task loss by before adding γ·R (1 but where a
        source writes its objective as a convex combination)."""
        return 1.0

    def __init__(self, gamma: float = 1.0) -> None:
        super().__init__()
        self.gamma = check_gamma(gamma)
        self.tap = self.default_tap

    def attach(self, model: nn.Module) -> FeatureTap:
        """Hook this regularizer's tap onto ``model``; pass the hook's ``features`` to ``forward``."""
        return self.tap.attach(model)

    def prepare(self, targets: torch.Tensor, sensitive: torch.Tensor) -> None:
        """See the whole training set's labels once before training (a trainer calls this);
        methods whose source weighs samples by dataset-level counts keep them. No-op here."""

    def forward(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None = None) -> torch.Tensor:
        features, targets, sensitive = self._validate(features, logits, targets, sensitive)
        return self.gamma * self.penalty(features, logits, targets, sensitive)

    @abstractmethod
    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        """R, the unscaled scalar term, on validated inputs (features already (N, D))."""

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, tap={self.tap}"

    def _validate(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                  sensitive: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not isinstance(features, torch.Tensor) or features.ndim < 2 or not features.is_floating_point():
            raise RegularizerError(f"{self.name}: features must be a float tensor (N, D) or (N, ...), "
                                   f"got {describe(features)}")
        n = features.shape[0]
        if n == 0:
            raise RegularizerError(f"{self.name}: empty batch")
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != n:
            raise RegularizerError(f"{self.name}: logits must be ({n}, K) to match features "
                                   f"{tuple(features.shape)}, got {describe(logits)}")
        targets = self._labels("targets", targets, n)
        if sensitive is None:
            if self.needs_sensitive:
                raise RegularizerError(f"{self.name} needs sensitive labels but got sensitive=None; pass "
                                       f"the batch's group labels, or use 'unsupervised+{self.name}'")
        else:
            sensitive = self._labels("sensitive", sensitive, n)
        return features.flatten(1), targets, sensitive

    def _labels(self, what: str, labels: torch.Tensor, n: int) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or not is_label_tensor(labels):
            raise RegularizerError(f"{self.name}: {what} must be a 1-D integer tensor, "
                                   f"got {describe(labels)}")
        if labels.shape[0] != n:
            raise RegularizerError(f"{self.name}: batch sizes differ: features have {n} samples, "
                                   f"{what} has {labels.shape[0]}")
        labels = labels.long()
        if labels.min() < 0:
            raise RegularizerError(f"{self.name}: {what} labels must be >= 0, got min {int(labels.min())}")
        return labels


def describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


class HeadRegularizer(Regularizer):
    """A regularizer with a sensitive-attribute head on features of a known width."""

    def __init__(self, gamma: float = 1.0, *, feature_dim: int, num_groups: int, hidden: int = 0,
                 depth: int = 1, batch_norm: bool = False) -> None:
        super().__init__(gamma)
        self.feature_dim = check_int("feature_dim", feature_dim, 1)
        self.num_groups = check_int("num_groups", num_groups, 2)
        self.head = self.build_head(check_int("hidden", hidden, 0), check_int("depth", depth, 1),
                                    bool(batch_norm))

    def build_head(self, hidden: int, depth: int, batch_norm: bool) -> nn.Module:
        """The attribute head on ``feature_dim`` features (see :func:`make_head`)."""
        return make_head(self.feature_dim, self.num_groups, hidden, depth, batch_norm)

    def _validate(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                  sensitive: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        features, targets, sensitive = super()._validate(features, logits, targets, sensitive)
        if features.shape[1] != self.feature_dim:
            raise RegularizerError(f"{self.name}: head was built for feature_dim={self.feature_dim}, "
                                   f"features have {features.shape[1]}")
        if sensitive is not None and int(sensitive.max()) >= self.num_groups:
            raise RegularizerError(f"{self.name}: sensitive label {int(sensitive.max())} out of range "
                                   f"for num_groups={self.num_groups}")
        return features, targets, sensitive


class ReversalHeadRegularizer(HeadRegularizer):
    """A head behind a gradient-reversal layer, with the optional DANN ramp of its weight."""

    def __init__(self, gamma: float = 1.0, *, feature_dim: int, num_groups: int, hidden: int = 0,
                 grl_weight: float = 1.0, ramp: bool = False, depth: int = 1,
                 batch_norm: bool = False) -> None:
        super().__init__(gamma, feature_dim=feature_dim, num_groups=num_groups, hidden=hidden,
                         depth=depth, batch_norm=batch_norm)
        if not math.isfinite(grl_weight) or grl_weight < 0:
            raise RegularizerError(f"grl_weight must be a finite number >= 0, got {grl_weight}")
        self.grl_weight = float(grl_weight)
        self.ramp = bool(ramp)
        self._progress = 0.0

    @property
    def progress(self) -> float:
        """Training progress p in [0, 1]; the trainer sets it when ``ramp`` is on."""
        return self._progress

    @progress.setter
    def progress(self, value: float) -> None:
        self._progress = check_unit("progress", value)

    @property
    def reversal_weight(self) -> float:
        """λ now: ``grl_weight``, times λ_p = 2/(1+e^(−10p)) − 1 when ramping."""
        if not self.ramp:
            return self.grl_weight
        return self.grl_weight * (2.0 / (1.0 + math.exp(-10.0 * self._progress)) - 1.0)

    def bias_loss(self, features: torch.Tensor, sensitive: torch.Tensor) -> torch.Tensor:
        """CE of the head on reversed features: the head learns S, the features unlearn it."""
        return F.cross_entropy(self.head(reverse_gradient(features, self.reversal_weight)), sensitive)
