"""Evidence: fairtrain's regularizers against colour bias, beside the published numbers.

Trains one digit-cnn (or a source's own network: ``--arch lntl-cnn``, Kim et al.'s;
``rebias-cnn`` / ``end-cnn``, ReBias's SimpleConvNet and EnD's variant) per (bias level,
regularizer) with the product's trainer and reports its
unbiased-test accuracy, its colour leakage (a fresh probe recovering the colour from the
frozen bottleneck) and the regularizer's final term.

* ``--task biased_mnist`` (default levels ρ = 0.99, 0.995): beside DESIGN §2's published
  vanilla / ReBias / RUBi / EnD / BinaryBernoulli accuracies.
* ``--task colored_mnist`` (default σ² = 0.02): beside Kim et al.'s vanilla baseline.

    python scripts/debias_mnist.py --task biased_mnist --data-dir ../shared/data
    python scripts/debias_mnist.py --task colored_mnist --data-dir ../shared/data
    python scripts/debias_mnist.py --task biased_mnist --protocol rebias --seeds 3 --data-dir ../shared/data

``--protocol`` takes a source's whole recipe (epochs, optimizer, weight decay, LR schedule,
validation split and best-epoch selection, LNTL's pretraining as a warm-up) as defaults that
flags given override; the run is long (ReBias's 80 epochs), resumes from its JSON, and records
each model's seed, validation accuracy and best epoch.

Each model trains as its own Ray task (an embedded instance using every core, one model per
core by default; ``--address`` joins a cluster, ``--cpus-per-model`` / ``--gpus-per-model``
size the tasks), so a table of levels × seeds trains side by side. ``--in-process`` trains the
cells one after another in this process on ``--device`` instead, without importing Ray: for
one GPU machine, where several such commands (one per cell and ``--out``) share the card
(scripts/debias_gpu.sh). ``<task>.json`` is rewritten as each model ends, so a run started
again with the same settings skips what it holds; each model in training saves its state after
every epoch under ``--out``/state (:mod:`modelzoo.resume`)
and resumes there, so a kill loses at most one epoch. With a warm-up, the row also gives the
accuracy the network had when the warm-up ended (``warmup_unbiased_acc``: LNTL's pretrained
baseline). ``--interim``, the same command while it trains (or after it stopped), trains
nothing: it evaluates each unfinished model at its last saved epoch into ``<task>.interim.json``.
Then ``<task>.png``, and the JSON on one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm import tqdm

from fairtrain.references import PROTOCOLS, published
from modelzoo.architectures import build_model
from modelzoo.atomic import write_text_atomic
from modelzoo.config import ModelConfig
from modelzoo.datasets import SPLITS, ImageSet, grayscale, load_imageset
from modelzoo.resume import WarmupCheckpoint, run_key
from modelzoo.sources import load_mnist
from modelzoo.tasks import get_task
from modelzoo.training import TrainingData, evaluate, predict, saved_model, train_model

# Every regularizer that uses the colour labels, then the one that discovers groups itself.
REGULARIZERS = ("none", "ndr", "end", "grad", "lntl", "sensitive_nets", "binary_bernoulli", "binary_mi",
                "group_balanced", "unsupervised")
# γ per regularizer: LNTL's own weights are its source's (reversal 0.1, entropy 0.01), so γ = 1
# is its objective; GRAD's source weighs its attribute loss 100 (pass --gamma grad=100), 0.1
# here because a linear-head GRAD diverged at γ = 1 on these tasks in short runs.
DEFAULT_GAMMA = {"none": 0.0, "ndr": 1.0, "end": 1.0, "grad": 0.1, "lntl": 1.0, "sensitive_nets": 1.0,
                 "binary_bernoulli": 0.5, "binary_mi": 1.0, "group_balanced": 1.0, "unsupervised": 1.0}
# Colour is equally common overall, so balancing must happen inside each digit class.
OPTIONS = {"group_balanced": {"per_class": True}}
# The settings that are the model's recipe (ModelConfig fields besides the cell's own).
RECIPE_FIELDS = ("lr", "epochs", "batch_size", "train_size", "optimizer", "weight_decay", "lr_schedule",
                 "lr_step", "lr_decay", "val_size", "select", "warmup_epochs", "warmup_lr")
POLL_SECONDS = 30  # how often the epoch bar reads the running models' states
# The 28×28 colour networks with ten classes.
ARCHS = ("digit-cnn", "lntl-cnn", "rebias-cnn", "end-cnn")
DEFAULT_LEVELS = {"biased_mnist": (0.99, 0.995), "colored_mnist": (0.02,)}


def baseline_accuracy(arch: str, state: WarmupCheckpoint, images: ImageSet, eval_size: int) -> float | None:
    """Unbiased-test accuracy of the network the warm-up ended on (None if the run never kept it)."""
    weights = state.warmup_weights()
    if weights is None:
        return None
    model = build_model(arch)
    model.load_state_dict(weights)
    n = min(eval_size or len(images), len(images))
    predicted, _ = predict(model, images.images[:n], torch.device("cpu"))
    return round(float((predicted == images.labels[:n]).mean()), 4)


def row_metrics(metrics: dict, arch: str, state: WarmupCheckpoint, data: TrainingData,
                eval_size: int) -> dict:
    """A row's accuracies, leakage and regularizer term (and the warm-up's accuracy, if any)."""
    return {**{k: metrics[k] for k in ("val_acc", "best_epoch") if k in metrics},
            **({"warmup_unbiased_acc": baseline_accuracy(arch, state, data.test_unbiased, eval_size)}
               if state.warmup_epochs else {}),
            "unbiased_acc": round(metrics["unbiased_acc"], 4),
            "biased_acc": round(metrics["biased_acc"], 4),
            "color_leakage": round(metrics["leakage"], 4),
            "reg_loss": round(metrics["reg_loss"], 4)}


def reference_name(regularizer: str, gray: bool) -> str:
    """The published row a model of ``regularizer`` compares with."""
    if regularizer == "none":
        return "gray" if gray else "vanilla"
    return regularizer


def parse_gammas(pairs: list[str]) -> dict[str, float]:
    gammas = dict(DEFAULT_GAMMA)
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in gammas or not value:
            raise SystemExit(f"--gamma takes NAME=VALUE with NAME among {sorted(gammas)}, got {pair!r}")
        gammas[name] = float(value)
    return gammas


def parse_options(pairs: list[str]) -> dict[str, dict[str, object]]:
    """``NAME.KEY=VALUE`` pairs as {regularizer: {key: value}}, values read as JSON when they can be."""
    options: dict[str, dict[str, object]] = {}
    for pair in pairs:
        target, _, raw = pair.partition("=")
        name, _, key = target.partition(".")
        if name not in DEFAULT_GAMMA or not key or not raw:
            raise SystemExit(f"--reg-option takes NAME.KEY=VALUE with NAME among {sorted(DEFAULT_GAMMA)}, "
                             f"got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options.setdefault(name, {})[key] = value
    return options


def plot(result: dict, path: Path) -> None:
    levels = result["levels"]
    names = list(result["regularizers"])
    fig, axes = plt.subplots(1, len(levels), figsize=(5.5 * len(levels), 4.2), squeeze=False)
    for ax, level in zip(axes[0], levels, strict=True):
        rows = {r["regularizer"]: r for r in result["rows"] if r["level"] == level}
        ours = [100 * rows[n]["unbiased_acc"] if n in rows else np.nan for n in names]
        ax.bar(range(len(names)), ours, color="tab:blue", label="ours")
        for x, name in enumerate(names):
            paper = published(result["task"], level).get(reference_name(name, result["settings"].get("gray")))
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


@dataclasses.dataclass(frozen=True, eq=False)
class Cell:
    """One model of the table, all a Ray task needs to train it (or evaluate its saved state)."""

    settings: dict
    level_name: str
    level: float
    regularizer: str
    gamma: float
    seed: int
    data_dir: str | None
    out: str

    def state(self) -> WarmupCheckpoint:
        """Its epoch state under ``out``/state; the key makes another setting's state refused."""
        path = Path(self.out) / "state" / f"{self.level}-{self.regularizer}-{self.seed}.pt"
        key = run_key(self.settings, self.level, self.regularizer, self.gamma, self.seed)
        return WarmupCheckpoint(path, key, self.settings.get("warmup_epochs", 0))

    def config(self) -> ModelConfig:
        settings, name = self.settings, self.regularizer
        recipe = {k: settings[k] for k in RECIPE_FIELDS if k in settings}
        return ModelConfig(index=0, task=settings["task"], seed=self.seed, pool="all",
                           task_axes={self.level_name: self.level}, regularizer=name, gamma=self.gamma,
                           reg_options={**OPTIONS.get(name, {}), **settings["reg_options"].get(name, {})},
                           **recipe)

    def data(self) -> TrainingData:
        task, val_size = self.settings["task"], self.settings["val_size"]
        mnist = load_mnist(self.data_dir)
        sets = {split: load_imageset(mnist, task, split, self.level, "all")
                for split in SPLITS if split != "val" or val_size}
        if self.settings.get("gray"):
            sets = {split: grayscale(images) for split, images in sets.items()}
        return TrainingData(sets["train"], sets["test_biased"], sets["test_unbiased"], val=sets.get("val"))


def run_cell(cell: Cell, interim: bool = False, device: str | None = None) -> dict | None:
    """Train ``cell``'s model on ``device`` (default: the Ray task's), resuming from its epoch
    state, and return its row; with ``interim``, train nothing and return the row of its last
    saved epoch (None if none)."""
    state = cell.state()
    if interim and not state.path.is_file():
        return None
    settings, data, config = cell.settings, cell.data(), cell.config()
    arch, eval_size = settings.get("arch", "digit-cnn"), settings["eval_size"]
    name = reference_name(cell.regularizer, settings.get("gray", False))
    paper = published(settings["task"], cell.level).get(name)
    head = {"level": cell.level, "regularizer": cell.regularizer, "gamma": cell.gamma, "seed": cell.seed}
    reference = {"published_acc": round(paper / 100, 4) if paper is not None else None}
    if interim:
        saved = saved_model(arch, 1.0, config, data, state)
        if saved is None:
            return None
        model, fitted, epochs_done = saved
        metrics = evaluate(model.to(device or "cpu"), data, fitted, torch.device(device or "cpu"),
                           eval_size).metrics
        return {**head, "epochs_done": epochs_done, **row_metrics(metrics, arch, state, data, eval_size),
                "trained_seconds": round(state.earlier_seconds, 1), **reference}
    if device is None:
        import ray

        from modelzoo.generation import assigned_device

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1) if ray.is_initialized() else 1
        torch.set_num_threads(max(1, int(cpus)))
        device = assigned_device()
    metrics = train_model(arch, 1.0, config, data, device=device, eval_size=eval_size,
                          checkpoint=state).metrics
    return {**head, **row_metrics(metrics, arch, state, data, eval_size),
            "wall_seconds": round(metrics["wall_seconds"], 1), **reference}


def train_cells(cells: list[Cell], store, address: str | None, num_cpus: int | None,
                cpus_per_model: float, gpus_per_model: float) -> None:
    """Train every cell as its own Ray task (an embedded instance, or the cluster at
    ``address``), calling ``store(cell, row)`` as each ends; a bar follows their epochs."""
    if not cells:
        return
    import ray  # here, so that --in-process runs where Ray is not installed

    from modelzoo.generation import TASK_RETRIES, start_ray, task_error

    epochs = cells[0].settings["epochs"]
    resumed = sum(map(epochs_saved, cells))  # so the bar's rate and ETA count this process's epochs
    started = start_ray(address, num_cpus)
    task = ray.remote(max_retries=TASK_RETRIES)(run_cell)
    futures = {task.options(num_cpus=cpus_per_model, num_gpus=gpus_per_model).remote(cell): cell
               for cell in cells}
    try:
        with tqdm(total=epochs * len(cells), initial=resumed, desc="epochs", unit="epoch") as bar:
            while futures:
                ready, _ = ray.wait(list(futures), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    cell = futures.pop(ref)
                    try:
                        row = ray.get(ref)
                    except ray.exceptions.RayTaskError as err:
                        raise task_error(err) from None
                    store(cell, row)
                bar.n = epochs * (len(cells) - len(futures)) + sum(map(epochs_saved, futures.values()))
                bar.refresh()
    finally:
        if started:
            ray.shutdown()


def epochs_saved(cell: Cell) -> int:
    """How many epochs a running cell has saved (0 before its first, or if the file is mid-swap)."""
    try:
        return int(torch.load(cell.state().path, map_location="cpu", weights_only=True)["epoch"])
    except (OSError, RuntimeError, KeyError, EOFError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(DEFAULT_LEVELS), default="biased_mnist")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results/debias_mnist"))
    parser.add_argument("--levels", type=float, nargs="+", help="ρ or σ² values (default: the task's)")
    parser.add_argument("--arch", choices=ARCHS, default="digit-cnn",
                        help="the network: the zoo's digit-cnn, or a source's own: lntl-cnn (Kim et "
                             "al.'s), rebias-cnn (ReBias's SimpleConvNet), end-cnn (its EnD variant)")
    parser.add_argument("--regularizers", nargs="+", default=list(REGULARIZERS))
    parser.add_argument("--gamma", nargs="*", action="extend", default=[], metavar="NAME=VALUE",
                        help="override a γ (the flag may repeat)")
    parser.add_argument("--reg-option", nargs="*", action="extend", default=[], metavar="NAME.KEY=VALUE",
                        help="a regularizer option, e.g. grad.ramp=true (a spec's reg.KEY; may repeat)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=0, help="training images (0: all 60,000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=10000)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--lr-schedule", choices=("constant", "step", "cosine"), default="constant")
    parser.add_argument("--lr-step", type=int, default=0, help="step schedule: epochs between decays")
    parser.add_argument("--lr-decay", type=float, default=0.1)
    parser.add_argument("--val-size", type=int, default=0,
                        help="unbiased validation images held out of the training pool (0: none)")
    parser.add_argument("--select", choices=("last", "best_val"), default="last")
    parser.add_argument("--warmup-epochs", type=int, default=0,
                        help="epochs (of --epochs) trained on the task alone before the regularizer joins")
    parser.add_argument("--warmup-lr", type=float, default=0.0, help="the warm-up's learning rate (0: --lr)")
    parser.add_argument("--seeds", type=int, default=1, help="models per cell, seeds seed..seed+N-1")
    parser.add_argument("--gray", action="store_true",
                        help="train and test on the images in grayscale (Kim et al.'s Gray control)")
    parser.add_argument("--address", help="join the Ray cluster there (default: an embedded local instance)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the embedded instance (default: all)")
    parser.add_argument("--cpus-per-model", type=float, default=1.0,
                        help="CPUs each model's task takes (its torch threads); models train side by side")
    parser.add_argument("--gpus-per-model", type=float, default=0.0, help="GPU share of each model's task")
    parser.add_argument("--in-process", action="store_true",
                        help="train the cells one after another in this process on --device, without Ray")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="with --in-process or --interim: the torch device (default: cuda if any)")
    parser.add_argument("--interim", action="store_true",
                        help="train nothing: evaluate each unfinished model at its last saved epoch")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS),
                        help="a source's recipe (epochs, batch size, lr, optimizer, schedule, weight "
                             "decay, validation, warm-up) as the defaults; flags given override them")
    parser.set_defaults(**PROTOCOLS.get(parser.parse_known_args()[0].protocol, {}))
    args = parser.parse_args()

    levels = args.levels or DEFAULT_LEVELS[args.task]
    gammas = parse_gammas(args.gamma)
    options = parse_options(args.reg_option)
    recipe = {"optimizer": args.optimizer, "weight_decay": args.weight_decay,
              "lr_schedule": args.lr_schedule, "lr_step": args.lr_step, "lr_decay": args.lr_decay,
              "val_size": args.val_size, "select": args.select,
              **({"warmup_epochs": args.warmup_epochs, "warmup_lr": args.warmup_lr}
                 if args.warmup_epochs else {})}
    settings = {"task": args.task, "epochs": args.epochs, "train_size": args.train_size,
                "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "eval_size": args.eval_size,
                **recipe, "reg_options": options, **({"gray": True} if args.gray else {}),
                **({"arch": args.arch} if args.arch != "digit-cnn" else {})}
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
    seeds = range(args.seed, args.seed + args.seeds)
    data_dir = None if args.data_dir is None else str(args.data_dir)
    pending = [Cell(settings, level_name, level, name, gammas[name], seed, data_dir, str(args.out))
               for level in levels for name in args.regularizers for seed in seeds
               if not any(r["level"] == level and r["regularizer"] == name and r["gamma"] == gammas[name]
                          and r.get("seed", args.seed) == seed for r in done)]
    if args.interim:
        saved = (run_cell(cell, interim=True, device=args.device)
                 for cell in tqdm(pending, desc="saved states", unit="model"))
        rows = [row for row in saved if row is not None]
        report = {**{k: v for k, v in result.items() if k != "rows"}, "rows": rows}
        write_text_atomic(args.out / f"{args.task}.interim.json", json.dumps(report, indent=2))
        print(json.dumps(report))
        return

    def store(cell: Cell, row: dict) -> None:
        done.append(row)  # in table order, whichever model finishes first
        done.sort(key=lambda r: (r["level"], r["regularizer"], r["gamma"], r.get("seed", args.seed)))
        write_text_atomic(json_path, json.dumps(result, indent=2))
        cell.state().clear()  # only once its row is on disk

    if args.in_process:
        if args.device.startswith("cuda"):
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its kernels
        for cell in tqdm(pending, desc="models", unit="model"):
            store(cell, run_cell(cell, device=args.device))
    else:
        train_cells(pending, store, args.address, args.num_cpus, args.cpus_per_model, args.gpus_per_model)
    # The file keeps every row run with these settings (other levels, regularizers, γ); the
    # summary and the plot speak for this command's cells.
    rows = [r for r in done if r["level"] in levels and r["regularizer"] in args.regularizers
            and r["gamma"] == gammas[r["regularizer"]]]
    for level in levels:
        at_level = [r for r in rows if r["level"] == level]
        accuracies: dict[str, list[float]] = {}
        for r in at_level:
            accuracies.setdefault(r["regularizer"], []).append(r["unbiased_acc"])
        means = {name: round(float(np.mean(accs)), 4) for name, accs in sorted(accuracies.items())}
        summary = {"level": level, "published": published(args.task, level), "seeds": args.seeds,
                   "mean_unbiased_acc": means}
        if "none" in means:
            summary["vanilla_acc"] = means["none"]
        debiased = {name: acc for name, acc in means.items() if name != "none"}
        if debiased:
            best = max(debiased, key=debiased.get)
            summary |= {"best_regularizer": best, "best_acc": debiased[best]}
        result.setdefault("summary", []).append(summary)
    write_text_atomic(json_path, json.dumps(result, indent=2))
    plot({**result, "rows": rows}, args.out / f"{args.task}.png")
    print(json.dumps({**result, "rows": rows}))


if __name__ == "__main__":
    main()
