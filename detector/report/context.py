"""What every section of the report shares: the done models in their groups, their bias levels,
and the one chunked pass over their weights that every weight section draws on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from detector.evaluate import labels
from detector.features import feature_names, weight_features
from detector.report._read import CHUNK_MODELS, weight_blocks
from detector.report.chroma import chromatic_fraction
from detector.report.options import PROJECTION_KINDS, CompareError
from detector.report.stats import Group
from fairtrain.regularizers import regularizer_options
from modelzoo.zoo import Zoo


@dataclass
class Context:
    """The zoo, its groups (the baseline first: it leads every table and plot), and per done model,
    ascending: its group label and bias level."""

    zoo: Zoo
    groups: list[Group]
    baseline: Group
    rows: np.ndarray  # every done model, ascending
    group_of: np.ndarray  # group label per row
    level: np.ndarray  # bias level per row, as strings
    level_values: np.ndarray  # bias level per row as stored (float or str)
    min_models: int
    progress: bool

    def position(self, rows: np.ndarray) -> np.ndarray:
        """Where models ``rows`` sit in :attr:`rows`."""
        return np.searchsorted(self.rows, rows)

    def members(self, group: Group) -> np.ndarray:
        """Boolean mask over :attr:`rows` of ``group``'s models."""
        return self.group_of == group.label


def make_context(zoo: Zoo, groups: list[Group], baseline: Group, min_models: int,
                 progress: bool) -> Context:
    groups = [baseline, *(g for g in groups if g is not baseline)]
    rows = np.sort(np.concatenate([g.rows for g in groups]))
    group_of = np.empty(len(rows), dtype=object)
    for group in groups:
        group_of[np.searchsorted(rows, group.rows)] = group.label
    level_values = zoo.column(f"config/{zoo.spec.bias_level}")[rows]
    return Context(zoo, groups, baseline, rows, group_of.astype(str), labels(zoo, "bias_level")[rows],
                   level_values, min_models, progress)


def group_notes(ctx: Context) -> list[str]:
    """Small groups, single-group zoos, and reg.* options a group's regularizer takes but its models
    do not share (groups are (regularizer, γ) only, so such models are pooled)."""
    notes = [f"group '{g.label}' has {g.n} model(s), fewer than --min-models {ctx.min_models}: it is shown "
             "but not tested for a distance" for g in ctx.groups if g.n < ctx.min_models]
    if len(ctx.groups) == 1:
        notes.append(f"the zoo has one group only ('{ctx.groups[0].label}'): there is nothing to compare it "
                     "with, so shifts and distances are left out")
    for axis in (a for a in ctx.zoo.config_fields() if a.startswith("reg.")):
        values = ctx.zoo.column(f"config/{axis}")
        for group in ctx.groups:
            takes = axis.removeprefix("reg.") in regularizer_options(group.regularizer)
            if takes and len(np.unique(values[group.rows])) > 1:
                notes.append(f"group '{group.label}' pools models with different {axis} values "
                             f"({', '.join(map(str, np.unique(values[group.rows])))})")
    return notes


@dataclass(frozen=True)
class WeightFeatures:
    """Per done model: the projection's features, the per-tensor ``stats``, and for colour tasks the
    ``first_layer`` features and the chromatic fraction (else None)."""

    projected: np.ndarray
    stats: np.ndarray
    first_layer: np.ndarray | None
    chroma: np.ndarray | None


def read_features(zoo: Zoo, rows: np.ndarray, kind: str, colour: bool,
                  progress: bool = True) -> WeightFeatures:
    """One chunked pass over the weights of ``rows`` for every weight feature the report needs:
    only one chunk of weights is in memory at a time."""
    if kind not in PROJECTION_KINDS:
        raise CompareError(f"unknown feature kind {kind!r} for the projection; use one of "
                           f"{list(PROJECTION_KINDS)}")
    slots = zoo.layout
    try:
        n_stats = len(feature_names(slots, "stats"))
        kinds = {kind, "stats"} if kind != "invariant" else {"invariant"}  # invariant starts with stats
        if colour:
            kinds.add("first_layer")
        widths = {k: len(feature_names(slots, k)) for k in kinds}
    except ValueError as err:
        raise CompareError(f"{zoo.path}: the {zoo.spec.arch} layout has no layer-wise features "
                           f"({err})") from err
    out = {k: np.empty((len(rows), width), dtype=np.float32) for k, width in widths.items()}
    chroma = np.empty(len(rows)) if colour else None
    n_chunks = -(-len(rows) // CHUNK_MODELS)
    for start, block in tqdm(weight_blocks(zoo, rows), total=n_chunks, desc="weight features",
                             unit="chunk", disable=not progress):
        stop = start + len(block)
        for k in kinds:
            out[k][start:stop] = weight_features(block, slots, k)
        if chroma is not None:
            chroma[start:stop] = chromatic_fraction(block, slots)
    stats = out["stats"] if "stats" in out else out["invariant"][:, :n_stats]
    return WeightFeatures(out[kind], stats, out.get("first_layer"), chroma)
