"""Report sections about what the models do: the groups, a detector's scores, InsideBias and the
accuracy / fairness trade-off. Each returns a plain, JSON-ready dict (the numbers in summary.json);
a section that cannot be computed says why under ``"skipped"``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from detector.activations import InsideBiasError, insidebias, probe_images
from detector.evaluate import labels, split_rows
from detector.models import DetectorError, for_layout
from detector.report._read import weight_blocks
from detector.report.context import Context
from detector.report.options import CompareError
from detector.report.stats import describe, jsonable, shares
from detector.scoring import UNBIASED_CLASSES
from modelzoo.architectures import build_model, unflatten
from modelzoo.faces import GROUPS, FaceDataError, find_face_folder, load_face_data

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline


def metrics(ctx: Context) -> dict[str, np.ndarray]:
    """Per done model: unbiased and biased accuracy, the group-accuracy gap (max − min of
    ``metrics/per_group_acc``; NaN with fewer than two groups measured) and leakage."""
    zoo, rows = ctx.zoo, ctx.rows
    per_group = zoo.column("metrics/per_group_acc")[rows].astype(np.float64)
    missing = rows[np.isnan(per_group).all(axis=1)]
    if missing.size:  # a model measured on any test set has some group's accuracy: a lost chunk
        raise CompareError(f"{zoo.path}: models {missing[:10].tolist()} have no per-group accuracy (a "
                           "damaged or deleted chunk); run `weightbias zoo verify`, then re-run `zoo "
                           "generate` to retrain them")
    with np.errstate(all="ignore"):
        finite = np.isfinite(per_group).sum(axis=1) >= 2
        gap = np.full(len(rows), np.nan)
        gap[finite] = np.nanmax(per_group[finite], axis=1) - np.nanmin(per_group[finite], axis=1)
    return {"unbiased_acc": zoo.column("metrics/unbiased_acc")[rows].astype(np.float64),
            "biased_acc": zoo.column("metrics/biased_acc")[rows].astype(np.float64),
            "group_acc_gap": gap, "leakage": zoo.column("metrics/leakage")[rows].astype(np.float64)}


def groups_section(ctx: Context) -> list[dict[str, Any]]:
    """Per group (baseline first): its models, their bias levels, and their metrics described."""
    values = metrics(ctx)
    result = []
    for group in ctx.groups:
        mask = ctx.members(group)
        levels, counts = np.unique(ctx.level[mask], return_counts=True)
        result.append({
            "label": group.label, "regularizer": group.regularizer, "gammas": list(group.gammas),
            "n_models": group.n, "is_baseline": group is ctx.baseline, "too_few": group.n < ctx.min_models,
            "bias_level_counts": {str(k): int(v) for k, v in zip(levels, counts, strict=True)},
            "rows": group.rows.tolist(),
            **{name: describe(column[mask]) for name, column in values.items()},
        })
    return jsonable(result)


def detector_section(ctx: Context, path: str | Path | None,
                     loaded: tuple[Pipeline, dict[str, Any]] | None) -> dict[str, Any]:
    """A saved detector's score of every model it did not learn from, per group."""
    if path is None or loaded is None:
        return {"skipped": "no --detector given"}
    detector, meta = loaded
    notes, rows = [], ctx.rows
    if meta.get("levels") and not np.isin(ctx.level, meta["levels"]).all():
        keep = np.isin(ctx.level, meta["levels"])
        rows = rows[keep]
        notes.append(f"the detector was trained on {ctx.zoo.spec.bias_level} levels {meta['levels']} only; "
                     f"models at other levels ({int((~keep).sum())}) are not scored")
    zoo = meta.get("zoo") or {}
    if zoo.get("spec_digest") == ctx.zoo.attrs["spec_digest"]:
        # Scoring the detector's own training models would flatter it: keep its held-out ones only.
        try:
            _, held_out = split_rows(ctx.zoo, meta.get("split", "pool"), meta.get("train_pool", "A"))
        except DetectorError as err:
            raise CompareError(f"the detector was trained on this zoo but its split cannot be rebuilt "
                               f"({err})") from err
        rows = np.intersect1d(rows, held_out)
        notes.append(f"the detector was trained on this zoo ({meta.get('split', 'pool')} split); only its "
                     f"{len(rows)} held-out models are scored, so no score is in-sample")
    if not rows.size:
        return {"skipped": "no model of this zoo is left to score (see the notes)", "notes": notes}
    detector = for_layout(detector, ctx.zoo.layout)  # a width-independent detector reads any width
    chunks = tqdm(weight_blocks(ctx.zoo, rows), desc="detector", unit="chunk", disable=not ctx.progress)
    proba = np.vstack([detector.predict_proba(chunk) for _, chunk in chunks])
    classes = [str(c) for c in detector.classes_]
    try:
        truth = labels(ctx.zoo, meta["target"])[rows].astype(str)
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
    elif truth is not None:  # no "unbiased" class: how sure it is of each model's true class
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
        entry = {"score": describe(score[mask]), "predicted_share": shares(predicted[mask], classes)}
        if truth is not None:
            entry["accuracy"] = float((predicted[mask] == truth[mask]).mean())
        per_group[group.label] = entry
    return jsonable({
        "path": str(path), "detector": meta["detector"], "target": meta.get("target"), "classes": classes,
        "score_name": score_name, "trained_on": zoo or None,
        "heldout_accuracy": (meta.get("heldout") or {}).get("accuracy"), "per_group": per_group,
        "per_model": {"row": rows, "group": group_of, "score": score, "predicted": predicted, "true": truth},
        "notes": notes})


def _face_folder(ctx: Context, data_dir: str | Path | None) -> Path:
    """The face folder to draw probes from: an explicit root first, then the folder the zoo was
    generated from (recorded in the store), then the usual lookup."""
    if data_dir is None:
        recorded = ctx.zoo.attrs.get("data_source")
        if recorded and Path(recorded).is_dir():
            return Path(recorded)
    return find_face_folder(ctx.zoo.spec.dataset, data_dir)


def insidebias_section(ctx: Context, data_dir: str | Path | None, per_group: int,
                       seed: int) -> dict[str, Any]:
    """InsideBias min Λ of every model of a face zoo on a few probe faces per demographic group."""
    spec = ctx.zoo.spec
    if spec.task != "face_gender":
        return {"skipped": f"InsideBias compares demographic groups of faces; this is a {spec.task} zoo"}
    model = build_model(spec.arch, spec.width)
    try:
        folder = _face_folder(ctx, data_dir)
        faces = load_face_data(folder, image_size=model.input_shape[-1], seed=spec.data_seed,
                               progress=ctx.progress)
        probes = probe_images(faces.test, GROUPS, per_group, seed)
    except (FaceDataError, InsideBiasError) as err:
        reason = f"the face probes could not be loaded ({err})"
        return {"skipped": reason, "notes": [f"InsideBias skipped: {reason}"]}
    notes = []
    if faces.fingerprint != ctx.zoo.attrs.get("data_fingerprint"):
        notes.append(f"the probe images come from {folder}, which is not the face data this zoo was "
                     "trained on")
    min_ratio, lowest = np.full(len(ctx.rows), np.nan), np.full(len(ctx.rows), "dead layer", dtype=object)
    layer = ""
    with tqdm(total=len(ctx.rows), desc="InsideBias", unit="model", disable=not ctx.progress) as bar:
        for start, block in weight_blocks(ctx.zoo, ctx.rows):
            for offset, row in enumerate(block):
                model.load_state_dict(unflatten(row, ctx.zoo.layout))
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
    return jsonable({
        "layer": layer, "probes_per_group": per_group, "seed": seed, "probe_folder": str(folder),
        "groups": list(GROUPS),
        "per_group": {g.label: {"min_ratio": describe(min_ratio[ctx.members(g)]),
                                "lowest_group_share": shares(lowest[ctx.members(g)], categories)}
                      for g in ctx.groups},
        "per_model": {"row": ctx.rows, "group": ctx.group_of, "min_ratio": min_ratio, "lowest_group": lowest},
        "notes": notes})


def tradeoff_section(ctx: Context) -> dict[str, Any]:
    """Unbiased accuracy against the group-accuracy gap and leakage, per model and per group."""
    values = metrics(ctx)
    n_groups = len(ctx.zoo.attrs.get("groups", [])) or ctx.zoo.spec.num_groups
    part = {"y": "unbiased_acc", "x": ["group_acc_gap", "leakage"], "leakage_chance": 1 / n_groups,
            "per_model": {"row": ctx.rows, "group": ctx.group_of, **values},
            "per_group": {g.label: {name: describe(column[ctx.members(g)]) for name, column in values.items()}
                          for g in ctx.groups}}
    missing = int((~np.isfinite(values["unbiased_acc"])).sum())
    if missing:
        part["notes"] = [f"{missing} model(s) lack unbiased_acc and are left out of the trade-off plot"]
    return jsonable(part)
