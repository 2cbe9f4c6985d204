"""Epoch checkpoints: a one-model run killed after an epoch resumes to the same weights as a run
never interrupted, and a checkpoint that is unreadable or another run's is refused, untouched
(real MNIST, real torch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modelzoo
from modelzoo.loop import train_loop
from modelzoo.resume import EpochCheckpoint, ResumeError, WarmupCheckpoint, run_key
from modelzoo.spec import parse_spec
from modelzoo.training import OneModel, evaluate, fit, member, saved_model, seeded_model, train_model
from tests.conftest import tiny_spec_dict


class Killed(BaseException):
    """What a kill looks like to the run: it stops between two statements."""


class KilledAfter(EpochCheckpoint):
    """An epoch checkpoint whose process dies right after saving epoch ``last``."""

    def __init__(self, path: Path, key: str, last: int) -> None:
        super().__init__(path, key)
        self.last = last

    def save(self, state: dict) -> None:
        super().save(state)
        if state["epoch"] == self.last:
            raise Killed


@pytest.fixture(scope="module")
def lntl_run(mnist):
    """LNTL after a warm-up, SGD with momentum and a step schedule, dropout and best-validation
    selection: every piece of state a resumed run must bring back."""
    spec = parse_spec(tiny_spec_dict(epochs=3, train_size=1024, val_size=300, lr=0.01, optimizer="sgd",
                                     regularizer="lntl", warmup_epochs=1, lr_schedule="step", lr_step=1,
                                     select="best_val"))
    config = spec.config(0)
    return spec, config, modelzoo.training_data(spec, config)


def train(spec, config, data, checkpoint: EpochCheckpoint | None = None):
    model = seeded_model(spec.arch, spec.width, config, torch.device("cpu"))
    fitted = fit(model, data.train, config, torch.device("cpu"), data.num_groups, data.val, checkpoint)
    return model, fitted


def test_a_run_killed_after_an_epoch_resumes_to_the_weights_of_one_never_stopped(
        lntl_run, tmp_path: Path, one_torch_thread) -> None:
    spec, config, data = lntl_run
    whole, whole_fit = train(spec, config, data)
    path, key = tmp_path / "state.pt", run_key(config, spec.arch)
    with pytest.raises(Killed):
        train(spec, config, data, KilledAfter(path, key, last=2))
    killed = EpochCheckpoint(path, key).load()
    assert killed["epoch"] == 2 and killed["seconds"] > 0
    resumed, resumed_fit = train(spec, config, data, EpochCheckpoint(path, key))
    assert resumed_fit == whole_fit and resumed_fit.best_epoch is not None
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    ended = EpochCheckpoint(path, key).load()  # the caller clears it once stored
    assert ended["epoch"] == 3 and ended["seconds"] > killed["seconds"]  # both processes' time
    # A different start would not have matched: the weights after 2 epochs differ from the end.
    with pytest.raises(Killed):
        train(spec, config, data, KilledAfter(tmp_path / "early.pt", key, last=1))
    early = EpochCheckpoint(tmp_path / "early.pt", key).load()["trainee"]["model"]
    assert not torch.equal(early["conv1.weight"], whole.state_dict()["conv1.weight"])


def test_a_warmup_checkpoint_keeps_the_network_the_warmup_ended_on_until_cleared(
        lntl_run, tmp_path: Path, one_torch_thread) -> None:
    """LNTL's pretrained baseline: the weights after the warm-up's last epoch, kept beside the
    run's state, and gone with it once the run is stored."""
    spec, config, data = lntl_run
    key = run_key(config, spec.arch)
    with pytest.raises(Killed):
        train(spec, config, data, KilledAfter(tmp_path / "early.pt", key, last=config.warmup_epochs))
    warmed = EpochCheckpoint(tmp_path / "early.pt", key).load()["trainee"]["model"]
    checkpoint = WarmupCheckpoint(tmp_path / "state.pt", key, config.warmup_epochs)
    assert checkpoint.warmup_weights() is None
    ended, _ = train(spec, config, data, checkpoint)
    kept = checkpoint.warmup_weights()
    assert checkpoint.kept == tmp_path / "state.warmup.pt" and kept.keys() == warmed.keys()
    for name, tensor in warmed.items():
        assert torch.equal(tensor, kept[name]), name
    assert not torch.equal(kept["conv1.weight"], ended.state_dict()["conv1.weight"])
    checkpoint.clear()
    assert not checkpoint.path.exists() and not checkpoint.kept.exists()


def test_a_checkpoint_of_another_run_or_unreadable_is_refused_and_left_as_it_was(
        lntl_run, tmp_path: Path, one_torch_thread) -> None:
    spec, config, data = lntl_run
    short = config.replace(epochs=2, warmup_epochs=1, val_size=0, select="last")
    path = tmp_path / "state.pt"
    train(spec, short, data, EpochCheckpoint(path, run_key(short)))
    saved = path.read_bytes()
    other = config.replace(epochs=2, warmup_epochs=1, val_size=0, select="last", lr=0.02)
    with pytest.raises(ResumeError, match="holds the state of another run"):
        train(spec, other, data, EpochCheckpoint(path, run_key(other)))
    assert path.read_bytes() == saved
    path.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(ResumeError, match=r"not a readable epoch checkpoint.*delete it"):
        train(spec, short, data, EpochCheckpoint(path, run_key(short)))
    assert path.stat().st_size == len(saved) // 2
    plain = short.replace(regularizer="none")
    one = member(seeded_model(spec.arch, spec.width, plain, torch.device("cpu")), plain,
                 torch.device("cpu"), data.train, data.num_groups)
    with pytest.raises(ValueError, match="epoch checkpoints resume one model at a time, not a bank"):
        train_loop(OneModel(one, torch.device("cpu")), [one, one], torch.device("cpu"),
                   EpochCheckpoint(tmp_path / "bank.pt", "k"))


def test_a_saved_state_evaluates_as_the_network_the_run_ends_on(lntl_run, tmp_path: Path,
                                                                 one_torch_thread) -> None:
    """``saved_model`` (debias_mnist --interim) rebuilds the network from the last saved epoch,
    with a tap that is part of the forward pass (BinaryBernoulli's binary code) back in place."""
    spec, config, data = lntl_run
    coded = config.replace(regularizer="binary_bernoulli", gamma=0.5, epochs=1, warmup_epochs=0, val_size=0,
                           select="last", lr_schedule="constant")
    checkpoint = EpochCheckpoint(tmp_path / "state.pt", run_key(coded))
    assert saved_model(spec.arch, spec.width, coded, data, checkpoint) is None
    ended = train_model(spec.arch, spec.width, coded, data, eval_size=500, checkpoint=checkpoint)
    model, fitted, epochs_done = saved_model(spec.arch, spec.width, coded, data, checkpoint)
    again = evaluate(model, data, fitted, torch.device("cpu"), eval_size=500).metrics
    assert epochs_done == 1 and fitted.train_loss == ended.metrics["train_loss"]
    assert again["unbiased_acc"] == ended.metrics["unbiased_acc"]
    assert again["leakage"] == ended.metrics["leakage"]
    assert ended.metrics["wall_seconds"] >= checkpoint.load()["seconds"] > 0
    bare = seeded_model(spec.arch, spec.width, coded, torch.device("cpu"))
    bare.load_state_dict(model.state_dict())  # the same weights without the code's hook
    unhooked = evaluate(bare, data, fitted, torch.device("cpu"), eval_size=500).metrics
    assert unhooked["leakage"] != again["leakage"]
