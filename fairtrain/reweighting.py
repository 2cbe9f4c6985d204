"""The fairness regularizers that reweigh the task loss instead of shaping the features:
group-balanced weighting (SensitiveLoss-style) with the sensitive labels, and unsupervised
online pseudo-groups without them (DESIGN §4), each as an additive term γ·R.

Part of the trainer stage; the registry that builds them by name is :mod:`fairtrain.regularizers`.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fairtrain.base import RegularizerError, balanced_table, balanced_weights, check_int, check_unit
from fairtrain.interface import Regularizer


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
