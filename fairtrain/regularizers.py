"""Fairness regularizers: loss terms that change what one model learns about a sensitive attribute.

Part of the trainer stage (dataset → **trainer + regularizer** → store). A regularizer is an
``nn.Module`` that reads the features of a named bottleneck layer (through a
:class:`FeatureTap`) and returns γ·R, the term the trainer adds to its task loss. The trainer
does not know which regularizer it runs::

    tap = FeatureTap(model, "fc1", activation=torch.relu)
    reg = get_regularizer("grad", gamma=1.0, feature_dim=128, num_groups=3)
    optimizer = torch.optim.Adam([*model.parameters(), *reg.parameters()])
    logits = model(images)
    loss = F.cross_entropy(logits, targets) + reg(tap.features, logits, targets, sensitive)

Heads (attribute detectors) are built in ``__init__`` from explicit ``feature_dim`` and
``num_groups`` arguments, never lazily: a head created on the first forward would be missing
from ``reg.parameters()`` when the optimizer is built, and would silently never train.
Formulas and sources are those of DESIGN §4; each class says where it departs from them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fairtrain.base import (  # re-exported: the regularizer API in one place
    GradientReversal,
    Regularizer,
    RegularizerError,
    balanced_weights,
    ndr_penalty,
    reverse_gradient,
)
from fairtrain.methods import (
    GRAD,
    LNTL,
    NDR,
    BinaryBernoulli,
    BinaryMI,
    EnD,
    GroupBalanced,
    SensitiveNets,
    UnsupervisedGroups,
)

__all__ = ["GRAD", "LNTL", "MODEL_SHAPES", "NDR", "REGULARIZERS", "BinaryBernoulli", "BinaryMI", "EnD",
           "FeatureTap", "GradientReversal", "GroupBalanced", "Regularizer", "RegularizerError",
           "SensitiveNets", "UnsupervisedGroups", "balanced_weights", "check_regularizer_name",
           "get_regularizer", "ndr_penalty", "regularizer_for_model", "regularizer_options",
           "reverse_gradient"]

# ----------------------------------------------------------------------------- feature tap


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
        self._handle = modules[layer].register_forward_hook(self._capture)

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
        self._handle.remove()
        self._features = None

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# ----------------------------------------------------------------------------- registry


REGULARIZERS: dict[str, type[Regularizer]] = {
    cls.name: cls
    for cls in (NDR, EnD, GRAD, BinaryBernoulli, BinaryMI, SensitiveNets, LNTL, GroupBalanced,
                UnsupervisedGroups)
}


def _lookup(name: str) -> type[Regularizer]:
    if name not in REGULARIZERS:
        raise RegularizerError(f"unknown regularizer {name!r}; known: {sorted(REGULARIZERS)} "
                               f"and 'unsupervised+X' for X among them")
    return REGULARIZERS[name]


def _option_names(cls: type[Regularizer]) -> tuple[set[str], set[str]]:
    """(accepted, required) keyword options of a regularizer's constructor."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name not in ("self", "gamma", "inner")]
    return {p.name for p in params}, {p.name for p in params if p.default is inspect.Parameter.empty}


def _build(cls: type[Regularizer], gamma: float, options: dict[str, Any], label: str,
           **extra: Any) -> Regularizer:
    _, required = _option_names(cls)
    missing = sorted(required - set(options))
    if missing:
        raise RegularizerError(f"{label} needs options {missing}")
    return cls(gamma, **options, **extra)


def get_regularizer(name: str, gamma: float = 1.0, **options: Any) -> Regularizer:
    """Build a registered regularizer by name, e.g. ``get_regularizer("grad", 1.0, feature_dim=128,
    num_groups=3)``. "unsupervised+X" wraps X in :class:`UnsupervisedGroups`: options go to the
    constructor(s) that accept them (``feature_dim`` to both), and X's ``num_groups`` defaults to 2,
    the number of pseudo-groups."""
    base, plus, inner_name = name.partition("+")
    if not plus:
        cls = _lookup(name)
        accepted, _ = _option_names(cls)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise RegularizerError(f"{name} does not take options {unknown}; it accepts {sorted(accepted)}")
        return _build(cls, gamma, options, name)
    if base != UnsupervisedGroups.name:
        raise RegularizerError(f"composite names take the form 'unsupervised+X', got {name!r}")
    inner_cls = _lookup(inner_name)
    if inner_cls is UnsupervisedGroups:
        raise RegularizerError("'unsupervised+unsupervised' is not a regularizer; "
                               "X must be one that uses sensitive labels")
    outer_accepts, _ = _option_names(UnsupervisedGroups)
    inner_accepts, _ = _option_names(inner_cls)
    unknown = sorted(set(options) - outer_accepts - inner_accepts)
    if unknown:
        raise RegularizerError(f"{name} does not take options {unknown}; it accepts "
                               f"{sorted(outer_accepts | inner_accepts)}")
    inner_options = {k: v for k, v in options.items() if k in inner_accepts}
    if "num_groups" in inner_accepts:
        inner_options.setdefault("num_groups", 2)
    inner = _build(inner_cls, 1.0, inner_options, name)
    outer_options = {k: v for k, v in options.items() if k in outer_accepts}
    return _build(UnsupervisedGroups, gamma, outer_options, name, inner=inner)


def check_regularizer_name(name: str) -> None:
    """Raise :class:`RegularizerError` unless ``name`` is ``"none"``, registered, or ``unsupervised+X``."""
    if name == "none":
        return
    base, plus, inner = name.partition("+")
    _lookup(base)
    if plus and (base != UnsupervisedGroups.name or _lookup(inner) is UnsupervisedGroups):
        raise RegularizerError(f"composite names take the form 'unsupervised+X', got {name!r}")


# What a trainer fills in from the model and the data; everything else is the user's to set.
MODEL_SHAPES = ("feature_dim", "num_groups", "num_classes")


def regularizer_options(name: str) -> set[str]:
    """The options a user may set for ``name`` (constructor keywords other than γ and the
    model shapes a trainer supplies); empty for ``"none"``."""
    check_regularizer_name(name)
    if name == "none":
        return set()
    parts = [part for part in name.partition("+")[::2] if part]
    return set().union(*(_option_names(_lookup(part))[0] for part in parts)) - set(MODEL_SHAPES)


def regularizer_for_model(name: str, gamma: float, *, feature_dim: int, num_groups: int,
                          num_classes: int, options: dict[str, Any] | None = None) -> Regularizer:
    """Build ``name`` for a model whose bottleneck has ``feature_dim`` units.

    The shapes a trainer knows (bottleneck width, number of sensitive groups, number of
    classes) go only to the constructors that take them. For ``unsupervised+X``, X sees the
    two pseudo-groups, not ``num_groups``. Of ``options``, those ``name`` does not take are
    ignored: a zoo that sweeps several regularizers sets each one's options once for all.
    """
    check_regularizer_name(name)
    base, plus, inner = name.partition("+")
    accepted = set().union(*(_option_names(_lookup(part))[0] for part in (base, inner) if part))
    shapes = {"feature_dim": feature_dim, "num_classes": num_classes}
    if not plus:
        shapes["num_groups"] = num_groups
    chosen = {k: v for k, v in (options or {}).items() if k in accepted and k not in MODEL_SHAPES}
    return get_regularizer(name, gamma, **{k: v for k, v in shapes.items() if k in accepted}, **chosen)
