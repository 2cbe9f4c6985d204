"""``WeightFeatures``: the scikit-learn transformer from flat weight rows to feature rows.

First step of every detector :class:`~sklearn.pipeline.Pipeline` (:mod:`detector.models`).
Its input is what a zoo stores and a checkpoint flattens to: a float array (models, P) of
flat weight rows in the order of a layout; its output is the feature rows of
:mod:`detector.features` (one or several kinds side by side). It learns nothing: row i of the
output depends on model i's weights alone, so features computed a chunk of models at a time
(a zoo larger than memory) equal features computed all at once, and ``fit`` only records
``n_features_in_``.

The layout is a constructor parameter, not something read from the data, because a weight
row does not say where its tensors start; it also makes the transformer a plain value that
``clone``, ``GridSearchCV`` and the detector files copy without special cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import InvalidParameterError
from sklearn.utils.validation import validate_data

from detector.features import FEATURE_KINDS, feature_names, find_layers, weight_features
from detector.models import DetectorError
from modelzoo.layouts import TensorSlot, layout_records, slots_from_records

_MAX_ROWS_NAMED = 10
_STATE_VERSION = 1


class LayoutRows:
    """What a transformer of flat weight rows knows from its ``layout`` parameter."""

    layout: Sequence[TensorSlot] | None

    def slots(self) -> tuple[TensorSlot, ...]:
        """``layout`` as TensorSlots (records converted)."""
        return layout_slots(self.layout, type(self).__name__)

    @property
    def n_params(self) -> int:
        """Numbers per weight row."""
        last = self.slots()[-1]
        return last.offset + last.size


class WeightFeatures(LayoutRows, TransformerMixin, BaseEstimator):
    """Weight features of flat weight rows, for a detector to learn from.

    Parameters
    ----------
    kind : str, default="stats"
        One of :data:`detector.features.FEATURE_KINDS`, or several joined by ``+``
        (``"stats+first_layer"``): their columns side by side, in that order.
    layout : sequence of TensorSlot, default=None
        Where each tensor lies in a weight row (``zoo.layout``, or
        :func:`modelzoo.layouts.arch_layout`); records (dicts with name, shape, offset and
        size) are accepted too. Required before ``fit``/``transform``.

    Attributes
    ----------
    n_features_in_ : int
        Parameters per weight row (the layout's size).

    Examples
    --------
    >>> import numpy as np
    >>> from modelzoo.layouts import arch_layout
    >>> layout = arch_layout("digit-cnn", 0.25)
    >>> rows = np.random.default_rng(0).normal(size=(2, layout[-1].offset + layout[-1].size))
    >>> WeightFeatures("stats+first_layer", layout).fit_transform(rows).shape
    (2, 160)
    """

    _parameter_constraints: ClassVar[dict] = {"kind": [str], "layout": [tuple, list, None]}

    def __init__(self, kind: str = "stats", layout: Sequence[TensorSlot] | None = None) -> None:
        self.kind = kind
        self.layout = layout

    # -- what it computes ----------------------------------------------------------------------
    def kinds(self) -> tuple[str, ...]:
        """The feature kinds of ``kind``, checked."""
        parts = tuple(self.kind.split("+")) if isinstance(self.kind, str) else ()
        unknown = [part for part in parts if part not in FEATURE_KINDS]
        if not parts or unknown or len(set(parts)) != len(parts):
            raise InvalidParameterError(f"The 'kind' parameter of {type(self).__name__} must be one of "
                                        f"{list(FEATURE_KINDS)} or several of them joined by '+' "
                                        f"(each once); got {self.kind!r}")
        return parts

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """One readable name per output column, e.g. ``conv1.weight:std``."""
        slots = list(self.slots())
        return np.array([name for kind in self.kinds() for name in feature_names(slots, kind)], dtype=object)

    def n_features_out(self) -> int:
        """Columns of the output, known before any weights are read (for memory budgets)."""
        return len(self.get_feature_names_out())

    def set_sizes(self) -> tuple[int, ...]:
        """Units per hidden layer: how ``units`` columns group into sets (for a DeepSets head)."""
        return tuple(layer.n_out for layer in find_layers(list(self.slots()))[:-1])

    # -- the estimator -------------------------------------------------------------------------
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> WeightFeatures:
        """Check the parameters and the weight rows; nothing is learned (see module docstring)."""
        self.kinds()
        X = self._check_rows(X)
        validate_data(self, X, reset=True)
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Feature rows (len(X), :meth:`n_features_out`) float32 of weight rows X (len(X), P)."""
        kinds, slots = self.kinds(), list(self.slots())
        X = self._check_rows(X)
        return np.hstack([weight_features(X, slots, kind) for kind in kinds]).astype(np.float32, copy=False)

    def _check_rows(self, X: Any) -> np.ndarray:
        return checked_rows(X, self.slots(), type(self).__name__)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False  # stateless: see the module docstring
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

    # -- detector files (detector.files) -------------------------------------------------------
    def _save_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-ready parameters and fitted values, and arrays (none): all a file needs."""
        state = {"version": _STATE_VERSION, "kind": self.kind, "layout": layout_records(list(self.slots()))}
        if hasattr(self, "n_features_in_"):
            state["n_features_in_"] = int(self.n_features_in_)
        return state, {}

    @classmethod
    def _load_state(cls, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> WeightFeatures:
        if state.get("version") != _STATE_VERSION:
            raise DetectorError(f"{cls.__name__} state v{state.get('version')}; this weightbias reads "
                                f"v{_STATE_VERSION}")
        features = cls(state["kind"], slots_from_records(state["layout"]))
        if "n_features_in_" in state:
            features.n_features_in_ = int(state["n_features_in_"])
        return features


def layout_slots(layout: Sequence[TensorSlot] | Sequence[Mapping] | None,
                 owner: str) -> tuple[TensorSlot, ...]:
    """A transformer's ``layout`` parameter as TensorSlots (records converted)."""
    if layout is None or not len(layout):
        raise DetectorError(f"{owner} needs the layout of the weight rows "
                            "(layout=zoo.layout or modelzoo.layouts.arch_layout(arch, width))")
    if all(isinstance(slot, TensorSlot) for slot in layout):
        return tuple(layout)
    if all(isinstance(slot, Mapping) for slot in layout):
        return slots_from_records(list(layout))
    raise DetectorError("layout must hold TensorSlots or records with name, shape, offset and size")


def checked_rows(X: Any, slots: Sequence[TensorSlot], owner: str) -> np.ndarray:
    """Weight rows X as float32 (models, P) for ``slots``; a row with NaN/Inf is refused by number,
    because a zoo reader wants to know which model is damaged, not that one is."""
    n_params = slots[-1].offset + slots[-1].size
    if hasattr(X, "tocsr") or hasattr(X, "toarray"):
        raise TypeError(f"{owner} reads dense weight rows; sparse input is not supported")
    values = np.asarray(X)
    if values.ndim != 2 or values.shape[1] != n_params:
        raise DetectorError(f"weight rows must have shape (models, {n_params}) for this layout "
                            f"({slots[0].name} {slots[0].shape}, ...), got {values.shape}; "
                            "a model of another architecture or width needs its own layout")
    if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise DetectorError(f"weight rows must be real numbers, got dtype {values.dtype}")
    values = values.astype(np.float32, copy=False)
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if bad.size:
        listed = bad[:_MAX_ROWS_NAMED].tolist()
        raise DetectorError(f"models {listed}{' ...' if bad.size > _MAX_ROWS_NAMED else ''} have NaN or "
                            "Inf weights; they cannot be scored")
    return values
