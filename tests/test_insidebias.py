"""InsideBias (DESIGN §6): the definition against a hand computation, a property that can fail,
hook hygiene, input validation, probe sampling on real faces, and user probe folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from detector.activations import (
    InsideBiasError,
    conv_layers,
    insidebias,
    probe_images,
    probe_indices,
    read_probe_folder,
)
from modelzoo.architectures import DigitCNN, GenderCNN, build_model
from modelzoo.datasets import ImageSet
from modelzoo.faces import GROUPS, decode_face, load_face_data


def _model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch)


def _random_probes(shape: tuple[int, ...], sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Groups of random images whose brightness ranges differ, so their λ differ."""
    rng = np.random.default_rng(seed)
    return {name: rng.integers(0, 80 + 60 * i, size=(n, *shape), dtype=np.uint8)
            for i, (name, n) in enumerate(sizes.items())}


def _hand_lambdas(model: nn.Module, images: np.ndarray) -> list[float]:
    """λ of every conv layer by the definition, running the conv stack by hand:
    conv → relu → spatial max → mean over filters → mean over images; maxpool feeds the next conv."""
    x = torch.from_numpy(images).float() / 255.0
    lambdas = []
    with torch.no_grad():
        for conv in (module for module in model.children() if isinstance(module, nn.Conv2d)):
            maps = torch.relu(conv(x))
            spatial_max = maps.flatten(2).max(dim=2).values  # (images, filters)
            lambdas.append(float(spatial_max.mean(dim=1).mean(dim=0)))
            x = nn.functional.max_pool2d(maps, 2)
    return lambdas


def _no_hooks(model: nn.Module) -> bool:
    return all(not module._forward_hooks for module in model.modules())


# ---------------------------------------------------------------- (a) the definition


@pytest.mark.parametrize("arch", ["gender-cnn", "digit-cnn"])
def test_ratio_is_normalized_and_lambda_matches_hand_computation(arch: str) -> None:
    model = _model(arch)
    probes = _random_probes(model.input_shape, {"a": 4, "b": 3, "c": 5})
    result = insidebias(model, probes)
    n_convs = 5 if arch == "gender-cnn" else 3
    assert result.layers == tuple(f"conv{i}" for i in range(1, n_convs + 1))
    assert result.groups == ("a", "b", "c")
    assert result.n_probes == {"a": 4, "b": 3, "c": 5}
    assert result.activation.shape == result.ratio.shape == (n_convs, 3)
    assert np.all(result.ratio.max(axis=1) == 1.0)  # exactly 1: max / max
    np.testing.assert_allclose(result.ratio, result.activation / result.activation.max(axis=1, keepdims=True))
    assert len(np.unique(result.ratio[-1])) == 3  # the brightness ranges differ, so the groups do
    for col, group in enumerate(result.groups):
        np.testing.assert_allclose(result.activation[:, col], _hand_lambdas(model, probes[group]), rtol=1e-5)
    assert result.default_layer == f"conv{n_convs}"
    assert result.min_ratio() == result.min_ratio(f"conv{n_convs}") == result.ratio[-1].min()


def test_conv_layers_follow_forward_order_not_registration_order() -> None:
    class Reordered(nn.Module):
        input_shape = (3, 8, 8)

        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Conv2d(4, 2, 3)  # registered first, called second
            self.early = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(torch.relu(self.early(x)))

    model = Reordered()
    assert conv_layers(model) == ["early", "late"]
    assert conv_layers(build_model("gender-cnn")) == [f"conv{i}" for i in range(1, 6)]
    probes = _random_probes((3, 8, 8), {"x": 2, "y": 2})
    result = insidebias(model, probes, layers=["late", "early"])
    assert result.layers == ("early", "late")
    assert result.default_layer == "late"


# ---------------------------------------------------------------- (b) a property that can fail


def _positive_conv1(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.conv1.weight.copy_(torch.rand_like(model.conv1.weight) + 0.01)
        model.conv1.bias.zero_()
    return model


def test_black_probes_give_the_lowest_activation_when_conv1_is_positive() -> None:
    model = _positive_conv1(_model("gender-cnn", seed=3))
    shape = (4, *model.input_shape)
    probes = {"bright": np.full(shape, 250, np.uint8), "dark": np.zeros(shape, np.uint8),
              "grey": np.full(shape, 100, np.uint8)}
    result = insidebias(model, probes, layers=["conv1", "conv3"])
    conv1 = result.ratio[result.layers.index("conv1")]
    # A uniform image's strongest response is an interior pixel: intensity × Σw, so Λ ∝ intensity.
    np.testing.assert_allclose(conv1, [1.0, 0.0, 100 / 250], rtol=1e-5, atol=1e-7)
    assert result.activation[0, 1] < result.activation[0, 2] < result.activation[0, 0]
    assert result.lowest_group("conv1") == "dark"
    assert result.min_ratio("conv1") == 0.0


def test_dead_layer_gives_nan_with_a_note_and_json_stays_valid() -> None:
    model = _positive_conv1(_model("gender-cnn", seed=4))
    black = np.zeros((2, *model.input_shape), np.uint8)
    result = insidebias(model, {"a": black, "b": black.copy()}, layers=["conv1"])
    assert np.isnan(result.ratio).all()
    assert math.isnan(result.min_ratio())
    assert any("conv1" in note for note in result.notes)
    with pytest.raises(InsideBiasError, match="dead"):
        result.lowest_group()
    record = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert record["ratio"]["conv1"] == {"a": None, "b": None}
    assert record["lowest_group"] is None and record["min_ratio"] is None


def test_to_dict_is_json_ready_and_names_the_verdict() -> None:
    model = _model("digit-cnn")
    result = insidebias(model, _random_probes(model.input_shape, {"a": 3, "b": 3}))
    record = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert record["default_layer"] == "conv3"
    assert record["lowest_group"] == result.lowest_group()
    assert record["min_ratio"] == pytest.approx(result.min_ratio())
    assert set(record["activation"]) == {"conv1", "conv2", "conv3"}
    assert record["n_probes"] == {"a": 3, "b": 3}
    with pytest.raises(InsideBiasError, match="not measured"):
        result.min_ratio("fc1")


# ---------------------------------------------------------------- (c) hooks and mode


def test_hooks_removed_and_mode_restored_after_success_and_after_error() -> None:
    model = _model("gender-cnn")
    model.train()
    probes = _random_probes(model.input_shape, {"a": 2, "b": 2})
    insidebias(model, probes)
    assert _no_hooks(model) and model.training

    class Exploding(GenderCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.features(x)  # the hooks fire, then the forward fails
            raise RuntimeError("boom")

    broken = Exploding()
    broken.train()
    with pytest.raises(RuntimeError, match="boom"):
        insidebias(broken, probes)
    assert _no_hooks(broken) and broken.training


def test_conv_run_twice_per_forward_is_refused() -> None:
    class Shared(DigitCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.conv1(x)  # a second call of the same conv: two maps per image
            return super().forward(x)

    model = Shared()
    with pytest.raises(InsideBiasError, match="exactly one activation map"):
        insidebias(model, _random_probes(model.input_shape, {"a": 2, "b": 2}))
    assert _no_hooks(model)


# ---------------------------------------------------------------- (d) bad inputs


@pytest.mark.parametrize(
    ("probes", "layers", "message"),
    [
        ({"a": np.zeros((2, 3, 28, 28), np.uint8)}, None, "at least 2 groups"),
        ({"a": np.zeros((2, 3, 28, 28), np.uint8), "b": np.zeros((0, 3, 28, 28), np.uint8)}, None,
         r"probes\['b'\] holds no images"),
        ({"a": np.zeros((2, 3, 28, 28), np.uint8), "b": np.zeros((2, 3, 48, 48), np.uint8)}, None,
         r"probes\['b'\] has images of shape"),
        ({"a": np.zeros((2, 3, 28, 28), np.uint8), "b": np.zeros((2, 28, 28), np.uint8)}, None,
         r"shape \(n, 3, H, W\)"),
        ({"a": np.zeros((2, 3, 28, 28), np.uint8), "b": np.zeros((2, 3, 28, 28), np.float32)}, None,
         "must be uint8"),
        ({"a": np.zeros((2, 3, 28, 28), np.uint8), "b": [[0]]}, None, "numpy array"),
        ({"a": np.zeros((2, 3, 28, 28), np.uint8), 7: np.zeros((2, 3, 28, 28), np.uint8)}, None,
         "non-empty strings"),
        ({"a": np.zeros((2, 3, 28, 28), np.uint8), "b": np.zeros((2, 3, 28, 28), np.uint8)}, ["conv9"],
         r"unknown conv layer\(s\) \['conv9'\]"),
        ({"a": np.zeros((2, 3, 28, 28), np.uint8), "b": np.zeros((2, 3, 28, 28), np.uint8)}, ["fc1"],
         "unknown conv layer"),
        ({"a": np.zeros((2, 3, 28, 28), np.uint8), "b": np.zeros((2, 3, 28, 28), np.uint8)}, [],
         "non-empty list"),
        ({"a": np.zeros((2, 3, 28, 28), np.uint8), "b": np.zeros((2, 3, 28, 28), np.uint8)},
         ["conv1", "conv1"], "twice"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_error(probes: dict, layers: list | None, message: str) -> None:
    model = build_model("digit-cnn")
    with pytest.raises(ValueError, match=message):
        insidebias(model, probes, layers=layers)
    assert _no_hooks(model)


def test_model_without_conv_layers_is_refused() -> None:
    with pytest.raises(InsideBiasError, match="no Conv2d"):
        blank = np.zeros((1, 3, 4, 4), np.uint8)
        insidebias(nn.Linear(3, 2), {"a": blank, "b": blank.copy()})


# ---------------------------------------------------------------- (e) probes from the face test set


@pytest.fixture(scope="module")
def face_test(data_root: Path):
    return load_face_data(data_root / "faces" / "utkface_crop_part1", progress=False).test


@pytest.mark.slow  # the face_test fixture decodes the face folder (~15 s)
def test_probe_images_from_the_face_test_set(face_test) -> None:
    picks = probe_indices(face_test, GROUPS, per_group=5, seed=1)
    assert list(picks) == list(GROUPS)
    for index, (group, rows) in enumerate(picks.items()):
        assert len(rows) == len(set(rows.tolist())) == 5
        assert np.all(face_test.bias[rows] == index), group
        genders = np.bincount(face_test.labels[rows], minlength=2)
        assert sorted(genders.tolist()) == [2, 3], group  # 5 probes split as evenly as possible
    images = probe_images(face_test, GROUPS, per_group=5, seed=1)
    for group in GROUPS:
        assert images[group].shape == (5, 3, 48, 48) and images[group].dtype == np.uint8
        np.testing.assert_array_equal(images[group], face_test.images[picks[group]])
    again = probe_indices(face_test, GROUPS, per_group=5, seed=1)
    other = probe_indices(face_test, GROUPS, per_group=5, seed=2)
    assert all(np.array_equal(picks[g], again[g]) for g in GROUPS)
    assert any(not np.array_equal(picks[g], other[g]) for g in GROUPS)
    result = insidebias(_model("gender-cnn"), images)
    assert result.groups == GROUPS and result.n_probes == dict.fromkeys(GROUPS, 5)
    assert (result.activation > 0).all()  # real faces make every layer fire


@pytest.mark.slow  # the face_test fixture decodes the face folder (~15 s)
def test_probe_images_refuses_impossible_requests(face_test) -> None:
    smallest = int(np.bincount(face_test.bias).min())
    with pytest.raises(InsideBiasError, match="probes per group were asked for"):
        probe_indices(face_test, GROUPS, per_group=smallest + 1)
    with pytest.raises(InsideBiasError, match="only 2 group names"):
        probe_indices(face_test, GROUPS[:2], per_group=1)
    with pytest.raises(InsideBiasError, match="positive int"):
        probe_indices(face_test, GROUPS, per_group=0)


def test_probe_sampling_balances_classes_and_fills_a_short_one_from_the_others() -> None:
    labels = np.array([0] * 6 + [1] * 1 + [0] * 3 + [1] * 3)
    bias = np.array([0] * 7 + [1] * 6)
    imageset = ImageSet(np.zeros((13, 3, 2, 2), np.uint8), labels, bias)
    for seed in range(5):
        picks = probe_indices(imageset, ("g0", "g1"), per_group=4, seed=seed)
        # g0 has one class-1 image: it is taken and class 0 makes up the rest (3 + 1)
        assert np.bincount(labels[picks["g0"]], minlength=2).tolist() == [3, 1]
        assert np.bincount(labels[picks["g1"]], minlength=2).tolist() == [2, 2]
        assert np.all(bias[picks["g1"]] == 1)

# ---------------------------------------------------------------- (f) a user's probe folder


def _write_image(path: Path, seed: int, size: tuple[int, int] = (60, 40)) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_read_probe_folder_decodes_like_the_face_datasets(tmp_path: Path) -> None:
    (tmp_path / "women").mkdir()
    (tmp_path / "men" / "person1").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    _write_image(tmp_path / "women" / "a.jpg", 0)
    _write_image(tmp_path / "women" / "b.png", 1)
    _write_image(tmp_path / "men" / "c.jpeg", 2)
    _write_image(tmp_path / "men" / "person1" / "d.JPG", 3)
    (tmp_path / "men" / "notes.txt").write_text("not an image")
    probes = read_probe_folder(tmp_path, image_size=28)
    assert list(probes) == ["men", "women"]
    assert probes["men"].shape == (2, 3, 28, 28) and probes["women"].dtype == np.uint8
    np.testing.assert_array_equal(probes["women"][0], decode_face(tmp_path / "women" / "a.jpg", 28))
    np.testing.assert_array_equal(probes["men"][1], decode_face(tmp_path / "men" / "person1" / "d.JPG", 28))
    result = insidebias(_model("digit-cnn"), probes)
    assert result.groups == ("men", "women")


def test_read_probe_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(InsideBiasError, match="does not exist"):
        read_probe_folder(tmp_path / "missing", 48)
    with pytest.raises(InsideBiasError, match="no group sub-folders"):
        read_probe_folder(tmp_path, 48)
    (tmp_path / "empty_group").mkdir()
    with pytest.raises(InsideBiasError, match="holds no images"):
        read_probe_folder(tmp_path, 48)
    (tmp_path / "empty_group" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InsideBiasError, match="cannot read probe image"):
        read_probe_folder(tmp_path, 48)


def test_the_insidebias_command_refuses_a_model_no_face_task_trains(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    from detector.cli import main
    from modelzoo.architectures import build_model

    torch.save(build_model("digit-cnn").state_dict(), tmp_path / "digits.pt")
    assert main(["insidebias", str(tmp_path / "digits.pt"), "--dataset", "utkface_crop_part1"]) == 2
    err = capsys.readouterr().err
    assert "a digit-cnn, which no face task trains" in err and "Traceback" not in err
