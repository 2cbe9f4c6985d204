"""Evidence: DESIGN §7's detector rows, by model, on splits the detectors never trained on.

Every detector is fitted on one pool of the main zoo and tested on models it never saw:

* four σ² levels and σ² 0.02 vs 0.05 (binary), cross-pool **both ways** (A→B, B→A);
* ``--other-recipe``: a zoo of other optimizers / learning rates / epochs / batch and train
  sizes (binary and four levels), detectors trained on pool A of the main zoo;
* ``--varied-training``: a zoo of yet other recipes (none of the ``--other-recipe`` zoo's)
  added to the training models of the other-recipe rows, as a second pair of rows: does recipe
  variety in training carry over to recipes never seen?
* ``--other-seed``: a zoo with another colour draw of the training images;
* ``--other-width``: a zoo of another width; binary without recalibration, and four levels
  after refitting only the cut points on that zoo's pool-A models (what ``weightbias
  detector recalibrate`` does), tested on its pool-B models (``probe`` only: the other
  detectors have no cut points to refit);
* a per-regularizer breakdown when the main zoo holds several regularizers.

A face zoo (``face_gender``) gets its own rows, cross-pool both ways: which of the three groups
a biased model favours (IFBiD's three-class form), the same with the balanced controls as a
fourth class, and biased vs balanced.

Beside each row: its accuracy with a Wilson and a bootstrap 95% interval (models resampled),
and the behaviour ceiling (:mod:`detector.ceiling`): the same split read by a classifier on
the models' stored accuracies and leakage. Features are computed once per zoo and detector.

    python scripts/detector_table.py results/levels.zarr --other-width results/levels_half.zarr \\
        --other-recipe results/levels_recipes.zarr --other-seed results/levels_seed1.zarr \\
        --detectors probe boosting deepsets --data-dir ../shared/data

Writes ``detector_table.json`` and ``detector_table.md`` under ``--out`` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from tqdm import tqdm

from detector.ceiling import behaviour_matrix
from detector.evaluate import breakdown, labels, rows_at_levels, scores, zoo_features
from detector.models import DETECTORS, for_layout, make_detector
from detector.workflow import probe_context
from modelzoo.zoo import Zoo, open_zoo

TARGETS = {"four levels": 0.90, "binary": 0.95, "binary, other recipe": 0.95, "binary, other width": 0.95,
           "four levels, other width, recalibrated": 0.85, "faces, which of three groups": 0.90}


def pool_rows(zoo: Zoo, pool: str | None, levels: list[str] | None) -> np.ndarray:
    rows = np.flatnonzero(zoo.done)
    if pool is not None:
        rows = rows[zoo.column("config/pool")[rows] == pool]
    return rows_at_levels(zoo, rows, levels)


class Features:
    """Each zoo's features for one detector's feature step, each model's computed once."""

    def __init__(self, step) -> None:
        self.step, self.cache = step, {}

    def of(self, zoo: Zoo, rows: np.ndarray) -> np.ndarray:
        cache = self.cache.setdefault(str(zoo.path), {})
        missing = np.array(sorted(set(rows.tolist()) - set(cache)), dtype=np.int64)
        if len(missing):
            step = self.step if zoo.layout == tuple(self.step.slots()) else \
                clone(self.step).set_params(layout=zoo.layout)
            cache.update(zip(missing.tolist(), zoo_features(zoo, missing, step, progress=True), strict=True))
        return np.stack([cache[int(r)] for r in rows])


def ceiling(parts: list[tuple[Zoo, np.ndarray]], test: Zoo, test_rows: np.ndarray,
            target: str = "bias_level") -> dict:
    """The behaviour classifier on the same split as a detector's row (its training models:
    the rows of each (zoo, rows) pair)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y_train = np.concatenate([labels(zoo, target)[rows] for zoo, rows in parts])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(np.vstack([behaviour_matrix(zoo, rows) for zoo, rows in parts]), y_train)
    y_test = labels(test, target)[test_rows]
    return scores(y_test, model.predict_proba(behaviour_matrix(test, test_rows)), model.classes_).to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--other-width", type=Path, help="a zoo of the same levels at another width")
    parser.add_argument("--other-recipe", type=Path, help="a zoo of the same levels trained by other recipes")
    parser.add_argument("--other-seed", type=Path, help="a zoo of the same levels on another colour draw")
    parser.add_argument("--varied-training", type=Path,
                        help="a zoo of other recipes added to the training models of the other-recipe rows")
    parser.add_argument("--detectors", nargs="+", default=sorted(DETECTORS))
    parser.add_argument("--data-dir", type=Path, help="data root for the probe detector's battery")
    parser.add_argument("--out", type=Path, default=Path("results/detector_table"))
    args = parser.parse_args()

    main_zoo = open_zoo(args.store)
    level_of = labels(main_zoo, "bias_level")
    paths = {"recipe": args.other_recipe, "seed": args.other_seed, "width": args.other_width,
             "varied": args.varied_training}
    others = {name: open_zoo(path) for name, path in paths.items() if path}
    splits = face_splits(main_zoo) if main_zoo.task.name == "face_gender" else level_splits(main_zoo, others)

    rows = []
    for name in tqdm(args.detectors, desc="detectors", unit="detector"):
        template = make_detector(name, main_zoo.layout, **probe_context(name, main_zoo, args.data_dir))
        features = Features(template[0])
        for row, target, levels, train_pool, test_zoo, test_pool, *extra in splits:
            train_rows = pool_rows(main_zoo, train_pool, levels)
            test_rows = pool_rows(test_zoo, test_pool, levels)
            # the main zoo's pool, and any more training models from other zoos of the same layout
            parts = [(main_zoo, train_rows)] + [(zoo, pool_rows(zoo, None, levels)) for zoo in extra]
            X = np.vstack([features.of(zoo, rows) for zoo, rows in parts])
            y = np.concatenate([labels(zoo, target)[rows] for zoo, rows in parts])
            head = reading(template, clone(template[1:]).fit(X, y), test_zoo)
            y_test = labels(test_zoo, target)[test_rows]
            proba = head.predict_proba(features.of(test_zoo, test_rows))
            train = " + ".join([f"main pool {train_pool}", *(Path(str(zoo.path)).name for zoo in extra)])
            record = {"row": row, "detector": name, "train": train,
                      "test": f"{'main' if test_zoo is main_zoo else Path(str(test_zoo.path)).name} "
                              f"pool {test_pool or 'all'}", "n_train": len(y),
                      **scores(y_test, proba, head.classes_).to_dict(),
                      "ceiling": ceiling(parts, test_zoo, test_rows, target)["accuracy"]}
            regularizers = test_zoo.column("config/regularizer")[test_rows].astype(str)
            if len(np.unique(regularizers)) > 1:
                record["per_regularizer"] = breakdown(y_test, proba, head.classes_, regularizers)
            rows.append(record)
        if "width" in others and hasattr(template[-1], "refit_cut_points"):
            rows.append(recalibrated_row(name, template, features, main_zoo, others["width"], level_of))
    result = {"benchmark": "detector_table", "store": str(args.store), "width": main_zoo.width,
              "others": {name: str(zoo.path) for name, zoo in others.items()}, "targets": TARGETS,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detector_table.json").write_text(json.dumps(result, indent=2))
    (args.out / "detector_table.md").write_text(markdown(rows))
    print(json.dumps(result))


CROSS_POOL = (("A", "B"), ("B", "A"))
# row, target, levels, train pool, test zoo, test pool[, zoos of more training models]
Split = tuple


def level_splits(main_zoo: Zoo, others: dict[str, Zoo]) -> list[Split]:
    """The colour-bias rows: four levels and the two extremes, cross-pool and on the other zoos."""
    level_of = labels(main_zoo, "bias_level")
    extremes = [min(set(level_of), key=float), max(set(level_of), key=float)]
    splits: list[Split] = []
    for row, levels in (("four levels", None), ("binary", extremes)):
        splits += [(row, "bias_level", levels, train, main_zoo, test) for train, test in CROSS_POOL]
        for name in ("recipe", "seed"):
            if name in others:
                splits.append((f"{row}, other {name}", "bias_level", levels, "A", others[name], None))
        if "recipe" in others and "varied" in others:
            splits.append((f"{row}, other recipe, varied training", "bias_level", levels, "A",
                           others["recipe"], None, others["varied"]))
    if "width" in others:
        splits.append(("binary, other width", "bias_level", extremes, "A", others["width"], "B"))
    return splits


def face_splits(main_zoo: Zoo) -> list[Split]:
    """The face rows, cross-pool both ways: which group (biased models), the same with the
    balanced controls, and biased vs balanced."""
    rows = [("faces, which of three groups", "bias_level", list(main_zoo.attrs["groups"])),
            ("faces, three groups or balanced", "bias_level", None),
            ("faces, biased vs balanced", "biased", None)]
    return [(row, target, levels, train, main_zoo, test) for row, target, levels in rows
            for train, test in CROSS_POOL]


def reading(template: Pipeline, head: Pipeline, zoo: Zoo) -> Pipeline:
    """``head`` (fitted on the main zoo's features) made to read features of ``zoo``'s layout,
    as :func:`detector.models.for_layout` moves a whole detector (a set head is re-pointed)."""
    if zoo.layout == tuple(template[0].slots()):
        return head
    return for_layout(Pipeline([("features", template[0]), *head.steps]), zoo.layout)[1:]


def recalibrated_row(name: str, template, features: Features, main_zoo: Zoo, other: Zoo,
                     level_of: np.ndarray) -> dict:
    """Four levels at another width: trained on the main zoo's pool A, cut points refitted on the
    other zoo's pool-A models, tested on its pool-B models."""
    train_rows = pool_rows(main_zoo, "A", None)
    head = clone(template[1:]).fit(features.of(main_zoo, train_rows), level_of[train_rows])
    reference, test_rows = pool_rows(other, "A", None), pool_rows(other, "B", None)
    other_levels = labels(other, "bias_level")
    head.steps[-1] = (head.steps[-1][0], head[-1].refit_cut_points(features.of(other, reference),
                                                                   other_levels[reference]))
    proba = head.predict_proba(features.of(other, test_rows))
    return {"row": "four levels, other width, recalibrated", "detector": name, "train": "main pool A",
            "test": f"{Path(str(other.path)).name} pool B", "n_train": len(train_rows),
            "n_reference": len(reference), **scores(other_levels[test_rows], proba, head.classes_).to_dict(),
            "ceiling": ceiling([(other, reference)], other, test_rows)["accuracy"]}


def markdown(rows: list[dict]) -> str:
    lines = ["| row | detector | trained on → tested on | accuracy | Wilson 95% | bootstrap 95% | balanced "
             "accuracy | AUC | behaviour ceiling | target |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wilson, boot = r["accuracy_ci"], r["accuracy_bootstrap_ci"]
        lines.append(f"| {r['row']} | {r['detector']} | {r['train']} ({r['n_train']}) → {r['test']} "
                     f"({r['n_models']}) | {r['accuracy']:.3f} | {wilson[0]:.2f}–{wilson[1]:.2f} | "
                     f"{boot[0]:.2f}–{boot[1]:.2f} | {r['balanced_accuracy']:.3f} | {r['auc']:.3f} | "
                     f"{r['ceiling']:.3f} | "
                     f"{'≥ ' + format(TARGETS[r['row']], '.2f') if r['row'] in TARGETS else '–'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
