"""Benchmark: how fast the command line starts, against ``python -c "import torch"``.

A person typing ``weightbias --help`` or ``weightbias zoo info`` should not wait for torch,
Ray and scikit-learn to import: neither command needs them. This times, in one run and
interleaved (A/B/C, A/B/C, ...) so a busy machine slows every side alike:

* ``python -c "import torch"`` (the baseline: what importing the heavy stack costs);
* ``weightbias --help``;
* ``weightbias zoo info --json`` on a 64-model store built without training (random weights,
  as :mod:`bench_scale` builds its stores);
* ``python -c "import modelzoo; modelzoo.load_spec(...)"`` (reading a spec from Python).

It also checks, in a fresh interpreter, that none of those paths imports torch, Ray or
scikit-learn. Prints one JSON line; ``help_vs_torch`` is the ratio the issue targets (≤ 0.5).

    python scripts/bench_cli.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import fill, scale_spec  # a sibling script, not a package

from modelzoo.store import ZooStore

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "sklearn")
CHECK = ("import sys, runpy; sys.argv = {argv!r}\n"
         "try:\n    runpy.run_module('detector.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))")


def wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - started


def heavy_imports(argv: list[str]) -> list[str]:
    code = CHECK.format(argv=argv, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = Path(tmp) / "bench-cli.zarr"
        fill(ZooStore.create(store_path, scale_spec(64, 4)), write_models=64)
        sides = {
            "import_torch": [sys.executable, "-c", "import torch"],
            "help": [sys.executable, "-m", "detector.cli", "--help"],
            "zoo_info_json": [sys.executable, "-m", "detector.cli", "zoo", "info", "--json", str(store_path)],
            "load_spec": [sys.executable, "-c", "import modelzoo; modelzoo.load_spec('examples/quick.toml')"],
        }
        for command in sides.values():  # warm the file cache once, untimed
            wall(command)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, command in sides.items():
                times[name].append(wall(command))
        heavy = {"help": heavy_imports(["weightbias", "--help"]),
                 "zoo_info_json": heavy_imports(["weightbias", "zoo", "info", "--json", str(store_path)])}
    median = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({
        "benchmark": "cli_startup", "repeats": args.repeats,
        **{f"{name}_s": round(value, 3) for name, value in median.items()},
        "help_vs_torch": round(median["help"] / median["import_torch"], 3),
        "zoo_info_vs_torch": round(median["zoo_info_json"] / median["import_torch"], 3),
        "load_spec_vs_torch": round(median["load_spec"] / median["import_torch"], 3),
        "heavy_modules_imported": heavy,
    }))


if __name__ == "__main__":
    main()
