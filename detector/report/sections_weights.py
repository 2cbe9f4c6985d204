"""Report sections about the weights themselves: a PCA projection of weight features, per-layer
shifts against the baseline, first-layer colour sensitivity, and the energy distance of each group
to the baseline. Each returns a plain, JSON-ready dict (the numbers in summary.json); a section that
cannot be computed says why under ``"skipped"``."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from tqdm.auto import tqdm

from detector.features import feature_names
from detector.report.chroma import init_chromatic_fraction
from detector.report.context import Context
from detector.report.stats import Group, describe, energy_test, holm, jsonable

SHIFT_MEASURES = ("mean_shift_in_std", "std_change_pct", "l2_change_pct")


def projection_section(ctx: Context, z: np.ndarray, kind: str) -> dict[str, Any]:
    """PCA (2 components) of the standardised weight features ``z`` of every done model."""
    if len(z) < 3 or z.shape[1] < 2:
        reason = (f"PCA needs 3+ models and 2+ varying features; the zoo has {len(z)} models, "
                  f"{z.shape[1]} features")
        return {"skipped": reason, "notes": [reason]}
    pca = PCA(n_components=2, random_state=0)
    points = pca.fit_transform(z)
    return jsonable({
        "method": "PCA of standardised weight features", "feature_kind": kind,
        "explained_variance_ratio": pca.explained_variance_ratio_,
        "per_model": {"row": ctx.rows, "group": ctx.group_of, "bias_level": ctx.level,
                      "pc1": points[:, 0], "pc2": points[:, 1]},
        "group_means": {g.label: points[ctx.members(g)].mean(axis=0) for g in ctx.groups}})


def shift_section(ctx: Context, stats: np.ndarray) -> dict[str, Any]:
    """Per tensor, each group's mean weight, weight std and L2 norm against the baseline's, from the
    per-tensor ``stats`` features of every done model."""
    others = [g for g in ctx.groups if g is not ctx.baseline]
    if not others:
        return {"skipped": "no group besides the baseline"}
    tensors = [slot.name for slot in ctx.zoo.layout]
    columns = {name: i for i, name in enumerate(feature_names(ctx.zoo.layout, "stats"))}

    def mean_of(group: Group, stat: str) -> np.ndarray:
        return stats[ctx.members(group)][:, [columns[f"{t}:{stat}"] for t in tensors]].astype(
            np.float64).mean(axis=0)

    base = {stat: mean_of(ctx.baseline, stat) for stat in ("mean", "std", "l2")}
    values = {}
    std = np.where(base["std"] > 0, base["std"], np.nan)  # a constant tensor has no scale: NaN, not inf
    l2 = np.where(base["l2"] > 0, base["l2"], np.nan)
    for group in others:
        own = {stat: mean_of(group, stat) for stat in ("mean", "std", "l2")}
        values[group.label] = {"mean_shift_in_std": (own["mean"] - base["mean"]) / std,
                               "std_change_pct": 100 * (own["std"] / std - 1),
                               "l2_change_pct": 100 * (own["l2"] / l2 - 1)}
    return jsonable({"tensors": tensors, "measures": list(SHIFT_MEASURES), "baseline": ctx.baseline.label,
                     "baseline_values": base, "values": values})


def colour_section(ctx: Context, first_layer: np.ndarray | None, chroma: np.ndarray | None) -> dict[str, Any]:
    """Chromatic energy fraction (:mod:`detector.report.chroma`) and flat-colour contrast of the
    first convolution, per model and per group (MNIST colour tasks only)."""
    if first_layer is None or chroma is None:
        return {"skipped": f"a {ctx.zoo.spec.task} zoo's sensitive attribute is not a colour; this section "
                           "is for the MNIST colour tasks"}
    names = feature_names(ctx.zoo.layout, "first_layer")
    pairs = [i for i, n in enumerate(names) if "-" in n.split("[", 1)[-1] and n.endswith(":mean_abs")]
    contrast = first_layer[:, pairs].astype(np.float64).mean(axis=1)
    # Measured on fresh models, not assumed: the report shows where training starts from.
    init = init_chromatic_fraction(ctx.zoo.spec.arch, ctx.zoo.spec.width)
    return jsonable({
        "measure": "chromatic energy fraction of the first convolution",
        "definition": "sum over filters of ||w - channel mean of w||^2 / ||w||^2 (0 colour-blind, "
                      "about 2/3 untrained, 1 pure colour opponency)",
        "init_reference": init,
        "contrast_definition": "mean over channel pairs and filters of |response to a flat patch of one "
                               "primary - response to another| (detector.features first_layer "
                               "[X-Y]:mean_abs), weight units",
        "per_group": {g.label: {"chromatic_fraction": describe(chroma[ctx.members(g)]),
                                "flat_colour_contrast": describe(contrast[ctx.members(g)])}
                      for g in ctx.groups},
        "per_model": {"row": ctx.rows, "group": ctx.group_of, "chromatic_fraction": chroma,
                      "flat_colour_contrast": contrast}})


def distance_section(ctx: Context, z: np.ndarray, n_permutations: int, seed: int) -> dict[str, Any]:
    """Energy distance of each group's standardised weight features ``z`` to the baseline's, with
    permutation p-values (Holm-adjusted over the groups tested) and a split-half check of the
    baseline against itself: the test must not see differences where there are none."""
    base = z[ctx.members(ctx.baseline)]
    per_group: dict[str, dict[str, Any]] = {}
    tested = [g for g in ctx.groups if g is not ctx.baseline]
    for group in tqdm(tested, desc="permutation tests", unit="group", disable=not ctx.progress):
        if group.n < ctx.min_models or ctx.baseline.n < ctx.min_models:
            small = group if group.n < ctx.min_models else ctx.baseline
            per_group[group.label] = {"skipped": f"'{small.label}' has {small.n} model(s), fewer than "
                                                 f"--min-models {ctx.min_models}"}
            continue
        per_group[group.label] = energy_test(z[ctx.members(group)], base, n_permutations, seed).to_dict()
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
    return jsonable({"method": "energy distance of standardised weight features, permutation test",
                     "n_permutations": n_permutations, "seed": seed, "per_group": per_group,
                     "baseline_split_half": self_check})
