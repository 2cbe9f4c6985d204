"""Benchmark: models/hour of ``zoo generate`` against a bare PyTorch loop, in the same run;
or, with ``--vectorized N``, of vectorized against one-at-a-time training.

Both sides train the same models (same spec, configs, data, batches and steps) and evaluate
them on the same test images, colour-leakage probe included. The bare loop is plain PyTorch
in this process using every CPU as torch threads, with no Ray, no store and no modelzoo
trainer; ``zoo generate`` is timed as a whole call (starting Ray, creating the store,
writing every model). Datasets are rendered into the cache before either side is timed.
Prints one JSON line; the ratio ``zoo / bare`` is the figure to read (these machines are
noisy, absolute numbers are not).

    python scripts/bench_zoo.py --data-dir ../shared/data --n-models 48
    python scripts/bench_zoo.py --data-dir ../shared/data --task faces --n-models 16

With ``--vectorized N`` (implied, with N = --n-models, by ``--device cuda``) both sides run in
this process on the same device, without Ray or Zarr (so also where neither is installed): one
side trains the models one at a time (:func:`~modelzoo.training.train_model`'s steps), the
other in groups of up to N (:mod:`modelzoo.vectorized`). Each model is then evaluated by the
same code on both sides. It prints models/hour for training alone and for training plus
evaluation (what a zoo stores), and how far the two sides' weights and accuracies lie apart:

    python scripts/bench_zoo.py --data-dir ../shared/data --vectorized 16 --n-models 16 \
        --train-size 2048 --eval-size 500
    python scripts/bench_zoo.py --data-dir ../shared/data --device cuda --n-models 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from fairtrain.metrics import representation_leakage
from modelzoo.architectures import build_model
from modelzoo.spec import ZooSpec, parse_spec
from modelzoo.training import TrainingData, evaluate, fit, seeded_model, training_subset
from modelzoo.vectorized import ModelJob, fit_jobs, plan_groups


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


def bare_loop(spec: ZooSpec, datasets: dict, indices: list[int], tuned: bool) -> tuple[float, list[float]]:
    """Train and evaluate models ``indices`` with nothing but PyTorch, in this process.

    ``tuned=False`` is the loop a user writes (fp32, the default NCHW memory format);
    ``tuned=True`` adds what the zoo trainer does for speed (channels_last model and batches).
    Returns (wall seconds, each model's unbiased-test accuracy).
    """
    memory_format = torch.channels_last if tuned else torch.contiguous_format
    accuracies = []
    started = time.perf_counter()
    for index in indices:
        config = spec.config(index)
        keys = spec.task_info.data_keys(config)
        train = datasets[keys["train"]]
        torch.manual_seed(config.seed)
        model = build_model(spec.arch, spec.width).to(memory_format=memory_format)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        subset = training_subset(train, config)
        images = torch.from_numpy(train.images[subset])
        labels = torch.from_numpy(train.labels[subset])
        shuffler = torch.Generator().manual_seed(config.seed)

        def batch_of(uint8: torch.Tensor) -> torch.Tensor:
            return uint8.to(dtype=torch.float32, memory_format=memory_format) / 255

        model.train()
        for _ in range(config.epochs):
            order = torch.randperm(len(labels), generator=shuffler)
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                loss = nn.functional.cross_entropy(model(batch_of(images[batch])), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        unbiased, biased = datasets[keys["test_unbiased"]], datasets[keys["test_biased"]]
        n = min(spec.eval_size or len(unbiased), len(unbiased))  # as the zoo trainer does
        with torch.no_grad():
            features = model.features(batch_of(torch.from_numpy(unbiased.images[:n])))
            accuracies.append(float((model.fc2(features).argmax(1).numpy() == unbiased.labels[:n]).mean()))
            (model(batch_of(torch.from_numpy(biased.images[:n]))).argmax(1).numpy()
             == biased.labels[:n]).mean()
        # The same group-leakage probe the zoo records for every model.
        half, groups = n // 2, unbiased.bias[:n]
        with threadpool_limits(limits=1):
            representation_leakage(features[:half].numpy(), groups[:half], features[half:].numpy(),
                                   groups[half:])
    return time.perf_counter() - started, accuracies


def interleaved(spec: ZooSpec, datasets: dict, data_dir: Path | None, num_cpus: int, rounds: int) -> dict:
    """The three sides on the same models, in ``rounds`` rounds of a slice of the models each;
    the order of the sides rotates from round to round, so contention from other jobs on a
    shared machine falls on every side alike (no side runs alone in a quiet or a busy phase).

    The zoo side joins one embedded Ray instance started here (its start-up counted in the
    zoo's time) and resumes the same store each round with ``max_models`` = the round's slice.
    """
    # Here, not at the top: the vectorized path runs where Ray and Zarr are not installed.
    import ray

    from modelzoo.generation import generate, start_ray
    from modelzoo.zoo import open_zoo

    torch.set_num_threads(num_cpus)
    block = spec.models_per_task
    per_round = max(block, -(-spec.n_models // rounds // block) * block)  # whole store blocks
    slices = [list(range(start, min(start + per_round, spec.n_models)))
              for start in range(0, spec.n_models, per_round)]
    seconds = {"naive": 0.0, "tuned": 0.0, "zoo": 0.0}
    accuracies: dict[str, list[float]] = {"naive": [], "tuned": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "bench.zarr"
        started = time.perf_counter()
        start_ray(num_cpus=num_cpus)
        seconds["zoo"] += time.perf_counter() - started
        try:
            for number, indices in enumerate(slices):
                sides = ["naive", "tuned", "zoo"]
                for side in sides[number % 3:] + sides[: number % 3]:
                    if side == "zoo":
                        started = time.perf_counter()
                        generate(spec, store, data_dir=data_dir, num_cpus=num_cpus,
                                 max_models=len(indices), progress=False)
                        seconds["zoo"] += time.perf_counter() - started
                    else:
                        wall, accs = bare_loop(spec, datasets, indices, tuned=side == "tuned")
                        seconds[side] += wall
                        accuracies[side] += accs
        finally:
            ray.shutdown()
        zoo = open_zoo(store)
        assert zoo.done.all(), "the zoo side did not train every model"
        zoo_accuracy = [float(a) for a in zoo.column("metrics/unbiased_acc")]
    rate = {side: 3600 * spec.n_models / wall for side, wall in seconds.items()}
    mean = {side: float(np.mean(accs)) for side, accs in (*accuracies.items(), ("zoo", zoo_accuracy))}
    return {
        "rounds": len(slices),
        **{f"{side}_models_per_hour": round(r, 1) for side, r in rate.items()},
        **{f"{side}_seconds": round(wall, 2) for side, wall in seconds.items()},
        "ratio_zoo_over_naive": round(rate["zoo"] / rate["naive"], 3),
        "ratio_zoo_over_tuned": round(rate["zoo"] / rate["tuned"], 3),
        "ratio_tuned_over_naive": round(rate["tuned"] / rate["naive"], 3),
        "mean_unbiased_acc": {side: round(m, 4) for side, m in mean.items()},
        "max_mean_acc_diff_points": round(100 * (max(mean.values()) - min(mean.values())), 2),
        "target_ratio_zoo_over_naive": 1.3, "target_ratio_zoo_over_tuned": 0.9,
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_at_a_time(spec: ZooSpec, jobs: list[ModelJob], device: torch.device) -> tuple[dict, float, float]:
    """train_model's steps for each model in turn; (results by index, train seconds, eval seconds)."""
    results, train_seconds, eval_seconds = {}, 0.0, 0.0
    for job in jobs:
        started = time.perf_counter()
        model = seeded_model(spec.arch, spec.width, job.config, device)
        fitted = fit(model, job.data.train, job.config, device, job.data.num_groups)
        _synchronize(device)
        trained = time.perf_counter()
        results[job.index] = evaluate(model, job.data, fitted, device, spec.eval_size, started)
        _synchronize(device)
        train_seconds += trained - started
        eval_seconds += time.perf_counter() - trained
    return results, train_seconds, eval_seconds


def vectorized(spec: ZooSpec, jobs: list[ModelJob], device: torch.device, group_size: int
               ) -> tuple[dict, float, float, list[int]]:
    """The same models trained in groups of up to ``group_size``, then evaluated one by one."""
    results, train_seconds, eval_seconds, sizes = {}, 0.0, 0.0, []
    for group in plan_groups(spec.arch, spec.width, jobs, group_size):
        started = time.perf_counter()
        trained = fit_jobs(spec.arch, spec.width, group, device)
        _synchronize(device)
        train_seconds += time.perf_counter() - started
        sizes.append(len(group))
        started = time.perf_counter()
        for job, (model, fitted) in zip(group, trained, strict=True):
            results[job.index] = evaluate(model, job.data, fitted, device, spec.eval_size)
        _synchronize(device)
        eval_seconds += time.perf_counter() - started
    return results, train_seconds, eval_seconds, sizes


def bench_vectorized(spec: ZooSpec, datasets: dict, device: torch.device, group_size: int,
                     threads: int) -> dict:
    """Vectorized against one-at-a-time training of the same models on ``device``."""
    torch.set_num_threads(threads)
    jobs = []
    for index in range(spec.n_models):
        config = spec.config(index)
        roles = {role: datasets[key] for role, key in spec.task_info.data_keys(config).items()}
        jobs.append(ModelJob(index, config, TrainingData(**roles, num_groups=spec.num_groups)))
    # Warm-up (CUDA context, kernel selection, vmap tracing) on two short models, untimed.
    warm = [ModelJob(j.index, j.config.replace(train_size=2 * j.config.batch_size, epochs=1), j.data)
            for j in jobs[:2]]
    one_at_a_time(spec, warm[:1], device)
    vectorized(spec, warm, device, 2)

    one, one_train, one_eval = one_at_a_time(spec, jobs, device)
    vec, vec_train, vec_eval, sizes = vectorized(spec, jobs, device, group_size)
    n = spec.n_models
    weight_diff = max(float(abs(vec[i].weights - one[i].weights).max()) for i in range(n))
    acc_diff = max(abs(vec[i].metrics["unbiased_acc"] - one[i].metrics["unbiased_acc"]) for i in range(n))

    def rate(seconds: float) -> float:
        return round(3600 * n / seconds, 1)

    one_total, vec_total = one_train + one_eval, vec_train + vec_eval
    return {
        "one_models_per_hour": rate(one_total), "vectorized_models_per_hour": rate(vec_total),
        "ratio_vectorized_over_one": round(one_total / vec_total, 3),
        "train_only_one_models_per_hour": rate(one_train),
        "train_only_vectorized_models_per_hour": rate(vec_train),
        "train_only_ratio": round(one_train / vec_train, 3),
        "one_seconds": {"train": round(one_train, 2), "eval": round(one_eval, 2)},
        "vectorized_seconds": {"train": round(vec_train, 2), "eval": round(vec_eval, 2)},
        "group_sizes": sizes,
        "max_abs_weight_diff": weight_diff, "max_unbiased_acc_diff": acc_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--task", choices=("colored_mnist", "faces"), default="colored_mnist")
    parser.add_argument("--n-models", type=int, default=96)
    parser.add_argument("--train-size", type=int, help="default: 4000 digits, or 300 faces")
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--models-per-task", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds (the sides' order rotates each round)")
    parser.add_argument("--vectorized", type=int, metavar="N",
                        help="compare vectorized training (groups of up to N models) with one at a time")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and args.vectorized is None:
        args.vectorized = args.n_models
    if args.vectorized is not None and args.vectorized < 1:
        parser.error("--vectorized must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to PyTorch")

    train_size = args.train_size or (300 if args.task == "faces" else 4000)
    spec = bench_spec(args.task, args.n_models, train_size, args.eval_size, args.models_per_task)
    datasets, _, _ = spec.load_datasets(spec.data_keys(range(spec.n_models)), args.data_dir)
    if args.vectorized is not None:
        device = torch.device(args.device)
        figures = bench_vectorized(spec, datasets, device, args.vectorized, args.num_cpus)
        print(json.dumps({
            "benchmark": "vectorized_vs_one_at_a_time",
            "task": spec.task, "arch": spec.arch, "device": args.device,
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "n_models": spec.n_models, "vectorize": args.vectorized, "train_size": train_size,
            "epochs": spec.config(0).epochs, "batch_size": spec.config(0).batch_size,
            "eval_size": args.eval_size, "torch_threads": args.num_cpus, **figures, "target_ratio": 20,
        }))
        return

    figures = interleaved(spec, datasets, args.data_dir, args.num_cpus, args.rounds)
    print(json.dumps({
        "benchmark": "zoo_generate_vs_bare_loops",
        "task": spec.task, "arch": spec.arch, "device": "cpu",
        "n_models": spec.n_models, "train_size": train_size, "eval_size": args.eval_size,
        "num_cpus": args.num_cpus, "cpu": platform.processor() or platform.machine(), **figures,
    }))


if __name__ == "__main__":
    main()
