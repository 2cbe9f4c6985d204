"""The report from start to end: check the options, read the zoo once, compute every section,
draw its plot, and write the files. :func:`detector.report.compare` is the public door to it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from detector.files import load_detector
from detector.report import plots
from detector.report import sections_models as models
from detector.report import sections_weights as weights
from detector.report.context import group_notes, make_context, read_features
from detector.report.options import MNIST_TASKS, VANILLA, CompareError, check_options
from detector.report.render import write_report_files
from detector.report.stats import choose_baseline, jsonable, model_groups, standardise
from modelzoo.atomic import OutputFolderError, check_output_folder, staged_folder
from modelzoo.zoo import open_zoo


def write_report(store_path: str | Path, out: str | Path, detector: str | Path | None, *, feature_kind: str,
                 n_permutations: int, seed: int, min_models: int, data_dir: str | Path | None,
                 probes_per_group: int, progress: bool) -> dict[str, Any]:
    """What :func:`detector.report.compare` does (its docstring says what)."""
    check_options(feature_kind, n_permutations, min_models, probes_per_group)
    loaded = load_detector(detector) if detector is not None else None
    zoo = open_zoo(store_path)
    groups = model_groups(zoo)
    out = _output_folder(out)
    try:  # written whole beside --out, then renamed: a full disk or Ctrl-C leaves no partial report
        with staged_folder(out) as staging:
            return _write_sections(zoo, groups, staging, detector, loaded, feature_kind=feature_kind,
                                   n_permutations=n_permutations, seed=seed, min_models=min_models,
                                   data_dir=data_dir, probes_per_group=probes_per_group, progress=progress)
    except OSError as err:
        raise CompareError(f"--out {out}: cannot write the report ({err.strerror or err}); nothing was "
                           "written there") from err


def _write_sections(zoo, groups, out: Path, detector, loaded, *, feature_kind: str, n_permutations: int,
                    seed: int, min_models: int, data_dir, probes_per_group: int,
                    progress: bool) -> dict[str, Any]:
    """Every section, its plot and the report files, into the (staging) folder ``out``."""
    baseline, fallback_note = choose_baseline(groups, min_models)
    ctx = make_context(zoo, groups, baseline, min_models, progress)
    notes = [fallback_note] if fallback_note else []
    notes += group_notes(ctx)
    features = read_features(zoo, ctx.rows, feature_kind, zoo.spec.task in MNIST_TASKS, progress)
    z = standardise(features.projected)
    spec = zoo.spec
    summary: dict[str, Any] = {
        "report": "weightbias compare", "store": str(zoo.path), "task": spec.task, "arch": spec.arch,
        "width": spec.width, "spec_digest": zoo.attrs["spec_digest"], "n_models": zoo.n_models,
        "n_done": len(ctx.rows), "bias_level": spec.bias_level,
        "bias_levels": sorted(set(ctx.level.tolist())),
        "feature_kind": feature_kind, "n_features": int(features.projected.shape[1]),
        "n_features_used": int(z.shape[1]), "n_permutations": n_permutations, "seed": seed,
        "min_models": min_models,
        "baseline": {"label": baseline.label, "is_vanilla": baseline.regularizer == VANILLA,
                     "note": fallback_note},
        "groups": models.groups_section(ctx),
    }
    look = plots.make_look(summary["groups"], spec.bias_level, ctx.level_values, out)
    sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("detector", lambda: models.detector_section(ctx, detector, loaded)),
        ("projection", lambda: weights.projection_section(ctx, z, feature_kind)),
        ("layer_shifts", lambda: weights.shift_section(ctx, features.stats)),
        ("colour_sensitivity", lambda: weights.colour_section(ctx, features.first_layer, features.chroma)),
        ("insidebias", lambda: models.insidebias_section(ctx, data_dir, probes_per_group, seed)),
        ("tradeoff", lambda: models.tradeoff_section(ctx)),
        ("distances", lambda: weights.distance_section(ctx, z, n_permutations, seed)),
    ]
    figures = {}
    for name, compute in sections:
        part = compute()
        summary[name] = part
        figure = plots.plot_section(name, part, look)
        if figure:
            figures[name] = figure
        notes += part.get("notes", [])
    summary["figures"] = figures
    summary["notes"] = notes
    clean = jsonable(summary)
    write_report_files(out, clean)
    return clean


def _output_folder(out: str | Path) -> Path:
    try:
        return check_output_folder(out, "summary.json", ("index.html", "index.md", "*.png"))
    except OutputFolderError as err:
        raise CompareError(f"--out {err}") from None
