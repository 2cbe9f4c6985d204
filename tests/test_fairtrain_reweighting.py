"""Reweighting regularizers: group-balanced cross-entropy and unsupervised (clustered) groups."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from fairtrain.regularizers import (
    RegularizerError,
    balanced_weights,
    get_regularizer,
    regularizer_for_model,
    regularizer_options,
)
from tests.test_fairtrain_regularizers import batch, dummy, reg_of

# ----------------------------------------------------------------------------- balancing


def test_group_balanced_term_completes_the_balanced_cross_entropy() -> None:
    features, logits, targets, _ = batch(n=10)
    groups = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 2])
    ce = F.cross_entropy(logits, targets, reduction="none")
    balanced = (ce[:7].mean() + ce[7:9].mean() + ce[9:].mean()) / 3
    total = F.cross_entropy(logits, targets) + reg_of("group_balanced")(features, logits, targets, groups)
    assert total.item() == pytest.approx(balanced.item(), rel=1e-6)


def test_group_balanced_per_class_balances_groups_inside_each_class() -> None:
    features, logits, _, _ = batch(n=8)
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])  # 3:1 inside each class, 1:1 overall
    ce = F.cross_entropy(logits, targets, reduction="none")
    plain = get_regularizer("group_balanced")(features, logits, targets, groups)
    assert plain.abs().item() < 1e-6  # the groups are balanced overall: nothing to reweight
    per_class = get_regularizer("group_balanced", per_class=True)(features, logits, targets, groups)
    within = ((ce[:3].mean() + ce[3]) / 2 + (ce[4:7].mean() + ce[7]) / 2) / 2
    assert (F.cross_entropy(logits, targets) + per_class).item() == pytest.approx(within.item(), rel=1e-6)


def test_group_balanced_weighs_by_the_training_sets_counts_once_prepared() -> None:
    # The training set: in class 0, 95 aligned (group 0) and 5 conflicting (group 1) digits.
    targets_all, groups_all = torch.zeros(100, dtype=torch.long), (torch.arange(100) >= 95).long()
    reg = get_regularizer("group_balanced", per_class=True)
    reg.prepare(targets_all, groups_all)
    assert reg.table[0].tolist() == pytest.approx([100 / (2 * 95), 100 / (2 * 5)])
    # A batch of 7 aligned and 1 conflicting: weighed by the data set, not by the batch's 7:1.
    features, logits, _, _ = batch(n=8)
    targets, groups = torch.zeros(8, dtype=torch.long), torch.tensor([0] * 7 + [1])
    ce = F.cross_entropy(logits, targets, reduction="none")
    want = (ce[:7] * 100 / 190).sum() / 8 + ce[7] * 10 / 8
    total = F.cross_entropy(logits, targets) + reg(features, logits, targets, groups)
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    conflicting_share = (ce[7] * 10) / (ce[:7] * 100 / 190).sum().add(ce[7] * 10)
    assert conflicting_share > 0.5  # in-batch balancing would give it only half of the loss
    with pytest.raises(RegularizerError, match="outside the training set"):
        reg(features, logits, targets, torch.tensor([0] * 7 + [2]))


def test_unsupervised_weighs_by_running_shares_not_by_the_batch() -> None:
    reg = reg_of("unsupervised")
    features, targets, _ = planted()
    reg(features, torch.zeros(len(targets), 10), targets)  # seeds both classes
    aligned = reg.shares.max(1).values
    groups = torch.tensor([0, 1, 0, 1])
    labels = torch.tensor([0, 0, 1, 1])
    want = torch.stack([0.5 / aligned[0], 0.5 / (1 - aligned[0]), 0.5 / aligned[1], 0.5 / (1 - aligned[1])])
    assert torch.allclose(reg.weights(groups, labels), want)
    fresh = reg_of("unsupervised")  # nothing clustered yet: every sample weighs 1
    assert torch.equal(fresh.weights(groups, labels), torch.ones(4))


def test_model_regularizers_take_the_options_they_accept() -> None:
    shapes = {"feature_dim": 8, "num_groups": 3, "num_classes": 2}
    options = {"hidden": 16, "per_class": True}  # one zoo-wide table: grad takes hidden only
    grad = regularizer_for_model("grad", 1.0, **shapes, options=options)
    linears = [m for m in grad.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [16, 16, 3]  # two hidden layers (the paper's) + output
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in grad.modules()) == 2
    plain = regularizer_for_model("grad", 1.0, **shapes, options={"hidden": 0})
    assert isinstance(plain.head, torch.nn.Linear)
    balanced = regularizer_for_model("group_balanced", 1.0, **shapes, options=options)
    assert balanced.per_class is True
    assert regularizer_options("unsupervised+end") >= {"alpha", "beta", "clusters", "momentum"}
    assert "feature_dim" not in regularizer_options("grad")


def test_balanced_weights_within_strata_keep_stratum_mass() -> None:
    groups = torch.tensor([0, 0, 0, 1, 0, 1])
    strata = torch.tensor([0, 0, 0, 0, 1, 1])
    w = balanced_weights(groups, strata)
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 6, 4 / 6, 2.0, 1.0, 1.0]))


# ----------------------------------------------------------------------------- unsupervised


def planted(n: int = 200, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two classes, each 90% around one direction and 10% around another: the minority is planted."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 2
    minority = (torch.rand(n, generator=g) < 0.1).long()
    centers = torch.eye(dim)[: 4] * 5
    features = centers[targets * 2 + minority] + 0.3 * torch.randn(n, dim, generator=g)
    return features, targets, minority


def test_unsupervised_flags_the_planted_minority() -> None:
    reg = reg_of("unsupervised")
    features, targets, minority = planted()
    logits = torch.randn(len(targets), 10, requires_grad=True)
    term = reg(features, logits, targets)
    assert torch.equal(reg.pseudo_groups, minority)
    ce = F.cross_entropy(logits, targets, reduction="none")
    w = balanced_weights(minority, strata=targets)
    assert (F.cross_entropy(logits, targets) + term).item() == pytest.approx((w * ce).mean().item(), rel=1e-6)
    for seed in (1, 2, 3):  # later batches keep the same labelling as the centroids move
        features, targets, minority = planted(seed=seed)
        reg(features, torch.zeros(len(targets), 10), targets)
        assert torch.equal(reg.pseudo_groups, minority)


def test_unsupervised_warmup_and_eval_leave_the_term_or_state_alone() -> None:
    reg = get_regularizer("unsupervised", 1.0, feature_dim=16, num_classes=10, warmup_steps=1)
    features, targets, _ = planted()
    logits = torch.randn(len(targets), 10)
    assert reg(features, logits, targets).item() == 0.0
    assert reg.seeded[:2].all()
    state = {k: v.clone() for k, v in reg.state_dict().items()}
    reg.eval()
    reg(planted(seed=4)[0], logits, targets)
    assert all(torch.equal(v, reg.state_dict()[k]) for k, v in state.items())


def test_unsupervised_plus_ndr_runs_without_sensitive_labels() -> None:
    reg = get_regularizer("unsupervised+ndr", 2.0, feature_dim=16, num_classes=10)
    assert reg.name == "unsupervised+ndr" and not reg.needs_sensitive
    features, targets, minority = planted()
    features.requires_grad_()
    term = reg(features, torch.zeros(len(targets), 10), targets, None)
    expected = 2.0 * get_regularizer("ndr", 1.0)(features, *dummy(len(targets)), minority)
    assert term.item() == pytest.approx(expected.item(), rel=1e-5)
    term.backward()
    assert features.grad.abs().sum() > 0


def test_unsupervised_composite_routes_options_and_owns_the_inner_head() -> None:
    reg = get_regularizer("unsupervised+grad", 1.0, feature_dim=16, num_classes=10, hidden=8)
    assert reg.inner.num_groups == 2 and reg.inner.feature_dim == 16
    assert {id(p) for p in reg.inner.parameters()} == {id(p) for p in reg.parameters()}
