"""Keras HDF5 checkpoints (IFBiD's zoos are Keras models) read as PyTorch state_dicts.

The files in tests/data/keras were written by Keras 3.15 (torch backend) with ``model.save``
(legacy HDF5, the layout IFBiD ships) and ``model.save_weights`` (``.weights.h5``), together
with each model's outputs on three random inputs: a converted model must compute the same.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from modelzoo.architectures import build_model
from modelzoo.checkpoints import CheckpointError, load_checkpoint
from modelzoo.recognition import recognize

KERAS = Path(__file__).parent / "data" / "keras"


def keras_inputs(name: str) -> tuple[torch.Tensor, np.ndarray]:
    """The saved inputs, channels-last turned channels-first, and the Keras model's outputs."""
    saved = np.load(KERAS / f"{name}_io.npz")
    return torch.from_numpy(saved["x"]).permute(0, 3, 1, 2), saved["y"]


def as_keras2(source: Path, target: Path) -> Path:
    """Rewrite a legacy file in Keras 2 / tf.keras naming (``<layer>/<layer>/kernel:0``)."""
    with h5py.File(source, "r") as old, h5py.File(target, "w") as new:
        weights = new.create_group("model_weights")
        layers = [str(n) for n in old["model_weights"].attrs["layer_names"]]
        weights.attrs["layer_names"] = np.array([n.encode() for n in layers])
        for layer in layers:
            group = weights.create_group(layer)
            names = [str(n) for n in old["model_weights"][layer].attrs["weight_names"]]
            keras2 = [f"{layer}/{n.rsplit('/', 1)[1]}:0" for n in names]
            group.attrs["weight_names"] = np.array([n.encode() for n in keras2], dtype="S")
            for old_name, new_name in zip(names, keras2, strict=True):
                group.create_dataset(new_name, data=old["model_weights"][layer][old_name][()])
        new.attrs["keras_version"] = "2.4.0"
    return target


@pytest.mark.parametrize("file", ["digit_w025.h5", "digit_w025.weights.h5", "keras2"])
def test_keras_digit_model_becomes_the_same_digit_cnn(file: str, tmp_path: Path) -> None:
    path = as_keras2(KERAS / "digit_w025.h5", tmp_path / "k2.h5") if file == "keras2" else KERAS / file
    state_dict = load_checkpoint(path)
    recognized = recognize(state_dict, ordered=False)  # HDF5 keeps no tensor order
    assert (recognized.arch, recognized.width) == ("digit-cnn", 0.25)
    model = build_model("digit-cnn", 0.25).eval()
    model.load_state_dict(recognized.state_dict)
    x, expected = keras_inputs("digit_w025")
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_dense_rows_follow_pytorch_flatten_order_when_the_last_map_is_not_1x1() -> None:
    state_dict = load_checkpoint(KERAS / "spatial.h5")  # conv 4@3×3 on 8×8 → pool → 3×3×4 → dense 5
    assert list(state_dict) == ["conv1.weight", "conv1.bias", "fc1.weight", "fc1.bias"]
    conv, dense = nn.Conv2d(3, 4, 3), nn.Linear(36, 5)
    conv.load_state_dict({"weight": state_dict["conv1.weight"], "bias": state_dict["conv1.bias"]})
    dense.load_state_dict({"weight": state_dict["fc1.weight"], "bias": state_dict["fc1.bias"]})
    x, expected = keras_inputs("spatial")
    with torch.no_grad():
        out = dense(nn.functional.max_pool2d(torch.relu(conv(x)), 2).flatten(1))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_keras_layers_we_cannot_map_are_refused_by_name(tmp_path: Path) -> None:
    batchnorm = shutil.copy(KERAS / "digit_w025.weights.h5", tmp_path / "bn.weights.h5")
    with h5py.File(batchnorm, "a") as h5:
        extra = h5["layers/conv2d_1/vars"]
        extra.create_dataset("2", data=np.ones(6, dtype="float32"))  # e.g. a fused batch-norm scale
    with pytest.raises(CheckpointError, match="Keras layer 'conv2d_1' has 3 weight tensors"):
        load_checkpoint(batchnorm)

    dangling = as_keras2(KERAS / "digit_w025.h5", tmp_path / "dangling.h5")
    with h5py.File(dangling, "a") as h5:
        del h5["model_weights/dense_1/dense_1/kernel:0"]
    with pytest.raises(CheckpointError, match=r"not a readable \.h5 checkpoint"):
        load_checkpoint(dangling)
