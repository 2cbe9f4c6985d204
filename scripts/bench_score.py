"""How long `weightbias score` takes on one checkpoint, against `python -c "import torch"`.

Scoring must read a checkpoint, and reading a ``.pt`` file needs torch, so ``import torch`` is
the floor; the target (issue 12) is a wall time at most 1.5× that floor. Both are measured in
this one run, interleaved (score, torch, score, torch, ...) so that a machine busy with other
work slows both sides alike, and the medians compared. The detector folder and the
checkpoint are built here: a ``boosting`` (or ``--detector deepsets``) detector fitted on
synthetic digit-cnn weights (half of them with louder red first-layer filters, the trace a
colour shortcut leaves) and one checkpoint from a plain PyTorch module with its own layer
names. Prints one JSON line.

    python scripts/bench_score.py [--repeats 7] [--detector boosting]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from detector.applicability import REFERENCE_KIND, Reference
from detector.files import save_detector
from detector.models import make_detector
from detector.transform import WeightFeatures
from modelzoo.architectures import build_model, flatten, layout

WIDTH = 0.5


class TheirNet(nn.Module):
    """A user's digit-cnn at half width, under names of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.mid, self.top = nn.Conv2d(3, 12, 5), nn.Conv2d(12, 24, 3), nn.Conv2d(24, 32, 3)
        self.hidden, self.out = nn.Linear(32, 64), nn.Linear(64, 10)


def build(folder: Path, kind: str) -> Path:
    """A detector folder in ``folder``/det and a checkpoint ``folder``/theirs.pt; returns the latter."""
    torch.manual_seed(0)
    base = build_model("digit-cnn", WIDTH)
    slots = tuple(layout(base))
    rng = np.random.default_rng(0)
    noise = 0.01 * rng.standard_normal((80, sum(s.size for s in slots)), dtype=np.float32)
    weights = flatten(base)[None] + noise
    red = weights[1::2, : slots[0].size].reshape(-1, *slots[0].shape)
    red[:, 0] *= 2.5
    weights[1::2, : slots[0].size] = red.reshape(len(red), -1)
    y = np.where(np.arange(len(weights)) % 2, "biased", "unbiased")
    params = {"epochs": 50} if kind == "deepsets" else {"max_iter": 100}
    detector = make_detector(kind, slots, **params).fit(weights, y)
    features = WeightFeatures(REFERENCE_KIND, slots)
    reference = Reference(features.transform(weights), y, np.arange(len(y)),
                          tuple(features.get_feature_names_out()), "digit-cnn", WIDTH)
    info = {"target": "biased", "zoo": {"arch": "digit-cnn", "width": WIDTH,
                                        "n_train_per_class": {"biased": 40, "unbiased": 40}}}
    save_detector(detector, folder / "det", info, reference=reference)
    theirs = TheirNet()
    mapping = dict(zip(theirs.state_dict(), base.state_dict(), strict=True))
    theirs.load_state_dict({name: base.state_dict()[ours] for name, ours in mapping.items()})
    torch.save(theirs.state_dict(), folder / "theirs.pt")
    return folder / "theirs.pt"


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--detector", choices=("boosting", "deepsets"), default="boosting")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_score_"))
    try:
        checkpoint = build(folder, args.detector)
        entry = Path(sys.executable).with_name("weightbias")
        score = [str(entry)] if entry.is_file() else [sys.executable, "-m", "detector.cli"]
        score += ["score", str(checkpoint), "--detector", str(folder / "det")]
        torch_only = [sys.executable, "-c", "import torch"]
        wall(score)  # once untimed: the first run pays for cold file caches, on both sides' behalf
        scored, imported = [], []
        for _ in range(args.repeats):
            scored.append(wall(score))
            imported.append(wall(torch_only))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    score_s, torch_s = statistics.median(scored), statistics.median(imported)
    print(json.dumps({"detector": args.detector, "repeats": args.repeats, "score_s": round(score_s, 3),
                      "import_torch_s": round(torch_s, 3), "ratio": round(score_s / torch_s, 3),
                      "target": 1.5, "score_all_s": [round(t, 3) for t in scored],
                      "import_torch_all_s": [round(t, 3) for t in imported]}))


if __name__ == "__main__":
    main()
