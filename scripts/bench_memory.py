"""Benchmark: peak memory of ``zoo generate`` at N and at factor·N models, in the same run.

Generation must stream models into the store: a worker holds one model (and the shared
datasets) at a time, the driver holds one small receipt per task, so neither one's peak
resident memory may grow with the number of models. This runs real generation (embedded
Ray, a small digit-cnn zoo) twice, each time in a fresh Python process so no high-water
mark carries over, and reads ``/proc/PID/status`` (Linux only) of the driver and of every
Ray worker that trained models (one that has torch loaded; idle pre-started workers have not):

* ``peak_rss_mb``: the kernel's high-water mark ``VmHWM`` (what ``getrusage`` reports as
  ``ru_maxrss``), which also counts pages of the datasets the driver ``ray.put`` into the
  shared object store once they have been read;
* ``peak_anon_mb``: the largest ``RssAnon`` seen while sampling every 0.2 s: the worker's own
  heap (tensors, arrays, Python objects), where a leak would show;
* ``shared_mb``: the largest ``RssShmem`` seen, pages of the shared datasets. Each model
  reads a random subset of its training pool, so more models touch more of those pages,
  up to the datasets' size (``shared_datasets_mb``); they are one copy per node, shared by
  every worker, so they grow toward a fixed bound, not with N.

Prints one JSON line; the ratios ``factor·N / N`` are the figures to read (1.0 is flat;
absolute MB depend on the torch build and the machine).

    python scripts/bench_memory.py --data-dir ../shared/data
    python scripts/bench_memory.py --data-dir ../shared/data --n 32 --factor 4 --width 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from modelzoo.generation import generate, start_ray
from modelzoo.spec import ZooSpec, parse_spec


def bench_spec(n_models: int, width: float, train_size: int, eval_size: int,
               models_per_task: int) -> ZooSpec:
    return parse_spec({
        "zoo": {"task": "colored_mnist", "arch": "digit-cnn", "width": width, "n_models": n_models,
                "seed": 5, "models_per_task": models_per_task, "eval_size": eval_size},
        "fixed": {"epochs": 1, "train_size": train_size, "batch_size": 64},
        "sweep": {"sigma2": [0.02, 0.05], "pool": ["A", "B"]},
        "sample": {"lr": {"log_uniform": [5e-4, 3e-3]}},
    })


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)


def kib_to_mb(value: str) -> float:
    return round(int(value.split()[0]) / 1024, 1)


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (Ray's raylet, and the raylet's workers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited while we looked
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def ray_workers() -> list[int]:
    workers = []
    for pid in descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                workers.append(pid)
        except OSError:
            continue
    return workers


class WorkerSampler(threading.Thread):
    """Samples every Ray worker's anonymous and shared RSS until stopped; keeps each one's maxima."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.anon: dict[int, float] = {}
        self.shared: dict[int, float] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(self.interval)

    def sample(self) -> None:
        for pid in ray_workers():
            try:
                status = proc_status(pid)
            except OSError:
                continue
            self.anon[pid] = max(self.anon.get(pid, 0.0), kib_to_mb(status["RssAnon"]))
            self.shared[pid] = max(self.shared.get(pid, 0.0), kib_to_mb(status["RssShmem"]))

    def training_workers(self) -> list[dict]:
        """Final figures of the workers that trained (have torch loaded), read while they live."""
        self.halt.set()
        self.join()
        self.sample()
        workers = []
        for pid in ray_workers():
            try:
                if "libtorch" not in Path(f"/proc/{pid}/maps").read_text():
                    continue
                status = proc_status(pid)
            except OSError:
                continue
            workers.append({"pid": pid, "peak_rss_mb": kib_to_mb(status["VmHWM"]),
                            "peak_anon_mb": self.anon[pid],
                            "shared_mb": self.shared[pid]})
        return workers


def one_run(args: argparse.Namespace, n_models: int) -> dict:
    """Generate ``n_models`` into a fresh store; measure before Ray goes down."""
    spec = bench_spec(n_models, args.width, args.train_size, args.eval_size, args.models_per_task)
    start_ray(num_cpus=args.num_cpus)  # ours, so generate() leaves it up for the measurement
    sampler = WorkerSampler()
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        started = time.perf_counter()
        summary = generate(spec, Path(tmp) / "zoo.zarr", data_dir=args.data_dir, progress=False)
        seconds = time.perf_counter() - started
        workers = sampler.training_workers()
    if summary.n_trained != n_models or not workers:
        raise SystemExit(f"run with {n_models} models trained {summary.n_trained}, "
                         f"{len(workers)} training workers found")
    return {"n_models": n_models, "seconds": round(seconds, 1), "workers": workers,
            **{f"max_worker_{key}": max(w[key] for w in workers)
               for key in ("peak_rss_mb", "peak_anon_mb", "shared_mb")},
            "driver_peak_rss_mb": kib_to_mb(proc_status(os.getpid())["VmHWM"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--n", type=int, default=16, help="models in the small run")
    parser.add_argument("--factor", type=int, default=4, help="the large run has factor·n models")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--models-per-task", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one run, in a child
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_run(args, args.one)))
        return

    sizes = (args.n, args.factor * args.n)
    # Render (or read) every dataset into the cache first, so neither run pays for it.
    spec = bench_spec(sizes[1], args.width, args.train_size, args.eval_size, args.models_per_task)
    datasets, _, _ = spec.load_datasets(spec.data_keys(range(spec.n_models)), args.data_dir)
    shared_bytes = sum(d.images.nbytes + d.labels.nbytes + d.bias.nbytes for d in datasets.values())
    del datasets
    forwarded = [f"--{name.replace('_', '-')}={getattr(args, name)}"
                 for name in ("width", "train_size", "eval_size", "models_per_task", "num_cpus")]
    forwarded += [f"--data-dir={args.data_dir}"] if args.data_dir else []
    runs = []
    for n in sizes:
        child = subprocess.run([sys.executable, __file__, f"--one={n}", *forwarded],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise SystemExit(f"run with {n} models failed:\n{child.stderr[-3000:]}")
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    small, large = runs
    print(json.dumps({
        "benchmark": "generate_peak_rss", "arch": "digit-cnn", "width": args.width,
        "train_size": args.train_size, "eval_size": args.eval_size,
        "models_per_task": args.models_per_task, "num_cpus": args.num_cpus, "runs": runs,
        "shared_datasets_mb": round(shared_bytes / 2**20, 1),
        **{f"{key}_ratio": round(large[key] / small[key], 3)
           for key in ("max_worker_peak_anon_mb", "max_worker_peak_rss_mb", "driver_peak_rss_mb")},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }))


if __name__ == "__main__":
    main()
