"""Weight rows of a zoo a chunk at a time, as the report reads them (through :mod:`modelzoo.zoo`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from modelzoo.zoo import Zoo

CHUNK_MODELS = 256  # models per chunk of weights: one chunk is in memory at a time


def weight_blocks(zoo: Zoo, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(position in ``rows``, weight rows) for the done models ``rows``, ``CHUNK_MODELS`` at a time."""
    for start, (_, weights) in zip(range(0, len(rows), CHUNK_MODELS), zoo.weight_chunks(rows, CHUNK_MODELS),
                                   strict=True):
        yield start, weights
