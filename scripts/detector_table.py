"""Evidence: DESIGN §7's detector rows, measured on zoos you generated, in one run.

Rows (every detector by name, all trained on pool-A models and tested on pool-B models):

* σ² 0.02 vs 0.05 (binary), cross-pool;
* the four σ² levels, cross-pool;
* trained on width-1 models, tested on a zoo of another width (binary 0.02 vs 0.05;
  only the width-independent detectors can read it).

    python scripts/detector_table.py results/digits.zarr --other-width results/digits_half.zarr

Beside each cross-pool row stands the zoo's behaviour ceiling (:mod:`detector.ceiling`): a
classifier on the models' stored accuracies and leakage, trained on one pool and scored on the
other, both ways; it bounds what reading behaviour can reach on that zoo recipe. Accuracies
carry their 95% Wilson interval.

Writes ``detector_table.json`` and ``detector_table.md`` under ``--out`` and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from detector.ceiling import behaviour_ceiling
from detector.evaluate import labels, rows_at_levels, scores, split_rows
from detector.models import DETECTORS, make_detector
from detector.workflow import fit_on_zoo, zoo_proba
from modelzoo.zoo import open_zoo

TARGETS = {"binary σ² .02 vs .05, cross-pool": 0.99, "four σ² levels, cross-pool": 0.90,
           "binary, other width": 0.90}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--other-width", type=Path, help="a zoo of the same task at another width")
    parser.add_argument("--detectors", nargs="+", default=sorted(DETECTORS))
    parser.add_argument("--out", type=Path, default=Path("results/detector_table"))
    args = parser.parse_args()

    store = open_zoo(args.store)
    train_rows, test_rows = split_rows(store, "pool")
    level_of = labels(store, "bias_level")
    extremes = [min(set(level_of), key=float), max(set(level_of), key=float)]
    rows = []
    for name in tqdm(args.detectors, desc="detectors", unit="detector"):
        for row_name, levels in (("binary σ² .02 vs .05, cross-pool", extremes),
                                 ("four σ² levels, cross-pool", None)):
            fit_rows = rows_at_levels(store, train_rows, levels)
            held = rows_at_levels(store, test_rows, levels)
            detector = fit_on_zoo(make_detector(name, store.layout), store, fit_rows, level_of[fit_rows])
            proba = zoo_proba(detector, store, held)
            held_scores = scores(level_of[held], proba, detector.classes_).to_dict()
            rows.append({"row": row_name, "detector": name, "n_train": len(fit_rows), **held_scores})
            if levels is not None and args.other_width and DETECTORS[name].width_independent:
                other = open_zoo(args.other_width)  # a width-independent detector reads it as it is
                other_rows = rows_at_levels(other, np.flatnonzero(other.done), levels)
                other_scores = scores(labels(other, "bias_level")[other_rows],
                                      zoo_proba(detector, other, other_rows), detector.classes_).to_dict()
                rows.append({"row": "binary, other width", "detector": name, "n_train": len(fit_rows),
                             "other_width": other.width, **other_scores})
    # Step 0: what the models' stored behaviour alone tells apart across pools (both ways).
    ceilings = {"binary σ² .02 vs .05, cross-pool": behaviour_ceiling(store, levels=extremes),
                "four σ² levels, cross-pool": behaviour_ceiling(store)}
    for row in rows:
        if row["row"] in ceilings:
            row["ceiling_A→B"] = ceilings[row["row"]]["A→B"]["accuracy"]
            row["ceiling_B→A"] = ceilings[row["row"]]["B→A"]["accuracy"]
    result = {"benchmark": "detector_table", "store": str(args.store), "width": store.width,
              "other_width_store": str(args.other_width) if args.other_width else None,
              "targets": TARGETS, "behaviour_ceilings": ceilings, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detector_table.json").write_text(json.dumps(result, indent=2))
    lines = ["| row | detector | train models | held-out models | accuracy (95% CI) | balanced acc | AUC | "
             "behaviour ceiling A→B / B→A | target |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['detector']} | {r['n_train']} | {r['n_models']} | {r['accuracy']:.3f} "
              f"({r['accuracy_ci'][0]:.2f}–{r['accuracy_ci'][1]:.2f}) | {r['balanced_accuracy']:.3f} | "
              f"{r['auc']:.3f} | {_ceiling(r)} | ≥ {TARGETS[r['row']]:.2f} |" for r in rows]
    (args.out / "detector_table.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(result))


def _ceiling(row: dict) -> str:
    if "ceiling_A→B" not in row:
        return "–"
    return f"{row['ceiling_A→B']:.3f} / {row['ceiling_B→A']:.3f}"


if __name__ == "__main__":
    main()
