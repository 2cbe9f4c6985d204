"""Property-based tests (hypothesis) of the user's typed input: zoo specs and command lines.

* Zoo specs: any spec dict, valid or mutated, either parses into a :class:`ZooSpec` whose
  configs are computable, storable and round-trip through ``to_dict``, or is refused with a
  :class:`SpecError` whose message starts with the offending key. Nothing else escapes.
* Command lines: any sequence of the CLI's words ends with an exit status, never a traceback.

Example counts are in ``tests/property_settings.py``; ``pytest --hypothesis-show-statistics``
prints how many each property ran and how long they took.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import assume, event, given, note
from hypothesis import strategies as st

from modelzoo.config import ModelConfig
from modelzoo.spec import AXES, ZOO_KEYS, SpecError, ZooSpec, common_axes, parse_spec
from modelzoo.spec_rules import SAMPLERS
from modelzoo.tasks import TASKS, get_task
from tests.property_settings import property_settings, weird_text

TABLES = ("zoo", "fixed", "sweep", "sample")
# Every axis name a spec may use: the common axes and each task's own.
ALL_AXES = sorted({*AXES, *(axis for task in TASKS.values() for axis in task.axis_names)})


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
@property_settings("spec")
@given(spec_dicts())
def test_spec_parses_or_names_the_offending_key(raw: dict[str, Any]) -> None:
    _check_parse(raw)


@property_settings("spec_values")
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



# ------------------------------------------------------------------------------ CLI arguments

CLI_WORDS = ["zoo", "generate", "info", "verify", "export", "data", "detector", "train", "evaluate", "score",
             "insidebias", "compare", "--out", "--model", "--detector", "--json", "--num-cpus", "--address",
             "--max-models", "--overwrite", "--pool", "--target", "--per-group", "-1", "0", "1e9", "x",
             "nan", "/nonexistent", "", "--", "-h"]


@property_settings("cli_args")
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
