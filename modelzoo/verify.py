"""Summaries and integrity checks of a zoo: ``weightbias zoo info`` and ``zoo verify``.

Part of the store stage, on the read side: both take a :class:`~modelzoo.zoo.Zoo` and read
it through the façade's chunk reader, so neither imports torch. :func:`verify` checks every
array the zoo relies on (shapes, layout, config columns) and every done model's weights,
checksum and metrics; :func:`scan_models` is the chunked pass it shares with a resume, which marks
broken models not done again (:meth:`modelzoo.store.ZooStore.forget_broken_models`).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm

from modelzoo.layouts import arch_layout
from modelzoo.zoo import (
    SCALAR_METRICS,
    Zoo,
    column_checksum,
    plain_local_folder,
    read_rows,
    scalar_metrics,
    weights_checksum,
)

VERIFY_BLOCK = 512


WIDE_METRICS = ("per_class_acc", "per_group_acc")

DTYPES = {"weights": np.dtype("float32"), "checksum": np.dtype("uint32"), "done": np.dtype("bool")}


def group_metric_widths(zoo_or_spec) -> dict[str, int]:
    """Columns of the per-class and per-group accuracy arrays."""
    from modelzoo.layouts import ARCH_INFO

    spec = getattr(zoo_or_spec, "spec", zoo_or_spec)
    return dict(zip(WIDE_METRICS, (ARCH_INFO[spec.arch].num_classes, spec.num_groups), strict=True))


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


def zoo_info(store: Zoo) -> dict[str, Any]:
    """Summary a person or a program can read: counts per axis, accuracy per bias level."""
    done = store.done
    spec = store.spec
    counts, ranges = {}, {}
    for axis in [*spec.sweep, *spec.sample]:
        values = store.column(f"config/{axis}")
        if axis in spec.sample and "choice" not in spec.sample[axis]:
            ranges[axis] = {"min": values.min().item(), "mean": values.mean().item(),
                            "max": values.max().item()}
            continue
        counts[axis] = {str(v): {"total": int((values == v).sum()),
                                 "done": int(done[values == v].sum())}
                        for v in np.unique(values)}
    level = store.column(f"config/{spec.bias_level}")
    unbiased, biased = store.column("metrics/unbiased_acc"), store.column("metrics/biased_acc")
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
        "spec_digest": store.attrs["spec_digest"],
        "data_source": store.attrs.get("data_source"),
        "data_notes": store.attrs.get("data_notes", {}),
        "bias_level": spec.bias_level,
        "counts_per_axis": counts,
        "ranges_per_axis": ranges,
        "accuracy_per_bias_level": per_level,
        "size_on_disk_bytes": size_on_disk(store.path),
        "versions": dict(store.attrs["versions"]),
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


def verify(zoo: Zoo | str | Path, progress: bool = False) -> VerifyReport:
    """Check a store's integrity: layout, shapes, done-vs-data, NaN/Inf and checksums.

    Weights are read one block of models at a time (about VERIFY_BLOCK rows), so memory stays
    bounded however large the zoo; ``progress`` shows a bar of models checked."""
    store = zoo if isinstance(zoo, Zoo) else Zoo.open(zoo)
    g, n, p = store.group, store.n_models, store.n_params
    report = VerifyReport(n, 0, 0)
    problems = report.problems
    expected_layout = tuple(arch_layout(store.spec.arch, store.spec.width))
    if expected_layout != store.layout or sum(s.size for s in store.layout) != p:
        problems.append("layout attribute does not match the architecture it names")
    shapes = {"weights": (n, p), "checksum": (n,), "done": (n,)}
    shapes |= {f"metrics/{m}": (n, width) for m, width in group_metric_widths(store).items()}
    metrics = scalar_metrics(store.spec)
    shapes |= {f"metrics/{m}": (n,) for m in (*metrics, "worker_host")}
    shapes |= {f"config/{a}": (n,) for a in store.spec.axes}
    for name, shape in shapes.items():
        try:
            array = g[name]
        except KeyError:
            problems.append(f"{name}: missing array")
            continue
        except Exception as err:  # damaged metadata (zarr.json) surfaces as many types
            problems.append(f"{name}: unreadable metadata ({type(err).__name__}: {err})")
            continue
        if not isinstance(array, zarr.Array):
            problems.append(f"{name}: a group where an array belongs")
        elif array.shape != shape:
            problems.append(f"{name}: shape {array.shape}, expected {shape}")
        elif name in DTYPES and np.dtype(array.dtype) != DTYPES[name]:
            problems.append(f"{name}: data type {array.dtype}, expected {DTYPES[name]}")
    if problems:
        return report
    problems += [f"{name}: {problem}" for name, problem in config_problems(store).items()]
    scan = scan_models(g, n, g["weights"].chunks[0], progress, metrics=metrics)
    report.n_done, report.n_checked = scan.n_done, scan.n_checked
    problems += [f"models {m.start}..{m.stop - 1}: unreadable chunk ({err})" for m, err in scan.unreadable]
    problems += [f"model {i}: {problem}" for i, found in sorted(scan.bad.items()) for problem in found]
    return report


def config_problems(zoo: Zoo) -> dict[str, str]:
    """Config columns that differ from the spec they are a pure function of (a damaged or
    deleted chunk reads back as its fill value), by array name.

    Columns are first checked against the checksums recorded at creation (a read of each
    column); only a store without them, or a column that fails, is compared with the configs
    rebuilt from the spec, which at 20,000 models takes seconds."""
    stored, found = {}, {}
    recorded = zoo.attrs.get("config_checksums", {})
    for axis in zoo.spec.axes:
        name = f"config/{axis}"
        try:
            stored[axis] = zoo.column(name, checked=False)
        except Exception as err:  # an unreadable chunk surfaces as a codec error
            found[name] = f"unreadable ({err})"
    suspect = [axis for axis, values in stored.items()
               if axis not in recorded or column_checksum(values) != recorded[axis]]
    if not suspect:
        return found
    expected_columns = zoo.spec.config_columns()
    for axis in suspect:
        name, expected = f"config/{axis}", expected_columns[axis]
        wrong = np.flatnonzero(stored[axis].astype(expected.dtype) != expected)
        if wrong.size:
            found[name] = (f"{wrong.size} model(s) disagree with the spec (first: model {wrong[0]}, "
                           f"stored {stored[axis][wrong[0]].item()!r}, spec {expected[wrong[0]].item()!r})")
    return found


@dataclass
class Scan:
    """What :func:`scan_models` found: problems of done models, and chunks that cannot be read."""

    n_done: int = 0
    n_checked: int = 0
    bad: dict[int, list[str]] = field(default_factory=dict)
    lost: set[int] = field(default_factory=set)  # done models whose weights are unusable
    unreadable: list[tuple[range, str]] = field(default_factory=list)


# The per-model arrays a block's signature covers: what a worker writes for its models.
SIGNED_ARRAYS = ("weights", "checksum", "done")


def block_signatures(g: zarr.Group, blocks: np.ndarray | None = None) -> np.ndarray | None:
    """One number per store block (of ``blocks``, default all) that changes whenever any of its
    chunk files is rewritten (CRC32 of their sizes and modification times), or None for a store
    not laid out as a plain local folder. It stats three files per block and reads no data."""
    folders = {name: plain_local_folder(g[name]) for name in SIGNED_ARRAYS}
    if None in folders.values():
        return None
    weights = g["weights"]
    if blocks is None:
        blocks = np.arange(-(-weights.shape[0] // weights.chunks[0]))
    signatures = np.zeros(len(blocks), dtype=np.int64)
    parts = {name: (folder / "c", "/0" if g[name].ndim == 2 else "") for name, folder in folders.items()}
    for position, block in enumerate(blocks):
        stamp = []
        for root, tail in parts.values():
            try:
                info = os.stat(f"{root}/{block}{tail}")
                stamp.append(f"{info.st_size}:{info.st_mtime_ns}")
            except FileNotFoundError:
                stamp.append("-")
        signatures[position] = zlib.crc32("|".join(stamp).encode()) + 1  # 0 means "never verified"
    return signatures


def scan_models(g: zarr.Group, n: int, chunk: int, progress: bool = False,
                blocks: np.ndarray | None = None, metrics: tuple[str, ...] = SCALAR_METRICS) -> Scan:
    """Check every done model's weights, checksum and metrics (of the store ``blocks`` only,
    if given), reading VERIFY_BLOCK models at a time and, where that fails, chunk by chunk to
    name exactly the models that are lost."""
    scan = Scan()
    step = chunk * max(1, VERIFY_BLOCK // chunk)  # chunk-aligned, so a fallback splits cleanly
    spans = [range(start, min(start + step, n)) for start in range(0, n, step)] if blocks is None \
        else _spans(np.asarray(blocks, dtype=np.int64), chunk, step, n)
    bar = tqdm(total=sum(map(len, spans)), unit="model", desc="zoo verify", disable=not progress)
    for block in spans:
        try:
            _scan_block(g, block, scan, metrics)
        except Exception:  # a corrupted chunk surfaces as a codec error; find which one
            for first in range(block.start, block.stop, chunk):
                models = range(first, min(first + chunk, n))
                try:
                    _scan_block(g, models, scan, metrics)
                except Exception as err:
                    scan.unreadable.append((models, str(err) or type(err).__name__))
        bar.update(len(block))
    bar.close()
    return scan


def _spans(blocks: np.ndarray, chunk: int, step: int, n: int) -> list[range]:
    """Model ranges covering ``blocks``: runs of consecutive blocks, each at most ``step`` models,
    so reading scattered stale blocks costs no more reads than it must."""
    spans: list[range] = []
    for block in np.unique(blocks):
        start, stop = int(block) * chunk, min((int(block) + 1) * chunk, n)
        if spans and spans[-1].stop == start and len(spans[-1]) + (stop - start) <= step:
            spans[-1] = range(spans[-1].start, stop)
        else:
            spans.append(range(start, stop))
    return spans


def _scan_block(g: zarr.Group, models: range, scan: Scan, metrics: tuple[str, ...]) -> None:
    # Everything is read before anything is counted, so a failed read leaves scan untouched.
    first, stop = models.start, models.stop
    done = np.asarray(read_rows(g["done"], first, stop), dtype=bool)
    weights = read_rows(g["weights"], first, stop)
    checksums = read_rows(g["checksum"], first, stop)
    scalars = {m: read_rows(g[f"metrics/{m}"], first, stop) for m in metrics}
    # Per-class and per-group accuracies may be NaN for a class or group absent from the test
    # images, but never for all of them: an all-NaN row is a missing (deleted) chunk.
    wide = {m: read_rows(g[f"metrics/{m}"], first, stop) for m in WIDE_METRICS if m in g["metrics"]}
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
        missing += [m for m, v in wide.items() if np.isnan(v[offset]).all()]
        if missing:
            found.append(f"marked done but metrics missing: {missing}")
        if found:
            scan.bad[models.start + int(offset)] = found
    scan.n_checked += int(done.sum())
    scan.n_done += int(done.sum())
