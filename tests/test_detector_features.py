"""Weight features: neuron-permutation invariance on real networks, names, errors, chunked store reads."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from detector.evaluate import zoo_features
from detector.features import (
    FEATURE_KINDS,
    feature_names,
    find_layers,
    neuron_sets,
    weight_features,
)
from detector.transform import WeightFeatures
from modelzoo.architectures import build_model, flatten, layout
from modelzoo.layouts import TensorSlot
from modelzoo.spec import parse_spec
from modelzoo.store import ZooStore
from modelzoo.training import ModelResult
from modelzoo.zoo import StoreError
from tests.conftest import tiny_spec_dict

# Pinned so that a changed feature definition is noticed (and FEATURE_VERSION bumped).
EXPECTED_COUNTS = {
    "digit-cnn": {"raw": 49_562, "stats": 130, "first_layer": 30, "invariant": 431, "units": 1_848,
                  "rescaled": 68},
    "gender-cnn": {"raw": 106_242, "stats": 182, "first_layer": 30, "invariant": 577, "units": 2_632,
                   "rescaled": 70},
}


class SpatialNet(nn.Module):
    """conv → conv → flatten of a 2×2 map → fc1 → fc2: fc1's columns come in groups of 4 per channel."""

    input_shape = (3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)  # 8 → 6, pool → 3
        self.conv2 = nn.Conv2d(4, 5, 2)  # 3 → 2
        self.fc1 = nn.Linear(5 * 2 * 2, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _random_model(arch: str, seed: int) -> nn.Module:
    """A real network with random weights, biases included (default init makes them tiny)."""
    torch.manual_seed(seed)
    model = SpatialNet() if arch == "spatial" else build_model(arch)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    return model.eval()


def _permute_hidden_units(model: nn.Module, seed: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """A state_dict with every hidden layer's units permuted consistently, and the permutations.

    Unit ``i`` of the new network is unit ``perm[i]`` of the old one: its weight row and bias
    move, and so do the next layer's input channels (or, after a flatten, its column group).
    """
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d | nn.Linear)]
    perms = []
    for name, following in pairwise(names):
        units = state[f"{name}.weight"].shape[0]
        perm = torch.randperm(units, generator=generator)
        state[f"{name}.weight"] = state[f"{name}.weight"][perm]
        state[f"{name}.bias"] = state[f"{name}.bias"][perm]
        group = state[f"{following}.weight"].shape[1] // units  # spatial positions per channel
        columns = (perm[:, None] * group + torch.arange(group)).reshape(-1)
        state[f"{following}.weight"] = state[f"{following}.weight"][:, columns]
        perms.append(perm)
    return state, perms


@pytest.mark.parametrize("arch", ["digit-cnn", "gender-cnn", "spatial"])
def test_hidden_unit_permutation_leaves_invariant_features_alone(arch: str) -> None:
    model = _random_model(arch, seed=0)
    state, perms = _permute_hidden_units(model, seed=1)
    permuted = _random_model(arch, seed=2)
    permuted.load_state_dict(state)
    x = torch.rand(4, *model.input_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), rtol=1e-4, atol=1e-5)  # a true symmetry

    slots = layout(model)
    weights = np.stack([flatten(model), flatten(permuted)])
    assert not np.array_equal(weights[0], weights[1])
    for kind in ("stats", "first_layer", "invariant"):  # not units: they move with their units
        features = weight_features(weights, slots, kind)
        np.testing.assert_allclose(features[1], features[0], rtol=1e-4, atol=1e-6, err_msg=kind)
    raw = weight_features(weights, slots, "raw")
    assert not np.allclose(raw[0], raw[1])

    sets = neuron_sets(weights, slots)
    assert len(sets) == len(perms)
    for layer_set, perm in zip(sets, perms, strict=True):
        assert layer_set.shape[1] == len(perm)
        np.testing.assert_allclose(layer_set[1], layer_set[0][perm.numpy()], rtol=1e-4, atol=1e-6)
        assert not np.allclose(layer_set[1], layer_set[0]), "the rows themselves must have moved"


@pytest.mark.parametrize("arch", ["digit-cnn", "gender-cnn"])
def test_shapes_names_and_values_agree(arch: str) -> None:
    models = [_random_model(arch, seed) for seed in range(3)]
    with torch.no_grad():
        models[2].fc2.bias.fill_(0.25)  # a constant tensor: skewness and kurtosis must stay finite
    weights = np.stack([flatten(m) for m in models])
    slots = layout(models[0])
    for kind in FEATURE_KINDS:
        features, names = weight_features(weights, slots, kind), feature_names(slots, kind)
        assert features.shape == (3, EXPECTED_COUNTS[arch][kind]) and features.dtype == np.float32
        assert len(names) == features.shape[1] and len(set(names)) == len(names)
        assert np.isfinite(features).all()
        assert weight_features(weights[:0], slots, kind).shape == (0, len(names))

    stats = weight_features(weights, slots, "stats")
    columns = dict(zip(feature_names(slots, "stats"), stats.T, strict=True))
    fc1 = models[1].fc1.weight.detach().numpy().ravel()
    assert columns["fc1.weight:std"][1] == pytest.approx(fc1.std(), rel=1e-5)
    assert columns["fc1.weight:q95"][1] == pytest.approx(np.quantile(fc1, 0.95), rel=1e-5)
    assert columns["fc1.weight:skew"][1] == pytest.approx(scipy.stats.skew(fc1), rel=1e-4, abs=1e-6)
    assert columns["fc1.weight:kurtosis"][1] == pytest.approx(scipy.stats.kurtosis(fc1), rel=1e-4, abs=1e-6)
    assert columns["fc2.bias:skew"][2] == 0 and columns["fc2.bias:kurtosis"][2] == 0
    assert feature_names(slots, "raw")[slots[2].offset] == "conv2.weight[0]"
    np.testing.assert_array_equal(weight_features(weights, slots, "raw"), weights)
    sets = neuron_sets(weights, slots)
    assert [s.shape[1:] for s in sets] == [(layer.n_out, 7) for layer in find_layers(slots)[:-1]]
    units = weight_features(weights, slots, "units")
    np.testing.assert_allclose(units, np.concatenate([s.reshape(3, -1) for s in sets], axis=1), rtol=1e-6)
    assert feature_names(slots, "units")[7] == "conv1/unit[1]:in_norm"


def test_scaling_the_red_channel_moves_only_red_features() -> None:
    model = _random_model("digit-cnn", seed=4)
    slots = layout(model)
    before = flatten(model)
    with torch.no_grad():
        model.conv1.weight[:, 0] *= 2.0
    weights = np.stack([before, flatten(model)])
    features = weight_features(weights, slots, "first_layer")
    names = feature_names(slots, "first_layer")
    red = np.array(["R" in name for name in names])
    assert red.sum() == 5 + 2 * 5  # R's own stats and the R−G, R−B contrasts
    assert not np.isclose(features[0, red], features[1, red], rtol=1e-4).any()
    np.testing.assert_allclose(features[1, ~red], features[0, ~red], rtol=1e-6)
    assert features[1, names.index("conv1.weight[R]:l2")] == pytest.approx(
        2 * features[0, names.index("conv1.weight[R]:l2")], rel=1e-5)


def test_bad_input_is_refused_with_a_clear_message() -> None:
    slots = layout(build_model("digit-cnn"))
    weights = np.stack([flatten(_random_model("digit-cnn", seed)) for seed in range(4)])
    with pytest.raises(ValueError, match=r"\(N, 49562\)"):
        weight_features(weights[:, :-1], slots, "stats")
    with pytest.raises(ValueError, match=r"weights\[None\]"):
        weight_features(weights[0], slots, "stats")
    known = r"unknown feature kind .pixels.*raw, stats, first_layer, invariant"
    with pytest.raises(ValueError, match=known):
        weight_features(weights, slots, "pixels")
    with pytest.raises(ValueError, match="unknown feature kind"):
        feature_names(slots, "pixels")
    weights[2, 100] = np.nan
    weights[3, 7] = np.inf
    with pytest.raises(ValueError, match=r"rows \[2, 3\] hold NaN or Inf"):
        weight_features(weights, slots, "raw")
    with pytest.raises(ValueError, match=r"rows \[2, 3\]"):
        neuron_sets(weights, slots)


def test_layouts_that_are_not_conv_linear_chains_are_refused_for_layer_features() -> None:
    slots = layout(build_model("digit-cnn"))
    extra = TensorSlot("bn.running_mean", (8,), slots[-1].offset + slots[-1].size, 8)
    with_bn = [*slots, extra]
    assert weight_features(np.zeros((1, extra.offset + 8), np.float32), with_bn, "stats").shape == (1, 143)
    with pytest.raises(ValueError, match=r"bn\.running_mean"):
        feature_names(with_bn, "invariant")
    no_bias = layout(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2, bias=False)))
    with pytest.raises(ValueError, match="layer '2' needs a bias"):
        find_layers(no_bias)
    linear_then_conv = layout(nn.Sequential(nn.Linear(3, 4), nn.Conv2d(4, 2, 1)))
    with pytest.raises(ValueError, match="convolution after linear"):
        find_layers(linear_then_conv)
    gappy = [*slots[:2], TensorSlot("conv2.weight", (48, 24, 3, 3), 0, 10_368)]
    with pytest.raises(ValueError, match=r"conv2\.weight.*does not tile"):
        weight_features(np.zeros((1, 10_368)), gappy, "stats")
    assert [layer.name for layer in find_layers(slots)] == ["conv1", "conv2", "conv3", "fc1", "fc2"]


def test_features_read_from_a_zoo_in_chunks_match_the_full_array(tmp_path: Path) -> None:
    store = ZooStore.create(tmp_path / "tiny.zarr", parse_spec(tiny_spec_dict(n_models=6, models_per_task=2)))
    done = [0, 1, 2, 4, 5]  # model 3 is left unfinished
    weights = {i: flatten(_random_model("digit-cnn", 10 + i)) for i in done}
    for i in done:
        store.write_model(i, ModelResult(weights[i], {"unbiased_acc": 0.5}))
    full = np.stack([weights[i] for i in done])
    for kind in ("stats", "invariant", "raw", "first_layer+units"):
        features = WeightFeatures(kind, store.layout)
        got = zoo_features(store, np.flatnonzero(store.done), features, chunk_models=2)
        np.testing.assert_array_equal(got, features.transform(full), err_msg=kind)
    rows = np.array([5, 0, 4, 0])  # any order, repeats allowed, scattered across store chunks
    got = zoo_features(store, rows, WeightFeatures("raw", store.layout), chunk_models=3)
    np.testing.assert_array_equal(got, np.stack([weights[i] for i in rows]))
    stats = WeightFeatures("stats", store.layout)
    assert zoo_features(store, np.array([], dtype=int), stats).shape == (0, 130)
    with pytest.raises(StoreError, match=r"models \[3\].*not done"):
        zoo_features(store, np.array([1, 3]), stats)
    with pytest.raises(StoreError, match="outside"):
        zoo_features(store, np.array([6]), stats)
