"""Reading a zoo: the one façade every reader goes through (detectors, reports, CLI, scripts).

Fourth stage of the flow (trainer → **store** → detector). :func:`open_zoo` returns a
:class:`Zoo`: the spec and layout the store describes itself with, every model's config and
metric columns (as a dict of arrays, or a pandas DataFrame when pandas is installed), weight
rows read a chunk of models at a time, ``done`` flags, and :meth:`Zoo.info` /
:meth:`Zoo.verify`. It imports zarr and numpy only — no torch, no scikit-learn — so
``weightbias zoo info`` starts fast. The layout on disk and the write side (creation,
resume, the fault guarantees) are in :mod:`modelzoo.store`.

Example
-------
>>> zoo = open_zoo("quick.zarr")                                    # doctest: +SKIP
>>> zoo.column("config/sigma2")[zoo.done].mean()                    # doctest: +SKIP
>>> for rows, weights in zoo.weight_chunks(np.flatnonzero(zoo.done)):  # doctest: +SKIP
...     print(rows[:3], weights.shape)
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import Zstd
from zarr.storage import LocalStore

from modelzoo.config import ModelConfig
from modelzoo.errors import WeightbiasError
from modelzoo.layouts import TensorSlot, slots_from_records
from modelzoo.spec import ZooSpec, parse_spec
from modelzoo.tasks import Task

FORMAT = "weightbias-zoo"
FORMAT_VERSION = 1
SCALAR_METRICS = ("unbiased_acc", "biased_acc", "leakage", "train_loss", "reg_loss", "wall_seconds")
VALIDATION_METRICS = ("val_acc", "best_epoch")  # in zoos whose spec gives val_size
CHUNK_MODELS = 512  # weight rows read at a time: ~100 MB of digit-cnns


def scalar_metrics(spec: ZooSpec) -> tuple[str, ...]:
    """The one-number-per-model metrics a zoo of ``spec`` records."""
    return SCALAR_METRICS + (VALIDATION_METRICS if "val_size" in spec.axes else ())


class StoreError(WeightbiasError, RuntimeError):
    """A store that is missing, not a zoo, half-created, damaged, or made from another spec."""


def weights_checksum(row: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(row, dtype=np.float32).tobytes())


def column_checksum(values: np.ndarray) -> int:
    """CRC32 of a config column's values (strings joined by NUL), as stored at creation."""
    if values.dtype.kind in "UOT":
        return zlib.crc32("\x00".join(map(str, values.tolist())).encode())
    return zlib.crc32(np.ascontiguousarray(values).tobytes())


class Zoo:
    """A zoo on disk, read-only. Open it with :func:`open_zoo`."""

    def __init__(self, group: zarr.Group, path: Path) -> None:
        self.group = group
        self.path = path
        self.attrs: dict[str, Any] = dict(group.attrs)
        try:
            # The spec was validated when the store was created; re-reading it builds no regularizer.
            self.spec: ZooSpec = parse_spec(self.attrs["spec"], build_regularizers=False)
            self.layout: tuple[TensorSlot, ...] = slots_from_records(self.attrs["layout"])
            int(self.attrs["n_params"])
        except Exception as err:  # edited or damaged attributes surface as any of many types
            raise StoreError(f"{path}: the store's attributes (zarr.json) are damaged ({type(err).__name__}: "
                             f"{err}); restore the store, or regenerate it with --overwrite") from err

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> Zoo:
        """Open an existing, fully created zoo store (``mode`` 'r' or 'r+')."""
        path = local_path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: no zoo store here (no zarr.json)")
        try:
            group = zarr.open_group(path, mode=mode)
            attrs = group.attrs
        except Exception as err:  # zarr raises several types for unreadable metadata
            raise StoreError(f"{path}: unreadable Zarr group ({err})") from err
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{path}: a Zarr group but not a weightbias zoo")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: zoo format version {attrs.get('format_version')}, "
                             f"this weightbias reads {FORMAT_VERSION}")
        if attrs.get("state") != "ready":
            raise StoreError(f"{path}: half-created zoo store (creation was interrupted); "
                             "run `weightbias zoo generate` with the same spec to recreate it")
        return cls(group, path)

    # -- what the zoo is ---------------------------------------------------------------------
    @property
    def task(self) -> Task:
        return self.spec.task_info

    @property
    def arch(self) -> str:
        return self.spec.arch

    @property
    def width(self) -> float:
        return self.spec.width

    @property
    def n_models(self) -> int:
        return self.spec.n_models

    @property
    def n_params(self) -> int:
        return int(self.attrs["n_params"])

    def config(self, index: int) -> ModelConfig:
        """Model ``index``'s training config (a pure function of the stored spec)."""
        return self.spec.config(index)

    # -- columns -----------------------------------------------------------------------------
    @property
    def done(self) -> np.ndarray:
        """True for every model whose weights, checksum and metrics are all written."""
        return np.asarray(self.column("done"), dtype=bool)

    def config_fields(self) -> list[str]:
        return sorted(self.group["config"].array_keys())

    def metric_fields(self) -> list[str]:
        return sorted(self.group["metrics"].array_keys())

    def array(self, name: str) -> zarr.Array:
        """The store's array ``name``, or a :class:`StoreError` naming it when it is missing or its
        metadata (its zarr.json) is damaged."""
        try:
            array = self.group[name]
        except KeyError as err:
            raise StoreError(f"{self.path}: no array {name!r} in this zoo") from err
        except Exception as err:  # damaged metadata (zarr.json) of that array
            raise StoreError(f"{self.path}: the metadata of {name!r} is unreadable ({type(err).__name__}: "
                             f"{err}); run `weightbias zoo verify`") from err
        if not isinstance(array, zarr.Array):
            raise StoreError(f"{self.path}: {name!r} is a group, not an array: its metadata is damaged")
        return array

    def column(self, name: str, checked: bool = True) -> np.ndarray:
        """One per-model array by path: ``done``, ``checksum``, ``config/<axis>`` or
        ``metrics/<name>``. Strings come back as a plain fixed-width ``str`` array. A config
        column is ``checked`` against the checksum recorded when the store was made: a damaged
        or deleted chunk (which reads back as the fill value) raises instead of passing for data."""
        array = self.array(name)
        try:
            values = np.asarray(read_rows(array))
        except Exception as err:  # a truncated or garbled chunk surfaces as a codec error
            raise StoreError(f"{self.path}: {name!r} has an unreadable chunk ({err}); run `weightbias zoo "
                             "verify`, then re-run `zoo generate` with the same spec to repair it") from err
        # zarr hands out numpy's variable-width StringDType, which many libraries reject.
        values = np.array(values.tolist(), dtype=str) if values.dtype.kind == "T" else values
        recorded = self.attrs.get("config_checksums", {}).get(name.removeprefix("config/"))
        if checked and name.startswith("config/") and recorded is not None \
                and column_checksum(values) != recorded:
            raise StoreError(f"{self.path}: {name!r} no longer holds what the store recorded when it was "
                             "made (a damaged or deleted chunk); re-run `zoo generate` with the same spec "
                             "to repair it (`weightbias zoo verify` names the models)")
        return values

    def columns(self) -> dict[str, np.ndarray]:
        """Every per-model column, ``{"config/sigma2": ..., "metrics/unbiased_acc": ...}``,
        plus ``done``; an (N, K) metric (per-class or per-group accuracy) stays 2-D."""
        names = ["done", *(f"config/{a}" for a in self.config_fields()),
                 *(f"metrics/{m}" for m in self.metric_fields())]
        return {name: self.column(name) for name in names}

    def table(self):
        """The columns as a pandas DataFrame, one row per model (needs pandas); 2-D metrics
        become one column per class or group (``per_group_acc[east_asian]``)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise WeightbiasError("Zoo.table() needs pandas (pip install pandas); Zoo.columns() "
                                  "gives the same data as a dict of arrays") from err
        flat: dict[str, np.ndarray] = {}
        for name, values in self.columns().items():
            short = name.split("/", 1)[-1]
            if values.ndim == 1:
                flat[short] = values
                continue
            labels = self.attrs["groups"] if short == "per_group_acc" else range(values.shape[1])
            for k, label in enumerate(labels):
                flat[f"{short}[{label}]"] = values[:, k]
        return pd.DataFrame(flat).rename_axis("model")

    # -- weights -----------------------------------------------------------------------------
    def model_weights(self, index: int) -> np.ndarray:
        """The flat weight row of model ``index``, checked against its stored checksum
        (refused unless it is done, finite and intact: an export must never hold garbage)."""
        index = int(self.checked_rows(np.array([index]))[0])
        array = self.array("weights")
        try:  # the row as stored, NaN included: judged below, with the checksum
            row = np.asarray(array[index], dtype=np.float32)
        except Exception as err:  # a damaged chunk surfaces as a codec or shape error
            raise StoreError(f"{self.path}: the weights of model {index} are unreadable ({err}); run "
                             "`weightbias zoo verify`") from err
        checksum = self.column("checksum")[index]
        if not np.isfinite(row).all() or weights_checksum(row) != checksum:
            raise StoreError(f"{self.path}: the stored weights of model {index} are damaged (NaN/Inf or "
                             "checksum mismatch); run `weightbias zoo verify`, then re-run `zoo generate` "
                             "with the same spec to retrain it")
        return row

    def weights(self, rows: np.ndarray) -> np.ndarray:
        """Weight rows of the done models ``rows``, in that order, as float32 (len(rows), P)."""
        rows = self.checked_rows(rows)
        out = np.empty((len(rows), self.n_params), dtype=np.float32)
        start = 0
        for chunk_rows, chunk in self.weight_chunks(rows):
            out[start : start + len(chunk_rows)] = chunk
            start += len(chunk_rows)
        return out

    def weight_chunks(self, rows: np.ndarray, chunk_models: int = CHUNK_MODELS,
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, weights) for the done models ``rows``, ``chunk_models`` at a time, in order;
        each chunk is read only when the one before is consumed, so memory stays bounded. A
        model whose weights hold NaN or Inf (damage ``zoo verify`` names) is refused by number."""
        if chunk_models < 1:
            raise StoreError(f"chunk_models must be at least 1, got {chunk_models}")
        rows = self.checked_rows(rows)
        array = self.array("weights")
        if array.shape != (self.n_models, self.n_params):
            raise StoreError(f"{self.path}: weights has shape {array.shape}; the zoo's layout needs "
                             f"({self.n_models}, {self.n_params}): its metadata is damaged")
        for start in range(0, len(rows), chunk_models):
            chunk = rows[start : start + chunk_models]
            try:
                values = array.get_orthogonal_selection((chunk, slice(None)))
            except Exception as err:  # a damaged chunk surfaces as a codec or shape error
                raise StoreError(f"{self.path}: the weights of models {chunk[0]}..{chunk[-1]} are "
                                 f"unreadable ({err}); run `weightbias zoo verify`") from err
            values = np.asarray(values, dtype=np.float32)
            bad = chunk[~np.isfinite(values).all(axis=1)]
            if bad.size:
                raise StoreError(f"{self.path}: models {bad[:10].tolist()} have NaN or Inf weights; run "
                                 "`weightbias zoo verify`, then re-run `zoo generate` to retrain them")
            yield chunk, values

    def checked_rows(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` as int64 model indices, refused by name if outside the zoo or not done."""
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
            raise StoreError(f"rows must be a 1-D array of model indices, got shape {rows.shape} "
                             f"dtype {rows.dtype}")
        rows = rows.astype(np.int64, copy=False)  # an empty list arrives as float
        outside = rows[(rows < 0) | (rows >= self.n_models)]
        if outside.size:
            raise StoreError(f"models {outside[:10].tolist()} lie outside the zoo's {self.n_models} models")
        not_done = np.unique(rows[~self.done[rows]])
        if not_done.size:
            raise StoreError(f"models {not_done[:10].tolist()} of {self.path} are not done (no weights "
                             "yet); finish generating the zoo first")
        return rows

    # -- summaries ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Counts per axis, accuracy per bias level, size on disk (see :func:`zoo_info`)."""
        from modelzoo.verify import zoo_info

        return zoo_info(self)

    def verify(self, progress: bool = False):
        """Check every array and every done model (see :func:`modelzoo.verify.verify`)."""
        from modelzoo.verify import verify

        return verify(self, progress)


def open_zoo(path: str | Path) -> Zoo:
    """Open the zoo store at ``path`` for reading."""
    return Zoo.open(path)


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")  # s3://b/z, and s3:/b/z once Path() has merged the slashes


def local_path(path: str | Path) -> Path:
    """``path`` as a local path; an object-store URL is refused by name (see :mod:`modelzoo.store`)."""
    if _URL.match(str(path)):
        raise StoreError(f"{path}: a zoo store must be a folder on a file system (for generation, one every "
                         "Ray node mounts at the same path), not a URL; copy a finished store to object "
                         "storage if you like: the copy reads with plain zarr through fsspec")
    return Path(path)


_PLAIN_CHUNK_KEYS = {"name": "default", "configuration": {"separator": "/"}}


def read_rows(array: zarr.Array, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows ``start:stop`` (all by default) of an array chunked over models only.

    A zoo's per-model arrays are chunked by task block, so a 20,000-model zoo's ``done`` flags
    are 5,000 tiny chunk files, and zarr's async pipeline spends up to a millisecond on each
    (two thread hand-offs), which made ``zoo info`` take tens of seconds. When the array is
    laid out exactly as :mod:`modelzoo.store` writes it in a local folder (Zarr v3, numeric
    dtype, little-endian ``bytes`` then ``zstd``, default ``c/i`` chunk keys), its chunk files
    are read and decoded here in one pass, by the rules of the Zarr v3 spec; a chunk never
    written reads as the fill value. Anything else goes through zarr. A damaged chunk raises.
    """
    n = array.shape[0]
    stop = n if stop is None else min(stop, n)
    folder = plain_local_folder(array)
    if folder is None:
        return np.asarray(array[start:stop])
    shape = array.chunks
    chunk = shape[0]
    out = np.full((max(stop - start, 0), *array.shape[1:]), array.fill_value, dtype=array.dtype)
    stored = array.dtype.newbyteorder("<")
    key_tail = "/0" * (array.ndim - 1)  # chunked over models only: every other index is 0
    codec = Zstd()
    prefix = f"{folder}{os.sep}c{os.sep}"
    for c in range(start // chunk, -(-stop // chunk)) if stop > start else ():
        try:
            with open(f"{prefix}{c}{key_tail}", "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            continue
        values = np.frombuffer(codec.decode(raw), dtype=stored).reshape(shape)
        lo, hi = max(start, c * chunk), min(stop, (c + 1) * chunk)
        out[lo - start : hi - start] = values[lo - c * chunk : hi - c * chunk]
    return out


def plain_local_folder(array: zarr.Array) -> Path | None:
    """The array's folder if :func:`read_rows` may read its chunk files itself, else None."""
    meta = array.metadata.to_dict()
    if (meta.get("zarr_format") != 3 or not isinstance(array.store, LocalStore)
            or meta.get("storage_transformers") or meta.get("chunk_key_encoding") != _PLAIN_CHUNK_KEYS
            or array.dtype.kind not in "biuf" or tuple(array.chunks[1:]) != tuple(array.shape[1:])):
        return None
    codecs = meta.get("codecs", ())
    if [codec.get("name") for codec in codecs] != ["bytes", "zstd"]:
        return None
    if codecs[0].get("configuration", {}).get("endian", "little") != "little" and array.dtype.itemsize > 1:
        return None
    return Path(array.store.root) / array.path
