"""Checkpoint files: export a zoo model as a state_dict, and read state_dicts back safely.

Sits at the store's edge (stage 4 of the flow): it turns a stored weight row into a file a
person can load in plain PyTorch, and reads checkpoints without ever unpickling code
(``torch.load(..., weights_only=True)``, safetensors, or HDF5 datasets).

Formats, chosen by suffix: ``.pt``/``.pth`` (a dict of tensors), ``.safetensors``, ``.h5``
(our export: one dataset per tensor, named as in the state_dict, architecture in the file's
attributes; or a Keras HDF5 file as IFBiD's model zoos ship, converted to PyTorch layout).
"""

from __future__ import annotations

import errno
import json
import pickle
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from modelzoo.architectures import unflatten
from modelzoo.atomic import write_atomic, write_bytes_atomic
from modelzoo.errors import WeightbiasError

if TYPE_CHECKING:  # pragma: no cover - a checkpoint reader needs no zarr
    from modelzoo.zoo import Zoo

SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".h5")
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")  # torch.save files: a state_dict keeps the modules' order
# Where training code puts the state_dict inside a checkpoint dict: Lightning's ``state_dict``
# (beside epoch, optimizer_states, hyper_parameters), and the common hand-written recipes.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


class CheckpointError(WeightbiasError, ValueError):
    """A checkpoint that cannot be read, or a format we do not write."""


def model_state_dict(zoo: Zoo, index: int) -> dict[str, torch.Tensor]:
    """The state_dict of stored model ``index``; refuses a model that is not done."""
    if not 0 <= index < zoo.n_models:
        raise CheckpointError(f"model {index} outside the zoo's models 0..{zoo.n_models - 1}")
    if not zoo.done[index]:
        raise CheckpointError(f"model {index} is not done (not trained yet, or interrupted)")
    return unflatten(zoo.model_weights(index), list(zoo.layout))


def model_metadata(zoo: Zoo, index: int) -> dict[str, str]:
    """Architecture and config of one model, as strings (what every format can carry)."""
    config = {name: zoo.column(f"config/{name}")[index].item() for name in zoo.config_fields()}
    return {"arch": zoo.arch, "width": str(zoo.width), "task": zoo.spec.task,
            "zoo_index": str(index), "config": json.dumps(config)}


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: str | Path,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write ``state_dict`` in the format named by the suffix of ``path``."""
    path = Path(path)
    metadata = metadata or {}
    suffix = path.suffix.lower()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give a file name ending in one of {SUFFIXES}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Every format goes through a temporary file and a rename: a full disk or a kill never
        # leaves a truncated checkpoint that looks like a real one.
        if suffix in TORCH_SUFFIXES:
            write_atomic(path, lambda handle: _torch_save(tensors, handle))
        elif suffix == ".safetensors":
            write_bytes_atomic(path, save(tensors, metadata=metadata))
        elif suffix == ".h5":
            def write_h5(handle) -> None:
                with h5py.File(handle, "w") as h5:
                    for name, tensor in tensors.items():
                        h5.create_dataset(name, data=tensor.numpy())
                    h5.attrs.update(metadata)

            write_atomic(path, write_h5)
        else:
            raise CheckpointError(f"{path}: unknown checkpoint suffix {suffix!r}; use one of {SUFFIXES}")
    except OSError as err:  # a full disk, a read-only folder, a pseudo-filesystem
        raise CheckpointError(f"{path}: cannot write the checkpoint ({err.strerror or err}); nothing was "
                              "written there") from err
    return path


def _torch_save(tensors: dict[str, torch.Tensor], handle) -> None:
    """torch.save, whose zip writer reports a short write (a full disk) as a RuntimeError."""
    try:
        torch.save(tensors, handle)
    except RuntimeError as err:
        if "unexpected pos" in str(err):
            raise OSError(errno.ENOSPC, "No space left on device") from err
        raise OSError(errno.EIO, f"torch.save failed: {str(err).splitlines()[0]}") from err


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.pt``/``.pth``, ``.safetensors`` or ``.h5``; never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in TORCH_SUFFIXES:
            _check_torch_header(path)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".safetensors":
            loaded = load_file(str(path))
        elif suffix == ".h5":
            loaded = _read_h5(path)
        else:
            raise CheckpointError(f"{path}: unknown checkpoint suffix {suffix!r}; use one of {SUFFIXES}")
    except CheckpointError as err:
        if str(path) in str(err):
            raise
        raise CheckpointError(f"{path}: {err}") from err
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: holds Python objects beyond tensors, which are "
                              f"never unpickled ({str(err).splitlines()[-1] if str(err) else err})") from err
    # Parsers of damaged bytes raise whatever their code trips over (torch's weights-only
    # unpickler an IndexError or struct.error, a malformed HDF5 tree a TypeError or AttributeError).
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, IndexError, TypeError, AttributeError,
            struct.error, SafetensorError) as err:
        raise CheckpointError(f"{path}: not a readable {suffix} checkpoint ({err})") from err
    loaded = _inner_state_dict(loaded)
    if not _is_tensor_mapping(loaded):
        raise CheckpointError(f"{path}: holds no state_dict (expected a mapping of names to tensors, "
                              f"possibly under one of the keys {list(STATE_DICT_KEYS)})")
    return loaded


def _check_torch_header(path: Path) -> None:
    """Name what a ``.pt`` file really is when it is no ``torch.save`` output (a zip archive, or
    a pickle stream in the legacy format), before a parser reports it in its own terms."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise CheckpointError(f"{path}: is empty (0 bytes); not a checkpoint")
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        raise CheckpointError(f"{path}: is an HDF5 file, not a torch.save one; name it .h5")
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        raise CheckpointError(f"{path}: is a safetensors file, not a torch.save one; name it .safetensors")
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive or a "
                          "pickle stream; this file starts with neither)")


def _inner_state_dict(loaded: object) -> object:
    """The mapping of names to tensors inside a checkpoint dict, or ``loaded`` as it is."""
    if not isinstance(loaded, dict) or _is_tensor_mapping(loaded):
        return loaded
    return next((loaded[key] for key in STATE_DICT_KEYS if _is_tensor_mapping(loaded.get(key))), loaded)


def _is_tensor_mapping(value: object) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(v, torch.Tensor) for v in value.values()))


def _read_h5(path: Path) -> dict[str, torch.Tensor]:
    with h5py.File(path, "r") as h5:
        if _is_keras(h5):
            return keras_state_dict(h5)
        # Our export: one dataset per tensor; nested groups flatten to dotted state_dict names.
        tensors: dict[str, torch.Tensor] = {}

        def collect(name: str, node: h5py.HLObject) -> None:
            if isinstance(node, h5py.Dataset):
                tensors[name.replace("/", ".")] = _h5_tensor(path, name, node)

        h5.visititems(collect)
    return tensors


def _h5_tensor(path: Path, name: str, node: h5py.Dataset) -> torch.Tensor:
    """One dataset as a tensor; text, records, empty datasets and dtypes torch lacks are refused."""
    array = np.asarray(node[()])  # a scalar dataset reads as a numpy scalar, not an array
    if array.dtype.byteorder == ">":  # written on a big-endian machine: torch takes native order only
        array = array.astype(array.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(array)
    except TypeError as err:
        raise CheckpointError(f"{path}: dataset {name!r} holds {array.dtype}, not a numeric tensor") from err


def _is_keras(h5: h5py.File) -> bool:
    return ("keras_version" in h5.attrs or "layer_names" in h5.attrs or "model_weights" in h5
            or ("layers" in h5 and isinstance(h5["layers"], h5py.Group)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _keras_layers(h5: h5py.File) -> list[tuple[str, list[np.ndarray]]]:
    """(layer name, [kernel, bias]) for each layer with weights, in the model's layer order."""
    if "layer_names" in h5.attrs or "model_weights" in h5:
        # Keras 2 / tf.keras HDF5 (``model.save`` puts the weights under ``model_weights``,
        # ``save_weights`` at the root): the order is in the ``layer_names`` attribute and each
        # layer's variables are listed, in order, by its ``weight_names`` attribute.
        root = h5.get("model_weights", h5)
        layers = []
        for layer in map(_text, root.attrs.get("layer_names", [])):
            names = [_text(n) for n in root[layer].attrs.get("weight_names", [])]
            if names:
                layers.append((layer, [root[layer][name][()] for name in names]))
        return layers
    # Keras 3 ``.weights.h5``: layers/<name>/vars/<i>; h5py lists groups alphabetically, so
    # the layer order comes back from Keras' naming (conv2d, conv2d_1, ..., dense, dense_1).
    def creation_order(name: str) -> tuple[str, int]:
        stem, _, number = name.rpartition("_")
        return (stem, int(number)) if stem and number.isdigit() else (name, 0)

    layers = []
    for layer in sorted(h5["layers"], key=creation_order):
        variables = h5["layers"][layer].get("vars")
        if variables is not None and len(variables):
            layers.append((layer, [variables[str(i)][()] for i in range(len(variables))]))
    return layers


def keras_state_dict(h5: h5py.File) -> dict[str, torch.Tensor]:
    """A Keras (IFBiD-style) HDF5 file as a PyTorch state_dict in our naming.

    Convolution kernels are stored (kh, kw, in, out) and dense kernels (in, out); PyTorch wants
    (out, in, kh, kw) and (out, in). The k-th convolution becomes ``conv{k}`` and the k-th
    dense layer ``fc{k}``, the names every architecture here uses. Keras flattens a channels-
    last map (h, w, c) where PyTorch flattens (c, h, w), so the first dense kernel's rows are
    reordered when the last map is larger than 1×1.
    """
    tensors: dict[str, torch.Tensor] = {}
    n_conv = n_dense = 0
    last_channels = None
    for layer, variables in _keras_layers(h5):
        if len(variables) != 2:
            raise CheckpointError(f"Keras layer {layer!r} has {len(variables)} weight tensors; only "
                                  "convolution and dense layers with kernel and bias are supported")
        kernel, bias = (np.asarray(v) for v in variables)
        if kernel.ndim == 4:
            n_conv += 1
            name, weight = f"conv{n_conv}", kernel.transpose(3, 2, 0, 1)
            last_channels = kernel.shape[3]
        elif kernel.ndim == 2:
            n_dense += 1
            name = f"fc{n_dense}"
            if n_dense == 1 and last_channels and kernel.shape[0] != last_channels:
                if kernel.shape[0] % last_channels:
                    raise CheckpointError(f"Keras layer {layer!r} takes {kernel.shape[0]} inputs, "
                                          f"not a multiple of the last map's {last_channels} channels")
                positions = kernel.shape[0] // last_channels
                kernel = kernel.reshape(positions, last_channels, -1).transpose(1, 0, 2).reshape(
                    kernel.shape[0], -1)
            weight = kernel.T
        else:
            raise CheckpointError(f"Keras layer {layer!r} has a kernel of shape {kernel.shape}; only "
                                  "convolution (4-D) and dense (2-D) kernels are supported")
        tensors[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(weight))
        tensors[f"{name}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    if not tensors:
        raise CheckpointError("Keras file holds no layer weights")
    return tensors
