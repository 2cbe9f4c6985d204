"""``LogisticHead``: the probe and rescaled detectors' head, a regularised linear model, ordinal for levels.

Part of the detector stage (store → **detector** → report). Bias levels (σ², ρ) are ordered:
a model at σ² 0.03 is between 0.02 and 0.05, and a head that knows it needs fewer models per
level and errs to a neighbour rather than across the scale. With numeric classes (three or
more) the head is ordinal after Frank & Hall (2001): one logistic regression per cut point
*k* for P(level > k), the class probabilities their successive differences. Other targets
(biased vs unbiased, a face group, a regularizer) get a multinomial logistic regression.

Features are standardised with the training rows' mean and spread. The regularisation ``C``
is chosen by stratified, seeded cross-validation on the training rows alone (out-of-fold log
loss over a fixed grid): nothing about the held-out models enters. The head is then a seed
ensemble: ``n_members`` fits at that ``C``, each on its own seeded, stratified draw of
``member_fraction`` of the training rows, their probabilities averaged. On the four-level zoo
that gains up to a point cross-pool; what it adds is the members' agreement on a checkpoint
(:meth:`LogisticHead.agreement`): whether its verdict rests on which training models happened
to be drawn. The fitted state is a few arrays, so detector files hold it without pickle.
``refit_cut_points`` moves it to another width (:mod:`detector.recalibrate`), and
``train_proba_`` (where the training models fall) gives percentiles for networks no
probability speaks for (:mod:`detector.networks`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from detector.models import DetectorError

_STATE_VERSION = 2  # 2: a seed ensemble (coef (members, cuts, features)); 1: one fit
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def numeric_order(classes: np.ndarray) -> np.ndarray | None:
    """Indices that sort ``classes`` by numeric value, or None when any is not a number."""
    try:
        values = np.array([float(c) for c in classes])
    except (TypeError, ValueError):
        return None
    return np.argsort(values, kind="stable")


def _logistic_fit(Z: np.ndarray, y: np.ndarray, C: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(Z, y)
    return model.coef_, model.intercept_


def choose_C(codes: np.ndarray, cv: int, seed: int,
             fold_proba: Callable[[np.ndarray, np.ndarray, float], np.ndarray | None]) -> float:
    """The value of :data:`C_GRID` with the least out-of-fold log loss over stratified, seeded
    folds of the training rows (1.0 when a class has fewer than two rows). ``fold_proba(train,
    test, C)`` fits on rows ``train`` and gives the probabilities of rows ``test`` (columns in
    code order), or None to skip a fold."""
    from sklearn.model_selection import StratifiedKFold

    folds = min(cv, int(np.bincount(codes).min()))
    if folds < 2:
        return 1.0
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(codes)), codes))
    losses = []
    for C in C_GRID:
        loss = 0.0
        for train, test in splits:
            proba = fold_proba(train, test, C)
            if proba is not None:
                loss -= np.log(np.clip(proba[np.arange(len(test)), codes[test]], 1e-12, None)).sum()
        losses.append(loss)
    return float(C_GRID[int(np.argmin(losses))])


def member_draws(codes: np.ndarray, n_members: int, fraction: float, seed: int) -> list[np.ndarray]:
    """The rows each member of a seed ensemble is fitted on: every row for one member, else per
    member a draw (seeded ``seed + member``) of ``fraction`` of each class's rows, at least two."""
    if n_members < 1 or not 0 < fraction <= 1:
        raise DetectorError(f"n_members must be >= 1 and member_fraction in (0, 1]; got {n_members}, "
                            f"{fraction}")
    if n_members == 1:
        return [np.arange(len(codes))]
    draws = []
    for member in range(n_members):
        rng = np.random.default_rng(seed + member)
        drawn = []
        for code in np.unique(codes):
            rows = np.flatnonzero(codes == code)
            drawn.append(rng.choice(rows, min(len(rows), max(2, round(fraction * len(rows)))), replace=False))
        draws.append(np.sort(np.concatenate(drawn)))
    return draws


def member_agreement(member_proba: list[np.ndarray]) -> np.ndarray:
    """Per row, the share of members whose answer (argmax) is that of their mean probability."""
    answer = np.mean(member_proba, axis=0).argmax(axis=1)
    votes = np.stack([proba.argmax(axis=1) for proba in member_proba], axis=1)
    return (votes == answer[:, None]).mean(axis=1)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class LogisticHead(ClassifierMixin, BaseEstimator):
    """Standardised logistic regression, ordinal for numeric levels (see module docstring).

    Parameters
    ----------
    C : float or "auto", default="auto"
        Inverse regularisation strength; ``"auto"`` picks one of :data:`C_GRID` by
        cross-validation on the training rows.
    ordinal : bool or "auto", default="auto"
        Ordinal cut points; ``"auto"``: when there are three or more classes, all numbers.
    cv : int, default=5
        Folds of the choice of ``C`` (fewer when a class has fewer rows).
    random_state : int, default=0
        Seeds the folds, the members' draws and the solver.
    n_members : int, default=15
        Fits in the seed ensemble (1: one fit on every training row).
    member_fraction : float, default=0.8
        The share of each class's training rows each member is fitted on.

    Attributes
    ----------
    classes_ : ndarray
        Class labels, in the column order of :meth:`predict_proba`.
    ordinal_ : bool
    C_ : float
        The regularisation used.
    coef_, intercept_ : ndarray
        Each member's directions (members, cuts or classes, features) and intercepts.
    """

    _parameter_constraints: ClassVar[dict] = {"C": [float, int, str], "ordinal": [bool, str], "cv": [int],
                                              "random_state": [int], "n_members": [int],
                                              "member_fraction": [float]}

    def __init__(self, C: float | str = "auto", ordinal: bool | str = "auto", cv: int = 5,
                 random_state: int = 0, n_members: int = 15, member_fraction: float = 0.8) -> None:
        self.C = C
        self.ordinal = ordinal
        self.cv = cv
        self.random_state = random_state
        self.n_members = n_members
        self.member_fraction = member_fraction

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> LogisticHead:
        X, y = validate_data(self, X, y, reset=True, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DetectorError(f"a detector needs two classes; got one class {self.classes_.tolist()}")
        order = numeric_order(self.classes_)
        self.ordinal_ = bool(order is not None and len(self.classes_) >= 3) if self.ordinal == "auto" \
            else bool(self.ordinal)
        if self.ordinal_ and order is None:
            raise DetectorError(f"an ordinal head needs numeric classes, got {self.classes_.tolist()}")
        self.rank_ = np.argsort(order) if self.ordinal_ else np.arange(len(self.classes_))
        self.mean_ = X.mean(axis=0)
        spread = X.std(axis=0)
        self.scale_ = np.where(spread > 1e-12, spread, 1.0)
        Z = (X - self.mean_) / self.scale_
        ranks = self.rank_[codes]
        self.C_ = self._choose_C(Z, ranks) if self.C == "auto" else float(self.C)
        draws = member_draws(ranks, self.n_members, self.member_fraction, self.random_state)
        fits = [self._fit_linear(Z[rows], ranks[rows], self.C_) for rows in draws]
        self.coef_ = np.stack([coef for coef, _ in fits])
        self.intercept_ = np.stack([intercept for _, intercept in fits])
        # Where the training models fall: percentiles for networks no probability speaks for.
        self.train_proba_ = self._rank_proba(Z, self.coef_, self.intercept_)[:, self.rank_]
        return self

    def _fit_linear(self, Z: np.ndarray, ranks: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
        if not self.ordinal_:
            return _logistic_fit(Z, ranks, C, self.random_state)
        cuts = [_logistic_fit(Z, (ranks > k).astype(int), C, self.random_state)
                for k in range(len(self.classes_) - 1)]
        return np.vstack([coef for coef, _ in cuts]), np.concatenate([b for _, b in cuts])

    def _choose_C(self, Z: np.ndarray, ranks: np.ndarray) -> float:
        def fold_proba(train: np.ndarray, test: np.ndarray, C: float) -> np.ndarray | None:
            if len(np.unique(ranks[train])) < len(self.classes_):
                return None
            return self._rank_proba(Z[test], *self._fit_linear(Z[train], ranks[train], C))

        return choose_C(ranks, self.cv, self.random_state, fold_proba)

    def _rank_proba(self, Z: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
        """Probabilities over classes in rank order (numeric order when ordinal); an ensemble's
        (coef with a leading member axis) are its members' averaged."""
        if coef.ndim == 3:
            return np.mean([self._rank_proba(Z, c, b) for c, b in zip(coef, intercept, strict=True)], axis=0)
        scores = Z @ coef.T + intercept
        if not self.ordinal_:
            if scores.shape[1] == 1:  # scikit-learn's binary form: one score for the second class
                scores = np.hstack([np.zeros_like(scores), scores])
            return _softmax(scores)
        above = 1.0 / (1.0 + np.exp(-np.clip(scores, -50, 50)))  # P(rank > k), k = 0..K-2
        above = np.minimum.accumulate(above, axis=1)  # cut points may cross; keep them ordered
        cumulative = np.hstack([np.ones((len(Z), 1)), above, np.zeros((len(Z), 1))])
        proba = np.clip(cumulative[:, :-1] - cumulative[:, 1:], 1e-9, None)
        return proba / proba.sum(axis=1, keepdims=True)

    def refit_cut_points(self, X: Any, y: Any) -> LogisticHead:
        """A copy whose intercepts (the cut points) are refitted on labelled models ``X``, ``y``
        while the directions (``coef_``) and the standardisation stay: how a detector is moved
        to another width or architecture from a few reference models, where the ranking
        carries over but the thresholds do not."""
        from scipy.optimize import minimize
        from sklearn.base import clone

        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        y = np.asarray(y)
        unknown = sorted(set(y.tolist()) - set(self.classes_.tolist()))
        if unknown:
            raise DetectorError(f"reference labels {unknown} are not among the detector's classes "
                                f"{self.classes_.tolist()}")
        ranks, Z = self.rank_[np.searchsorted(self.classes_, y)], (X - self.mean_) / self.scale_

        def loss(intercept: np.ndarray) -> float:
            proba = self._rank_proba(Z, self.coef_, intercept.reshape(self.intercept_.shape))
            return -float(np.log(proba[np.arange(len(ranks)), ranks]).sum())

        moved = clone(self)
        for name in ("classes_", "ordinal_", "C_", "n_features_in_", "mean_", "scale_", "coef_", "rank_",
                     "train_proba_"):
            setattr(moved, name, getattr(self, name))
        fitted = minimize(loss, self.intercept_.astype(np.float64).ravel(), method="L-BFGS-B").x
        moved.intercept_ = fitted.reshape(self.intercept_.shape)
        return moved

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, len(classes_)), columns in ``classes_`` order."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self._rank_proba((X - self.mean_) / self.scale_, self.coef_, self.intercept_)[:, self.rank_]

    def predict(self, X: Any) -> np.ndarray:
        best = self.predict_proba(X).argmax(axis=1)
        return self.classes_[best]

    def agreement(self, X: Any) -> np.ndarray:
        """Per row, the share of the ensemble's members whose own answer is the ensemble's."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        Z = (X - self.mean_) / self.scale_
        members = zip(self.coef_, self.intercept_, strict=True)
        return member_agreement([self._rank_proba(Z, coef, intercept) for coef, intercept in members])

    # -- detector files (detector.files) -------------------------------------------------------
    def _save_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        check_is_fitted(self)
        state = {"version": _STATE_VERSION, "params": self.get_params(), "classes": self.classes_.tolist(),
                 "ordinal": self.ordinal_, "C": self.C_, "n_features_in_": int(self.n_features_in_)}
        arrays = {"mean": self.mean_, "scale": self.scale_, "coef": self.coef_, "intercept": self.intercept_,
                  "rank": self.rank_, "train_proba": self.train_proba_}
        return state, arrays

    @classmethod
    def _load_state(cls, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> LogisticHead:
        version = state.get("version")
        if version not in (1, _STATE_VERSION):
            raise DetectorError(f"{cls.__name__} state v{version}; this weightbias reads v1 and "
                                f"v{_STATE_VERSION}")
        head = cls(**{"n_members": 1, **state["params"]})
        head.classes_ = np.asarray(state["classes"])
        head.ordinal_, head.C_ = bool(state["ordinal"]), float(state["C"])
        head.n_features_in_ = int(state["n_features_in_"])
        head.mean_, head.scale_ = np.asarray(arrays["mean"]), np.asarray(arrays["scale"])
        head.coef_, head.intercept_ = np.asarray(arrays["coef"]), np.asarray(arrays["intercept"])
        if version == 1:  # one fit: a one-member ensemble
            head.coef_, head.intercept_ = head.coef_[None], head.intercept_[None]
        head.rank_ = np.asarray(arrays["rank"]).astype(np.int64)
        head.train_proba_ = np.asarray(arrays["train_proba"])
        return head

