"""Evidence: does a verdict on a checkpoint of an unfamiliar recipe say that it is unfamiliar?

Trains a probe detector for σ² 0.02 vs 0.05 on pool A of the main zoo (``weightbias detector
train``'s path), exports every binary model of the other-recipe zoo as a checkpoint file and
scores it as a user's file is scored, then counts right and wrong verdicts inside and outside
the detector's experience (``ood.in_distribution``) and the ensemble members' agreement, over
all models and over those that learned their training task (biased-test accuracy at least
``--learned``): a model that answers its own training distribution at chance carries no bias
a reading of its behaviour or weights could name.

    python scripts/recipe_applicability.py results/levels.zarr results/levels_recipes.zarr \
        --data-dir ../shared/data --out results/recipe_applicability

Writes ``records.json`` (one entry per model) under ``--out`` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from detector.evaluate import labels
from detector.scoring import Scorer
from detector.workflow import train_detector
from modelzoo.checkpoints import model_metadata, model_state_dict, save_checkpoint
from modelzoo.zoo import open_zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path, help="the main zoo (its pool A trains the detector)")
    parser.add_argument("other", type=Path, help="a zoo of the same levels trained by other recipes")
    parser.add_argument("--levels", nargs=2, default=["0.02", "0.05"])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--learned", type=float, default=0.5,
                        help="biased-test accuracy from which a model counts as having learned its task")
    parser.add_argument("--out", type=Path, default=Path("results/recipe_applicability"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    folder = args.out / "detector"
    if not (folder / "detector.json").exists():
        train_detector(args.store, detector="probe", target="bias_level", levels=args.levels, out=folder,
                       data_dir=args.data_dir, progress=True)
    scorer = Scorer(folder)
    zoo = open_zoo(args.other)
    level_of = labels(zoo, "bias_level")
    unbiased, biased = zoo.column("metrics/unbiased_acc"), zoo.column("metrics/biased_acc")
    records = []
    for row in tqdm([r for r in np.flatnonzero(zoo.done) if level_of[r] in args.levels], desc="score"):
        path = args.out / "checkpoints" / f"model{row}.safetensors"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            save_checkpoint(model_state_dict(zoo, int(row)), path, model_metadata(zoo, int(row)))
        verdict = scorer.score(path)
        records.append({"model": int(row), "level": str(level_of[row]), "predicted": verdict["predicted"],
                        "in_distribution": verdict["ood"]["in_distribution"],
                        "agreement": verdict.get("agreement"), "unbiased_acc": float(unbiased[row]),
                        "biased_acc": float(biased[row]),
                        "barely_learned": verdict["ood"].get("task_accuracy", {}).get("barely_learned")})
    (args.out / "records.json").write_text(json.dumps(records, indent=1))
    right = np.array([r["predicted"] == r["level"] for r in records])
    inside = np.array([r["in_distribution"] is not False for r in records])
    agreement = np.array([r["agreement"] for r in records], dtype=float)
    wrong_agreement = round(float(agreement[~right].mean()), 3) if (~right).any() else None
    learned = np.array([r["biased_acc"] >= args.learned for r in records])
    barely = np.array([bool(r["barely_learned"]) for r in records])
    print(json.dumps({"benchmark": "recipe_applicability", "n": len(records), "right": int(right.sum()),
                      "inside": int(inside.sum()), "right_inside": int((right & inside).sum()),
                      "wrong_flagged_outside": int((~right & ~inside).sum()),
                      "agreement_right": round(float(agreement[right].mean()), 3),
                      "agreement_wrong": wrong_agreement, "learned_threshold": args.learned,
                      "learned": int(learned.sum()), "right_learned": int((right & learned).sum()),
                      "wrong_not_learned": int((~right & ~learned).sum()),
                      # the verdict's own reading of the same thing, from the battery alone
                      "verdict_barely_learned": int(barely.sum()),
                      "verdict_barely_learned_and_not_learned": int((barely & ~learned).sum())}))


if __name__ == "__main__":
    main()
