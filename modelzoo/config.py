"""Model configs: everything that decides how one zoo model is trained, as a typed value.

Between the spec and the trainer (spec → **config** → trainer). A :class:`ModelConfig` is a
pure function of (spec, model index), built by :meth:`modelzoo.spec.ZooSpec.config`; the
trainer reads its fields and nothing else, so it needs no knowledge of the spec syntax. The
task's own axes (σ², ρ, or favoured group and skew) live in ``task_axes`` and the
regularizer's options in ``reg_options``, so a new task or regularizer adds no field here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modelzoo.tasks import Task, get_task

REG_PREFIX = "reg."  # a store column named reg.<option> holds a regularizer option
LR_SCHEDULES = ("constant", "step", "cosine")
SELECTIONS = ("last", "best_val")


@dataclass(frozen=True)
class ModelConfig:
    """How one model is trained. Fields are the store's ``config/<axis>`` columns."""

    index: int
    task: str
    seed: int
    task_axes: Mapping[str, Any]
    pool: str = "A"
    lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 64
    train_size: int = 0  # 0: the whole pool (faces: the largest size every group mix allows)
    optimizer: str = "adam"
    regularizer: str = "none"
    gamma: float = 1.0
    reg_options: Mapping[str, Any] = field(default_factory=dict)
    # The training recipe beyond the defaults (see RECIPE_DEFAULTS); a spec that sets none of
    # them trains, stores and digests exactly as before they existed.
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | step | cosine, applied per epoch
    lr_step: int = 0  # step: epochs between decays
    lr_decay: float = 0.1  # step: the factor at each decay
    val_size: int = 0  # images of an unbiased validation split carved from the training pool
    select: str = "last"  # last | best_val: keep the last epoch's weights or the best on validation
    # The first warmup_epochs of the epochs train on the task alone, at warmup_lr (0: lr); the
    # regularizer joins after them and the schedule restarts (LNTL unlearns from a pretrained net).
    warmup_epochs: int = 0
    warmup_lr: float = 0.0

    @property
    def task_info(self) -> Task:
        return get_task(self.task)

    @property
    def default_recipe(self) -> bool:
        """True when every recipe field keeps its default (plain constant-rate training)."""
        return all(getattr(self, name) == value for name, value in RECIPE_DEFAULTS.items())

    def lr_factor(self, epoch: int, span: int | None = None) -> float:
        """The schedule's multiplier of the rate during ``epoch`` (0-based) of a phase of
        ``span`` epochs (default: all of them)."""
        if self.lr_schedule == "step" and self.lr_step > 0:
            return self.lr_decay ** (epoch // self.lr_step)
        if self.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * epoch / (span or self.epochs)))
        return 1.0

    def lr_at(self, epoch: int) -> float:
        """The learning rate during ``epoch`` (0-based). Warm-up epochs run at ``warmup_lr``
        (or ``lr``) on their own schedule; from the epoch the regularizer joins, ``lr`` with the
        schedule restarted: a baseline and its debiasing run are two trainings in LNTL's source."""
        if epoch < self.warmup_epochs:
            return (self.warmup_lr or self.lr) * self.lr_factor(epoch, self.warmup_epochs)
        return self.lr * self.lr_factor(epoch - self.warmup_epochs, self.epochs - self.warmup_epochs)

    def regularized(self, epoch: int) -> bool:
        """Whether the regularizer's term counts during ``epoch`` (after the warm-up)."""
        return epoch >= self.warmup_epochs

    @property
    def bias_level(self) -> float | str:
        """This model's value of its task's bias-level axis (σ², ρ or the favoured group)."""
        return self.task_axes[self.task_info.bias_level]

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{axis: value}``: the task's axes, the common ones (recipe fields only where
        they differ from their defaults) and ``reg.<option>``s."""
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("task_axes", "reg_options", "task")
                  and (f.name not in RECIPE_DEFAULTS or getattr(self, f.name) != RECIPE_DEFAULTS[f.name])}
        return {**dict(self.task_axes), **common,
                **{REG_PREFIX + k: v for k, v in sorted(self.reg_options.items())}}

    @classmethod
    def from_dict(cls, task: str, values: Mapping[str, Any]) -> ModelConfig:
        """The inverse of :meth:`to_dict` (unknown keys are refused by the constructor)."""
        own = get_task(task).axis_names
        values = dict(values)
        task_axes = {name: values.pop(name) for name in own if name in values}
        options = {k.removeprefix(REG_PREFIX): values.pop(k)
                   for k in list(values) if k.startswith(REG_PREFIX)}
        return cls(task=task, task_axes=task_axes, reg_options=options, **values)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (``config.replace(epochs=1)``)."""
        return dataclasses.replace(self, **changes)


RECIPE_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                                   if f.name in ("weight_decay", "lr_schedule", "lr_step", "lr_decay",
                                                 "val_size", "select", "warmup_epochs", "warmup_lr")}
