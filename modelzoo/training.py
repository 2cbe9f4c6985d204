"""Trainer: train and evaluate one zoo model from its config.

Third stage of the flow (source → dataset → **trainer** → store → detector). Given a model's
config (see :meth:`modelzoo.spec.ZooSpec.config`) and the rendered datasets it needs, it
returns the flat weight vector and the per-model metrics the store records. It knows nothing
about Ray or Zarr, so a plain loop (tests, benchmarks, a user's notebook) can call it too.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from modelzoo.architectures import build_model, flatten
from modelzoo.datasets import ImageSet

EVAL_BATCH = 1000


@dataclass(frozen=True)
class TrainingData:
    """The three image sets one model needs: its training pool and both test sets."""

    train: ImageSet
    test_biased: ImageSet
    test_unbiased: ImageSet


@dataclass
class ModelResult:
    """What the store keeps for one model."""

    weights: np.ndarray
    metrics: dict[str, float | str | np.ndarray]


def as_batch(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, 3, H, W) → float in [0, 1] on ``device``: the input convention of every model."""
    return images.to(device, non_blocking=True).float().div_(255.0)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def training_subset(n_pool: int, train_size: int, seed: int) -> np.ndarray:
    """Indices of the pool a model trains on: the whole pool, or a seeded random subset."""
    if train_size == 0 or train_size >= n_pool:
        return np.arange(n_pool)
    return np.sort(np.random.default_rng([seed, 2]).choice(n_pool, train_size, replace=False))


def fit(model: nn.Module, train: ImageSet, config: dict, device: torch.device) -> float:
    """Train in place for ``config['epochs']``; returns the mean loss of the last epoch."""
    subset = training_subset(len(train), config["train_size"], config["seed"])
    images = torch.from_numpy(np.ascontiguousarray(train.images[subset]))
    labels = torch.from_numpy(np.ascontiguousarray(train.labels[subset]))
    optimizer = make_optimizer(config["optimizer"], model.parameters(), config["lr"])
    shuffler = torch.Generator().manual_seed(config["seed"])
    model.train()
    last_epoch_loss = float("nan")
    for _ in range(config["epochs"]):
        order = torch.randperm(len(labels), generator=shuffler)
        total, count = torch.zeros((), device=device), 0
        for start in range(0, len(order), config["batch_size"]):
            batch = order[start : start + config["batch_size"]]
            target = labels[batch].to(device, non_blocking=True)
            loss = nn.functional.cross_entropy(model(as_batch(images[batch], device)), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(batch)
            count += len(batch)
        last_epoch_loss = float(total) / max(count, 1)
    return last_epoch_loss


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Predicted labels for uint8 images, in eval mode."""
    model.eval()
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    out = [model(as_batch(tensor[s : s + EVAL_BATCH], device)).argmax(1).cpu()
           for s in range(0, len(tensor), EVAL_BATCH)]
    return torch.cat(out).numpy()


def accuracy_report(model: nn.Module, test: ImageSet, device: torch.device,
                    eval_size: int = 0) -> tuple[float, np.ndarray]:
    """Overall accuracy and per-class accuracy (10,) on the first ``eval_size`` test images."""
    n = len(test) if eval_size == 0 else min(eval_size, len(test))
    labels = test.labels[:n]
    correct = predict(model, test.images[:n], device) == labels
    per_class = np.array([correct[labels == c].mean() if (labels == c).any() else np.nan
                          for c in range(10)], dtype=np.float32)
    return float(correct.mean()), per_class


def train_one(arch: str, width: float, config: dict, data: TrainingData,
              device: torch.device | str = "cpu", eval_size: int = 0) -> ModelResult:
    """Build, train and evaluate one model; deterministic on CPU given ``config['seed']``."""
    device = torch.device(device)
    started = time.perf_counter()
    torch.manual_seed(config["seed"])
    model = build_model(arch, width).to(device)
    train_loss = fit(model, data.train, config, device)
    unbiased_acc, per_class = accuracy_report(model, data.test_unbiased, device, eval_size)
    biased_acc, _ = accuracy_report(model, data.test_biased, device, eval_size)
    metrics = {
        "unbiased_acc": unbiased_acc,
        "biased_acc": biased_acc,
        "per_class_acc": per_class,
        "train_loss": train_loss,
        "wall_seconds": time.perf_counter() - started,
        "worker_host": socket.gethostname(),
    }
    return ModelResult(flatten(model), metrics)
