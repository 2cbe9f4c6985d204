"""Vectorized training: many zoo models trained in one batched computation.

Part of the trainer stage (dataset → **trainer** + regularizer → store). :func:`train_models`
trains the models of a store block; with ``vectorize`` > 1 it groups models whose training
settings allow it (:func:`plan_groups`) and trains each group as one network of stacked
weights: every model's parameters are a row of one (M, P) tensor, ``torch.func.vmap`` runs
the architecture over per-model input batches (M, B, C, H, W) through ``functional_call``,
so convolutions become grouped convolutions and dense layers batched matrix products. The
loss is the sum over models of each model's mean loss, so one backward pass gives every
model its own gradient, and one :class:`StackedOptimizer` (Adam or SGD with momentum, each
elementwise, with one learning rate per row) equals one optimizer per model.

It reproduces :func:`~modelzoo.training.train_model` model by model, within floating-point
tolerance: each model is initialised from its own seed, trains on its own subset in its own
shuffled order, and draws its dropout masks (and any random draw of its regularizer) from a
private copy of the global RNG stream that ``train_model`` would have used, in the same order.
The batched convolutions sum in another order than single-model ones (gradients agree to
~1e-6 relative). With SGD the weights stay that close; Adam divides each step by
sqrt(v) + 1e-8, so where a gradient is itself near 1e-8 a rounding difference changes that
weight's step by up to lr, and over many steps the runs drift apart as far as ``train_model``
drifts from itself under another thread count (accuracies stay within a fraction of a percent).

Speed: on a GPU the gain is fewer, larger kernels. On CPU it is small: oneDNN computes the
weight gradient of a grouped convolution with few input channels (the first layer) slower
than the same convolutions one model at a time.

What batches, and what falls back to one-at-a-time ``train_model`` (identical results):

* every regularizer batches. The network, its backward pass and the optimizer step run for
  all M models at once; each model's regularizer term (γ·R, with its own heads, head
  optimizer, state and ramp) is computed by that model's own regularizer module on its
  slice of the stacked tap features and logits, in a loop over models. Regularizers
  whose terms branch on batch contents (NDR, EnD, GroupBalanced, UnsupervisedGroups) cannot
  run under ``vmap``, and per-model terms cost little next to the network;
* models are grouped only when they share ``optimizer``, ``epochs``, ``batch_size`` and the
  size of their training subset (so every step has the same batch shape), and whose
  regularizers read the same :class:`~fairtrain.regularizers.Tap` (or who have none). Learning
  rate, seed, data, regularizer and γ may differ within a group;
* a model whose recipe sets weight decay, a learning-rate schedule or a validation split, one
  whose regularizer needs hooks of its own (BinaryBernoulli samples its code inside the
  network, which ``vmap`` cannot; LNTL reads the input images), a model with no partner in
  its block, an architecture with buffers (e.g. batch norm, whose running statistics ``vmap``
  cannot update in place) or with random modules other than ``nn.Dropout``, and an optimizer
  configured beyond what :class:`StackedOptimizer` implements, are trained one at a time.

Metrics are computed per model after training with the same code as ``train_model``. A
model's ``wall_seconds`` is its share of its group's training time plus its own evaluation.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from fairtrain.regularizers import FeatureTap, Regularizer, Tap, regularizer_tap, regularizer_vectorizable
from modelzoo.architectures import build_model, layout, unflatten
from modelzoo.config import ModelConfig
from modelzoo.stacked_optimizer import StackedOptimizer, VectorizeError, stackable_optimizer
from modelzoo.training import (
    FitResult,
    ModelResult,
    TrainingData,
    as_batch,
    build_regularizer,
    evaluate,
    make_optimizer,
    regularizer_term,
    seeded_model,
    shuffled_batches,
    train_model,
    training_subset,
)

# StackedOptimizer and VectorizeError live in modelzoo.stacked_optimizer; exported here as part of this API.
__all__ = ["ModelJob", "StackedOptimizer", "VectorizeError", "dropout_calls", "fit_group", "fit_jobs",
           "plan_groups", "train_group", "train_models", "vectorizable_architecture"]


@dataclass(frozen=True)
class ModelJob:
    """One model to train: its store index, full config and the data it needs."""

    index: int
    config: ModelConfig
    data: TrainingData


# ----------------------------------------------------------------------------- RNG streams


class _Stream:
    """One model's private copy of the global generator ``train_model``'s training draws use.

    That is the default generator of the training device: dropout masks and a regularizer's
    samples are drawn on the device (initial weights, drawn on the CPU, are made before the
    stream is captured). Entering swaps this model's state into that generator; leaving saves
    it back, so draws made inside continue the model's own stream where it left off.
    """

    def __init__(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.init()  # the default generators exist once CUDA is initialised
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.generator = torch.cuda.default_generators[index]
        else:
            self.generator = torch.default_generator
        self.state = self.generator.get_state()

    def __enter__(self) -> _Stream:
        self.generator.set_state(self.state)
        return self

    def __exit__(self, *exc: object) -> None:
        self.state = self.generator.get_state()


# ----------------------------------------------------------------------------- stacked network


class _GivenNoise(nn.Module):
    """Stands in for an ``nn.Dropout``: multiplies by the mask a caller drew (its ``noise``
    buffer, replaced per call through ``functional_call``) instead of drawing one itself."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("noise", torch.ones(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.noise


def dropout_calls(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, float, tuple]]:
    """(module name, p, per-sample input shape) of each ``nn.Dropout`` call of a forward pass,
    in call order (the order ``train_model`` draws their masks in). Found with one eval-mode
    pass, which draws nothing."""
    seen, handles = [], []

    def recorder(name: str, p: float):
        return lambda module, args: seen.append((name, p, tuple(args[0].shape[1:])))

    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout):
            handles.append(module.register_forward_pre_hook(recorder(name, module.p)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return seen


def vectorizable_architecture(model: nn.Module) -> bool:
    """No buffers (``vmap`` cannot update running statistics in place), and no randomness but
    ``nn.Dropout`` modules called once per forward pass (their masks are drawn per model)."""
    random_modules = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if list(model.buffers()) or any(type(m) is not nn.Dropout for m in random_modules):
        return False
    if not random_modules:
        return True
    if getattr(model, "input_shape", None) is None:  # no way to trace its dropout calls
        return False
    names = [name for name, _, _ in dropout_calls(model, tuple(model.input_shape))]
    return len(names) == len(set(names))


class StackedNetwork:
    """M models of one architecture as one (M, P) weight tensor and one batched forward.

    Row m of :attr:`weights` is model m's flat weight vector in layout order (what the zoo
    stores). With a ``features`` tap it also returns the features captured there, (M, B, ...).
    """

    def __init__(self, models: Sequence[nn.Module], input_shape: tuple[int, ...],
                 features: Tap | None) -> None:
        self.template = copy.deepcopy(models[0])
        self.slots = layout(self.template)
        rows = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models]
        self.weights = torch.stack(rows).requires_grad_()
        self.dropouts = dropout_calls(self.template, input_shape)
        for name, _, _ in self.dropouts:
            parent, _, leaf = name.rpartition(".")
            setattr(self.template.get_submodule(parent) if parent else self.template, leaf, _GivenNoise())
        self.template.train()
        self.tap: FeatureTap | None = features.attach(self.template) if features is not None else None
        self._batched = vmap(self._one if self.tap is None else self._one_with_features)

    def draw_noise(self, streams: Sequence[_Stream], batch: int) -> dict[str, torch.Tensor]:
        """Each model's dropout masks for a batch, drawn from its own stream the way
        ``nn.Dropout`` draws them (dropout of ones is the scaled mask)."""
        masks: dict[str, list[torch.Tensor]] = {name: [] for name, _, _ in self.dropouts}
        ones = {name: torch.ones(batch, *shape, device=self.weights.device)
                for name, _, shape in self.dropouts}
        for stream in streams:
            with stream:
                for name, p, _ in self.dropouts:
                    masks[name].append(nn.functional.dropout(ones[name], p, training=True))
        return {f"{name}.noise": torch.stack(m) for name, m in masks.items()}

    def _params(self) -> dict[str, torch.Tensor]:
        parts = self.weights.split([s.size for s in self.slots], dim=1)
        return {s.name: part.view(len(part), *s.shape) for s, part in zip(self.slots, parts, strict=True)}

    def _one(self, params: dict, noise: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, {**params, **noise}, (x,))

    def _one_with_features(self, params: dict, noise: dict, x: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        return functional_call(self.template, {**params, **noise}, (x,)), self.tap.features

    def __call__(self, noise: dict[str, torch.Tensor], x: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (M, B, K) of (M, B, C, H, W) inputs, and features when asked for."""
        out = self._batched(self._params(), noise, x)
        return out if self.tap is not None else (out, None)

    def close(self) -> None:
        if self.tap is not None:
            self.tap.remove()


# ----------------------------------------------------------------------------- one group


@dataclass
class _Member:
    """What one model of a group carries through training, as ``fit`` would hold it."""

    job: ModelJob
    model: nn.Module
    subset: np.ndarray
    regularizer: Regularizer | None
    head_optimizer: torch.optim.Optimizer | None
    stream: _Stream
    shuffler: torch.Generator


def _member(arch: str, width: float, job: ModelJob, device: torch.device) -> _Member:
    # The order of global-RNG draws is train_model's: the model's init, then its regularizer's heads.
    model = seeded_model(arch, width, job.config, device)
    subset = training_subset(job.data.train, job.config)
    regularizer = build_regularizer(model, job.config, device, job.data.train, subset, job.data.num_groups)
    heads = list(regularizer.parameters()) if regularizer is not None else []
    head_optimizer = make_optimizer(job.config.optimizer, heads, job.config.lr) if heads else None
    shuffler = torch.Generator().manual_seed(job.config.seed)
    return _Member(job, model, subset, regularizer, head_optimizer, _Stream(device), shuffler)


def _group_key(job: ModelJob) -> tuple:
    """Models with equal keys take steps of equal batch shape and one optimizer kind, and
    their regularizers (if any) read one tap, which the stacked network captures for all."""
    c = job.config
    tap = None if c.regularizer == "none" else regularizer_tap(c.regularizer, c.reg_options)
    return c.optimizer, c.epochs, c.batch_size, len(training_subset(job.data.train, c)), tap


def _training_bank(members: Sequence[_Member], device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Every member's training images, labels and groups in one tensor each on ``device``,
    with the row each member's subset starts at; members training on the same subset of the
    same pool share rows."""
    starts, seen, parts, rows = [], {}, [], 0
    for m in members:
        key = (id(m.job.data.train), hashlib.sha1(m.subset.tobytes()).hexdigest())
        if key not in seen:
            seen[key] = rows
            parts.append(m)
            rows += len(m.subset)
        starts.append(seen[key])

    def bank(field: str) -> torch.Tensor:
        arrays = [getattr(m.job.data.train, field)[m.subset] for m in parts]
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays))).to(device)

    return bank("images"), bank("labels"), bank("bias"), starts


def fit_group(members: Sequence[_Member], device: torch.device) -> list[FitResult]:
    """Train the members' models together, in place; each gets what ``fit`` would return."""
    first = members[0].job.config
    if len({_group_key(m.job) for m in members}) != 1:
        raise VectorizeError("a group's models must share optimizer, epochs, batch_size and subset size")
    images, labels, sensitive, starts = _training_bank(members, device)
    n, batch_size = len(members[0].subset), first.batch_size
    regularized = [i for i, m in enumerate(members) if m.regularizer is not None]
    head_optimizers = [m.head_optimizer for m in members if m.head_optimizer is not None]
    taps = {m.regularizer.tap for m in members if m.regularizer is not None}
    net = StackedNetwork([m.model for m in members], tuple(images.shape[1:]),
                         features=taps.pop() if regularized else None)
    optimizer = StackedOptimizer(first.optimizer, net.weights, [m.job.config.lr for m in members])
    task_weights = torch.tensor([m.regularizer.task_weight if m.regularizer is not None else 1.0
                                 for m in members], device=device)
    total_steps, step = first.epochs * -(-n // batch_size), 0
    results = [FitResult(float("nan"), 0.0)] * len(members)
    for _ in range(first.epochs):
        epoch = [shuffled_batches(n, batch_size, m.shuffler) for m in members]
        rows = torch.stack([start + torch.cat(b) for start, b in zip(starts, epoch, strict=True)]).to(device)
        ce_total = torch.zeros(len(members), device=device)
        reg_total = torch.zeros(len(members), device=device)
        for begin in range(0, n, batch_size):
            idx = rows[:, begin : begin + batch_size]
            b = idx.shape[1]
            target = labels[idx]
            noise = net.draw_noise([m.stream for m in members], b)
            logits, features = net(noise, as_batch(images[idx], device))
            ce = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
            ce = ce.view(len(members), b).mean(1)
            ce_total += ce.detach() * b
            loss = (ce * task_weights).sum()
            for i in regularized:
                m = members[i]
                with m.stream:  # a regularizer may draw (BinaryBernoulli samples its code)
                    term = regularizer_term(m.regularizer, step / total_steps, features[i], logits[i],
                                            target[i], sensitive[idx[i]])
                reg_total[i] += term.detach() * b
                loss = loss + term
            optimizer.zero_grad()
            for opt in head_optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for opt in head_optimizers:
                opt.step()
            step += 1
        ce_mean, reg_mean = (ce_total / n).tolist(), (reg_total / n).tolist()
        results = [FitResult(c, r) for c, r in zip(ce_mean, reg_mean, strict=True)]
    net.close()
    with torch.no_grad():
        for m, row in zip(members, net.weights.detach().cpu().numpy(), strict=True):
            m.model.load_state_dict(unflatten(row, net.slots))
    return results


def fit_jobs(arch: str, width: float, jobs: Sequence[ModelJob], device: torch.device | str = "cpu",
             ) -> list[tuple[nn.Module, FitResult]]:
    """Train ``jobs`` as one stacked network, without evaluating them: each trained model, and
    what :func:`~modelzoo.training.fit` would have returned for it."""
    device = torch.device(device)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):  # leave the caller's global RNG as it was
        members = [_member(arch, width, job, device) for job in jobs]
        fitted = fit_group(members, device)
    return [(m.model, f) for m, f in zip(members, fitted, strict=True)]


def train_group(arch: str, width: float, jobs: Sequence[ModelJob], device: torch.device | str = "cpu",
                eval_size: int = 0) -> Iterator[tuple[int, ModelResult]]:
    """Train ``jobs`` as one stacked network, then evaluate and yield each model in turn."""
    device = torch.device(device)
    started = time.perf_counter()
    trained = fit_jobs(arch, width, jobs, device)
    share = (time.perf_counter() - started) / len(jobs)
    for job, (model, fitted) in zip(jobs, trained, strict=True):
        yield job.index, evaluate(model, job.data, fitted, device, eval_size,
                                  started=time.perf_counter() - share)


# ----------------------------------------------------------------------------- entry point


def plan_groups(arch: str, width: float, jobs: Sequence[ModelJob], vectorize: int) -> list[list[ModelJob]]:
    """Split ``jobs`` into groups of at most ``vectorize`` models that can train together, in
    order of their first model; groups of one are trained by ``train_model``."""
    if vectorize <= 1 or not vectorizable_architecture(build_model(arch, width)):
        return [[job] for job in jobs]
    by_key: dict[tuple, list[list[ModelJob]]] = {}
    groups: list[list[ModelJob]] = []
    for job in jobs:
        if not job.config.default_recipe or not regularizer_vectorizable(job.config.regularizer):
            groups.append([job])  # a recipe, or a random layer inside the network: one at a time
            continue
        key = _group_key(job)
        chunks = by_key.setdefault(key, [])
        if not stackable_optimizer(key[0]) or not chunks or len(chunks[-1]) >= vectorize:
            chunks.append([])
            groups.append(chunks[-1])
        chunks[-1].append(job)
    return groups


def train_models(arch: str, width: float, jobs: Sequence[ModelJob], device: torch.device | str = "cpu",
                 eval_size: int = 0, vectorize: int = 1) -> Iterator[tuple[int, ModelResult]]:
    """Train and evaluate every job, up to ``vectorize`` models at a time; yield (index, result)
    as each model is done. ``vectorize`` 1 is exactly ``train_model`` per model."""
    for group in plan_groups(arch, width, jobs, vectorize):
        if len(group) == 1:
            job = group[0]
            yield job.index, train_model(arch, width, job.config, job.data, device, eval_size)
        else:
            yield from train_group(arch, width, group, device, eval_size)
