"""Architecture registry: IFBiD's DigitWdb layout, width variants, the flat layout table, and
Kim et al.'s ColoredMNIST network for reproducing LNTL."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fairtrain.regularizers import FeatureTap, regularizer_for_network
from modelzoo.architectures import (
    ArchitectureError,
    build_model,
    flatten,
    layout,
    n_params,
    unflatten,
)
from modelzoo.vectorized import vectorizable_architecture


def test_digit_cnn_has_ifbid_parameter_count() -> None:
    assert n_params(build_model("digit-cnn")) == 49_562


def test_layout_table_tiles_the_flat_vector() -> None:
    model = build_model("digit-cnn")
    slots = layout(model)
    assert [s.name for s in slots][:2] == ["conv1.weight", "conv1.bias"]
    assert slots[0].shape == (24, 3, 5, 5)
    offset = 0
    for slot in slots:
        assert slot.offset == offset and slot.size == int(np.prod(slot.shape))
        offset += slot.size
    assert offset == 49_562


def test_flatten_roundtrip_restores_outputs() -> None:
    torch.manual_seed(0)
    model, copy = build_model("digit-cnn").eval(), build_model("digit-cnn").eval()
    copy.load_state_dict(unflatten(flatten(model), layout(model)))
    x = torch.rand(4, 3, 28, 28)
    torch.testing.assert_close(model(x), copy(x))
    with pytest.raises(ArchitectureError, match="layout needs"):
        unflatten(np.zeros(10, np.float32), layout(model))


@pytest.mark.parametrize("width", [0.5, 2.0])
def test_width_variants_build_and_run(width: float) -> None:
    model = build_model("digit-cnn", width)
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 10)
    assert (n_params(model) < 49_562) == (width < 1)


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(ArchitectureError, match="resnet"):
        build_model("resnet")


def test_gender_cnn_keeps_ifbid_parameter_count_at_48px() -> None:
    model = build_model("gender-cnn")
    assert n_params(model) == 106_242
    assert model.input_shape == (3, 48, 48) and model.num_classes == 2
    assert model.get_submodule(model.bottleneck).out_features == 128
    x = torch.rand(3, *model.input_shape)
    assert model(x).shape == (3, 2)
    assert model.features(x).shape == (3, 128)


def test_gender_cnn_layout_roundtrip() -> None:
    torch.manual_seed(1)
    model, copy = build_model("gender-cnn").eval(), build_model("gender-cnn").eval()
    slots = layout(model)
    assert [s.name for s in slots] == [f"{layer}.{kind}" for layer in
                                       ("conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2")
                                       for kind in ("weight", "bias")]
    assert slots[0].shape == (24, 3, 5, 5) and slots[-2].shape == (2, 128)
    assert slots[-1].offset + slots[-1].size == 106_242
    copy.load_state_dict(unflatten(flatten(model), slots))
    x = torch.rand(4, 3, 48, 48)
    torch.testing.assert_close(model(x), copy(x))


@pytest.mark.parametrize("width", [0.5, 2.0])
def test_gender_cnn_width_variants(width: float) -> None:
    model = build_model("gender-cnn", width)
    assert model(torch.rand(2, 3, 48, 48)).shape == (2, 2)
    assert n_params(model) != 106_242
    assert (n_params(model) < 106_242) == (width < 1)
    assert model.conv1.out_channels == round(24 * width)


def test_lntl_cnn_is_kim_et_als_network_with_lntls_heads_on_its_14x14_map() -> None:
    model = build_model("lntl-cnn")
    assert n_params(model) == 67_767  # 67,760 parameters and the input batch norm's 7 statistics
    assert [s.name for s in layout(model)][:5] == ["bn0.weight", "bn0.bias", "bn0.running_mean",
                                                    "bn0.running_var", "bn0.num_batches_tracked"]
    with FeatureTap(model) as bottleneck:
        assert model(torch.rand(2, 3, 28, 28)).shape == (2, 10)
        assert bottleneck.features.shape == (2, 64)
    lntl = regularizer_for_network("lntl", 1.0, model, (3, 28, 28), num_groups=10, num_classes=10)
    assert lntl.feature_shape == (32, 14, 14)  # conv2 after the stride-2 pool, as in the source
    assert not vectorizable_architecture(model)  # its batch norm keeps running statistics
    # He-normal over the fan-out, the source's initialisation: std sqrt(2 / (5·5·32)) = 0.05.
    assert float(model.conv1.weight.detach().std()) == pytest.approx(0.05, rel=0.15)


@pytest.mark.parametrize("arch", ["rebias-cnn", "end-cnn"])
def test_rebias_and_end_networks_are_the_sources_simple_convnet(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch).eval()
    assert n_params(model) == 531_694  # 531,210 parameters and four batch norms' 484 statistics
    assert [s.name for s in layout(model)][:3] == ["conv1.weight", "conv1.bias", "bn1.weight"]
    assert model.conv4.weight.shape == (128, 64, 7, 7)
    x = torch.rand(3, 3, 28, 28)
    with FeatureTap(model) as bottleneck:
        assert model(x).shape == (3, 10)
        features = bottleneck.features
    assert features.shape == (3, 128)
    if arch == "end-cnn":  # tanh, pooled, then unit norm: what EnD's classifier and term read
        torch.testing.assert_close(features.norm(dim=1), torch.ones(3))
        assert bool((features < 0).any())
    else:
        assert bool((features >= 0).all()) and not torch.allclose(features.norm(dim=1), torch.ones(3))
    # The source's inputs lie in [-1, 1]: an all-black image reaches conv1 as -1 everywhere.
    seen = []
    model.conv1.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]) and None)
    model(torch.zeros(1, 3, 28, 28))
    assert float(seen[0].min()) == float(seen[0].max()) == -1.0
    assert not vectorizable_architecture(model)
