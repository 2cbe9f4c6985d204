"""Where a regularizer reads its features: a forward hook on a named layer (:class:`FeatureTap`)
and the declaration of which layer and activation (:class:`Tap`).

Part of the trainer stage (dataset → **trainer + regularizer** → store): each regularizer
declares its source's tap and hooks it onto the model itself, so the trainer knows no layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fairtrain.base import RegularizerError


class FeatureTap:
    """Capture the output of a named submodule on every forward pass (a forward hook).

    ``layer`` defaults to the model's ``bottleneck`` attribute. The captured tensor keeps its
    graph, so a regularizer's gradient flows back into the model. Note that it is the
    *module's* output: DigitCNN applies its ReLU inside ``features()``, after ``fc1``, so
    tapping "fc1" gives the pre-activation; pass ``activation=torch.relu`` to get the exact
    bottleneck. A module called twice in one forward keeps the last call's output.
    """

    def __init__(self, model: nn.Module, layer: str | None = None,
                 activation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        layer = layer if layer is not None else getattr(model, "bottleneck", None)
        modules = dict(model.named_modules())
        if not layer or layer not in modules:
            available = [name for name in modules if name]
            raise RegularizerError(f"{type(model).__name__} has no layer {layer!r}; available: {available}")
        self.layer = layer
        self.activation = activation
        self._features: torch.Tensor | None = None
        self._handles = [modules[layer].register_forward_hook(self._capture)]
        self.model = model

    def _capture(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            raise RegularizerError(f"layer {self.layer!r} returned {type(output).__name__}, not a tensor")
        self._features = output if self.activation is None else self.activation(output)

    @property
    def features(self) -> torch.Tensor:
        """The tapped layer's output from the latest forward pass."""
        if self._features is None:
            raise RegularizerError(f"no forward pass through {self.layer!r} since the tap was attached")
        return self._features

    def remove(self) -> None:
        """Detach the hook and drop the last features."""
        for handle in self._handles:
            handle.remove()
        self._features = None

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()



# What a tap applies to the layer's output: "pre" keeps it as the layer gives it (for fc1 and
# the convolutions, the pre-activation), "relu"/"tanh" apply that function.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "pre": None, "relu": torch.relu, "tanh": torch.tanh}


@dataclass(frozen=True)
class Tap:
    """Where a regularizer reads its features: a layer of the model and an activation on its
    output. ``layer=None`` is the model's ``bottleneck`` (``fc1`` in digit-cnn and gender-cnn).
    Each regularizer declares its source's tap as ``default_tap``; the options ``layer`` and
    ``activation`` (spec ``reg.layer``, ``reg.activation``) override it."""

    layer: str | None = None
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise RegularizerError(f"layer must be a layer name, got {self.layer!r}")
        if self.activation not in ACTIVATIONS:
            raise RegularizerError(f"activation must be one of {sorted(ACTIVATIONS)}, "
                                   f"got {self.activation!r}")

    def attach(self, model: nn.Module) -> FeatureTap:
        """A forward hook on ``model`` that captures this tap's features on every pass."""
        return FeatureTap(model, self.layer, ACTIVATIONS[self.activation])

    def shape(self, model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The features' shape per sample at this tap ((C, H, W) for a convolution's map), from
        one forward pass of a blank image in eval mode: no dropout mask, so no random number,
        is drawn."""
        was_training = model.training
        device = next(model.parameters()).device
        model.eval()
        try:
            with torch.no_grad(), self.attach(model) as tap:
                model(torch.zeros(1, *input_shape, device=device))
                return tuple(tap.features.shape[1:])
        finally:
            model.train(was_training)

    def width(self, model: nn.Module, input_shape: tuple[int, ...]) -> int:
        """Features per sample at this tap (C·H·W for a convolution's map)."""
        return math.prod(self.shape(model, input_shape))

    def __str__(self) -> str:
        return f"{self.layer or 'bottleneck'}/{self.activation}"
