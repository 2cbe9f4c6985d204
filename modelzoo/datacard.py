"""Data cards: what one zoo model trains on, as a table and a picture a person can check.

Between the dataset and the trainer stages (dataset → **card**; the trainer draws the very
same subset). ``weightbias zoo data SPEC --model I --out DIR`` writes ``card.json`` (the
class × sensitive-group table of model I's training set, and how often the group differs
from the class) and ``train_grid.png`` (training images, one row per class), so a user sees
whether "σ² = 0.02" or "skew 0.9 toward caucasian" means what they think before generating
thousands of models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from modelzoo.atomic import write_bytes_atomic, write_text_atomic
from modelzoo.layouts import ARCH_INFO
from modelzoo.spec import ZooSpec, load_spec

GRID_COLUMNS = 12


def data_card(spec: ZooSpec | str | Path, index: int, out: str | Path,
              data_dir: str | Path | None = None) -> dict[str, Any]:
    """Write model ``index``'s data card into folder ``out``; return what ``card.json`` holds."""
    from modelzoo.training import training_data, training_subset

    spec = spec if isinstance(spec, ZooSpec) else load_spec(spec)
    config = spec.config(index)
    train = training_data(spec, config, data_dir).train
    subset = training_subset(train, config)
    labels, groups = train.labels[subset], train.bias[subset]
    task = spec.task_info
    n_classes = ARCH_INFO[spec.arch].num_classes
    table = np.zeros((n_classes, task.num_groups), dtype=np.int64)
    np.add.at(table, (labels, groups), 1)
    card = {
        "model": index, "task": spec.task, "config": config.to_dict(),
        "n_train": len(subset), "groups": list(task.groups),
        "class_by_group": table.tolist(),
        "group_share": (table.sum(axis=0) / max(len(subset), 1)).round(4).tolist(),
    }
    if task.num_groups == n_classes:  # a colour per digit: how often the colour is another digit's
        card["group_differs_from_class"] = round(float((groups != labels).mean()), 4)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "card.json", json.dumps(card, indent=2))
    write_bytes_atomic(out / "train_grid.png", _grid_png(train.images[subset], labels, n_classes))
    return card


def _grid_png(images: np.ndarray, labels: np.ndarray, n_classes: int) -> bytes:
    """Up to GRID_COLUMNS images of each class, one row per class (black where a class runs out)."""
    from io import BytesIO

    from PIL import Image

    _, channels, height, width = images.shape
    grid = np.zeros((n_classes * height, GRID_COLUMNS * width, channels), dtype=np.uint8)
    for label in range(n_classes):
        for column, image in enumerate(images[labels == label][:GRID_COLUMNS]):
            top, left = label * height, column * width
            grid[top:top + height, left:left + width] = image.transpose(1, 2, 0)
    scale = max(1, 96 // height)  # small digits are enlarged so a person can see their colour
    picture = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    buffer = BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()

