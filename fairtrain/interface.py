"""The regularizer interface: :class:`Regularizer` (a loss term ``reg(features, logits,
targets, sensitive)`` returning γ·R, with its tap and input checks), and the bases of the
methods that own an attribute head.

Part of the trainer stage (dataset → **trainer + regularizer** → store).
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod

import torch
from torch import nn
from torch.nn import functional as F

from fairtrain.base import (
    RegularizerError,
    check_gamma,
    check_int,
    check_unit,
    describe,
    is_label_tensor,
    make_head,
    reverse_gradient,
)
from fairtrain.taps import FeatureTap, Tap


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
    # True when the source takes a second optimizer step per batch for its heads (LNTL): the
    # trainer then runs a fresh forward pass and steps on ``adversary_term`` after the first step.
    alternating: bool = False

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


class HeadRegularizer(Regularizer):
    """A regularizer with a sensitive-attribute head on features of a known width."""

    def __init__(self, gamma: float = 1.0, *, feature_dim: int, num_groups: int, hidden: int = 0,
                 depth: int = 1, batch_norm: bool = False) -> None:
        super().__init__(gamma)
        self.feature_dim = check_int("feature_dim", feature_dim, 1)
        self.num_groups = check_int("num_groups", num_groups, 2)
        self.head = self.build_head(check_int("hidden", hidden, 0, maximum=4096),
                                    check_int("depth", depth, 1, maximum=16), bool(batch_norm))

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

    def network_term(self, features: torch.Tensor) -> torch.Tensor:
        """What the features pay besides the reversed head loss (none here; LNTL's entropy)."""
        return features.new_zeros(())

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        if self.alternating:  # the reversed head loss gets a step of its own (adversary_term)
            return self.network_term(features)
        return self.bias_loss(features, sensitive) + self.network_term(features)

    def adversary_term(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                       sensitive: torch.Tensor | None = None) -> torch.Tensor:
        """γ·(reversed head loss): the second step of a batch when ``alternating``, taken on a
        fresh forward pass after the network's step on the task loss and :meth:`network_term`."""
        features, targets, sensitive = self._validate(features, logits, targets, sensitive)
        return self.gamma * self.bias_loss(features, sensitive)
