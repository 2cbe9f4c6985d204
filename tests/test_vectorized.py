"""Vectorized multi-model training reproduces one-at-a-time training (real torch, MNIST, Ray, Zarr)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modelzoo.architectures import build_model, flatten
from modelzoo.config import ModelConfig
from modelzoo.datasets import ImageSet, render_colored_mnist
from modelzoo.generation import generate
from modelzoo.spec import SpecError, parse_spec
from modelzoo.training import ModelResult, TrainingData, seeded_model, train_model
from modelzoo.vectorized import (
    ModelJob,
    StackedOptimizer,
    VectorizeError,
    fit_jobs,
    plan_groups,
    train_models,
    vectorizable_architecture,
)
from modelzoo.zoo import open_zoo
from tests.conftest import tiny_spec_dict

EVAL = 200


@pytest.fixture(scope="module")
def colored(mnist) -> TrainingData:
    """ColoredMNIST σ² = 0.02: 4,000 digits of pool A and 1,000 test digits, coloured as the
    zoo colours them (the models here train on 128 and are scored on 200, so a whole pool
    would only cost rendering time)."""
    rng = np.random.default_rng(0)
    train = mnist.train_images[:4000], mnist.train_labels[:4000]
    test = mnist.test_images[:1000], mnist.test_labels[:1000]
    return TrainingData(render_colored_mnist(*train, 0.02, False, rng),
                        render_colored_mnist(*test, 0.02, False, rng),
                        render_colored_mnist(*test, 0.02, True, rng))


def _config(index: int, **settings) -> ModelConfig:
    """A ColoredMNIST config; ``settings`` are flat (a regularizer option is ``reg.<option>``)."""
    return ModelConfig.from_dict("colored_mnist", {
        "index": index, "sigma2": 0.02, "pool": "A", "lr": 1e-3, "epochs": 1, "batch_size": 64,
        "train_size": 128, "optimizer": "adam", "seed": 50 + index, "regularizer": "none",
        "gamma": 1.0} | settings)


def _assert_same_training(got: ModelResult, want: ModelResult, config: ModelConfig, n_eval: int) -> None:
    """Equal within floating-point tolerance. Batched convolutions sum in another order, so
    gradients differ by ~1e-6 relative. SGD keeps that size; Adam divides each step by
    sqrt(v) + 1e-8, so on the rare weights whose gradient is itself near 1e-8 a 1e-9 rounding
    difference changes that weight's step by up to lr. Hence: nearly every weight within
    1e-5, none further than the few steps could move it."""
    diff = np.abs(got.weights - want.weights)
    steps = config.epochs * -(-config.train_size // config.batch_size)
    if config.optimizer == "sgd":
        assert diff.max() < 1e-6, f"model {config.index}: SGD weights differ by {diff.max():.2e}"
    else:
        assert np.quantile(diff, 0.99) < 1e-5, f"model {config.index}: {np.quantile(diff, 0.99):.2e}"
        assert diff.max() <= 2 * config.lr * steps
    g, w = got.metrics, want.metrics
    for name in ("unbiased_acc", "biased_acc"):
        assert abs(g[name] - w[name]) <= 2 / n_eval, (name, g[name], w[name])
    np.testing.assert_allclose(g["per_class_acc"], w["per_class_acc"], atol=0.05)
    np.testing.assert_allclose(g["per_group_acc"], w["per_group_acc"], atol=0.05)
    assert abs(g["leakage"] - w["leakage"]) <= 0.05
    for name in ("train_loss", "reg_loss"):
        assert g[name] == pytest.approx(w[name], rel=1e-4, abs=1e-6), name
    assert set(g) == set(w)
    if "val_acc" in w:
        assert abs(g["val_acc"] - w["val_acc"]) <= 2 / config.val_size and g["best_epoch"] == w["best_epoch"]


@pytest.mark.slow
def test_digit_cnn_group_matches_train_one_and_a_lone_model_falls_back(colored: TrainingData) -> None:
    # Two data objects (a second, shorter pool) and two learning rates inside one group; the
    # SGD model has no partner, so train_model trains it: identical to the last bit.
    half = colored.train
    half = TrainingData(ImageSet(half.images[:2000], half.labels[:2000], half.bias[:2000]),
                        colored.test_biased, colored.test_unbiased)
    jobs = [ModelJob(0, _config(0, lr=2e-3), colored),
            ModelJob(1, _config(1, optimizer="sgd", lr=0.05), colored),
            ModelJob(2, _config(2), half)]
    groups = plan_groups("digit-cnn", 1.0, jobs, vectorize=4)
    assert [[j.index for j in g] for g in groups] == [[0, 2], [1]]
    results = dict(train_models("digit-cnn", 1.0, jobs, "cpu", EVAL, vectorize=4))
    assert sorted(results) == [0, 1, 2]
    wants = {job.index: train_model("digit-cnn", 1.0, job.config, job.data, "cpu", EVAL) for job in jobs}
    for job in jobs:
        _assert_same_training(results[job.index], wants[job.index], job.config, EVAL)
    lone, want = results[1], wants[1]
    assert np.array_equal(lone.weights, want.weights) and lone.metrics.keys() == want.metrics.keys()
    for name in set(want.metrics) - {"wall_seconds"}:
        np.testing.assert_array_equal(lone.metrics[name], want.metrics[name], err_msg=name)
    # Trained, not just copied: every model moved away from its initial weights.
    for job in jobs:
        start = flatten(seeded_model("digit-cnn", 1.0, job.config, torch.device("cpu")))
        assert np.abs(results[job.index].weights - start).max() > 1e-4


def test_regularizers_batch_with_their_own_heads_and_random_draws(colored: TrainingData) -> None:
    # GRAD brings a head (with batch norm), its optimizer and a ramped reversal weight; each
    # model's dropout stream is replayed in order, so with SGD the weights match tightly.
    # GRAD reads tanh of the bottleneck here, BinaryMI's own tap, so the two stack.
    settings = {"optimizer": "sgd", "lr": 0.05, "gamma": 0.5}
    jobs = [ModelJob(0, _config(0, regularizer="grad", **settings,
                                **{"reg.ramp": True, "reg.activation": "tanh"}), colored),
            ModelJob(1, _config(1, regularizer="binary_mi", **settings), colored)]
    assert plan_groups("digit-cnn", 1.0, jobs, 2) == [jobs]
    # BinaryBernoulli samples its code inside the network, which vmap cannot: it trains alone.
    sampled = ModelJob(2, _config(2, regularizer="binary_bernoulli", **settings), colored)
    assert plan_groups("digit-cnn", 1.0, [*jobs, sampled], 3) == [jobs, [sampled]]
    results = dict(train_models("digit-cnn", 1.0, jobs, "cpu", EVAL, vectorize=2))
    for job in jobs:
        want = train_model("digit-cnn", 1.0, job.config, job.data, "cpu", EVAL)
        _assert_same_training(results[job.index], want, job.config, EVAL)
        assert results[job.index].metrics["reg_loss"] != 0


def test_a_tap_on_a_convolution_map_batches_and_other_taps_train_apart(colored: TrainingData) -> None:
    # NDR reads conv2's map here (48×10×10 per image): captured under vmap for both models at once.
    settings = {"optimizer": "sgd", "lr": 0.05, "gamma": 0.5, "regularizer": "ndr", "reg.layer": "conv2"}
    jobs = [ModelJob(i, _config(i, **settings), colored) for i in range(2)]
    assert plan_groups("digit-cnn", 1.0, jobs, 2) == [jobs]
    results = dict(train_models("digit-cnn", 1.0, jobs, "cpu", EVAL, vectorize=2))
    for job in jobs:
        _assert_same_training(results[job.index], train_model("digit-cnn", 1.0, job.config, job.data,
                                                              "cpu", EVAL), job.config, EVAL)
    # A model tapping elsewhere, or with no regularizer, is not stacked with them; LNTL, whose
    # own hook reads the input images, trains alone.
    other = ModelJob(2, _config(2, **{**settings, "reg.layer": "conv1"}), colored)
    plain = ModelJob(3, _config(3, optimizer="sgd", lr=0.05), colored)
    lntl = ModelJob(4, _config(4, optimizer="sgd", lr=0.05, regularizer="lntl"), colored)
    lntl_too = ModelJob(5, _config(5, optimizer="sgd", lr=0.05, regularizer="lntl"), colored)
    assert plan_groups("digit-cnn", 1.0, [*jobs, other, plain, lntl, lntl_too], 6) == [
        jobs, [other], [plain], [lntl], [lntl_too]]
    trained = train_model("digit-cnn", 1.0, lntl.config, lntl.data, "cpu", EVAL)
    assert trained.metrics["reg_loss"] > 0


def test_dataset_level_balancing_is_prepared_alike_in_a_bank(colored: TrainingData) -> None:
    settings = {"optimizer": "sgd", "lr": 0.05, "regularizer": "group_balanced", "reg.per_class": True}
    jobs = [ModelJob(i, _config(i, **settings), colored) for i in range(2)]
    results = dict(train_models("digit-cnn", 1.0, jobs, "cpu", EVAL, vectorize=2))
    for job in jobs:
        want = train_model("digit-cnn", 1.0, job.config, job.data, "cpu", EVAL)
        _assert_same_training(results[job.index], want, job.config, EVAL)
        assert want.metrics["reg_loss"] != 0


@pytest.fixture(scope="module")
def colored_val(colored: TrainingData, mnist) -> TrainingData:
    """``colored`` with its pool's digits also drawn in colours independent of the digit: the
    images a validation split is scored on."""
    val = render_colored_mnist(mnist.train_images[:4000], mnist.train_labels[:4000], 0.02, True,
                               np.random.default_rng(1))
    return dataclasses.replace(colored, val=val)


def test_a_recipe_batches_weight_decay_schedules_and_best_validation(colored_val: TrainingData) -> None:
    # Each model of a bank keeps its own weight decay, schedule, validation split and selection;
    # with GRAD the heads' optimizer decays and follows the schedule too (SGD: tight match).
    adam = [{"weight_decay": 1e-3, "lr_schedule": "step", "lr_step": 1, "lr_decay": 0.5, "lr": 2e-3,
             "val_size": 300, "select": "best_val"},
            {"weight_decay": 5e-4, "lr_schedule": "cosine", "val_size": 300, "select": "best_val"},
            {"lr_schedule": "cosine", "val_size": 200},
            {"weight_decay": 1e-3}]
    grad = {"optimizer": "sgd", "regularizer": "grad", "gamma": 0.5, "val_size": 300, "select": "best_val"}
    sgd = [grad | {"lr": 0.05, "weight_decay": 1e-3, "lr_schedule": "step", "lr_step": 2},
           grad | {"lr": 0.05, "weight_decay": 5e-4, "lr_schedule": "cosine"}]
    jobs = [ModelJob(i, _config(i, epochs=3, **recipe), colored_val) for i, recipe in enumerate(adam + sgd)]
    assert plan_groups("digit-cnn", 1.0, jobs, 6) == [jobs[:4], jobs[4:]]
    results = dict(train_models("digit-cnn", 1.0, jobs, "cpu", EVAL, vectorize=6))
    for job in jobs:
        want = train_model("digit-cnn", 1.0, job.config, job.data, "cpu", EVAL)
        _assert_same_training(results[job.index], want, job.config, EVAL)
        assert ("val_acc" in want.metrics) == bool(job.config.val_size)
    # Best-validation selection restored an earlier epoch's weights somewhere in the banks.
    chosen = [results[job.index].metrics["best_epoch"] for job in jobs if job.config.select == "best_val"]
    assert min(chosen) < 3


def test_gender_cnn_matches_train_one(mnist) -> None:
    # Real MNIST digits padded to the face models' 48×48 input: gender-cnn's two classes are
    # odd/even digits, its three groups digit mod 3.
    gray = np.pad(mnist.train_images[:500], ((0, 0), (10, 10), (10, 10)))
    images = np.repeat(gray[:, None], 3, axis=1)
    digits = mnist.train_labels[:500]
    pool = ImageSet(images[:400], digits[:400] % 2, digits[:400] % 3)
    test = ImageSet(images[400:], digits[400:] % 2, digits[400:] % 3)
    data = TrainingData(pool, test, test, num_groups=3)
    jobs = [ModelJob(i, _config(i, batch_size=32, train_size=64, lr=lr), data)
            for i, lr in enumerate([1e-3, 2e-3])]
    results = dict(train_models("gender-cnn", 1.0, jobs, "cpu", 0, vectorize=2))
    for job in jobs:
        want = train_model("gender-cnn", 1.0, job.config, job.data, "cpu", 0)
        _assert_same_training(results[job.index], want, job.config, len(test))
        assert results[job.index].metrics["per_group_acc"].shape == (3,)


def test_groups_need_equal_batch_shapes_and_a_batchable_architecture(colored: TrainingData) -> None:
    # Steps of another batch shape (batch size, subset size) or another number of epochs: no partner.
    jobs = [ModelJob(0, _config(0), colored), ModelJob(1, _config(1, batch_size=32), colored),
            ModelJob(2, _config(2, train_size=64), colored), ModelJob(3, _config(3, epochs=2), colored)]
    assert [len(g) for g in plan_groups("digit-cnn", 1.0, jobs, vectorize=8)] == [1, 1, 1, 1]
    assert [len(g) for g in plan_groups("digit-cnn", 1.0, jobs[:1] * 5, vectorize=2)] == [2, 2, 1]
    assert [len(g) for g in plan_groups("digit-cnn", 1.0, jobs[:1] * 3, vectorize=1)] == [1, 1, 1]
    # Architectures vmap cannot batch exactly are never grouped.
    assert vectorizable_architecture(build_model("digit-cnn")) and vectorizable_architecture(
        build_model("gender-cnn"))
    assert not vectorizable_architecture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert not vectorizable_architecture(nn.Sequential(nn.Linear(4, 4), nn.Dropout2d(0.1)))
    assert not vectorizable_architecture(_TwiceDropped())


class _TwiceDropped(nn.Module):
    """Calls one dropout module twice per forward: one stand-in mask per module cannot serve it."""

    input_shape = (4,)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc(self.dropout(x)))


def test_bad_groups_are_refused(colored: TrainingData) -> None:
    with pytest.raises(VectorizeError, match="one learning rate per row"):
        StackedOptimizer("adam", torch.zeros(3, 5, requires_grad=True), [1e-3, 1e-3])
    jobs = [ModelJob(i, _config(i, batch_size=b), colored) for i, b in enumerate([64, 32])]
    with pytest.raises(VectorizeError, match="must share"):
        fit_jobs("digit-cnn", 1.0, jobs, "cpu")
    with pytest.raises(SpecError, match=r"zoo\.vectorize"):
        parse_spec(tiny_spec_dict() | {"zoo": tiny_spec_dict()["zoo"] | {"vectorize": 0}})


@pytest.mark.slow
def test_generate_vectorized_matches_one_at_a_time(ray_local, colored, tmp_path) -> None:
    raw = tiny_spec_dict(n_models=2, models_per_task=2, train_size=128, pool="A")
    del raw["fixed"]["lr"]
    raw["zoo"]["eval_size"] = EVAL
    raw["sweep"] = {"sigma2": [0.02], "lr": [1e-3, 2e-3]}
    plain = parse_spec(raw)
    vectorized = parse_spec(raw | {"zoo": raw["zoo"] | {"vectorize": 2}})
    assert vectorized.vectorize == 2 and vectorized.digest() == plain.digest()
    stores = {}
    for name, spec in (("plain", plain), ("vectorized", vectorized)):
        summary = generate(spec, tmp_path / f"{name}.zarr", progress=False)
        assert summary.n_trained == 2 and summary.n_done == 2
        stores[name] = open_zoo(tmp_path / f"{name}.zarr")
    a, b = stores["plain"], stores["vectorized"]
    assert a.done.all() and b.done.all()
    assert a.metric_fields() == b.metric_fields() and a.config_fields() == b.config_fields()
    for i in range(2):
        config = plain.config(i)
        want, got = (ModelResult(zoo.model_weights(i),
                                 {m: zoo.column(f"metrics/{m}")[i] for m in zoo.metric_fields()})
                     for zoo in (a, b))
        _assert_same_training(got, want, config, plain.eval_size)
    # The batched path did run in the Ray task: its convolutions round differently, so not bit-equal.
    assert b.spec.vectorize == 2
    assert any(not np.array_equal(a.model_weights(i), b.model_weights(i)) for i in range(2))
    # The spec digest ignores vectorize, so the vectorized store resumes as a plain one (nothing left).
    assert generate(plain, tmp_path / "vectorized.zarr", progress=False).n_trained == 0


@pytest.mark.slow
def test_the_vectorized_benchmark_runs_where_ray_and_zarr_are_not_installed(data_root) -> None:
    """``scripts/bench_zoo.py --vectorized`` is the GPU benchmark; GPU machines may lack Ray and
    Zarr, so its vectorized path must not import them. It prints one JSON line whose two sides
    trained the same models."""
    arguments = ["--data-dir", str(data_root), "--vectorized", "2", "--n-models", "2",
                 "--train-size", "128", "--eval-size", "100", "--num-cpus", "1"]
    blocked = ("import runpy, sys; sys.modules['ray'] = sys.modules['zarr'] = None; "
               f"sys.argv = ['bench_zoo.py', *{arguments!r}]; "
               "runpy.run_path('scripts/bench_zoo.py', run_name='__main__')")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, cwd=root,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = done.stdout.strip().splitlines()
    figures = json.loads(line)
    assert figures["benchmark"] == "vectorized_vs_one_at_a_time" and figures["group_sizes"] == [2]
    # Adam's tolerance (above): no weight further than the steps could move it; lr is drawn up to
    # 3e-3, and 128 images in batches of 64 are 2 steps.
    assert figures["max_abs_weight_diff"] <= 2 * 3e-3 * 2 and figures["max_unbiased_acc_diff"] <= 2 / 100
    assert figures["ratio_vectorized_over_one"] > 0
