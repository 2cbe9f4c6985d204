"""Epoch checkpoints: a long one-model training run saves its whole state after every epoch
and, started again after a kill, carries on from the last epoch it saved.

Part of the trainer stage. The evidence runs of :mod:`scripts.debias_mnist` train one model
for hours (LNTL's 200 epochs); a session limit or a killed process would otherwise lose all
of it. The state is the network, its optimizer, the regularizer (heads and buffers), each
batch shuffler, the global random stream (dropout), the validation history and the epoch, so
a resumed run ends on the same weights, to the bit on CPU, as one never interrupted. The file
is written atomically and read with ``torch.load(weights_only=True)``: it unpickles nothing,
and a state saved for another run (another config, architecture or data) is refused.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from modelzoo.atomic import write_atomic
from modelzoo.errors import WeightbiasError

STATE_VERSION = 1


class ResumeError(WeightbiasError):
    """An epoch checkpoint that is unreadable or belongs to another run."""


def run_key(*parts: object) -> str:
    """A fingerprint of what a run is (its config, architecture, data): a saved state is
    resumed only by a run with the same key."""
    return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:16]


class EpochCheckpoint:
    """Where one run keeps its state between epochs, and the key that state must carry.

    :func:`modelzoo.loop.train_loop` calls :meth:`load` before its first epoch and :meth:`save`
    after each one; the caller calls :meth:`clear` once the run's result is stored elsewhere.
    Each state also carries the seconds the run has trained so far, over every process that
    worked on it: :attr:`earlier_seconds` is what the processes before this one spent.
    """

    def __init__(self, path: str | Path, key: str) -> None:
        self.path, self.key = Path(path), key
        self.earlier_seconds, self._clock = 0.0, time.perf_counter()

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none yet."""
        self._clock = time.perf_counter()  # this process's share starts here
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # any unreadable file: truncated, foreign, not a torch file
            raise ResumeError(f"{self.path}: not a readable epoch checkpoint ({type(error).__name__}: "
                              f"{error}); delete it to train from the start") from error
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ResumeError(f"{self.path}: not an epoch checkpoint of this version ({STATE_VERSION}); "
                              "delete it to train from the start")
        if state.get("key") != self.key:
            raise ResumeError(f"{self.path} holds the state of another run (key {state.get('key')}, this "
                              f"run {self.key}: another config, architecture or data); give this run "
                              "its own checkpoint path or delete the file")
        self.earlier_seconds = float(state.get("seconds", 0.0))
        return state

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        seconds = self.earlier_seconds + time.perf_counter() - self._clock
        full = {**state, "version": STATE_VERSION, "key": self.key, "seconds": seconds}
        write_atomic(self.path, lambda handle: torch.save(full, handle))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class WarmupCheckpoint(EpochCheckpoint):
    """An epoch checkpoint that also keeps the network as it stood when the warm-up ended.

    That network is the pretrained baseline a regularizer such as LNTL unlearns from, whose
    accuracy Kim et al. report beside the debiased one. Its weights alone go to
    ``<path>.warmup.pt`` when epoch ``warmup_epochs`` is saved, and :meth:`clear` removes both.
    """

    def __init__(self, path: str | Path, key: str, warmup_epochs: int) -> None:
        super().__init__(path, key)
        self.warmup_epochs, self.kept = warmup_epochs, self.path.with_suffix(".warmup.pt")

    def save(self, state: dict[str, Any]) -> None:
        super().save(state)
        if self.warmup_epochs and state["epoch"] == self.warmup_epochs:
            weights = state["trainee"]["model"]
            write_atomic(self.kept, lambda handle: torch.save(weights, handle))

    def warmup_weights(self) -> dict[str, torch.Tensor] | None:
        """The network's ``state_dict`` when the warm-up ended (None if this run never kept it)."""
        if not self.kept.is_file():
            return None
        return torch.load(self.kept, map_location="cpu", weights_only=True)

    def clear(self) -> None:
        super().clear()
        self.kept.unlink(missing_ok=True)


def random_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global random streams a training step draws from (dropout, a regularizer's samples)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_random_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
