"""Verdicts as a person reads them: the lines ``weightbias detector score`` prints for each
checkpoint (verdict, how sure, whether it applies, why) and the table for many.

Last stage of the flow (detector → **report**): it formats the result dicts that
:mod:`detector.scoring` returns and computes nothing itself.
"""

from __future__ import annotations

from typing import Any

FEW_PER_CLASS = 20  # below this many training models per class, a verdict line warns


def verdict_lines(result: dict[str, Any]) -> list[str]:
    """What a person reads first: the verdict line, then the evidence line."""
    name = result["checkpoint"]
    if "refused" in result:
        return [f"{name}: refused: {result['refused']}"]
    ood, detector = result["ood"], result["detector"]
    if ood["in_distribution"] is False:
        head = (f"{name}: outside the detector's experience ({'; '.join(ood['reasons'])}); it would say "
                f"{result['verdict']}, but its uncalibrated p = {result['uncalibrated']['probability']:.2f} "
                "is no probability here")
        if result.get("percentiles"):
            head += ("; percentile among the training models' p(class): "
                     + ", ".join(f"{c} {p:.0f}" for c, p in result["percentiles"].items()))
    else:
        kind = "calibrated" if result["calibrated"] else "uncalibrated"
        probabilities = ", ".join(f"{c} {p:.2f}" for c, p in result["probabilities"].items())
        where = (f"like its training models (distance percentile {ood['distance_percentile']:.0f})"
                 if ood["in_distribution"] else ood["reasons"][0])
        head = (f"{name}: {result['verdict']} (p = {result['probability']:.2f}, {kind}) [{probabilities}]; "
                f"{where}")
        if "agreement" in result:
            head += f"; {result['agreement']:.0%} of the detector's ensemble members agree"
    parts = [head]
    heldout = detector.get("heldout") or {}
    if heldout.get("accuracy") is not None:
        ci = heldout.get("accuracy_ci")
        interval = f"95% CI {ci[0]:.0%}-{ci[1]:.0%}, " if ci else ""
        parts.append(f"detector's held-out accuracy {heldout['accuracy']:.1%} "
                     f"({interval}n={heldout.get('n_models')})")
    few = detector.get("min_train_per_class")
    if few is not None and few < FEW_PER_CLASS:
        parts.append(f"trained on only {few} models per class")
    moved = detector.get("recalibration")
    if moved:
        recipe = ", ".join(f"{key} {value}" for key, value in moved.get("recipe", {}).items())
        parts.append(f"cut points refitted for width {moved['width']:g}{f' and {recipe}' if recipe else ''} "
                     f"on {moved['n_reference']} reference models (trained at width {moved['from_width']:g})")
    width = "" if result["width"] is None else f" width {result['width']:g}"
    parts.append(f"arch {result['arch']}{width}")
    lines = ["; ".join(parts)]
    if result.get("evidence"):
        lines.append(evidence_line(result["evidence"]))
    if "insidebias" in result:
        inside = result["insidebias"]
        lines.append(f"  InsideBias: lowest group {inside['lowest_group']} (min Λ {inside['min_ratio']:.3f})")
    return lines


def evidence_line(evidence: dict[str, Any]) -> str:
    """The evidence of a verdict in one line: top features with per-class ranges, nearest models."""
    features = "; ".join(
        f"{f['feature']} = {f['value']:.3g} ("
        + ", ".join(f"{c} {lo:.3g}..{hi:.3g}" for c, (lo, hi) in f["training_range"].items()) + ")"
        for f in evidence["features"])
    nearest = ", ".join(f"#{n['zoo_model']} {n['label']} ({n['distance']:.2f})" for n in evidence["nearest"])
    return f"  why ({evidence['method']}): {features}; nearest zoo models: {nearest}"


def summary_lines(results: list[dict[str, Any]]) -> list[str]:
    """A table of many verdicts: checkpoint, verdict, p, applicability, architecture."""
    rows = [("checkpoint", "verdict", "p", "applicable", "arch")]
    for r in results:
        if "refused" in r:
            rows.append((r["checkpoint"], "refused", "-", "-", r["refused"][:60]))
            continue
        ood = r["ood"]
        applicable = {True: f"yes (pct {ood['distance_percentile']:.0f})", None: "unknown"}.get(
            ood["in_distribution"], "NO")
        p = f"{r['probability']:.2f}" if ood["in_distribution"] is not False else "-"
        width = "" if r["width"] is None else f" {r['width']:g}"
        rows.append((r["checkpoint"], r["verdict"], p, applicable, f"{r['arch']}{width}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    refused = sum("refused" in r for r in results)
    return [*lines, f"{len(results) - refused} scored, {refused} refused"]
