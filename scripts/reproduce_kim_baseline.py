"""Fidelity check: vanilla digit-cnn on ColoredMNIST per σ², beside Kim et al.'s baseline.

Builds a zoo (one or more seeds per σ² ∈ {0.020 … 0.050}, trained on all 60,000 MNIST
training digits), generates it with the product's own Ray generator, and prints one JSON
line with our mean unbiased-test accuracy, Kim's figure (DESIGN §2) and the gap in points.
Re-running resumes the zoo in --out.

    python scripts/reproduce_kim_baseline.py --data-dir ../shared/data --epochs 4 --seeds 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import modelzoo

KIM_BASELINE = {0.020: 0.4055, 0.025: 0.4813, 0.030: 0.5996, 0.035: 0.6626,
                0.040: 0.7333, 0.045: 0.7973, 0.050: 0.8450}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results/kim_baseline.zarr"))
    parser.add_argument("--json-out", type=Path, default=Path("results/kim_baseline.json"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3, help="models per σ²")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    levels = sorted(KIM_BASELINE)
    spec = modelzoo.parse_spec({
        "zoo": {"task": "colored_mnist", "arch": "digit-cnn", "n_models": len(levels) * args.seeds,
                "seed": 2019, "models_per_task": 1},
        "fixed": {"pool": "all", "epochs": args.epochs, "lr": args.lr, "batch_size": 64,
                  "optimizer": "adam", "train_size": 0},
        "sweep": {"sigma2": levels},
    })
    modelzoo.generate(spec, args.out, data_dir=args.data_dir)
    zoo = modelzoo.open_zoo(args.out)
    sigma2, acc = zoo.column("config/sigma2"), zoo.column("metrics/unbiased_acc")
    rows = []
    for level in levels:
        ours = acc[np.isclose(sigma2, level) & zoo.done]
        rows.append({"sigma2": level, "ours": round(float(ours.mean()), 4),
                     "ours_std": round(float(ours.std()), 4), "n_models": int(ours.size),
                     "kim": KIM_BASELINE[level],
                     "gap_points": round(100 * (float(ours.mean()) - KIM_BASELINE[level]), 2)})
    result = {"benchmark": "kim_baseline", "epochs": args.epochs, "lr": args.lr,
              "max_abs_gap_points": max(abs(r["gap_points"]) for r in rows), "rows": rows}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
