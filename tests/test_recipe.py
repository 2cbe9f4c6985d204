"""The training recipe: weight decay, learning-rate schedules, an unbiased validation split carved
from the training pool, and best-validation selection (real MNIST, real torch, Ray and Zarr)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import modelzoo
from modelzoo.datasets import ImageSet, nearest_color
from modelzoo.generation import generate
from modelzoo.loop import train_loop
from modelzoo.spec import SpecError, parse_spec
from modelzoo.tasks import get_task
from modelzoo.training import OneModel, fit, member, predict, seeded_model, training_subset
from tests.conftest import tiny_spec_dict

RECIPE = {"weight_decay": 1e-4, "lr_schedule": "step", "lr_step": 2, "lr_decay": 0.5, "val_size": 300}


def test_a_spec_without_recipe_axes_stores_and_trains_as_before() -> None:
    spec = parse_spec(tiny_spec_dict())
    assert not set(modelzoo.spec.RECIPE_AXES) & set(spec.axes)
    assert spec.config(0).default_recipe and "val" not in spec.task_info.data_keys(spec.config(0))
    assert "val_acc" not in modelzoo.zoo.scalar_metrics(spec)


def test_recipe_axes_are_typed_columns_and_schedules_follow_their_formulas() -> None:
    spec = parse_spec(tiny_spec_dict(**RECIPE, select="best_val"))
    assert spec.axes[-6:] == ["weight_decay", "lr_schedule", "lr_step", "lr_decay", "val_size", "select"]
    config = spec.config(1)
    assert spec.config_values(1) == config.to_dict() and not config.default_recipe
    assert [config.replace(epochs=6).lr_factor(e) for e in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    cosine = config.replace(lr_schedule="cosine", epochs=4)
    assert [cosine.lr_factor(e) for e in range(4)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    assert config.replace(lr_schedule="constant").lr_factor(3) == 1.0
    assert spec.task_info.data_keys(config)["val"] == ("val", config.bias_level, config.pool)


@pytest.mark.parametrize(("fixed", "message"), [
    ({"lr_schedule": "linear"}, "fixed.lr_schedule: value 'linear' must be one of ['constant', 'step'"),
    ({"weight_decay": 1.5}, "fixed.weight_decay: value 1.5 must be in [0, 1)"),
    ({"lr_decay": 0.0}, "fixed.lr_decay: value 0.0 must be in (0, 1]"),
    ({"val_size": 0}, "fixed.val_size: value 0 must be in [1, 1,000,000] (leave val_size out"),
    ({"select": "best_val"}, "fixed.select: best_val selects on a validation split; give val_size"),
    ({"select": "best"}, "fixed.select: value 'best' must be one of ['last', 'best_val']"),
])
def test_bad_recipe_values_name_their_key(fixed: dict, message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(tiny_spec_dict(**fixed))


def test_validation_images_are_held_out_of_training_and_carry_no_colour_bias(mnist) -> None:
    spec = parse_spec(tiny_spec_dict(val_size=2000, train_size=0))
    config = spec.config(0)  # σ² 0.02: the training colours follow the digit
    data = modelzoo.training_data(spec, config)
    train_rows = training_subset(data.train, config)
    val_rows = spec.task_info.validation_subset(data.train, config)
    assert len(val_rows) == 2000 and len(train_rows) == len(data.train) - 2000
    assert not np.intersect1d(train_rows, val_rows).size
    np.testing.assert_array_equal(data.val.labels, data.train.labels)  # the same digits, recoloured
    follows = (nearest_color(data.val.colors[val_rows]) == data.val.labels[val_rows]).mean()
    trained = (nearest_color(data.train.colors[train_rows]) == data.train.labels[train_rows]).mean()
    assert follows < 0.2 < 0.7 < trained  # colour-random (≈ 0.1) where training follows the digit
    with pytest.raises(modelzoo.WeightbiasError, match="larger than pool A's 28000 images left beside"):
        training_subset(data.train, config.replace(train_size=28001))


def test_face_validation_is_balanced_over_gender_and_group_and_outside_training() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    pool = ImageSet(np.zeros((n, 3, 2, 2), np.uint8), rng.integers(0, 2, n), rng.integers(0, 3, n))
    task = get_task("face_gender")
    config = modelzoo.ModelConfig.from_dict("face_gender", {
        "index": 0, "bias_group": "caucasian", "skew": 0.8, "seed": 3, "train_size": 900, "val_size": 120})
    val_rows = task.validation_subset(pool, config)
    assert not np.intersect1d(val_rows, task.training_subset(pool, config)).size
    cells = np.bincount(pool.bias[val_rows] * 2 + pool.labels[val_rows], minlength=6)
    assert cells.tolist() == [20] * 6
    with pytest.raises(modelzoo.WeightbiasError, match=r"val_size 6000 needs 1000 east_asian faces"):
        task.validation_subset(pool, config.replace(val_size=6000))


@pytest.fixture(scope="module")
def recipe_data(mnist):
    spec = parse_spec(tiny_spec_dict(epochs=4, train_size=1024, val_size=500, lr=3e-3))
    config = spec.config(0)
    return spec, config, modelzoo.training_data(spec, config)


def test_best_validation_selection_ends_on_the_best_epochs_weights(recipe_data, one_torch_thread) -> None:
    spec, config, data = recipe_data
    device = torch.device("cpu")
    scores = {}
    for select in ("last", "best_val"):
        chosen = config.replace(select=select)
        model = seeded_model(spec.arch, spec.width, chosen, device)
        fitted = fit(model, data.train, chosen, device, data.num_groups, data.val)
        rows = spec.task_info.validation_subset(data.train, chosen)
        predicted, _ = predict(model, data.val.images[rows], device)
        # What the model ends with scores exactly the validation accuracy it reports.
        assert fitted.val_acc == pytest.approx(float((predicted == data.val.labels[rows]).mean()))
        scores[select] = fitted
    assert scores["last"].best_epoch == config.epochs
    assert 1 <= scores["best_val"].best_epoch <= config.epochs
    assert scores["best_val"].val_acc >= scores["last"].val_acc


def test_weight_decay_shrinks_the_weights(recipe_data, one_torch_thread) -> None:
    spec, config, data = recipe_data
    norms = []
    for decay in (0.0, 0.3):
        chosen = config.replace(weight_decay=decay, val_size=0, epochs=2)
        model = seeded_model(spec.arch, spec.width, chosen, torch.device("cpu"))
        fit(model, data.train, chosen, torch.device("cpu"), data.num_groups)
        norms.append(float(torch.cat([p.detach().flatten() for p in model.parameters()]).norm()))
    assert norms[1] < 0.8 * norms[0]


def test_a_warm_up_trains_the_task_alone_then_the_regularizer_joins_on_a_restarted_schedule(
        recipe_data, one_torch_thread) -> None:
    spec, config, data = recipe_data
    warm = config.replace(epochs=5, warmup_epochs=2, warmup_lr=0.01, lr=0.001, lr_schedule="step", lr_step=2)
    assert [warm.lr_at(e) for e in range(5)] == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.0001])
    assert [warm.regularized(e) for e in range(5)] == [False, False, True, True, True]
    assert config.replace(warmup_epochs=0).lr_at(3) == config.lr  # no warm-up: as before
    device = torch.device("cpu")
    # Over the warm-up a regularized model trains exactly as a plain one (NDR draws nothing);
    # once NDR joins at a strength that dominates, they part.
    histories = {}
    runs = {"plain": {}, "ndr after 1": {"regularizer": "ndr", "gamma": 50.0, "warmup_epochs": 1}}
    for name, changes in runs.items():
        chosen = config.replace(epochs=2, select="best_val", **changes)
        model = seeded_model(spec.arch, spec.width, chosen, device)
        one = member(model, chosen, device, data.train, data.num_groups, data.val)
        fitted = train_loop(OneModel(one, device), [one], device)[0]
        histories[name] = one.validation.history
        if changes:  # best-validation selection only looks at the regularized epochs
            assert fitted.best_epoch == 2 and fitted.val_acc == histories[name][1]
    assert histories["plain"][0] == histories["ndr after 1"][0]
    assert histories["plain"][1] != histories["ndr after 1"][1]


def test_lntl_alternating_steps_train_its_heads_and_the_network(recipe_data, one_torch_thread) -> None:
    spec, config, data = recipe_data
    device = torch.device("cpu")
    chosen = config.replace(epochs=2, warmup_epochs=1, regularizer="lntl", val_size=0, optimizer="sgd",
                            lr=0.01)
    model = seeded_model(spec.arch, spec.width, chosen, device)
    one = member(model, chosen, device, data.train, data.num_groups)
    heads = [p.detach().clone() for p in one.regularizer.parameters()]
    fitted = train_loop(OneModel(one, device), [one], device)[0]
    assert fitted.reg_loss > 0 and math.isfinite(fitted.train_loss)
    after = list(one.regularizer.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(heads, after, strict=True))  # step two moved them
    assert type(one.regularizer).vectorizable is False  # two LNTL models never share a bank
    with pytest.raises(ValueError, match="trains one model at a time"):
        train_loop(OneModel(one, device), [one, one], device)


@pytest.mark.parametrize(("fixed", "message"), [
    ({"epochs": 3, "warmup_epochs": 3}, "fixed.warmup_epochs: 3 warm-up epochs leave no epoch of the 3"),
    ({"warmup_epochs": -1}, "fixed.warmup_epochs: value -1 must be in [0, 100,000)"),
    ({"warmup_lr": -0.1}, "fixed.warmup_lr: value -0.1 must be in [0, 10)"),
])
def test_bad_warm_ups_name_their_key(fixed: dict, message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(tiny_spec_dict(**fixed))


@pytest.mark.slow
def test_a_zoo_with_a_recipe_records_validation_and_verifies(ray_local, tmp_path: Path) -> None:
    spec = parse_spec(tiny_spec_dict(n_models=2, epochs=2, val_size=200, select="best_val",
                                     lr_schedule="cosine", weight_decay=1e-4))
    generate(spec, tmp_path / "zoo.zarr", progress=False)
    zoo = modelzoo.open_zoo(tmp_path / "zoo.zarr")
    assert zoo.done.all() and zoo.verify().ok
    assert set(zoo.column("metrics/best_epoch")) <= {1.0, 2.0}
    assert (zoo.column("config/lr_schedule") == "cosine").all()
    # The worker's validation record is the recipe's own: retrained here, model 0 matches it.
    config = spec.config(0)
    again = modelzoo.train_model(spec.arch, spec.width, config, modelzoo.training_data(spec, config),
                                 eval_size=spec.eval_size)
    assert zoo.column("metrics/val_acc")[0] == np.float32(again.metrics["val_acc"])
    assert zoo.column("metrics/best_epoch")[0] == again.metrics["best_epoch"]
