"""The behaviour ceiling of a zoo: how well its models' *measured behaviour* tells their labels
apart across pools, which bounds what any detector that reads behaviour can reach.

Part of the detector stage (store → **detector** → report), as an evaluation beside the
detectors (DESIGN §6, "Ceiling"). A scaled logistic regression is fitted on the stored
per-model metrics of one training pool (unbiased, biased, per-class and per-group accuracy,
colour or group leakage) and scored on the other pool, both ways, with the same
:class:`~detector.evaluate.Scores` (and 95% interval) as a detector's row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from detector.evaluate import as_zoo, labels, rows_at_levels, scores
from detector.models import DetectorError
from modelzoo.zoo import Zoo

BEHAVIOUR = ("unbiased_acc", "biased_acc", "per_class_acc", "per_group_acc", "leakage")


def behaviour_matrix(zoo: Zoo, rows: np.ndarray) -> np.ndarray:
    """The models' stored behaviour, one row each: the :data:`BEHAVIOUR` metrics side by side
    (per-class and per-group accuracies one column each; a group absent from the test images,
    NaN, counts as the mean of the others)."""
    columns = []
    for name in BEHAVIOUR:
        values = zoo.column(f"metrics/{name}")[rows].astype(np.float64)
        values = values.reshape(len(rows), -1)
        with np.errstate(all="ignore"):
            fill = np.nanmean(values, axis=1, keepdims=True)
        columns.append(np.where(np.isnan(values), np.nan_to_num(fill, nan=0.0), values))
    return np.hstack(columns)


def behaviour_ceiling(zoo_or_path: Zoo | str | Path, target: str = "bias_level",
                      levels: list[str] | None = None) -> dict[str, Any]:
    """Cross-pool scores of a classifier on the models' behaviour, trained on each pool and
    scored on the other: ``{"A→B": scores, "B→A": scores, "features": [...]}``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    zoo = as_zoo(zoo_or_path)
    done = rows_at_levels(zoo, np.flatnonzero(zoo.done), levels)
    y, behaviour = labels(zoo, target)[done], behaviour_matrix(zoo, done)
    pools = zoo.column("config/pool")[done]
    if len(set(pools.tolist())) < 2:
        raise DetectorError(f"{zoo.path}: a behaviour ceiling needs models of two pools; it has "
                            f"{sorted(set(pools.tolist()))}")
    result: dict[str, Any] = {"target": target, "levels": levels, "features": list(BEHAVIOUR)}
    for train_pool, test_pool in (("A", "B"), ("B", "A")):
        fit, test = pools == train_pool, pools == test_pool
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(behaviour[fit], y[fit])
        result[f"{train_pool}→{test_pool}"] = scores(y[test], model.predict_proba(behaviour[test]),
                                                     model.classes_).to_dict()
    return result
