"""The fairness regularizers that shape the features themselves, one class per method, each
after its paper (DESIGN §4): NDR, EnD, BinaryBernoulli and BinaryMI. Each class says where it
departs from its source; the methods with an adversarial attribute head (GRAD, LNTL,
SensitiveNets) are :mod:`fairtrain.adversaries`, those that reweigh the task loss
(group-balanced weighting, unsupervised pseudo-groups) :mod:`fairtrain.reweighting`.

Part of the trainer stage; the registry that builds them by name is :mod:`fairtrain.regularizers`.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from fairtrain.base import (
    RegularizerError,
    binary_entropy,
    check_gamma,
    check_int,
    group_onehot,
    lower_pairs,
    masked_mean,
    mean_over_labels,
    ndr_penalty,
    pairwise_cosine,
    same_label_pairs,
)
from fairtrain.interface import Regularizer
from fairtrain.taps import ACTIVATIONS, FeatureTap, Tap

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
    # The paper's Table I taps conv1's pre-activation or fc1; fc1's pre-activation keeps the
    # features signed, so switching units off (all-zero post-ReLU vectors, R = 0) cannot satisfy R.
    default_tap = Tap(None, "pre")

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        return ndr_penalty(features, sensitive)


class EnD(Regularizer):
    """Tartaglione, Barbano & Grangetto, CVPR 2021: R = α·R_⊥ + β·R_∥ on normalized features.

    With g_ij the cosine of samples i, j, the default ``form="source"`` follows the authors'
    ``EnD.py``: R_⊥ ("disentangle") = Σ_b |Σ_{i<j ∈ b} g_ij| / Σ_b M_b over the bias groups b,
    the absolute value of each group's *summed* cosines over all groups' pairs together, so
    positive and negative cosines of signed features cancel; R_∥ ("entangle") is the mean of
    (1 − g_ij)/2 over all same-class pairs of different bias, 1 − mean (1 + g)/2 as the source
    writes it (the source's masks count one ordered half of those pairs, whose mean has the same
    expectation). Each term is 0 when it has no pairs. ``form="pairwise"`` is the earlier form
    kept for its recorded runs: R_⊥ is :class:`NDR`'s per-pair |g| averaged per group, R_∥ the
    per-class means averaged over classes. α = β = 0.1 by default; DESIGN notes larger β,
    smaller α works better. On digit-cnn it still departs: the source's classifier reads the
    L2-normalised tanh features, digit-cnn's keeps its own bottleneck; ``end-cnn`` is the
    source's network, whose classifier and term (``activation="pre"``) read the same unit-norm
    features (docs/fairtrain.md).
    """

    name = "end"
    # EnD's network ends in tanh and normalises after it; here tanh of the bottleneck's
    # pre-activation is what the term reads (the classifier itself keeps digit-cnn's ReLU).
    default_tap = Tap(None, "tanh")
    forms = ("source", "pairwise")

    def __init__(self, gamma: float = 1.0, *, alpha: float = 0.1, beta: float = 0.1,
                 form: str = "source") -> None:
        super().__init__(gamma)
        self.alpha = check_gamma(alpha, "alpha")
        self.beta = check_gamma(beta, "beta")
        if form not in self.forms:
            raise RegularizerError(f"form must be one of {list(self.forms)} for end, got {form!r}")
        self.form = form

    def orthogonal_term(self, features: torch.Tensor, sensitive: torch.Tensor) -> torch.Tensor:
        """R_⊥ over same-bias pairs, in this regularizer's form."""
        if self.form == "pairwise":
            return ndr_penalty(features, sensitive)
        gram, mask = pairwise_cosine(features), same_label_pairs(sensitive)
        group_sums = gram.new_zeros(int(sensitive.max()) + 1).index_add(0, sensitive, (gram * mask).sum(1))
        pairs = mask.sum()
        return group_sums.abs().sum() / pairs if pairs > 0 else gram.new_zeros(())

    def parallel_term(self, features: torch.Tensor, targets: torch.Tensor,
                      sensitive: torch.Tensor) -> torch.Tensor:
        """R_∥: the mean of (1 − g_ij)/2 over same-class, different-bias pairs i<j (per class,
        then over classes, in the pairwise form)."""
        gram = pairwise_cosine(features)
        mask = ((targets[:, None] == targets[None, :]) & (sensitive[:, None] != sensitive[None, :])
                & lower_pairs(len(targets), gram.device))
        if self.form == "pairwise":
            return mean_over_labels((1 - gram) / 2, mask, targets)
        return masked_mean((1 - gram) / 2, mask)

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        return (self.alpha * self.orthogonal_term(features, sensitive)
                + self.beta * self.parallel_term(features, targets, sensitive))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, beta={self.beta}, form={self.form!r}"


class BinaryBernoulli(Regularizer):
    """Cerrato et al., AAAI 2023: a stochastic binary layer and the groups' entropy gap.

    The tapped layer's output h (by default tanh of the bottleneck's pre-activation) becomes
    p = σ(τh), τ ≈ 6, the source's σ(6·tanh(·)); the layer's output is *replaced* by the code
    T ~ Bernoulli(p) in training (straight-through gradient), T = [p > ½] in eval mode, so the
    classifier runs on the binary code, as in the source (the hook stays on the model after
    training: it is part of the trained network). With θ_i the batch mean of p_i and θ_i^s its
    mean over group s,

        R = Σ_i [H_b(θ_i) − Σ_s (N_s/N) H_b(θ_i^s)]   (bits, summed over units),

    the per-unit information the code carries about S; ≥ 0 because H_b is concave. The
    objective is the source's (1 − γ)·CE + γ·R, so γ lies in [0, 1); R is computed from p, so
    its gradient does not pass through the sampling.
    """

    name = "binary_bernoulli"
    default_tap = Tap(None, "tanh")  # p = σ(τ·tanh(h)), the source's σ(6·tanh(·))
    alters_forward = True
    vectorizable = False  # a random draw inside the network cannot run under vmap

    def __init__(self, gamma: float = 0.5, *, tau: float = 6.0) -> None:
        if not 0 <= gamma < 1:
            raise RegularizerError(f"gamma must lie in [0, 1) for binary_bernoulli, whose objective is "
                                   f"(1 - gamma)·CE + gamma·R (1 would drop the task loss), got {gamma!r}")
        super().__init__(gamma)
        if not math.isfinite(tau) or tau <= 0:
            raise RegularizerError(f"tau must be a finite number > 0, got {tau}")
        self.tau = float(tau)

    @property
    def task_weight(self) -> float:
        return 1.0 - self.gamma

    def attach(self, model: torch.nn.Module) -> FeatureTap:
        """Hook the binary layer onto the tap: features are p, the layer's output becomes T."""
        return BinaryCodeTap(model, self.tap.layer, ACTIVATIONS[self.tap.activation], self.tau)

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        p = features  # the tap's p = σ(τh)
        onehot = group_onehot(sensitive, p.dtype)
        counts = onehot.sum(0)
        present = counts > 0
        theta_s = (onehot.T @ p)[present] / counts[present, None]
        weights = counts[present] / len(p)
        return (binary_entropy(p.mean(0)) - weights @ binary_entropy(theta_s)).sum() / math.log(2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau}"


def binarize(p: torch.Tensor, sample: bool) -> torch.Tensor:
    """T ~ Bernoulli(p) when ``sample``, else [p > ½]; straight-through (gradient as if T = p)."""
    hard = torch.bernoulli(p.detach()) if sample else (p.detach() > 0.5).to(p.dtype)
    return p + (hard - p).detach()


class BinaryCodeTap(FeatureTap):
    """A tap that turns its layer into a stochastic binary layer: it captures p = σ(τ·a(out))
    and hands the network the code T instead of the layer's output (sampled while the layer is
    in training mode, thresholded in eval mode)."""

    def __init__(self, model: torch.nn.Module, layer: str | None, activation, tau: float) -> None:
        super().__init__(model, layer, activation)
        self.tau = tau

    def _capture(self, module: torch.nn.Module, inputs: tuple, output: object) -> torch.Tensor:
        super()._capture(module, inputs, output)
        p = torch.sigmoid(self.tau * self._features)
        self._features = p
        return binarize(p, module.training)


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
    default_tap = Tap(None, "tanh")  # as BinaryBernoulli: σ(τ·tanh(h))

    def __init__(self, gamma: float = 1.0, *, bits: int = 8, tau: float = 6.0) -> None:
        super().__init__(gamma)
        self.bits = check_int("bits", bits, 1)
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
        joint = log_q.exp().T @ group_onehot(sensitive, h.dtype) / len(h)

        def entropy(p: torch.Tensor) -> torch.Tensor:
            return -(p * p.clamp_min(1e-12).log()).sum()

        return (entropy(joint.sum(1)) + entropy(joint.sum(0)) - entropy(joint)).clamp_min(0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, tau={self.tau}"
