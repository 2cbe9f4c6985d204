"""Evidence: does InsideBias tell biased face models from balanced ones with 5 probes per group?

For every model of a face_gender zoo, InsideBias (Serna et al., ICPR 2020) on ``--per-group``
probe images per group from the balanced test set: min Λ of the deepest conv layer (the
default) is the bias score. Reports the AUC of 1 − min Λ for biased (favouring a group) vs
balanced models, and how often the lowest-Λ group is one the model does not favour.

    python scripts/insidebias_report.py results/faces.zarr --data-dir ../shared/data

Writes ``insidebias_report.json`` and ``insidebias_report.png`` under ``--out`` and prints
the JSON on one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from detector.activations import insidebias, probe_images
from modelzoo.architectures import build_model, unflatten
from modelzoo.faces import BIAS_GROUPS, GROUPS, find_face_folder, load_face_data
from modelzoo.zoo import open_zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--per-group", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/insidebias_report"))
    args = parser.parse_args()

    store = open_zoo(args.store)
    spec = store.spec
    model = build_model(spec.arch, spec.width)
    faces = load_face_data(find_face_folder(spec.dataset, args.data_dir), image_size=model.input_shape[-1],
                           seed=spec.data_seed)
    probes = probe_images(faces.test, GROUPS, args.per_group, args.seed)
    rows = np.flatnonzero(store.done)
    favoured = store.column("config/bias_group")
    min_ratio, lowest = [], []
    with tqdm(total=len(rows), desc="InsideBias", unit="model") as bar:
        for _, chunk in store.weight_chunks(rows):
            for weights in chunk:
                model.load_state_dict(unflatten(weights, list(store.layout)))
                result = insidebias(model, probes)
                min_ratio.append(result.min_ratio())
                lowest.append(result.lowest_group())
                bar.update()
    min_ratio, lowest, favoured = np.array(min_ratio), np.array(lowest), favoured[rows]
    biased = favoured != "balanced"
    result = {
        "benchmark": "insidebias_report", "store": str(args.store), "n_models": len(rows),
        "per_group": args.per_group, "layer": result.default_layer,
        "auc_biased_vs_balanced": round(float(roc_auc_score(biased, 1 - min_ratio)), 4),
        "lowest_group_not_favoured": round(float((lowest[biased] != favoured[biased]).mean()), 4),
        "chance_lowest_not_favoured": round(2 / 3, 4),
        "mean_min_ratio": {g: round(float(min_ratio[favoured == g].mean()), 4)
                           for g in BIAS_GROUPS if (favoured == g).any()},
        "lowest_group_counts": {g: {str(k): int(v) for k, v in zip(*np.unique(lowest[favoured == g],
                                                                                return_counts=True),
                                                                     strict=True)}
                                for g in BIAS_GROUPS if (favoured == g).any()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "insidebias_report.json").write_text(json.dumps(result, indent=2))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    groups = [g for g in BIAS_GROUPS if (favoured == g).any()]
    ax.boxplot([min_ratio[favoured == g] for g in groups], tick_labels=groups)
    ax.set_ylabel(f"min Λ ({result['layer']}, {args.per_group} probes/group)")
    ax.set_title(f"InsideBias on {len(rows)} face models: AUC biased vs balanced "
                 f"{result['auc_biased_vs_balanced']:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out / "insidebias_report.png", dpi=120)
    plt.close(fig)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
