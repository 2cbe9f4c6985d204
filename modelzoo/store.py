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
"""

from __future__ import annotations

import platform
import shutil
import uuid
import zlib
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from modelzoo.architectures import ARCHITECTURES, TensorSlot, build_model, layout, layout_records
from modelzoo.faces import GROUPS
from modelzoo.spec import ZooSpec, parse_spec
from modelzoo.training import ModelResult

FORMAT = "weightbias-zoo"
FORMAT_VERSION = 1
SCALAR_METRICS = ("unbiased_acc", "biased_acc", "leakage", "train_loss", "reg_loss", "wall_seconds")
VERIFY_BLOCK = 512


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
        path = Path(path)
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
        path = Path(path)
        if path.exists() and not overwrite:
            existing = _existing_zoo_attrs(path)
            if existing.get("state") == "ready":
                if existing.get("spec_digest") != spec.digest():
                    raise StoreError(
                        f"{path} holds a zoo made from another spec (digest "
                        f"{existing.get('spec_digest')} vs {spec.digest()}); choose another "
                        "--out or pass --overwrite")
                return cls.open(path, mode="r+")
            # Only ever delete what we created ourselves and never finished.
            if existing.get("format") != FORMAT:
                raise StoreError(f"{path} exists and is not a weightbias zoo; refusing to touch it")
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
        return np.asarray(self.group["done"][:], dtype=bool)

    def weights(self, index: int) -> np.ndarray:
        return np.asarray(self.group["weights"][index])

    def field(self, name: str) -> np.ndarray:
        """One metadata field by path, e.g. ``config/sigma2`` or ``metrics/unbiased_acc``.

        Strings come back as a plain fixed-width ``str`` array (zarr hands out numpy's
        variable-width StringDType, which ``astype(str)`` and many libraries reject)."""
        values = np.asarray(self.group[name][:])
        return np.array(values.tolist(), dtype=str) if values.dtype.kind == "T" else values

    def config_fields(self) -> list[str]:
        return sorted(self.group["config"].array_keys())

    def metric_fields(self) -> list[str]:
        return sorted(self.group["metrics"].array_keys())

    # -- writing ---------------------------------------------------------------------------
    def begin_run(self) -> str:
        """Claim the store for a new generation run; workers of older runs stop writing."""
        run_id = uuid.uuid4().hex
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
        g["weights"][index] = result.weights
        g["checksum"][index] = weights_checksum(result.weights)
        for name, value in result.metrics.items():
            g[f"metrics/{name}"][index] = value
        g["done"][index] = True


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
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


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


def verify(path: str | Path) -> VerifyReport:
    """Check a store's integrity: layout, shapes, done-vs-data, NaN/Inf and checksums."""
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
    for start in range(0, n, VERIFY_BLOCK):
        stop = min(start + VERIFY_BLOCK, n)
        try:
            done = np.asarray(g["done"][start:stop], dtype=bool)
            weights = np.asarray(g["weights"][start:stop])
            checksums = np.asarray(g["checksum"][start:stop])
            scalars = {m: np.asarray(g[f"metrics/{m}"][start:stop]) for m in SCALAR_METRICS}
        except Exception as err:  # a corrupted chunk surfaces as a codec error
            problems.append(f"models {start}..{stop - 1}: unreadable chunk ({err})")
            continue
        for offset in np.flatnonzero(done):
            i = start + offset
            row = weights[offset]
            report.n_checked += 1
            if not np.isfinite(row).all():
                problems.append(f"model {i}: marked done but weights hold NaN/Inf")
            elif weights_checksum(row) != checksums[offset]:
                problems.append(f"model {i}: weights do not match their checksum")
            missing = [m for m, v in scalars.items() if not np.isfinite(v[offset])]
            if missing:
                problems.append(f"model {i}: marked done but metrics missing: {missing}")
        report.n_done += int(done.sum())
    return report
