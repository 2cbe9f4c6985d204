"""Property-based tests (hypothesis) of the two doors user input comes through.

* Zoo specs: any spec dict, valid or mutated, either parses into a :class:`ZooSpec` whose
  configs are computable, storable and round-trip through ``to_dict``, or is refused with a
  :class:`SpecError` whose message starts with the offending key. Nothing else escapes.
* Checkpoint files: real ``digit-cnn``/``gender-cnn`` state_dicts saved as .pt, .safetensors
  and .h5, then mutated (content and bytes), go through ``load_checkpoint`` and
  ``checkpoint_weights``. Either the weights come out finite with a known layout's length,
  or one of the project's errors is raised. A pickled payload never runs.

Example counts are fixed below (MAX_EXAMPLES); ``pytest --hypothesis-show-statistics`` prints
how many each property ran and how long they took.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
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
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from detector.scoring import checkpoint_weights
from modelzoo.architectures import build_model
from modelzoo.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from modelzoo.config import ModelConfig
from modelzoo.errors import WeightbiasError
from modelzoo.spec import AXES, ZOO_KEYS, SpecError, ZooSpec, common_axes, parse_spec
from modelzoo.spec_rules import SAMPLERS
from modelzoo.tasks import TASKS, get_task

# How many generated cases each property runs (hypothesis may stop earlier when it has
# exhausted a small search space). With these the whole file took 25-40 s on the 2-core
# machine at load average 7-10; runs of 10x as many cases found nothing more.
MAX_EXAMPLES = {"spec": 300, "spec_values": 300, "checkpoint_content": 120, "checkpoint_bytes": 300,
                "pickle_payload": 40, "h5_content": 80, "detector_folder": 60, "cli_args": 120}
# The project's own errors (checkpoint, recognition, detector, architecture): all WeightbiasErrors.
PROJECT_ERRORS = (WeightbiasError,)
TABLES = ("zoo", "fixed", "sweep", "sample")
# Every axis name a spec may use: the common axes and each task's own.
ALL_AXES = sorted({*AXES, *(axis for task in TASKS.values() for axis in task.axis_names)})


def _settings(name: str) -> settings:
    return settings(max_examples=MAX_EXAMPLES[name], deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------ specs

BASE_SPECS: list[dict[str, Any]] = [
    {"zoo": {"task": "colored_mnist", "arch": "digit-cnn", "n_models": 8, "seed": 1},
     "fixed": {"epochs": 1, "train_size": 512},
     "sweep": {"sigma2": [0.02, 0.05], "pool": ["A", "B"]}},
    {"zoo": {"task": "biased_mnist", "arch": "digit-cnn", "n_models": 5, "models_per_task": 2},
     "fixed": {"rho": 0.99, "optimizer": "sgd"},
     "sample": {"lr": {"log_uniform": [3e-4, 3e-3]}, "epochs": {"int_uniform": [1, 3]},
                "batch_size": {"choice": [32, 64]}}},
    {"zoo": {"task": "face_gender", "arch": "gender-cnn", "n_models": 6, "dataset": "utkface"},
     "sweep": {"bias_group": ["east_asian", "balanced"]},
     "sample": {"skew": {"uniform": [0.6, 0.9]}}},
    {"zoo": {"task": "colored_mnist", "arch": "digit-cnn", "n_models": 3, "width": 0.5},
     "fixed": {"sigma2": 0.03, "gamma": 0.5, "reg": {"hidden": 16}},
     "sweep": {"regularizer": ["none", "grad", "unsupervised+ndr"], "reg.ramp": [True, False]}},
]
REG_OPTIONS = ("hidden", "alpha", "beta", "tau", "bits", "ramp", "grl_weight", "per_class", "clusters",
               "momentum", "target_prob", "seed_iters", "warmup_steps", "entropy_weight")
REGULARIZERS = ("none", "ndr", "end", "grad", "binary_bernoulli", "binary_mi", "sensitive_nets", "lntl",
                "group_balanced", "unsupervised+ndr", "unsupervised+end", "unsupervised", "ndr+grad",
                "bogus", "")

weird_text = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["", " ", "A", "B", "C", "all", "none", "grad", "adam", "lbfgs", "digit-cnn",
                     "gender-cnn", "resnet", "cifar", "\x00", "ü", "../../etc/passwd", "a" * 300,
                     "reg.", "reg.alpha", "zoo.task", "colored_mnist", "face_gender", "balanced"]),
)
weird_number = st.one_of(
    st.integers(-3, 10),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-0.5, 1.5),
    st.sampled_from([0, -1, 1, 0.0, -0.0, 1e-300, 5e-324, 1e308, -1e308, 2**31, 2**53 + 1, 2**62, 2**63 - 1,
                     2**63, 2**64, 10**12, 10**7, float("nan"), float("inf"), float("-inf")]),
)
weird_value = st.one_of(
    weird_number, weird_text, st.none(), st.booleans(),
    st.lists(st.one_of(st.integers(0, 3), st.floats(0, 1), weird_text), max_size=3),
    st.dictionaries(weird_text, st.integers(0, 3), max_size=2),
)
known_axes = st.sampled_from(ALL_AXES)
axis_names = st.one_of(known_axes, known_axes, st.sampled_from([f"reg.{o}" for o in REG_OPTIONS]), weird_text)
edge_float = st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e308, -1e308, float("inf"), float("-inf"),
                              float("nan")])
edge_int = st.sampled_from([0, -1, 2**31, 2**62, 2**63 - 2, 2**63 - 1, 2**63, 2**64, 10**30])
# Values an axis plausibly takes, edges included, so mutated specs often stay valid and reach
# config(), the store's column types and the JSON round trip.
AXIS_VALUES = {
    "sigma2": st.one_of(st.floats(0.001, 0.999), edge_float),
    "rho": st.one_of(st.floats(0, 1), edge_float),
    "skew": st.one_of(st.floats(0.01, 0.99), edge_float),
    "lr": st.one_of(st.floats(1e-6, 9.9), edge_float),
    "gamma": st.one_of(st.floats(0, 1e6), edge_float),
    "epochs": st.one_of(st.integers(1, 5), edge_int),
    "batch_size": st.one_of(st.integers(1, 512), edge_int),
    "train_size": st.one_of(st.integers(0, 10_000), edge_int),
    "seed": st.one_of(st.integers(0, 2**32), edge_int),
    "pool": st.sampled_from(["A", "B", "all", "C", ""]),
    "optimizer": st.sampled_from(["adam", "sgd", "lbfgs"]),
    "bias_group": st.sampled_from(["east_asian", "african_indian", "caucasian", "balanced", "martian"]),
    "regularizer": st.sampled_from(REGULARIZERS),
}
option_value = st.one_of(st.integers(0, 64), st.floats(0, 10), st.booleans(), edge_float, edge_int,
                         weird_text)


def _value(draw: Callable, axis: str) -> Any:
    plausible = AXIS_VALUES.get(axis, option_value if str(axis).startswith("reg.") else weird_value)
    return draw(st.one_of(plausible, plausible, plausible, weird_value))


def _table(raw: dict, draw: Callable, names: tuple[str, ...] = ("fixed", "sweep", "sample")) -> dict:
    name = draw(st.sampled_from(names))
    table = raw.setdefault(name, {})
    return table if isinstance(table, dict) else raw.setdefault(f"_{name}", {})


def _set_zoo_key(draw: Callable, raw: dict) -> None:
    zoo_keys = st.sampled_from(list(ZOO_KEYS))
    key = draw(st.one_of(zoo_keys, zoo_keys, zoo_keys, weird_text))
    zoo_values = {"n_models": st.one_of(st.integers(-2, 50), edge_int, st.just(10**6), st.just(10**6 + 1)),
                  "models_per_task": st.one_of(st.integers(-1, 9), edge_int), "seed": edge_int,
                  "width": st.one_of(st.floats(0, 9), edge_float), "eval_size": edge_int}
    names = st.sampled_from(["colored_mnist", "biased_mnist", "face_gender", "digit-cnn", "gender-cnn",
                             "utkface"])
    plausible = zoo_values.get(key, names)
    _table(raw, draw, ("zoo",))[key] = draw(st.one_of(plausible, plausible, weird_value))


def _delete_key(draw: Callable, raw: dict) -> None:
    table = _table(raw, draw, TABLES)
    if table:
        del table[draw(st.sampled_from(sorted(table, key=str)))]


def _replace_table(draw: Callable, raw: dict) -> None:
    raw[draw(st.one_of(st.sampled_from(TABLES), weird_text))] = draw(weird_value)


def _set_fixed(draw: Callable, raw: dict) -> None:
    axis = draw(axis_names)
    _table(raw, draw, ("fixed",))[axis] = _value(draw, axis)


def _set_sweep(draw: Callable, raw: dict) -> None:
    axis = draw(axis_names)
    values = [_value(draw, axis) for _ in range(draw(st.integers(0, 3)))]
    _table(raw, draw, ("sweep",))[axis] = values if draw(st.integers(0, 5)) else draw(weird_value)


def _set_sample(draw: Callable, raw: dict) -> None:
    axis = draw(axis_names)
    how = draw(st.one_of(st.sampled_from(SAMPLERS), weird_text))
    args = [_value(draw, axis) for _ in range(draw(st.sampled_from([2, 2, 2, 0, 1, 3])))]
    if draw(st.booleans()):
        with contextlib.suppress(TypeError):  # mixed types do not sort; keep them as drawn
            args = sorted(args)
    sampler = draw(st.one_of(st.just({how: args}), st.just({how: args, "choice": [1]}), weird_value))
    _table(raw, draw, ("sample",))[axis] = sampler


def _set_regularizer(draw: Callable, raw: dict) -> None:
    names = st.sampled_from(REGULARIZERS)
    table = _table(raw, draw, ("fixed", "sweep"))
    table["regularizer"] = draw(names) if table is raw.get("fixed") else draw(st.lists(names, max_size=3))
    options = {draw(st.one_of(st.sampled_from(REG_OPTIONS), weird_text)): draw(option_value)}
    _table(raw, draw)["reg"] = draw(st.one_of(st.just(options), weird_value))


def _move_axis(draw: Callable, raw: dict) -> None:
    """Give an axis in a second table, or move it to another table in the other table's form."""
    source = _table(raw, draw)
    if not source:
        return
    axis = draw(st.sampled_from(sorted(source, key=str)))
    value = source[axis] if draw(st.booleans()) else source.pop(axis)
    _table(raw, draw)[axis] = draw(st.sampled_from([value, [value], {"choice": [value]}]))


# Value edits come three times as often as structural ones, so that many mutated specs stay
# valid and go on to config(), column types and the JSON round trip.
MUTATIONS = (_set_fixed, _set_sweep, _set_sample) * 3 + (_set_zoo_key, _delete_key, _replace_table,
                                                         _set_regularizer, _move_axis)


@st.composite
def spec_dicts(draw: Callable) -> dict[str, Any]:
    raw = copy.deepcopy(draw(st.sampled_from(BASE_SPECS)))
    for mutate in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        mutate(draw, raw)
    return raw


@st.composite
def near_valid_spec_dicts(draw: Callable) -> dict[str, Any]:
    """Value edits only, on axes the task has, each given in one table: specs that often stay
    valid, with values at their edges (0, huge, inf, NaN, 2**63), to reach the deep checks."""
    raw = copy.deepcopy(draw(st.sampled_from(BASE_SPECS)))
    task = raw["zoo"]["task"]
    axes = [*get_task(task).axis_names, *common_axes(), "reg.hidden", "reg.ramp", "reg.grl_weight",
            "reg.clusters"]
    for _ in range(draw(st.integers(1, 3))):
        axis = draw(st.sampled_from(axes))
        for table in ("fixed", "sweep", "sample"):
            raw.get(table, {}).pop(axis, None)
            raw.get(table, {}).get("reg", {}).pop(axis.removeprefix("reg."), None)
        plausible = AXIS_VALUES.get(axis, option_value)
        form = draw(st.sampled_from(["fixed", "sweep", "choice", "uniform", "log_uniform", "int_uniform"]))
        if form == "fixed":
            raw.setdefault("fixed", {})[axis] = draw(plausible)
        elif form == "sweep":
            raw.setdefault("sweep", {})[axis] = draw(st.lists(plausible, min_size=1, max_size=3))
        else:
            args = draw(st.lists(plausible, min_size=1, max_size=3)) if form == "choice" else sorted(
                draw(st.lists(plausible, min_size=2, max_size=2)), key=lambda v: (str(type(v)), v))
            raw.setdefault("sample", {})[axis] = {form: args}
    if draw(st.booleans()):
        _set_zoo_key(draw, raw)
    return raw


def _starts_with_a_key(message: str, raw: dict) -> bool:
    """SpecError's contract: the message starts with the offending key (dotted for nesting)."""
    keys = {*TABLES, *ALL_AXES, *(str(k) for k in raw)}
    return any(message.startswith(f"{key}:") or message.startswith(f"{key}.") for key in keys)


def _check_spec(spec: ZooSpec) -> None:
    n = spec.n_models
    for index in sorted({0, 1, n // 2, n - 1} & set(range(n))):
        config = spec.config(index)
        assert config == spec.config(index), "a config is a pure function of (spec, index)"
        values = spec.config_values(index)
        # The typed config and the flat store row are one thing, each way round.
        assert config.to_dict() == values
        assert ModelConfig.from_dict(spec.task, values) == config
        assert config.index == index and config.bias_level == values[spec.bias_level]
        assert set(values) == {"index", *spec.axes}
        for axis in spec.axes:
            value, kind = values[axis], spec.axis_type(axis)
            # The store keeps each axis as one typed column (int64, float64, bool or string).
            assert type(value) is kind, (axis, value, kind)
            if kind is float:
                assert math.isfinite(value), (axis, value)
            if kind is int:
                assert -(2**63) <= value < 2**63, (axis, value)
    # The spec goes into the store's JSON attributes: strict JSON, and parsing it back is a no-op.
    json.dumps(spec.to_dict(), allow_nan=False)
    again = parse_spec(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.digest() == spec.digest()
    assert sum(len(block) for block in spec.blocks()[:3]) == min(n, 3 * spec.models_per_task)


@pytest.mark.slow  # 300 specs, about 5 s; the edge-value property below stays in the fast tier
@_settings("spec")
@given(spec_dicts())
def test_spec_parses_or_names_the_offending_key(raw: dict[str, Any]) -> None:
    _check_parse(raw)


@_settings("spec_values")
@given(near_valid_spec_dicts())
def test_specs_with_edge_values_parse_into_storable_configs_or_name_the_key(raw: dict[str, Any]) -> None:
    _check_parse(raw)


def _check_parse(raw: dict[str, Any]) -> None:
    """The spec property: a ZooSpec that passes :func:`_check_spec`, or a SpecError naming a key."""
    note(repr(raw))
    try:
        spec = parse_spec(copy.deepcopy(raw))
    except SpecError as err:
        head = str(err).split(":")[0].split(".")[0]
        event(f"SpecError on {head if head in (*TABLES, *ALL_AXES) else 'an unknown table or key'}")
        assert _starts_with_a_key(str(err), raw), f"SpecError names no key: {err}"
        return
    event("parsed into a ZooSpec")
    _check_spec(spec)


@pytest.mark.parametrize(("table", "entries", "message"), [
    ("zoo", {"n_models": 10**12}, "zoo.n_models: at most"),
    ("fixed", {"gamma": float("inf")}, "fixed.gamma: expected a finite number"),
    ("sample", {"gamma": {"uniform": [0.0, float("inf")]}}, "sample.gamma.uniform: expected a finite"),
    ("sample", {"batch_size": {"uniform": [16, 64]}}, "sample.batch_size.uniform: axis batch_size takes"),
    ("sample", {"seed": {"int_uniform": [0, 2**63 - 1]}}, "sample.seed.int_uniform: "),
    ("fixed", {"seed": 2**64}, "fixed.seed: "),
    # seed 12 of the edge-value property: 2**31 clusters asked for a 5 TB centroid table
    ("fixed", {"regularizer": "unsupervised+ndr", "reg.clusters": 2**31}, "fixed.reg.clusters: "),
    ("fixed", {"regularizer": "grad", "reg.hidden": 2**40}, "fixed.reg.hidden: "),
])
def test_spec_regressions_found_by_the_properties(table: str, entries: dict, message: str) -> None:
    raw = copy.deepcopy(BASE_SPECS[0])
    raw.setdefault(table, {}).update(entries)
    with pytest.raises(SpecError, match="^" + message.replace(".", r"\.")):
        parse_spec(raw)


@pytest.mark.parametrize(("raw", "message"), [
    ({**BASE_SPECS[0], "zoo": "colored_mnist"}, "zoo: must be a table"),
    ({**BASE_SPECS[0], "sweep": [["sigma2", [0.02]]]}, "sweep: must be a table"),
    ({**BASE_SPECS[0], "fixed": {"reg": {"beta": float("nan")}, "regularizer": "end"}},
     "fixed.reg.beta: expected a finite number"),
    ({**BASE_SPECS[0], "sample": {"reg.alpha": {"uniform": [-1e308, 1e308]}},
      "fixed": {"regularizer": "end"}},
     "sample.reg.alpha.uniform: "),
])
def test_spec_table_regressions_found_by_the_properties(raw: dict, message: str) -> None:
    with pytest.raises(SpecError, match="^" + message.replace(".", r"\.")):
        parse_spec(copy.deepcopy(raw))


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


@_settings("checkpoint_content")
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


@_settings("checkpoint_bytes")
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
@_settings("pickle_payload")
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


@_settings("h5_content")
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


@_settings("detector_folder")
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


# ------------------------------------------------------------------------------ CLI arguments

CLI_WORDS = ["zoo", "generate", "info", "verify", "export", "data", "detector", "train", "evaluate", "score",
             "insidebias", "compare", "--out", "--model", "--detector", "--json", "--num-cpus", "--address",
             "--max-models", "--overwrite", "--pool", "--target", "--per-group", "-1", "0", "1e9", "x",
             "nan", "/nonexistent", "", "--", "-h"]


@_settings("cli_args")
@given(args=st.lists(st.sampled_from(CLI_WORDS), min_size=1, max_size=6))
def test_any_command_line_ends_with_an_exit_status_never_a_traceback(
        args: list[str], capsys: pytest.CaptureFixture) -> None:
    """Random command lines (no real input files exist): every one ends with 0 (help), 1 or 2
    and at most one error line; argparse's own errors exit 2 through SystemExit."""
    from detector.cli import main

    if "generate" in args and "/nonexistent" not in args:
        assume(False)  # a real generation run is not what this property is about
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (0, 1, 2), (args, code, err)
    assert "Traceback" not in err, (args, err)
