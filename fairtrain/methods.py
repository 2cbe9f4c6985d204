"""The fairness regularizers that shape or weigh the features themselves, one class per method,
each after its paper (DESIGN §4): NDR, EnD, BinaryBernoulli, BinaryMI, group-balanced weighting
and unsupervised pseudo-groups. Each class says where it departs from its source; the methods
with an adversarial attribute head (GRAD, LNTL, SensitiveNets) are :mod:`fairtrain.adversaries`.

Part of the trainer stage; the registry that builds them by name is :mod:`fairtrain.regularizers`.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from fairtrain.base import (
    RegularizerError,
    balanced_table,
    balanced_weights,
    binary_entropy,
    check_gamma,
    check_int,
    check_unit,
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
    smaller α works better. Still departs: the source's classifier reads the L2-normalised
    tanh features; here it keeps the network's own bottleneck (docs/fairtrain.md).
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


class GroupBalanced(Regularizer):
    """Equal group weight in the loss (SensitiveLoss-style balancing), as an additive term.

    R = (1/N) Σ_i (w_i − 1)·CE_i with w_i = N/(G·N_{g(i)}) over the G groups present, so
    mean CE + R = (1/G) Σ_g mean_{i∈g} CE_i, the group-balanced CE. γ interpolates: γ = 1 is
    exact balancing, γ = 0 plain CE. The counts N_g are the whole training set's once a
    trainer has called :meth:`prepare` (as the source balances its data set; inside a batch of
    128 the rare colour-conflicting digits got 6.5% of the loss, at dataset level 90%), and a
    batch's own otherwise.

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
        self.table: torch.Tensor | None = None  # (strata, groups) weights from the training set

    def prepare(self, targets: torch.Tensor, sensitive: torch.Tensor) -> None:
        targets, sensitive = targets.long(), sensitive.long()
        strata = targets if self.per_class else torch.zeros_like(targets)
        self.table = balanced_table(sensitive, strata, int(sensitive.max()) + 1, int(strata.max()) + 1)

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        ce = F.cross_entropy(logits, targets, reduction="none")
        if self.table is None:
            weights = balanced_weights(sensitive, targets if self.per_class else None)
        else:
            strata = targets if self.per_class else torch.zeros_like(targets)
            if int(strata.max()) >= self.table.shape[0] or int(sensitive.max()) >= self.table.shape[1]:
                raise RegularizerError(f"{self.name}: a label outside the training set it was prepared on")
            weights = self.table.to(ce.device)[strata, sensitive]
        return ((weights.to(ce.dtype) - 1) * ce).mean()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per_class={self.per_class}"


class UnsupervisedGroups(Regularizer):
    """Online pseudo-group discovery, for training without sensitive labels.

    Per target class, an online k-means (k = ``clusters``) on the detached, L2-normalized
    features: centroids live in buffers, are seeded on the first batch that holds ≥ k samples
    of the class (farthest-point seeding, then a few Lloyd steps), and then follow each batch's
    cluster means with ``momentum``; the running share of each cluster is tracked the same way.
    A sample in its class's largest cluster is bias-aligned (pseudo-group 0); any other cluster
    is bias-conflicting (1). The last pseudo-groups are in ``pseudo_groups``.

    Alone, R up-weights the conflicting samples inside each class: R = (1/N) Σ_i (w_i − 1)·CE_i,
    w_i = 1/(2·s_{y,g(i)}) with s the running (dataset-level) share of each pseudo-group in
    class y (:meth:`weights`), so class proportions are kept. With ``inner`` (built by
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
        self.feature_dim = check_int("feature_dim", feature_dim, 1)
        self.num_classes = check_int("num_classes", num_classes, 1)
        self.clusters = check_int("clusters", clusters, 2, maximum=256)
        self.momentum = check_unit("momentum", momentum)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.seed_iters = check_int("seed_iters", seed_iters, 0, maximum=1000)
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
        return ((self.weights(groups, targets).to(ce.dtype) - 1) * ce).mean()

    def weights(self, groups: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """w_i = 1/(2·s), s the running share (over the data seen, not this batch) of sample i's
        pseudo-group in its class: both pseudo-groups weigh the same, the class keeps its mass.
        A class not yet clustered weighs 1; shares are floored at 1% against blow-ups."""
        aligned = self.shares[targets].max(1).values
        share = torch.where(groups == 0, aligned, 1 - aligned).clamp_min(0.01)
        return torch.where(self.seeded[targets], 0.5 / share, torch.ones_like(share))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, clusters={self.clusters}, momentum={self.momentum}, "
                f"warmup_steps={self.warmup_steps}")
