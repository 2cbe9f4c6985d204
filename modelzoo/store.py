"""Zoo store: every model's weights and metadata in one self-describing Zarr (v3) group.

Fourth stage of the flow (source → dataset → trainer → **store** → detector). Layout::

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
summaries read its many small chunk files directly (:func:`read_rows`). Buckets mounted with a
FUSE client do not qualify: their renames are copies. The format is plain Zarr v3, so a copy
in object storage (s3://, gs://) still opens with zarr through fsspec.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import shutil
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import Zstd
from tqdm.auto import tqdm
from zarr.storage import LocalStore

from modelzoo.architectures import ARCHITECTURES, TensorSlot, build_model, layout, layout_records
from modelzoo.faces import GROUPS
from modelzoo.spec import ZooSpec, parse_spec
from modelzoo.training import ModelResult

FORMAT = "weightbias-zoo"
FORMAT_VERSION = 1
SCALAR_METRICS = ("unbiased_acc", "biased_acc", "leakage", "train_loss", "reg_loss", "wall_seconds")
VERIFY_BLOCK = 512
logger = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A store that is missing, not a zoo, half-created, or made from another spec."""


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


def weights_checksum(row: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(row, dtype=np.float32).tobytes())


def _config_dtype(spec: ZooSpec, axis: str) -> type:
    # Strings are stored variable-length (zarr's spec'd string type), never fixed-width.
    return {float: np.float64, int: np.int64, bool: np.bool_, str: str}[spec.axis_type(axis)]


class ZooStore:
    """A zoo on disk. Open with :meth:`open`; create or resume with :meth:`create`."""

    def __init__(self, group: zarr.Group, path: Path) -> None:
        self.group = group
        self.path = path
        self.spec: ZooSpec = parse_spec(group.attrs["spec"])
        self.layout = [TensorSlot(r["name"], tuple(r["shape"]), r["offset"], r["size"])
                       for r in group.attrs["layout"]]

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> ZooStore:
        """Open an existing, fully created zoo store (``mode`` 'r' or 'r+')."""
        path = _local_path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: no zoo store here (no zarr.json)")
        try:
            group = zarr.open_group(path, mode=mode)
        except Exception as err:  # zarr raises several types for unreadable metadata
            raise StoreError(f"{path}: unreadable Zarr group ({err})") from err
        attrs = group.attrs
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{path}: a Zarr group but not a weightbias zoo")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: zoo format version {attrs.get('format_version')}, "
                             f"this weightbias reads {FORMAT_VERSION}")
        if attrs.get("state") != "ready":
            raise StoreError(f"{path}: half-created zoo store (creation was interrupted); "
                             "run `weightbias zoo generate` with the same spec to recreate it")
        return cls(group, path)

    @classmethod
    def create(cls, path: str | Path, spec: ZooSpec, overwrite: bool = False) -> ZooStore:
        """Create the store for ``spec``, or reopen it for resuming if it already holds it."""
        path = _local_path(path)
        if path.exists() and not overwrite:
            existing = _existing_zoo_attrs(path)
            if existing.get("state") == "ready":
                if existing.get("spec_digest") != spec.digest():
                    raise StoreError(
                        f"{path} holds a zoo made from another spec (digest "
                        f"{existing.get('spec_digest')} vs {spec.digest()}); choose another "
                        "--out or pass --overwrite")
                store = cls.open(path, mode="r+")
                lost = store.forget_broken_models()
                if lost:
                    logger.warning("%s: the stored weights of models %s are unreadable or fail their "
                                   "checksum; they are marked not done and will be trained again", path, lost)
                return store
            # Only ever delete what we created ourselves and never finished.
            if existing.get("format") != FORMAT:
                raise StoreError(f"{path} exists and is not a weightbias zoo; refusing to touch it")
        with _writing(path, "a new zoo store"):
            if path.exists():
                shutil.rmtree(path)
            _build(path, spec)
        return cls.open(path, mode="r+")

    # -- reading ---------------------------------------------------------------------------
    @property
    def n_models(self) -> int:
        return self.spec.n_models

    @property
    def n_params(self) -> int:
        return int(self.group.attrs["n_params"])

    @property
    def done(self) -> np.ndarray:
        return np.asarray(read_rows(self.group["done"]), dtype=bool)

    def weights(self, index: int) -> np.ndarray:
        return np.asarray(self.group["weights"][index])

    def field(self, name: str) -> np.ndarray:
        """One metadata field by path, e.g. ``config/sigma2`` or ``metrics/unbiased_acc``.

        Strings come back as a plain fixed-width ``str`` array (zarr hands out numpy's
        variable-width StringDType, which ``astype(str)`` and many libraries reject)."""
        values = np.asarray(read_rows(self.group[name]))
        return np.array(values.tolist(), dtype=str) if values.dtype.kind == "T" else values

    def config_fields(self) -> list[str]:
        return sorted(self.group["config"].array_keys())

    def metric_fields(self) -> list[str]:
        return sorted(self.group["metrics"].array_keys())

    # -- writing ---------------------------------------------------------------------------
    def begin_run(self) -> str:
        """Claim the store for a new generation run; workers of older runs stop writing."""
        run_id = uuid.uuid4().hex
        with _writing(self.path, "the run id"):
            self.group.attrs["run_id"] = run_id
        return run_id

    def record_data_source(self, origin: str, fingerprint: str) -> None:
        """Note which data the models are trained on; refuse to mix data within one zoo."""
        recorded = self.group.attrs.get("data_fingerprint")
        if recorded is not None and recorded != fingerprint:
            raise StoreError(
                f"{self.path} was generated from data {self.group.attrs.get('data_source')!r} "
                f"(fingerprint {recorded}) but this run found {origin!r} (fingerprint {fingerprint}); "
                "point --data-dir at the same data, or use a new --out")
        with _writing(self.path, "the data source"):
            self.group.attrs.update({"data_source": origin, "data_fingerprint": fingerprint})

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

    def forget_broken_models(self) -> list[int]:
        """Mark not done every done model whose weights are unreadable or wrong; return them.

        A model is a pure function of (spec, index), so a resumed run retrains it to the same
        weights. An unreadable chunk is wiped whole (a whole-chunk write never reads the old
        bytes), which also forgets the other models that shared it. Only weights count: a done
        model with a missing metric keeps its weights and is left to :func:`verify` to report,
        since retraining would not change a metric that comes out NaN."""
        chunk = self.group["weights"].chunks[0]
        scan = _scan(self.group, self.n_models, chunk)
        if not (scan.lost or scan.unreadable):
            return []
        per_model = ["weights", "checksum", "done", *(f"metrics/{m}" for m in self.metric_fields())]
        with _writing(self.path, "the reset of broken models"):
            for models, _ in scan.unreadable:
                for name in per_model:
                    self.group[name][models.start:models.stop] = self.group[name].fill_value
            for index in scan.lost:
                self.group["done"][index] = False
        return sorted({*scan.lost, *(i for models, _ in scan.unreadable for i in models)})


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")  # s3://b/z, and s3:/b/z once Path() has merged the slashes


def _local_path(path: str | Path) -> Path:
    """``path`` as a local path; an object-store URL is refused by name (see the docstring above)."""
    if _URL.match(str(path)):
        raise StoreError(f"{path}: a zoo store must be a folder on a file system (for generation, one every "
                         "Ray node mounts at the same path), not a URL; copy a finished store to object "
                         "storage if you like: the copy reads with plain zarr through fsspec")
    return Path(path)


def _existing_zoo_attrs(path: Path) -> dict[str, Any]:
    if not (path / "zarr.json").is_file():
        return {}
    try:
        return dict(zarr.open_group(path, mode="r").attrs)
    except Exception:  # unreadable metadata: treat as not ours
        return {}


def _build(path: Path, spec: ZooSpec) -> None:
    """Create arrays and configs; mark the group ready only once all of it exists."""
    model = build_model(spec.arch, spec.width)
    slots = layout(model)
    n, p = spec.n_models, sum(s.size for s in slots)
    chunk = min(spec.models_per_task, n)
    g = zarr.open_group(path, mode="w")
    g.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "state": "creating"})
    g.create_array("weights", shape=(n, p), chunks=(chunk, p), dtype="float32", fill_value=np.nan)
    g.create_array("checksum", shape=(n,), chunks=(chunk,), dtype="uint32", fill_value=0)
    g.create_array("done", shape=(n,), chunks=(chunk,), dtype="bool", fill_value=False)
    configs = [spec.config(i) for i in range(n)]
    config_group = g.create_group("config")
    for axis in spec.axes:
        dtype = _config_dtype(spec, axis)
        array = config_group.create_array(axis, shape=(n,), chunks=(n,), dtype=dtype)
        array[:] = np.array([c[axis] for c in configs], dtype=dtype)
    metrics = g.create_group("metrics")
    for name in SCALAR_METRICS:
        metrics.create_array(name, shape=(n,), chunks=(chunk,), dtype="float32", fill_value=np.nan)
    for name, width in group_metric_widths(spec).items():
        metrics.create_array(name, shape=(n, width), chunks=(chunk, width), dtype="float32",
                             fill_value=np.nan)
    metrics.create_array("worker_host", shape=(n,), chunks=(chunk,), dtype=str, fill_value="")
    g.attrs.update({
        "spec": spec.to_dict(),
        "spec_digest": spec.digest(),
        "task": spec.task,
        "arch": spec.arch,
        "width": spec.width,
        "n_params": p,
        "layout": layout_records(slots),
        "input": {"shape": list(model.input_shape), "dtype": "uint8", "scale": "divide by 255"},
        "bias_level": spec.bias_level,
        "groups": (list(GROUPS) if spec.task == "face_gender"
                   else [f"colour {i}" for i in range(spec.num_groups)]),
        "versions": library_versions(),
        "fields": field_descriptions(spec),
        "state": "ready",
    })


def group_metric_widths(spec: ZooSpec) -> dict[str, int]:
    """Columns of the per-class and per-group accuracy arrays."""
    return {"per_class_acc": ARCHITECTURES[spec.arch].num_classes, "per_group_acc": spec.num_groups}


def field_descriptions(spec: ZooSpec) -> dict[str, str]:
    """What each array means, in words, for this task (kept in the store's attributes)."""
    faces = spec.task == "face_gender"
    group = "ethnic group (DiveFace's three)" if faces else "colour"
    unbiased = ("the test set balanced over gender × group" if faces
                else "the unbiased (colour-independent) test set")
    return {
        "done": "1 once weights, checksum and metrics of the model are written",
        "checksum": "zlib.crc32 of the model's float32 weight row",
        "metrics/unbiased_acc": f"accuracy on {unbiased}",
        "metrics/biased_acc": ("accuracy on the favoured group's part of the balanced test set "
                               "(all of it for a balanced model)" if faces
                               else "accuracy on a test set coloured like the training set"),
        "metrics/per_class_acc": f"accuracy per class ({'gender' if faces else 'digit'}) on {unbiased}",
        "metrics/per_group_acc": f"accuracy per {group} (the sensitive group, order in attrs.groups) "
                                 f"on {unbiased}",
        "metrics/leakage": f"accuracy of a fresh logistic probe predicting the {group} from the bottleneck "
                           f"features ({unbiased}, half fit, half scored); chance is about "
                           f"{1 / spec.num_groups:.2f}",
        "metrics/train_loss": "mean cross-entropy over the last training epoch",
        "metrics/reg_loss": "mean regularizer term (gamma * R) over the last epoch; 0 for none",
    }


def size_on_disk(path: Path) -> int:
    # os.scandir, not Path.rglob: a 20,000-model zoo is ~70,000 chunk files, and scandir gets
    # each one's type without an extra system call.
    total, folders = 0, [str(path)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


_PLAIN_CHUNK_KEYS = {"name": "default", "configuration": {"separator": "/"}}


def read_rows(array: zarr.Array, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows ``start:stop`` (all by default) of an array chunked over models only.

    A zoo's per-model arrays are chunked by task block, so a 20,000-model zoo's ``done`` flags
    are 5,000 tiny chunk files, and zarr's async pipeline spends up to a millisecond on each
    (two thread hand-offs), which made ``zoo info`` take tens of seconds. When the array is
    laid out exactly as :func:`_build` writes it in a local folder (Zarr v3, numeric dtype,
    little-endian ``bytes`` then ``zstd``, default ``c/i`` chunk keys), its chunk files are
    read and decoded here in one pass, by the rules of the Zarr v3 spec; a chunk never
    written reads as the fill value. Anything else (another store, codec or dtype) goes
    through zarr. A damaged chunk raises, as it does in zarr.
    """
    n = array.shape[0]
    stop = n if stop is None else min(stop, n)
    folder = _plain_local_folder(array)
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


def _plain_local_folder(array: zarr.Array) -> Path | None:
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


def zoo_info(store: ZooStore) -> dict[str, Any]:
    """Summary a person or a program can read: counts per axis, accuracy per bias level."""
    done = store.done
    spec = store.spec
    counts, ranges = {}, {}
    for axis in [*spec.sweep, *spec.sample]:
        values = store.field(f"config/{axis}")
        if axis in spec.sample and "choice" not in spec.sample[axis]:
            ranges[axis] = {"min": values.min().item(), "mean": values.mean().item(),
                            "max": values.max().item()}
            continue
        counts[axis] = {str(v): {"total": int((values == v).sum()),
                                 "done": int(done[values == v].sum())}
                        for v in np.unique(values)}
    level = store.field(f"config/{spec.bias_level}")
    unbiased, biased = store.field("metrics/unbiased_acc"), store.field("metrics/biased_acc")
    per_level = {}
    for value in np.unique(level):
        mask = done & (level == value)
        per_level[value if isinstance(value, str) else f"{value:g}"] = {
            "n_done": int(mask.sum()),
            "mean_unbiased_acc": float(unbiased[mask].mean()) if mask.any() else None,
            "mean_biased_acc": float(biased[mask].mean()) if mask.any() else None,
        }
    return {
        "path": str(store.path),
        "task": spec.task,
        "arch": spec.arch,
        "width": spec.width,
        "n_models": store.n_models,
        "n_done": int(done.sum()),
        "n_params": store.n_params,
        "spec_digest": store.group.attrs["spec_digest"],
        "data_source": store.group.attrs.get("data_source"),
        "bias_level": spec.bias_level,
        "counts_per_axis": counts,
        "ranges_per_axis": ranges,
        "accuracy_per_bias_level": per_level,
        "size_on_disk_bytes": size_on_disk(store.path),
        "versions": dict(store.group.attrs["versions"]),
    }


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`: ``ok`` only if ``problems`` is empty."""

    n_models: int
    n_done: int
    n_checked: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | Path, progress: bool = False) -> VerifyReport:
    """Check a store's integrity: layout, shapes, done-vs-data, NaN/Inf and checksums.

    Weights are read one block of models at a time (about VERIFY_BLOCK rows), so memory stays
    bounded however large the zoo; ``progress`` shows a bar of models checked."""
    store = ZooStore.open(path)
    g, n, p = store.group, store.n_models, store.n_params
    report = VerifyReport(n, 0, 0)
    problems = report.problems
    expected_layout = layout(build_model(store.spec.arch, store.spec.width))
    if expected_layout != store.layout or sum(s.size for s in store.layout) != p:
        problems.append("layout attribute does not match the architecture it names")
    shapes = {"weights": (n, p), "checksum": (n,), "done": (n,)}
    shapes |= {f"metrics/{m}": (n, width) for m, width in group_metric_widths(store.spec).items()}
    shapes |= {f"metrics/{m}": (n,) for m in (*SCALAR_METRICS, "worker_host")}
    shapes |= {f"config/{a}": (n,) for a in store.spec.axes}
    for name, shape in shapes.items():
        if name not in g:
            problems.append(f"{name}: missing array")
        elif g[name].shape != shape:
            problems.append(f"{name}: shape {g[name].shape}, expected {shape}")
    if problems:
        return report
    scan = _scan(g, n, g["weights"].chunks[0], progress)
    report.n_done, report.n_checked = scan.n_done, scan.n_checked
    problems += [f"models {m.start}..{m.stop - 1}: unreadable chunk ({err})" for m, err in scan.unreadable]
    problems += [f"model {i}: {problem}" for i, found in sorted(scan.bad.items()) for problem in found]
    return report


@dataclass
class _Scan:
    """What :func:`_scan` found: problems of done models, and chunks that cannot be read."""

    n_done: int = 0
    n_checked: int = 0
    bad: dict[int, list[str]] = field(default_factory=dict)
    lost: set[int] = field(default_factory=set)  # done models whose weights are unusable
    unreadable: list[tuple[range, str]] = field(default_factory=list)


def _scan(g: zarr.Group, n: int, chunk: int, progress: bool = False) -> _Scan:
    """Check every done model's weights, checksum and metrics, reading VERIFY_BLOCK models at
    a time and, where that fails, chunk by chunk to name exactly the models that are lost."""
    scan = _Scan()
    step = chunk * max(1, VERIFY_BLOCK // chunk)  # chunk-aligned, so a fallback splits cleanly
    bar = tqdm(total=n, unit="model", desc="zoo verify", disable=not progress)
    for start in range(0, n, step):
        block = range(start, min(start + step, n))
        try:
            _scan_models(g, block, scan)
        except Exception:  # a corrupted chunk surfaces as a codec error; find which one
            for first in range(block.start, block.stop, chunk):
                models = range(first, min(first + chunk, n))
                try:
                    _scan_models(g, models, scan)
                except Exception as err:
                    scan.unreadable.append((models, str(err) or type(err).__name__))
        bar.update(len(block))
    bar.close()
    return scan


def _scan_models(g: zarr.Group, models: range, scan: _Scan) -> None:
    # Everything is read before anything is counted, so a failed read leaves scan untouched.
    first, stop = models.start, models.stop
    done = np.asarray(read_rows(g["done"], first, stop), dtype=bool)
    weights = read_rows(g["weights"], first, stop)
    checksums = read_rows(g["checksum"], first, stop)
    scalars = {m: read_rows(g[f"metrics/{m}"], first, stop) for m in SCALAR_METRICS}
    for offset in np.flatnonzero(done):
        found = []
        row = weights[offset]
        if not np.isfinite(row).all():
            found.append("marked done but weights hold NaN/Inf")
        elif weights_checksum(row) != checksums[offset]:
            found.append("weights do not match their checksum")
        if found:
            scan.lost.add(models.start + int(offset))
        missing = [m for m, v in scalars.items() if not np.isfinite(v[offset])]
        if missing:
            found.append(f"marked done but metrics missing: {missing}")
        if found:
            scan.bad[models.start + int(offset)] = found
    scan.n_checked += int(done.sum())
    scan.n_done += int(done.sum())
