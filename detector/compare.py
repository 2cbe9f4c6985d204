"""Regularizer comparison report: what each fairness regularizer changes in a zoo's models.

Report stage of the flow (source → dataset → trainer → store → detector → **report**).
``weightbias compare ZOO.zarr --out report/`` groups a zoo's done models by (regularizer, γ)
and writes, for people, ``index.html`` and ``index.md`` with PNG plots (matplotlib, Agg), and,
for programs, ``summary.json`` holding every number plotted. Sections:

* **groups** — models per group and bias level; vanilla is the baseline every group is
  compared with.
* **detector scores** (with ``--detector DET``) — per group, the distribution of the saved
  detector's P(biased) (or, for a detector without an "unbiased" class, its probability of each
  model's true class) and the share of each predicted class: does a regularizer hide bias from
  the detector? When DET was trained on this very zoo, only its held-out models are scored.
* **weight-feature projection** — PCA of standardised weight features
  (:mod:`detector.features`, ``invariant`` by default), coloured by group and by bias level.
* **per-layer shifts vs the baseline** — per tensor, the group's mean weight minus the
  baseline's in units of the baseline's weight std, and the relative change (%) of the weights'
  std and L2 norm.
* **first-layer colour sensitivity** (MNIST tasks) — the *chromatic energy fraction* of the
  first convolution: write each filter's kernel ``w[c]`` (channel c = R, G, B) as its
  channel mean ``w̄`` (what it sees of brightness) plus the rest (what it sees of colour);
  the measure is Σ‖w − w̄‖² / Σ‖w‖² over all filters. 0 is a colour-blind first layer, about
  2/3 is an untrained one (channels independent; measured on fresh models and shown), 1 is
  pure colour opponency. Beside it, the flat-colour contrast of :mod:`detector.features`
  (``first_layer``): the mean |difference| of a filter's response to flat patches of two
  primaries, in weight units.
* **InsideBias** (face zoos) — min Λ of every model on a few probe images per group
  (:mod:`detector.insidebias`); skipped, with the reason, when the zoo is not a face zoo or its
  face data cannot be found.
* **accuracy / fairness trade-off** — unbiased accuracy against the group-accuracy gap
  (max − min of ``metrics/per_group_acc``) and against representation leakage
  (``metrics/leakage``), one point per model, group means with standard errors.
* **distance to the baseline** — energy distance between a group's standardised weight
  features and the baseline's, with a seeded permutation test (p-value, and Holm-adjusted
  over the groups tested); the baseline split in two random halves is tested the same way, a
  check that the test does not see differences where there are none.

Decisions, stated where a reader needs them:

* Vanilla is every model with regularizer ``none``, whatever its γ (γ multiplies nothing
  there). A zoo without vanilla models falls back to the lowest-γ group (among groups with at
  least ``min_models`` models if any) and the report says so on top: shifts and distances are
  then relative to weakly regularized training, not to none.
* A group with fewer than ``min_models`` models is listed and plotted but gets no distance
  test (its row says why); nothing crashes on it.
* A γ drawn from a continuous sampler would give one model per group, so such zoos are
  grouped by regularizer alone and the γ range is shown.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from scipy.spatial.distance import cdist
from sklearn.decomposition import PCA
from tqdm.auto import tqdm

from detector.evaluate import labels, split_rows, weight_chunks
from detector.features import feature_names, find_layers, weight_features
from detector.files import load_detector
from detector.insidebias import InsideBiasError, insidebias, probe_images
from detector.models import DetectorError, WeightDetector
from detector.scoring import UNBIASED_CLASSES
from fairtrain.regularizers import regularizer_options
from modelzoo.architectures import TensorSlot, build_model, flatten, layout, unflatten
from modelzoo.faces import GROUPS, FaceDataError, find_face_folder, load_face_data
from modelzoo.store import ZooStore

VANILLA = "none"
PROJECTION_KINDS = ("stats", "invariant", "first_layer")
DEFAULT_PERMUTATIONS = 999
MNIST_TASKS = ("colored_mnist", "biased_mnist")
SHIFT_MEASURES = ("mean_shift_in_std", "std_change_pct", "l2_change_pct")
SHIFT_TITLES = {"mean_shift_in_std": "mean weight − baseline's, in baseline weight-std units",
                "std_change_pct": "weight std, % change vs baseline",
                "l2_change_pct": "L2 norm, % change vs baseline"}
SHIFT_UNITS = {"mean_shift_in_std": "baseline std units", "std_change_pct": "%", "l2_change_pct": "%"}
INIT_REFERENCE_MODELS = 8
_CHUNK_MODELS = 256
_PERMUTATION_BATCH = 256
_PALETTE = [f"C{i}" for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]  # tab10 without its grey: grey is the baseline's
_BASELINE_COLOUR = "#222222"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")


class CompareError(DetectorError):
    """A zoo or option the comparison report cannot work with (no done models, a bad option,
    an output path that is not a folder)."""


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


def model_groups(store: ZooStore) -> list[Group]:
    """The zoo's done models grouped by (regularizer, γ): vanilla first, then by name and γ."""
    done = np.flatnonzero(store.done)
    if not done.size:
        raise CompareError(f"{store.path}: no done models yet; generate the zoo first "
                           "(`weightbias zoo generate SPEC --out ZOO`)")
    regularizer = store.field("config/regularizer")[done]
    gamma = store.field("config/gamma")[done].astype(np.float64)
    sampler = store.spec.sample.get("gamma", {})
    pooled = bool(sampler) and "choice" not in sampler
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
    """The vanilla group, or the lowest-γ group with a note saying so (module docstring)."""
    for group in groups:
        if group.regularizer == VANILLA:
            return group, None
    big = [g for g in groups if g.n >= min_models] or groups
    baseline = min(big, key=lambda g: (g.gammas[0], -g.n, g.label))
    return baseline, (f"the zoo has no vanilla (regularizer '{VANILLA}') models, so the baseline is the "
                      f"lowest-γ group '{baseline.label}' ({baseline.n} models): every shift and distance "
                      "below is relative to that weakly regularized training, not to unregularized "
                      "training")


# ---------------------------------------------------------------- statistics


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance 2·E‖X−Y‖ − E‖X−X′‖ − E‖Y−Y′‖ (V-statistic, so never negative) of two
    samples given as rows of the same width."""
    return energy_test(x, y, n_permutations=0).statistic


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


def chromatic_fraction(weights: np.ndarray, slots: list[TensorSlot]) -> np.ndarray:
    """Per model, the share of first-convolution weight energy that tells colours apart.

    Each filter's kernel on channel c is split into the mean over channels (what it sees of
    brightness) and the rest (colour): Σ‖w − w̄‖² / Σ‖w‖² over all filters. NaN for an
    all-zero first layer.
    """
    first = find_layers(list(slots))[0]
    if not first.is_conv or first.n_in < 2:
        raise CompareError(f"colour sensitivity needs a first convolution over 2+ input channels; "
                           f"{first.name!r} has weight shape {first.weight.shape}")
    start, stop = first.weight.offset, first.weight.offset + first.weight.size
    w = np.asarray(weights, dtype=np.float64)[:, start:stop]
    w = w.reshape(len(w), first.n_out, first.n_in, -1)
    chroma = ((w - w.mean(axis=2, keepdims=True)) ** 2).sum(axis=(1, 2, 3))
    total = (w * w).sum(axis=(1, 2, 3))
    return np.divide(chroma, total, out=np.full(len(w), np.nan), where=total > 0)


def init_chromatic_fraction(arch: str, width: float, n_models: int = INIT_REFERENCE_MODELS) -> float:
    """Mean chromatic fraction of freshly initialised models: where training starts from."""
    with torch.random.fork_rng():
        rows = []
        for seed in range(n_models):
            torch.manual_seed(seed)
            model = build_model(arch, width)
            rows.append(flatten(model))
    return float(chromatic_fraction(np.stack(rows), layout(model)).mean())


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


def _shares(values: np.ndarray, categories: list[str]) -> dict[str, float]:
    return {c: float((values == c).mean()) if len(values) else 0.0 for c in categories}


# ---------------------------------------------------------------- features


def read_features(store: ZooStore, rows: np.ndarray, kind: str, colour: bool, progress: bool = True,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One chunked pass over the weights of ``rows``: (projection features of ``kind``, per-tensor
    ``stats``, ``first_layer`` features or None, chromatic fraction or None)."""
    if kind not in PROJECTION_KINDS:
        raise CompareError(f"unknown feature kind {kind!r} for the projection; use one of "
                           f"{list(PROJECTION_KINDS)}")
    slots = store.layout
    try:
        n_stats = len(feature_names(slots, "stats"))
        kinds = {kind, "stats"} if kind != "invariant" else {"invariant"}  # invariant starts with stats
        if colour:
            kinds.add("first_layer")
        widths = {k: len(feature_names(slots, k)) for k in kinds}
    except ValueError as err:
        raise CompareError(f"{store.path}: the {store.spec.arch} layout has no layer-wise features "
                           f"({err})") from err
    out = {k: np.empty((len(rows), width), dtype=np.float32) for k, width in widths.items()}
    chroma = np.empty(len(rows)) if colour else None
    n_chunks = -(-len(rows) // _CHUNK_MODELS)
    for start, block in tqdm(_weight_blocks(store, rows), total=n_chunks, desc="weight features",
                             unit="chunk", disable=not progress):
        stop = start + len(block)
        for k in kinds:
            out[k][start:stop] = weight_features(block, slots, k)
        if chroma is not None:
            chroma[start:stop] = chromatic_fraction(block, slots)
    stats = out["stats"] if "stats" in out else out["invariant"][:, :n_stats]
    return out[kind], stats, out.get("first_layer"), chroma


def standardise(features: np.ndarray) -> np.ndarray:
    """Z-scores over all models, constant columns dropped: every feature weighs the same in PCA
    and in the energy distance, whatever its unit."""
    features = np.asarray(features, dtype=np.float64)
    std = features.std(axis=0)
    keep = std > 1e-12 * np.maximum(np.abs(features).max(axis=0), 1e-300)
    return (features[:, keep] - features[:, keep].mean(axis=0)) / std[keep]


# ---------------------------------------------------------------- the report


@dataclass
class _Context:
    store: ZooStore
    groups: list[Group]
    baseline: Group
    rows: np.ndarray  # every done model, ascending
    group_of: np.ndarray  # group label per row
    level: np.ndarray  # bias level per row, as strings
    level_values: np.ndarray  # bias level per row as stored (float or str)
    styles: dict[str, tuple[tuple[float, float, float], str]]
    out: Path
    min_models: int
    progress: bool

    def position(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.rows, rows)


@dataclass
class _Section:
    title: str
    text: list[str]
    table: tuple[list[str], list[list[str]]] | None = None
    figure: str | None = None


def compare_zoo(store_path: str | Path, out: str | Path, detector: str | Path | None = None, *,
                feature_kind: str = "invariant", n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0,
                min_models: int = 3, data_dir: str | Path | None = None, probes_per_group: int = 5,
                progress: bool = True) -> dict[str, Any]:
    """Write the comparison report of the zoo at ``store_path`` into folder ``out``.

    Returns the summary also written to ``out/summary.json``. ``detector`` is a folder saved by
    ``weightbias detector train``; ``data_dir`` is the data root for face probes (InsideBias).
    """
    _check_options(feature_kind, n_permutations, min_models, probes_per_group)
    loaded = load_detector(detector) if detector is not None else None
    store = ZooStore.open(store_path)
    groups = model_groups(store)
    out = _output_folder(out)  # only once the zoo is known good: bad input leaves nothing behind
    baseline, fallback_note = choose_baseline(groups, min_models)
    ctx = _context(store, groups, baseline, out, min_models, progress)
    notes = [fallback_note] if fallback_note else []
    notes += _group_notes(ctx)
    rows = ctx.rows
    colour = store.spec.task in MNIST_TASKS
    projected, stats, first_layer, chroma = read_features(store, rows, feature_kind, colour, progress)
    z = standardise(projected)
    summary: dict[str, Any] = {
        "report": "weightbias compare", "store": str(store.path), "task": store.spec.task,
        "arch": store.spec.arch, "width": store.spec.width, "spec_digest": store.group.attrs["spec_digest"],
        "n_models": store.n_models, "n_done": len(rows), "bias_level": store.spec.bias_level,
        "bias_levels": sorted(set(ctx.level.tolist())), "feature_kind": feature_kind,
        "n_features": int(projected.shape[1]), "n_features_used": int(z.shape[1]),
        "n_permutations": n_permutations, "seed": seed, "min_models": min_models,
        "baseline": {"label": baseline.label, "is_vanilla": baseline.regularizer == VANILLA,
                     "note": fallback_note},
        "groups": _groups_summary(ctx),
    }
    sections = [_groups_section(ctx, summary["groups"])]
    parts = [
        ("detector", lambda: _detector_part(ctx, detector, loaded)),
        ("projection", lambda: _projection_part(ctx, z, feature_kind)),
        ("layer_shifts", lambda: _shift_part(ctx, stats)),
        ("colour_sensitivity", lambda: _colour_part(ctx, first_layer, chroma)),
        ("insidebias", lambda: _insidebias_part(ctx, data_dir, probes_per_group, seed)),
        ("tradeoff", lambda: _tradeoff_part(ctx)),
        ("distances", lambda: _distance_part(ctx, z, n_permutations, seed)),
    ]
    figures = {}
    for name, build in parts:
        part, section = build()
        summary[name] = part
        sections.append(section)
        if section.figure:
            figures[name] = section.figure
        notes += part.get("notes", [])
    summary["figures"] = figures
    summary["notes"] = notes
    _write(out, summary, sections)
    return _jsonable(summary)


def _check_options(feature_kind: str, n_permutations: int, min_models: int, probes_per_group: int) -> None:
    if feature_kind not in PROJECTION_KINDS:
        raise CompareError(f"--features {feature_kind!r}: use one of {list(PROJECTION_KINDS)}")
    for name, value, low in (("--permutations", n_permutations, 0), ("--min-models", min_models, 2),
                             ("--per-group", probes_per_group, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise CompareError(f"{name} must be an integer of at least {low}, got {value!r}")


def _output_folder(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CompareError(f"--out {out}: cannot create the report folder ({err})") from err
    return out


def _context(store: ZooStore, groups: list[Group], baseline: Group, out: Path, min_models: int,
             progress: bool) -> _Context:
    groups = [baseline, *(g for g in groups if g is not baseline)]  # the baseline leads every plot
    rows = np.sort(np.concatenate([g.rows for g in groups]))
    group_of = np.empty(len(rows), dtype=object)
    for group in groups:
        group_of[np.searchsorted(rows, group.rows)] = group.label
    level_values = store.field(f"config/{store.spec.bias_level}")[rows]
    return _Context(store, groups, baseline, rows, group_of.astype(str), labels(store, "bias_level")[rows],
                    level_values, _styles(groups, baseline), out, min_models, progress)


def _group_notes(ctx: _Context) -> list[str]:
    """Small groups, single-group zoos, and reg.* options a group's regularizer takes but its models
    do not share (groups are (regularizer, γ) only, so such models are pooled)."""
    notes = [f"group '{g.label}' has {g.n} model(s), fewer than --min-models {ctx.min_models}: it is shown "
             "but not tested for a distance" for g in ctx.groups if g.n < ctx.min_models]
    if len(ctx.groups) == 1:
        notes.append(f"the zoo has one group only ('{ctx.groups[0].label}'): there is nothing to compare it "
                     "with, so shifts and distances are left out")
    for axis in (a for a in ctx.store.config_fields() if a.startswith("reg.")):
        values = ctx.store.field(f"config/{axis}")
        for group in ctx.groups:
            takes = axis.removeprefix("reg.") in regularizer_options(group.regularizer)
            if takes and len(np.unique(values[group.rows])) > 1:
                notes.append(f"group '{group.label}' pools models with different {axis} values "
                             f"({', '.join(map(str, np.unique(values[group.rows])))})")
    return notes


def _styles(groups: list[Group], baseline: Group) -> dict[str, tuple[tuple[float, float, float], str]]:
    """Colour per regularizer (lighter for smaller γ), marker per γ rank; the baseline in black."""
    regularizers = sorted({g.regularizer for g in groups if g is not baseline})
    styles = {baseline.label: (to_rgb(_BASELINE_COLOUR), "o")}
    for i, name in enumerate(regularizers):
        members = [g for g in groups if g.regularizer == name and g is not baseline]
        base = np.array(to_rgb(_PALETTE[i % len(_PALETTE)]))
        for rank, group in enumerate(members):
            light = 0.55 * (len(members) - 1 - rank) / max(len(members) - 1, 1)
            styles[group.label] = (tuple(base * (1 - light) + light), _MARKERS[rank % len(_MARKERS)])
    return styles


def _metrics(ctx: _Context) -> dict[str, np.ndarray]:
    store, rows = ctx.store, ctx.rows
    per_group = store.field("metrics/per_group_acc")[rows].astype(np.float64)
    with np.errstate(all="ignore"):
        finite = np.isfinite(per_group).sum(axis=1) >= 2
        gap = np.full(len(rows), np.nan)
        gap[finite] = np.nanmax(per_group[finite], axis=1) - np.nanmin(per_group[finite], axis=1)
    return {"unbiased_acc": store.field("metrics/unbiased_acc")[rows].astype(np.float64),
            "biased_acc": store.field("metrics/biased_acc")[rows].astype(np.float64),
            "group_acc_gap": gap, "leakage": store.field("metrics/leakage")[rows].astype(np.float64)}


def _groups_summary(ctx: _Context) -> list[dict[str, Any]]:
    metrics = _metrics(ctx)
    result = []
    for group in ctx.groups:
        mask = ctx.group_of == group.label
        levels, counts = np.unique(ctx.level[mask], return_counts=True)
        result.append({
            "label": group.label, "regularizer": group.regularizer, "gammas": list(group.gammas),
            "n_models": group.n, "is_baseline": group is ctx.baseline, "too_few": group.n < ctx.min_models,
            "bias_level_counts": {str(k): int(v) for k, v in zip(levels, counts, strict=True)},
            "rows": group.rows.tolist(),
            **{name: describe(values[mask]) for name, values in metrics.items()},
        })
    return result


# ---------------------------------------------------------------- sections


def _groups_section(ctx: _Context, groups: list[dict[str, Any]]) -> _Section:
    header = ["group", "regularizer", "γ", "models", f"per {ctx.store.spec.bias_level}",
              "unbiased acc", "group-acc gap", "leakage"]
    rows = [[g["label"] + (" (baseline)" if g["is_baseline"] else ""), g["regularizer"],
             "–" if g["regularizer"] == VANILLA else ", ".join(f"{v:g}" for v in g["gammas"]),
             str(g["n_models"]), _level_counts(g["bias_level_counts"]),
             _mean_se(g["unbiased_acc"]), _mean_se(g["group_acc_gap"]), _mean_se(g["leakage"])]
            for g in groups]
    text = [f"{len(ctx.rows)} done models of {ctx.store.n_models} in {len(ctx.groups)} groups "
            f"(regularizer, γ). Baseline: **{ctx.baseline.label}**. Accuracy, gap and leakage are means ± "
            "standard error over the group's models; the gap is max − min of the per-group accuracy on the "
            "unbiased test set, leakage the accuracy of a fresh probe predicting the sensitive group from "
            "the bottleneck."]
    return _Section("Groups", text, (header, rows))


def _level_counts(counts: dict[str, int]) -> str:
    """Models per bias level, or only how many levels when they were sampled (too many to list)."""
    if len(counts) > 6:
        return f"{len(counts)} levels"
    return ", ".join(f"{level}: {n}" for level, n in counts.items())


def _detector_part(ctx: _Context, path: str | Path | None,
                   loaded: tuple[WeightDetector, dict[str, Any]] | None) -> tuple[dict[str, Any], _Section]:
    title = "Detector scores"
    if path is None or loaded is None:
        reason = "no --detector given"
        return {"skipped": reason}, _Section(title, [f"Skipped: {reason}."])
    detector, meta = loaded
    notes, rows = [], ctx.rows
    if meta.get("levels") and not np.isin(ctx.level, meta["levels"]).all():
        keep = np.isin(ctx.level, meta["levels"])
        rows = rows[keep]
        notes.append(f"the detector was trained on {ctx.store.spec.bias_level} levels {meta['levels']} only; "
                     f"models at other levels ({int((~keep).sum())}) are not scored")
    zoo = meta.get("zoo") or {}
    if zoo.get("spec_digest") == ctx.store.group.attrs["spec_digest"]:
        try:
            _, held_out = split_rows(ctx.store, meta.get("split", "pool"), meta.get("train_pool", "A"))
        except DetectorError as err:
            raise CompareError(f"the detector was trained on this zoo but its split cannot be rebuilt "
                               f"({err})") from err
        rows = np.intersect1d(rows, held_out)
        notes.append(f"the detector was trained on this zoo ({meta.get('split', 'pool')} split); only its "
                     f"{len(rows)} held-out models are scored, so no score is in-sample")
    if not rows.size:
        reason = "no model of this zoo is left to score (see the notes)"
        return {"skipped": reason, "notes": notes}, _Section(title, [f"Skipped: {reason}."])
    proba = np.vstack([detector.predict_proba(chunk)
                       for chunk in tqdm(weight_chunks(ctx.store, rows, _CHUNK_MODELS), desc="detector",
                                         unit="chunk", disable=not ctx.progress)])
    classes = [str(c) for c in detector.classes_]
    try:
        truth = labels(ctx.store, meta["target"])[rows].astype(str)
        if not set(truth) <= set(classes):
            notes.append(f"this zoo's {meta['target']} labels {sorted(set(truth) - set(classes))} are "
                         "unknown to the detector; accuracy is not computed")
            truth = None
    except (DetectorError, KeyError) as err:
        notes.append(f"true labels for the detector's target are not available here ({err})")
        truth = None
    unbiased = [c for c in classes if c in UNBIASED_CLASSES]
    if unbiased:
        score = 1.0 - proba[:, [classes.index(c) for c in unbiased]].sum(axis=1)
        score_name = "P(biased)"
    elif truth is not None:
        score = proba[np.arange(len(rows)), [classes.index(t) for t in truth]]
        score_name = "P(true class)"
    else:
        score, score_name = proba.max(axis=1), "P(predicted class)"
    predicted = np.array(classes)[proba.argmax(axis=1)]
    group_of = ctx.group_of[ctx.position(rows)]
    per_group = {}
    for group in ctx.groups:
        mask = group_of == group.label
        if not mask.any():
            continue
        entry = {"score": describe(score[mask]), "predicted_share": _shares(predicted[mask], classes)}
        if truth is not None:
            entry["accuracy"] = float((predicted[mask] == truth[mask]).mean())
        per_group[group.label] = entry
    part = {"path": str(path), "detector": meta["detector"], "target": meta.get("target"), "classes": classes,
            "score_name": score_name, "trained_on": zoo or None, "heldout_accuracy":
            (meta.get("heldout") or {}).get("accuracy"), "per_group": per_group,
            "per_model": {"row": rows, "group": group_of, "score": score, "predicted": predicted,
                          "true": truth}, "notes": notes}
    figure = _plot_detector(ctx, part)
    text = [f"Detector `{meta['detector']}` (target `{meta.get('target')}`, classes {', '.join(classes)}) "
            f"from `{path}`, scored on {len(rows)} models. Left: per group, the distribution of "
            f"{score_name}, points coloured by the model's true label"
            + (" (a regularizer that hides bias pulls its biased models' scores down)" if unbiased else "")
            + "; right: the share of each predicted class, with the detector's accuracy per group.", *notes]
    header = ["group", "models", f"mean {score_name}", "accuracy"]
    table = [[label, str(e["score"]["n"]), _fmt(e["score"]["mean"]), _fmt(e.get("accuracy"))]
             for label, e in per_group.items()]
    return part, _Section(title, text, (header, table), figure)


def _projection_part(ctx: _Context, z: np.ndarray, kind: str) -> tuple[dict[str, Any], _Section]:
    title = "Weight-feature projection (PCA)"
    if len(z) < 3 or z.shape[1] < 2:
        reason = (f"PCA needs 3+ models and 2+ varying features; the zoo has {len(z)} models, "
                  f"{z.shape[1]} features")
        return {"skipped": reason, "notes": [reason]}, _Section(title, [f"Skipped: {reason}."])
    pca = PCA(n_components=2, random_state=0)
    points = pca.fit_transform(z)
    means = {g.label: points[ctx.group_of == g.label].mean(axis=0).tolist() for g in ctx.groups}
    part = {"method": "PCA of standardised weight features", "feature_kind": kind,
            "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
            "per_model": {"row": ctx.rows, "group": ctx.group_of, "bias_level": ctx.level,
                          "pc1": points[:, 0], "pc2": points[:, 1]},
            "group_means": means}
    figure = _plot_projection(ctx, part)
    text = [f"PCA of the `{kind}` weight features of every done model, each feature standardised over the "
            f"zoo ({z.shape[1]} features vary). Left: coloured by group (large markers: group means); "
            f"right: coloured by {ctx.store.spec.bias_level}. Groups that sit apart from the baseline "
            "changed the weights in a way these features see."]
    return part, _Section(title, text, None, figure)


def _shift_part(ctx: _Context, stats: np.ndarray) -> tuple[dict[str, Any], _Section]:
    title = "Per-layer statistic shifts vs the baseline"
    others = [g for g in ctx.groups if g is not ctx.baseline]
    tensors = [slot.name for slot in ctx.store.layout]
    if not others:
        reason = "no group besides the baseline"
        return {"skipped": reason}, _Section(title, [f"Skipped: {reason}."])
    columns = {name: i for i, name in enumerate(feature_names(ctx.store.layout, "stats"))}

    def mean_of(group: Group, stat: str) -> np.ndarray:
        mask = ctx.group_of == group.label
        return stats[mask][:, [columns[f"{t}:{stat}"] for t in tensors]].astype(np.float64).mean(axis=0)

    base = {stat: mean_of(ctx.baseline, stat) for stat in ("mean", "std", "l2")}
    values = {}
    std = np.where(base["std"] > 0, base["std"], np.nan)  # a constant tensor has no scale: NaN, not inf
    l2 = np.where(base["l2"] > 0, base["l2"], np.nan)
    for group in others:
        own = {stat: mean_of(group, stat) for stat in ("mean", "std", "l2")}
        values[group.label] = {"mean_shift_in_std": (own["mean"] - base["mean"]) / std,
                               "std_change_pct": 100 * (own["std"] / std - 1),
                               "l2_change_pct": 100 * (own["l2"] / l2 - 1)}
    part = {"tensors": tensors, "measures": list(SHIFT_MEASURES), "baseline": ctx.baseline.label,
            "baseline_values": base, "values": values}
    figure = _plot_shifts(ctx, part)
    text = ["Per tensor of the layout, averaged over each group's models and compared with the baseline's "
            "average: the mean weight's shift in units of the baseline's weight std, and the relative "
            "change of the weights' std and L2 norm. Red: larger than the baseline; blue: smaller."]
    return part, _Section(title, text, None, figure)


def _colour_part(ctx: _Context, first_layer: np.ndarray | None,
                 chroma: np.ndarray | None) -> tuple[dict[str, Any], _Section]:
    title = "First-layer colour sensitivity"
    if first_layer is None or chroma is None:
        reason = (f"a {ctx.store.spec.task} zoo's sensitive attribute is not a colour; this section is for "
                  "the MNIST colour tasks")
        return {"skipped": reason}, _Section(title, [f"Skipped: {reason}."])
    names = feature_names(ctx.store.layout, "first_layer")
    pairs = [i for i, n in enumerate(names) if "-" in n.split("[", 1)[-1] and n.endswith(":mean_abs")]
    contrast = first_layer[:, pairs].astype(np.float64).mean(axis=1)
    init = init_chromatic_fraction(ctx.store.spec.arch, ctx.store.spec.width)
    part = {"measure": "chromatic energy fraction of the first convolution",
            "definition": "sum over filters of ||w - channel mean of w||^2 / ||w||^2 (0 colour-blind, "
                          "about 2/3 untrained, 1 pure colour opponency)",
            "init_reference": init,
            "contrast_definition": "mean over channel pairs and filters of |response to a flat patch of one "
                                   "primary - response to another| (detector.features first_layer "
                                   "[X-Y]:mean_abs), weight units",
            "per_group": {g.label: {"chromatic_fraction": describe(chroma[ctx.group_of == g.label]),
                                    "flat_colour_contrast": describe(contrast[ctx.group_of == g.label])}
                          for g in ctx.groups},
            "per_model": {"row": ctx.rows, "group": ctx.group_of, "chromatic_fraction": chroma,
                          "flat_colour_contrast": contrast}}
    figure = _plot_colour(ctx, part)
    text = ["How strongly the first-layer filters weigh colour against brightness. **Chromatic energy "
            "fraction**: each filter's kernel per input channel is split into its mean over the R, G, B "
            "channels (brightness) and the rest (colour); the fraction is Σ‖w − w̄‖² / Σ‖w‖² over all "
            f"filters: 0 is colour-blind, 1 pure colour opponency, and freshly initialised models sit at "
            f"{init:.3f} (dotted line). A colour shortcut raises it; a regularizer that removes colour from "
            "the bottleneck may or may not lower it here. **Flat-colour contrast** (weight units): how "
            "differently a filter answers flat patches of two primaries, averaged over filters and the "
            "three pairs."]
    header = ["group", "chromatic fraction", "flat-colour contrast"]
    table = [[label, _mean_se(e["chromatic_fraction"], 3), _mean_se(e["flat_colour_contrast"], 4)]
             for label, e in part["per_group"].items()]
    return part, _Section(title, text, (header, table), figure)


def _face_folder(ctx: _Context, data_dir: str | Path | None) -> Path:
    """The face folder to draw probes from: an explicit root first, then the folder the zoo was
    generated from (recorded in the store), then the usual lookup."""
    if data_dir is None:
        recorded = ctx.store.group.attrs.get("data_source")
        if recorded and Path(recorded).is_dir():
            return Path(recorded)
    return find_face_folder(ctx.store.spec.dataset, data_dir)


def _insidebias_part(ctx: _Context, data_dir: str | Path | None, per_group: int,
                     seed: int) -> tuple[dict[str, Any], _Section]:
    title = "InsideBias"
    if ctx.store.spec.task != "face_gender":
        reason = f"InsideBias compares demographic groups of faces; this is a {ctx.store.spec.task} zoo"
        return {"skipped": reason}, _Section(title, [f"Skipped: {reason}."])
    model = build_model(ctx.store.spec.arch, ctx.store.spec.width)
    try:
        folder = _face_folder(ctx, data_dir)
        faces = load_face_data(folder, image_size=model.input_shape[-1], seed=ctx.store.spec.data_seed,
                               progress=ctx.progress)
        probes = probe_images(faces.test, GROUPS, per_group, seed)
    except (FaceDataError, InsideBiasError) as err:
        reason = f"the face probes could not be loaded ({err})"
        part = {"skipped": reason, "notes": [f"InsideBias skipped: {reason}"]}
        return part, _Section(title, [f"Skipped: {reason}."])
    notes = []
    if faces.fingerprint != ctx.store.group.attrs.get("data_fingerprint"):
        notes.append(f"the probe images come from {folder}, which is not the face data this zoo was "
                     "trained on")
    min_ratio, lowest = np.full(len(ctx.rows), np.nan), np.full(len(ctx.rows), "dead layer", dtype=object)
    layer = ""
    with tqdm(total=len(ctx.rows), desc="InsideBias", unit="model", disable=not ctx.progress) as bar:
        for start, block in _weight_blocks(ctx.store, ctx.rows):
            for offset, row in enumerate(block):
                model.load_state_dict(unflatten(row, ctx.store.layout))
                result = insidebias(model, probes)
                layer = result.default_layer
                min_ratio[start + offset] = result.min_ratio()
                if np.isfinite(min_ratio[start + offset]):
                    lowest[start + offset] = result.lowest_group()
                bar.update(1)
    dead = int(np.isnan(min_ratio).sum())
    if dead:
        notes.append(f"{dead} model(s) have a dead {layer} (no filter fires on any probe): min Λ undefined")
    lowest = lowest.astype(str)
    categories = [*GROUPS, "dead layer"] if dead else list(GROUPS)
    part = {"layer": layer, "probes_per_group": per_group, "seed": seed, "probe_folder": str(folder),
            "groups": list(GROUPS),
            "per_group": {g.label: {"min_ratio": describe(min_ratio[ctx.group_of == g.label]),
                                    "lowest_group_share": _shares(lowest[ctx.group_of == g.label],
                                                                  categories)}
                          for g in ctx.groups},
            "per_model": {"row": ctx.rows, "group": ctx.group_of, "min_ratio": min_ratio,
                          "lowest_group": lowest},
            "notes": notes}
    figure = _plot_insidebias(ctx, part, categories)
    text = [f"InsideBias (Serna et al., ICPR 2020) on {per_group} probe faces per group from the balanced "
            f"test set: Λ is each group's mean peak activation in {layer} over the best-served group's; a "
            "low min Λ flags a model that under-learned a group. Left: min Λ per model; right: which group "
            "is lowest.",
            *notes]
    header = ["group", "min Λ", *[f"lowest: {c}" for c in categories]]
    table = [[label, _mean_se(e["min_ratio"], 3), *[f"{e['lowest_group_share'][c]:.0%}" for c in categories]]
             for label, e in part["per_group"].items()]
    return part, _Section(title, text, (header, table), figure)


def _weight_blocks(store: ZooStore, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(position in ``rows``, weight rows) a chunk at a time; ``rows`` are checked once."""
    chunks = weight_chunks(store, rows, _CHUNK_MODELS)
    for start, chunk in zip(range(0, len(rows), _CHUNK_MODELS), chunks, strict=True):
        yield start, chunk.weights


def _tradeoff_part(ctx: _Context) -> tuple[dict[str, Any], _Section]:
    metrics = _metrics(ctx)
    n_groups = len(ctx.store.group.attrs.get("groups", [])) or ctx.store.spec.num_groups
    per_group = {g.label: {name: describe(values[ctx.group_of == g.label])
                           for name, values in metrics.items()} for g in ctx.groups}
    part = {"y": "unbiased_acc", "x": ["group_acc_gap", "leakage"], "leakage_chance": 1 / n_groups,
            "per_model": {"row": ctx.rows, "group": ctx.group_of, **metrics}, "per_group": per_group}
    missing = int((~np.isfinite(metrics["unbiased_acc"])).sum())
    if missing:
        part["notes"] = [f"{missing} model(s) lack unbiased_acc and are left out of the trade-off plot"]
    figure = _plot_tradeoff(ctx, part)
    text = ["Unbiased accuracy against two fairness measures the zoo records: the group-accuracy gap "
            "(max − min accuracy over the sensitive groups, unbiased test set; lower is fairer) and "
            f"representation leakage (a fresh probe's accuracy predicting the group from the bottleneck; "
            f"chance {1 / n_groups:.2f}, lower is fairer). Small points: models; large: group means ± s.e. "
            "Up and to the left is better."]
    return part, _Section("Accuracy / fairness trade-off", text, None, figure)


def _distance_part(ctx: _Context, z: np.ndarray, n_permutations: int,
                   seed: int) -> tuple[dict[str, Any], _Section]:
    title = "Distance to the baseline (energy distance, permutation test)"
    base = z[ctx.group_of == ctx.baseline.label]
    per_group: dict[str, dict[str, Any]] = {}
    tested = [g for g in ctx.groups if g is not ctx.baseline]
    for group in tqdm(tested, desc="permutation tests", unit="group", disable=not ctx.progress):
        if group.n < ctx.min_models or ctx.baseline.n < ctx.min_models:
            small = group if group.n < ctx.min_models else ctx.baseline
            per_group[group.label] = {"skipped": f"'{small.label}' has {small.n} model(s), fewer than "
                                                 f"--min-models {ctx.min_models}"}
            continue
        result = energy_test(z[ctx.group_of == group.label], base, n_permutations, seed)
        per_group[group.label] = result.to_dict()
    done = [label for label, r in per_group.items() if "p_value" in r]
    for label, adjusted in zip(done, holm([per_group[label]["p_value"] for label in done]), strict=True):
        per_group[label]["p_holm"] = adjusted
    self_check: dict[str, Any]
    if ctx.baseline.n >= 4:
        order = np.random.default_rng([seed, 1]).permutation(len(base))
        half = len(base) // 2
        self_check = energy_test(base[order[:half]], base[order[half:]], n_permutations, seed).to_dict()
    else:
        self_check = {"skipped": f"the baseline has {ctx.baseline.n} models; a split-half check needs 4+"}
    part = {"method": "energy distance of standardised weight features, permutation test",
            "n_permutations": n_permutations, "seed": seed, "per_group": per_group,
            "baseline_split_half": self_check}
    figure = _plot_distances(ctx, part) if done or "p_value" in self_check else None
    text = ["Energy distance 2E‖X−Y‖ − E‖X−X′‖ − E‖Y−Y′‖ between each group's standardised weight "
            "features (the projection's features) and the baseline's; 0 means the same distribution. The "
            f"p-value comes from {n_permutations} seeded permutations of the group labels (p-Holm adjusts "
            "for the number of groups tested); the tick on each bar is the 95th percentile of its "
            "permutation null. The last row splits the baseline into two random halves: its p-value should "
            "not be small."]
    header = ["group", "models", "energy distance", "null 95%", "p", "p (Holm)"]
    table = []
    for label, r in [*per_group.items(), ("baseline split-half", self_check)]:
        if "skipped" in r:
            table.append([label, "", "", "", r["skipped"], ""])
        else:
            table.append([label, f"{r['n_group']} vs {r['n_baseline']}", f"{r['energy_distance']:.4f}",
                          f"{r['null_q95']:.4f}" if n_permutations else "", f"{r['p_value']:.4f}",
                          _fmt(r.get("p_holm"), 4)])
    return part, _Section(title, text, (header, table), figure)


# ---------------------------------------------------------------- plots


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, np.atleast_1d(figure.subplots(nrows, ncols, squeeze=False).ravel())


def _save(figure: Figure, ctx: _Context, name: str) -> str:
    figure.savefig(ctx.out / name, dpi=110)
    return name


def _group_height(ctx: _Context) -> float:
    return max(3.0, 0.42 * len(ctx.groups) + 1.4)


def _boxes(ax: Axes, ctx: _Context, values: np.ndarray, group_of: np.ndarray, xlabel: str,
           points: bool = True) -> list[str]:
    """Horizontal boxes per group (baseline on top), with the models as jittered points."""
    present = [g.label for g in ctx.groups if np.isfinite(values[group_of == g.label]).any()]
    data = [values[(group_of == label) & np.isfinite(values)] for label in present]
    positions = np.arange(len(present))[::-1]
    boxes = ax.boxplot(data, positions=positions, orientation="horizontal", widths=0.6, patch_artist=True,
                       showfliers=False, tick_labels=present)
    for patch, label in zip(boxes["boxes"], present, strict=True):
        patch.set_facecolor((*ctx.styles[label][0], 0.35))
        patch.set_edgecolor(ctx.styles[label][0])
    for median in boxes["medians"]:
        median.set_color("black")
    rng = np.random.default_rng(0)
    for y, label, group_values in zip(positions, present, data, strict=True):
        if points:
            ax.scatter(group_values, y + rng.uniform(-0.18, 0.18, len(group_values)), s=12,
                       color=ctx.styles[label][0], alpha=0.8, zorder=3, linewidths=0)
    ax.set_xlabel(xlabel)
    ax.set_ylim(-0.7, len(present) - 0.3)
    ax.grid(axis="x", alpha=0.3)
    return present


def _stacked_shares(ax: Axes, ctx: _Context, shares: dict[str, dict[str, float]], categories: list[str],
                    xlabel: str, annotate: dict[str, str] | None = None) -> None:
    present = [g.label for g in ctx.groups if g.label in shares]
    positions = np.arange(len(present))[::-1]
    left = np.zeros(len(present))
    for i, category in enumerate(categories):
        widths = np.array([shares[label].get(category, 0.0) for label in present])
        ax.barh(positions, widths, left=left, color=f"C{i % 10}", label=category, height=0.6)
        left += widths
    ax.set_yticks(positions, present)
    ax.set_xlim(0, 1.22 if annotate else 1.0)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xlabel(xlabel)
    ax.set_ylim(-0.7, len(present) - 0.3)
    if annotate:
        for y, label in zip(positions, present, strict=True):
            ax.text(1.02, y, annotate.get(label, ""), va="center", fontsize=8)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(len(categories), 4), fontsize=8,
              frameon=False)


def _plot_detector(ctx: _Context, part: dict[str, Any]) -> str:
    model = part["per_model"]
    figure, (left, right) = _figure(12, _group_height(ctx) + 0.6, ncols=2)
    truth = model["true"]
    present = _boxes(left, ctx, model["score"], model["group"], part["score_name"], points=truth is None)
    if truth is not None:
        # Points coloured by true label: whether truly biased models score high is the question.
        positions = dict(zip(present, np.arange(len(present))[::-1], strict=True))
        rng = np.random.default_rng(0)
        for i, cls in enumerate(part["classes"]):  # the colours of the predicted classes on the right
            mask = (truth == cls) & np.isin(model["group"], present)
            if not mask.any():
                continue
            ys = np.array([positions[g] for g in model["group"][mask]]) + rng.uniform(-0.18, 0.18, mask.sum())
            left.scatter(model["score"][mask], ys, s=14, color=f"C{i % 10}", label=f"true: {cls}",
                         zorder=3, alpha=0.85, linewidths=0)
        left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
    left.set_xlim(-0.03, 1.03)
    left.set_title(f"{part['score_name']} per group", fontsize=10)
    shares = {label: e["predicted_share"] for label, e in part["per_group"].items()}
    accuracy = {label: f"acc {e['accuracy']:.2f}"
                for label, e in part["per_group"].items() if "accuracy" in e}
    _stacked_shares(right, ctx, shares, part["classes"], "share of models", accuracy or None)
    right.set_title("predicted class per group", fontsize=10)
    figure.suptitle(f"Detector {part['detector']} (target {part['target']}) on {len(model['row'])} models",
                    fontsize=11)
    return _save(figure, ctx, "detector_scores.png")


def _plot_projection(ctx: _Context, part: dict[str, Any]) -> str:
    model = part["per_model"]
    ratio = part["explained_variance_ratio"]
    figure, (left, right) = _figure(13, 5.4, ncols=2)
    for group in ctx.groups:
        mask = model["group"] == group.label
        colour, marker = ctx.styles[group.label]
        left.scatter(model["pc1"][mask], model["pc2"][mask], s=22, color=colour, marker=marker, alpha=0.75,
                     linewidths=0, label=f"{group.label} ({group.n})")
        mean = part["group_means"][group.label]
        left.scatter(*mean, s=150, color=colour, marker=marker, edgecolors="black", linewidths=1.2, zorder=4)
    left.legend(title="group (models)", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
                title_fontsize=8, frameon=False)
    left.set_title("by group (large: group means)", fontsize=10)
    numeric = ctx.level_values.dtype.kind in "fi"
    values = np.unique(ctx.level_values)
    if numeric and len(values) > 8:
        points = right.scatter(model["pc1"], model["pc2"], s=22, c=ctx.level_values.astype(float),
                               cmap="viridis", linewidths=0)
        figure.colorbar(points, ax=right, label=ctx.store.spec.bias_level)
    else:
        for i, value in enumerate(values):
            mask = ctx.level_values == value
            right.scatter(model["pc1"][mask], model["pc2"][mask], s=22, color=f"C{i % 10}", linewidths=0,
                          alpha=0.8, label=f"{value:g}" if numeric else str(value))
        right.legend(title=ctx.store.spec.bias_level, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
                     title_fontsize=8, frameon=False)
    right.set_title(f"by bias level ({ctx.store.spec.bias_level})", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
        ax.grid(alpha=0.3)
    figure.suptitle(f"PCA of {part['feature_kind']} weight features, {len(model['row'])} models", fontsize=11)
    return _save(figure, ctx, "projection.png")


def _plot_shifts(ctx: _Context, part: dict[str, Any]) -> str:
    labels_ = list(part["values"])
    tensors = part["tensors"]
    height = 0.34 * len(labels_) + 1.3
    figure, axes = _figure(max(8.0, 0.62 * len(tensors) + 4), 3 * height + 1.2, nrows=3)
    for ax, measure in zip(axes, SHIFT_MEASURES, strict=True):
        grid = np.array([part["values"][label][measure] for label in labels_], dtype=np.float64)
        finite = np.abs(grid[np.isfinite(grid)])
        limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_yticks(range(len(labels_)), labels_, fontsize=8)
        ax.set_xticks(range(len(tensors)), tensors, rotation=35, ha="right", fontsize=8)
        if grid.size <= 240:
            for (i, j), value in np.ndenumerate(grid):
                if np.isfinite(value):
                    # Out of the layout: constrained layout would measure every cell label each pass.
                    ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=6.5, in_layout=False,
                            color="white" if abs(value) > 0.6 * limit else "black")
        ax.set_title(SHIFT_TITLES[measure], fontsize=10)
        figure.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label=SHIFT_UNITS[measure])
    figure.suptitle(f"Per-tensor shifts vs baseline '{part['baseline']}' (group means over models)",
                    fontsize=11)
    return _save(figure, ctx, "layer_shifts.png")


def _plot_colour(ctx: _Context, part: dict[str, Any]) -> str:
    model = part["per_model"]
    figure, (left, right) = _figure(12, _group_height(ctx), ncols=2)
    _boxes(left, ctx, model["chromatic_fraction"], model["group"], "chromatic energy fraction (first conv)")
    init = part["init_reference"]
    left.axvline(init, color="grey", linestyle=":", label=f"untrained ({init:.3f})")
    base = part["per_group"][ctx.baseline.label]["chromatic_fraction"]["median"]
    left.axvline(base, color="black", linestyle="--", linewidth=1, label=f"baseline median ({base:.3f})")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    left.set_title("share of first-layer weight energy that tells colours apart", fontsize=10)
    _boxes(right, ctx, model["flat_colour_contrast"], model["group"], "flat-colour contrast (weight units)")
    base = part["per_group"][ctx.baseline.label]["flat_colour_contrast"]["median"]
    right.axvline(base, color="black", linestyle="--", linewidth=1, label=f"baseline median ({base:.3g})")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    right.set_title("mean |response to flat primary A − primary B| per filter", fontsize=10)
    figure.suptitle("First-layer colour sensitivity", fontsize=11)
    return _save(figure, ctx, "colour_sensitivity.png")


def _plot_insidebias(ctx: _Context, part: dict[str, Any], categories: list[str]) -> str:
    model = part["per_model"]
    figure, (left, right) = _figure(12, _group_height(ctx) + 0.6, ncols=2)
    _boxes(left, ctx, model["min_ratio"], model["group"], f"min Λ ({part['layer']})")
    left.set_title(f"min Λ per model ({part['probes_per_group']} probes per group); low = biased",
                   fontsize=10)
    shares = {label: e["lowest_group_share"] for label, e in part["per_group"].items()}
    _stacked_shares(right, ctx, shares, categories, "share of models")
    right.set_title("group with the lowest Λ", fontsize=10)
    figure.suptitle("InsideBias activation ratios", fontsize=11)
    return _save(figure, ctx, "insidebias.png")


def _plot_tradeoff(ctx: _Context, part: dict[str, Any]) -> str:
    model, per_group = part["per_model"], part["per_group"]
    figure, axes = _figure(13, 5.2, ncols=2)
    titles = {"group_acc_gap": "group-accuracy gap (max − min over groups)",
              "leakage": "leakage (probe accuracy predicting the group)"}
    for ax, x_name in zip(axes, part["x"], strict=True):
        for group in ctx.groups:
            mask = ((model["group"] == group.label) & np.isfinite(model[x_name])
                    & np.isfinite(model["unbiased_acc"]))
            colour, marker = ctx.styles[group.label]
            ax.scatter(model[x_name][mask], model["unbiased_acc"][mask], s=16, color=colour, marker=marker,
                       alpha=0.5, linewidths=0)
            x, y = per_group[group.label][x_name], per_group[group.label]["unbiased_acc"]
            if x["mean"] is not None and y["mean"] is not None:
                ax.errorbar(x["mean"], y["mean"], xerr=x["se"], yerr=y["se"], color=colour, marker=marker,
                            markersize=10, markeredgecolor="black", capsize=3, zorder=4,
                            label=f"{group.label} ({group.n})")
        if x_name == "leakage":
            ax.axvline(part["leakage_chance"], color="grey", linestyle=":", label="chance")
        ax.set_xlabel(titles[x_name] + " →  less fair")
        ax.set_ylabel("unbiased accuracy")
        ax.grid(alpha=0.3)
    handles, names = axes[1].get_legend_handles_labels()
    axes[1].legend(handles, names, title="group mean ± s.e. (models)", loc="upper left",
                   bbox_to_anchor=(1.01, 1), fontsize=8, title_fontsize=8, frameon=False)
    figure.suptitle("Accuracy / fairness trade-off (small points: models)", fontsize=11)
    return _save(figure, ctx, "tradeoff.png")


def _plot_distances(ctx: _Context, part: dict[str, Any]) -> str:
    entries = [(label, r) for label, r in part["per_group"].items() if "p_value" in r]
    if "p_value" in part["baseline_split_half"]:
        entries.append(("baseline split-half", part["baseline_split_half"]))
    figure, (ax,) = _figure(9, max(2.6, 0.42 * len(entries) + 1.4))
    positions = np.arange(len(entries))[::-1]
    largest = max([r["energy_distance"] for _, r in entries] + [r["null_q95"] for _, r in entries
                                                               if math.isfinite(r["null_q95"])])
    for y, (label, r) in zip(positions, entries, strict=True):
        own = label in ctx.styles
        ax.barh(y, r["energy_distance"], height=0.6, color=ctx.styles[label][0] if own else "lightgrey",
                hatch=None if own else "//", edgecolor="black" if not own else ctx.styles[label][0])
        if math.isfinite(r["null_q95"]):
            ax.plot([r["null_q95"]] * 2, [y - 0.35, y + 0.35], color="black", linewidth=2)
        p = r.get("p_holm", r["p_value"])
        star = " *" if p < 0.05 else ""
        right_end = max(r["energy_distance"], r["null_q95"] if math.isfinite(r["null_q95"]) else 0.0)
        ax.text(right_end + 0.02 * largest, y,
                f"p={r['p_value']:.3f}" + (f", Holm {r['p_holm']:.3f}" if "p_holm" in r else "") + star,
                va="center", fontsize=8)
    ax.set_yticks(positions, [label for label, _ in entries], fontsize=8)
    ax.set_xlim(0, largest * 1.55 if largest > 0 else 1)
    ax.set_xlabel("energy distance to the baseline (standardised weight features)")
    ax.set_title(f"Group vs baseline '{ctx.baseline.label}': bar = distance, tick = 95% of permutation null, "
                 "* = p(Holm) < 0.05", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(figure, ctx, "distances.png")


# ---------------------------------------------------------------- writing


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mean_se(stats: dict[str, Any], digits: int = 3) -> str:
    if stats["mean"] is None:
        return "–"
    return f"{stats['mean']:.{digits}f} ± {stats['se']:.{digits}f}"


def _jsonable(value: Any) -> Any:
    """Plain JSON types; NaN and infinities become None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _markdown(summary: dict[str, Any], sections: list[_Section]) -> str:
    lines = [f"# Regularizer comparison: {summary['store']}", "",
             f"{summary['task']} zoo of `{summary['arch']}` (width {summary['width']:g}), "
             f"{summary['n_done']} done models of {summary['n_models']}; baseline "
             f"**{summary['baseline']['label']}**. Numbers behind every plot: "
             "[summary.json](summary.json).", ""]
    if summary["notes"]:
        lines += ["**Notes**", "", *[f"- {note}" for note in summary["notes"]], ""]
    for section in sections:
        lines += [f"## {section.title}", "", *[p for text in section.text for p in (text, "")]]
        if section.table:
            header, rows = section.table
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
            lines.append("")
        if section.figure:
            lines += [f"![{section.title}]({section.figure})", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` in HTML, after escaping."""
    parts = html.escape(text).split("**")
    text = "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html(summary: dict[str, Any], sections: list[_Section]) -> str:
    body = [f"<h1>Regularizer comparison: {html.escape(summary['store'])}</h1>",
            f"<p>{html.escape(summary['task'])} zoo of <code>{html.escape(summary['arch'])}</code> "
            f"(width {summary['width']:g}), {summary['n_done']} done models of {summary['n_models']}; "
            f"baseline <strong>{html.escape(summary['baseline']['label'])}</strong>. Numbers behind every "
            "plot: <a href=\"summary.json\">summary.json</a>.</p>"]
    if summary["notes"]:
        body.append("<p><strong>Notes</strong></p><ul>"
                    + "".join(f"<li>{_inline(n)}</li>" for n in summary["notes"]) + "</ul>")
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body += [f"<p>{_inline(text)}</p>" for text in section.text]
        if section.table:
            header, rows = section.table
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                                  for row in rows) + "</table>")
        if section.figure:
            body.append(f"<img src=\"{html.escape(section.figure)}\" alt=\"{html.escape(section.title)}\">")
    style = ("body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:90%}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Regularizer comparison</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _write(out: Path, summary: dict[str, Any], sections: list[_Section]) -> None:
    clean = _jsonable(summary)
    (out / "summary.json").write_text(json.dumps(clean, indent=1, ensure_ascii=False, allow_nan=False))
    (out / "index.md").write_text(_markdown(clean, sections))
    (out / "index.html").write_text(_html(clean, sections))
