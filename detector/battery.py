"""Probe batteries: the fixed images a probe detector shows every network it judges.

Part of the detector stage (store → **detector** → report). A weight detector reads
parameters; a probe detector reads *behaviour*, on a battery of images the detector owns,
renders with the project's own dataset code (:func:`modelzoo.datasets.paint`) and stores in its
folder (:meth:`Battery.arrays`, safetensors), so scoring needs nothing from the user but the
checkpoint. A digit battery has two parts:

``conflict``
    ``per_class`` test-set digits of every class (MNIST's test split: disjoint from every
    training pool), each painted in each of the ten class colours of the task. A digit of
    class *s* in the colour of class *c ≠ s* asks the network whether it follows the shape or
    the colour; *c = s* is the aligned case the biased training set is full of.
``sweep``
    A neutral shape (a disc: no digit) painted along straight lines between the colours of
    neighbouring classes (*i* → *i*+1), ``steps`` points each: how sharply the network's answer
    is tuned to colour alone.

Bump :data:`BATTERY_VERSION` whenever what a battery holds changes: detector files record
it, and features of one battery never meet a classifier fitted on another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detector.models import DetectorError

BATTERY_VERSION = 1
DIGIT_TASKS = ("colored_mnist", "biased_mnist")
FACE_TASK = "face_gender"
N_CLASSES = 10
_DISC_RADIUS = 9


@dataclass(frozen=True, eq=False)
class Battery:
    """A probe battery: images and what each one is.

    ``images`` uint8 (N, 3, H, W); ``shape`` the digit class drawn (-1 for the neutral disc);
    ``colour`` the class whose colour it is painted in (-1 on a sweep); ``pair`` (N, 2) the two
    classes a sweep image lies between (-1 elsewhere) and ``t`` its position from the first
    (0) to the second (1).
    """

    task: str
    images: np.ndarray
    shape: np.ndarray
    colour: np.ndarray
    pair: np.ndarray
    t: np.ndarray
    version: int = field(default=BATTERY_VERSION)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_classes(self) -> int:
        """Logits a network must give per image."""
        return N_CLASSES

    @property
    def conflict(self) -> np.ndarray:
        """Indices of the shape × colour grid (digits in every class colour)."""
        return np.flatnonzero(self.shape >= 0)

    @property
    def sweep(self) -> np.ndarray:
        """Indices of the colour sweeps on the neutral shape."""
        return np.flatnonzero(self.pair[:, 0] >= 0)

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts: task, version, sizes (what a detector file records)."""
        return {"task": self.task, "version": self.version, "n_images": len(self),
                "n_conflict": len(self.conflict), "n_sweep": len(self.sweep),
                "image_shape": list(self.images.shape[1:])}

    def arrays(self) -> dict[str, np.ndarray]:
        """Its arrays, by name, for a safetensors file."""
        return {"battery.images": self.images, "battery.shape": self.shape, "battery.colour": self.colour,
                "battery.pair": self.pair, "battery.t": self.t.astype(np.float32)}

    @classmethod
    def from_arrays(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Battery:
        """The battery :meth:`describe` and :meth:`arrays` wrote; another version is refused."""
        if meta.get("version") != BATTERY_VERSION:
            raise DetectorError(f"probe battery v{meta.get('version')}; this weightbias reads "
                                f"v{BATTERY_VERSION}: retrain the detector")
        try:
            return cls(meta["task"], *(np.asarray(arrays[f"battery.{name}"])
                                       for name in ("images", "shape", "colour", "pair", "t")))
        except KeyError as err:
            raise DetectorError(f"probe battery arrays incomplete: {err} missing") from None


def task_colours(task: str) -> np.ndarray:
    """The ten class colours of a digit task, RGB in [0, 1] (10, 3)."""
    from modelzoo.datasets import BAHNG_COLORS, KIM_COLORS

    if task not in DIGIT_TASKS:
        raise DetectorError(f"a digit probe battery needs one of the tasks {DIGIT_TASKS}, got {task!r}")
    return (KIM_COLORS if task == "colored_mnist" else BAHNG_COLORS) / 255.0


def _disc(size: int = 28) -> np.ndarray:
    """A filled disc, grey level 255, the neutral shape of the sweeps (28, 28) uint8."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    return np.where(x * x + y * y <= _DISC_RADIUS**2, 255, 0).astype(np.uint8)


def digit_battery(task: str, test_images: np.ndarray, test_labels: np.ndarray, *, per_class: int = 10,
                  steps: int = 9, seed: int = 0) -> Battery:
    """The battery of a digit task from MNIST's test split (see the module docstring).

    ``per_class`` digits of each class are drawn (seeded) from ``test_images`` (N, 28, 28)
    uint8 with ``test_labels``; the grid holds ``per_class × 10`` digits × 10 colours, the
    sweeps 10 neighbouring pairs × ``steps`` points.
    """
    from modelzoo.datasets import paint

    colours = task_colours(task)
    if per_class < 2 or steps < 3:
        raise DetectorError(f"a probe battery needs per_class >= 2 and steps >= 3, got {per_class}, {steps}")
    rng = np.random.default_rng(seed)
    picks = []
    for digit in range(N_CLASSES):
        candidates = np.flatnonzero(np.asarray(test_labels) == digit)
        if len(candidates) < per_class:
            raise DetectorError(f"the test split has {len(candidates)} digits of class {digit}; the battery "
                                f"needs {per_class}")
        picks.append(np.sort(rng.choice(candidates, per_class, replace=False)))
    chosen = np.concatenate(picks)
    n_digits = len(chosen)
    gray = np.repeat(np.asarray(test_images)[chosen], N_CLASSES, axis=0)
    grid_colour = np.tile(np.arange(N_CLASSES), n_digits)
    grid = paint(task, gray, colours[grid_colour])

    t = np.linspace(0.0, 1.0, steps)
    first = np.repeat(np.arange(N_CLASSES), steps)
    second = (first + 1) % N_CLASSES
    along = np.tile(t, N_CLASSES)
    mixed = (1 - along)[:, None] * colours[first] + along[:, None] * colours[second]
    sweep = paint(task, np.repeat(_disc()[None], len(first), axis=0), mixed)

    n_sweep = len(first)
    return Battery(
        task=task,
        images=np.concatenate([grid, sweep]),
        shape=np.concatenate([np.repeat(np.asarray(test_labels)[chosen], N_CLASSES),
                              np.full(n_sweep, -1)]).astype(np.int64),
        colour=np.concatenate([grid_colour, np.full(n_sweep, -1)]).astype(np.int64),
        pair=np.concatenate([np.full((len(grid), 2), -1), np.stack([first, second], axis=1)]).astype(int),
        t=np.concatenate([np.zeros(len(grid)), along]).astype(np.float32),
    )


def load_battery(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    """The battery (digit or face) a detector file describes with ``meta`` and holds in ``arrays``."""
    if meta.get("kind") == "faces":
        from detector.facebattery import FaceBattery

        return FaceBattery.from_arrays(meta, arrays)
    return Battery.from_arrays(meta, arrays)


def battery_for_zoo(zoo: Any, data_dir: Any = None) -> Any:
    """The probe battery for the models of ``zoo``: the digit battery of its task, or the face
    battery of its face folder, image size and data seed (:mod:`detector.facebattery`)."""
    if zoo.task.name in DIGIT_TASKS:
        return battery_for_task(zoo.task.name, data_dir)
    if zoo.task.name == FACE_TASK:
        from detector.facebattery import face_battery
        from modelzoo.faces import find_face_folder
        from modelzoo.layouts import arch_info

        spec = zoo.spec
        size = arch_info(zoo.arch).input_shape[-1]
        folder = find_face_folder(spec.dataset, data_dir)
        return face_battery(folder, image_size=size, data_seed=spec.data_seed, task=zoo.task.name)
    raise DetectorError(f"no probe battery for the {zoo.task.name!r} task")


def battery_for_task(task: str, data_dir: Any = None, **options: Any) -> Battery:
    """The battery of ``task``, rendered from MNIST found along the usual lookup
    (``data_dir``, ``$WEIGHTBIAS_DATA``, the user cache, a download)."""
    from modelzoo.sources import load_mnist

    if task not in DIGIT_TASKS:
        raise DetectorError(f"battery_for_task renders the digit tasks' batteries {DIGIT_TASKS}; the "
                            f"{task!r} task's battery depends on the zoo's faces: battery_for_zoo(zoo)")
    mnist = load_mnist(data_dir, allow_demo=False)
    return digit_battery(task, mnist.test_images, mnist.test_labels, **options)
