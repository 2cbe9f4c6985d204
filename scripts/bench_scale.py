"""Benchmark: ``zoo info`` and ``zoo verify`` on a 20,000-model store, against a plain read.

A zoo of tens of thousands of models must still be quick to summarise and check. Training
that many models takes days, so this builds the store without training: the real
:meth:`ZooStore.create` from a digit-cnn spec, then random (finite) weights, their CRC32
checksums, random metrics and the ``done`` flags, written block by block in the order a
worker writes one model (weights, checksum, metrics, ``done`` last). Then it times, in
process and through the ``weightbias`` command line:

* ``zoo info`` (reads the done flags, configs and two accuracy columns, and walks the files
  for the size on disk; it never reads weights);
* ``zoo verify`` (reads every weight row once, chunk by chunk);
* baselines in the same run: a plain chunk-by-chunk read of the whole ``weights`` array with
  zarr and nothing else (``verify_vs_read`` is verify's MB/s over that read's; 1.0 means
  checking costs nothing on top of reading), and the three columns ``zoo info`` needs read
  through zarr itself (``info_columns_zarr_s``; the store reads them faster, see
  :func:`modelzoo.zoo.read_rows`).

The plain read goes first, so verify never reads files warmer than it did. ``cli_*`` times
include starting Python and importing the command line's modules (``cli_startup_s``, the time
of ``weightbias --help``). The store lives under a temporary folder (``--dir``, default /tmp)
and is deleted afterwards. Prints one JSON line.

    python scripts/bench_scale.py                 # 20,000 models, about 4 GB
    python scripts/bench_scale.py --n-models 2000 --models-per-task 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from modelzoo.spec import ZooSpec, parse_spec
from modelzoo.store import ZooStore
from modelzoo.verify import SCALAR_METRICS, group_metric_widths, size_on_disk
from modelzoo.zoo import open_zoo, weights_checksum

CLI = [sys.executable, "-m", "detector.cli"]


def scale_spec(n_models: int, models_per_task: int) -> ZooSpec:
    return parse_spec({
        "zoo": {"task": "colored_mnist", "arch": "digit-cnn", "n_models": n_models, "seed": 3,
                "models_per_task": models_per_task, "eval_size": 1000},
        "fixed": {"epochs": 2, "train_size": 0},
        "sweep": {"sigma2": [0.02, 0.03, 0.04, 0.05], "pool": ["A", "B"]},
        "sample": {"lr": {"log_uniform": [5e-4, 3e-3]}},
    })


def fill(store: ZooStore, write_models: int, seed: int = 0) -> None:
    """Random finite weights and metrics for every model, ``write_models`` (a multiple of the
    store's chunk) at a time, each block written in a worker's order: ``done`` last."""
    g, n, p = store.group, store.n_models, store.n_params
    rng = np.random.default_rng(seed)
    widths = group_metric_widths(store.spec)
    for start in range(0, n, write_models):
        stop = min(start + write_models, n)
        rows = stop - start
        weights = rng.standard_normal((rows, p), dtype=np.float32)
        weights *= 0.05
        g["weights"][start:stop] = weights
        g["checksum"][start:stop] = np.array([weights_checksum(row) for row in weights], dtype=np.uint32)
        for name in SCALAR_METRICS:
            g[f"metrics/{name}"][start:stop] = rng.uniform(0.1, 1.0, rows).astype(np.float32)
        for name, width in widths.items():
            g[f"metrics/{name}"][start:stop] = rng.uniform(0, 1, (rows, width)).astype(np.float32)
        g["metrics/worker_host"][start:stop] = np.array(["bench-scale"] * rows)
        g["done"][start:stop] = np.ones(rows, dtype=bool)


def plain_read_seconds(store: ZooStore, read_models: int) -> float:
    """Read every weight row chunk-aligned with zarr and do nothing else."""
    array = store.group["weights"]
    started = time.perf_counter()
    total = 0.0
    for start in range(0, store.n_models, read_models):
        total += float(np.asarray(array[start : start + read_models])[:, 0].sum())
    seconds = time.perf_counter() - started
    assert np.isfinite(total)
    return seconds


def zarr_columns_seconds(store: ZooStore) -> float:
    """Read ``done`` and both accuracy columns through zarr's own pipeline."""
    started = time.perf_counter()
    for name in ("done", "metrics/unbiased_acc", "metrics/biased_acc"):
        np.asarray(store.group[name][:])
    return time.perf_counter() - started


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def cli_seconds(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, check=False)
    return time.perf_counter() - started, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-models", type=int, default=20_000)
    parser.add_argument("--models-per-task", type=int, default=4,
                        help="store chunk over models (the spec default)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the temporary store goes (needs about 4 GB free per 20K models)")
    args = parser.parse_args()

    spec = scale_spec(args.n_models, args.models_per_task)
    write_models = args.models_per_task * max(1, 512 // args.models_per_task)
    need = args.n_models * 49_562 * 4 * 1.1
    free = shutil.disk_usage(args.dir).free
    if free < need:
        raise SystemExit(f"{args.dir}: {free / 2**30:.1f} GiB free, need about {need / 2**30:.1f} GiB")
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=args.dir))
    try:
        path = tmp / "zoo.zarr"
        store, create_s = timed(ZooStore.create, path, spec)
        store.record_data_source("bench_scale.py: random weights, no training", "none")
        _, fill_s = timed(fill, store, write_models)
        size = size_on_disk(path)

        read_s = plain_read_seconds(store, write_models)  # first, so verify never reads warmer files
        report, verify_s = timed(lambda: open_zoo(path).verify())
        info, info_s = timed(lambda: open_zoo(path).info())
        columns_zarr_s = zarr_columns_seconds(store)
        assert info["n_done"] == args.n_models, info["n_done"]
        assert report.ok and report.n_checked == args.n_models, report.problems[:5]

        info_cli_s, info_run = cli_seconds("zoo", "info", str(path), "--json")
        verify_cli_s, verify_run = cli_seconds("zoo", "verify", str(path))
        if info_run.returncode or verify_run.returncode:
            raise SystemExit(f"CLI failed:\n{info_run.stderr[-2000:]}\n{verify_run.stderr[-2000:]}")
        import_s, _ = cli_seconds("--help")  # the fixed cost of starting the command

        weight_mb = args.n_models * store.n_params * 4 / 2**20
        print(json.dumps({
            "benchmark": "zoo_scale", "n_models": args.n_models, "n_params": store.n_params,
            "models_per_task": args.models_per_task,
            "store_bytes": size, "store_gb": round(size / 1e9, 2), "weights_mb": round(weight_mb),
            "files": sum(1 for f in path.rglob("*") if f.is_file()),
            "create_s": round(create_s, 2), "fill_s": round(fill_s, 1),
            "info_s": round(info_s, 2), "info_columns_zarr_s": round(columns_zarr_s, 2),
            "verify_s": round(verify_s, 1), "plain_read_s": round(read_s, 1),
            "verify_mb_per_s": round(weight_mb / verify_s), "plain_read_mb_per_s": round(weight_mb / read_s),
            "verify_vs_read": round(read_s / verify_s, 3),
            "cli_info_s": round(info_cli_s, 2), "cli_verify_s": round(verify_cli_s, 1),
            "cli_startup_s": round(import_s, 2),
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "load_average_1min": round(os.getloadavg()[0], 1)},
        }))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
