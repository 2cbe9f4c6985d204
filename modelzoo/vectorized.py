"""Vectorized training: many zoo models trained in one batched computation.

Part of the trainer stage (dataset → **trainer** + regularizer → store). :func:`train_models`
trains the models of a store block; with ``vectorize`` > 1 it groups models whose training
settings allow it (:func:`plan_groups`) and trains each group as one network of stacked
weights: every model's parameters are a row of one (M, P) tensor, ``torch.func.vmap`` runs
the architecture over per-model input batches (M, B, C, H, W) through ``functional_call``,
so convolutions become grouped convolutions and dense layers batched matrix products. The
group trains in the one training loop, :func:`modelzoo.loop.train_loop`, that
:func:`~modelzoo.training.fit` runs for one model: here its trainee is the stacked network with
one :class:`StackedOptimizer` (Adam or SGD with momentum, each elementwise, with one learning
rate per row; each row's weight decay is added to its gradient first, as torch does), which
equals one optimizer per model. So the recipe is each model's own in a bank as it is alone:
weight decay, learning-rate schedule, and a validation split scored after every epoch on the
model's own network (its row loaded into it), whose best epoch's weights it can end on.

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
  rate, weight decay, schedule, validation split and selection, seed, data, regularizer and γ
  may differ within a group;
* a model whose regularizer needs hooks of its own (BinaryBernoulli samples its code inside the
  network, which ``vmap`` cannot; LNTL reads the input images), a model with no partner in
  its block, an architecture with buffers (e.g. batch norm, whose running statistics ``vmap``
  cannot update in place) or with random modules other than ``nn.Dropout``, and an optimizer
  configured beyond what :class:`StackedOptimizer` implements, are trained one at a time.

Metrics are computed per model after training with the same code as ``train_model``. A
model's ``wall_seconds`` is its share of its group's training time plus its own evaluation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from fairtrain.regularizers import FeatureTap, Tap, regularizer_tap, regularizer_vectorizable
from modelzoo.architectures import build_model, layout, unflatten
from modelzoo.config import ModelConfig
from modelzoo.loop import FitResult, Member, train_loop
from modelzoo.stacked_optimizer import StackedOptimizer, VectorizeError, stackable_optimizer
from modelzoo.training import (
    ModelResult,
    TrainingData,
    as_batch,
    evaluate,
    make_optimizer,
    member,
    seeded_model,
    train_model,
    training_subset,
)

# StackedOptimizer and VectorizeError live in modelzoo.stacked_optimizer; exported here as part of this API.
__all__ = ["ModelJob", "StackedOptimizer", "VectorizeError", "dropout_calls", "fit_jobs",
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


# ----------------------------------------------------------------------------- the bank


class _Bank:
    """The loop's :class:`~modelzoo.loop.Trainee` for a group: the members' networks as one
    :class:`StackedNetwork`, one :class:`StackedOptimizer` with a learning rate (and weight
    decay) per row, and each regularizer's heads under a torch optimizer of their own, as
    ``fit`` would step them."""

    def __init__(self, members: Sequence[Member], device: torch.device) -> None:
        self.members, self.device = members, device
        configs = [m.config for m in members]
        taps = {m.regularizer.tap for m in members if m.regularizer is not None}
        self.net = StackedNetwork([m.model for m in members], tuple(members[0].train.images.shape[1:]),
                                  features=taps.pop() if taps else None)
        self.optimizer = StackedOptimizer(configs[0].optimizer, self.net.weights, [c.lr for c in configs])
        decays = [c.weight_decay for c in configs]
        self.decays = torch.tensor(decays, device=device)[:, None] if any(decays) else None
        self.heads = {i: make_optimizer(c.optimizer, list(m.regularizer.parameters()), c.lr, c.weight_decay)
                      for i, (m, c) in enumerate(zip(members, configs, strict=True))
                      if m.regularizer is not None and list(m.regularizer.parameters())}

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        noise = self.net.draw_noise([m.stream for m in self.members], images.shape[1])
        return self.net(noise, as_batch(images, self.device))

    def set_lrs(self, lrs: Sequence[float]) -> None:
        self.optimizer.lrs.copy_(torch.tensor(lrs)[:, None])
        for i, head in self.heads.items():
            for group in head.param_groups:
                group["lr"] = lrs[i]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()
        for head in self.heads.values():
            head.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.decays is not None:
            # torch's Adam and SGD apply L2 weight decay as grad + wd·w before their update.
            with torch.no_grad():
                self.net.weights.grad.addcmul_(self.net.weights, self.decays)
        self.optimizer.step()
        for head in self.heads.values():
            head.step()

    def current(self, index: int) -> nn.Module:
        model = self.members[index].model
        model.load_state_dict(unflatten(self.net.weights[index].detach().cpu().numpy(), self.net.slots))
        return model

    def finish(self) -> None:
        self.net.close()
        for index in range(len(self.members)):
            self.current(index)


def _member(arch: str, width: float, job: ModelJob, device: torch.device) -> Member:
    # The order of global-RNG draws is train_model's: the model's init, then its regularizer's
    # heads; the member's private stream starts where fit's training draws would.
    model = seeded_model(arch, width, job.config, device)
    data = job.data
    one = member(model, job.config, device, data.train, data.num_groups, data.val)
    one.stream = _Stream(device)
    return one


def _group_key(job: ModelJob) -> tuple:
    """Models with equal keys take steps of equal batch shape and one optimizer kind, and
    their regularizers (if any) read one tap, which the stacked network captures for all."""
    c = job.config
    tap = None if c.regularizer == "none" else regularizer_tap(c.regularizer, c.reg_options)
    return c.optimizer, c.epochs, c.batch_size, len(training_subset(job.data.train, c)), tap


def fit_jobs(arch: str, width: float, jobs: Sequence[ModelJob], device: torch.device | str = "cpu",
             ) -> list[tuple[nn.Module, FitResult]]:
    """Train ``jobs`` as one stacked network, without evaluating them: each trained model, and
    what :func:`~modelzoo.training.fit` would have returned for it."""
    device = torch.device(device)
    if len({_group_key(job) for job in jobs}) != 1:
        raise VectorizeError("a group's models must share optimizer, epochs, batch_size, subset size "
                             "and regularizer tap")
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):  # leave the caller's global RNG as it was
        members = [_member(arch, width, job, device) for job in jobs]
        fitted = train_loop(_Bank(members, device), members, device)
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
        if not regularizer_vectorizable(job.config.regularizer):
            groups.append([job])  # a random layer inside the network, or hooks of its own: one at a time
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
