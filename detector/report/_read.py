"""The zoo as the report reads it: the one place in :mod:`detector.report` that touches the store.

Everything else asks :class:`ReportZoo` for columns, attributes, labels and weight chunks, so moving
the report onto another reader (the :mod:`modelzoo.zoo` façade) changes this file only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detector import evaluate
from modelzoo.store import ZooStore

if TYPE_CHECKING:
    from detector.models import WeightSet
    from modelzoo.architectures import TensorSlot
    from modelzoo.spec import ZooSpec

CHUNK_MODELS = 256  # models per chunk of weights: one chunk is in memory at a time


class ReportZoo:
    """Read-only view of a zoo store with the questions the report asks of it."""

    def __init__(self, store: ZooStore) -> None:
        self._store = store

    @classmethod
    def open(cls, path: str | Path) -> ReportZoo:
        return cls(ZooStore.open(path))

    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def spec(self) -> ZooSpec:
        return self._store.spec

    @property
    def layout(self) -> list[TensorSlot]:
        return self._store.layout

    @property
    def n_models(self) -> int:
        return self._store.n_models

    @property
    def done(self) -> np.ndarray:
        """One bool per model: its weights are written."""
        return self._store.done

    @property
    def spec_digest(self) -> str:
        return self._store.group.attrs["spec_digest"]

    def attr(self, name: str, default: Any = None) -> Any:
        """A zoo-level attribute (``data_source``, ``data_fingerprint``, ``groups``), or ``default``."""
        return self._store.group.attrs.get(name, default)

    def column(self, name: str) -> np.ndarray:
        """One value per model of a field such as ``config/gamma`` or ``metrics/leakage``."""
        return self._store.column(name)

    def config_axes(self) -> list[str]:
        """The names of the per-model config fields (``regularizer``, ``gamma``, ``reg.beta``, …)."""
        return self._store.config_fields()

    def labels(self, target: str) -> np.ndarray:
        """Every model's label for a detector target (``bias_level``, ``biased``, ``regularizer``)."""
        return evaluate.labels(self._store, target)

    def split_rows(self, split: str, train_pool: str) -> tuple[np.ndarray, np.ndarray]:
        """(train rows, held-out rows) of the split a detector was trained with."""
        return evaluate.split_rows(self._store, split, train_pool)

    def weight_chunks(self, rows: np.ndarray) -> Iterator[WeightSet]:
        """The weights of done models ``rows``, in order, ``CHUNK_MODELS`` at a time."""
        return evaluate.weight_chunks(self._store, rows, CHUNK_MODELS)

    def weight_blocks(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(position in ``rows``, weight rows) a chunk at a time; ``rows`` are checked once."""
        starts = range(0, len(rows), CHUNK_MODELS)
        for start, chunk in zip(starts, self.weight_chunks(rows), strict=True):
            yield start, chunk.weights
