"""Trainer: train and evaluate one zoo model from its config.

Third stage of the flow (source → dataset → **trainer** + regularizer → store → detector).
Given a model's :class:`~modelzoo.config.ModelConfig` and the rendered datasets
it needs, it returns the flat weight vector and the per-model metrics the store records. A
fairtrain regularizer named in the config hooks its own tap onto the model and adds its term; the
sensitive attribute is each image's colour (MNIST tasks) or ethnic group (faces). It knows
nothing about Ray or Zarr, so a plain loop (tests, benchmarks, a user's notebook) can call it.
:func:`fit` runs the one training loop (:func:`modelzoo.loop.train_loop`) on one network;
:mod:`modelzoo.vectorized` runs it on a bank of many, and shares :func:`seeded_model`,
:func:`member` and :func:`evaluate` from here.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from fairtrain.metrics import representation_leakage
from fairtrain.regularizers import FeatureTap, Regularizer, regularizer_for_network
from modelzoo.architectures import build_model, flatten
from modelzoo.config import ModelConfig
from modelzoo.datasets import N_COLORS, ImageSet
from modelzoo.loop import FitResult, Member, train_loop
from modelzoo.resume import EpochCheckpoint

EVAL_BATCH = 1000

if TYPE_CHECKING:  # pragma: no cover - the trainer takes a spec's data, never parses specs
    from modelzoo.spec import ZooSpec


@dataclass(frozen=True)
class TrainingData:
    """The image sets one model needs: its training pool, both test sets and, with a
    validation split, the pool as the validation images are drawn from it (``val``); and how
    many sensitive groups their ``bias`` labels range over (10 colours, 3 face groups)."""

    train: ImageSet
    test_biased: ImageSet
    test_unbiased: ImageSet
    num_groups: int = N_COLORS
    val: ImageSet | None = None


@dataclass
class ModelResult:
    """What the store keeps for one model."""

    weights: np.ndarray
    metrics: dict[str, float | str | np.ndarray]


# channels_last (NHWC) convolutions measured about 1.3× faster per training step than NCHW on
# this project's CPUs (scripts/bench_zoo.py); results agree to floating-point rounding.
MEMORY_FORMAT = torch.channels_last


def as_batch(images: torch.Tensor, device: torch.device,
             memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 (N, 3, H, W) → float in [0, 1] on ``device``: the input convention of every model."""
    return images.to(device, non_blocking=True).to(dtype=torch.float32,
                                                    memory_format=memory_format).div_(255.0)


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam, or SGD with momentum 0.9; ``weight_decay`` is the L2 term both add to the gradient
    (as ReBias, EnD and LNTL train)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def training_subset(train: ImageSet, config: ModelConfig) -> np.ndarray:
    """Indices of the pool a model trains on, as its task draws them
    (:meth:`modelzoo.tasks.Task.training_subset`)."""
    return config.task_info.training_subset(train, config)


def bottleneck_tap(model: nn.Module) -> FeatureTap:
    """Post-ReLU activations of the model's named bottleneck layer."""
    return FeatureTap(model, model.bottleneck, activation=torch.relu)


def build_regularizer(model: nn.Module, config: ModelConfig, device: torch.device, train: ImageSet,
                      subset: np.ndarray, num_groups: int = N_COLORS) -> Regularizer | None:
    """The config's regularizer, sized at its own tap of ``model`` and prepared on the
    labels of the ``subset`` of ``train`` the model trains on, or None for ``"none"``.

    Building a head draws its initial weights from the global RNG, so callers that must
    reproduce :func:`train_model` call this right after initialising the model, as it does.
    """
    if config.regularizer == "none":
        return None
    regularizer = regularizer_for_network(
        config.regularizer, config.gamma, model, tuple(train.images.shape[1:]), num_groups=num_groups,
        num_classes=model.num_classes, options=dict(config.reg_options),
    ).to(device)
    regularizer.prepare(torch.from_numpy(train.labels[subset]), torch.from_numpy(train.bias[subset]))
    return regularizer


def member(model: nn.Module, config: ModelConfig, device: torch.device, train: ImageSet,
           num_groups: int = N_COLORS, val: ImageSet | None = None) -> Member:
    """``model``'s part of a training run: its training subset, regularizer (built now, so its
    heads' initial weights follow the model's in the global RNG), shuffler and validation."""
    subset = training_subset(train, config)
    regularizer = build_regularizer(model, config, device, train, subset, num_groups)
    shuffler = torch.Generator().manual_seed(config.seed)
    validation = Validation(val, config, train) if val is not None and config.val_size else None
    return Member(config, model, train, subset, regularizer, shuffler, validation)


class OneModel:
    """The loop's :class:`~modelzoo.loop.Trainee` for one network: its own forward pass
    (dropout draws from the global RNG) and one torch optimizer over the network and its
    regularizer's heads."""

    def __init__(self, one: Member, device: torch.device) -> None:
        self.model, self.regularizer, self.device = one.model, one.regularizer, device
        self.model.to(memory_format=MEMORY_FORMAT)
        self.tap = self.regularizer.attach(self.model) if self.regularizer is not None else None
        params = list(self.model.parameters())
        if self.regularizer is not None:
            params += list(self.regularizer.parameters())
        config = one.config
        self.optimizer = make_optimizer(config.optimizer, params, config.lr, config.weight_decay)
        self.model.train()

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.model(as_batch(images[0], self.device, MEMORY_FORMAT))
        return logits[None], (None if self.tap is None else self.tap.features[None])

    def set_lrs(self, lrs: Sequence[float]) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lrs[0]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    def current(self, index: int) -> nn.Module:
        return self.model

    def state_dict(self) -> dict[str, dict]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "regularizer": self.regularizer.state_dict() if self.regularizer is not None else {}}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.regularizer is not None:
            self.regularizer.load_state_dict(state["regularizer"])

    def finish(self) -> None:
        if self.tap is not None and not self.regularizer.alters_forward:
            self.tap.remove()  # (a tap that alters the forward pass is part of the trained network)


def fit(model: nn.Module, train: ImageSet, config: ModelConfig, device: torch.device,
        num_groups: int = N_COLORS, val: ImageSet | None = None,
        checkpoint: EpochCheckpoint | None = None, progress: bool = False) -> FitResult:
    """Train in place for ``config.epochs``, with the config's regularizer if it names one
    (a regularizer that alters the forward pass, BinaryBernoulli's binary code, stays hooked
    on ``model``), its weight decay and learning-rate schedule; with ``val`` (the config has ``val_size``),
    score the validation split after every epoch and, for ``select = "best_val"``, end on the
    weights of the best epoch (the first of equals). With ``checkpoint`` the state is saved after
    every epoch and a run started again resumes from it; ``progress`` shows a bar over the epochs.
    The loop is :func:`~modelzoo.loop.train_loop`, the one :mod:`modelzoo.vectorized` runs for a
    bank of models."""
    one = member(model, config, device, train, num_groups, val)
    return train_loop(OneModel(one, device), [one], device, checkpoint, progress)[0]


class Validation:
    """A model's validation split, scored after each epoch; keeps the best epoch's weights
    when its config selects on it, among the epochs its regularizer trained (after any warm-up)."""

    def __init__(self, val: ImageSet, config: ModelConfig, train: ImageSet) -> None:
        rows = config.task_info.validation_subset(train, config)
        self.images, self.labels = val.images[rows], val.labels[rows]
        self.select_best = config.select == "best_val"
        self.first_eligible = config.warmup_epochs
        self.history: list[float] = []
        self.best_state: dict[str, torch.Tensor] | None = None

    def score(self, model: nn.Module, device: torch.device) -> None:
        """Score ``model``'s current weights (leaving it in the mode it was in), keeping them
        when they are the best so far and selection asks for it."""
        was_training = model.training
        predicted, _ = predict(model, self.images, device)
        model.train(was_training)
        accuracy = float((predicted == self.labels).mean())
        eligible = self.history[self.first_eligible:]
        if self.select_best and len(self.history) >= self.first_eligible and (
                not eligible or accuracy > max(eligible)):
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.history.append(accuracy)

    def state_dict(self) -> dict:
        return {"history": list(self.history), "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.best_state = list(state["history"]), state["best_state"]

    def chosen(self, model: nn.Module) -> tuple[int, float]:
        """(epoch, validation accuracy) of the weights ``model`` ends with, restoring them."""
        if not self.select_best:
            return len(self.history) - 1, self.history[-1]
        model.load_state_dict(self.best_state)
        best = self.first_eligible + int(np.argmax(self.history[self.first_eligible:]))
        return best, self.history[best]


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Predicted labels and bottleneck features for uint8 images, in eval mode."""
    model.eval()
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    labels, features = [], []
    with bottleneck_tap(model) as tap:
        for start in range(0, len(tensor), EVAL_BATCH):
            batch = as_batch(tensor[start : start + EVAL_BATCH], device, MEMORY_FORMAT)
            labels.append(model(batch).argmax(1).cpu())
            features.append(tap.features.cpu())
    return torch.cat(labels).numpy(), torch.cat(features).numpy()


def per_value_accuracy(correct: np.ndarray, values: np.ndarray, n_values: int) -> np.ndarray:
    """Accuracy among samples of each value (class or group); NaN where a value is absent."""
    return np.array([correct[values == v].mean() if (values == v).any() else np.nan
                     for v in range(n_values)], dtype=np.float32)


def leakage(features: np.ndarray, groups: np.ndarray) -> float:
    """Accuracy of a fresh probe predicting the group from frozen features (half fit, half test)."""
    half = len(groups) // 2
    # One BLAS thread: the probe is tiny, and idle BLAS threads spin and slow torch's own threads.
    with threadpool_limits(limits=1):
        return representation_leakage(features[:half], groups[:half], features[half:],
                                      groups[half:]).accuracy


def seeded_model(arch: str, width: float, config: ModelConfig, device: torch.device) -> nn.Module:
    """The untrained model of ``config``: the global RNG is seeded with ``config.seed`` first,
    so initial weights (and every later draw from the global RNG) follow from the seed alone."""
    torch.manual_seed(config.seed)
    return build_model(arch, width).to(device)


def evaluate(model: nn.Module, data: TrainingData, fitted: FitResult, device: torch.device,
             eval_size: int = 0, started: float | None = None) -> ModelResult:
    """Weights and metrics of a trained model; ``started`` is the ``time.perf_counter()`` at
    which this model's clock started (its ``wall_seconds`` include this evaluation)."""
    started = time.perf_counter() if started is None else started
    unbiased, biased = data.test_unbiased, data.test_biased
    n = len(unbiased) if eval_size == 0 else min(eval_size, len(unbiased))
    predicted, features = predict(model, unbiased.images[:n], device)
    correct = predicted == unbiased.labels[:n]
    biased_predicted, _ = predict(model, biased.images[:n], device)
    metrics = {
        "unbiased_acc": float(correct.mean()),
        "biased_acc": float((biased_predicted == biased.labels[:n]).mean()),
        "per_class_acc": per_value_accuracy(correct, unbiased.labels[:n], model.num_classes),
        "per_group_acc": per_value_accuracy(correct, unbiased.bias[:n], data.num_groups),
        "leakage": leakage(features, unbiased.bias[:n]),
        "train_loss": fitted.train_loss,
        "reg_loss": fitted.reg_loss,
        **({} if fitted.val_acc is None else {"val_acc": fitted.val_acc, "best_epoch": fitted.best_epoch}),
        "wall_seconds": time.perf_counter() - started,
        "worker_host": socket.gethostname(),
    }
    return ModelResult(flatten(model), metrics)


def train_model(arch: str, width: float, config: ModelConfig, data: TrainingData,
                device: torch.device | str = "cpu", eval_size: int = 0,
                checkpoint: EpochCheckpoint | None = None, progress: bool = False) -> ModelResult:
    """Build, train and evaluate one model; deterministic on CPU given ``config.seed``. With
    ``checkpoint``, training saves its state after every epoch and resumes from it (:func:`fit`);
    ``progress`` shows a bar over the epochs."""
    device = torch.device(device)
    started = time.perf_counter()
    model = seeded_model(arch, width, config, device)
    fitted = fit(model, data.train, config, device, data.num_groups, data.val, checkpoint, progress)
    if checkpoint is not None:  # a resumed run's clock includes the processes before this one
        started -= checkpoint.earlier_seconds
    return evaluate(model, data, fitted, device, eval_size, started)


def saved_model(arch: str, width: float, config: ModelConfig, data: TrainingData,
                checkpoint: EpochCheckpoint, device: torch.device | str = "cpu"
                ) -> tuple[nn.Module, FitResult, int] | None:
    """The network a run's epoch checkpoint holds mid-run, to evaluate before the run ends: the
    model (with its regularizer's tap in place where that tap is part of the forward pass, as
    BinaryBernoulli's code is), the losses of its last epoch and how many epochs it has trained.
    None when the run has saved nothing yet; a state of another run is refused (ResumeError)."""
    state = checkpoint.load()
    if state is None:
        return None
    device = torch.device(device)
    model = seeded_model(arch, width, config, device)
    trainee = OneModel(member(model, config, device, data.train, data.num_groups, data.val), device)
    trainee.load_state_dict(state["trainee"])
    trainee.finish()
    train_loss, reg_loss = state["results"][0]
    return model, FitResult(train_loss, reg_loss), int(state["epoch"])


def training_data(spec: ZooSpec, config: ModelConfig, data_dir: str | Path | None = None) -> TrainingData:
    """The three image sets ``config``'s model needs, rendered (or read from the cache) as its
    zoo's task does it: what :func:`train_model` takes, for training one model outside Ray."""
    keys = spec.task_info.data_keys(config)
    datasets, _, _ = spec.load_datasets(set(keys.values()), data_dir)
    return TrainingData(**{role: datasets[key] for role, key in keys.items()}, num_groups=spec.num_groups)
