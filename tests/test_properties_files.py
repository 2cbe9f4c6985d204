"""Property-based tests (hypothesis) of the files user input comes in: checkpoints and detector folders.

* Checkpoint files: real ``digit-cnn``/``gender-cnn`` state_dicts saved as .pt, .safetensors
  and .h5, then mutated (content and bytes), go through ``load_checkpoint`` and
  ``checkpoint_weights``. Either the weights come out finite with a known layout's length,
  or one of the project's errors is raised. A pickled payload never runs.
* Detector folders: any edit of ``detector.json`` or damage to a file is refused with one of
  the project's errors, or loads as saved.

Example counts are in ``tests/property_settings.py``; ``pytest --hypothesis-show-statistics``
prints how many each property ran and how long they took.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from hypothesis import assume, event, given, note
from hypothesis import strategies as st

from detector.scoring import checkpoint_weights
from modelzoo.architectures import build_model
from modelzoo.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from modelzoo.errors import WeightbiasError
from tests.property_settings import PROJECT_ERRORS, property_settings, weird_text

# ------------------------------------------------------------------------------ checkpoints


def _state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return {f"{arch}@{width:g}": build_model(arch, width).state_dict()
            for arch, width in (("digit-cnn", 1.0), ("gender-cnn", 1.0), ("digit-cnn", 0.5))}


STATE_DICTS = _state_dicts()
KNOWN_SIZES = {key: sum(t.numel() for t in tensors.values()) for key, tensors in STATE_DICTS.items()}
SUFFIXES = (".pt", ".pth", ".safetensors", ".h5")
DTYPES = (torch.int32, torch.int64, torch.int8, torch.uint8, torch.float16, torch.bfloat16, torch.float64,
          torch.bool)


@pytest.fixture(scope="module")
def scratch() -> Path:
    with tempfile.TemporaryDirectory(prefix="wb_props_") as folder:
        yield Path(folder)


def _check_loadable(path: Path) -> None:
    """The property of every checkpoint file: scored weights, or one of the project's errors."""
    try:
        weights = checkpoint_weights(load_checkpoint(path))
    except PROJECT_ERRORS as err:
        cause = f" (from {type(err.__cause__).__name__})" if err.__cause__ is not None else ""
        event(f"refused: {type(err).__name__}{cause}")
        assert str(path.name) in str(err) or not isinstance(err, CheckpointError), err
        return
    event("scored")
    assert weights.weights.ndim == 2 and weights.weights.shape[0] == 1
    assert weights.weights.shape[1] in KNOWN_SIZES.values()
    assert np.isfinite(weights.weights).all()


def _content_mutation(draw: Callable, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = list(tensors)
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["none", "dtype", "all_dtype", "shape", "scalar", "empty", "nan", "inf",
                                 "rename", "drop", "extra", "reorder", "transpose", "huge", "noncontig"]))
    note(f"content mutation {kind} on {name}")
    t = tensors[name]
    if kind == "dtype":
        tensors[name] = t.to(draw(st.sampled_from(DTYPES)))
    elif kind == "all_dtype":
        dtype = draw(st.sampled_from(DTYPES))
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    elif kind == "shape":
        tensors[name] = torch.zeros(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    elif kind == "scalar":
        tensors[name] = torch.tensor(draw(st.floats(allow_nan=False, allow_infinity=False, width=32)))
    elif kind == "empty":
        tensors[name] = torch.zeros((0, *t.shape[1:]))
    elif kind in ("nan", "inf") and t.numel():
        flat = t.clone().reshape(-1) if t.is_floating_point() else t.reshape(-1).float()
        flat[draw(st.integers(0, flat.numel() - 1))] = float(kind) * draw(st.sampled_from([1, -1]))
        tensors[name] = flat.reshape(t.shape)
    elif kind == "rename":
        tensors = {(draw(weird_text) or "x") if k == name else k: v for k, v in tensors.items()}
    elif kind == "drop":
        del tensors[name]
    elif kind == "extra":
        tensors[draw(weird_text) or "extra"] = torch.ones(draw(st.integers(1, 5)))
    elif kind == "reorder":
        tensors = dict(reversed(tensors.items()))
    elif kind == "transpose" and t.dim() >= 2:
        tensors[name] = t.transpose(0, 1).contiguous()
    elif kind == "huge":
        tensors[name] = t * draw(st.sampled_from([1e38, 3e38, -3e38, 1e-45]))
    elif kind == "noncontig" and t.dim() >= 2:
        tensors[name] = t.transpose(0, 1)
    return tensors


@property_settings("checkpoint_content")
@given(arch=st.sampled_from(sorted(STATE_DICTS)), suffix=st.sampled_from(SUFFIXES), data=st.data())
def test_mutated_checkpoint_content_is_scored_or_refused(scratch: Path, arch: str, suffix: str,
                                                         data: st.DataObject) -> None:
    tensors = dict(STATE_DICTS[arch])
    for _ in range(data.draw(st.integers(0, 2))):
        tensors = _content_mutation(data.draw, tensors)
    path = scratch / f"content{suffix}"
    path.unlink(missing_ok=True)
    try:
        save_checkpoint(tensors, path, {"arch": arch})
    except (CheckpointError, TypeError, ValueError) as err:
        # Our writer takes what each format can hold; safetensors and HDF5 cannot hold every
        # dtype or name (bfloat16 in HDF5, '' as a name); such a file is never written.
        note(f"not writable as {suffix}: {err}")
        assume(False)
    _check_loadable(path)
    reference = STATE_DICTS[arch]
    if set(tensors) == set(reference) and all(tensors[k] is reference[k] for k in reference):
        event("untouched tensors (maybe reordered): must score")
        weights = checkpoint_weights(load_checkpoint(path))
        assert weights.weights.shape[1] == KNOWN_SIZES[arch]


def _byte_mutation(draw: Callable, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "append", "empty", "random", "zero_run"]))
    note(f"byte mutation {kind}")
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        buf = bytearray(data)
        # Bias towards the header, where the structure lives; the rest is raw weights.
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.one_of(st.integers(0, min(len(buf) - 1, 4096)), st.integers(0, len(buf) - 1)))
            buf[at] ^= draw(st.integers(1, 255))
        return bytes(buf)
    if kind == "overwrite":
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=64))
        return data[:at] + patch + data[at + len(patch):]
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=256))
    if kind == "empty":
        return b""
    if kind == "zero_run":
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes(draw(st.integers(1, 4096))) + data[at + 4096:]
    return draw(st.binary(max_size=512))


@functools.cache
def _saved(arch: str, suffix: str) -> bytes:
    """A real state_dict saved in one format, as bytes to mutate (a cache, not a fixture, so a
    failing example does not print megabytes of it)."""
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(STATE_DICTS[arch], Path(folder) / f"clean{suffix}", {"arch": arch})
        return path.read_bytes()


@property_settings("checkpoint_bytes")
@given(arch=st.sampled_from(sorted(STATE_DICTS)), suffix=st.sampled_from(SUFFIXES), data=st.data())
def test_checkpoint_files_with_damaged_bytes_are_scored_or_refused(
        scratch: Path, arch: str, suffix: str, data: st.DataObject) -> None:
    raw = _saved(arch, suffix)
    for _ in range(data.draw(st.integers(1, 2))):
        raw = _byte_mutation(data.draw, raw) if raw else raw
    path = scratch / f"bytes{suffix}"
    path.write_bytes(raw)
    _check_loadable(path)


class _Payload:
    """Pickles as a call: loading it would run ``call(*args)``."""

    def __init__(self, call: Callable, args: tuple) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple:
        return self.call, self.args


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@property_settings("pickle_payload")
@given(arch=st.sampled_from(sorted(STATE_DICTS)), where=st.sampled_from(["value", "top", "nested", "key"]),
       how=st.sampled_from(["touch", "open", "system", "eval"]), protocol=st.integers(2, 5),
       wrapper=st.sampled_from(["torch.save", "legacy", "raw pickle"]))
def test_a_pickled_payload_never_runs(scratch: Path, arch: str, where: str, how: str, protocol: int,
                                      wrapper: str) -> None:
    marker = scratch / "MARKER"
    marker.unlink(missing_ok=True)
    call = {"touch": (pathlib.Path.touch, (marker,)), "open": (open, (str(marker), "w")),
            "system": (os.system, (f"touch {marker}",)),
            "eval": (eval, (f"__import__('pathlib').Path({str(marker)!r}).touch()",))}[how]
    payload = _Payload(*call)
    tensors: Any = dict(STATE_DICTS[arch])
    if where == "value":
        tensors["fc1.weight"] = payload
    elif where == "top":
        tensors = payload
    elif where == "nested":
        tensors = {"state_dict": tensors, "optimizer": {"step": payload}}
    else:
        tensors = {"conv1.weight": tensors["conv1.weight"], "meta": [1, payload]}
    path = scratch / "payload.pt"
    if wrapper == "raw pickle":
        path.write_bytes(pickle.dumps(tensors, protocol=protocol))
    else:
        torch.save(tensors, path, pickle_protocol=protocol,
                   _use_new_zipfile_serialization=wrapper == "torch.save")
    with pytest.raises(CheckpointError, match=r"payload\.pt"):
        checkpoint_weights(load_checkpoint(path))
    assert not marker.exists(), "loading a checkpoint ran code from its pickle"


def _h5_extra(h5: h5py.File, kind: str, name: str) -> None:
    if kind == "string":
        h5.create_dataset(name, data=np.array(["a", "bc"], dtype=object), dtype=h5py.string_dtype())
    elif kind == "scalar":
        h5.create_dataset(name, data=np.float32(1.5))
    elif kind == "empty":
        h5.create_dataset(name, data=h5py.Empty("f4"))
    elif kind == "compound":
        h5.create_dataset(name, data=np.zeros(3, dtype=[("a", "f4"), ("b", "i4")]))
    elif kind == "bigendian":
        h5.create_dataset(name, data=np.arange(4, dtype=">f4"))
    elif kind == "longdouble":
        h5.create_dataset(name, data=np.zeros(2, dtype=np.longdouble))
    elif kind == "complex":
        h5.create_dataset(name, data=np.zeros(2, dtype=np.complex64))
    elif kind == "uint16":
        h5.create_dataset(name, data=np.arange(3, dtype=np.uint16))
    elif kind == "group":
        h5.create_group(name).create_dataset("inner", data=np.ones(2, dtype="f4"))
    elif kind == "softlink":
        h5[name] = h5py.SoftLink("/does/not/exist")
    elif kind == "keras_attr":
        h5.attrs["keras_version"] = "2.4.0"
    elif kind == "layer_names":
        h5.attrs["layer_names"] = np.array([name.encode()])


@property_settings("h5_content")
@given(arch=st.sampled_from(sorted(STATE_DICTS)),
       kind=st.sampled_from(["string", "scalar", "empty", "compound", "bigendian", "longdouble", "complex",
                             "uint16", "group", "softlink", "keras_attr", "layer_names"]),
       replace=st.booleans(), data=st.data())
def test_h5_files_with_odd_datasets_are_scored_or_refused(scratch: Path, arch: str, kind: str,
                                                          replace: bool, data: st.DataObject) -> None:
    tensors = STATE_DICTS[arch]
    target = data.draw(st.sampled_from(list(tensors))) if replace else data.draw(
        st.sampled_from(["extra", "conv9.weight", "a/b", "model_weights", "layers"]))
    path = scratch / "odd.h5"
    with h5py.File(path, "w") as h5:
        for name, tensor in tensors.items():
            if name != target:
                h5.create_dataset(name, data=tensor.numpy())
        _h5_extra(h5, kind, target)
    _check_loadable(path)


def test_exported_checkpoints_of_every_format_score_whatever_order_the_format_keeps(scratch: Path) -> None:
    """Regression: safetensors and HDF5 hand tensors back sorted by name, which no longer
    matches an architecture's order; a real model must still be recognized and flattened in
    layout order."""
    for arch, tensors in STATE_DICTS.items():
        expected = torch.cat([t.reshape(-1).float() for t in tensors.values()]).numpy()
        for suffix in SUFFIXES:
            path = save_checkpoint(tensors, scratch / f"order_{arch}{suffix}")
            weights = checkpoint_weights(load_checkpoint(path))
            assert (weights.arch, weights.width) == (arch.split("@")[0], float(arch.split("@")[1]))
            np.testing.assert_array_equal(weights.weights[0], expected)


@pytest.mark.parametrize("kind", ["scalar", "string", "empty", "compound", "longdouble"])
def test_h5_regressions_found_by_the_properties(scratch: Path, kind: str) -> None:
    path = scratch / f"odd_{kind}.h5"
    with h5py.File(path, "w") as h5:
        for name, tensor in STATE_DICTS["digit-cnn@1"].items():
            if name != "fc2.bias":
                h5.create_dataset(name, data=tensor.numpy())
        _h5_extra(h5, kind, "fc2.bias")
    if kind == "scalar":  # read fine as a 0-d tensor; recognizing the architecture then refuses it
        with pytest.raises(WeightbiasError, match=r"fc2\.bias"):
            checkpoint_weights(load_checkpoint(path))
    else:
        with pytest.raises(CheckpointError, match=r"odd_\w+\.h5.*fc2\.bias"):
            load_checkpoint(path)


def test_a_scalar_where_the_first_tensor_belongs_is_refused() -> None:
    tensors = dict(STATE_DICTS["digit-cnn@1"])
    tensors["conv1.weight"] = torch.tensor(1.0)
    with pytest.raises(WeightbiasError, match=r"conv1\.weight"):  # the refusal names the tensor
        checkpoint_weights(tensors)


@pytest.mark.parametrize("data", [b"R.", b"\x86.", b"U", b"r"])
def test_a_damaged_pickle_stream_is_refused(scratch: Path, data: bytes) -> None:
    """Regression: torch's weights-only unpickler raises IndexError or struct.error on these
    opcode streams (what a truncated or bit-flipped .pt often becomes). Behind a protocol-2
    header they reach the unpickler; bare, no torch.save output starts so."""
    path = scratch / "damaged.pt"
    path.write_bytes(b"\x80\x02" + data)
    with pytest.raises(CheckpointError, match=r"damaged\.pt: not a readable \.pt checkpoint"):
        load_checkpoint(path)
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"damaged\.pt: not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_malformed_keras_files_are_refused_naming_the_file(scratch: Path) -> None:
    """Regression: a Keras-looking tree whose layer is a dataset, not a group, raised
    AttributeError; a Keras error raised inside the reader did not name the file."""
    path = scratch / "keras_like.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("layers/conv2d", data=np.ones(3))
    with pytest.raises(CheckpointError, match=r"keras_like\.h5: not a readable"):
        load_checkpoint(path)
    with h5py.File(path, "w") as h5:
        h5.attrs["layer_names"] = np.array([b"dense"])
        h5.create_group("dense")
    with pytest.raises(CheckpointError, match=r"keras_like\.h5: Keras file holds no layer weights"):
        load_checkpoint(path)


def test_a_big_endian_h5_checkpoint_scores_like_the_native_one(scratch: Path) -> None:
    tensors = STATE_DICTS["digit-cnn@1"]
    path = scratch / "big_endian.h5"
    with h5py.File(path, "w") as h5:
        for name, tensor in tensors.items():
            h5.create_dataset(name, data=tensor.numpy().astype(">f4"))
    weights = checkpoint_weights(load_checkpoint(path))
    expected = torch.cat([t.reshape(-1) for t in tensors.values()]).numpy()
    np.testing.assert_array_equal(weights.weights[0], expected)


# ------------------------------------------------------------------------- detector folders

@pytest.fixture(scope="module")
def detector_folder(scratch: Path) -> Path:
    from detector.files import save_detector
    from detector.models import make_detector
    from tests.test_detector import colour_signal_weights

    train, y_train, slots = colour_signal_weights(40, seed=3)
    return save_detector(make_detector("boosting", slots, max_iter=5).fit(train, y_train), scratch / "det")


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=False),
                         st.text(max_size=6))
json_values = st.recursive(json_scalars,
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)


@property_settings("detector_folder")
@given(key=st.sampled_from(["classes", "heldout", "target", "steps", "zoo", "format_version", "reference",
                            "predictor", "calibration", "integrity", "new"]),
       value=json_values, damage=st.sampled_from([None, "truncate", "flip", "remove"]))
def test_a_changed_detector_folder_loads_as_it_was_saved_or_is_refused(
        detector_folder: Path, key: str, value: Any, damage: str | None) -> None:
    """Any edit of detector.json, any damage to a file: the folder is refused with one of the
    project's errors (or, for an edit that changes nothing, loads as saved); nothing else escapes."""
    from detector.files import load_detector

    work = detector_folder.with_name("edited")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(detector_folder, work)
    meta = json.loads((work / "detector.json").read_text())
    edited = meta | {key: value}
    (work / "detector.json").write_text(json.dumps(edited))
    if damage:
        victim = work / sorted(meta["integrity"]["files"])[0]
        data = victim.read_bytes()
        if damage == "remove":
            victim.unlink()
        else:
            victim.write_bytes(data[: len(data) // 2] if damage == "truncate"
                               else data[:10] + bytes([data[10] ^ 1]) + data[11:])
    try:
        load_detector(work)
    except PROJECT_ERRORS as err:
        event(type(err).__name__)
        return
    assert edited == meta and not damage, "a changed folder was trusted"


