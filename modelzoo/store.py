"""Zoo store: every model's weights and metadata in one self-describing Zarr (v3) group.

Fourth stage of the flow (source → dataset → trainer → **store** → detector), write side:
creation, resume and the fault guarantees. Reading goes through :mod:`modelzoo.zoo`. Layout::

    ZOO.zarr/                 attrs: format, state, spec, spec_digest, arch, width, task,
                                     n_params, layout (name/shape/offset/size), versions
      weights      (N, P) float32   chunked over models, one chunk per Ray task block
      checksum     (N,)   uint32    CRC32 of each model's weight row, written with it
      done         (N,)   bool      set only after weights, checksum and metrics are written
      config/<axis>  (N,)           every model's config, written at creation (a pure
                                    function of the spec)
      metrics/<name> (N,) or (N,10) accuracies, train loss, wall seconds, worker host

Why it cannot show a half-written model as done: chunks over models are aligned with
task blocks, so exactly one writer touches a chunk; zarr's local store replaces a chunk file
atomically; and a model's ``done`` flag is written last. A kill between the writes leaves the
model not done, and the next run trains it again (deterministically, to the same weights).
Each generation run stamps a fresh ``run_id``; a worker orphaned by a killed driver checks it
before writing and stops, so it never races the run that resumed the store.

A failed write (disk full, a read-only or immutable store) surfaces as a :class:`StoreError`
naming the store; the model it was writing stays not done. Resuming a store first checks it
like :func:`verify`: a model marked done whose data is unreadable or fails its checksum is
marked not done again (an unreadable chunk is wiped whole), so garbage is never kept as done
and the resumed run retrains exactly those models, to the same weights.

A store is a folder on a file system (local, or one every Ray node mounts at the same path:
NFS, a cluster file system), never a URL: its safety rests on atomic file renames, and
summaries read its many small chunk files directly (:func:`modelzoo.zoo.read_rows`). Buckets mounted with a
FUSE client do not qualify: their renames are copies. The format is plain Zarr v3, so a copy
in object storage (s3://, gs://) still opens with zarr through fsspec.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import uuid
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from modelzoo.layouts import ARCH_INFO, arch_layout, layout_records
from modelzoo.spec import ZooSpec
from modelzoo.verify import (
    block_signatures,
    config_problems,
    group_metric_widths,
    scalar_metrics,
    scan_models,
)
from modelzoo.zoo import (
    FORMAT,
    FORMAT_VERSION,
    StoreError,
    Zoo,
    column_checksum,
    local_path,
    weights_checksum,
)

if TYPE_CHECKING:  # pragma: no cover
    from modelzoo.training import ModelResult

logger = logging.getLogger(__name__)


class StaleRunError(StoreError):
    """A worker of an earlier (killed) run tried to write after a newer run took the store."""


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("weightbias", "torch", "numpy", "zarr", "ray", "h5py"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@contextlib.contextmanager
def _writing(path: Path, what: str) -> Iterator[None]:
    """Report a failed write (no space, read-only or immutable files) as a StoreError on the store."""
    try:
        yield
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise StoreError(f"{path}: cannot write {what} ({reason}); models already done are kept. Free "
                         "space or make the store writable, then re-run the same command to go on") from err


class ZooStore(Zoo):
    """A zoo being generated: the :class:`~modelzoo.zoo.Zoo` reader plus the writes a run makes.
    Create or resume with :meth:`create`; a Ray task reopens it with ``open(path, "r+")``."""

    @classmethod
    def create(cls, path: str | Path, spec: ZooSpec, overwrite: bool = False) -> ZooStore:
        """Create the store for ``spec``, or reopen it for resuming if it already holds it."""
        path = local_path(path)
        if path.exists() and not overwrite:
            existing = _existing_zoo_attrs(path)
            if existing.get("state") == "ready":
                if existing.get("spec_digest") != spec.digest():
                    raise StoreError(
                        f"{path} holds a zoo made from another spec (digest "
                        f"{existing.get('spec_digest')} vs {spec.digest()}); choose another "
                        "--out or pass --overwrite")
                store = cls.open(path, mode="r+")
                store.repair_configs()
                lost = store.forget_broken_models()
                if lost:
                    logger.warning("%s: the stored weights of models %s are unreadable or fail their "
                                   "checksum; they are marked not done and will be trained again", path, lost)
                return store
            # Only ever delete what we created ourselves and never finished.
            if existing.get("format") != FORMAT:
                raise StoreError(f"{path} exists and is not a weightbias zoo; refusing to touch it")
        elif path.exists():
            _check_ours(path)
        with _writing(path, "a new zoo store"):
            if path.exists():
                logger.warning("%s: --overwrite removes this zoo store (%s)", path, _describe_existing(path))
                shutil.rmtree(path)
            _build(path, spec)
        return cls.open(path, mode="r+")

    def begin_run(self) -> str:
        """Claim the store for a new generation run; workers of older runs stop writing."""
        run_id = uuid.uuid4().hex
        with _writing(self.path, "the run id"):
            self.group.attrs["run_id"] = run_id
        return run_id

    def record_data_source(self, origin: str, fingerprint: str, notes: dict | None = None) -> None:
        """Note which data the models are trained on; refuse to mix data within one zoo."""
        recorded = self.group.attrs.get("data_fingerprint")
        if recorded is not None and recorded != fingerprint:
            raise StoreError(
                f"{self.path} was generated from data {self.group.attrs.get('data_source')!r} "
                f"(fingerprint {recorded}) but this run found {origin!r} (fingerprint {fingerprint}); "
                "point --data-dir at the same data, or use a new --out")
        recorded = {"data_source": origin, "data_fingerprint": fingerprint, "data_notes": notes or {}}
        with _writing(self.path, "the data source"):
            self.group.attrs.update(recorded)
        self.attrs.update(recorded)

    def check_run(self, run_id: str) -> None:
        """Raise :class:`StaleRunError` unless ``run_id`` is still the store's current run."""
        current = zarr.open_group(self.path, mode="r").attrs.get("run_id")  # fresh, not cached
        if current != run_id:
            raise StaleRunError(f"{self.path}: run {run_id} was superseded by run {current}")

    def write_model(self, index: int, result: ModelResult, run_id: str | None = None) -> None:
        """Write one model; its ``done`` flag goes last. With ``run_id``, only if still current."""
        if run_id is not None:
            self.check_run(run_id)
        if result.weights.shape != (self.n_params,):
            raise StoreError(f"model {index}: weights shape {result.weights.shape}, "
                             f"store expects ({self.n_params},)")
        if not np.isfinite(result.weights).all():
            raise StoreError(f"model {index}: non-finite weights; not stored")
        g = self.group
        with _writing(self.path, f"model {index}"):
            g["weights"][index] = result.weights
            g["checksum"][index] = weights_checksum(result.weights)
            for name, value in result.metrics.items():
                g[f"metrics/{name}"][index] = value
            g["done"][index] = True

    def repair_configs(self) -> list[str]:
        """Rewrite every config column that no longer matches the spec; return their names."""
        broken = sorted(config_problems(self))
        if broken:
            columns = self.spec.config_columns()
            with _writing(self.path, "the repaired config columns"):
                for name in broken:
                    axis = name.removeprefix("config/")
                    if name in self.group:
                        del self.group[name]
                    _write_config_column(self.group["config"], self.spec, axis, columns[axis])
            logger.warning("%s: config columns %s did not match the spec; rewritten from it",
                           self.path, broken)
        return broken

    def forget_broken_models(self) -> list[int]:
        """Mark not done every done model whose weights are unreadable or wrong; return them.

        A model is a pure function of (spec, index), so a resumed run retrains it to the same
        weights. An unreadable chunk is wiped whole (a whole-chunk write never reads the old
        bytes), which also forgets the other models that shared it. Only weights count: a done
        model with a missing metric keeps its weights and is left to :func:`verify` to report,
        since retraining would not change a metric that comes out NaN.

        Only blocks whose files changed since they were last verified (:meth:`mark_verified`)
        are read, so resuming a large zoo costs seconds; ``zoo verify`` still reads everything."""
        chunk = self.group["weights"].chunks[0]
        signatures = block_signatures(self.group)
        stale = None
        if signatures is not None:
            stale = np.flatnonzero(self._verified_marks() != signatures)
        scan = scan_models(self.group, self.n_models, chunk, blocks=stale, metrics=scalar_metrics(self.spec))
        broken = sorted({*scan.lost, *(i for models, _ in scan.unreadable for i in models)})
        if stale is not None:
            self.mark_verified(stale[~np.isin(stale, np.array(broken, dtype=np.int64) // chunk)])
        if not (scan.lost or scan.unreadable):
            return []
        per_model = ["weights", "checksum", "done", *(f"metrics/{m}" for m in self.metric_fields())]
        with _writing(self.path, "the reset of broken models"):
            for models, _ in scan.unreadable:
                for name in per_model:
                    self.group[name][models.start:models.stop] = self.group[name].fill_value
            for index in scan.lost:
                self.group["done"][index] = False
        return broken

    def mark_verified(self, blocks: np.ndarray) -> None:
        """Record that ``blocks`` were read back and found intact, as they are on disk now."""
        signatures = block_signatures(self.group, blocks)
        if signatures is None or not len(blocks):
            return
        marks = self._verified_marks()
        marks[blocks] = signatures
        with _writing(self.path, "the verified marks"):
            if "verified" not in self.group:  # stores made before marks existed get them now
                self.group.create_array("verified", shape=marks.shape, chunks=marks.shape, dtype="int64",
                                        fill_value=0)
            self.group["verified"][:] = marks

    def verify_blocks(self, blocks: list[int]) -> None:
        """Read back the given blocks and mark the intact ones verified (the driver calls this
        as receipts arrive, so a later resume need not read them again)."""
        chunk = self.group["weights"].chunks[0]
        scan = scan_models(self.group, self.n_models, chunk, blocks=np.array(blocks, dtype=np.int64),
                           metrics=scalar_metrics(self.spec))
        bad = {i // chunk for i in scan.lost} | {models.start // chunk for models, _ in scan.unreadable}
        self.mark_verified(np.array([b for b in blocks if b not in bad], dtype=np.int64))

    def _verified_marks(self) -> np.ndarray:
        n_blocks = -(-self.n_models // self.group["weights"].chunks[0])
        if "verified" not in self.group:
            return np.zeros(n_blocks, dtype=np.int64)
        return np.asarray(self.group["verified"][:], dtype=np.int64)


def _write_config_column(group: zarr.Group, spec: ZooSpec, axis: str, values: np.ndarray) -> None:
    # One chunk for the whole column: configs are written once, at creation, by the driver.
    array = group.create_array(axis, shape=values.shape, chunks=values.shape, dtype=spec.column_dtype(axis))
    array[:] = values


def _check_ours(path: Path) -> None:
    """Refuse to delete anything but a zoo store weightbias created (its own attributes say so)."""
    if not path.is_dir() or _existing_zoo_attrs(path).get("format") != FORMAT:
        what = "a file" if path.is_file() else "a folder that is not a weightbias zoo store"
        raise StoreError(f"{path} is {what}; --overwrite only ever replaces a zoo store weightbias "
                         "created. Choose another --out, or move it away yourself")


def _describe_existing(path: Path) -> str:
    attrs = _existing_zoo_attrs(path)
    n = attrs.get("spec", {}).get("zoo", {}).get("n_models", "?")
    return f"{n} models, spec digest {attrs.get('spec_digest', '?')}, state {attrs.get('state', '?')}"


def _existing_zoo_attrs(path: Path) -> dict[str, Any]:
    if not (path / "zarr.json").is_file():
        return {}
    try:
        return dict(zarr.open_group(path, mode="r").attrs)
    except Exception:  # unreadable metadata: treat as not ours
        return {}


def _build(path: Path, spec: ZooSpec) -> None:
    """Create arrays and configs; mark the group ready only once all of it exists."""
    slots = arch_layout(spec.arch, spec.width)
    n, p = spec.n_models, sum(s.size for s in slots)
    chunk = min(spec.models_per_task, n)
    g = zarr.open_group(path, mode="w")
    g.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "state": "creating"})
    g.create_array("weights", shape=(n, p), chunks=(chunk, p), dtype="float32", fill_value=np.nan)
    g.create_array("checksum", shape=(n,), chunks=(chunk,), dtype="uint32", fill_value=0)
    g.create_array("done", shape=(n,), chunks=(chunk,), dtype="bool", fill_value=False)
    n_blocks = -(-n // chunk)  # one mark per block, written by the driver only
    g.create_array("verified", shape=(n_blocks,), chunks=(n_blocks,), dtype="int64", fill_value=0)
    config_group = g.create_group("config")
    columns = spec.config_columns()
    for axis, values in columns.items():
        _write_config_column(config_group, spec, axis, values)
    metrics = g.create_group("metrics")
    for name in scalar_metrics(spec):
        metrics.create_array(name, shape=(n,), chunks=(chunk,), dtype="float32", fill_value=np.nan)
    for name, width in group_metric_widths(spec).items():
        metrics.create_array(name, shape=(n, width), chunks=(chunk, width), dtype="float32",
                             fill_value=np.nan)
    metrics.create_array("worker_host", shape=(n,), chunks=(chunk,), dtype=str, fill_value="")
    task = spec.task_info
    g.attrs.update({
        "spec": spec.to_dict(),
        "spec_digest": spec.digest(),
        "task": spec.task,
        "arch": spec.arch,
        "width": spec.width,
        "n_params": p,
        "layout": layout_records(slots),
        "input": {"shape": list(ARCH_INFO[spec.arch].input_shape), "dtype": "uint8",
                  "scale": "divide by 255"},
        "bias_level": spec.bias_level,
        "groups": list(task.groups),
        "versions": library_versions(),
        "fields": task.field_descriptions(),
        "config_checksums": {axis: column_checksum(values) for axis, values in columns.items()},
        "state": "ready",
    })
