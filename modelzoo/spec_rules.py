"""The rules a zoo spec must follow: its keys, axes, samplers and limits, each check naming the key.

Part of reading a spec (:mod:`modelzoo.spec` parses, this module judges). Like the parser it
imports no torch: regularizer names and options are checked through :mod:`fairtrain`, imported
only when a spec names a regularizer.
"""

from __future__ import annotations

import math
from typing import Any

from modelzoo.config import LR_SCHEDULES, RECIPE_DEFAULTS, REG_PREFIX, SELECTIONS
from modelzoo.errors import WeightbiasError
from modelzoo.layouts import ARCH_INFO
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
# Training-recipe axes (weight decay, LR schedule, validation split and selection, warm-up): a store
# column only where a spec gives them, so specs and stores made before them are unchanged.
RECIPE_AXES: dict[str, tuple[type, Any]] = {name: (type(value), value)
                                            for name, value in RECIPE_DEFAULTS.items()}
COMMON_AXES = {**AXES, **RECIPE_AXES}  # every axis that is not a task's own: (type, default)
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


def flat_options(table: str, entries: dict[str, Any]) -> dict[str, Any]:
    """TOML reads ``reg.beta = 0.5`` as ``{"reg": {"beta": 0.5}}``; make it the axis ``reg.beta``."""
    options = entries.pop(REG_PREFIX[:-1], {})
    if not isinstance(options, dict):
        raise SpecError(f"{table}.reg: write regularizer options as reg.<option> = value")
    return entries | {REG_PREFIX + name: value for name, value in options.items()}


def values_given(tables: dict[str, dict[str, Any]], axis: str) -> set:
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


def check_options(tables: dict[str, dict[str, Any]], seen: dict[str, str], named: set[str]) -> None:
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


def build_regularizers(zoo: dict[str, Any], tables: dict[str, dict[str, Any]], seen: dict[str, str],
                        named: set[str]) -> None:
    """Build each named regularizer once per distinct value of each of its options and of γ
    (the others at their defaults) for the zoo's architecture, at its own tap (so a
    ``reg.layer`` the architecture lacks is caught here); a value it refuses is a SpecError
    naming the key."""
    from fairtrain.regularizers import regularizer_for_network, regularizer_options
    from modelzoo.architectures import build_model

    info = ARCH_INFO[zoo["arch"]]
    model = build_model(zoo["arch"], zoo["width"])
    shapes = {"num_groups": get_task(zoo["task"]).num_groups, "num_classes": info.num_classes}
    gammas = values_given(tables, "gamma")
    for name in sorted(named - {"none"}):
        trials = [("gamma", gamma, {}) for gamma in sorted(gammas)]
        for option in sorted(regularizer_options(name)):
            axis = REG_PREFIX + option
            trials += [(axis, value, {option: value}) for value in values_given(tables, axis)]
        for axis, value, options in trials:
            gamma = value if axis == "gamma" else max(gammas)
            try:
                regularizer_for_network(name, gamma, model, info.input_shape, options=options, **shapes)
            except (WeightbiasError, TypeError, ValueError, ArithmeticError) as err:
                where = f"{seen.get(axis, 'fixed')}.{axis}"
                raise SpecError(f"{where}: regularizer {name} refuses {value!r} ({err})") from err


def same_type(where: str, values: list) -> list:
    """One type per axis (it becomes one store column); integers mixed with floats become floats."""
    kinds = {type(v) for v in values}
    if kinds == {int, float}:
        return [float(v) for v in values]
    if len(kinds) > 1:
        raise SpecError(f"{where}: values must share one type, got {values!r}")
    return values


def typed(where: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= INT_LIMIT:
            raise SpecError(f"{where}: {value} is too large")
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SpecError(f"{where}: expected {kind.__name__}, got {value!r}")
    return bounded(where, value)


def bounded(where: str, value: Any) -> Any:
    """Numbers a store column and a JSON attribute can hold: finite floats, int64 integers."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{where}: expected a finite number, got {value!r}")
    if isinstance(value, int) and not -INT_LIMIT <= value < INT_LIMIT:
        raise SpecError(f"{where}: {value} does not fit in 64 bits")
    return value


def check_zoo(zoo: dict[str, Any]) -> None:
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


def checked_value(where: str, axis: str, value: Any, task: Task, regularizers: bool = True) -> Any:
    """``value`` for ``axis``, typed and in range; ``regularizers`` False skips the check of a
    regularizer's name (which needs :mod:`fairtrain`, and so torch)."""
    if axis.startswith(REG_PREFIX):
        if not isinstance(value, bool | int | float | str):
            raise SpecError(f"{where}: a regularizer option takes a number, a string or a boolean, "
                            f"got {value!r}")
        return bounded(where, value)
    own = {a.name: a for a in task.axes}
    if axis in own:
        value = typed(where, value, own[axis].kind)
        problem = own[axis].problem(value)
        if problem:
            raise SpecError(f"{where}: value {value!r} must be {problem}")
        return value
    value = typed(where, value, COMMON_AXES[axis][0])
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
    elif axis == "weight_decay":
        ok, expected = 0 <= value < 1, "in [0, 1)"
    elif axis == "lr_schedule":
        ok, expected = value in LR_SCHEDULES, f"one of {list(LR_SCHEDULES)}"
    elif axis == "lr_step":
        ok, expected = 0 <= value <= LIMITS["epochs"], f"in [0, {LIMITS['epochs']:,}]"
    elif axis == "lr_decay":
        ok, expected = 0 < value <= 1, "in (0, 1]"
    elif axis == "val_size":
        ok, expected = 1 <= value <= MAX_MODELS, (f"in [1, {MAX_MODELS:,}] (leave val_size out for "
                                                  "no validation split)")
    elif axis == "select":
        ok, expected = value in SELECTIONS, f"one of {list(SELECTIONS)}"
    elif axis == "warmup_epochs":
        ok, expected = 0 <= value < LIMITS["epochs"], f"in [0, {LIMITS['epochs']:,}) (and below epochs)"
    elif axis == "warmup_lr":
        ok, expected = 0 <= value < 10, "in [0, 10) (0: the warm-up runs at lr)"
    elif axis == "regularizer" and value != "none" and regularizers:
        from fairtrain.regularizers import RegularizerError, check_regularizer_name

        try:
            check_regularizer_name(value)
        except RegularizerError as err:
            raise SpecError(f"{where}: {err}") from err
    if not ok:
        raise SpecError(f"{where}: value {value!r} must be {expected}")
    return value


def checked_sampler(where: str, axis: str, sampler: Any, task: Task, regularizers: bool = True,
                    ) -> dict[str, list]:
    if not isinstance(sampler, dict) or len(sampler) != 1 or next(iter(sampler)) not in SAMPLERS:
        raise SpecError(f"{where}: must be one of {{{' | '.join(f'{s} = [...]' for s in SAMPLERS)}}}")
    (how, args), = sampler.items()
    if not isinstance(args, list) or not args:
        raise SpecError(f"{where}.{how}: must be a non-empty list")
    if how == "choice":
        values = [checked_value(f"{where}.choice", axis, v, task, regularizers) for v in args]
        return {how: same_type(f"{where}.choice", values)}
    if len(args) != 2:
        raise SpecError(f"{where}.{how}: needs exactly [low, high]")
    own = {a.name: a.kind for a in task.axes}
    kind = (COMMON_AXES[axis][0] if axis in COMMON_AXES else own[axis] if axis in own
            else type(same_type(f"{where}.{how}", args)[0]))
    if kind is not int and kind is not float:
        raise SpecError(f"{where}.{how}: axis {axis} is not numeric; use choice = [...]")
    if how == "int_uniform" and kind is not int:
        raise SpecError(f"{where}.int_uniform: axis {axis} is not an integer axis")
    if how != "int_uniform" and kind is int:  # a float drawn for an integer axis would not fit its column
        raise SpecError(f"{where}.{how}: axis {axis} takes integers; use int_uniform = [low, high]")
    # + 0 turns -0.0 into 0.0: numpy refuses uniform(0.0, -0.0) though the two are equal
    low, high = (checked_value(f"{where}.{how}", axis, v, task, regularizers) + 0 for v in args)
    if low > high or (how == "log_uniform" and low <= 0):
        raise SpecError(f"{where}.{how}: need 0 < low <= high for log_uniform, low <= high otherwise")
    if not math.isfinite(high - low) or (how == "int_uniform" and high >= INT_LIMIT - 1):
        raise SpecError(f"{where}.{how}: the range [{low}, {high}] is too wide to draw from")
    return {how: [low, high]}

