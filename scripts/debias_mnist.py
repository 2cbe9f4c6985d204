"""Evidence: fairtrain's regularizers against colour bias, beside the published numbers.

Trains one digit-cnn per (bias level, regularizer) with the product's trainer and reports its
unbiased-test accuracy, its colour leakage (a fresh probe recovering the colour from the
frozen bottleneck) and the regularizer's final term.

* ``--task biased_mnist`` (default levels ρ = 0.99, 0.995): beside DESIGN §2's published
  vanilla / ReBias / RUBi / EnD / BinaryBernoulli accuracies.
* ``--task colored_mnist`` (default σ² = 0.02): beside Kim et al.'s vanilla baseline.

    python scripts/debias_mnist.py --task biased_mnist --data-dir ../shared/data
    python scripts/debias_mnist.py --task colored_mnist --data-dir ../shared/data

Writes ``<task>.json`` (rewritten after every model, so an interrupted run resumes where it
stopped when given the same settings) and ``<task>.png`` under ``--out``, then prints the
JSON on one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from modelzoo.config import ModelConfig
from modelzoo.datasets import SPLITS, load_imageset
from modelzoo.sources import load_mnist
from modelzoo.tasks import get_task
from modelzoo.training import TrainingData, train_model

# Every regularizer that uses the colour labels, then the one that discovers groups itself.
REGULARIZERS = ("none", "ndr", "end", "grad", "lntl", "sensitive_nets", "binary_bernoulli", "binary_mi",
                "group_balanced", "unsupervised")
# γ per regularizer: reversal heads (grad, lntl) diverge at γ = 1 on these tasks.
DEFAULT_GAMMA = {"none": 0.0, "ndr": 1.0, "end": 1.0, "grad": 0.1, "lntl": 0.1, "sensitive_nets": 1.0,
                 "binary_bernoulli": 0.5, "binary_mi": 1.0, "group_balanced": 1.0, "unsupervised": 1.0}
# Colour is equally common overall, so balancing must happen inside each digit class.
OPTIONS = {"group_balanced": {"per_class": True}}
# Unbiased-test accuracy (%) by ρ, DESIGN §2 (Bahng et al. 2020; Tartaglione et al. 2021;
# Cerrato et al. 2023).
PUBLISHED_BIASED_MNIST = {
    0.995: {"vanilla": 72.1, "rebias": 76.0, "rubi": 90.4, "end": 93.9, "binary_bernoulli": 90.64},
    0.990: {"vanilla": 89.1, "rebias": 88.1, "rubi": 93.6, "end": 96.0, "binary_bernoulli": 96.02},
}
PUBLISHED_COLORED_MNIST = {0.02: {"vanilla": 40.55}}  # Kim et al. 2019, DESIGN §2
TASKS = {
    "biased_mnist": {"levels": (0.99, 0.995), "published": PUBLISHED_BIASED_MNIST},
    "colored_mnist": {"levels": (0.02,), "published": PUBLISHED_COLORED_MNIST},
}


def published(task: str, level: float) -> dict[str, float]:
    table = TASKS[task]["published"]
    match = [v for k, v in table.items() if np.isclose(k, level)]
    return match[0] if match else {}


def parse_gammas(pairs: list[str]) -> dict[str, float]:
    gammas = dict(DEFAULT_GAMMA)
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in gammas or not value:
            raise SystemExit(f"--gamma takes NAME=VALUE with NAME among {sorted(gammas)}, got {pair!r}")
        gammas[name] = float(value)
    return gammas


def plot(result: dict, path: Path) -> None:
    levels = result["levels"]
    names = list(result["regularizers"])
    fig, axes = plt.subplots(1, len(levels), figsize=(5.5 * len(levels), 4.2), squeeze=False)
    for ax, level in zip(axes[0], levels, strict=True):
        rows = {r["regularizer"]: r for r in result["rows"] if r["level"] == level}
        ours = [100 * rows[n]["unbiased_acc"] if n in rows else np.nan for n in names]
        ax.bar(range(len(names)), ours, color="tab:blue", label="ours")
        for x, name in enumerate(names):
            paper = published(result["task"], level).get("vanilla" if name == "none" else name)
            if paper is not None:
                ax.plot([x - 0.4, x + 0.4], [paper, paper], color="tab:red", lw=2,
                        label="published" if x == 0 or name != "none" else None)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("unbiased-test accuracy (%)")
        ax.set_title(f"{result['task']}, {result['level_name']} = {level:g}")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="biased_mnist")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results/debias_mnist"))
    parser.add_argument("--levels", type=float, nargs="+", help="ρ or σ² values (default: the task's)")
    parser.add_argument("--regularizers", nargs="+", default=list(REGULARIZERS))
    parser.add_argument("--gamma", nargs="*", default=[], metavar="NAME=VALUE", help="override a γ")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=0, help="training images (0: all 60,000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=10000)
    args = parser.parse_args()

    levels = args.levels or TASKS[args.task]["levels"]
    gammas = parse_gammas(args.gamma)
    settings = {"task": args.task, "epochs": args.epochs, "train_size": args.train_size,
                "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "eval_size": args.eval_size}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{args.task}.json"
    done = []
    if json_path.is_file():
        previous = json.loads(json_path.read_text())
        if previous.get("settings") == settings:
            done = previous["rows"]
    mnist = load_mnist(args.data_dir)
    level_name = get_task(args.task).bias_level  # rho or sigma2
    result = {"benchmark": "debias_mnist", "task": args.task, "level_name": level_name,
              "levels": list(levels), "regularizers": args.regularizers,
              "settings": settings, "data": mnist.origin, "rows": done}
    cells = [(level, name) for level in levels for name in args.regularizers]
    for level, name in tqdm(cells, desc=f"{args.task} models", unit="model"):
        if any(r["level"] == level and r["regularizer"] == name and r["gamma"] == gammas[name] for r in done):
            continue
        data = TrainingData(*(load_imageset(mnist, args.task, split, level, "all") for split in SPLITS))
        config = ModelConfig(index=0, task=args.task, seed=args.seed, task_axes={level_name: level},
                             pool="all", lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                             optimizer="adam", train_size=args.train_size, regularizer=name,
                             gamma=gammas[name], reg_options=OPTIONS.get(name, {}))
        metrics = train_model("digit-cnn", 1.0, config, data, eval_size=args.eval_size).metrics
        paper = published(args.task, level).get("vanilla" if name == "none" else name)
        done.append({"level": level, "regularizer": name, "gamma": gammas[name],
                     "unbiased_acc": round(metrics["unbiased_acc"], 4),
                     "biased_acc": round(metrics["biased_acc"], 4),
                     "color_leakage": round(metrics["leakage"], 4),
                     "reg_loss": round(metrics["reg_loss"], 4),
                     "wall_seconds": round(metrics["wall_seconds"], 1),
                     "published_acc": paper / 100 if paper is not None else None})
        json_path.write_text(json.dumps(result, indent=2))
    rows = [r for r in done if r["level"] in levels and r["regularizer"] in args.regularizers]
    result["rows"] = rows
    for level in levels:
        at_level = [r for r in rows if r["level"] == level]
        vanilla = [r["unbiased_acc"] for r in at_level if r["regularizer"] == "none"]
        debiased = [r for r in at_level if r["regularizer"] != "none"]
        summary = {"level": level, "published": published(args.task, level)}
        if vanilla:
            summary["vanilla_acc"] = vanilla[0]
        if debiased:
            best = max(debiased, key=lambda r: r["unbiased_acc"])
            summary |= {"best_regularizer": best["regularizer"], "best_acc": best["unbiased_acc"]}
        result.setdefault("summary", []).append(summary)
    json_path.write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"{args.task}.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
