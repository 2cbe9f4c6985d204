"""Benchmark: models/hour of ``zoo generate`` against a bare PyTorch loop, in the same run.

Both sides train the same models (same spec, configs, data, batches and steps) and evaluate
them on the same test images, colour-leakage probe included. The bare loop is plain PyTorch
in this process using every CPU as torch threads, with no Ray, no store and no modelzoo
trainer; ``zoo generate`` is timed as a whole call (starting Ray, creating the store,
writing every model). Datasets are rendered into the cache before either side is timed.
Prints one JSON line; the ratio ``zoo / bare`` is the figure to read (these machines are
noisy, absolute numbers are not).

    python scripts/bench_zoo.py --data-dir ../shared/data --n-models 48
    python scripts/bench_zoo.py --data-dir ../shared/data --task faces --n-models 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits
from torch import nn

from fairtrain.metrics import representation_leakage
from modelzoo.architectures import build_model
from modelzoo.generate import block_data_keys, data_keys, generate, load_datasets
from modelzoo.spec import ZooSpec, parse_spec
from modelzoo.training import training_subset


def bench_spec(task: str, n_models: int, train_size: int, eval_size: int, models_per_task: int) -> ZooSpec:
    if task == "faces":
        return parse_spec({
            "zoo": {"task": "face_gender", "arch": "gender-cnn", "dataset": "utkface_crop_part1",
                    "n_models": n_models, "seed": 11, "models_per_task": models_per_task,
                    "eval_size": eval_size},
            "fixed": {"epochs": 10, "train_size": train_size, "batch_size": 32, "optimizer": "adam",
                      "skew": 0.8},
            "sweep": {"bias_group": ["east_asian", "african_indian", "caucasian", "balanced"],
                      "pool": ["A", "B"]},
            "sample": {"lr": {"log_uniform": [5e-4, 2e-3]}},
        })
    return parse_spec({
        "zoo": {"task": "colored_mnist", "arch": "digit-cnn", "n_models": n_models, "seed": 11,
                "models_per_task": models_per_task, "eval_size": eval_size},
        "fixed": {"epochs": 1, "train_size": train_size, "batch_size": 64, "optimizer": "adam"},
        "sweep": {"sigma2": [0.02, 0.03, 0.04, 0.05], "pool": ["A", "B"]},
        "sample": {"lr": {"log_uniform": [5e-4, 3e-3]}},
    })


def bare_loop(spec: ZooSpec, datasets: dict, threads: int) -> float:
    """Train and evaluate every model with nothing but PyTorch; returns wall seconds."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    for index in range(spec.n_models):
        config = spec.config(index)
        keys = data_keys(config, spec.bias_level)
        train = datasets[keys["train"]]
        torch.manual_seed(config["seed"])
        model = build_model(spec.arch, spec.width)
        optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
        subset = training_subset(train, config)
        images = torch.from_numpy(train.images[subset])
        labels = torch.from_numpy(train.labels[subset])
        shuffler = torch.Generator().manual_seed(config["seed"])
        model.train()
        for _ in range(config["epochs"]):
            order = torch.randperm(len(labels), generator=shuffler)
            for start in range(0, len(order), config["batch_size"]):
                batch = order[start : start + config["batch_size"]]
                loss = nn.functional.cross_entropy(model(images[batch].float() / 255), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        unbiased, biased = datasets[keys["test_unbiased"]], datasets[keys["test_biased"]]
        n = min(spec.eval_size or len(unbiased), len(unbiased))  # as the zoo trainer does
        with torch.no_grad():
            features = model.features(torch.from_numpy(unbiased.images[:n]).float() / 255)
            (model.fc2(features).argmax(1).numpy() == unbiased.labels[:n]).mean()
            (model(torch.from_numpy(biased.images[:n]).float() / 255).argmax(1).numpy()
             == biased.labels[:n]).mean()
        # The same group-leakage probe the zoo records for every model.
        half, groups = n // 2, unbiased.bias[:n]
        with threadpool_limits(limits=1):
            representation_leakage(features[:half].numpy(), groups[:half], features[half:].numpy(),
                                   groups[half:])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--task", choices=("colored_mnist", "faces"), default="colored_mnist")
    parser.add_argument("--n-models", type=int, default=48)
    parser.add_argument("--train-size", type=int, help="default: 4000 digits, or 300 faces")
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--models-per-task", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    train_size = args.train_size or (300 if args.task == "faces" else 4000)
    spec = bench_spec(args.task, args.n_models, train_size, args.eval_size, args.models_per_task)
    needed = block_data_keys(spec, list(range(spec.n_models)))
    datasets, _, _ = load_datasets(spec, needed, args.data_dir)

    bare_seconds = bare_loop(spec, datasets, args.num_cpus)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        summary = generate(spec, Path(tmp) / "bench.zarr", data_dir=args.data_dir,
                           num_cpus=args.num_cpus, progress=False)
        zoo_seconds = time.perf_counter() - started
    assert summary.n_trained == spec.n_models
    bare_rate, zoo_rate = 3600 * spec.n_models / bare_seconds, 3600 * spec.n_models / zoo_seconds
    print(json.dumps({
        "benchmark": "zoo_generate_vs_bare_loop",
        "task": spec.task, "arch": spec.arch, "device": "cpu",
        "n_models": spec.n_models, "train_size": train_size, "eval_size": args.eval_size,
        "num_cpus": args.num_cpus, "cpu": platform.processor() or platform.machine(),
        "bare_models_per_hour": round(bare_rate, 1), "zoo_models_per_hour": round(zoo_rate, 1),
        "bare_seconds": round(bare_seconds, 2), "zoo_seconds": round(zoo_seconds, 2),
        "ratio_zoo_over_bare": round(zoo_rate / bare_rate, 3), "target_ratio": 0.9,
    }))


if __name__ == "__main__":
    main()
