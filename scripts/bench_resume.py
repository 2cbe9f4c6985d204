"""Benchmark: how long a resume of a 20,000-model store takes before it trains anything.

A resume re-checks the models already done, so garbage is never kept as done. It reads back
only the blocks whose chunk files changed since they were last verified (the driver marks each
block as its receipt arrives), so after the first check a resume costs file stats, not a read of
every weight. This builds a store without training (as :mod:`bench_scale` does: the real
``ZooStore.create`` and worker-order writes, which leave no marks), then times in one run:

* ``first_resume_s``: a resume of the unmarked store (reads every weight, then marks);
* ``second_resume_s``: the same resume again (every block marked: stats only);
* ``corrupted_resume_s``: after one byte of one block's weights is flipped: that block alone is
  read, its broken models are forgotten (``forgotten`` lists them) and retrained by the run;
* ``verify_s``: ``zoo verify`` (always reads everything) for comparison.

Prints one JSON line; ``second_vs_first`` is the ratio the issue targets.

    python scripts/bench_resume.py [--n-models 20000] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import fill, scale_spec  # a sibling script, not a package

from modelzoo.store import ZooStore
from modelzoo.zoo import open_zoo


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-models", type=int, default=20_000)
    parser.add_argument("--models-per-task", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    spec = scale_spec(args.n_models, args.models_per_task)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "resume.zarr"
        fill(ZooStore.create(path, spec), write_models=args.models_per_task * 256)
        first, _ = timed(lambda: ZooStore.create(path, spec))
        second, _ = timed(lambda: ZooStore.create(path, spec))
        chunk = path / "weights" / "c" / "7" / "0"  # models 28..31 at 4 models per block
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
        corrupted, store = timed(lambda: ZooStore.create(path, spec))
        forgotten = [int(i) for i in (~store.done).nonzero()[0]]
        verify, report = timed(lambda: open_zoo(path).verify())
    print(json.dumps({
        "benchmark": "resume", "n_models": args.n_models,
        "first_resume_s": round(first, 2), "second_resume_s": round(second, 2),
        "corrupted_resume_s": round(corrupted, 2), "forgotten": forgotten, "verify_s": round(verify, 2),
        "verify_ok_after_forgetting": report.ok, "second_vs_first": round(second / first, 4),
    }))


if __name__ == "__main__":
    main()
