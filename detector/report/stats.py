"""The report's statistics: grouping models, choosing the baseline, energy distance with a
permutation test, Holm's adjustment, summaries of values, z-scores, and JSON-ready values.

Nothing here draws or writes; :func:`model_groups` is the only function that reads the zoo (through
:class:`modelzoo.zoo.Zoo`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.spatial.distance import cdist

from detector.report.options import DEFAULT_PERMUTATIONS, VANILLA, CompareError

if TYPE_CHECKING:
    from modelzoo.zoo import Zoo

_PERMUTATION_BATCH = 256


@dataclass(frozen=True)
class Group:
    """Done models sharing a regularizer and a γ (vanilla: every γ; a sampled γ: pooled)."""

    label: str
    regularizer: str
    gammas: tuple[float, ...]
    rows: np.ndarray

    @property
    def n(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class EnergyTest:
    """Energy distance between two samples and its permutation p-value."""

    statistic: float
    p_value: float
    null_q95: float
    n_x: int
    n_y: int
    n_permutations: int

    def to_dict(self) -> dict[str, float | int]:
        return {"energy_distance": self.statistic, "p_value": self.p_value, "null_q95": self.null_q95,
                "n_group": self.n_x, "n_baseline": self.n_y, "n_permutations": self.n_permutations}


# ---------------------------------------------------------------- groups and baseline


def model_groups(zoo: Zoo) -> list[Group]:
    """The zoo's done models grouped by (regularizer, γ): vanilla first, then by name and γ."""
    done = np.flatnonzero(zoo.done)
    if not done.size:
        raise CompareError(f"{zoo.path}: no done models yet; generate the zoo first "
                           "(`weightbias zoo generate SPEC --out ZOO`)")
    regularizer = zoo.column("config/regularizer")[done]
    gamma = zoo.column("config/gamma")[done].astype(np.float64)
    # A γ drawn from a continuous sampler would give one model per group: pool by regularizer.
    sampler = zoo.spec.sample.get("gamma", {})
    pooled = bool(sampler) and "choice" not in sampler
    # γ multiplies nothing without a regularizer, so every vanilla model is one group.
    keys = [(r, 0.0 if pooled or r == VANILLA else float(g)) for r, g in zip(regularizer, gamma, strict=True)]
    groups = []
    for key in sorted(set(keys), key=lambda k: (k[0] != VANILLA, k[0], k[1])):
        mask = np.array([k == key for k in keys])
        gammas = tuple(sorted({float(g) for g in gamma[mask]}))
        groups.append(Group(_label(key[0], gammas, pooled), key[0], gammas, done[mask]))
    return groups


def _label(regularizer: str, gammas: tuple[float, ...], pooled: bool) -> str:
    if regularizer == VANILLA:
        return VANILLA
    if pooled and len(gammas) > 1:
        return f"{regularizer} γ∈[{gammas[0]:.3g}, {gammas[-1]:.3g}]"
    return f"{regularizer} γ={gammas[0]:g}"


def choose_baseline(groups: list[Group], min_models: int) -> tuple[Group, str | None]:
    """The vanilla group, or else the lowest-γ group (among those with ``min_models`` models if any)
    with a note saying so: shifts and distances are then relative to weak regularization."""
    for group in groups:
        if group.regularizer == VANILLA:
            return group, None
    big = [g for g in groups if g.n >= min_models] or groups
    baseline = min(big, key=lambda g: (g.gammas[0], -g.n, g.label))
    return baseline, (f"the zoo has no vanilla (regularizer '{VANILLA}') models, so the baseline is the "
                      f"lowest-γ group '{baseline.label}' ({baseline.n} models): every shift and distance "
                      "below is relative to that weakly regularized training, not to unregularized "
                      "training")


# ---------------------------------------------------------------- energy distance


def energy_test(x: np.ndarray, y: np.ndarray, n_permutations: int = DEFAULT_PERMUTATIONS,
                seed: int = 0) -> EnergyTest:
    """Energy distance of samples ``x`` and ``y`` and the p-value of a permutation test.

    The p-value is (1 + #{permuted statistic ≥ observed}) / (1 + n_permutations): the
    permutations relabel the pooled rows at random (seeded), so it is valid at any sample
    size; with ``n_permutations = 0`` it is 1.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise CompareError(f"energy_test needs two (rows, features) arrays of one width, got shapes "
                           f"{x.shape} and {y.shape}")
    if len(x) < 1 or len(y) < 1:
        raise CompareError(f"energy_test needs at least one row per sample, got {len(x)} and {len(y)}")
    if not isinstance(n_permutations, int) or n_permutations < 0:
        raise CompareError(f"n_permutations must be a non-negative int, got {n_permutations!r}")
    pooled = np.vstack([x, y])
    distances = cdist(pooled, pooled)
    membership = np.zeros(len(pooled))
    membership[: len(x)] = 1.0
    observed = float(_energy(distances, membership[None], len(x), len(y))[0])
    rng = np.random.default_rng(seed)
    null = np.empty(n_permutations)
    for start in range(0, n_permutations, _PERMUTATION_BATCH):
        count = min(_PERMUTATION_BATCH, n_permutations - start)
        shuffled = np.stack([rng.permutation(membership) for _ in range(count)])
        null[start : start + count] = _energy(distances, shuffled, len(x), len(y))
    # A permutation that reproduces the observed split must count as "as large": allow rounding.
    tolerance = 1e-9 * max(abs(observed), float(distances.max(initial=0.0)), 1e-300)
    exceed = int((null >= observed - tolerance).sum())
    return EnergyTest(statistic=max(observed, 0.0), p_value=(1 + exceed) / (1 + n_permutations),
                      null_q95=float(np.quantile(null, 0.95)) if n_permutations else float("nan"),
                      n_x=len(x), n_y=len(y), n_permutations=n_permutations)


def _energy(distances: np.ndarray, membership: np.ndarray, n: int, m: int) -> np.ndarray:
    """Energy distance for each row of ``membership`` (1 marks the first sample)."""
    weighted = membership @ distances
    within_x = (weighted * membership).sum(axis=1)
    between = (weighted * (1.0 - membership)).sum(axis=1)
    within_y = distances.sum() - 2.0 * between - within_x
    return 2.0 * between / (n * m) - within_x / n**2 - within_y / m**2


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values (family-wise error over the groups tested)."""
    order = np.argsort(p_values)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


# ---------------------------------------------------------------- summaries


def describe(values: np.ndarray) -> dict[str, float | int | None]:
    """n, mean, std, standard error, median and range of the finite values (None if none)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return {"n": 0, "mean": None, "std": None, "se": None, "median": None, "min": None, "max": None}
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"n": int(values.size), "mean": float(values.mean()), "std": std,
            "se": std / math.sqrt(values.size), "median": float(np.median(values)),
            "min": float(values.min()), "max": float(values.max())}


def shares(values: np.ndarray, categories: list[str]) -> dict[str, float]:
    """The share of ``values`` equal to each category (0 for every category of no values)."""
    return {c: float((values == c).mean()) if len(values) else 0.0 for c in categories}


def standardise(features: np.ndarray) -> np.ndarray:
    """Z-scores over all models, constant columns dropped: every feature weighs the same in PCA
    and in the energy distance, whatever its unit."""
    features = np.asarray(features, dtype=np.float64)
    std = features.std(axis=0)
    keep = std > 1e-12 * np.maximum(np.abs(features).max(axis=0), 1e-300)
    return (features[:, keep] - features[:, keep].mean(axis=0)) / std[keep]


def jsonable(value: Any) -> Any:
    """Plain JSON types; NaN and infinities become None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
