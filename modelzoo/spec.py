"""Zoo specs: what a zoo contains, read from TOML and validated before any work starts.

A spec has four tables::

    [zoo]     task, arch, width, n_models, seed, models_per_task, data_seed, eval_size,
              dataset (face_gender only: the face folder), vectorize (up to this many models
              of a block trained as one batched computation; see modelzoo.vectorized)
    [fixed]   training settings shared by every model (epochs = 2, lr = 1e-3, ...)
    [sweep]   axes crossed into a grid; model i gets grid cell i mod (number of cells)
    [sample]  axes drawn per model: {choice = [...]}, {uniform = [a, b]},
              {log_uniform = [a, b]} or {int_uniform = [a, b]} (inclusive)

A regularizer's own options are axes too, written ``reg.<option>`` in any of the last three
tables (``reg.beta = [0.1, 0.5]`` under ``[sweep]``); each model's regularizer takes the
options it accepts and ignores the rest, and an option no named regularizer accepts is an error.

Every model's full config is a pure function of (spec, model index): :meth:`ZooSpec.config`
returns a typed :class:`~modelzoo.config.ModelConfig`. Each task's own axes come from its
:class:`~modelzoo.tasks.Task`. Errors name the offending key, e.g.
``sweep.sigma2: values must lie in (0, 1)``.

Parsing imports no torch: a spec that names a fairness regularizer has it built once per
distinct option value (which does import torch) so a bad ``reg.*`` option fails here, before
any data are rendered or any Ray task starts.

Example
-------
>>> spec = parse_spec({"zoo": {"task": "colored_mnist", "arch": "digit-cnn", "n_models": 4},
...                    "sweep": {"sigma2": [0.02, 0.05]}})
>>> spec.config(1).bias_level, spec.config(1).epochs
(0.05, 2)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelzoo.config import REG_PREFIX, ModelConfig
from modelzoo.errors import WeightbiasError
from modelzoo.layouts import ARCH_INFO, arch_layout
from modelzoo.tasks import MNIST_POOLS, TASKS, Task, get_task

OPTIMIZERS = ("adam", "sgd")
# Axes every task has: name -> (type, default). A task's own axes come from its Task.
AXES: dict[str, tuple[type, Any]] = {
    "pool": (str, "A"),
    "lr": (float, 1e-3),
    "epochs": (int, 2),
    "batch_size": (int, 64),
    "train_size": (int, 0),  # 0 means the whole pool
    "optimizer": (str, "adam"),
    "seed": (int, None),  # None: derived from (zoo seed, model index)
    "regularizer": (str, "none"),  # a fairtrain regularizer name, or "none"
    "gamma": (float, 1.0),  # strength of the regularizer's term
}
ZOO_KEYS: dict[str, tuple[type, Any]] = {
    "task": (str, None),
    "arch": (str, None),
    "width": (float, 1.0),
    "n_models": (int, None),
    "seed": (int, 0),
    "models_per_task": (int, 4),
    "data_seed": (int, 0),
    "eval_size": (int, 0),  # test images used for metrics; 0 means all
    "dataset": (str, ""),  # face_gender: a folder under <data root>/faces/, or a path
    "vectorize": (int, 1),  # models of a block trained together (modelzoo.vectorized); 1 = one at a time
}
# How models are trained, not which: left out of the digest, so a zoo resumes under another value.
EXECUTION_KEYS = ("vectorize",)
SAMPLERS = ("choice", "uniform", "log_uniform", "int_uniform")
MAX_MODELS = 1_000_000  # creating a store builds every config up front; a typo must not hang it
INT_LIMIT = 2**63  # integers are stored as int64 columns
# Far beyond any real zoo model, yet small enough that a typo (epochs = 1e11) fails at once
# instead of training for centuries.
LIMITS = {"epochs": 100_000, "batch_size": 1_000_000}


class SpecError(WeightbiasError, ValueError):
    """An invalid zoo spec; the message starts with the offending key."""


@dataclass(frozen=True)
class ZooSpec:
    """A validated zoo spec. Build it with :func:`load_spec` or :func:`parse_spec`."""

    task: str
    arch: str
    n_models: int
    width: float = 1.0
    seed: int = 0
    models_per_task: int = 4
    data_seed: int = 0
    eval_size: int = 0
    dataset: str = ""
    vectorize: int = 1
    fixed: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, list] = field(default_factory=dict)
    sample: dict[str, dict[str, list]] = field(default_factory=dict)

    @property
    def task_info(self) -> Task:
        """The :class:`~modelzoo.tasks.Task` this zoo trains on."""
        return get_task(self.task)

    @property
    def bias_level(self) -> str:
        """Name of the bias-level axis of this task (``sigma2``, ``rho`` or ``bias_group``)."""
        return self.task_info.bias_level

    @property
    def num_groups(self) -> int:
        """How many sensitive groups the task has: 10 colours, or 3 DiveFace groups."""
        return self.task_info.num_groups

    @property
    def axes(self) -> list[str]:
        """Config fields every model has, in a stable order: the task's axes, the common ones,
        then reg.* options."""
        given = {*self.fixed, *self.sweep, *self.sample}
        return (list(self.task_info.axis_names) + common_axes()
                + sorted(a for a in given if a.startswith(REG_PREFIX)))

    def axis_type(self, axis: str) -> type:
        """Python type of an axis's values (a reg.* option takes the type of the values given)."""
        if axis in AXES:
            return AXES[axis][0]
        own = {a.name: a for a in self.task_info.axes}
        if axis in own:
            return own[axis].kind
        if axis in self.fixed:
            return type(self.fixed[axis])
        if axis in self.sweep:
            return type(self.sweep[axis][0])
        (_, args), = self.sample[axis].items()
        return type(args[0])

    def to_dict(self) -> dict[str, Any]:
        # Unset dataset and vectorize are left out, so specs keep the digests they had before them.
        zoo = {k: getattr(self, k) for k in ZOO_KEYS
               if (k != "dataset" or self.dataset) and (k != "vectorize" or self.vectorize != 1)}
        return {"zoo": zoo, "fixed": self.fixed, "sweep": self.sweep, "sample": self.sample}

    def digest(self) -> str:
        """Identity of the spec: two stores with the same digest hold the same models."""
        content = self.to_dict()
        content["zoo"] = {k: v for k, v in content["zoo"].items() if k not in EXECUTION_KEYS}
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def grid(self) -> list[dict[str, Any]]:
        names = sorted(self.sweep)
        return [dict(zip(names, cell, strict=True))
                for cell in itertools.product(*(self.sweep[n] for n in names))]

    def config(self, index: int) -> ModelConfig:
        """The full training config of model ``index`` (a pure function of spec and index)."""
        return ModelConfig.from_dict(self.task, self.config_values(index))

    def config_values(self, index: int) -> dict[str, Any]:
        """Model ``index``'s config as flat ``{axis: value}`` (the store's config columns)."""
        if not 0 <= index < self.n_models:
            raise IndexError(f"model index {index} outside 0..{self.n_models - 1}")
        grid = self.grid()
        defaults = {**{a.name: a.default for a in self.task_info.axes}, **{k: v[1] for k, v in AXES.items()}}
        config = {name: defaults[name] for name in self.axes if name in defaults}
        config.update(self.fixed)
        config.update(grid[index % len(grid)])
        rng = np.random.default_rng([self.seed, index, 1])
        for name in sorted(self.sample):
            config[name] = _draw(self.sample[name], rng, self.axis_type(name))
        if config["seed"] is None:
            config["seed"] = int(np.random.default_rng([self.seed, index, 0]).integers(2**31 - 1))
        return {"index": index, **config}

    def config_columns(self) -> dict[str, np.ndarray]:
        """Every model's config as one typed column per axis: what a store's ``config/`` holds."""
        configs = [self.config_values(i) for i in range(self.n_models)]
        return {axis: np.array([c[axis] for c in configs], dtype=self.column_dtype(axis))
                for axis in self.axes}

    def column_dtype(self, axis: str) -> type:
        # Strings are stored variable-length (zarr's spec'd string type), never fixed-width.
        return {float: np.float64, int: np.int64, bool: np.bool_, str: str}[self.axis_type(axis)]

    def blocks(self) -> list[range]:
        """Model indices grouped by store chunk; one Ray task writes one block at a time."""
        size = self.models_per_task
        return [range(s, min(s + size, self.n_models)) for s in range(0, self.n_models, size)]


def _draw(sampler: dict[str, list], rng: np.random.Generator, kind: type) -> Any:
    (how, args), = sampler.items()
    if how == "choice":
        return args[int(rng.integers(len(args)))]
    low, high = args
    if how == "uniform":
        return float(rng.uniform(low, high))
    if how == "log_uniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    value = int(rng.integers(int(low), int(high) + 1))
    return kind(value)


def load_spec(path: str | Path) -> ZooSpec:
    """Read and validate a TOML spec file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError as err:
        raise SpecError(f"spec file {path} does not exist") from err
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path}: not valid TOML ({err})") from err
    return parse_spec(raw)


def common_axes() -> list[str]:
    """The axes every task has (everything but the task-specific ones)."""
    return list(AXES)


def parse_spec(raw: dict[str, Any], *, build_regularizers: bool = True) -> ZooSpec:
    """Validate a spec given as nested dicts (the parsed TOML); raise :class:`SpecError`.

    With ``build_regularizers`` (the default), every regularizer the spec names is built once
    per distinct option value, so a bad option fails now; a store re-reading the spec it was
    created from skips that (and so never imports torch)."""
    unknown = set(raw) - {"zoo", "fixed", "sweep", "sample"}
    if unknown:
        raise SpecError(f"{sorted(unknown)[0]}: unknown table; expected zoo, fixed, sweep, sample")
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise SpecError(f"{name}: must be a table of key = value lines, got {table!r}")
    zoo = dict(raw.get("zoo", {}))
    for key in zoo:
        if key not in ZOO_KEYS:
            raise SpecError(f"zoo.{key}: unknown key; known: {', '.join(ZOO_KEYS)}")
    for key, (kind, default) in ZOO_KEYS.items():
        if key not in zoo:
            if default is None:
                raise SpecError(f"zoo.{key}: required")
            zoo[key] = default
        zoo[key] = _typed(f"zoo.{key}", zoo[key], kind)
    _check_zoo(zoo)

    tables = {name: _flat_options(name, dict(raw.get(name, {}))) for name in ("fixed", "sweep", "sample")}
    task = get_task(zoo["task"])
    level = task.bias_level
    allowed = [*task.axis_names, *common_axes()]
    seen: dict[str, str] = {}
    for table, entries in tables.items():
        for axis in entries:
            where = f"{table}.{axis}"
            if axis.startswith(REG_PREFIX):
                pass  # checked below, once every regularizer the spec names is known
            elif axis not in allowed:
                raise SpecError(f"{where}: unknown axis for task {zoo['task']}; known: {allowed}")
            if axis in seen:
                raise SpecError(f"{where}: also given in {seen[axis]}.{axis}; give each axis once")
            seen[axis] = table
    if level not in seen:
        raise SpecError(f"{level}: task {zoo['task']} needs its bias level in fixed, sweep or sample")

    for axis, value in tables["fixed"].items():
        tables["fixed"][axis] = _checked_value(f"fixed.{axis}", axis, value, task)
    for axis, values in tables["sweep"].items():
        where = f"sweep.{axis}"
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}: must be a non-empty list of values")
        tables["sweep"][axis] = _same_type(where, [_checked_value(where, axis, v, task) for v in values])
    for axis, sampler in tables["sample"].items():
        tables["sample"][axis] = _checked_sampler(f"sample.{axis}", axis, sampler, task)
    named = _values_given(tables, "regularizer")
    _check_options(tables, seen, named)
    if named != {"none"} and build_regularizers:  # only then is the regularizer module (and torch) needed
        _build_regularizers(zoo, tables, seen, named)
    pools = _values_given(tables, "pool")
    if not pools <= set(task.pools):
        raise SpecError(f"pool: {task.name} trains on pool {' or '.join(task.pools)}, got {sorted(pools)}")
    return ZooSpec(**zoo, **tables)


def _flat_options(table: str, entries: dict[str, Any]) -> dict[str, Any]:
    """TOML reads ``reg.beta = 0.5`` as ``{"reg": {"beta": 0.5}}``; make it the axis ``reg.beta``."""
    options = entries.pop(REG_PREFIX[:-1], {})
    if not isinstance(options, dict):
        raise SpecError(f"{table}.reg: write regularizer options as reg.<option> = value")
    return entries | {REG_PREFIX + name: value for name, value in options.items()}


def _values_given(tables: dict[str, dict[str, Any]], axis: str) -> set:
    """Every value an axis can take in this spec (its default when no table gives it); for a
    numeric sampler, both ends of its range."""
    if axis in tables["fixed"]:
        return {tables["fixed"][axis]}
    if axis in tables["sweep"]:
        return set(tables["sweep"][axis])
    if axis in tables["sample"]:
        (_, args), = tables["sample"][axis].items()
        return set(args)
    return {AXES[axis][1]} if axis in AXES else set()


def _check_options(tables: dict[str, dict[str, Any]], seen: dict[str, str], named: set[str]) -> None:
    """Every reg.* option must be taken by at least one regularizer the spec names."""
    if named == {"none"}:
        accepted: set[str] = set()  # "none" takes no option, and needs no torch to say so
    else:
        from fairtrain.regularizers import regularizer_options

        accepted = set().union(*(regularizer_options(name) for name in named))
    for axis, table in seen.items():
        option = axis.removeprefix(REG_PREFIX)
        if axis.startswith(REG_PREFIX) and option not in accepted:
            raise SpecError(f"{table}.{axis}: no regularizer in this spec ({', '.join(sorted(named))}) "
                            f"takes option {option!r}; they take {sorted(accepted) or 'none'}")


def _build_regularizers(zoo: dict[str, Any], tables: dict[str, dict[str, Any]], seen: dict[str, str],
                        named: set[str]) -> None:
    """Build each named regularizer once per distinct value of each of its options and of γ
    (the others at their defaults), at the zoo's model shapes; a value it refuses is a
    SpecError naming the key."""
    from fairtrain.regularizers import regularizer_for_model, regularizer_options

    info = ARCH_INFO[zoo["arch"]]
    slots = {s.name: s for s in arch_layout(zoo["arch"], zoo["width"])}
    shapes = {"feature_dim": slots[f"{info.bottleneck}.weight"].shape[0],
              "num_groups": get_task(zoo["task"]).num_groups, "num_classes": info.num_classes}
    gammas = _values_given(tables, "gamma")
    for name in sorted(named - {"none"}):
        trials = [("gamma", gamma, {}) for gamma in sorted(gammas)]
        for option in sorted(regularizer_options(name)):
            axis = REG_PREFIX + option
            trials += [(axis, value, {option: value}) for value in _values_given(tables, axis)]
        for axis, value, options in trials:
            gamma = value if axis == "gamma" else max(gammas)
            try:
                regularizer_for_model(name, gamma, options=options, **shapes)
            except (WeightbiasError, TypeError, ValueError, ArithmeticError) as err:
                where = f"{seen.get(axis, 'fixed')}.{axis}"
                raise SpecError(f"{where}: regularizer {name} refuses {value!r} ({err})") from err


def _same_type(where: str, values: list) -> list:
    """One type per axis (it becomes one store column); integers mixed with floats become floats."""
    kinds = {type(v) for v in values}
    if kinds == {int, float}:
        return [float(v) for v in values]
    if len(kinds) > 1:
        raise SpecError(f"{where}: values must share one type, got {values!r}")
    return values


def _typed(where: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= INT_LIMIT:
            raise SpecError(f"{where}: {value} is too large")
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SpecError(f"{where}: expected {kind.__name__}, got {value!r}")
    return _bounded(where, value)


def _bounded(where: str, value: Any) -> Any:
    """Numbers a store column and a JSON attribute can hold: finite floats, int64 integers."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{where}: expected a finite number, got {value!r}")
    if isinstance(value, int) and not -INT_LIMIT <= value < INT_LIMIT:
        raise SpecError(f"{where}: {value} does not fit in 64 bits")
    return value


def _check_zoo(zoo: dict[str, Any]) -> None:
    if zoo["task"] not in TASKS:
        raise SpecError(f"zoo.task: unknown task {zoo['task']!r}; known: {list(TASKS)}")
    if zoo["arch"] not in ARCH_INFO:
        raise SpecError(f"zoo.arch: unknown architecture {zoo['arch']!r}; known: {sorted(ARCH_INFO)}")
    task = get_task(zoo["task"])
    if zoo["arch"] not in task.archs:
        raise SpecError(f"zoo.arch: {zoo['arch']} does not fit task {zoo['task']}; "
                        f"use one of {list(task.archs)}")
    if task.needs_dataset and not zoo["dataset"]:
        raise SpecError(f"zoo.dataset: task {task.name} needs a face folder (a name under "
                        "<data root>/faces/ or a path)")
    if not 0 < zoo["width"] <= 8:
        raise SpecError(f"zoo.width: must lie in (0, 8], got {zoo['width']}")
    for key in ("n_models", "models_per_task", "vectorize"):
        if zoo[key] < 1:
            raise SpecError(f"zoo.{key}: must be at least 1, got {zoo[key]}")
    if zoo["n_models"] > MAX_MODELS:
        raise SpecError(f"zoo.n_models: at most {MAX_MODELS:,} models in one zoo, got {zoo['n_models']:,}; "
                        "split a larger zoo into several stores")
    for key in ("seed", "data_seed", "eval_size"):
        if zoo[key] < 0:
            raise SpecError(f"zoo.{key}: must be non-negative, got {zoo[key]}")


def _checked_value(where: str, axis: str, value: Any, task: Task) -> Any:
    if axis.startswith(REG_PREFIX):
        if not isinstance(value, bool | int | float | str):
            raise SpecError(f"{where}: a regularizer option takes a number, a string or a boolean, "
                            f"got {value!r}")
        return _bounded(where, value)
    own = {a.name: a for a in task.axes}
    if axis in own:
        value = _typed(where, value, own[axis].kind)
        problem = own[axis].problem(value)
        if problem:
            raise SpecError(f"{where}: value {value!r} must be {problem}")
        return value
    value = _typed(where, value, AXES[axis][0])
    ok, expected = True, ""
    if axis == "pool":
        ok, expected = value in MNIST_POOLS, f"one of {list(MNIST_POOLS)}"
    elif axis == "optimizer":
        ok, expected = value in OPTIMIZERS, f"one of {list(OPTIMIZERS)}"
    elif axis == "lr":
        ok, expected = 0 < value < 10, "in (0, 10)"
    elif axis in ("epochs", "batch_size"):
        ok, expected = 1 <= value <= LIMITS[axis], f"in [1, {LIMITS[axis]:,}]"
    elif axis in ("train_size", "seed", "gamma"):
        ok, expected = value >= 0, "non-negative"
    elif axis == "regularizer" and value != "none":
        from fairtrain.regularizers import RegularizerError, check_regularizer_name

        try:
            check_regularizer_name(value)
        except RegularizerError as err:
            raise SpecError(f"{where}: {err}") from err
    if not ok:
        raise SpecError(f"{where}: value {value!r} must be {expected}")
    return value


def _checked_sampler(where: str, axis: str, sampler: Any, task: Task) -> dict[str, list]:
    if not isinstance(sampler, dict) or len(sampler) != 1 or next(iter(sampler)) not in SAMPLERS:
        raise SpecError(f"{where}: must be one of {{{' | '.join(f'{s} = [...]' for s in SAMPLERS)}}}")
    (how, args), = sampler.items()
    if not isinstance(args, list) or not args:
        raise SpecError(f"{where}.{how}: must be a non-empty list")
    if how == "choice":
        values = [_checked_value(f"{where}.choice", axis, v, task) for v in args]
        return {how: _same_type(f"{where}.choice", values)}
    if len(args) != 2:
        raise SpecError(f"{where}.{how}: needs exactly [low, high]")
    own = {a.name: a.kind for a in task.axes}
    kind = (AXES[axis][0] if axis in AXES else own[axis] if axis in own
            else type(_same_type(f"{where}.{how}", args)[0]))
    if kind is not int and kind is not float:
        raise SpecError(f"{where}.{how}: axis {axis} is not numeric; use choice = [...]")
    if how == "int_uniform" and kind is not int:
        raise SpecError(f"{where}.int_uniform: axis {axis} is not an integer axis")
    if how != "int_uniform" and kind is int:  # a float drawn for an integer axis would not fit its column
        raise SpecError(f"{where}.{how}: axis {axis} takes integers; use int_uniform = [low, high]")
    low, high = (_checked_value(f"{where}.{how}", axis, v, task) for v in args)
    if low > high or (how == "log_uniform" and low <= 0):
        raise SpecError(f"{where}.{how}: need 0 < low <= high for log_uniform, low <= high otherwise")
    if not math.isfinite(high - low) or (how == "int_uniform" and high >= INT_LIMIT - 1):
        raise SpecError(f"{where}.{how}: the range [{low}, {high}] is too wide to draw from")
    return {how: [low, high]}
