"""Fairness regularizers: loss terms that change what one model learns about a sensitive attribute.

Part of the trainer stage (dataset → **trainer + regularizer** → store). A regularizer is an
``nn.Module`` that declares where it reads its features (its :class:`Tap`: a layer and an
activation, after its source paper), hooks itself onto the model, and returns γ·R, the term
the trainer adds to its task loss. The trainer does not know which regularizer it runs::

    reg = regularizer_for_network("grad", 1.0, model, (3, 28, 28), num_groups=10, num_classes=10)
    optimizer = torch.optim.Adam([*model.parameters(), *reg.parameters()])
    with reg.attach(model) as tap:
        logits = model(images)
        loss = F.cross_entropy(logits, targets) + reg(tap.features, logits, targets, sensitive)

Heads (attribute detectors) are built in ``__init__`` from explicit ``feature_dim`` and
``num_groups`` arguments, never lazily: a head created on the first forward would be missing
from ``reg.parameters()`` when the optimizer is built, and would silently never train.
:func:`regularizer_for_network` measures ``feature_dim`` at the tap for you.
Formulas and sources are those of DESIGN §4; each class says where it departs from them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from fairtrain.adversaries import GRAD, LNTL, SensitiveNets
from fairtrain.base import (  # re-exported: the regularizer API in one place
    GradientReversal,
    RegularizerError,
    balanced_weights,
    ndr_penalty,
    reverse_gradient,
)
from fairtrain.interface import Regularizer
from fairtrain.methods import NDR, BinaryBernoulli, BinaryMI, EnD
from fairtrain.reweighting import GroupBalanced, UnsupervisedGroups
from fairtrain.taps import ACTIVATIONS, FeatureTap, Tap

__all__ = [
    "ACTIVATIONS",
    "GRAD",
    "LNTL",
    "MODEL_SHAPES",
    "NDR",
    "REGULARIZERS",
    "TAP_OPTIONS",
    "BinaryBernoulli",
    "BinaryMI",
    "EnD",
    "FeatureTap",
    "GradientReversal",
    "GroupBalanced",
    "Regularizer",
    "RegularizerError",
    "SensitiveNets",
    "Tap",
    "UnsupervisedGroups",
    "balanced_weights",
    "check_regularizer_name",
    "get_regularizer",
    "ndr_penalty",
    "regularizer_for_model",
    "regularizer_for_network",
    "regularizer_options",
    "regularizer_tap",
    "reverse_gradient",
]

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
    the number of pseudo-groups. Every regularizer also takes ``layer`` and ``activation``, which
    override its source's :class:`Tap`."""
    tap_options = {k: options.pop(k) for k in TAP_OPTIONS if k in options}
    regularizer = _build_named(name, gamma, options)
    regularizer.tap = _tap(type(regularizer).default_tap, tap_options)
    return regularizer


def _tap(default: Tap, options: Mapping[str, Any]) -> Tap:
    """``default`` with the user's ``layer`` / ``activation`` options applied."""
    return Tap(options.get("layer", default.layer), options.get("activation", default.activation))


def _build_named(name: str, gamma: float, options: dict[str, Any]) -> Regularizer:
    base, plus, inner_name = name.partition("+")
    if not plus:
        cls = _lookup(name)
        accepted, _ = _option_names(cls)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise RegularizerError(f"{name} does not take options {unknown}; it accepts "
                                   f"{sorted(accepted | set(TAP_OPTIONS))}")
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
                               f"{sorted(outer_accepts | inner_accepts | set(TAP_OPTIONS))}")
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
MODEL_SHAPES = ("feature_dim", "feature_shape", "num_groups", "num_classes")
# Options every regularizer takes: where it reads its features (see :class:`Tap`).
TAP_OPTIONS = ("layer", "activation")


def regularizer_options(name: str) -> set[str]:
    """The options a user may set for ``name`` (constructor keywords other than γ and the
    model shapes a trainer supplies); empty for ``"none"``."""
    check_regularizer_name(name)
    if name == "none":
        return set()
    parts = [part for part in name.partition("+")[::2] if part]
    own = set().union(*(_option_names(_lookup(part))[0] for part in parts)) - set(MODEL_SHAPES)
    return own | set(TAP_OPTIONS)


def regularizer_vectorizable(name: str) -> bool:
    """Whether models trained with ``name`` can share a vectorized bank (see
    ``Regularizer.vectorizable``); True for ``"none"``."""
    check_regularizer_name(name)
    return name == "none" or all(_lookup(part).vectorizable for part in name.partition("+")[::2] if part)


def regularizer_tap(name: str, options: Mapping[str, Any] | None = None) -> Tap:
    """Where ``name`` reads its features: its source's tap, or the one ``options`` set through
    ``layer`` / ``activation``. For ``unsupervised+X`` it is the tap of the pair (the pseudo-groups
    are found on the features X reads)."""
    check_regularizer_name(name)
    return _tap(_lookup(name.partition("+")[0]).default_tap, options or {})


def regularizer_for_model(name: str, gamma: float, *, feature_dim: int, num_groups: int,
                          num_classes: int, options: dict[str, Any] | None = None,
                          feature_shape: tuple[int, ...] | None = None) -> Regularizer:
    """Build ``name`` for a model whose bottleneck has ``feature_dim`` units.

    The shapes a trainer knows (bottleneck width, number of sensitive groups, number of
    classes) go only to the constructors that take them. For ``unsupervised+X``, X sees the
    two pseudo-groups, not ``num_groups``. Of ``options``, those ``name`` does not take are
    ignored: a zoo that sweeps several regularizers sets each one's options once for all.
    """
    check_regularizer_name(name)
    base, plus, inner = name.partition("+")
    accepted = set().union(*(_option_names(_lookup(part))[0] for part in (base, inner) if part))
    shapes = {"feature_dim": feature_dim, "num_classes": num_classes,
              "feature_shape": feature_shape or (feature_dim,)}
    if not plus:
        shapes["num_groups"] = num_groups
    accepted |= set(TAP_OPTIONS)
    chosen = {k: v for k, v in (options or {}).items() if k in accepted and k not in MODEL_SHAPES}
    return get_regularizer(name, gamma, **{k: v for k, v in shapes.items() if k in accepted}, **chosen)


def regularizer_for_network(name: str, gamma: float, model: nn.Module, input_shape: tuple[int, ...], *,
                            num_groups: int, num_classes: int,
                            options: Mapping[str, Any] | None = None) -> Regularizer:
    """Build ``name`` for ``model``: its tap is resolved from ``options`` and its width measured
    by one blank forward pass of an ``input_shape`` image (no random number is drawn, so the
    heads' initial weights follow the model's in the global RNG as before). A tap layer the
    model lacks is a :class:`RegularizerError` naming the layers it has."""
    shape = regularizer_tap(name, options).shape(model, input_shape)
    return regularizer_for_model(name, gamma, feature_dim=math.prod(shape), num_groups=num_groups,
                                 num_classes=num_classes, options=dict(options or {}), feature_shape=shape)
