"""The report's PNG plots (matplotlib, Agg, no display needed), drawn from the section dicts.

Each ``plot_*`` takes a section's dict as :mod:`detector.report.sections_models` and
:mod:`~detector.report.sections_weights` return it (lists, None for NaN) and a :class:`Look`
(groups in order, their colours and markers, where to write) and returns the PNG's file name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from detector.report.sections_weights import SHIFT_MEASURES
from modelzoo.atomic import write_atomic

SHIFT_TITLES = {"mean_shift_in_std": "mean weight − baseline's, in baseline weight-std units",
                "std_change_pct": "weight std, % change vs baseline",
                "l2_change_pct": "L2 norm, % change vs baseline"}
SHIFT_UNITS = {"mean_shift_in_std": "baseline std units", "std_change_pct": "%", "l2_change_pct": "%"}
_PALETTE = [f"C{i}" for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]  # tab10 without its grey: grey is the baseline's
_BASELINE_COLOUR = "#222222"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")

Style = tuple[tuple[float, float, float], str]


@dataclass(frozen=True)
class Look:
    """What every plot shares: the groups (label, models) in order, baseline first; colour and
    marker per group; the bias level's name and stored value per done model; the report folder."""

    groups: list[tuple[str, int]]
    baseline: str
    styles: dict[str, Style]
    bias_level: str
    level_values: np.ndarray
    out: Path


def make_look(groups: list[dict[str, Any]], bias_level: str, level_values: np.ndarray, out: Path) -> Look:
    """A Look from the report's ``groups`` section (baseline first)."""
    baseline = next(g for g in groups if g["is_baseline"])
    return Look([(g["label"], g["n_models"]) for g in groups], baseline["label"], _styles(groups, baseline),
                bias_level, np.asarray(level_values), out)


def _styles(groups: list[dict[str, Any]], baseline: dict[str, Any]) -> dict[str, Style]:
    """Colour per regularizer (lighter for smaller γ), marker per γ rank; the baseline in black."""
    regularizers = sorted({g["regularizer"] for g in groups if g is not baseline})
    styles = {baseline["label"]: (to_rgb(_BASELINE_COLOUR), "o")}
    for i, name in enumerate(regularizers):
        members = [g for g in groups if g["regularizer"] == name and g is not baseline]
        base = np.array(to_rgb(_PALETTE[i % len(_PALETTE)]))
        for rank, group in enumerate(members):
            light = 0.55 * (len(members) - 1 - rank) / max(len(members) - 1, 1)
            styles[group["label"]] = (tuple(base * (1 - light) + light), _MARKERS[rank % len(_MARKERS)])
    return styles


def plot_section(name: str, part: dict[str, Any], look: Look) -> str | None:
    """The PNG of section ``name`` (its file name in ``look.out``), or None for a skipped section or
    one with nothing to draw."""
    if "skipped" in part or name not in PLOTS:
        return None
    return PLOTS[name](part, look)


# ---------------------------------------------------------------- shared pieces


def _floats(values: list[float | None]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)  # None (NaN in summary.json) comes back as NaN


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, np.atleast_1d(figure.subplots(nrows, ncols, squeeze=False).ravel())


def _save(figure: Figure, look: Look, name: str) -> str:
    write_atomic(look.out / name, lambda handle: figure.savefig(handle, format="png", dpi=110))
    return name


def _group_height(look: Look) -> float:
    return max(3.0, 0.42 * len(look.groups) + 1.4)


def _boxes(ax: Axes, look: Look, values: np.ndarray, group_of: np.ndarray, xlabel: str,
           points: bool = True) -> list[str]:
    """Horizontal boxes per group (baseline on top), with the models as jittered points."""
    present = [label for label, _ in look.groups if np.isfinite(values[group_of == label]).any()]
    data = [values[(group_of == label) & np.isfinite(values)] for label in present]
    positions = np.arange(len(present))[::-1]
    boxes = ax.boxplot(data, positions=positions, orientation="horizontal", widths=0.6, patch_artist=True,
                       showfliers=False, tick_labels=present)
    for patch, label in zip(boxes["boxes"], present, strict=True):
        patch.set_facecolor((*look.styles[label][0], 0.35))
        patch.set_edgecolor(look.styles[label][0])
    for median in boxes["medians"]:
        median.set_color("black")
    rng = np.random.default_rng(0)
    for y, label, group_values in zip(positions, present, data, strict=True):
        if points:
            ax.scatter(group_values, y + rng.uniform(-0.18, 0.18, len(group_values)), s=12,
                       color=look.styles[label][0], alpha=0.8, zorder=3, linewidths=0)
    ax.set_xlabel(xlabel)
    ax.set_ylim(-0.7, len(present) - 0.3)
    ax.grid(axis="x", alpha=0.3)
    return present


def _stacked_shares(ax: Axes, look: Look, shares: dict[str, dict[str, float]], categories: list[str],
                    xlabel: str, annotate: dict[str, str] | None = None) -> None:
    present = [label for label, _ in look.groups if label in shares]
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


# ---------------------------------------------------------------- one plot per section


def plot_detector(part: dict[str, Any], look: Look) -> str:
    model = part["per_model"]
    score, group_of = _floats(model["score"]), np.asarray(model["group"])
    figure, (left, right) = _figure(12, _group_height(look) + 0.6, ncols=2)
    truth = None if model["true"] is None else np.asarray(model["true"])
    present = _boxes(left, look, score, group_of, part["score_name"], points=truth is None)
    if truth is not None:
        # Points coloured by true label: whether truly biased models score high is the question.
        positions = dict(zip(present, np.arange(len(present))[::-1], strict=True))
        rng = np.random.default_rng(0)
        for i, cls in enumerate(part["classes"]):  # the colours of the predicted classes on the right
            mask = (truth == cls) & np.isin(group_of, present)
            if not mask.any():
                continue
            ys = np.array([positions[g] for g in group_of[mask]]) + rng.uniform(-0.18, 0.18, mask.sum())
            left.scatter(score[mask], ys, s=14, color=f"C{i % 10}", label=f"true: {cls}",
                         zorder=3, alpha=0.85, linewidths=0)
        left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
    left.set_xlim(-0.03, 1.03)
    left.set_title(f"{part['score_name']} per group", fontsize=10)
    shares = {label: e["predicted_share"] for label, e in part["per_group"].items()}
    accuracy = {label: f"acc {e['accuracy']:.2f}"
                for label, e in part["per_group"].items() if "accuracy" in e}
    _stacked_shares(right, look, shares, part["classes"], "share of models", accuracy or None)
    right.set_title("predicted class per group", fontsize=10)
    figure.suptitle(f"Detector {part['detector']} (target {part['target']}) on {len(model['row'])} models",
                    fontsize=11)
    return _save(figure, look, "detector_scores.png")


def plot_projection(part: dict[str, Any], look: Look) -> str:
    model = part["per_model"]
    pc1, pc2, group_of = _floats(model["pc1"]), _floats(model["pc2"]), np.asarray(model["group"])
    ratio = part["explained_variance_ratio"]
    figure, (left, right) = _figure(13, 5.4, ncols=2)
    for label, n in look.groups:
        mask = group_of == label
        colour, marker = look.styles[label]
        left.scatter(pc1[mask], pc2[mask], s=22, color=colour, marker=marker, alpha=0.75,
                     linewidths=0, label=f"{label} ({n})")
        mean = part["group_means"][label]
        left.scatter(*mean, s=150, color=colour, marker=marker, edgecolors="black", linewidths=1.2, zorder=4)
    left.legend(title="group (models)", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
                title_fontsize=8, frameon=False)
    left.set_title("by group (large: group means)", fontsize=10)
    level_values = look.level_values
    numeric = level_values.dtype.kind in "fi"
    values = np.unique(level_values)
    if numeric and len(values) > 8:  # a sampled bias level: a colour scale, not a legend of levels
        points = right.scatter(pc1, pc2, s=22, c=level_values.astype(float), cmap="viridis", linewidths=0)
        figure.colorbar(points, ax=right, label=look.bias_level)
    else:
        for i, value in enumerate(values):
            mask = level_values == value
            right.scatter(pc1[mask], pc2[mask], s=22, color=f"C{i % 10}", linewidths=0,
                          alpha=0.8, label=f"{value:g}" if numeric else str(value))
        right.legend(title=look.bias_level, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
                     title_fontsize=8, frameon=False)
    right.set_title(f"by bias level ({look.bias_level})", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
        ax.grid(alpha=0.3)
    figure.suptitle(f"PCA of {part['feature_kind']} weight features, {len(model['row'])} models", fontsize=11)
    return _save(figure, look, "projection.png")


def plot_shifts(part: dict[str, Any], look: Look) -> str:
    labels = list(part["values"])
    tensors = part["tensors"]
    height = 0.34 * len(labels) + 1.3
    figure, axes = _figure(max(8.0, 0.62 * len(tensors) + 4), 3 * height + 1.2, nrows=3)
    for ax, measure in zip(axes, SHIFT_MEASURES, strict=True):
        grid = np.array([part["values"][label][measure] for label in labels], dtype=np.float64)
        finite = np.abs(grid[np.isfinite(grid)])
        limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
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
    return _save(figure, look, "layer_shifts.png")


def plot_colour(part: dict[str, Any], look: Look) -> str:
    model = part["per_model"]
    group_of = np.asarray(model["group"])
    figure, (left, right) = _figure(12, _group_height(look), ncols=2)
    _boxes(left, look, _floats(model["chromatic_fraction"]), group_of,
           "chromatic energy fraction (first conv)")
    init = part["init_reference"]
    left.axvline(init, color="grey", linestyle=":", label=f"untrained ({init:.3f})")
    base = part["per_group"][look.baseline]["chromatic_fraction"]["median"]
    left.axvline(base, color="black", linestyle="--", linewidth=1, label=f"baseline median ({base:.3f})")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    left.set_title("share of first-layer weight energy that tells colours apart", fontsize=10)
    _boxes(right, look, _floats(model["flat_colour_contrast"]), group_of,
           "flat-colour contrast (weight units)")
    base = part["per_group"][look.baseline]["flat_colour_contrast"]["median"]
    right.axvline(base, color="black", linestyle="--", linewidth=1, label=f"baseline median ({base:.3g})")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    right.set_title("mean |response to flat primary A − primary B| per filter", fontsize=10)
    figure.suptitle("First-layer colour sensitivity", fontsize=11)
    return _save(figure, look, "colour_sensitivity.png")


def plot_insidebias(part: dict[str, Any], look: Look) -> str:
    model = part["per_model"]
    figure, (left, right) = _figure(12, _group_height(look) + 0.6, ncols=2)
    _boxes(left, look, _floats(model["min_ratio"]), np.asarray(model["group"]), f"min Λ ({part['layer']})")
    left.set_title(f"min Λ per model ({part['probes_per_group']} probes per group); low = biased",
                   fontsize=10)
    shares = {label: e["lowest_group_share"] for label, e in part["per_group"].items()}
    categories = list(next(iter(shares.values())))  # the groups, and "dead layer" if any model has one
    _stacked_shares(right, look, shares, categories, "share of models")
    right.set_title("group with the lowest Λ", fontsize=10)
    figure.suptitle("InsideBias activation ratios", fontsize=11)
    return _save(figure, look, "insidebias.png")


def plot_tradeoff(part: dict[str, Any], look: Look) -> str:
    per_group = part["per_group"]
    model = {name: _floats(part["per_model"][name]) for name in (part["y"], *part["x"])}
    group_of = np.asarray(part["per_model"]["group"])
    figure, axes = _figure(13, 5.2, ncols=2)
    titles = {"group_acc_gap": "group-accuracy gap (max − min over groups)",
              "leakage": "leakage (probe accuracy predicting the group)"}
    for ax, x_name in zip(axes, part["x"], strict=True):
        for label, n in look.groups:
            mask = (group_of == label) & np.isfinite(model[x_name]) & np.isfinite(model["unbiased_acc"])
            colour, marker = look.styles[label]
            ax.scatter(model[x_name][mask], model["unbiased_acc"][mask], s=16, color=colour, marker=marker,
                       alpha=0.5, linewidths=0)
            x, y = per_group[label][x_name], per_group[label]["unbiased_acc"]
            if x["mean"] is not None and y["mean"] is not None:
                ax.errorbar(x["mean"], y["mean"], xerr=x["se"], yerr=y["se"], color=colour, marker=marker,
                            markersize=10, markeredgecolor="black", capsize=3, zorder=4,
                            label=f"{label} ({n})")
        if x_name == "leakage":
            ax.axvline(part["leakage_chance"], color="grey", linestyle=":", label="chance")
        ax.set_xlabel(titles[x_name] + " →  less fair")
        ax.set_ylabel("unbiased accuracy")
        ax.grid(alpha=0.3)
    handles, names = axes[1].get_legend_handles_labels()
    axes[1].legend(handles, names, title="group mean ± s.e. (models)", loc="upper left",
                   bbox_to_anchor=(1.01, 1), fontsize=8, title_fontsize=8, frameon=False)
    figure.suptitle("Accuracy / fairness trade-off (small points: models)", fontsize=11)
    return _save(figure, look, "tradeoff.png")


def plot_distances(part: dict[str, Any], look: Look) -> str | None:
    entries = [(label, r) for label, r in part["per_group"].items() if "p_value" in r]
    if "p_value" in part["baseline_split_half"]:
        entries.append(("baseline split-half", part["baseline_split_half"]))
    if not entries:
        return None
    figure, (ax,) = _figure(9, max(2.6, 0.42 * len(entries) + 1.4))
    positions = np.arange(len(entries))[::-1]
    largest = max([r["energy_distance"] for _, r in entries]
                  + [r["null_q95"] for _, r in entries if _finite(r["null_q95"])])
    for y, (label, r) in zip(positions, entries, strict=True):
        own = label in look.styles
        ax.barh(y, r["energy_distance"], height=0.6, color=look.styles[label][0] if own else "lightgrey",
                hatch=None if own else "//", edgecolor="black" if not own else look.styles[label][0])
        if _finite(r["null_q95"]):
            ax.plot([r["null_q95"]] * 2, [y - 0.35, y + 0.35], color="black", linewidth=2)
        p = r.get("p_holm", r["p_value"])
        star = " *" if p < 0.05 else ""
        right_end = max(r["energy_distance"], r["null_q95"] if _finite(r["null_q95"]) else 0.0)
        ax.text(right_end + 0.02 * largest, y,
                f"p={r['p_value']:.3f}" + (f", Holm {r['p_holm']:.3f}" if "p_holm" in r else "") + star,
                va="center", fontsize=8)
    ax.set_yticks(positions, [label for label, _ in entries], fontsize=8)
    ax.set_xlim(0, largest * 1.55 if largest > 0 else 1)
    ax.set_xlabel("energy distance to the baseline (standardised weight features)")
    ax.set_title(f"Group vs baseline '{look.baseline}': bar = distance, tick = 95% of permutation null, "
                 "* = p(Holm) < 0.05", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(figure, look, "distances.png")


PLOTS: dict[str, Callable[[dict[str, Any], Look], str | None]] = {
    "detector": plot_detector, "projection": plot_projection, "layer_shifts": plot_shifts,
    "colour_sensitivity": plot_colour, "insidebias": plot_insidebias, "tradeoff": plot_tradeoff,
    "distances": plot_distances}
