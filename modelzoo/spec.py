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
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelzoo.config import REG_PREFIX, ModelConfig
from modelzoo.spec_rules import (
    AXES,
    COMMON_AXES,
    EXECUTION_KEYS,
    RECIPE_AXES,
    ZOO_KEYS,
    SpecError,
    check_options,
    check_zoo,
    checked_sampler,
    checked_value,
    flat_options,
    same_type,
    typed,
    values_given,
)
from modelzoo.spec_rules import build_regularizers as check_by_building
from modelzoo.tasks import DataKey, Task, get_task

if TYPE_CHECKING:
    from modelzoo.datasets import ImageSet

__all__ = ["AXES", "RECIPE_AXES", "ZOO_KEYS", "SpecError", "ZooSpec", "common_axes", "load_spec",
           "parse_spec"]

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
        return (list(self.task_info.axis_names) + common_axes() + [a for a in RECIPE_AXES if a in given]
                + sorted(a for a in given if a.startswith(REG_PREFIX)))

    def axis_type(self, axis: str) -> type:
        """Python type of an axis's values (a reg.* option takes the type of the values given)."""
        if axis in COMMON_AXES:
            return COMMON_AXES[axis][0]
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
        return [dict(cell) for cell in self._cells]

    @cached_property
    def _cells(self) -> list[dict[str, Any]]:
        names = sorted(self.sweep)
        return [dict(zip(names, cell, strict=True))
                for cell in itertools.product(*(self.sweep[n] for n in names))]

    @cached_property
    def _base(self) -> dict[str, Any]:
        """What every model's config starts from: the axes' defaults, then ``fixed``. Cached, as
        a store builds 20,000 configs at once."""
        defaults = {**{a.name: a.default for a in self.task_info.axes},
                    **{k: v[1] for k, v in COMMON_AXES.items()}}
        return {**{name: defaults[name] for name in self.axes if name in defaults}, **self.fixed}

    def config(self, index: int) -> ModelConfig:
        """The full training config of model ``index`` (a pure function of spec and index)."""
        return ModelConfig.from_dict(self.task, self.config_values(index))

    def config_values(self, index: int) -> dict[str, Any]:
        """Model ``index``'s config as flat ``{axis: value}`` (the store's config columns)."""
        if not 0 <= index < self.n_models:
            raise IndexError(f"model index {index} outside 0..{self.n_models - 1}")
        cells = self._cells
        config = {**self._base, **cells[index % len(cells)]}
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

    def data_keys(self, indices: Iterable[int]) -> set[DataKey]:
        """Every dataset the models ``indices`` train, validate and are tested on."""
        task = self.task_info
        return {key for index in indices for key in task.data_keys(self.config(index)).values()}

    def load_datasets(self, keys: set[DataKey], data_dir: str | Path | None = None,
                      ) -> tuple[dict[DataKey, ImageSet], str, str]:
        """The datasets named by ``keys``, rendered as this zoo renders them (or read from the
        cache), and the origin and fingerprint of the data they came from."""
        return self.task_info.load_datasets(keys, data_seed=self.data_seed, arch=self.arch,
                                            dataset=self.dataset, data_dir=data_dir)


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
    except IsADirectoryError as err:
        raise SpecError(f"{path} is a folder; give the spec's .toml file") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: not a TOML text file ({err})") from err
    except OSError as err:  # a symlink loop, no permission, a device
        raise SpecError(f"{path}: cannot read the spec ({err.strerror or err})") from err
    return parse_spec(raw)


def common_axes() -> list[str]:
    """The axes every task has (everything but the task-specific ones)."""
    return list(AXES)


def parse_spec(raw: dict[str, Any], *, build_regularizers: bool = True) -> ZooSpec:
    """Validate a spec given as nested dicts (the parsed TOML); raise :class:`SpecError`.

    With ``build_regularizers`` (the default), every regularizer the spec names is checked by
    name and option and built once per distinct option value, so a bad option fails now; a
    store re-reading the spec it was created from skips those checks (and so never imports
    torch)."""
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
        zoo[key] = typed(f"zoo.{key}", zoo[key], kind)
    check_zoo(zoo)

    tables = {name: flat_options(name, dict(raw.get(name, {}))) for name in ("fixed", "sweep", "sample")}
    task = get_task(zoo["task"])
    level = task.bias_level
    allowed = [*task.axis_names, *common_axes(), *RECIPE_AXES]
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
        tables["fixed"][axis] = checked_value(f"fixed.{axis}", axis, value, task, build_regularizers)
    for axis, values in tables["sweep"].items():
        where = f"sweep.{axis}"
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}: must be a non-empty list of values")
        tables["sweep"][axis] = same_type(where, [checked_value(where, axis, v, task, build_regularizers)
                                                  for v in values])
    for axis, sampler in tables["sample"].items():
        tables["sample"][axis] = checked_sampler(f"sample.{axis}", axis, sampler, task, build_regularizers)
    named = values_given(tables, "regularizer")
    if build_regularizers:
        check_options(tables, seen, named)
    if named != {"none"} and build_regularizers:  # only then is the regularizer module (and torch) needed
        check_by_building(zoo, tables, seen, named)
    if "best_val" in values_given(tables, "select") and "val_size" not in seen:
        raise SpecError(f"{seen['select']}.select: best_val selects on a validation split; give val_size")
    warmup = values_given(tables, "warmup_epochs")
    if warmup and max(warmup) >= min(values_given(tables, "epochs")):
        raise SpecError(f"{seen['warmup_epochs']}.warmup_epochs: {max(warmup)} warm-up epochs leave no "
                        f"epoch of the {min(values_given(tables, 'epochs'))} for the regularizer; "
                        "warmup_epochs must be below epochs")
    pools = values_given(tables, "pool")
    if not pools <= set(task.pools):
        raise SpecError(f"pool: {task.name} trains on pool {' or '.join(task.pools)}, got {sorted(pools)}")
    return ZooSpec(**zoo, **tables)
