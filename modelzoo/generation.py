"""Generation: train a zoo's models as Ray tasks that write straight into the store.

Drives the trainer and the store (stages 3–4 of the flow) across a Ray cluster. The driver
only schedules, tracks and resumes:

1. create the store, or reopen it if it already holds this spec (resume);
2. find the models not yet ``done`` (capped by ``max_models``);
3. render each dataset those models need once and ``ray.put`` it, so every task gets it
   by reference instead of re-rendering;
4. submit one task per store block (a block is one chunk over models, so no two tasks
   ever write the same chunk), and show a tqdm bar of models done and models/hour.

A task is a pure function of (spec, model indices): it trains each model (with the spec's
``vectorize`` > 1, up to that many at once in one batched computation: :mod:`modelzoo.vectorized`),
writes weights then metrics then the ``done`` flag, and returns a small receipt. Ray retries
a task whose worker died; a task skips models already done, so a retry or a re-run never
trains twice.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from tqdm.auto import tqdm

from modelzoo.datasets import ImageSet
from modelzoo.errors import WeightbiasError
from modelzoo.lease import Lease
from modelzoo.spec import ZooSpec, load_spec, parse_spec
from modelzoo.store import StaleRunError, StoreError, ZooStore
from modelzoo.tasks import DataKey
from modelzoo.training import TrainingData
from modelzoo.vectorized import ModelJob, train_models
from modelzoo.zoo import local_path, open_zoo

TASK_RETRIES = 3
CONNECT_TIMEOUT_S = 5
GPU_SHARE_DEFAULT = 0.25  # four small models share one GPU


class GenerateError(WeightbiasError, RuntimeError):
    """Some tasks failed after their retries; their models stay not done for a re-run."""


@dataclass
class GenerateSummary:
    """What one ``generate`` run did."""

    store: str
    n_models: int
    n_done_before: int
    n_trained: int
    seconds: float
    n_done: int = 0
    failures: list[str] = field(default_factory=list)
    superseded: bool = False  # another driver took the store over during this run
    models_per_node: dict[str, int] = field(default_factory=dict)  # Ray node id -> models it trained

    def record(self, receipt: dict) -> None:
        """Count one task's receipt (see :func:`train_block`)."""
        self.n_trained += len(receipt["trained"])
        self.superseded |= receipt["superseded"]
        node = receipt["node_id"]
        self.models_per_node[node] = self.models_per_node.get(node, 0) + len(receipt["trained"])

    @property
    def models_per_hour(self) -> float:
        return 3600.0 * self.n_trained / self.seconds if self.seconds > 0 else 0.0


def assigned_device() -> torch.device:
    """CUDA when Ray gave this task a GPU, else CPU."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@ray.remote(max_retries=TASK_RETRIES)
def train_block(spec_dict: dict, indices: list[int], store_path: str, run_id: str,
                data_refs: dict[DataKey, ray.ObjectRef]) -> dict:
    """Train and store the models ``indices`` of one block for run ``run_id``; return a receipt."""
    started = time.perf_counter()
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    spec = parse_spec(spec_dict, build_regularizers=False)  # the driver checked it
    store = ZooStore.open(store_path, mode="r+")
    keys = list(data_refs)
    datasets: dict[DataKey, ImageSet] = dict(zip(keys, ray.get([data_refs[k] for k in keys]),
                                                 strict=True))
    device = assigned_device()
    already_done = store.done
    jobs = []
    for index in indices:
        if already_done[index]:
            continue
        config = spec.config(index)
        roles = {role: datasets[key] for role, key in spec.task_info.data_keys(config).items()}
        jobs.append(ModelJob(index, config, TrainingData(**roles, num_groups=spec.num_groups)))
    trained, superseded = [], False
    # With spec.vectorize > 1, models of this block that can train together do (in one batched
    # computation); each is still written, and only then marked done, one by one.
    for index, result in train_models(spec.arch, spec.width, jobs, device, spec.eval_size, spec.vectorize):
        try:
            store.write_model(index, result, run_id)
        except StaleRunError:
            superseded = True  # a newer run owns the store now; it will train what is left
            break
        trained.append(index)
    return {"trained": trained, "superseded": superseded, "host": socket.gethostname(), "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(), "seconds": time.perf_counter() - started}


def task_error(err: Exception) -> Exception:
    """The task's own exception, without Ray's remote traceback wrapped around it."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, Exception) else err


def pending_blocks(spec: ZooSpec, done, max_models: int | None) -> list[list[int]]:
    """Not-done model indices grouped by store block, capped at ``max_models`` in total."""
    budget = spec.n_models if max_models is None else max_models
    blocks = []
    for block in spec.blocks():
        todo = [i for i in block if not done[i]][:budget]
        if todo:
            blocks.append(todo)
            budget -= len(todo)
        if budget <= 0:
            break
    return blocks


def start_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join ``address`` or start an embedded local instance; True if this call started it."""
    if ray.is_initialized():
        return False
    # "local" forces a fresh embedded instance: a bare ray.init() would silently join any
    # cluster started on this machine with `ray start`, even a dead one.
    try:
        ray.init(address=address or "local", num_cpus=None if address else num_cpus,
                 include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as err:  # a head that accepted the connection, then never answered
        raise GenerateError(f"--address {address}: could not join a Ray cluster there ({err}); check "
                            "that `ray start --head` runs at that address") from err
    return True


def generate(spec: ZooSpec | str | Path, out: str | Path, *, data_dir: str | Path | None = None,
             address: str | None = None, num_cpus: int | None = None,
             max_models: int | None = None, cpus_per_task: float = 1,
             gpus_per_task: float | None = None, overwrite: bool = False,
             progress: bool = True) -> GenerateSummary:
    """Generate (or resume) the zoo described by ``spec`` into the store at ``out``."""
    if not isinstance(spec, ZooSpec):
        spec = load_spec(spec)
    check_resources(address, num_cpus, cpus_per_task, gpus_per_task, max_models)
    lease = Lease(local_path(out))
    if (lease.path.parent / "zarr.json").is_file():
        lease.acquire()  # a store another live driver is generating is refused before it is touched
    created_here = not lease.path.parent.exists()
    try:
        summary = _run(spec, out, lease, data_dir=data_dir, address=address, num_cpus=num_cpus,
                       max_models=max_models, cpus_per_task=cpus_per_task, gpus_per_task=gpus_per_task,
                       overwrite=overwrite, progress=progress)
    except BaseException:
        if created_here:
            _remove_if_empty(lease.path.parent)
        raise
    finally:
        lease.release()
    if summary.superseded:
        raise GenerateError(f"{out}: another `zoo generate` took this store over while this run was going "
                            f"(its run id replaced ours); this run stopped with {summary.n_done}/"
                            f"{summary.n_models} done and the other run goes on. Run one driver per store")
    if summary.failures:
        raise GenerateError(f"{len(summary.failures)} task(s) failed; "
                            "re-run the same command to retry them:\n" + "\n".join(summary.failures))
    return summary


def _remove_if_empty(store: Path) -> None:
    """Remove a store this run created when it fails before any model is done (a refusal, a full
    disk at creation), so the corrected command starts afresh instead of finding a stranger."""
    try:
        done = open_zoo(store).done.any()
    except WeightbiasError:
        done = False  # half-created: not even readable as a zoo, so nothing in it is done
    if not done:
        shutil.rmtree(store, ignore_errors=True)


def _run(spec: ZooSpec, out: str | Path, lease: Lease, *, data_dir, address, num_cpus, max_models,
         cpus_per_task, gpus_per_task, overwrite, progress) -> GenerateSummary:
    """Create or resume the store, then train what is not done, holding ``lease`` throughout."""
    store = ZooStore.create(out, spec, overwrite=overwrite)
    done = store.done
    summary = GenerateSummary(str(out), spec.n_models, int(done.sum()), 0, 0.0, int(done.sum()))
    blocks = pending_blocks(spec, done, max_models)
    if not blocks:
        return summary

    with lease:
        return _train_pending(spec, out, store, blocks, summary, data_dir=data_dir, address=address,
                              num_cpus=num_cpus, cpus_per_task=cpus_per_task,
                              gpus_per_task=gpus_per_task, progress=progress)


def _train_pending(spec: ZooSpec, out: str | Path, store: ZooStore, blocks: list[list[int]],
                   summary: GenerateSummary, *, data_dir, address, num_cpus, cpus_per_task,
                   gpus_per_task, progress) -> GenerateSummary:
    """Schedule one Ray task per pending block and collect their receipts."""
    started_here = start_ray(address, num_cpus)
    try:
        if gpus_per_task is None:
            gpus_per_task = GPU_SHARE_DEFAULT if ray.cluster_resources().get("GPU", 0) else 0
        check_cluster_fits(cpus_per_task, gpus_per_task)
        refs = put_datasets(spec, blocks, store, data_dir)
        task = train_block.options(num_cpus=cpus_per_task, num_gpus=gpus_per_task)
        spec_dict = spec.to_dict()
        run_id = store.begin_run()
        futures = {}
        for block in blocks:
            future = task.remote(spec_dict, block, str(Path(out).resolve()), run_id,
                                 {key: refs[key] for key in spec.data_keys(block)})
            futures[future] = block
        started = time.perf_counter()
        total = sum(len(b) for b in blocks)
        with tqdm(total=total, unit="model", desc="zoo generate", disable=not progress) as bar:
            remaining = list(futures)
            while remaining:
                ready, remaining = ray.wait(remaining, num_returns=1)
                try:
                    receipt = ray.get(ready[0])
                    store.verify_blocks([futures[ready[0]][0] // spec.models_per_task])
                    summary.record(receipt)
                    bar.update(len(receipt["trained"]))
                except StoreError as err:
                    # No space, or an unwritable store: every other block would train models
                    # it cannot save. Stop them; what is done stays done.
                    for future in remaining:
                        ray.cancel(future, force=True)
                    raise task_error(err) from None
                except Exception as err:  # a failed block must not stop the others
                    cause = task_error(err)
                    summary.failures.append(f"models {futures[ready[0]]}: {type(cause).__name__}: {cause}")
                elapsed = time.perf_counter() - started
                nodes = sum(1 for count in summary.models_per_node.values() if count)
                bar.set_postfix(models_per_hour=f"{3600 * summary.n_trained / max(elapsed, 1e-9):.0f}",
                                nodes=nodes)  # Ray nodes that have trained models so far
        summary.seconds = time.perf_counter() - started
        # Counted from the store: a killed attempt may have finished models no receipt reports.
        summary.n_done = int(store.done.sum())
    finally:
        if started_here:
            ray.shutdown()
    return summary


def check_resources(address: str | None, num_cpus: int | None, cpus_per_task: float,
                    gpus_per_task: float | None, max_models: int | None) -> None:
    """Refuse, before any work, settings under which no task could ever start (Ray would wait
    for resources that never come, silently, forever)."""
    if max_models is not None and max_models < 0:
        raise GenerateError(f"--max-models must be 0 or more, got {max_models}")
    if num_cpus is not None and num_cpus < 1:
        raise GenerateError(f"--num-cpus must be at least 1, got {num_cpus}")
    if not cpus_per_task > 0:
        raise GenerateError(f"--cpus-per-task must be more than 0, got {cpus_per_task}")
    if gpus_per_task is not None and gpus_per_task < 0:
        raise GenerateError(f"--gpus-per-task must be 0 or more, got {gpus_per_task}")
    if address is None and cpus_per_task > (num_cpus or os.cpu_count() or 1):
        raise GenerateError(f"--cpus-per-task {cpus_per_task:g} is more than the local Ray instance's "
                            f"{num_cpus or os.cpu_count()} CPUs, so no task could ever start")
    if address and address not in ("auto", "local") and "://" not in address:
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as err:
            raise GenerateError(f"--address {address}: no Ray head answers there ({err}); start one with "
                                "`ray start --head` or leave --address out for a local instance") from err


def check_cluster_fits(cpus_per_task: float, gpus_per_task: float) -> None:
    """Refuse a task shape no node of the running Ray cluster can hold."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    for resource, need, flag in (("CPU", cpus_per_task, "--cpus-per-task"),
                                 ("GPU", gpus_per_task, "--gpus-per-task")):
        largest = max((node.get(resource, 0) for node in nodes), default=0)
        if need > largest:
            raise GenerateError(f"{flag} {need:g}: no node of the Ray cluster has that many {resource}s "
                                f"(the largest has {largest:g}), so no task could ever start")


def put_datasets(spec: ZooSpec, blocks: list[list[int]], store: ZooStore,
                 data_dir: str | Path | None) -> dict[DataKey, ray.ObjectRef]:
    """Build every dataset the pending models need and put each once; record in the store
    where the data came from (which refuses a resume on other data)."""
    needed = spec.data_keys(index for block in blocks for index in block)
    datasets, origin, fingerprint = spec.load_datasets(needed, data_dir)
    notes = spec.task_info.data_notes(data_seed=spec.data_seed, arch=spec.arch, dataset=spec.dataset,
                                      data_dir=data_dir)
    store.record_data_source(origin, fingerprint, notes)
    check_training_sets(spec, blocks, datasets)
    return {key: ray.put(imageset) for key, imageset in datasets.items()}


def check_training_sets(spec: ZooSpec, blocks: list[list[int]], datasets: dict[DataKey, ImageSet]) -> None:
    """Draw each distinct training set the pending models ask for once, here in the driver, so a
    train_size the pool cannot supply fails before any task starts (naming the model)."""
    task, tried = spec.task_info, set()
    for index in (i for block in blocks for i in block):
        config = spec.config(index)
        key = task.data_keys(config)["train"]
        shape = (key, config.train_size, tuple(sorted(config.task_axes.items())))
        if shape not in tried:
            tried.add(shape)
            task.training_subset(datasets[key], config)
