"""``GroupScorer``: the face probe detector's head, one scoring function shared by every group.

Part of the detector stage (store → **detector** → report). Which group a face model favours
is a question asked the same way of each group: is the network better, surer, more strongly
driven on *this* group than on the others? So the head scores group *g* from its own block of
features (:class:`~detector.facebattery.FaceBattery` lays them out one block per group) with
weights shared across groups, a conditional logit::

    score_g = w · z_g + a_g,    z_g = (block_g − mean over groups of block_h) / spread

and a label that is not a group (``balanced``, or ``biased``/``unbiased``) is scored from the
shared columns and group-symmetric summaries of the blocks (per feature, the largest and the
smallest centred value)::

    score_c = v_c · s + a_c

The probabilities are the softmax over the classes. One weight vector for all groups means a
third of the parameters of a multinomial head and twice the evidence per weight; a group
never favoured in the training zoo is still scored by what favouring looks like in the
others. The regularisation ``C`` is chosen by stratified cross-validation on the training rows
alone, and the head is a seed ensemble of ``n_members`` fits on seeded draws of the training
rows, as :class:`~detector.ordinal.LogisticHead` is. The fitted state is arrays only.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from detector.models import DetectorError
from detector.ordinal import choose_C, member_agreement, member_draws

_STATE_VERSION = 2  # 2: a seed ensemble (theta (members, parameters)); 1: one fit


class GroupScorer(ClassifierMixin, BaseEstimator):
    """Conditional-logit head over per-group feature blocks (see the module docstring).

    Parameters
    ----------
    groups : tuple of str
        The group names, in the order of the feature blocks; classes with these names are
        scored from their block.
    block : int
        Columns per group block; the first ``len(groups) * block`` columns are the blocks,
        the rest are shared.
    C : float or "auto", default="auto"
        Inverse L2 strength; ``"auto"`` picks one by cross-validation on the training rows
        (:func:`detector.ordinal.choose_C`).
    cv : int, default=5
    random_state : int, default=0
    n_members : int, default=15
        Fits in the seed ensemble (1: one fit on every training row).
    member_fraction : float, default=0.8
        The share of each class's training rows each member is fitted on.
    """

    _parameter_constraints: ClassVar[dict] = {"groups": [tuple, list], "block": [int], "C": [float, int, str],
                                              "cv": [int], "random_state": [int], "n_members": [int],
                                              "member_fraction": [float]}

    def __init__(self, groups: tuple[str, ...] = (), block: int = 1, C: float | str = "auto", cv: int = 5,
                 random_state: int = 0, n_members: int = 15, member_fraction: float = 0.8) -> None:
        self.groups = groups
        self.block = block
        self.C = C
        self.cv = cv
        self.random_state = random_state
        self.n_members = n_members
        self.member_fraction = member_fraction

    # -- inputs -----------------------------------------------------------------------------
    def _split(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(centred blocks (n, G, B), free-class inputs (n, S + 2B)) of raw rows X."""
        n_groups, block = len(self.groups), self.block
        blocks = X[:, : n_groups * block].reshape(len(X), n_groups, block)
        centred = blocks - blocks.mean(axis=1, keepdims=True)
        free = np.hstack([X[:, n_groups * block:], centred.max(axis=1), centred.min(axis=1)])
        return centred, free

    def _standardised(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        centred, free = self._split(X)
        return centred / self.block_scale_, (free - self.free_mean_) / self.free_scale_

    # -- the model ----------------------------------------------------------------------------
    def _unpack(self, theta: np.ndarray, n_free: int,
                width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = theta[: self.block]
        v = theta[self.block: self.block + n_free * width].reshape(n_free, width)
        return w, v, theta[self.block + n_free * width:]

    def _scores(self, Z: np.ndarray, F: np.ndarray, theta: np.ndarray) -> np.ndarray:
        w, v, a = self._unpack(theta, len(self.free_), F.shape[1])
        scores = np.tile(a, (len(Z), 1))
        for k, g in enumerate(self.group_of_):
            scores[:, k] += Z[:, g] @ w if g >= 0 else F @ v[self.free_.index(k)]
        return scores

    def _fit_theta(self, Z: np.ndarray, F: np.ndarray, codes: np.ndarray, C: float) -> np.ndarray:
        from scipy.optimize import minimize

        n_classes, n_free, width = len(self.classes_), len(self.free_), F.shape[1]
        onehot = np.eye(n_classes)[codes]

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            scores = self._scores(Z, F, theta)
            shifted = scores - scores.max(axis=1, keepdims=True)
            log_proba = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            residual = np.exp(log_proba) - onehot
            w, v, _ = self._unpack(theta, n_free, width)
            grad_w, grad_v = np.zeros_like(w), np.zeros_like(v)
            for k, g in enumerate(self.group_of_):
                if g >= 0:
                    grad_w += Z[:, g].T @ residual[:, k]
                else:
                    grad_v[self.free_.index(k)] = F.T @ residual[:, k]
            loss = -C * float((log_proba * onehot).sum()) + 0.5 * float(w @ w + (v * v).sum())
            grad = np.concatenate([C * grad_w + w, (C * grad_v + v).ravel(), C * residual.sum(axis=0)])
            return loss, grad

        start = np.zeros(self.block + n_free * width + n_classes)
        return minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": 2000}).x

    def _choose_C(self, Z: np.ndarray, F: np.ndarray, codes: np.ndarray) -> float:
        def fold_proba(train: np.ndarray, test: np.ndarray, C: float) -> np.ndarray:
            return self._proba(Z[test], F[test], self._fit_theta(Z[train], F[train], codes[train], C))

        return choose_C(codes, self.cv, self.random_state, fold_proba)

    def _proba(self, Z: np.ndarray, F: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """Class probabilities; an ensemble's (theta with a leading member axis) averaged."""
        if theta.ndim == 2:
            return np.mean([self._proba(Z, F, member) for member in theta], axis=0)
        scores = self._scores(Z, F, theta)
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    # -- scikit-learn ---------------------------------------------------------------------------
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> GroupScorer:
        X, y = validate_data(self, X, y, reset=True, dtype=np.float64)
        check_classification_targets(y)
        n_blocks = len(self.groups) * self.block
        if self.block < 1 or not self.groups or X.shape[1] < n_blocks:
            raise DetectorError(f"GroupScorer needs {len(self.groups)} blocks of {self.block} columns; "
                                f"got {X.shape[1]} columns")
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DetectorError(f"a detector needs two classes; got one class {self.classes_.tolist()}")
        groups = list(self.groups)
        self.group_of_ = np.array([groups.index(c) if c in groups else -1 for c in self.classes_.tolist()])
        self.free_ = [k for k, g in enumerate(self.group_of_) if g < 0]
        self.mean_ = X.mean(axis=0)  # fills a row's unknown columns (networks.network_row)
        centred, free = self._split(X)
        spread = centred.reshape(-1, self.block).std(axis=0) * np.sqrt(len(groups) / max(len(groups) - 1, 1))
        self.block_scale_ = np.where(spread > 1e-12, spread, 1.0)
        self.free_mean_ = free.mean(axis=0)
        free_spread = free.std(axis=0)
        self.free_scale_ = np.where(free_spread > 1e-12, free_spread, 1.0)
        Z, F = self._standardised(X)
        self.C_ = self._choose_C(Z, F, codes) if self.C == "auto" else float(self.C)
        draws = member_draws(codes, self.n_members, self.member_fraction, self.random_state)
        self.theta_ = np.stack([self._fit_theta(Z[rows], F[rows], codes[rows], self.C_) for rows in draws])
        self.train_proba_ = self._proba(Z, F, self.theta_)  # percentiles for foreign networks
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, len(classes_)), columns in ``classes_`` order."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self._proba(*self._standardised(X), self.theta_)

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def agreement(self, X: Any) -> np.ndarray:
        """Per row, the share of the ensemble's members whose own answer is the ensemble's."""
        check_is_fitted(self)
        Z, F = self._standardised(validate_data(self, X, reset=False, dtype=np.float64))
        return member_agreement([self._proba(Z, F, member) for member in self.theta_])

    @property
    def coef_(self) -> np.ndarray:
        """The shared weights over a group's standardised block (block,), the members' mean."""
        check_is_fitted(self)
        return self.theta_[:, : self.block].mean(axis=0)

    # -- detector files (detector.files) -------------------------------------------------------
    _ARRAYS = ("mean_", "block_scale_", "free_mean_", "free_scale_", "theta_", "train_proba_", "group_of_")

    def _save_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        check_is_fitted(self)
        params = {**self.get_params(), "groups": list(self.groups)}
        state = {"version": _STATE_VERSION, "params": params, "classes": self.classes_.tolist(), "C": self.C_,
                 "n_features_in_": int(self.n_features_in_)}
        return state, {name.rstrip("_"): np.asarray(getattr(self, name)) for name in self._ARRAYS}

    @classmethod
    def _load_state(cls, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> GroupScorer:
        version = state.get("version")
        if version not in (1, _STATE_VERSION):
            raise DetectorError(f"{cls.__name__} state v{version}; this weightbias reads v1 and "
                                f"v{_STATE_VERSION}")
        params = {"n_members": 1, **state["params"]}
        head = cls(**{**params, "groups": tuple(params["groups"])})
        head.classes_ = np.asarray(state["classes"])
        head.C_, head.n_features_in_ = float(state["C"]), int(state["n_features_in_"])
        for name in cls._ARRAYS:
            setattr(head, name, np.asarray(arrays[name.rstrip("_")]))
        head.group_of_ = head.group_of_.astype(np.int64)
        if version == 1:  # one fit: a one-member ensemble
            head.theta_ = head.theta_[None]
        head.free_ = [k for k, g in enumerate(head.group_of_) if g < 0]
        return head
