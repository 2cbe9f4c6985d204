"""A data card shows what one model of a spec trains on: the class × group table and a picture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import modelzoo
from modelzoo.datacard import data_card
from modelzoo.training import training_data, training_subset
from tests.conftest import tiny_spec_dict


@pytest.mark.slow  # renders and caches a ColoredMNIST pool
def test_the_card_counts_exactly_the_training_subset_the_trainer_draws(tmp_path: Path) -> None:
    spec = modelzoo.parse_spec(tiny_spec_dict())
    card = data_card(spec, 1, tmp_path / "card")  # model 1: σ² 0.05, pool A, 512 images
    assert json.loads((tmp_path / "card" / "card.json").read_text()) == card
    config = spec.config(1)
    train = training_data(spec, config).train
    subset = training_subset(train, config)
    table = np.array(card["class_by_group"])
    assert table.shape == (10, 10) and table.sum() == card["n_train"] == len(subset) == 512
    labels, groups = train.labels[subset], train.bias[subset]
    for digit in range(10):
        np.testing.assert_array_equal(table[digit], np.bincount(groups[labels == digit], minlength=10))
    assert card["group_differs_from_class"] == round(float((table.sum() - np.trace(table)) / table.sum()), 4)
    assert 0.3 < card["group_differs_from_class"] < 0.55  # σ² 0.05: two fifths in other colours
    with Image.open(tmp_path / "card" / "train_grid.png") as grid:
        assert grid.size == (12 * 28 * 3, 10 * 28 * 3)  # 12 images per class row, enlarged 3×
