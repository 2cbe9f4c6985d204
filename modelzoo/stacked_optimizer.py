"""One optimizer step for many models at once: Adam or SGD with momentum over stacked weights.

Part of the trainer stage, for :mod:`modelzoo.vectorized`: the weights of M models are one
(M, P) tensor, and each row moves exactly as the torch optimizer that
:func:`~modelzoo.training.make_optimizer` builds would move that model's parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modelzoo.errors import WeightbiasError
from modelzoo.training import make_optimizer


class VectorizeError(WeightbiasError, ValueError):
    """Models that cannot be trained together were passed as one group."""



def _reference(name: str) -> torch.optim.Optimizer:
    """The torch optimizer :func:`make_optimizer` builds for ``name`` (its type and defaults)."""
    return make_optimizer(name, [torch.zeros(1, requires_grad=True)], 1.0)


def stackable_optimizer(name: str) -> bool:
    """Whether :class:`StackedOptimizer` implements ``make_optimizer(name)`` exactly."""
    reference = _reference(name)
    d = reference.defaults
    if d.get("weight_decay", 0) != 0 or d.get("maximize", False):
        return False
    if isinstance(reference, torch.optim.Adam):
        return not d["amsgrad"] and not d.get("decoupled_weight_decay", False)
    return isinstance(reference, torch.optim.SGD) and d["dampening"] == 0 and not d["nesterov"]


class StackedOptimizer:
    """Adam or SGD with momentum over one (M, P) tensor, one learning rate per row.

    Both updates are elementwise, so row m moves exactly as a torch optimizer built by
    :func:`~modelzoo.training.make_optimizer` would move model m's parameters (same
    hyperparameters, same order of operations, up to rounding of the per-row step size).
    """

    def __init__(self, name: str, weights: torch.Tensor, lrs: Sequence[float]) -> None:
        if weights.ndim != 2 or len(lrs) != weights.shape[0]:
            raise VectorizeError(f"need one learning rate per row of the (M, P) weights, got "
                                 f"{len(lrs)} for shape {tuple(weights.shape)}")
        if not stackable_optimizer(name):
            raise VectorizeError(f"optimizer {name!r} is configured beyond what stacking implements")
        self.weights = weights
        self.lrs = torch.tensor(lrs, dtype=weights.dtype, device=weights.device)[:, None]
        reference = _reference(name)
        self.adam = isinstance(reference, torch.optim.Adam)
        self.defaults = dict(reference.defaults)
        self.steps = 0
        self.first = torch.zeros_like(weights)  # Adam's exp_avg, or SGD's momentum buffer
        self.second = torch.zeros_like(weights) if self.adam else None

    @torch.no_grad()
    def step(self) -> None:
        grad = self.weights.grad
        self.steps += 1
        if not self.adam:
            if self.steps == 1:
                self.first.copy_(grad)
            else:
                self.first.mul_(self.defaults["momentum"]).add_(grad)
            self.weights.addcmul_(self.first, -self.lrs)
            return
        beta1, beta2 = self.defaults["betas"]
        self.first.lerp_(grad, 1 - beta1)
        self.second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.lrs / (1 - beta1**self.steps)
        denom = (self.second.sqrt() / (1 - beta2**self.steps) ** 0.5).add_(self.defaults["eps"])
        self.weights.addcdiv_(self.first * -step_size, denom)

    def zero_grad(self) -> None:
        self.weights.grad = None
