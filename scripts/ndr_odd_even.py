"""Evidence: NDR on MNIST odd/even, digit identity as the 10 discriminatory classes (Table I).

The protocol of Tartaglione & Grangetto's Table I, with fewer epochs: their LeNet5-caffe
(conv 20@5 → pool → conv 50@5 → pool → fc1 500 → ReLU → one output, binary cross-entropy) on
gray MNIST learns odd vs even by plain SGD (lr 0.01, weight decay 1e-5, batch 100) while NDR,
through its own tap (fc1's pre-activation, :class:`fairtrain.NDR`'s default), decorrelates the
features of samples that share a digit, so they keep the parity but lose which digit it was.
γ is the paper's: it steps R outside the learning rate (:func:`loss_weight`). For each γ: the
final R on the test set (NDR's own value, before γ, over test batches of the training batch
size; also in DESIGN's |Σ| form, where signed cosines cancel), the odd/even test accuracy, how
well a fresh probe still recovers the digit (leakage), and whether K-means on the test features
rediscovers the digits (adjusted Rand index). Published (Table I, fc1): accuracy
99.32 / 99.15 / 93.23 and R 0.61 / 0.11 / 0.03 at γ 0 / 0.1 / 1, after 500 epochs.

It is also the shortest example of fairtrain in a hand-written PyTorch loop: the regularizer
attaches its own tap, and one regularizer call per step.

    python scripts/ndr_odd_even.py --data-dir ../shared/data --out results/ndr_odd_even

Writes ``ndr_odd_even.json`` and, for γ = 0 and the largest γ, a PNG of the distances between
the ten digits' feature centroids, then prints the JSON on one line. Each γ saves its state
after every epoch under ``--out``/state and resumes there, so Table I's 500 epochs span
sessions; the same command with a larger ``--epochs`` extends a finished run (the learning
rate is constant). ``--eval-every N`` records the test readings every N epochs in the JSON's
``trajectory`` and, while the run goes on, in ``ndr_odd_even.progress.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fairtrain.metrics import centroid_recoverability, representation_leakage
from fairtrain.references import NDR_TABLE_I
from fairtrain.regularizers import get_regularizer, ndr_penalty
from modelzoo.atomic import write_text_atomic
from modelzoo.resume import EpochCheckpoint, run_key
from modelzoo.sources import load_mnist

GAMMAS = (0.0, 0.1, 1.0)
TRAJECTORY_KEYS = ("parity_acc", "ndr_R", "digit_leakage", "kmeans_adjusted_rand")


class LeNet5Caffe(nn.Module):
    """Caffe's LeNet-5 with one output: NDR's Table I network (``fc1`` is its bottleneck)."""

    bottleneck = "fc1"

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def as_gray(digits: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) digits → float (N, 1, 28, 28) in [0, 1]."""
    return torch.from_numpy(digits).float().div_(255.0)[:, None]


def train(gamma: float, images: torch.Tensor, digits: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor],
          args: argparse.Namespace) -> tuple[nn.Module, list[dict]]:
    """Train one γ, resuming from its epoch state under ``--out``/state; every ``--eval-every``
    epochs the test readings join the run's trajectory (kept in the state, so a resumed or
    extended run keeps its history)."""
    torch.manual_seed(args.seed)
    model = LeNet5Caffe()
    ndr = get_regularizer("ndr", loss_weight(gamma, args))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    shuffler = torch.Generator().manual_seed(args.seed)
    # The learning rate is constant, so the key leaves out the epochs: a run extends to more.
    # A subset of the test digits reads the trajectory on other images, so it joins the key
    # (only when asked for: the runs carried from before --test-size keep their keys).
    parts = ("ndr_odd_even", gamma, args.gamma_form, len(digits), args.batch_size, args.lr, args.weight_decay,
             args.seed, *(("test", len(test[1])) if args.test_size else ()))
    checkpoint = EpochCheckpoint(args.out / "state" / f"gamma{gamma:g}.pt", run_key(*parts))
    state, done, trajectory = checkpoint.load(), 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        shuffler.set_state(state["shuffler"])
        done, trajectory = state["epoch"], state["trajectory"]
    with ndr.attach(model) as tap:
        for epoch in tqdm(range(done, args.epochs), desc=f"γ = {gamma:g}", unit="epoch", leave=False,
                          initial=done, total=args.epochs):
            model.train()
            for batch in torch.randperm(len(digits), generator=shuffler).split(args.batch_size):
                logits = model(images[batch])
                parity = digits[batch] % 2
                loss = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], parity.float())
                loss = loss + ndr(tap.features, logits, parity, digits[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if args.eval_every and (epoch + 1) % args.eval_every == 0:
                reading = evaluate(model, *test, args.batch_size)
                trajectory.append({"epoch": epoch + 1, **{k: round(reading[k], 4) for k in TRAJECTORY_KEYS}})
                write_progress(args.out, gamma, trajectory)
            checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "shuffler": shuffler.get_state(), "epoch": epoch + 1, "trajectory": trajectory})
    return model, trajectory


def loss_weight(gamma: float, args: argparse.Namespace) -> float:
    """The weight of R in the loss SGD minimises. The paper steps w ← w − η·∂L/∂w − γ·∂R/∂w
    (DESIGN §4: ηL + γR), so γ is not scaled by the learning rate η; under plain SGD at lr η
    that update is the loss L + (γ/η)·R. ``--gamma-form loss`` reads γ as the loss weight."""
    return gamma / args.lr if args.gamma_form == "update" else gamma


def write_progress(out: Path, gamma: float, trajectory: list[dict]) -> None:
    """``ndr_odd_even.progress.json``: each γ's trajectory so far, readable while the runs go on."""
    path = out / "ndr_odd_even.progress.json"
    out.mkdir(parents=True, exist_ok=True)
    progress = json.loads(path.read_text()) if path.is_file() else {}
    progress[f"{gamma:g}"] = trajectory
    write_text_atomic(path, json.dumps(progress, indent=1))


def _sum_form(features: torch.Tensor, digits: torch.Tensor) -> float:
    """R as DESIGN §5 writes it, the absolute value of each class's *summed* cosines (signed
    features can cancel there; fairtrain takes it per pair): for comparison with Table I."""
    unit = nn.functional.normalize(features.flatten(1), dim=1)
    terms = []
    for digit in digits.unique():
        rows = unit[digits == digit]
        n = len(rows)
        if n > 1:
            gram = rows @ rows.T
            terms.append(abs(float(gram.sum() - gram.diagonal().sum())) / (n * (n - 1)))
    return float(np.mean(terms))


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, digits: torch.Tensor, batch_size: int) -> dict:
    model.eval()
    features, predicted, penalties, sum_forms = [], [], [], []
    with get_regularizer("ndr").attach(model) as tap:  # the features NDR read in training
        for start in range(0, len(digits), batch_size):
            logits = model(images[start : start + batch_size])
            predicted.append((logits[:, 0] > 0).long())
            features.append(tap.features)
            penalties.append(float(ndr_penalty(tap.features, digits[start : start + batch_size])))
            sum_forms.append(_sum_form(tap.features, digits[start : start + batch_size]))
    features_np, digits_np = torch.cat(features).numpy(), digits.numpy()
    half = len(digits_np) // 2
    leak = representation_leakage(features_np[:half], digits_np[:half], features_np[half:], digits_np[half:])
    unit = features_np / np.maximum(np.linalg.norm(features_np, axis=1, keepdims=True), 1e-12)
    recover = centroid_recoverability(unit, digits_np, seed=0)
    return {
        "ndr_R": float(np.mean(penalties)),
        "ndr_R_sum_form": float(np.mean(sum_forms)),
        "parity_acc": float((torch.cat(predicted) == digits % 2).float().mean()),
        "digit_leakage": leak.accuracy,
        "digit_leakage_chance": leak.chance,
        "kmeans_adjusted_rand": recover.adjusted_rand,
        "kmeans_matching_acc": recover.matching_accuracy,
        "centroid_distances": recover.centroid_distances.round(4).tolist(),
    }


def plot_distances(distances: np.ndarray, gamma: float, row: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.6, 4))
    shown = ax.imshow(distances, cmap="viridis", vmin=0, vmax=max(1e-6, float(distances.max())))
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("digit")
    ax.set_ylabel("digit")
    ax.set_title(f"NDR γ={gamma:g}: digit centroid distances\n"
                 f"R={row['ndr_R']:.3f}  K-means ARI={row['kmeans_adjusted_rand']:.2f}", fontsize=9)
    fig.colorbar(shown, ax=ax, label="distance between L2-normalised centroids")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results/ndr_odd_even"))
    parser.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS))
    parser.add_argument("--train-size", type=int, default=0, help="training digits (0: all 60,000)")
    parser.add_argument("--test-size", type=int, default=0, help="test digits read (0: all 10,000)")
    parser.add_argument("--epochs", type=int, default=15, help="Table I trains 500")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gamma-form", choices=("update", "loss"), default="update",
                        help="update: the paper's step −η∂L − γ∂R (loss L + γ/η·R); loss: L + γR")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="record the test readings every N epochs (0: never)")
    args = parser.parse_args()

    mnist = load_mnist(args.data_dir)
    n_train = args.train_size or len(mnist.train_labels)
    train_images = as_gray(mnist.train_images[:n_train])
    train_digits = torch.from_numpy(mnist.train_labels[:n_train]).long()
    n_test = args.test_size or len(mnist.test_labels)
    test_images = as_gray(mnist.test_images[:n_test])
    test_digits = torch.from_numpy(mnist.test_labels[:n_test]).long()

    rows = []
    for gamma in tqdm(sorted(args.gammas), desc="NDR γ", unit="model"):
        model, trajectory = train(gamma, train_images, train_digits, (test_images, test_digits), args)
        rows.append({"gamma": gamma, **evaluate(model, test_images, test_digits, args.batch_size),
                     "published": NDR_TABLE_I.get(gamma), "trajectory": trajectory})
    r_values = [row["ndr_R"] for row in rows]
    result = {
        "benchmark": "ndr_odd_even", "data": mnist.origin, "network": "LeNet5-caffe, 1 output",
        "optimizer": "sgd", "train_size": n_train, "test_size": n_test, "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed, "gamma_form": args.gamma_form,
        "R_falls_with_gamma": all(b < a for a, b in itertools.pairwise(r_values)),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for row in (rows[0], rows[-1]):
        plot_distances(np.array(row["centroid_distances"]), row["gamma"], row,
                       args.out / f"ndr_centroids_gamma{row['gamma']:g}.png")
    (args.out / "ndr_odd_even.json").write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k != "rows"}
    summary["rows"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                        if k not in ("centroid_distances", "trajectory")} for row in rows]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
