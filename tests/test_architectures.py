"""Architecture registry: IFBiD's DigitWdb layout, width variants, the flat layout table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelzoo.architectures import (
    ArchitectureError,
    build_model,
    flatten,
    layout,
    n_params,
    unflatten,
)


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
