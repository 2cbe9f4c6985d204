"""The zoo as the report reads it: the one place in :mod:`detector.report` that touches the store.

A thin view over the :mod:`modelzoo.zoo` façade with the questions the report asks of it
(labels and splits as the detector package defines them, weight rows a chunk at a time).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detector import evaluate
from modelzoo.zoo import Zoo, open_zoo

if TYPE_CHECKING:
    from modelzoo.layouts import TensorSlot
    from modelzoo.spec import ZooSpec

CHUNK_MODELS = 256  # models per chunk of weights: one chunk is in memory at a time


class ReportZoo:
    """Read-only view of a zoo with the questions the report asks of it."""

    def __init__(self, zoo: Zoo) -> None:
        self.zoo = zoo

    @classmethod
    def open(cls, path: str | Path) -> ReportZoo:
        return cls(open_zoo(path))

    @property
    def path(self) -> Path:
        return self.zoo.path

    @property
    def spec(self) -> ZooSpec:
        return self.zoo.spec

    @property
    def layout(self) -> list[TensorSlot]:
        return list(self.zoo.layout)

    @property
    def n_models(self) -> int:
        return self.zoo.n_models

    @property
    def done(self) -> np.ndarray:
        """One bool per model: its weights are written."""
        return self.zoo.done

    @property
    def spec_digest(self) -> str:
        return self.zoo.attrs["spec_digest"]

    def attr(self, name: str, default: Any = None) -> Any:
        """A zoo-level attribute (``data_source``, ``data_fingerprint``, ``groups``), or ``default``."""
        return self.zoo.attrs.get(name, default)

    def column(self, name: str) -> np.ndarray:
        """One value per model of a field such as ``config/gamma`` or ``metrics/leakage``."""
        return self.zoo.column(name)

    def config_axes(self) -> list[str]:
        """The names of the per-model config fields (``regularizer``, ``gamma``, ``reg.beta``, …)."""
        return self.zoo.config_fields()

    def labels(self, target: str) -> np.ndarray:
        """Every model's label for a detector target (``bias_level``, ``biased``, ``regularizer``)."""
        return evaluate.labels(self.zoo, target)

    def split_rows(self, split: str, train_pool: str) -> tuple[np.ndarray, np.ndarray]:
        """(train rows, held-out rows) of the split a detector was trained with."""
        return evaluate.split_rows(self.zoo, split, train_pool)

    def weight_chunks(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        """The weight rows of done models ``rows``, in order, ``CHUNK_MODELS`` at a time."""
        for _, weights in self.zoo.weight_chunks(rows, CHUNK_MODELS):
            yield weights

    def weight_blocks(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(position in ``rows``, weight rows) a chunk at a time; ``rows`` are checked once."""
        return zip(range(0, len(rows), CHUNK_MODELS), self.weight_chunks(rows), strict=False)
