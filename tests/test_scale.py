"""Zoos larger than memory: the reader hands out weights a chunk of models at a time, and
detectors learn from features computed chunk by chunk; the store's per-model arrays are read
without zarr's per-chunk cost, exactly as zarr reads them; a store is a folder, never a URL, but
a copy in object storage reads with plain zarr.

The detector tests import :mod:`detector` inside themselves, so the store's own tests here run
whatever state the detector package is in.
"""

from __future__ import annotations

import json
import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore, LoggingStore

from modelzoo.datasets import render_colored_mnist
from modelzoo.spec import parse_spec
from modelzoo.store import ZooStore
from modelzoo.training import TrainingData, train_model
from modelzoo.zoo import StoreError, Zoo, open_zoo, read_rows
from tests.conftest import random_zoo, tiny_spec_dict

FAST = {"layer_conv": {"epochs": 30}, "deepsets": {"epochs": 60}, "dense": {"max_iter": 30},
        "boosting": {"max_iter": 40}, "probe": {"C": 1.0}, "rescaled": {"C": 1.0}, "hybrid": {"C": 1.0}}
POOL_START = {"A": 0, "B": 30_000}


@pytest.fixture(scope="module")
def real_zoo(mnist, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight digit-cnns (width 0.5) really trained on ColoredMNIST at σ² 0.02 and 0.05, pools A
    and B, stored through the store's own write path. Each pool is 1,024 digits coloured here
    (rendering the full 30,000-digit pools would cost more than the training)."""
    spec_dict = tiny_spec_dict(n_models=8, models_per_task=2, train_size=192)
    spec_dict["zoo"] |= {"width": 0.5, "eval_size": 200}
    spec = parse_spec(spec_dict)
    path = tmp_path_factory.mktemp("scale") / "real.zarr"
    store = ZooStore.create(path, spec)
    rng = np.random.default_rng(0)
    test = slice(0, 200)
    for index in range(spec.n_models):
        config = spec.config(index)
        digits = slice(POOL_START[config.pool], POOL_START[config.pool] + 1024)
        sigma2 = config.bias_level
        train = mnist.train_images[digits], mnist.train_labels[digits]
        held_out = mnist.test_images[test], mnist.test_labels[test]
        data = TrainingData(train=render_colored_mnist(*train, sigma2, False, rng),
                            test_biased=render_colored_mnist(*held_out, sigma2, False, rng),
                            test_unbiased=render_colored_mnist(*held_out, sigma2, True, rng))
        torch.set_num_threads(1)
        store.write_model(index, train_model(spec.arch, spec.width, config, data, eval_size=spec.eval_size))
    return path


def _random_store(path: Path, n_models: int, models_per_task: int) -> ZooStore:
    """A full-width digit-cnn zoo of random finite weights (no training), written block by block."""
    return random_zoo(path, parse_spec(tiny_spec_dict(n_models=n_models, models_per_task=models_per_task)))


class _Gets(logging.Handler):
    """The keys a LoggingStore was asked for, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.strip().startswith("Calling") and ".get(" in message:
            self.keys.append(message.split(".get(", 1)[1].rstrip(")"))

    def weight_chunks(self) -> list[str]:
        return [key for key in self.keys if key.startswith("weights/c/")]


def _logged(path: Path) -> tuple[Zoo, _Gets]:
    """The zoo at ``path`` through a LoggingStore, with a handler that collects what it is asked."""
    gets = _Gets()
    logging_store = LoggingStore(LocalStore(path, read_only=True), log_level="INFO")
    # Added here, not as log_handler=: LoggingStore skips that one when any ancestor logger has a
    # handler, as the root logger does under pytest.
    logging_store.logger.addHandler(gets)
    return Zoo(zarr.open_group(logging_store, mode="r"), path), gets


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAST))
def test_chunked_features_fit_and_predict_exactly_as_in_memory(real_zoo: Path, name: str) -> None:
    from detector.evaluate import labels, zoo_features
    from detector.models import DETECTORS, make_detector
    from detector.workflow import fit_on_zoo, probe_context

    assert sorted(DETECTORS) == sorted(FAST)
    store = open_zoo(real_zoo)
    rows = np.flatnonzero(store.done)
    y = labels(store, "bias_level")[rows]
    context = probe_context(name, store, None)  # the battery, for the detectors that run networks
    features = make_detector(name, store.layout, **context)[0]
    in_memory = store.weights(rows)
    chunked = zoo_features(store, rows, features, chunk_models=3)  # chunks of 3 over store chunks of 2
    np.testing.assert_array_equal(chunked, features.transform(in_memory))
    scattered = np.array([7, 0, 5, 0])  # any order, repeats allowed
    np.testing.assert_array_equal(zoo_features(store, scattered, features, chunk_models=2),
                                  features.transform(store.weights(scattered)))

    from_weights = make_detector(name, store.layout, **context, **FAST[name]).fit(in_memory, y)
    from_chunks = fit_on_zoo(make_detector(name, store.layout, **context, **FAST[name]), store, rows, y)
    np.testing.assert_array_equal(from_chunks.predict_proba(in_memory), from_weights.predict_proba(in_memory))
    if name != "dense" and name != "layer_conv":  # statistics: far fewer numbers than weights
        assert chunked.shape[1] * 10 < store.n_params


@pytest.mark.slow
def test_rows_outside_the_zoo_and_raw_detectors_across_widths_are_refused(real_zoo: Path) -> None:
    from detector.evaluate import labels, zoo_features
    from detector.models import DetectorError, for_layout, make_detector
    from modelzoo.layouts import arch_layout

    store = open_zoo(real_zoo)
    rows = np.flatnonzero(store.done)
    with pytest.raises(StoreError, match=r"models \[8\] lie outside"):
        zoo_features(store, np.array([0, 8]), make_detector("boosting", store.layout)[0])
    dense = make_detector("dense", store.layout, **FAST["dense"]).fit(store.weights(rows),
                                                                        labels(store, "bias_level")[rows])
    with pytest.raises(DetectorError, match="reads the exact layout it was trained on"):
        for_layout(dense, arch_layout("digit-cnn", 1.0))  # the zoo is width 0.5


def test_the_reader_asks_the_store_for_one_chunk_of_models_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "random.zarr"
    _random_store(path, n_models=48, models_per_task=4)
    zoo, gets = _logged(path)
    rows = np.arange(48)
    seen: list[str] = []
    expected = open_zoo(path).weights(rows)
    for chunk_rows, weights in zoo.weight_chunks(rows, chunk_models=8):
        new = gets.weight_chunks()[len(seen):]
        assert len(chunk_rows) == 8 and len(new) == 2, new  # 8 models = exactly two store chunks of 4
        np.testing.assert_array_equal(weights, expected[chunk_rows])
        seen += new
    assert sorted(seen) == sorted({f"weights/c/{c}/0" for c in range(12)}), "each chunk read exactly once"
    scattered = np.array([45, 2, 2, 17])  # any order, repeats allowed; each chunk still read once
    before = len(gets.weight_chunks())
    np.testing.assert_array_equal(zoo.weights(scattered), expected[scattered])
    assert len(gets.weight_chunks()) - before == 3


def test_detector_features_read_each_chunk_once(tmp_path: Path) -> None:
    from detector.evaluate import zoo_features
    from detector.models import make_detector

    path = tmp_path / "random.zarr"
    _random_store(path, n_models=48, models_per_task=4)
    zoo, gets = _logged(path)
    features = zoo_features(zoo, np.arange(48), make_detector("boosting", zoo.layout)[0], chunk_models=8)
    assert len(features) == 48 and len(gets.weight_chunks()) == 12  # each chunk once


def _peak_bytes(function, *args, **kwargs) -> tuple[int, object]:
    tracemalloc.start()
    try:
        result = function(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def _least_peak(function, *args, **kwargs) -> int:
    """The least peak of three runs: zarr decodes a selection's chunks on threads, so on a busy
    machine a run now and then holds a few more buffers at once (one CI run measured 1.27x)."""
    return min(_peak_bytes(function, *args, **kwargs)[0] for _ in range(3))


def _row_means(zoo: Zoo, rows: np.ndarray) -> np.ndarray:
    """What a chunked reader computes: one number per model, one chunk of weights in memory."""
    return np.concatenate([weights.mean(1) for _, weights in zoo.weight_chunks(rows, chunk_models=4)])


@pytest.mark.slow  # tracemalloc slows every allocation of seven full passes
def test_reading_in_chunks_takes_memory_for_one_chunk_however_many_models(tmp_path: Path) -> None:
    zoo = _random_store(tmp_path / "random.zarr", n_models=96, models_per_task=4)
    rows = np.arange(96)
    matrix_bytes = 96 * zoo.n_params * 4
    _row_means(zoo, rows[:4])  # warm caches (metadata)
    quarter_peak = _least_peak(_row_means, zoo, rows[:24])
    chunked_peak = _least_peak(_row_means, zoo, rows)
    means = _row_means(zoo, rows)
    in_memory_peak, weights = _peak_bytes(zoo.weights, rows)
    assert in_memory_peak >= matrix_bytes  # the measure sees the whole matrix when it is held
    # flat in the number of models: holding them all would be 4x the quarter
    assert chunked_peak < 1.5 * quarter_peak, (chunked_peak, quarter_peak)
    assert chunked_peak < matrix_bytes / 3, (chunked_peak, matrix_bytes)
    np.testing.assert_allclose(means, weights.mean(1), rtol=1e-6)


@pytest.mark.slow  # tracemalloc slows every allocation of seven full passes
def test_chunked_features_take_memory_for_one_chunk_however_many_models(tmp_path: Path) -> None:
    from detector.evaluate import zoo_features
    from detector.models import make_detector

    store = _random_store(tmp_path / "random.zarr", n_models=96, models_per_task=4)
    rows = np.arange(96)
    matrix_bytes = 96 * store.n_params * 4
    detector = make_detector("boosting", store.layout)[0]
    zoo_features(store, rows[:4], detector, chunk_models=4)  # warm caches (metadata, layouts)

    quarter_peak = _least_peak(zoo_features, store, rows[:24], detector, chunk_models=4)
    chunked_peak = _least_peak(zoo_features, store, rows, detector, chunk_models=4)
    features = zoo_features(store, rows, detector, chunk_models=4)
    in_memory_peak, weights = _peak_bytes(store.weights, rows)
    assert in_memory_peak >= matrix_bytes  # the measure sees the whole matrix when it is held
    # flat in the number of models: holding them all would be 4x the quarter
    assert chunked_peak < 1.5 * quarter_peak, (chunked_peak, quarter_peak)
    assert chunked_peak < matrix_bytes / 3, (chunked_peak, matrix_bytes)
    np.testing.assert_array_equal(features, detector.transform(weights))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # two held-out models
def test_cli_trains_and_evaluates_on_chunked_features_and_refuses_raw_weights_over_budget(
        real_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from detector.cli import main

    folder = tmp_path / "det"
    assert main(["detector", "train", str(real_zoo), "--out", str(folder), "--detector", "boosting",
                 "--split", "random", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["zoo"]["n_train"] + trained["zoo"]["n_heldout"] == 8
    assert main(["detector", "evaluate", str(folder), str(real_zoo), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["scores"]["n_models"] == 8

    # Six training models: one chunk of their weights fits, all of them kept as features does not.
    budget = 1.5 * 6 * 4 * open_zoo(real_zoo).n_params / 2**30
    args = ["detector", "train", str(real_zoo), "--out", str(tmp_path / "x"), "--split", "random",
            "--memory-budget-gb", f"{budget:.9f}"]
    assert main([*args, "--detector", "dense"]) == 2
    err = capsys.readouterr().err
    assert "over the memory budget" in err and "boosting, deepsets" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    assert main([*args, "--detector", "deepsets"]) == 0  # its features fit easily


def test_read_rows_reads_exactly_what_zarr_reads(tmp_path: Path) -> None:
    path = tmp_path / "random.zarr"
    store = _random_store(path, n_models=22, models_per_task=4)
    store.group["done"][20:22] = False  # a partly written last chunk
    zarr_only, _ = _logged(path)  # a wrapped store: read_rows must fall back to zarr itself
    for name in ("done", "checksum", "weights", "metrics/unbiased_acc", "metrics/per_class_acc",
                 "config/sigma2"):
        array, wrapped = store.group[name], zarr_only.group[name]
        for start, stop in ((0, None), (3, 17), (5, 5), (19, 22), (21, 40)):
            expected = array[start:stop]
            np.testing.assert_array_equal(read_rows(array, start, stop), expected)
            np.testing.assert_array_equal(read_rows(wrapped, start, stop), expected)
    (path / "metrics" / "per_class_acc" / "c" / "5" / "0").unlink()  # models 20..21's chunk, as never written
    assert np.isnan(read_rows(store.group["metrics/per_class_acc"], 20)).all()  # it reads as the fill value
    assert not np.isnan(read_rows(store.group["metrics/per_class_acc"], 0, 20)).any()

    assert open_zoo(path).info()["n_done"] == 20
    (path / "done" / "c" / "1").write_bytes(b"\x00garbage")
    problems = open_zoo(path).verify().problems
    assert len(problems) == 1 and problems[0].startswith("models 4..7: unreadable chunk"), problems


def test_urls_are_refused_by_name_and_a_copy_in_object_storage_reads_with_plain_zarr(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from detector.cli import main

    fsspec = pytest.importorskip("fsspec")
    path = tmp_path / "random.zarr"
    _random_store(path, n_models=8, models_per_task=2)
    memory = fsspec.filesystem("memory")  # an in-process object store with the s3/gs interface
    memory.put(str(path), "/bucket/zoo.zarr", recursive=True)
    try:
        copy = zarr.open_group("memory://bucket/zoo.zarr", mode="r")
        zoo = open_zoo(path)
        assert copy.attrs["spec_digest"] == zoo.attrs["spec_digest"]
        np.testing.assert_array_equal(copy["done"][:], zoo.done)
        np.testing.assert_array_equal(copy["weights"][5], zoo.model_weights(5))
        with pytest.raises(StoreError, match=r"must be a folder on a file system.*not a URL"):
            open_zoo("memory://bucket/zoo.zarr")
    finally:
        memory.rm("/bucket", recursive=True)
    assert main(["zoo", "info", "s3://bucket/zoo.zarr"]) == 2
    err = capsys.readouterr().err
    assert "not a URL" in err and "Traceback" not in err
