"""Fairness regularizers: each formula's defining property, the heads' gradient paths, the tap, registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from fairtrain.methods import binarize
from fairtrain.regularizers import (
    REGULARIZERS,
    GradientReversal,
    Regularizer,
    RegularizerError,
    get_regularizer,
    regularizer_for_network,
    regularizer_vectorizable,
    reverse_gradient,
)
from modelzoo.architectures import build_model

HEAD_OPTIONS = {"feature_dim": 16, "num_groups": 3}
OPTIONS = {
    "ndr": {}, "end": {}, "binary_bernoulli": {}, "binary_mi": {"bits": 4}, "group_balanced": {},
    "grad": HEAD_OPTIONS, "lntl": {**HEAD_OPTIONS, "target": "group"}, "sensitive_nets": HEAD_OPTIONS,
    "unsupervised": {"feature_dim": 16, "num_classes": 10},
}


def batch(n: int = 12, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=g, requires_grad=True)
    logits = torch.randn(n, 10, generator=g, requires_grad=True)
    targets = torch.randint(0, 10, (n,), generator=g)
    sensitive = torch.arange(n) % 3
    return features, logits, targets, sensitive


def dummy(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets for regularizers that only read features."""
    return torch.zeros(n, 10), torch.zeros(n, dtype=torch.long)


def reg_of(name: str, gamma: float | None = None) -> Regularizer:
    """``name`` with its test options, at γ = 1 (binary_bernoulli, whose γ lies in [0, 1): ½)."""
    if gamma is None:
        gamma = 0.5 if name == "binary_bernoulli" else 1.0
    return get_regularizer(name, gamma, **OPTIONS[name])


# ----------------------------------------------------------------------------- contract


def test_registry_covers_design_section_4() -> None:
    assert set(REGULARIZERS) == set(OPTIONS)


@pytest.mark.parametrize("name", [n for n, cls in REGULARIZERS.items() if cls.needs_sensitive])
def test_missing_sensitive_labels_names_the_regularizer(name: str) -> None:
    features, logits, targets, _ = batch()
    with pytest.raises(RegularizerError, match=rf"{name} needs sensitive labels"):
        reg_of(name)(features, logits, targets, None)


def test_mismatched_batch_sizes_are_refused() -> None:
    features, logits, targets, sensitive = batch()
    with pytest.raises(RegularizerError, match=r"batch sizes differ.*sensitive has 11"):
        reg_of("ndr")(features, logits, targets, sensitive[:11])
    with pytest.raises(RegularizerError, match="logits must be"):
        reg_of("ndr")(features, logits[:5], targets, sensitive)
    with pytest.raises(RegularizerError, match="integer"):
        reg_of("ndr")(features, logits, targets, sensitive.float())


def test_head_regularizer_checks_width_and_group_range() -> None:
    features, logits, targets, sensitive = batch(dim=8)
    with pytest.raises(RegularizerError, match="feature_dim=16"):
        reg_of("grad")(features, logits, targets, sensitive)
    features, logits, targets, _ = batch()
    with pytest.raises(RegularizerError, match="num_groups=3"):
        reg_of("grad")(features, logits, targets, torch.full((12,), 5))


def test_registry_errors_list_what_is_known() -> None:
    with pytest.raises(RegularizerError, match=r"unknown regularizer 'nope'.*'ndr'"):
        get_regularizer("nope", 1.0)
    with pytest.raises(RegularizerError, match=r"unknown regularizer 'nope'"):
        get_regularizer("unsupervised+nope", 1.0, feature_dim=16, num_classes=10)
    with pytest.raises(RegularizerError, match="unsupervised\\+X"):
        get_regularizer("ndr+grad", 1.0)
    with pytest.raises(RegularizerError, match=r"does not take options \['alhpa'\]"):
        get_regularizer("end", 1.0, alhpa=0.2)
    with pytest.raises(RegularizerError, match=r"needs options \['feature_dim', 'num_groups'\]"):
        get_regularizer("grad", 1.0)
    with pytest.raises(RegularizerError, match="gamma"):
        get_regularizer("ndr", -1.0)


def test_gamma_scales_the_term() -> None:
    features, logits, targets, sensitive = batch()
    one = reg_of("end", 1.0)(features, logits, targets, sensitive)
    assert reg_of("end", 2.5)(features, logits, targets, sensitive).item() == pytest.approx(2.5 * one.item())


# ----------------------------------------------------------------------------- NDR / EnD


def test_ndr_is_zero_for_orthogonal_and_one_for_identical_same_group_features() -> None:
    logits, targets = dummy(4)
    ndr = reg_of("ndr")
    groups = torch.tensor([0, 0, 1, 1])
    orthogonal = torch.eye(4) * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]
    assert ndr(orthogonal, logits, targets, groups).item() == pytest.approx(0.0)
    identical = torch.ones(4, 5)
    assert ndr(identical, logits, targets, groups).item() == pytest.approx(1.0)


def test_ndr_ignores_a_group_with_one_sample() -> None:
    ndr = reg_of("ndr")
    features = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    pair = ndr(features[:2], *dummy(2), torch.tensor([0, 0]))
    with_singleton = ndr(features, *dummy(3), torch.tensor([0, 0, 1]))
    assert pair.item() == pytest.approx(math.sqrt(0.5))
    assert with_singleton.item() == pytest.approx(pair.item())
    assert ndr(features, *dummy(3), torch.tensor([0, 1, 2])).item() == 0.0


def test_ndr_cannot_cancel_signed_cosines() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    features = torch.stack([a, a, b, -b])
    gram = F.normalize(features, dim=1) @ F.normalize(features, dim=1).T
    assert (gram.sum() - gram.trace()).item() == pytest.approx(0.0)  # |Σ g_ij| would read 0 here
    assert reg_of("ndr")(features, *dummy(4), torch.zeros(4, dtype=torch.long)).item() > 0.3


@pytest.mark.parametrize("form", ["source", "pairwise"])
def test_end_pulls_same_class_pairs_across_bias_groups(form: str) -> None:
    end = get_regularizer("end", 1.0, alpha=0.0, beta=1.0, form=form)
    targets, bias = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    logits = torch.zeros(4, 10)
    aligned = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    assert end(aligned, logits, targets, bias).item() == pytest.approx(0.0)
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert end(orthogonal, logits, targets, bias).item() == pytest.approx(0.5)
    features, logits, targets, sensitive = batch()
    both = get_regularizer("end", 1.0, alpha=0.3, beta=0.7, form=form)
    expected = (0.3 * both.orthogonal_term(features, sensitive)
                + 0.7 * both.parallel_term(features, targets, sensitive))
    assert both(features, logits, targets, sensitive).item() == pytest.approx(expected.item())
    if form == "pairwise":
        alone = get_regularizer("ndr", 1.0)(features, logits, targets, sensitive)
        assert both.orthogonal_term(features, sensitive).item() == pytest.approx(alone.item())


def source_end_terms(features: torch.Tensor, targets: torch.Tensor,
                     bias: torch.Tensor) -> tuple[float, float]:
    """EnD's two terms written out pair by pair, as the authors' EnD.py defines them."""
    z = F.normalize(features.detach(), dim=1)
    same_sums, same_pairs, cross, cross_pairs = {}, 0, 0.0, 0
    for i in range(len(z)):
        for j in range(i):
            g = float(z[i] @ z[j])
            if bias[i] == bias[j]:
                same_sums[int(bias[i])] = same_sums.get(int(bias[i]), 0.0) + g
                same_pairs += 1
            elif targets[i] == targets[j]:
                cross += (1 + g) / 2
                cross_pairs += 1
    orthogonal = sum(abs(v) for v in same_sums.values()) / same_pairs if same_pairs else 0.0
    return orthogonal, (1 - cross / cross_pairs) if cross_pairs else 0.0


def test_end_source_form_matches_the_reference_terms_and_lets_signed_cosines_cancel() -> None:
    features, _, targets, sensitive = batch(n=40)
    end = get_regularizer("end", 1.0)
    assert end.form == "source"
    orthogonal, parallel = source_end_terms(features, targets, sensitive)
    assert orthogonal > 0 and parallel > 0
    assert end.orthogonal_term(features, sensitive).item() == pytest.approx(orthogonal, rel=1e-5)
    assert end.parallel_term(features, targets, sensitive).item() == pytest.approx(parallel, rel=1e-5)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    signed = torch.stack([a, -a, b, -b])  # one group: cosines -1 twice and 0 four times
    one_group = torch.zeros(4, dtype=torch.long)
    assert end.orthogonal_term(signed, one_group).item() == pytest.approx(2 / 6)
    cancelling = torch.stack([a, a, b, -b])  # cosines +1 and -1 (and four 0): the sum is 0
    assert end.orthogonal_term(cancelling, one_group).item() == pytest.approx(0.0, abs=1e-6)
    pairwise = get_regularizer("end", 1.0, form="pairwise")
    assert pairwise.orthogonal_term(cancelling, one_group).item() == pytest.approx(2 / 6)
    with pytest.raises(RegularizerError, match="form must be one of"):
        get_regularizer("end", 1.0, form="paper")


# ----------------------------------------------------------------------------- adversarial heads


def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    upstream = torch.randn(5, 3)
    y = reverse_gradient(x, 0.7)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.allclose(x.grad, -0.7 * upstream)
    x.grad = None
    GradientReversal(2.0)(x).backward(upstream)
    assert torch.allclose(x.grad, -2.0 * upstream)


@pytest.mark.parametrize("name", ["grad", "lntl", "sensitive_nets"])
def test_heads_are_parameters_of_the_regularizer(name: str) -> None:
    reg = reg_of(name)
    head_params = {id(p) for p in reg.head.parameters()}
    assert head_params and head_params == {id(p) for p in reg.parameters()}


def test_grad_reverses_the_head_loss_into_the_features() -> None:
    reg = get_regularizer("grad", 1.0, feature_dim=16, num_groups=3, grl_weight=0.5)
    features, logits, targets, sensitive = batch()
    reg(features, logits, targets, sensitive).backward()
    reversed_grad = features.grad.clone()
    features.grad = None
    F.cross_entropy(reg.head(features), sensitive).backward()
    assert torch.allclose(reversed_grad, -0.5 * features.grad, atol=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.head.parameters())


def test_grad_ramp_follows_progress() -> None:
    reg = get_regularizer("grad", 1.0, feature_dim=16, num_groups=3, ramp=True, grl_weight=2.0)
    assert reg.reversal_weight == 0.0
    reg.progress = 1.0
    assert reg.reversal_weight == pytest.approx(2.0 * (2 / (1 + math.exp(-10)) - 1))
    with pytest.raises(RegularizerError, match="progress"):
        reg.progress = 1.5


def test_sensitive_nets_detector_loss_cannot_move_features() -> None:
    reg = reg_of("sensitive_nets")
    features, _, _, sensitive = batch()
    reg.adversary_loss(features, sensitive).backward()
    assert features.grad is None
    assert all(p.grad is not None for p in reg.head.parameters())
    reg.zero_grad(set_to_none=True)
    reg.confusion(features).backward()
    assert all(p.grad is None for p in reg.head.parameters())
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_lntl_reads_each_pixels_colour_from_the_input_and_ignores_the_background() -> None:
    model = build_model("digit-cnn")
    reg = regularizer_for_network("lntl", 1.0, model, (3, 28, 28), num_groups=10, num_classes=10)
    assert reg.feature_shape == (48, 10, 10) and len(reg.head) == 3  # one head per colour channel
    images = torch.zeros(2, 3, 28, 28)
    images[:, :, 14:] = torch.tensor([255, 127, 25])[:, None, None] / 255  # coloured lower half, black above
    images[:, 1, 20:] = 0  # and no green in its lowest rows
    with reg.attach(model):
        model(images)
    colours = reg.pixel_colours((10, 10))
    assert (colours[:, :, :4] == -100).all()  # background: no colour to learn
    assert colours[0, :, 5:7, 0].tolist() == [[7] * 2, [3] * 2, [0] * 2]  # 255//32, 127//32, 25//32
    assert (colours[:, 1, 8:] == -100).all() and (colours[:, 0, 8:] == 7).all()  # a channel at 0 is ignored
    with pytest.raises(RegularizerError, match="needs a convolution map tap"):
        regularizer_for_network("lntl", 1.0, model, (3, 28, 28), num_groups=10, num_classes=10,
                                options={"layer": "fc1"})


def test_lntl_heads_learn_the_colour_and_the_reversal_pushes_the_features_away() -> None:
    torch.manual_seed(0)
    reg = get_regularizer("lntl", 1.0, feature_dim=4 * 5 * 5, feature_shape=(4, 5, 5), num_groups=10,
                          entropy_weight=0.0)
    reg.inputs = torch.rand(6, 3, 28, 28)  # as its hook captures them
    features = torch.randn(6, 100, requires_grad=True)
    reg.adversary_term(features, *dummy(6), torch.zeros(6, dtype=torch.long)).backward()
    reversed_grad = features.grad.clone()
    features.grad = None
    maps, colours = features.view(6, 4, 5, 5), reg.pixel_colours((5, 5))
    sum(F.cross_entropy(head(maps), colours[:, c]) for c, head in enumerate(reg.head)).backward()
    assert torch.allclose(reversed_grad, -0.1 * features.grad, atol=1e-6)  # the source's ×0.1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.head.parameters())


def test_lntl_alternates_as_its_source_and_one_step_adds_both_terms() -> None:
    features, logits, targets, sensitive = batch()
    alternating = reg_of("lntl")
    assert alternating.alternating  # the source's two steps per batch are the default
    first_step = alternating(features, logits, targets, sensitive)
    assert first_step.item() == pytest.approx(0.01 * alternating.entropy_term(features).item(), abs=1e-7)
    first_step.backward()
    assert all(p.grad is None for p in alternating.head.parameters())  # the heads wait for step two
    second_step = alternating.adversary_term(features, logits, targets, sensitive)
    assert second_step.item() == pytest.approx(alternating.bias_loss(features, sensitive).item())
    one_step = get_regularizer("lntl", 1.0, **OPTIONS["lntl"], alternate=False)
    one_step.load_state_dict(alternating.state_dict())
    assert not one_step.alternating
    assert one_step(features, logits, targets, sensitive).item() == pytest.approx(
        first_step.item() + second_step.item(), rel=1e-6)


def test_lntl_entropy_term_trains_features_not_the_head() -> None:
    reg = reg_of("lntl")
    features, logits, targets, sensitive = batch()
    term = reg.entropy_term(features)
    entropy = torch.distributions.Categorical(logits=reg.head(features)).entropy().mean()
    assert term.item() == pytest.approx(math.log(3) - entropy.item(), abs=1e-6)  # float32 of ~1.1
    term.backward()
    assert all(p.grad is None for p in reg.head.parameters())
    assert features.grad.abs().sum() > 0
    features.grad = None
    reg.adversary_term(features, logits, targets, sensitive).backward()
    assert all(p.grad is not None for p in reg.head.parameters())
    # Known ends: a head that cannot tell the groups apart (all logits equal) leaves nothing to
    # gain, one sure of a group is log 3 (nats) from the uniform prediction.
    with torch.no_grad():
        reg.head.weight.zero_()
        reg.head.bias.zero_()
        assert reg.entropy_term(features).item() == pytest.approx(0.0, abs=1e-6)
        reg.head.bias.copy_(torch.tensor([60.0, 0.0, 0.0]))
        assert reg.entropy_term(features).item() == pytest.approx(math.log(3), abs=1e-6)


# ----------------------------------------------------------------------------- binary codes


def test_binary_bernoulli_gap_vanishes_without_group_information() -> None:
    reg = reg_of("binary_bernoulli", 0.5)
    p = torch.sigmoid(6 * torch.randn(8, 16))  # what its tap hands it: p = σ(τh)
    groups = torch.cat([torch.zeros(8), torch.ones(8)]).long()
    assert reg(torch.cat([p, p]), *dummy(16), groups).item() == pytest.approx(0.0, abs=1e-5)
    separated = torch.sigmoid(6 * torch.cat([torch.full((8, 16), 3.0), torch.full((8, 16), -3.0)]))
    # Every unit gives the group away: one bit each, and R is counted in bits, times γ = 0.5.
    assert reg(separated, *dummy(16), groups).item() == pytest.approx(0.5 * 16, rel=1e-3)
    assert reg.task_weight == 0.5  # the source's (1 − γ)·CE + γ·R
    with pytest.raises(RegularizerError, match=r"gamma must lie in \[0, 1\) for binary_bernoulli"):
        get_regularizer("binary_bernoulli", 1.0)


def test_binary_bernoulli_code_passes_gradient_straight_through() -> None:
    h = torch.randn(6, 4, requires_grad=True)
    p = torch.sigmoid(6 * h)
    code = binarize(p, sample=True)
    assert set(code.detach().unique().tolist()) <= {0.0, 1.0}
    (code * torch.arange(4.0)).sum().backward()
    p = p.detach()
    assert torch.allclose(h.grad, 6 * p * (1 - p) * torch.arange(4.0))  # d/dh of p·w, as if T were p
    assert torch.equal(binarize(p, sample=False), (p > 0.5).float())


def test_binary_bernoulli_feeds_its_binary_code_to_the_classifier() -> None:
    torch.manual_seed(0)
    model = build_model("digit-cnn")
    reg = regularizer_for_network("binary_bernoulli", 0.5, model, (3, 28, 28), num_groups=3, num_classes=10)
    images = torch.rand(16, 3, 28, 28)
    with reg.attach(model) as tap:
        model.train()
        bottleneck = model.features(images)  # relu(fc1(x)) with fc1's output replaced by T
        assert set(bottleneck.unique().tolist()) <= {0.0, 1.0}
        p = tap.features
        assert p.shape == (16, 128) and ((p > 0) & (p < 1)).all()
        maps = torch.max_pool2d(torch.relu(model.conv3(torch.max_pool2d(torch.relu(model.conv2(
            torch.max_pool2d(torch.relu(model.conv1(images)), 2))), 2))), 2)
        pre = F.linear(maps.flatten(1), model.fc1.weight, model.fc1.bias)  # (calling fc1 would be hooked)
        torch.testing.assert_close(p, torch.sigmoid(6 * torch.tanh(pre)))
        model.eval()
        torch.testing.assert_close(model.features(images), (tap.features > 0.5).float())
    assert not regularizer_vectorizable("binary_bernoulli") and regularizer_vectorizable("binary_mi")


def test_binary_mi_is_differentiable_and_tracks_group_dependence() -> None:
    reg = reg_of("binary_mi")
    groups = torch.cat([torch.zeros(10), torch.ones(10)]).long()
    h = torch.randn(10, 6)
    independent = torch.cat([h, h]).requires_grad_()
    dependent = torch.cat([h + 1.0, h - 1.0]).requires_grad_()
    low = reg(independent, *dummy(20), groups)
    high = reg(dependent, *dummy(20), groups)
    assert low.item() == pytest.approx(0.0, abs=1e-5)
    assert high.item() > low.item() + 0.1
    # Codes that give the group away completely carry all of H(S) = log 2 for two equal groups.
    separated = torch.cat([torch.full((10, 6), 3.0), torch.full((10, 6), -3.0)])
    assert reg(separated, *dummy(20), groups).item() == pytest.approx(math.log(2), rel=1e-5)
    assert high.item() < math.log(2)
    high.backward()
    assert torch.isfinite(dependent.grad).all() and dependent.grad.abs().sum() > 0
    assert dependent.grad[:, 4:].abs().sum() == 0  # only the first `bits` units form the code
    with pytest.raises(RegularizerError, match="bits=4"):
        reg(torch.randn(20, 3), *dummy(20), groups)
