"""Meta-detectors by name: which weight features and which classifier make each one (IFBiD).

Stage of the flow: store → **detector** → report. A detector learns what bias a model carries
from its weights alone. Every detector is a scikit-learn :class:`~sklearn.pipeline.Pipeline`
whose input X is a float array of flat weight rows (models, P) and whose labels are one class
per model (σ² or ρ, the favoured face group, biased vs not, the regularizer)::

    Pipeline([("features", WeightFeatures(kind, layout)),   # stateless: weights → features
              ...,                                           # e.g. a StandardScaler
              ("classifier", head)])                         # learns from feature arrays

so ``clone``, ``cross_val_score``, ``GridSearchCV`` (``classifier__max_iter``...) and
``NotFittedError`` behave as for any scikit-learn model. Seven detectors (:data:`DETECTORS`):

* ``dense`` — IFBiD's first baseline: an MLP on the raw, standardised flat weights. Tied to
  one exact layout; breaks under a permutation of hidden units.
* ``layer_conv`` — IFBiD's second baseline: each layer's raw weights through their own 1-D
  convolution block, pooled, concatenated, then a dense head
  (:class:`~detector.heads.LayerConvClassifier`). Also tied to one layout.
* ``boosting`` — gradient boosting on per-tensor statistics and first-layer colour
  statistics (the strong simple baseline of Unterthiner et al. 2020). Permutation invariant,
  and its features have the same meaning, and number, at any width.
* ``deepsets`` — each hidden unit described by its incoming and outgoing weights, a shared
  per-layer encoder, mean+max pooling over units, a head
  (:class:`~detector.heads.DeepSetsClassifier`): permutation invariant, any width.
* ``probe`` — no weight statistics: each network is rebuilt and shown the detector's probe
  battery (:mod:`detector.battery`); its answers and layer responses, indexed by probe and
  class (:class:`~detector.probing.ProbeFeatures`), go to a regularised logistic head that is
  ordinal for bias levels (:class:`~detector.ordinal.LogisticHead`); on a face zoo, to one
  scorer shared by the groups (:class:`~detector.groupscore.GroupScorer`). Invariant to unit
  permutations and ReLU rescaling, any width.
* ``rescaled`` — weights only, read as a function reads them: per-unit importance, switch-on
  threshold, colour and class directions that no unit permutation, ReLU rescaling or width
  change moves (:mod:`detector.rescaled`), into the logistic head: the inference-free member.
* ``hybrid`` — the probe features stacked with boosting's weight statistics, into the same
  head: what a network does beside what it holds (its weight statistics shift with the width).

Heads that need the layer structure get it as constructor parameters derived here from the
layout (``layer_sizes``, ``set_sizes``), never as hidden state. :func:`for_layout` makes a
fitted width-independent detector read another width of its architecture.

This registry imports neither scikit-learn nor torch until a detector is built: the command
line reads it (through :mod:`detector.names`) to build its parser.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modelzoo.errors import WeightbiasError
from modelzoo.layouts import TensorSlot

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from sklearn.pipeline import Pipeline

    from detector.transform import WeightFeatures


PROBE_KIND = "probe"  # features from a network's answers on a battery (detector.probing), not its weights


class DetectorError(WeightbiasError, ValueError):
    """Input a detector cannot take: wrong architecture, bad labels, an unknown detector."""


@dataclass(frozen=True)
class DetectorKind:
    """One named detector: its feature kind, its steps after the features, what it can read."""

    name: str
    features: str  # WeightFeatures kind
    heads: tuple[str, ...]  # class names its final step may have, to recognise a pipeline as this detector
    width_independent: bool
    steps: Callable[[WeightFeatures], list[tuple[str, Any]]]


def _dense_steps(features: WeightFeatures) -> list[tuple[str, Any]]:
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    # No early stopping: a zoo may hold a handful of models per class, too few to hold out.
    return [("scale", StandardScaler()),
            ("classifier", MLPClassifier((128,), alpha=1e-3, max_iter=300, random_state=0))]


def _boosting_steps(features: WeightFeatures) -> list[tuple[str, Any]]:
    from sklearn.ensemble import HistGradientBoostingClassifier

    # Small leaves: a zoo may hold only tens of models per class.
    boosting = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, min_samples_leaf=4,
                                              early_stopping=False, random_state=0)
    return [("classifier", boosting)]


def _layer_conv_steps(features: WeightFeatures) -> list[tuple[str, Any]]:
    from detector.heads import LayerConvClassifier

    return [("classifier", LayerConvClassifier(layer_sizes=layer_sizes(features.slots())))]


def _logistic_steps(features: Any) -> list[tuple[str, Any]]:
    battery = getattr(features, "battery", None)
    if getattr(battery, "groups", None):  # a face battery: one scorer shared by the groups' blocks
        from detector.groupscore import GroupScorer

        return [("classifier", GroupScorer(tuple(battery.groups), battery.block))]
    from detector.ordinal import LogisticHead

    return [("classifier", LogisticHead())]


def _deepsets_steps(features: WeightFeatures) -> list[tuple[str, Any]]:
    from detector.features import UNIT_DESCRIPTORS, feature_names
    from detector.heads import DeepSetsClassifier

    n_extra = len(feature_names(list(features.slots()), "first_layer"))
    return [("classifier", DeepSetsClassifier(n_extra=n_extra, set_sizes=features.set_sizes(),
                                              element_dim=len(UNIT_DESCRIPTORS)))]


_PROBE_HEADS = ("LogisticHead", "GroupScorer")  # GroupScorer on a face battery
DETECTORS: dict[str, DetectorKind] = {kind.name: kind for kind in (
    DetectorKind("boosting", "stats+first_layer", ("HistGradientBoostingClassifier",), True, _boosting_steps),
    DetectorKind("deepsets", "first_layer+units", ("DeepSetsClassifier",), True, _deepsets_steps),
    DetectorKind("dense", "raw", ("MLPClassifier",), False, _dense_steps),
    DetectorKind("layer_conv", "raw", ("LayerConvClassifier",), False, _layer_conv_steps),
    DetectorKind("probe", PROBE_KIND, _PROBE_HEADS, True, _logistic_steps),
    DetectorKind("rescaled", "rescaled", ("LogisticHead",), True, _logistic_steps),
    DetectorKind("hybrid", f"{PROBE_KIND}+stats+first_layer", _PROBE_HEADS, True, _logistic_steps),
)}


def runs_networks(name: str) -> bool:
    """Whether detector ``name`` reads what networks do on a probe battery, not only weights."""
    return name in DETECTORS and DETECTORS[name].features.split("+")[0] == PROBE_KIND


def layer_sizes(slots: Sequence[TensorSlot]) -> tuple[int, ...]:
    """Raw columns per layer: consecutive tensors of one module (``conv1.weight``, ``conv1.bias``)."""
    sizes: list[int] = []
    previous = None
    for slot in slots:
        module = slot.name.rsplit(".", 1)[0]
        if module == previous:
            sizes[-1] += slot.size
        else:
            sizes.append(slot.size)
        previous = module
    return tuple(sizes)


def make_detector(name: str, layout: Sequence[TensorSlot], *, arch: str | None = None, battery: Any = None,
                  **params: Any) -> Pipeline:
    """The unfitted detector ``name`` for weight rows of ``layout`` (``zoo.layout``).

    ``params`` set the final classifier's hyper-parameters, e.g.
    ``make_detector("deepsets", zoo.layout, epochs=150)``. The ``probe`` detector also needs
    the architecture the rows are weights of (``arch``) and its probe images (``battery``,
    :func:`detector.battery.battery_for_task`).
    """
    from sklearn.pipeline import Pipeline

    from detector.transform import WeightFeatures

    if name not in DETECTORS:
        raise DetectorError(f"unknown detector {name!r}; known: {sorted(DETECTORS)}")
    kind = DETECTORS[name]
    if runs_networks(name):
        from detector.probing import ProbeFeatures

        if arch is None or battery is None:
            raise DetectorError(f"the {name} detector needs the architecture (arch=) and a probe battery "
                                "(battery=detector.battery.battery_for_task(task))")
        features = ProbeFeatures(tuple(layout), arch, battery, kind.features.partition("+")[2] or None)
    else:
        features = WeightFeatures(kind.features, tuple(layout))
    pipeline = Pipeline([("features", features), *kind.steps(features)])
    final = pipeline[-1]
    unknown = sorted(set(params) - set(final.get_params(deep=False)))
    if unknown:
        raise DetectorError(f"the {name} detector's {type(final).__name__} has no parameter(s) {unknown}; "
                            f"it takes {sorted(final.get_params(deep=False))}")
    final.set_params(**params)
    return pipeline


def detector_name(detector: Pipeline) -> str:
    """The :data:`DETECTORS` name of a detector pipeline, or ``"custom"``."""
    kind = getattr(detector[0], "kind", None)
    for entry in DETECTORS.values():
        if entry.features == kind and type(detector[-1]).__name__ in entry.heads:
            return entry.name
    return "custom"


def for_layout(detector: Pipeline, layout: Sequence[TensorSlot]) -> Pipeline:
    """The fitted ``detector`` made to read weight rows of ``layout``.

    The same layout returns ``detector`` itself. Another width of the same architecture gets a
    pipeline sharing the fitted steps, with features computed for the new layout; a head over
    sets of units (deepsets) is re-pointed at the new set sizes. A detector whose features
    change in number with the width (raw weights) is refused by name, and so is another
    architecture (other tensor names).
    """
    from sklearn.base import clone
    from sklearn.pipeline import Pipeline

    features, layout = detector[0], tuple(layout)
    old = features.slots()
    if [slot.name for slot in old] != [slot.name for slot in layout]:
        raise DetectorError(f"this detector reads models with tensors {', '.join(s.name for s in old[:3])}, "
                            f"...; got {', '.join(s.name for s in layout[:3])}, ... (another architecture)")
    if [slot.shape for slot in old] == [slot.shape for slot in layout]:
        return detector
    moved = clone(features).set_params(layout=layout)
    n_in = getattr(features, "n_features_in_", None)
    if n_in is not None:  # fitted on rows of the old layout: record the new row length as fitting would
        moved.n_features_in_ = moved.n_params
    steps = list(detector.steps[1:])
    name, final = steps[-1]
    if hasattr(final, "with_set_sizes"):
        steps[-1] = (name, final.with_set_sizes(moved.set_sizes()))
    first = steps[0][1]
    if moved.n_features_out() != getattr(first, "n_features_in_", moved.n_features_out()):
        changed = next(s for s, t in zip(old, layout, strict=True) if s.shape != t.shape)
        raise DetectorError(f"this {detector_name(detector)} detector reads the exact layout it was trained "
                            f"on ({changed.name} {changed.shape}); got {layout[old.index(changed)].shape}: "
                            f"another width. Use a width-independent detector ({', '.join(_independent())}) "
                            "across widths")
    return Pipeline([("features", moved), *steps])


def _independent() -> list[str]:
    return [name for name, kind in DETECTORS.items() if kind.width_independent]
