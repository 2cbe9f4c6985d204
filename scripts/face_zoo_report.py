"""Evidence: do face models favour the group their training set favoured? (GenderWdb check)

Reads a face_gender zoo and, per ``bias_group``, the mean accuracy of its models on each of
DiveFace's three groups (balanced test set). For a model favouring group g the gap is
acc[g] − mean(acc[others]). Groups differ in difficulty, so the same gap is computed for the
balanced models (which favour nobody) and the difference of the two is the skew's effect.
IFBiD's GenderWdb models scored 89.2–89.5% on their own group and 80.0–83.2% on the others.

    python scripts/face_zoo_report.py results/faces.zarr --out results/face_zoo_report

Writes ``face_zoo_report.json``, ``face_zoo_report.md`` and ``face_zoo_report.png`` under
``--out`` and prints the JSON on one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from modelzoo.faces import BIAS_GROUPS, GROUPS
from modelzoo.zoo import Zoo, open_zoo

GENDERWDB = {"favoured": (0.892, 0.895), "others": (0.800, 0.832)}  # IFBiD, DESIGN §2


def gaps(per_group: np.ndarray, group: int) -> np.ndarray:
    """Each model's accuracy on ``group`` minus its mean accuracy on the other groups."""
    others = [g for g in range(per_group.shape[1]) if g != group]
    return per_group[:, group] - per_group[:, others].mean(axis=1)


def mean_se(values: np.ndarray) -> dict[str, float]:
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": round(float(values.mean()), 4), "se": round(float(se), 4), "n": len(values)}


def analyse(store: Zoo) -> dict:
    if store.spec.task != "face_gender":
        raise SystemExit(f"{store.path} is a {store.spec.task} zoo; this report reads face_gender zoos")
    done = store.done
    favoured = store.column("config/bias_group")[done]
    per_group = store.column("metrics/per_group_acc")[done].astype(np.float64)
    overall = store.column("metrics/unbiased_acc")[done].astype(np.float64)
    balanced = per_group[favoured == "balanced"]
    rows = []
    for name in BIAS_GROUPS:
        models = per_group[favoured == name]
        if not len(models):
            continue
        row = {"bias_group": name, "n_models": len(models),
               "overall_acc": mean_se(overall[favoured == name]),
               "acc_per_group": {g: mean_se(models[:, i]) for i, g in enumerate(GROUPS)}}
        if name != "balanced":
            index = GROUPS.index(name)
            own, control = gaps(models, index), gaps(balanced, index) if len(balanced) else np.array([])
            others = np.delete(models, index, axis=1).mean(axis=1)
            row |= {"favoured_acc": mean_se(models[:, index]), "others_acc": mean_se(others),
                    "gap": mean_se(own), "share_of_models_ahead": round(float((own > 0).mean()), 3)}
            if len(control) > 1:
                row["balanced_gap_same_group"] = mean_se(control)
                row["skew_effect"] = round(float(own.mean() - control.mean()), 4)
        rows.append(row)
    biased = [r for r in rows if "gap" in r]
    effects = [r["skew_effect"] for r in biased if "skew_effect" in r]
    spread = balanced.max(axis=1) - balanced.min(axis=1) if len(balanced) else np.array([np.nan])
    return {
        "benchmark": "face_zoo_report", "store": str(store.path), "n_models": int(done.sum()),
        "skew": sorted({float(v) for v in store.column("config/skew")[done]}),
        "genderwdb_reference": GENDERWDB, "rows": rows,
        "mean_gap_biased": round(float(np.mean([r["gap"]["mean"] for r in biased])), 4) if biased else None,
        "mean_skew_effect": round(float(np.mean(effects)), 4) if effects else None,
        "favoured_ahead_in_every_group": bool(effects) and all(e > 0 for e in effects),
        "balanced_group_spread": mean_se(spread),
    }


def plot(result: dict, path: Path) -> None:
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.26
    for i, group in enumerate(GROUPS):
        means = [100 * r["acc_per_group"][group]["mean"] for r in rows]
        errors = [100 * r["acc_per_group"][group]["se"] for r in rows]
        ax.bar(np.arange(len(rows)) + (i - 1) * width, means, width, yerr=errors, capsize=2,
               label=f"tested on {group}")
    low, high = GENDERWDB["favoured"]
    ax.axhspan(100 * low, 100 * high, color="tab:green", alpha=0.25, label="GenderWdb, own group")
    low, high = GENDERWDB["others"]
    ax.axhspan(100 * low, 100 * high, color="tab:red", alpha=0.15, label="GenderWdb, other groups")
    ax.set_xticks(range(len(rows)), [f"favours {r['bias_group']}\n(n={r['n_models']})" for r in rows],
                  fontsize=8)
    ax.set_ylabel("gender accuracy on the balanced test set (%)")
    ax.set_ylim(50, 100)
    ax.set_title(f"Face zoo: accuracy per group by training-set skew (skew {result['skew']})", fontsize=10)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = ["# Face zoo report", "",
             f"Store `{result['store']}`: {result['n_models']} models, skew {result['skew']}.", "",
             "| favours | n | " + " | ".join(f"acc on {g}" for g in GROUPS)
             + " | gap (own − others) | balanced models' gap, same group | skew effect |",
             "|---|---|" + "---|" * (len(GROUPS) + 3)]
    for r in result["rows"]:
        cells = [f"{100 * r['acc_per_group'][g]['mean']:.1f} ± {100 * r['acc_per_group'][g]['se']:.1f}"
                 for g in GROUPS]
        gap = f"{100 * r['gap']['mean']:+.1f} ± {100 * r['gap']['se']:.1f}" if "gap" in r else "–"
        control = (f"{100 * r['balanced_gap_same_group']['mean']:+.1f}"
                   if "balanced_gap_same_group" in r else "–")
        effect = f"{100 * r['skew_effect']:+.1f}" if "skew_effect" in r else "–"
        lines.append(f"| {r['bias_group']} | {r['n_models']} | " + " | ".join(cells)
                     + f" | {gap} | {control} | {effect} |")
    lines += ["", "Accuracies in %, mean ± standard error over models. GenderWdb (IFBiD): 89.2–89.5% on "
              "the favoured group, 80.0–83.2% on the others.", "",
              f"Favoured group ahead of the balanced models' baseline in every group: "
              f"**{result['favoured_ahead_in_every_group']}**; mean skew effect "
              f"{100 * (result['mean_skew_effect'] or 0):+.1f} points.", "",
              "![accuracy per group](face_zoo_report.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results/face_zoo_report"))
    args = parser.parse_args()
    result = analyse(open_zoo(args.store))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "face_zoo_report.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "face_zoo_report.png")
    (args.out / "face_zoo_report.md").write_text(markdown(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
