"""Regularizer taps on real networks: what each reads, from which layer, and training end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fairtrain.regularizers import (
    REGULARIZERS,
    FeatureTap,
    RegularizerError,
    Tap,
    get_regularizer,
    regularizer_for_network,
    regularizer_options,
    regularizer_tap,
)
from modelzoo.architectures import build_model
from modelzoo.datasets import lntl_color_target, load_imageset
from tests.test_fairtrain_regularizers import reg_of

# ----------------------------------------------------------------------------- feature tap


def test_feature_tap_captures_the_digit_cnn_bottleneck() -> None:
    model = build_model("digit-cnn").eval()
    x = torch.rand(5, 3, 28, 28)
    tap = FeatureTap(model, "fc1")
    with pytest.raises(RegularizerError, match="no forward pass"):
        _ = tap.features
    model(x)
    assert tap.features.shape == (5, 128)
    assert (tap.features < 0).any()  # pre-activation: fc1's own output
    tap.remove()
    with FeatureTap(model, activation=torch.relu) as relu_tap:
        model(x)
        assert relu_tap.layer == "fc1"
        assert torch.allclose(relu_tap.features, model.features(x))
    assert not model.fc1._forward_hooks


def test_feature_tap_lists_layers_for_an_unknown_name() -> None:
    with pytest.raises(RegularizerError, match=r"no layer 'fc9'.*'conv1'.*'fc1'"):
        FeatureTap(build_model("digit-cnn"), "fc9")


# ----------------------------------------------------------------------------- integration


# Each method's tap after its source (DESIGN §4); None is the model's bottleneck, fc1.
SOURCE_TAPS = {
    "ndr": Tap(None, "pre"), "end": Tap(None, "tanh"), "grad": Tap(None, "relu"),
    "lntl": Tap("conv2", "relu"), "sensitive_nets": Tap(None, "relu"),
    "binary_bernoulli": Tap(None, "tanh"), "binary_mi": Tap(None, "tanh"),
    "group_balanced": Tap(None, "relu"), "unsupervised": Tap(None, "relu"),
}


def test_each_regularizer_declares_its_sources_tap_and_options_override_it() -> None:
    assert {name: cls.default_tap for name, cls in REGULARIZERS.items()} == SOURCE_TAPS
    for name in REGULARIZERS:
        assert {"layer", "activation"} <= regularizer_options(name)
        assert regularizer_tap(name) == SOURCE_TAPS[name] == reg_of(name).tap
    assert regularizer_tap("lntl", {"layer": "conv1", "activation": "pre"}) == Tap("conv1", "pre")
    assert get_regularizer("ndr", activation="tanh").tap == Tap(None, "tanh")
    assert regularizer_tap("unsupervised+ndr") == SOURCE_TAPS["unsupervised"]
    with pytest.raises(RegularizerError, match="activation must be one of"):
        get_regularizer("ndr", activation="softplus")


def test_a_tap_is_measured_without_drawing_a_random_number_and_reads_its_own_layer() -> None:
    model = build_model("digit-cnn").train()
    state = torch.random.get_rng_state()
    assert Tap("conv2", "relu").width(model, (3, 28, 28)) == 48 * 10 * 10
    assert Tap(None, "pre").width(model, (3, 28, 28)) == 128
    assert torch.equal(state, torch.random.get_rng_state()) and model.training
    reg = regularizer_for_network("lntl", 1.0, model, (3, 28, 28), num_groups=10, num_classes=10,
                                  options={"target": "group"})
    assert reg.head.in_features == 4800
    images = torch.rand(4, 3, 28, 28)
    with reg.attach(model) as tap:
        model.eval()
        model(images)
        assert torch.equal(tap.features, torch.relu(model.conv2(torch.max_pool2d(
            torch.relu(model.conv1(images)), 2))))
    with pytest.raises(RegularizerError, match=r"no layer 'conv9'; available: \['conv1'"):
        regularizer_for_network("ndr", 1.0, model, (3, 28, 28), num_groups=10, num_classes=10,
                                options={"layer": "conv9"})


@pytest.mark.parametrize("name", [*sorted(REGULARIZERS), "unsupervised+end"])
def test_digit_cnn_trains_with_a_regularizer(name: str, one_torch_thread: None) -> None:
    torch.manual_seed(0)
    model = build_model("digit-cnn")
    reg = regularizer_for_network(name, 0.5, model, (3, 28, 28), num_groups=3, num_classes=10)
    tap = reg.attach(model)  # the regularizer's own tap, wherever its source reads
    optimizer = torch.optim.Adam([*model.parameters(), *reg.parameters()], lr=1e-3)
    heads_before = [p.detach().clone() for p in reg.parameters()]
    model_before = model.fc1.weight.detach().clone()
    images, targets = torch.rand(64, 3, 28, 28), torch.randint(0, 10, (64,))
    sensitive = torch.randint(0, 3, (64,))
    for step in range(8):  # four passes over each half: enough to move every weight, and stay finite
        idx = torch.arange(step % 2 * 32, step % 2 * 32 + 32)
        logits = model(images[idx])
        loss = F.cross_entropy(logits, targets[idx]) + reg(tap.features, logits, targets[idx], sensitive[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        if reg.alternating:  # LNTL's second step: its heads, and the network against them
            logits = model(images[idx])
            optimizer.zero_grad(set_to_none=True)
            reg.adversary_term(tap.features, logits, targets[idx], sensitive[idx]).backward()
            optimizer.step()
    assert not torch.equal(model_before, model.fc1.weight)
    assert all(not torch.equal(before, p) for before, p in zip(heads_before, reg.parameters(), strict=True))


def test_lntl_reads_the_same_target_from_its_tap_as_the_dataset_gives(mnist, tmp_path) -> None:
    """The regularizer (torch, from the captured input, any map size) and the data stage
    (``datasets.lntl_color_target``, numpy) build one target: equal on real ColoredMNIST."""
    images = load_imageset(mnist, "colored_mnist", "test_unbiased", 0.02, cache_dir=tmp_path).images[:64]
    model = build_model("lntl-cnn")
    reg = regularizer_for_network("lntl", 1.0, model, (3, 28, 28), num_groups=10, num_classes=10)
    with reg.attach(model):
        model(torch.from_numpy(images).float() / 255)
    from_tap = reg.pixel_colours((14, 14)).numpy()
    from_data = lntl_color_target(images)
    assert (from_data >= 0).any() and (from_data == -1).any()  # colour and ignored background both occur
    np.testing.assert_array_equal(from_tap, np.where(from_data == -1, -100, from_data))
