"""Fairness regularizers: loss terms that change what one model learns about a sensitive attribute.

Part of the trainer stage (dataset → **trainer + regularizer** → store). A regularizer is an
``nn.Module`` that reads the features of a named bottleneck layer (through a
:class:`FeatureTap`) and returns γ·R, the term the trainer adds to its task loss. The trainer
does not know which regularizer it runs::

    tap = FeatureTap(model, "fc1", activation=torch.relu)
    reg = get_regularizer("grad", gamma=1.0, feature_dim=128, num_groups=3)
    optimizer = torch.optim.Adam([*model.parameters(), *reg.parameters()])
    logits = model(images)
    loss = F.cross_entropy(logits, targets) + reg(tap.features, logits, targets, sensitive)

Heads (attribute detectors) are built in ``__init__`` from explicit ``feature_dim`` and
``num_groups`` arguments, never lazily: a head created on the first forward would be missing
from ``reg.parameters()`` when the optimizer is built, and would silently never train.
Formulas and sources are those of DESIGN §4; each class says where it departs from them.
"""

from __future__ import annotations

import inspect
import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from modelzoo.errors import WeightbiasError

# Keeps binary entropies and logs finite when a batch mean of σ(τh) saturates at 0 or 1.
_EPS = 1e-6


class RegularizerError(WeightbiasError, ValueError):
    """Unknown regularizer or option, missing sensitive labels, or inputs that do not fit together."""


# ----------------------------------------------------------------------------- shared pieces


# Above this a loss term overflows float32 (max ~3.4e38) as soon as R is not tiny.
_MAX_WEIGHT = 1e30


def _check_gamma(gamma: float, name: str = "gamma") -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not math.isfinite(gamma) \
            or not 0 <= gamma <= _MAX_WEIGHT:
        raise RegularizerError(f"{name} must be a finite number in [0, {_MAX_WEIGHT:g}], got {gamma!r}")
    return float(gamma)


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RegularizerError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_unit(name: str, value: float, low: float = 0.0, high: float = 1.0) -> float:
    if not low <= value <= high:
        raise RegularizerError(f"{name} must lie in [{low}, {high}], got {value}")
    return float(value)


def _is_label_tensor(t: torch.Tensor) -> bool:
    return t.dtype == torch.bool or not (t.is_floating_point() or t.is_complex())


def _pairwise_cosine(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the per-sample L2-normalized features: g_ij = cos(y_i, y_j)."""
    z = F.normalize(features, dim=1, eps=1e-12)
    return z @ z.T


def _lower_pairs(n: int, device: torch.device) -> torch.Tensor:
    """Mask of unordered pairs i > j: each pair counted once, the diagonal never."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(diagonal=-1)


def _mean_over_labels(values: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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
    gram = _pairwise_cosine(features)
    same = sensitive[:, None] == sensitive[None, :]
    return _mean_over_labels(gram.abs(), same & _lower_pairs(len(sensitive), gram.device), sensitive)


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(_EPS, 1 - _EPS)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def _group_onehot(groups: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(groups, int(groups.max()) + 1).to(dtype)


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


def _make_head(feature_dim: int, num_outputs: int, hidden: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(feature_dim, num_outputs)
    return nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))


def _frozen_call(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``head`` with detached parameters: gradient reaches ``x`` but never the head."""
    frozen = {name: p.detach() for name, p in head.named_parameters()}
    return torch.func.functional_call(head, frozen, (x,))


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

    def __init__(self, gamma: float = 1.0) -> None:
        super().__init__()
        self.gamma = _check_gamma(gamma)

    def forward(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None = None) -> torch.Tensor:
        features, targets, sensitive = self._validate(features, logits, targets, sensitive)
        return self.gamma * self.penalty(features, logits, targets, sensitive)

    @abstractmethod
    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        """R, the unscaled scalar term, on validated inputs (features already (N, D))."""

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"

    def _validate(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                  sensitive: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not isinstance(features, torch.Tensor) or features.ndim < 2 or not features.is_floating_point():
            raise RegularizerError(f"{self.name}: features must be a float tensor (N, D) or (N, ...), "
                                   f"got {_describe(features)}")
        n = features.shape[0]
        if n == 0:
            raise RegularizerError(f"{self.name}: empty batch")
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != n:
            raise RegularizerError(f"{self.name}: logits must be ({n}, K) to match features "
                                   f"{tuple(features.shape)}, got {_describe(logits)}")
        targets = self._labels("targets", targets, n)
        if sensitive is None:
            if self.needs_sensitive:
                raise RegularizerError(f"{self.name} needs sensitive labels but got sensitive=None; pass "
                                       f"the batch's group labels, or use 'unsupervised+{self.name}'")
        else:
            sensitive = self._labels("sensitive", sensitive, n)
        return features.flatten(1), targets, sensitive

    def _labels(self, what: str, labels: torch.Tensor, n: int) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or not _is_label_tensor(labels):
            raise RegularizerError(f"{self.name}: {what} must be a 1-D integer tensor, "
                                   f"got {_describe(labels)}")
        if labels.shape[0] != n:
            raise RegularizerError(f"{self.name}: batch sizes differ: features have {n} samples, "
                                   f"{what} has {labels.shape[0]}")
        labels = labels.long()
        if labels.min() < 0:
            raise RegularizerError(f"{self.name}: {what} labels must be >= 0, got min {int(labels.min())}")
        return labels


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


class _HeadRegularizer(Regularizer):
    """A regularizer with a sensitive-attribute head on features of a known width."""

    def __init__(self, gamma: float = 1.0, *, feature_dim: int, num_groups: int, hidden: int = 0) -> None:
        super().__init__(gamma)
        self.feature_dim = _check_int("feature_dim", feature_dim, 1)
        self.num_groups = _check_int("num_groups", num_groups, 2)
        self.head = _make_head(self.feature_dim, self.num_groups, _check_int("hidden", hidden, 0))

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


class _ReversalHeadRegularizer(_HeadRegularizer):
    """A head behind a gradient-reversal layer, with the optional DANN ramp of its weight."""

    def __init__(self, gamma: float = 1.0, *, feature_dim: int, num_groups: int, hidden: int = 0,
                 grl_weight: float = 1.0, ramp: bool = False) -> None:
        super().__init__(gamma, feature_dim=feature_dim, num_groups=num_groups, hidden=hidden)
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
        self._progress = _check_unit("progress", value)

    @property
    def reversal_weight(self) -> float:
        """λ now: ``grl_weight``, times λ_p = 2/(1+e^(−10p)) − 1 when ramping."""
        if not self.ramp:
            return self.grl_weight
        return self.grl_weight * (2.0 / (1.0 + math.exp(-10.0 * self._progress)) - 1.0)

    def bias_loss(self, features: torch.Tensor, sensitive: torch.Tensor) -> torch.Tensor:
        """CE of the head on reversed features: the head learns S, the features unlearn it."""
        return F.cross_entropy(self.head(reverse_gradient(features, self.reversal_weight)), sensitive)


# ----------------------------------------------------------------------------- regularizers


class NDR(Regularizer):
    """Tartaglione & Grangetto 2020: decorrelate the features of samples sharing a sensitive class.

    With ỹ_i = y_i/‖y_i‖ and g^c_ij = ỹ_iᵀỹ_j for samples i, j of sensitive class c,

        R = (1/C) Σ_c (1/M_c) Σ_{i<j ∈ c} |g^c_ij|,   M_c = n_c(n_c − 1)/2,

    i.e. DESIGN's (1/(2M_c)) Σ_{i≠j} with M_c the number of pairs, so each class term is a mean
    in [0, 1] that does not grow with the batch. Pitfalls handled: the absolute value is taken
    per entry, not of the sum, so positive and negative cosines of signed (pre-activation)
    features cannot cancel; a class with fewer than 2 samples in the batch has no pairs and is
    left out of both the sum and C. Batches should hold every group for the term to see them.
    """

    name = "ndr"

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        return ndr_penalty(features, sensitive)


class EnD(Regularizer):
    """Tartaglione, Barbano & Grangetto, CVPR 2021: R = α·R_⊥ + β·R_∥ on normalized features.

    R_⊥ ("disentangle") is :class:`NDR`'s term over same-bias pairs. R_∥ ("entangle") pulls
    together same-class pairs of different bias: per target class y, the mean of (1 − g_ij)/2
    over its pairs i<j with s_i ≠ s_j, averaged over the classes that have such pairs. It is
    the reference implementation's 1 − mean (1 + g)/2, so it lies in [0, 1] and is 0 when those
    pairs are aligned. α = β = 0.1 by default; DESIGN notes larger β, smaller α works better.
    """

    name = "end"

    def __init__(self, gamma: float = 1.0, *, alpha: float = 0.1, beta: float = 0.1) -> None:
        super().__init__(gamma)
        self.alpha = _check_gamma(alpha, "alpha")
        self.beta = _check_gamma(beta, "beta")

    def parallel_term(self, features: torch.Tensor, targets: torch.Tensor,
                      sensitive: torch.Tensor) -> torch.Tensor:
        """R_∥: mean (1 − g_ij)/2 over same-class, different-bias pairs, averaged per class."""
        gram = _pairwise_cosine(features)
        mask = ((targets[:, None] == targets[None, :]) & (sensitive[:, None] != sensitive[None, :])
                & _lower_pairs(len(targets), gram.device))
        return _mean_over_labels((1 - gram) / 2, mask, targets)

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        return (self.alpha * ndr_penalty(features, sensitive)
                + self.beta * self.parallel_term(features, targets, sensitive))

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}, beta={self.beta}"


class GRAD(_ReversalHeadRegularizer):
    """Raff & Sylvester 2018 (gradient reversal against discrimination).

    An attribute head predicts S from the features behind a gradient-reversal layer; the term
    is R = CE(head(GRL_λ(y)), s), so the trainer's total is L_y + γ·L_s: the head descends
    L_s, the features ascend it, scaled by γλ. λ = ``grl_weight``, optionally ramped as
    λ_p = 2/(1+e^(−10p)) − 1 from the ``progress`` p in [0, 1] the trainer sets.
    """

    name = "grad"

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        return self.bias_loss(features, sensitive)


class LNTL(_ReversalHeadRegularizer):
    """Kim et al., CVPR 2019 ("Learning Not to Learn"): a bias head, reversal, and an entropy term.

    R = CE(head(GRL_λ(y)), s) + μ·(log G − H(softmax(head(y)))).
    The first part is :class:`GRAD`'s. What GRAD lacks is LNTL's mutual-information surrogate:
    the entropy of the head's prediction is maximized with respect to the *features* only
    (the head runs with detached weights there, so it is never trained to be uncertain; it only
    learns S through the CE). log G makes the term ≥ 0 without changing its gradient. Taps may
    be early feature maps: features (N, C, H, W) are flattened, and ``feature_dim`` is C·H·W.
    """

    name = "lntl"

    def __init__(self, gamma: float = 1.0, *, feature_dim: int, num_groups: int, hidden: int = 0,
                 grl_weight: float = 1.0, ramp: bool = False, entropy_weight: float = 1.0) -> None:
        super().__init__(gamma, feature_dim=feature_dim, num_groups=num_groups, hidden=hidden,
                         grl_weight=grl_weight, ramp=ramp)
        self.entropy_weight = _check_gamma(entropy_weight, "entropy_weight")

    def entropy_term(self, features: torch.Tensor) -> torch.Tensor:
        """log G − mean entropy of the (frozen) head's prediction; gradient reaches features only."""
        log_p = F.log_softmax(_frozen_call(self.head, features), dim=1)
        entropy = -(log_p.exp() * log_p).sum(1).mean()
        return math.log(self.num_groups) - entropy

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        return self.bias_loss(features, sensitive) + self.entropy_weight * self.entropy_term(features)


class SensitiveNets(_HeadRegularizer):
    """Morales et al., T-PAMI 2021 (SensitiveNets-style adversary).

    One-vs-rest detectors P_k(y) = σ(head(y))_k of each sensitive class k. The term is

        R = BCE(head(sg(y)), onehot(s)) + mean_{i,k} |q − P_k(y_i)|,   q = 0.9,

    where sg stops the gradient. The detector loss trains the head on detached features, so
    it cannot move the network; the confusion term evaluates the head with detached *weights*
    on live features, so it pushes the features toward "every detector fires at q" (the
    attribute becomes unreadable) while the head is never pushed to be confused.
    """

    name = "sensitive_nets"

    def __init__(self, gamma: float = 1.0, *, feature_dim: int, num_groups: int, hidden: int = 0,
                 target_prob: float = 0.9) -> None:
        super().__init__(gamma, feature_dim=feature_dim, num_groups=num_groups, hidden=hidden)
        self.target_prob = _check_unit("target_prob", target_prob)

    def adversary_loss(self, features: torch.Tensor, sensitive: torch.Tensor) -> torch.Tensor:
        """The detectors' own loss, on detached features: trains the head, never the network."""
        onehot = F.one_hot(sensitive, self.num_groups).to(features.dtype)
        return F.binary_cross_entropy_with_logits(self.head(features.detach()), onehot)

    def confusion(self, features: torch.Tensor) -> torch.Tensor:
        """mean |q − P_k(y)| with the head frozen: gradient reaches the features only."""
        return (self.target_prob - torch.sigmoid(_frozen_call(self.head, features))).abs().mean()

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        return self.adversary_loss(features, sensitive) + self.confusion(features)


class BinaryBernoulli(Regularizer):
    """Cerrato et al., AAAI 2023: a stochastic binary layer and the groups' entropy gap.

    p = σ(τh) on the tapped features h (tap a pre-activation layer so h is signed), τ ≈ 6;
    T ~ Bernoulli(p) with a straight-through gradient (:meth:`binarize`). With θ_i the batch
    mean of p_i and θ_i^s its mean over group s,

        R = Σ_i [H_b(θ_i) − Σ_s (N_s/N) H_b(θ_i^s)]   (nats, summed over units),

    the per-unit information the code carries about S; ≥ 0 because H_b is concave. R is
    computed from p, as DESIGN states, so its gradient does not pass through the sampling.
    The last code (detached) is kept in ``code`` for inspection; a model that should run on
    the binary code calls :meth:`binarize` in its own forward.
    """

    name = "binary_bernoulli"

    def __init__(self, gamma: float = 1.0, *, tau: float = 6.0) -> None:
        super().__init__(gamma)
        if not math.isfinite(tau) or tau <= 0:
            raise RegularizerError(f"tau must be a finite number > 0, got {tau}")
        self.tau = float(tau)
        self.code: torch.Tensor | None = None

    def binarize(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, T): T sampled in training mode (thresholded at 0.5 in eval), straight-through."""
        p = torch.sigmoid(self.tau * features)
        hard = torch.bernoulli(p.detach()) if self.training else (p.detach() > 0.5).to(p.dtype)
        return p, p + (hard - p).detach()

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        p, code = self.binarize(features)
        self.code = code.detach()
        onehot = _group_onehot(sensitive, p.dtype)
        counts = onehot.sum(0)
        present = counts > 0
        theta_s = (onehot.T @ p)[present] / counts[present, None]
        weights = counts[present] / len(p)
        return (_binary_entropy(p.mean(0)) - weights @ _binary_entropy(theta_s)).sum()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, tau={self.tau}"


class BinaryMI(Regularizer):
    """I(T;S) between a k-bit binary code and the sensitive label, differentiable.

    The code is the first ``bits`` units of p = σ(τh) (default 8, so 2^8 = 256 codes; the other
    units are not constrained). Each sample's probability of each code t is the product of its
    Bernoulli probabilities, q_n(t) = Π_b p_nb^{t_b}(1 − p_nb)^{1−t_b}; the joint is
    P(t, s) = (1/N) Σ_{n∈s} q_n(t), and R = H(T) + H(S) − H(T, S) in nats. The published
    estimator counts sampled codes and passes no gradient; this one is differentiable in p.
    Unlike :class:`BinaryBernoulli` (per-unit, summed) it sees the bits jointly, so it also
    catches S encoded in combinations of bits. Cost is O(N · 2^bits); ``bits`` ≤ 16.
    """

    name = "binary_mi"

    def __init__(self, gamma: float = 1.0, *, bits: int = 8, tau: float = 6.0) -> None:
        super().__init__(gamma)
        self.bits = _check_int("bits", bits, 1)
        if self.bits > 16:
            raise RegularizerError(f"bits must be <= 16 (the joint has 2^bits codes), got {bits}")
        if not math.isfinite(tau) or tau <= 0:
            raise RegularizerError(f"tau must be a finite number > 0, got {tau}")
        self.tau = float(tau)
        codes = torch.arange(2**self.bits)[:, None] >> torch.arange(self.bits) & 1
        self.register_buffer("codes", codes.float(), persistent=False)

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        if features.shape[1] < self.bits:
            raise RegularizerError(f"{self.name}: bits={self.bits} but features have only "
                                   f"{features.shape[1]} units")
        h = self.tau * features[:, : self.bits]
        codes = self.codes.to(h.dtype)
        # log q_n(t) in log space: products of many probabilities underflow otherwise.
        log_q = F.logsigmoid(h) @ codes.T + F.logsigmoid(-h) @ (1 - codes).T
        joint = log_q.exp().T @ _group_onehot(sensitive, h.dtype) / len(h)

        def entropy(p: torch.Tensor) -> torch.Tensor:
            return -(p * p.clamp_min(1e-12).log()).sum()

        return (entropy(joint.sum(1)) + entropy(joint.sum(0)) - entropy(joint)).clamp_min(0)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, bits={self.bits}, tau={self.tau}"


class GroupBalanced(Regularizer):
    """Equal group weight in the loss (SensitiveLoss-style balancing), as an additive term.

    R = (1/N) Σ_i (w_i − 1)·CE_i with w_i = N/(G·N_{g(i)}) over the G groups present, so
    mean CE + R = (1/G) Σ_g mean_{i∈g} CE_i, the group-balanced CE. γ interpolates: γ = 1 is
    exact balancing, γ = 0 plain CE.

    ``per_class=True`` balances the groups inside each target class instead (w_i =
    N_y/(G_y·N_{y,g(i)})). That is the form that counters a spurious correlation such as
    colour ↔ digit, where every colour is equally common overall (so plain balancing does
    nothing) but rare inside each class; plain balancing is the form for a skewed group mix
    such as a face set dominated by one ethnic group.
    """

    name = "group_balanced"

    def __init__(self, gamma: float = 1.0, *, per_class: bool = False) -> None:
        super().__init__(gamma)
        self.per_class = bool(per_class)

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        ce = F.cross_entropy(logits, targets, reduction="none")
        weights = balanced_weights(sensitive, targets if self.per_class else None)
        return ((weights.to(ce.dtype) - 1) * ce).mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, per_class={self.per_class}"


class UnsupervisedGroups(Regularizer):
    """Online pseudo-group discovery, for training without sensitive labels.

    Per target class, an online k-means (k = ``clusters``) on the detached, L2-normalized
    features: centroids live in buffers, are seeded on the first batch that holds ≥ k samples
    of the class (farthest-point seeding, then a few Lloyd steps), and then follow each batch's
    cluster means with ``momentum``; the running share of each cluster is tracked the same way.
    A sample in its class's largest cluster is bias-aligned (pseudo-group 0); any other cluster
    is bias-conflicting (1). The last pseudo-groups are in ``pseudo_groups``.

    Alone, R up-weights the conflicting samples inside each class: R = (1/N) Σ_i (w_i − 1)·CE_i,
    w_i = N_y/(G_y·N_{y,g(i)}), so class proportions are kept. With ``inner`` (built by
    ``get_regularizer("unsupervised+X")``) the pseudo-groups are passed as ``sensitive`` to X
    and R is X's term (X built with γ = 1; this module's γ scales it). Any ``sensitive`` given
    is ignored. State updates only in training mode; for the first ``warmup_steps`` training
    calls the clusters learn but the term is 0, since early features carry little structure.
    """

    name = "unsupervised"
    needs_sensitive = False

    def __init__(self, gamma: float = 1.0, *, feature_dim: int, num_classes: int, clusters: int = 2,
                 momentum: float = 0.9, warmup_steps: int = 0, seed_iters: int = 10,
                 inner: Regularizer | None = None) -> None:
        super().__init__(gamma)
        self.feature_dim = _check_int("feature_dim", feature_dim, 1)
        self.num_classes = _check_int("num_classes", num_classes, 1)
        self.clusters = _check_int("clusters", clusters, 2)
        self.momentum = _check_unit("momentum", momentum)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        self.seed_iters = _check_int("seed_iters", seed_iters, 0)
        if inner is not None and (not isinstance(inner, Regularizer)
                                  or isinstance(inner, UnsupervisedGroups)):
            raise RegularizerError(f"inner must be a supervised Regularizer, got {type(inner).__name__}")
        self.inner = inner
        if inner is not None:
            self.name = f"unsupervised+{inner.name}"
        self.register_buffer("centroids", torch.zeros(num_classes, clusters, feature_dim))
        self.register_buffer("shares", torch.zeros(num_classes, clusters))
        self.register_buffer("seeded", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.pseudo_groups: torch.Tensor | None = None

    def _validate(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                  sensitive: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        features, targets, sensitive = super()._validate(features, logits, targets, sensitive)
        if features.shape[1] != self.feature_dim:
            raise RegularizerError(f"{self.name}: centroids were built for feature_dim={self.feature_dim}, "
                                   f"features have {features.shape[1]}")
        if int(targets.max()) >= self.num_classes:
            raise RegularizerError(f"{self.name}: target {int(targets.max())} out of range for "
                                   f"num_classes={self.num_classes}")
        return features, targets, sensitive

    def _seed(self, z: torch.Tensor) -> torch.Tensor:
        # Deterministic farthest-point seeding: start nearest the class mean (inside the bulk),
        # so the farthest points found next are the distinct, smaller modes.
        first = torch.cdist(z.mean(0, keepdim=True), z).argmin()
        centroids = z[first][None]
        for _ in range(1, self.clusters):
            farthest = torch.cdist(z, centroids).min(1).values.argmax()
            centroids = torch.cat([centroids, z[farthest][None]])
        for _ in range(self.seed_iters):
            assign = torch.cdist(z, centroids).argmin(1)
            for c in range(self.clusters):
                if (assign == c).any():
                    centroids[c] = z[assign == c].mean(0)
        return centroids

    @torch.no_grad()
    def discover(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Pseudo-groups (N,) of a batch: 1 for bias-conflicting, 0 for bias-aligned."""
        z = F.normalize(features.detach().float(), dim=1)
        groups = torch.zeros_like(targets)
        m = self.momentum
        for y in targets.unique().tolist():
            idx = (targets == y).nonzero().squeeze(1)
            zy = z[idx]
            if not self.seeded[y]:
                if not self.training or len(idx) < self.clusters:
                    continue
                self.centroids[y] = self._seed(zy)
                share = torch.bincount(torch.cdist(zy, self.centroids[y]).argmin(1), minlength=self.clusters)
                self.shares[y] = share.float() / len(idx)
                self.seeded[y] = True
            assign = torch.cdist(zy, self.centroids[y]).argmin(1)
            if self.training:
                for c in range(self.clusters):
                    if (assign == c).any():
                        self.centroids[y, c] = m * self.centroids[y, c] + (1 - m) * zy[assign == c].mean(0)
                share = torch.bincount(assign, minlength=self.clusters).float() / len(idx)
                self.shares[y] = m * self.shares[y] + (1 - m) * share
            groups[idx] = (assign != self.shares[y].argmax()).long()
        return groups

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        groups = self.discover(features, targets)
        self.pseudo_groups = groups
        if self.training:
            self.steps += 1
            if int(self.steps) <= self.warmup_steps:
                return features.new_zeros(())
        if self.inner is not None:
            return self.inner(features, logits, targets, groups)
        ce = F.cross_entropy(logits, targets, reduction="none")
        return ((balanced_weights(groups, strata=targets).to(ce.dtype) - 1) * ce).mean()

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, clusters={self.clusters}, momentum={self.momentum}, "
                f"warmup_steps={self.warmup_steps}")


# ----------------------------------------------------------------------------- feature tap


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
        self._handle = modules[layer].register_forward_hook(self._capture)

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
        self._handle.remove()
        self._features = None

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# ----------------------------------------------------------------------------- registry


REGULARIZERS: dict[str, type[Regularizer]] = {
    cls.name: cls
    for cls in (NDR, EnD, GRAD, BinaryBernoulli, BinaryMI, SensitiveNets, LNTL, GroupBalanced,
                UnsupervisedGroups)
}


def _lookup(name: str) -> type[Regularizer]:
    if name not in REGULARIZERS:
        raise RegularizerError(f"unknown regularizer {name!r}; known: {sorted(REGULARIZERS)} "
                               f"and 'unsupervised+X' for X among them")
    return REGULARIZERS[name]


def _option_names(cls: type[Regularizer]) -> tuple[set[str], set[str]]:
    """(accepted, required) keyword options of a regularizer's constructor."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name not in ("self", "gamma", "inner")]
    return {p.name for p in params}, {p.name for p in params if p.default is inspect.Parameter.empty}


def _build(cls: type[Regularizer], gamma: float, options: dict[str, Any], label: str,
           **extra: Any) -> Regularizer:
    _, required = _option_names(cls)
    missing = sorted(required - set(options))
    if missing:
        raise RegularizerError(f"{label} needs options {missing}")
    return cls(gamma, **options, **extra)


def get_regularizer(name: str, gamma: float = 1.0, **options: Any) -> Regularizer:
    """Build a registered regularizer by name, e.g. ``get_regularizer("grad", 1.0, feature_dim=128,
    num_groups=3)``. "unsupervised+X" wraps X in :class:`UnsupervisedGroups`: options go to the
    constructor(s) that accept them (``feature_dim`` to both), and X's ``num_groups`` defaults to 2,
    the number of pseudo-groups."""
    base, plus, inner_name = name.partition("+")
    if not plus:
        cls = _lookup(name)
        accepted, _ = _option_names(cls)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise RegularizerError(f"{name} does not take options {unknown}; it accepts {sorted(accepted)}")
        return _build(cls, gamma, options, name)
    if base != UnsupervisedGroups.name:
        raise RegularizerError(f"composite names take the form 'unsupervised+X', got {name!r}")
    inner_cls = _lookup(inner_name)
    if inner_cls is UnsupervisedGroups:
        raise RegularizerError("'unsupervised+unsupervised' is not a regularizer; "
                               "X must be one that uses sensitive labels")
    outer_accepts, _ = _option_names(UnsupervisedGroups)
    inner_accepts, _ = _option_names(inner_cls)
    unknown = sorted(set(options) - outer_accepts - inner_accepts)
    if unknown:
        raise RegularizerError(f"{name} does not take options {unknown}; it accepts "
                               f"{sorted(outer_accepts | inner_accepts)}")
    inner_options = {k: v for k, v in options.items() if k in inner_accepts}
    if "num_groups" in inner_accepts:
        inner_options.setdefault("num_groups", 2)
    inner = _build(inner_cls, 1.0, inner_options, name)
    outer_options = {k: v for k, v in options.items() if k in outer_accepts}
    return _build(UnsupervisedGroups, gamma, outer_options, name, inner=inner)


def check_regularizer_name(name: str) -> None:
    """Raise :class:`RegularizerError` unless ``name`` is ``"none"``, registered, or ``unsupervised+X``."""
    if name == "none":
        return
    base, plus, inner = name.partition("+")
    _lookup(base)
    if plus and (base != UnsupervisedGroups.name or _lookup(inner) is UnsupervisedGroups):
        raise RegularizerError(f"composite names take the form 'unsupervised+X', got {name!r}")


# What a trainer fills in from the model and the data; everything else is the user's to set.
MODEL_SHAPES = ("feature_dim", "num_groups", "num_classes")


def regularizer_options(name: str) -> set[str]:
    """The options a user may set for ``name`` (constructor keywords other than γ and the
    model shapes a trainer supplies); empty for ``"none"``."""
    check_regularizer_name(name)
    if name == "none":
        return set()
    parts = [part for part in name.partition("+")[::2] if part]
    return set().union(*(_option_names(_lookup(part))[0] for part in parts)) - set(MODEL_SHAPES)


def regularizer_for_model(name: str, gamma: float, *, feature_dim: int, num_groups: int,
                          num_classes: int, options: dict[str, Any] | None = None) -> Regularizer:
    """Build ``name`` for a model whose bottleneck has ``feature_dim`` units.

    The shapes a trainer knows (bottleneck width, number of sensitive groups, number of
    classes) go only to the constructors that take them. For ``unsupervised+X``, X sees the
    two pseudo-groups, not ``num_groups``. Of ``options``, those ``name`` does not take are
    ignored: a zoo that sweeps several regularizers sets each one's options once for all.
    """
    check_regularizer_name(name)
    base, plus, inner = name.partition("+")
    accepted = set().union(*(_option_names(_lookup(part))[0] for part in (base, inner) if part))
    shapes = {"feature_dim": feature_dim, "num_classes": num_classes}
    if not plus:
        shapes["num_groups"] = num_groups
    chosen = {k: v for k, v in (options or {}).items() if k in accepted and k not in MODEL_SHAPES}
    return get_regularizer(name, gamma, **{k: v for k, v in shapes.items() if k in accepted}, **chosen)
