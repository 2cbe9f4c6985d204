"""The sources' published numbers and training recipes, as data.

What the evidence compares fairtrain against (docs/evidence.md; DESIGN §2 and §4): each
method's reported accuracy on its benchmark, and the recipe its source trained with, in the
trainer's :class:`~modelzoo.config.ModelConfig` field names, so a run can take a source's
whole protocol. Numbers are percentages, as the papers print them.

Example
-------
>>> from fairtrain.references import published
>>> published("biased_mnist", 0.99)["end"]
96.0
>>> published("colored_mnist", 0.021)
{}
"""

from __future__ import annotations

import math

__all__ = ["NDR_TABLE_I", "PROTOCOLS", "PUBLISHED", "published"]

# Training recipes: ReBias's for Biased-MNIST (EnD's code uses the same), and LNTL's for
# ColoredMNIST. LNTL unlearns from a baseline trained 100 epochs at lr 0.01 (its
# baseline_train.sh), then trains 100 more at 1e-3 (train.sh), each with ×0.1 every 40 epochs:
# a 100-epoch warm-up.
PROTOCOLS: dict[str, dict[str, float | int | str]] = {
    "rebias": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 256, "epochs": 80,
               "lr_schedule": "step", "lr_step": 20, "lr_decay": 0.1, "val_size": 5000, "select": "best_val"},
    "lntl": {"optimizer": "sgd", "lr": 1e-3, "weight_decay": 5e-4, "batch_size": 128, "epochs": 200,
             "warmup_epochs": 100, "warmup_lr": 1e-2, "lr_schedule": "step", "lr_step": 40, "lr_decay": 0.1},
}

# Unbiased-test accuracy (%) by task and bias level, per method.
PUBLISHED: dict[str, dict[float, dict[str, float]]] = {
    # By ρ: Bahng et al. 2020 (vanilla, ReBias, RUBi), Tartaglione et al. 2021 (EnD), Cerrato et
    # al. 2023 (BinaryBernoulli, BinaryMI).
    "biased_mnist": {
        0.995: {"vanilla": 72.1, "rebias": 76.0, "rubi": 90.4, "end": 93.9, "binary_bernoulli": 90.64,
                "binary_mi": 89.08},
        0.990: {"vanilla": 89.1, "rebias": 88.1, "rubi": 93.6, "end": 96.0, "binary_bernoulli": 96.02,
                "binary_mi": 88.54},
    },
    # By σ²: Kim et al. 2019 (the feidfoe/learning-not-to-learn README table): baseline, LNTL,
    # and "Gray", the baseline trained and tested on the images in grayscale.
    "colored_mnist": {
        0.02: {"vanilla": 40.55, "lntl": 81.85, "gray": 83.74},
        0.03: {"vanilla": 59.96, "lntl": 91.37},
        0.04: {"vanilla": 73.33, "lntl": 94.06},
        0.05: {"vanilla": 84.50, "lntl": 96.18},
    },
}

# NDR on MNIST odd/even (Tartaglione & Grangetto 2020, Table I, tap fc1): parity accuracy
# (a fraction here) and the term R, by γ.
NDR_TABLE_I: dict[float, dict[str, float]] = {0.0: {"accuracy": 0.9932, "R": 0.61},
                                              0.1: {"accuracy": 0.9915, "R": 0.11},
                                              1.0: {"accuracy": 0.9323, "R": 0.03}}


def published(task: str, level: float) -> dict[str, float]:
    """Every method's published accuracy (%) on ``task`` at bias ``level`` ({} if none)."""
    table = PUBLISHED.get(task, {})
    return next((row for key, row in table.items() if math.isclose(key, level, abs_tol=1e-9)), {})
