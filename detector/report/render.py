"""The report in words: each section's text and table from its dict, the whole as Markdown and
HTML, and the files written atomically (a temporary name in the same folder, then a rename), so a
run that fails leaves a previous file whole or none, never a truncated one."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detector.report.options import VANILLA
from modelzoo.atomic import write_text_atomic

SECTION_ORDER = ("groups", "detector", "projection", "layer_shifts", "colour_sensitivity", "insidebias",
                 "tradeoff", "distances")
TITLES = {"groups": "Groups", "detector": "Detector scores", "projection": "Weight-feature projection (PCA)",
          "layer_shifts": "Per-layer statistic shifts vs the baseline",
          "colour_sensitivity": "First-layer colour sensitivity", "insidebias": "InsideBias",
          "tradeoff": "Accuracy / fairness trade-off",
          "distances": "Distance to the baseline (energy distance, permutation test)"}


@dataclass
class Section:
    """One section as people read it: title, paragraphs, an optional table and figure."""

    title: str
    text: list[str]
    table: tuple[list[str], list[list[str]]] | None = None
    figure: str | None = None


# ---------------------------------------------------------------- files


def write_report_files(out: Path, summary: dict[str, Any]) -> None:
    """``summary.json``, ``index.md`` and ``index.html`` of a JSON-ready ``summary`` in folder ``out``."""
    sections = section_views(summary)
    text = json.dumps(summary, indent=1, ensure_ascii=False, allow_nan=False)  # NaN must be None already
    write_text_atomic(out / "summary.json", text)
    write_text_atomic(out / "index.md", markdown(summary, sections))
    write_text_atomic(out / "index.html", html_page(summary, sections))


# ---------------------------------------------------------------- sections in words


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mean_se(stats: dict[str, Any], digits: int = 3) -> str:
    if stats["mean"] is None:
        return "–"
    return f"{stats['mean']:.{digits}f} ± {stats['se']:.{digits}f}"


def _level_counts(counts: dict[str, int]) -> str:
    """Models per bias level, or only how many levels when they were sampled (too many to list)."""
    if len(counts) > 6:
        return f"{len(counts)} levels"
    return ", ".join(f"{level}: {n}" for level, n in counts.items())


def section_views(summary: dict[str, Any]) -> list[Section]:
    """Every section of ``summary`` in report order, in words and tables."""
    views = []
    for name in SECTION_ORDER:
        part = summary[name]
        if isinstance(part, dict) and "skipped" in part:
            view = Section(TITLES[name], [f"Skipped: {part['skipped']}."])
        else:
            view = _WORDS[name](part, summary)
        view.figure = summary["figures"].get(name)
        views.append(view)
    return views


def _groups_words(groups: list[dict[str, Any]], summary: dict[str, Any]) -> Section:
    header = ["group", "regularizer", "γ", "models", f"per {summary['bias_level']}",
              "unbiased acc", "group-acc gap", "leakage"]
    rows = [[g["label"] + (" (baseline)" if g["is_baseline"] else ""), g["regularizer"],
             "–" if g["regularizer"] == VANILLA else ", ".join(f"{v:g}" for v in g["gammas"]),
             str(g["n_models"]), _level_counts(g["bias_level_counts"]),
             _mean_se(g["unbiased_acc"]), _mean_se(g["group_acc_gap"]), _mean_se(g["leakage"])]
            for g in groups]
    text = [f"{summary['n_done']} done models of {summary['n_models']} in {len(groups)} groups "
            f"(regularizer, γ). Baseline: **{summary['baseline']['label']}**. Accuracy, gap and leakage are "
            "means ± standard error over the group's models; the gap is max − min of the per-group accuracy "
            "on the unbiased test set, leakage the accuracy of a fresh probe predicting the sensitive group "
            "from the bottleneck."]
    return Section(TITLES["groups"], text, (header, rows))


def _detector_words(part: dict[str, Any], summary: dict[str, Any]) -> Section:
    score_name, classes = part["score_name"], part["classes"]
    text = [f"Detector `{part['detector']}` (target `{part['target']}`, classes {', '.join(classes)}) "
            f"from `{part['path']}`, scored on {len(part['per_model']['row'])} models. Left: per group, the "
            f"distribution of {score_name}, points coloured by the model's true label"
            + (" (a regularizer that hides bias pulls its biased models' scores down)"
               if score_name == "P(biased)" else "")
            + "; right: the share of each predicted class, with the detector's accuracy per group.",
            *part["notes"]]
    header = ["group", "models", f"mean {score_name}", "accuracy"]
    table = [[label, str(e["score"]["n"]), _fmt(e["score"]["mean"]), _fmt(e.get("accuracy"))]
             for label, e in part["per_group"].items()]
    return Section(TITLES["detector"], text, (header, table))


def _projection_words(part: dict[str, Any], summary: dict[str, Any]) -> Section:
    text = [f"PCA of the `{part['feature_kind']}` weight features of every done model, each feature "
            f"standardised over the zoo ({summary['n_features_used']} features vary). Left: coloured by "
            f"group (large markers: group means); right: coloured by {summary['bias_level']}. Groups that "
            "sit apart from the baseline changed the weights in a way these features see."]
    return Section(TITLES["projection"], text)


def _shift_words(part: dict[str, Any], summary: dict[str, Any]) -> Section:
    text = ["Per tensor of the layout, averaged over each group's models and compared with the baseline's "
            "average: the mean weight's shift in units of the baseline's weight std, and the relative "
            "change of the weights' std and L2 norm. Red: larger than the baseline; blue: smaller."]
    return Section(TITLES["layer_shifts"], text)


def _colour_words(part: dict[str, Any], summary: dict[str, Any]) -> Section:
    text = ["How strongly the first-layer filters weigh colour against brightness. **Chromatic energy "
            "fraction**: each filter's kernel per input channel is split into its mean over the R, G, B "
            "channels (brightness) and the rest (colour); the fraction is Σ‖w − w̄‖² / Σ‖w‖² over all "
            f"filters: 0 is colour-blind, 1 pure colour opponency, and freshly initialised models sit at "
            f"{part['init_reference']:.3f} (dotted line). A colour shortcut raises it; a regularizer that "
            "removes colour from the bottleneck may or may not lower it here. **Flat-colour contrast** "
            "(weight units): how differently a filter answers flat patches of two primaries, averaged over "
            "filters and the three pairs."]
    header = ["group", "chromatic fraction", "flat-colour contrast"]
    table = [[label, _mean_se(e["chromatic_fraction"], 3), _mean_se(e["flat_colour_contrast"], 4)]
             for label, e in part["per_group"].items()]
    return Section(TITLES["colour_sensitivity"], text, (header, table))


def _insidebias_words(part: dict[str, Any], summary: dict[str, Any]) -> Section:
    categories = list(next(iter(part["per_group"].values()))["lowest_group_share"])
    text = [f"InsideBias (Serna et al., ICPR 2020) on {part['probes_per_group']} probe faces per group from "
            f"the balanced test set: Λ is each group's mean peak activation in {part['layer']} over the "
            "best-served group's; a low min Λ flags a model that under-learned a group. Left: min Λ per "
            "model; right: which group is lowest.", *part["notes"]]
    header = ["group", "min Λ", *[f"lowest: {c}" for c in categories]]
    table = [[label, _mean_se(e["min_ratio"], 3), *[f"{e['lowest_group_share'][c]:.0%}" for c in categories]]
             for label, e in part["per_group"].items()]
    return Section(TITLES["insidebias"], text, (header, table))


def _tradeoff_words(part: dict[str, Any], summary: dict[str, Any]) -> Section:
    text = ["Unbiased accuracy against two fairness measures the zoo records: the group-accuracy gap "
            "(max − min accuracy over the sensitive groups, unbiased test set; lower is fairer) and "
            f"representation leakage (a fresh probe's accuracy predicting the group from the bottleneck; "
            f"chance {part['leakage_chance']:.2f}, lower is fairer). Small points: models; large: group "
            "means ± s.e. Up and to the left is better."]
    return Section(TITLES["tradeoff"], text)


def _distance_words(part: dict[str, Any], summary: dict[str, Any]) -> Section:
    n_permutations = part["n_permutations"]
    text = ["Energy distance 2E‖X−Y‖ − E‖X−X′‖ − E‖Y−Y′‖ between each group's standardised weight "
            "features (the projection's features) and the baseline's; 0 means the same distribution. The "
            f"p-value comes from {n_permutations} seeded permutations of the group labels (p-Holm adjusts "
            "for the number of groups tested); the tick on each bar is the 95th percentile of its "
            "permutation null. The last row splits the baseline into two random halves: its p-value should "
            "not be small."]
    header = ["group", "models", "energy distance", "null 95%", "p", "p (Holm)"]
    table = []
    for label, r in [*part["per_group"].items(), ("baseline split-half", part["baseline_split_half"])]:
        if "skipped" in r:
            table.append([label, "", "", "", r["skipped"], ""])
        else:
            table.append([label, f"{r['n_group']} vs {r['n_baseline']}", f"{r['energy_distance']:.4f}",
                          f"{r['null_q95']:.4f}" if n_permutations else "", f"{r['p_value']:.4f}",
                          _fmt(r.get("p_holm"), 4)])
    return Section(TITLES["distances"], text, (header, table))


_WORDS: dict[str, Callable[[Any, dict[str, Any]], Section]] = {
    "groups": _groups_words, "detector": _detector_words, "projection": _projection_words,
    "layer_shifts": _shift_words, "colour_sensitivity": _colour_words, "insidebias": _insidebias_words,
    "tradeoff": _tradeoff_words, "distances": _distance_words}


# ---------------------------------------------------------------- Markdown and HTML


def markdown(summary: dict[str, Any], sections: list[Section]) -> str:
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


def html_page(summary: dict[str, Any], sections: list[Section]) -> str:
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
