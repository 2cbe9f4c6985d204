"""Checkpoint files: export a zoo model as a state_dict, and read state_dicts back safely.

Sits at the store's edge (stage 4 of the flow): it turns a stored weight row into a file a
person can load in plain PyTorch, and reads checkpoints without ever unpickling code
(``torch.load(..., weights_only=True)``, safetensors, or HDF5 datasets).

Formats, chosen by suffix: ``.pt``/``.pth`` (a dict of tensors), ``.safetensors``, ``.h5``
(one dataset per tensor, named as in the state_dict; architecture in the file's attributes).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from modelzoo.architectures import unflatten
from modelzoo.store import ZooStore

SUFFIXES = (".pt", ".pth", ".safetensors", ".h5")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or a format we do not write."""


def model_state_dict(store: ZooStore, index: int) -> dict[str, torch.Tensor]:
    """The state_dict of stored model ``index``; refuses a model that is not done."""
    if not 0 <= index < store.n_models:
        raise IndexError(f"model {index} outside 0..{store.n_models - 1}")
    if not store.done[index]:
        raise CheckpointError(f"model {index} is not done (not trained yet, or interrupted)")
    return unflatten(store.weights(index), store.layout)


def model_metadata(store: ZooStore, index: int) -> dict[str, str]:
    """Architecture and config of one model, as strings (what every format can carry)."""
    config = {name: store.group[f"config/{name}"][index].item() for name in store.config_fields()}
    return {"arch": store.spec.arch, "width": str(store.spec.width), "task": store.spec.task,
            "zoo_index": str(index), "config": json.dumps(config)}


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: str | Path,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write ``state_dict`` in the format named by the suffix of ``path``."""
    path = Path(path)
    metadata = metadata or {}
    suffix = path.suffix.lower()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".pt", ".pth"):
        torch.save(tensors, path)
    elif suffix == ".safetensors":
        save_file(tensors, str(path), metadata=metadata)
    elif suffix == ".h5":
        with h5py.File(path, "w") as h5:
            for name, tensor in tensors.items():
                h5.create_dataset(name, data=tensor.numpy())
            h5.attrs.update(metadata)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint suffix {suffix!r}; use one of {SUFFIXES}")
    return path


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.pt``/``.pth``, ``.safetensors`` or ``.h5``; never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".safetensors":
            loaded = load_file(str(path))
        elif suffix == ".h5":
            loaded = _read_h5(path)
        else:
            raise CheckpointError(f"{path}: unknown checkpoint suffix {suffix!r}; use one of {SUFFIXES}")
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused: holds Python objects beyond tensors, which are "
                              f"never unpickled ({str(err).splitlines()[-1] if str(err) else err})") from err
    except (OSError, RuntimeError, ValueError, EOFError, SafetensorError) as err:
        raise CheckpointError(f"{path}: not a readable {suffix} checkpoint ({err})") from err
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: holds no state_dict (expected a mapping of names to tensors)")
    return loaded


def _read_h5(path: Path) -> dict[str, torch.Tensor]:
    # Nested groups (Keras-style files) flatten to dotted names, like state_dict keys.
    tensors: dict[str, torch.Tensor] = {}

    def collect(name: str, node: h5py.HLObject) -> None:
        if isinstance(node, h5py.Dataset):
            tensors[name.replace("/", ".")] = torch.from_numpy(node[()])

    with h5py.File(path, "r") as h5:
        h5.visititems(collect)
    return tensors
