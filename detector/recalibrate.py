"""Move a detector to another width or training recipe: refit only its cut points on a few
labelled reference models.

Part of the detector stage (store → **detector** → report); the work behind ``weightbias
detector recalibrate``. A probe detector's features mean the same at every width, and across
widths its *ranking* of models carries over while its thresholds do not (half-width models
answer less sharply). So a detector for width W keeps the directions it learned and refits
only the intercepts of its head (:meth:`detector.ordinal.LogisticHead.refit_cut_points`)
on reference models of width W with known labels, either taken from a zoo the user has at
that width or trained here with the detector's own zoo recipe (its spec, at width W, on a
fresh seed, through :func:`modelzoo.generate`).

The same holds across training recipes: what a model shows of its data's bias depends on how
long and how hard it trained, and across recipes the detector's ranking carries over while its
cut points do not (docs/detectors.md). ``recipe`` (``{"optimizer": "sgd", "epochs": 5, ...}``)
trains the reference models with the user's own recipe instead of the zoo's.

The result is a new detector folder for width-W (or that recipe's) checkpoints: its
applicability reference is the reference models' features (so a checkpoint is judged against
models like it) and ``detector.json`` records the recalibration (width, recipe, reference store
and rows, cut points before and after). Without it, a checkpoint of an unseen width is flagged
outside the detector's experience and gets no calibrated probability, only its percentiles
among the training models.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from detector.applicability import REFERENCE_KIND, Reference
from detector.evaluate import as_zoo, labels, level_label, rows_at_levels, zoo_features
from detector.files import check_detector_folder, load_detector, save_detector
from detector.models import PROBE_KIND, DetectorError, for_layout
from detector.transform import WeightFeatures
from modelzoo.tasks import get_task
from modelzoo.zoo import Zoo

REFERENCE_SEED_OFFSET = 7919  # reference models never repeat a training model's seed
_META_KEYS = ("detector", "target", "split", "train_pool", "levels", "zoo", "heldout", "calibration")


def reference_spec(spec_dict: dict[str, Any], width: float, per_class: int, pool: str,
                   recipe: Mapping[str, Any] | None = None,
                   levels: list[str] | None = None) -> dict[str, Any]:
    """The training zoo's spec moved to ``width``, one pool, ``per_class`` models per cell, and
    trained with ``recipe`` (fixed values of common axes: optimizer, lr, epochs, ...) if given;
    a swept bias level keeps only ``levels`` (as :func:`~detector.evaluate.labels` writes them),
    the ones the detector knows."""
    recipe = dict(recipe or {})
    spec = {table: dict(values) for table, values in spec_dict.items()}
    sweep = {axis: values for axis, values in spec["sweep"].items() if axis != "pool" and axis not in recipe}
    level_axis = get_task(spec["zoo"]["task"]).bias_level
    if levels and level_axis in sweep:
        sweep[level_axis] = [v for v in sweep[level_axis] if level_label(v) in levels]
    cells = int(np.prod([len(values) for values in sweep.values()])) if sweep else 1
    spec["sweep"] = sweep
    if "sample" in spec:
        spec["sample"] = {axis: values for axis, values in spec["sample"].items() if axis not in recipe}
    spec["fixed"] = {**spec["fixed"], **recipe, "pool": pool}
    n_models = per_class * cells
    spec["zoo"] |= {"width": width, "n_models": n_models, "seed": spec["zoo"]["seed"] + REFERENCE_SEED_OFFSET,
                    "models_per_task": min(spec["zoo"].get("models_per_task", 1), n_models)}
    return spec


def train_reference_zoo(training_zoo: Zoo, width: float, per_class: int, out: Path, *,
                        recipe: Mapping[str, Any] | None = None, levels: list[str] | None = None,
                        data_dir: str | Path | None = None,
                        address: str | None = None, num_cpus: int | None = None,
                        progress: bool = False) -> Zoo:
    """Train (or resume) reference models at ``width`` (of the bias ``levels`` only, if given)
    with the training zoo's own recipe, or with ``recipe``'s values in its place."""
    from modelzoo import generate
    from modelzoo.spec import parse_spec
    from modelzoo.zoo import open_zoo

    pools = sorted(set(training_zoo.column("config/pool")[training_zoo.done].tolist()))
    spec = parse_spec(reference_spec(training_zoo.attrs["spec"], width, per_class, pools[0], recipe, levels))
    generate(spec, out, data_dir=data_dir, address=address, num_cpus=num_cpus, progress=progress)
    return open_zoo(out)


def reference_rows(zoo: Zoo, target: str, classes: list[str], levels: list[str] | None, per_class: int,
                   pool: str | None) -> np.ndarray:
    """Up to ``per_class`` done models of each class (lowest rows first), of one pool if given."""
    rows = rows_at_levels(zoo, np.flatnonzero(zoo.done), levels)
    if pool is not None:
        rows = rows[zoo.column("config/pool")[rows] == pool]
    y = labels(zoo, target)[rows]
    chosen = np.concatenate([rows[y == c][:per_class] for c in classes])
    missing = [c for c in classes if not (y == c).any()]
    if missing:
        raise DetectorError(f"{zoo.path}: no finished reference model of class(es) {missing}"
                            f"{f' in pool {pool}' if pool else ''}; the detector knows {classes}")
    return np.sort(chosen)


def recalibrate_detector(detector_dir: str | Path, width: float, out: str | Path, *,
                         zoo: Zoo | str | Path | None = None, pool: str | None = None, per_class: int = 8,
                         recipe: Mapping[str, Any] | None = None, reference_store: str | Path | None = None,
                         data_dir: str | Path | None = None, address: str | None = None,
                         num_cpus: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Write to ``out`` the detector of ``detector_dir`` recalibrated for checkpoints of ``width``
    (and of ``recipe``, when the user's training differs from the zoo's).

    Reference models come from ``zoo`` (a store at that width; ``pool`` limits them to one
    pool) or, without it, are trained into ``reference_store`` (default: ``OUT.reference.zarr``
    beside ``out``) from the detector's own training zoo, which must still be readable there,
    with ``recipe``'s values (e.g. ``{"optimizer": "sgd", "epochs": 5}``) in place of its own.
    Returns the ``recalibration`` entry written into ``detector.json``.
    """
    if recipe and zoo is not None:
        raise DetectorError("give either --zoo (reference models you trained) or --recipe (reference models "
                            "trained here with your recipe), not both")
    out = check_detector_folder(out)
    pipeline, meta = load_detector(detector_dir)
    if not hasattr(pipeline[-1], "refit_cut_points"):
        raise DetectorError(f"the {meta.get('detector')} detector has no cut points to refit; recalibrate a "
                            "probe detector (weightbias detector train --detector probe)")
    classes = [str(c) for c in pipeline.classes_]
    if zoo is None:
        trained_on = Path((meta.get("zoo") or {}).get("path", ""))
        if not (trained_on / "zarr.json").is_file():
            raise DetectorError(f"the detector's training zoo {str(trained_on)!r} is not readable here; pass "
                                "--zoo STORE with labelled models of the new width")
        store = Path(reference_store) if reference_store else out.with_name(out.name + ".reference.zarr")
        zoo = train_reference_zoo(as_zoo(trained_on), width, per_class, store, recipe=recipe,
                                  levels=meta.get("levels"), data_dir=data_dir, address=address,
                                  num_cpus=num_cpus, progress=progress)
    zoo = as_zoo(zoo)
    if abs(zoo.width - width) > 1e-9 or zoo.arch != meta["zoo"]["arch"]:
        raise DetectorError(f"{zoo.path} holds {zoo.arch} models of width {zoo.width:g}; recalibrating "
                            f"{meta['zoo']['arch']} for width {width:g} needs those")
    rows = reference_rows(zoo, meta["target"], classes, meta.get("levels"), per_class, pool)
    moved = for_layout(pipeline, zoo.layout)
    features = zoo_features(zoo, rows, moved[0], progress)
    inputs = moved[1:-1].transform(features) if len(moved) > 2 else features
    y = labels(zoo, meta["target"])[rows]
    before = moved[-1]
    after = before.refit_cut_points(inputs, y)
    moved.steps[-1] = (moved.steps[-1][0], after)
    entry = {"width": width, "from_width": meta["zoo"]["width"], "recipe": dict(recipe or {}),
             "reference_store": str(zoo.path),
             "reference_rows": rows.tolist(), "n_reference": len(rows), "pool": pool,
             "cut_points_before": np.round(before.intercept_, 4).tolist(),
             "cut_points_after": np.round(after.intercept_, 4).tolist(),
             "reference_accuracy": round(float(np.mean(moved[1:].predict(features) == y)), 4)}
    info = {key: meta[key] for key in _META_KEYS if key in meta}
    info["zoo"] = {**info["zoo"], "width": width}
    info["recalibration"] = entry
    step = moved[0]
    if not step.kind.startswith(PROBE_KIND):  # a probe detector is judged in its own feature space
        step = WeightFeatures(REFERENCE_KIND, zoo.layout)
        features = zoo_features(zoo, rows, step)
    reference = Reference(features, y.astype(str), rows, tuple(step.get_feature_names_out()), zoo.arch,
                          float(width), step.kind)
    save_detector(moved, out, info, reference=reference)
    return entry
