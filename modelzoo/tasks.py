"""Tasks: what each kind of zoo trains on, in one registry.

A :class:`Task` owns everything that differs between ColoredMNIST, Biased-MNIST and face
gender zoos: its own config axes (the first is its bias level), which architectures fit it,
its training pools, its sensitive groups and their names, what its metrics mean, which
datasets a model needs and how they are loaded, and which models count as "biased". Adding a
task is one :func:`register_task` call; nothing else branches on a task's name.

This module imports no torch and no h5py: the spec parser and the store reader use it. The
data loading it names happens in :mod:`modelzoo.datasets` and :mod:`modelzoo.faces`, imported
only when a task actually loads data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelzoo.errors import WeightbiasError

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from modelzoo.config import ModelConfig
    from modelzoo.datasets import ImageSet

# (split, bias level or favoured face group, pool): one rendered dataset, shared by models.
DataKey = tuple[str, float | str, str]
MNIST_POOLS = ("A", "B", "all")
FACE_GROUPS = ("east_asian", "african_indian", "caucasian")  # DiveFace's three
N_COLORS = 10


class TaskError(WeightbiasError, ValueError):
    """An unknown task name."""


@dataclass(frozen=True)
class Axis:
    """One config axis: its type, default (None: a zoo must give it) and allowed values."""

    name: str
    kind: type
    default: Any = None
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = True
    open_high: bool = True

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (already of the right type), or None."""
        if self.choices is not None and value not in self.choices:
            return f"one of {list(self.choices)}"
        too_low = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.open_high else value > self.high)
        if too_low or too_high:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        return None


@dataclass(frozen=True)
class Task:
    """One kind of zoo. Subclasses say how its data are loaded and subsetted."""

    name: str
    axes: tuple[Axis, ...]
    archs: tuple[str, ...]
    pools: tuple[str, ...]
    groups: tuple[str, ...]
    class_name: str
    group_name: str
    unbiased_set: str
    biased_set: str
    needs_dataset: bool = False

    @property
    def bias_level(self) -> str:
        """Name of the axis that says how biased a model's training set is."""
        return self.axes[0].name

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(axis.name for axis in self.axes)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def data_keys(self, config: ModelConfig) -> dict[str, DataKey]:
        """The datasets one model needs, by role (train, test_biased, test_unbiased, and val
        when it has a validation split: its pool rendered as the unbiased test set is)."""
        level = config.bias_level
        keys = {"train": ("train", level, config.pool), "test_biased": ("test_biased", level, "all"),
                "test_unbiased": ("test_unbiased", level, "all")}
        if config.val_size:
            keys["val"] = ("val", level, config.pool)
        return keys

    def load_datasets(self, keys: set[DataKey], *, data_seed: int, arch: str, dataset: str = "",
                      data_dir: str | Path | None = None) -> tuple[dict[DataKey, ImageSet], str, str]:
        """The datasets named by ``keys``, and the origin and fingerprint of their source data."""
        raise TaskError(f"task {self.name} loads no data")  # every registered task overrides this

    def data_notes(self, *, data_seed: int, arch: str, dataset: str = "",
                   data_dir: str | Path | None = None) -> dict[str, object]:
        """What a person should know of the source data beyond its origin (faces: how many
        images were skipped and why, and the split sizes); empty when there is nothing to say."""
        return {}

    def training_subset(self, train: ImageSet, config: ModelConfig) -> np.ndarray:
        """Indices of the pool a model trains on: all of it, or a seeded random subset; never
        a row of its validation split."""
        # (choice over arange(n) draws exactly what choice over n does, so zoos without a
        # validation split train on the subsets they always did)
        available = np.setdiff1d(np.arange(len(train)), self.validation_subset(train, config))
        if config.train_size > len(available):
            beside = f" left beside its {config.val_size} validation images" if config.val_size else ""
            raise TaskError(f"model {config.index}: train_size {config.train_size} is larger than pool "
                            f"{config.pool}'s {len(available)} images{beside}; lower train_size (0 means "
                            "the whole pool)")
        if config.train_size in (0, len(available)):
            return available
        rng = np.random.default_rng([config.seed, 2])
        return np.sort(rng.choice(available, config.train_size, replace=False))

    def validation_subset(self, train: ImageSet, config: ModelConfig) -> np.ndarray:
        """Rows of the pool held out for validation (seeded; empty without ``val_size``). Their
        images come from the ``val`` dataset, the pool rendered without the training bias."""
        if not config.val_size:
            return np.arange(0)
        if config.val_size >= len(train):
            raise TaskError(f"model {config.index}: val_size {config.val_size} leaves nothing of pool "
                            f"{config.pool}'s {len(train)} images to train on")
        rng = np.random.default_rng([config.seed, 4])
        return np.sort(rng.permutation(len(train))[: config.val_size])

    def biased(self, levels: np.ndarray) -> np.ndarray:
        """True for models whose bias level is in the stronger half of the levels present."""
        values = np.unique(levels)
        half = len(values) // 2
        return np.isin(levels, self._strong(values, half))

    def _strong(self, values: np.ndarray, half: int) -> np.ndarray:
        return values[len(values) - half:]

    def field_descriptions(self) -> dict[str, str]:
        """What each store array means, in words, for this task (kept in the store's attributes)."""
        return {
            "done": "1 once weights, checksum and metrics of the model are written",
            "checksum": "zlib.crc32 of the model's float32 weight row",
            "metrics/unbiased_acc": f"accuracy on {self.unbiased_set}",
            "metrics/biased_acc": self.biased_set,
            "metrics/per_class_acc": f"accuracy per class ({self.class_name}) on {self.unbiased_set}",
            "metrics/per_group_acc": f"accuracy per {self.group_name} (the sensitive group, order in "
                                     f"attrs.groups) on {self.unbiased_set}",
            "metrics/leakage": f"accuracy of a fresh logistic probe predicting the {self.group_name} from "
                               f"the bottleneck features ({self.unbiased_set}, half fit, half scored); "
                               f"chance is about {1 / self.num_groups:.2f}",
            "metrics/train_loss": "mean cross-entropy over the last training epoch",
            "metrics/reg_loss": "mean regularizer term (gamma * R) over the last epoch; 0 for none",
        }


@dataclass(frozen=True)
class MnistTask(Task):
    """A colour-on-MNIST task: datasets rendered from MNIST by :mod:`modelzoo.datasets`."""

    strong_is_low: bool = False

    def load_datasets(self, keys: set[DataKey], *, data_seed: int, arch: str, dataset: str = "",
                      data_dir: str | Path | None = None) -> tuple[dict[DataKey, ImageSet], str, str]:
        from modelzoo.datasets import load_imageset
        from modelzoo.sources import load_mnist

        mnist = load_mnist(data_dir)
        datasets = {key: load_imageset(mnist, self.name, *key, seed=data_seed) for key in keys}
        return datasets, mnist.origin, mnist.fingerprint

    def _strong(self, values: np.ndarray, half: int) -> np.ndarray:
        return values[:half] if self.strong_is_low else values[len(values) - half:]


@dataclass(frozen=True)
class FaceTask(Task):
    """Face gender with a training set skewed toward one ethnic group (:mod:`modelzoo.faces`)."""

    def data_keys(self, config: ModelConfig) -> dict[str, DataKey]:
        # One balanced test set for every model; its biased test set is the favoured group's part.
        # Validation faces are pool faces the model does not train on, so val is the pool itself.
        keys = {"train": ("train", "", config.pool),
                "test_biased": ("test_biased", config.bias_level, "all"),
                "test_unbiased": ("test_unbiased", "", "all")}
        if config.val_size:
            keys["val"] = keys["train"]
        return keys

    def load_datasets(self, keys: set[DataKey], *, data_seed: int, arch: str, dataset: str = "",
                      data_dir: str | Path | None = None) -> tuple[dict[DataKey, ImageSet], str, str]:
        from modelzoo.datasets import ImageSet
        from modelzoo.faces import find_face_folder, load_face_data
        from modelzoo.layouts import arch_info

        folder = find_face_folder(dataset, data_dir)
        faces = load_face_data(folder, image_size=arch_info(arch).input_shape[-1], seed=data_seed)
        datasets = {}
        for key in keys:
            split, favoured, pool = key
            if split == "train":
                datasets[key] = faces.pool(pool)
            elif split == "test_biased" and favoured != "balanced":
                test, keep = faces.test, faces.test.bias == self.groups.index(favoured)
                datasets[key] = ImageSet(test.images[keep], test.labels[keep], test.bias[keep])
            else:
                datasets[key] = faces.test
        return datasets, str(folder.resolve()), faces.fingerprint

    def data_notes(self, *, data_seed: int, arch: str, dataset: str = "",
                   data_dir: str | Path | None = None) -> dict[str, object]:
        from modelzoo.faces import find_face_folder, load_face_data
        from modelzoo.layouts import arch_info

        size = arch_info(arch).input_shape[-1]
        faces = load_face_data(find_face_folder(dataset, data_dir), image_size=size, seed=data_seed)  # cached
        return {"skipped": dict(faces.skipped), "test_size": len(faces.test),
                "pool_sizes": {"A": len(faces.pool("A")), "B": len(faces.pool("B"))}}

    def training_subset(self, train: ImageSet, config: ModelConfig) -> np.ndarray:
        """The group mix of :func:`~modelzoo.faces.skewed_subset`; ``train_size`` 0 means the
        largest size every bias group can have at this skew."""
        from modelzoo.faces import largest_skewed_size, skewed_subset

        skew = config.task_axes["skew"]
        size = config.train_size or largest_skewed_size(train.bias, skew)
        return skewed_subset(train.bias, config.bias_level, skew, size, config.seed)

    def validation_subset(self, train: ImageSet, config: ModelConfig) -> np.ndarray:
        """``val_size`` pool faces outside the model's training set, balanced over gender ×
        group as the test set is (seeded); a cell the pool cannot fill is an error naming it."""
        if not config.val_size:
            return np.arange(0)
        free = np.setdiff1d(np.arange(len(train)), self.training_subset(train, config))
        cells = [(group, label) for group in range(self.num_groups) for label in (0, 1)]
        per_cell = max(1, config.val_size // len(cells))
        rng = np.random.default_rng([config.seed, 4])
        chosen = []
        for group, label in cells:
            rows = free[(train.bias[free] == group) & (train.labels[free] == label)]
            if len(rows) < per_cell:
                raise TaskError(f"model {config.index}: val_size {config.val_size} needs {per_cell} "
                                f"{self.groups[group]} faces of gender {label} outside its training set; "
                                f"pool {config.pool} has {len(rows)}; lower val_size or train_size")
            chosen.append(rng.choice(rows, per_cell, replace=False))
        return np.sort(np.concatenate(chosen))

    def biased(self, levels: np.ndarray) -> np.ndarray:
        return np.asarray(levels) != "balanced"


_COLOUR_GROUPS = tuple(f"colour {i}" for i in range(N_COLORS))
_MNIST_COMMON = dict(archs=("digit-cnn",), pools=MNIST_POOLS, groups=_COLOUR_GROUPS, class_name="digit",
                     group_name="colour", unbiased_set="the unbiased (colour-independent) test set",
                     biased_set="accuracy on a test set coloured like the training set")
TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` known to specs, stores, trainers and detectors."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known: {list(TASKS)}")
    return TASKS[name]


register_task(MnistTask("colored_mnist", (Axis("sigma2", float, low=0, high=1),), strong_is_low=True,
                        **_MNIST_COMMON))
register_task(MnistTask("biased_mnist", (Axis("rho", float, low=0, high=1, open_low=False, open_high=False),),
                        **_MNIST_COMMON))
register_task(FaceTask(
    "face_gender",
    (Axis("bias_group", str, choices=(*FACE_GROUPS, "balanced")),
     Axis("skew", float, 0.8, low=0, high=1, open_high=False)),
    archs=("gender-cnn",), pools=("A", "B"), groups=FACE_GROUPS, class_name="gender",
    group_name="ethnic group (DiveFace's three)", unbiased_set="the test set balanced over gender × group",
    biased_set="accuracy on the favoured group's part of the balanced test set (all of it for a balanced "
               "model)", needs_dataset=True))

