"""Evidence: does InsideBias tell biased face models from balanced ones, at 5 and 50 probes per group?

For every model of a face_gender zoo, InsideBias (Serna et al., ICPR 2020) on ``--per-group``
probe faces per group drawn from the face probe battery (:mod:`detector.facebattery`: the
zoo's balanced test split and under-18 faces, none a training face): min Λ of the deepest
conv layer (the default) is the bias score. For each probe count, over ``--draws`` seeded
draws of the probes, reports the AUC of 1 − min Λ for biased (favouring a group) vs balanced
models (mean and range over draws), the same per favoured group and per conv layer, and how
often the lowest-Λ group is one the model does not favour (chance 2/3).

    python scripts/insidebias_report.py results/faces95.zarr --data-dir ../shared/data --per-group 5 50

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

from detector.activations import insidebias
from detector.battery import battery_for_zoo
from modelzoo.architectures import build_model, unflatten
from modelzoo.faces import BIAS_GROUPS
from modelzoo.zoo import open_zoo


def mean_auc(positive: np.ndarray, min_ratios: list[np.ndarray]) -> float:
    """Mean over probe draws of the AUC of 1 − min Λ, ``positive`` models against the others."""
    return round(float(np.mean([roc_auc_score(positive, 1 - r) for r in min_ratios])), 4)


def group_auc(favoured: np.ndarray, min_ratios: list[np.ndarray], group: str) -> float:
    """:func:`mean_auc` of the models favouring ``group`` against the balanced ones."""
    keep = np.isin(favoured, [group, "balanced"])
    return mean_auc(favoured[keep] == group, [r[keep] for r in min_ratios])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--per-group", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--draws", type=int, default=5, help="seeded draws of the probes per probe count")
    parser.add_argument("--out", type=Path, default=Path("results/insidebias_report"))
    args = parser.parse_args()

    zoo = open_zoo(args.store)
    battery = battery_for_zoo(zoo, args.data_dir)
    model = build_model(zoo.arch, zoo.width).eval()
    rows = np.flatnonzero(zoo.done)
    favoured = zoo.column("config/bias_group")[rows]
    biased = favoured != "balanced"
    probe_sets = {(n, draw): battery.probes(n, seed=draw)
                  for n in args.per_group for draw in range(args.draws)}
    layer_min_ratio: dict[tuple, np.ndarray] = {}  # (n, draw) -> min Λ per (model, conv layer)
    lowest = {key: np.empty(len(rows), dtype=object) for key in probe_sets}
    done = 0
    with tqdm(total=len(rows), desc="InsideBias", unit="model") as bar:
        for _, chunk in zoo.weight_chunks(rows):
            for weights in chunk:
                model.load_state_dict(unflatten(weights, list(zoo.layout)))
                for key, probes in probe_sets.items():
                    result = insidebias(model, probes)
                    lowest[key][done] = result.lowest_group()
                    layer_min_ratio.setdefault(key, np.empty((len(rows), len(result.layers))))[done] = \
                        result.ratio.min(axis=1)
                done += 1
                bar.update()
    report = {"benchmark": "insidebias_report", "store": str(args.store), "n_models": len(rows),
              "n_biased": int(biased.sum()), "layer": result.default_layer, "draws": args.draws,
              "battery": battery.describe(), "chance_lowest_not_favoured": round(2 / 3, 4), "per_group": {}}
    draws = range(args.draws)
    min_ratio = {key: by_layer[:, -1] for key, by_layer in layer_min_ratio.items()}  # the default layer
    for n in args.per_group:
        aucs = [roc_auc_score(biased, 1 - min_ratio[n, d]) for d in draws]
        missed = [float((lowest[n, d][biased] != favoured[biased]).mean()) for d in draws]
        report["per_group"][str(n)] = {
            "auc_biased_vs_balanced": round(float(np.mean(aucs)), 4),
            "auc_range": [round(float(min(aucs)), 4), round(float(max(aucs)), 4)],
            "lowest_group_not_favoured": round(float(np.mean(missed)), 4),
            "auc_by_layer": {layer: mean_auc(biased, [layer_min_ratio[n, d][:, i] for d in draws])
                             for i, layer in enumerate(result.layers)},
            # each favoured group's models against the balanced ones: where the skew shows most
            "auc_by_favoured_group": {g: group_auc(favoured, [min_ratio[n, d] for d in draws], g)
                                      for g in BIAS_GROUPS if g != "balanced" and (favoured == g).any()},
            "mean_min_ratio": {g: round(float(min_ratio[n, 0][favoured == g].mean()), 4)
                               for g in BIAS_GROUPS if (favoured == g).any()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "insidebias_report.json").write_text(json.dumps(report, indent=2))
    groups = [g for g in BIAS_GROUPS if (favoured == g).any()]
    fig, axes = plt.subplots(1, len(args.per_group), figsize=(5 * len(args.per_group), 3.8), squeeze=False)
    for ax, n in zip(axes[0], args.per_group, strict=True):
        ax.boxplot([min_ratio[n, 0][favoured == g] for g in groups], tick_labels=groups)
        ax.set_ylabel(f"min Λ ({report['layer']})")
        ax.set_title(f"{n} probes/group: AUC biased vs balanced "
                     f"{report['per_group'][str(n)]['auc_biased_vs_balanced']:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out / "insidebias_report.png", dpi=120)
    plt.close(fig)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
