"""The training loop: one loop for one model or a bank of many trained together.

Part of the trainer stage (dataset → **trainer** + regularizer → store). :func:`train_loop`
owns everything a training recipe decides — each member's shuffled batches, the loss
(cross-entropy, weighted by the regularizer's task weight, plus its γ·R term), the
learning-rate schedule per epoch, per-epoch validation and best-validation selection — and
asks a :class:`Trainee` only for what differs between one network and a stacked bank: the
forward pass, the optimizer step and each member's current weights.
:mod:`modelzoo.training` supplies the one-model trainee, :mod:`modelzoo.vectorized` the
bank; written once, the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fairtrain.regularizers import Regularizer
from modelzoo.config import ModelConfig
from modelzoo.datasets import ImageSet
from modelzoo.resume import EpochCheckpoint, random_state, set_random_state

if TYPE_CHECKING:  # pragma: no cover - a member's validation comes from modelzoo.training
    from modelzoo.training import Validation


@dataclass(frozen=True)
class FitResult:
    """Mean cross-entropy and mean regularizer term (γ·R) over the last epoch; with a
    validation split, the validation accuracy of the epoch whose weights were kept and that
    epoch (1-based)."""

    train_loss: float
    reg_loss: float
    val_acc: float | None = None
    best_epoch: int | None = None


@dataclass
class Member:
    """What one model carries through training, apart from its weights' optimizer: its
    config, network, the pool rows it trains on, regularizer, batch shuffler, validation
    split, and the random stream its regularizer draws from (the global one when it trains
    alone; a private copy of it in a bank)."""

    config: ModelConfig
    model: nn.Module
    train: ImageSet
    subset: np.ndarray
    regularizer: Regularizer | None
    shuffler: torch.Generator
    validation: Validation | None = None
    stream: AbstractContextManager = field(default_factory=nullcontext)


class Trainee(Protocol):
    """What the loop needs of the M networks it trains (M = 1 for a single model)."""

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (M, B, K) of uint8 images (M, B, C, H, W), and the features the members'
        regularizers read, (M, B, ...), or None when no member has a regularizer."""

    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Each member's learning rate from now on (its regularizer's heads included)."""

    def zero_grad(self) -> None: ...

    def step(self) -> None:
        """One optimizer step of every member and its heads, from the gradients of the last backward."""

    def current(self, index: int) -> nn.Module:
        """Member ``index``'s own network holding its current weights (for validation)."""

    def finish(self) -> None:
        """Leave the trained weights in every member's network and remove training hooks."""

    # A trainee that can resume from an epoch checkpoint (one model: modelzoo.training's) also has
    # state_dict() -> dict and load_state_dict(dict): its network, optimizer and regularizer.


def shuffled_batches(n: int, batch_size: int, shuffler: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches: a fresh permutation of ``range(n)`` from ``shuffler``, cut in order."""
    order = torch.randperm(n, generator=shuffler)
    return [order[start : start + batch_size] for start in range(0, n, batch_size)]


def regularizer_term(regularizer: Regularizer, progress: float, features: torch.Tensor,
                     logits: torch.Tensor, target: torch.Tensor, sensitive: torch.Tensor) -> torch.Tensor:
    """γ·R for one batch at training progress ``progress`` (step / total steps)."""
    if hasattr(regularizer, "progress"):  # GRAD/LNTL ramp their reversal weight
        regularizer.progress = progress
    return regularizer(features, logits, target, sensitive)


def training_bank(members: Sequence[Member], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Every member's training images, labels and groups in one tensor each on ``device``,
    with the row each member's subset starts at; members training on the same subset of the
    same pool share rows."""
    starts, seen, parts, rows = [], {}, [], 0
    for m in members:
        key = (id(m.train), hashlib.sha1(m.subset.tobytes()).hexdigest())
        if key not in seen:
            seen[key] = rows
            parts.append(m)
            rows += len(m.subset)
        starts.append(seen[key])

    def bank(field: str) -> torch.Tensor:
        arrays = [getattr(m.train, field)[m.subset] for m in parts]
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays))).to(device)

    return bank("images"), bank("labels"), bank("bias"), starts


def train_loop(trainee: Trainee, members: Sequence[Member], device: torch.device,
               checkpoint: EpochCheckpoint | None = None, progress: bool = False) -> list[FitResult]:
    """Train every member for its config's epochs, in place; what each member's training returns.

    Members share ``epochs``, ``batch_size`` and the size of their subset (every step has
    one batch shape); learning rate, schedule, warm-up, weight decay, seed, data, regularizer
    and validation are each member's own. The loss is the sum over members of each one's mean
    loss, so one backward pass gives every member its own gradient. A regularizer that
    ``alternating`` (LNTL) gets a second step per batch on a fresh forward pass; it trains alone.
    With ``checkpoint`` (one model only) the run saves its state after every epoch and starts
    from the last saved epoch, if any. ``progress`` shows a bar over the epochs (for runs of hours).
    """
    if checkpoint is not None and len(members) > 1:  # refused before any work
        raise ValueError("epoch checkpoints resume one model at a time, not a bank")
    first = members[0].config
    images, labels, sensitive, starts = training_bank(members, device)
    n, batch_size, size = len(members[0].subset), first.batch_size, len(members)
    regularized = [(i, m) for i, m in enumerate(members) if m.regularizer is not None]
    if size > 1 and any(m.regularizer.alternating for _, m in regularized):
        raise ValueError("a regularizer that alternates two steps per batch trains one model at a time")
    task_weights = torch.tensor([m.regularizer.task_weight if m.regularizer is not None else 1.0
                                 for m in members], device=device)
    steps_per_epoch = -(-n // batch_size)
    start, step = 0, 0
    results = [FitResult(float("nan"), 0.0)] * size
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        start, step, results = restore(saved, trainee, members, device)
    for epoch in tqdm(range(start, first.epochs), desc="epochs", unit="epoch", initial=start,
                      total=first.epochs, disable=not progress, leave=False):
        trainee.set_lrs([m.config.lr_at(epoch) for m in members])
        active = [(i, m) for i, m in regularized if m.config.regularized(epoch)]
        alternating = [(i, m) for i, m in active if m.regularizer.alternating]
        order = [shuffled_batches(n, batch_size, m.shuffler) for m in members]
        rows = torch.stack([start + torch.cat(b) for start, b in zip(starts, order, strict=True)]).to(device)
        ce_total = torch.zeros(size, device=device)
        reg_total = torch.zeros(size, device=device)
        for begin in range(0, n, batch_size):
            idx = rows[:, begin : begin + batch_size]
            b = idx.shape[1]
            target = labels[idx]
            logits, features = trainee(images[idx])
            ce = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
            ce = ce.view(size, b).mean(1)
            ce_total += ce.detach() * b
            loss = (ce * task_weights).sum()
            for i, m in active:
                with m.stream:  # a regularizer may draw (BinaryBernoulli samples its code)
                    term = regularizer_term(m.regularizer, phase_progress(m.config, step, steps_per_epoch),
                                            features[i], logits[i], target[i], sensitive[idx[i]])
                reg_total[i] += term.detach() * b
                loss = loss + term
            descend(trainee, loss)
            if alternating:
                logits, features = trainee(images[idx])
                terms = [(i, m.regularizer.adversary_term(features[i], logits[i], target[i],
                                                          sensitive[idx[i]])) for i, m in alternating]
                for i, term in terms:
                    reg_total[i] += term.detach() * b
                descend(trainee, sum(term for _, term in terms))
            step += 1
        totals = zip(ce_total.tolist(), reg_total.tolist(), strict=True)
        results = [FitResult(ce / n, reg / n) for ce, reg in totals]
        for i, m in enumerate(members):
            if m.validation is not None:
                m.validation.score(trainee.current(i), device)
        if checkpoint is not None:
            checkpoint.save(snapshot(epoch + 1, step, results, trainee, members, device))
    trainee.finish()
    for i, m in enumerate(members):
        if m.validation is not None:
            best, accuracy = m.validation.chosen(m.model)
            results[i] = FitResult(results[i].train_loss, results[i].reg_loss, accuracy, best + 1)
    return results


def snapshot(epochs_done: int, step: int, results: Sequence[FitResult], trainee: Trainee,
             members: Sequence[Member], device: torch.device) -> dict:
    """Everything the next epoch depends on, as tensors, numbers and dicts (no pickled objects)."""
    return {"epoch": epochs_done, "step": step, "trainee": trainee.state_dict(),
            "results": [[r.train_loss, r.reg_loss] for r in results],
            "shufflers": [m.shuffler.get_state() for m in members], "random": random_state(device),
            "validation": [m.validation.state_dict() if m.validation is not None else {} for m in members]}


def restore(saved: dict, trainee: Trainee, members: Sequence[Member], device: torch.device
            ) -> tuple[int, int, list[FitResult]]:
    """Put a :func:`snapshot` back; the epoch to start from, the step count and the results so far."""
    trainee.load_state_dict(saved["trainee"])
    for m, shuffler, validation in zip(members, saved["shufflers"], saved["validation"], strict=True):
        m.shuffler.set_state(shuffler)
        if m.validation is not None:
            m.validation.load_state_dict(validation)
    set_random_state(saved["random"], device)
    return saved["epoch"], saved["step"], [FitResult(ce, reg) for ce, reg in saved["results"]]


def descend(trainee: Trainee, loss: torch.Tensor) -> None:
    """One optimizer step of every member on ``loss``."""
    trainee.zero_grad()
    loss.backward()
    trainee.step()


def phase_progress(config: ModelConfig, step: int, steps_per_epoch: int) -> float:
    """How far training is through the regularized epochs (0 when the regularizer joins, → 1)."""
    start = config.warmup_epochs * steps_per_epoch
    return (step - start) / ((config.epochs - config.warmup_epochs) * steps_per_epoch)
