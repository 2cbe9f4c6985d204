"""Checkpoints from someone else's code are recognized by structure, in every common wrapping.

The networks here are written in the test, as a user would write them: their own module
names, their own nesting, saved through plain ``torch.save`` / safetensors / h5py in the
shapes training code really produces (DataParallel, torch.compile, Lightning checkpoints,
``{"model_state_dict": ...}``).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

import h5py
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import detector
import fairtrain
import modelzoo
from modelzoo.checkpoints import load_checkpoint
from modelzoo.recognition import RecognitionError, recognize


class TheirDigitNet(nn.Module):
    """The DigitWdb layout under names of the user's choosing, layers nested in a Sequential."""

    def __init__(self, c: int = 24) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, c, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c, 2 * c, 3),
                                      nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2 * c, 64 * c // 24, 3))
        self.hidden = nn.Linear(64 * c // 24, 128 * c // 24)
        self.out = nn.Linear(128 * c // 24, 10)


class TheirFaceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(3, 24, 5), nn.Conv2d(24, 48, 3), nn.Conv2d(48, 48, 3),
                                     nn.Conv2d(48, 64, 3), nn.Conv2d(64, 64, 3)])
        self.embed = nn.Linear(64, 128)
        self.head = nn.Linear(128, 2)


def _wrappings(state: dict[str, torch.Tensor]) -> dict[str, object]:
    return {
        "plain": state,
        "dataparallel": {f"module.{k}": v for k, v in state.items()},
        "compiled": {f"_orig_mod.{k}": v for k, v in state.items()},
        "ddp_of_compiled": {f"module._orig_mod.{k}": v for k, v in state.items()},
        "lightning": {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                      "state_dict": {f"model.{k}": v for k, v in state.items()},
                      "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3}]}],
                      "hyper_parameters": {"lr": 1e-3, "width": 1.0}},
        "model_state_dict": {"model_state_dict": state, "epoch": 9, "optimizer_state_dict": {"state": {}}},
        "model": {"model": {f"net.{k}": v for k, v in state.items()}, "args": {"epochs": 2}},
    }


@pytest.mark.parametrize("wrapping", list(_wrappings({})))
def test_an_outside_digit_net_is_recognized_in_every_wrapping(tmp_path: Path, wrapping: str) -> None:
    net = TheirDigitNet()
    path = tmp_path / ("model.ckpt" if wrapping == "lightning" else "model.pt")
    torch.save(_wrappings(net.state_dict())[wrapping], path)
    found = recognize(load_checkpoint(path))
    assert (found.arch, found.width) == ("digit-cnn", 1.0)
    assert found.renamed["features.0.weight"] == "conv1.weight"
    assert found.renamed["out.bias"] == "fc2.bias"
    assert torch.equal(found.state_dict["fc1.weight"], net.hidden.weight.detach())


@pytest.mark.parametrize("suffix", [".safetensors", ".h5"])
def test_formats_that_sort_names_are_put_back_in_layer_order(tmp_path: Path, suffix: str) -> None:
    net = TheirDigitNet(12)  # half width
    state = {f"module.{k}": v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        with h5py.File(path, "w") as h5:
            for name, tensor in state.items():
                h5.create_dataset(name, data=tensor.numpy())
    loaded = load_checkpoint(path)
    assert next(iter(loaded)) != "module.features.0.weight"  # the file really lost the order
    found = recognize(loaded, ordered=False)
    assert (found.arch, found.width) == ("digit-cnn", 0.5)
    assert torch.equal(found.state_dict["conv2.weight"], net.features[3].weight.detach())


def test_a_face_net_with_repeated_channel_counts_is_recognized() -> None:
    net = TheirFaceNet()
    found = recognize(dict(sorted(net.state_dict().items())), ordered=False)
    assert (found.arch, found.width) == ("gender-cnn", 1.0)
    assert torch.equal(found.state_dict["conv3.weight"], net.blocks[2].weight.detach())
    assert torch.equal(found.state_dict["conv5.bias"], net.blocks[4].bias.detach())


def test_with_arch_given_names_never_matter() -> None:
    state = {f"layer_{i}.{role}": t for i, (name, t) in enumerate(TheirDigitNet().state_dict().items())
             for role in [name.rsplit(".", 1)[1]]}
    # every tensor is its own "layer" now, so weights and biases cannot be paired by path
    with pytest.raises(RecognitionError, match="tensors the architectures lack"):
        recognize(state, arch="digit-cnn")
    paired = {f"block{i // 2}.{name.rsplit('.', 1)[1]}": t
              for i, (name, t) in enumerate(TheirDigitNet().state_dict().items())}
    assert recognize(paired, arch="digit-cnn").arch == "digit-cnn"


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s | {"bn.running_mean": torch.zeros(24), "bn.running_var": torch.ones(24),
                    "bn.num_batches_tracked": torch.tensor(0)}, "the architectures lack: bn.running_mean"),
    (lambda s: {k: v.to(torch.int64) for k, v in s.items()}, "holds torch.int64, not floating-point"),
    (lambda s: {k: v.to(torch.complex64) for k, v in s.items()}, "holds torch.complex64"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("out.")}, "match no known architecture"),
    (lambda s: s | {"extra.weight": torch.zeros(5, 7), "extra.bias": torch.zeros(5)}, "match no known"),
])
def test_what_cannot_be_read_as_an_architecture_is_refused_by_name(edit, message: str) -> None:
    with pytest.raises(RecognitionError, match=message):
        recognize(edit(TheirDigitNet().state_dict()))


def _submodules(package: ModuleType) -> list[str]:
    return [f"{package.__name__}.{info.name}" for info in pkgutil.iter_modules(package.__path__)]


@pytest.mark.parametrize("package", [modelzoo, fairtrain, detector], ids=lambda p: p.__name__)
def test_every_public_name_is_what_it_says_even_after_its_modules_are_imported(package: ModuleType) -> None:
    for module in _submodules(package):
        importlib.import_module(module)  # importing a submodule binds its name on the package
    for name in package.__all__:
        value = getattr(package, name)
        assert not isinstance(value, ModuleType), f"{package.__name__}.{name} is shadowed by a module"


def test_a_pt_file_that_is_no_torch_save_output_is_named_for_what_it_is(tmp_path: Path) -> None:
    import os

    tensors = {"a": torch.zeros(3)}
    save_file(tensors, str(tmp_path / "st.pt"))
    with h5py.File(tmp_path / "h5.pt", "w") as h5:
        h5["a"] = [1.0, 2.0]
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(b"\x07" + os.urandom(3999))
    for name, message in [("st.pt", "is a safetensors file, not a torch.save one; name it .safetensors"),
                          ("h5.pt", "is an HDF5 file, not a torch.save one; name it .h5"),
                          ("empty.pt", "is empty (0 bytes)"),
                          ("random.pt", "not a PyTorch checkpoint (torch.save writes a zip archive")]:
        with pytest.raises(modelzoo.WeightbiasError) as caught:
            load_checkpoint(tmp_path / name)
        assert message in str(caught.value)
    torch.save(tensors, tmp_path / "fine.pt")
    assert torch.equal(load_checkpoint(tmp_path / "fine.pt")["a"], tensors["a"])
