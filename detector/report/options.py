"""What the comparison report accepts: its options, their defaults, and the error it raises.

Kept free of the report's heavy imports (matplotlib, scikit-learn) so that the command line can
build its ``compare`` parser from these defaults without loading them.
"""

from __future__ import annotations

from detector.models import DetectorError

VANILLA = "none"
PROJECTION_KINDS = ("stats", "invariant", "first_layer")
DEFAULT_PERMUTATIONS = 999
MNIST_TASKS = ("colored_mnist", "biased_mnist")


class CompareError(DetectorError):
    """A zoo or option the comparison report cannot work with (no done models, a bad option,
    an output path that is not a folder)."""


def check_options(feature_kind: str, n_permutations: int, min_models: int, probes_per_group: int) -> None:
    """Refuse a bad option by its command-line name, before anything is read or written."""
    if feature_kind not in PROJECTION_KINDS:
        raise CompareError(f"--features {feature_kind!r}: use one of {list(PROJECTION_KINDS)}")
    for name, value, low in (("--permutations", n_permutations, 0), ("--min-models", min_models, 2),
                             ("--per-group", probes_per_group, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise CompareError(f"{name} must be an integer of at least {low}, got {value!r}")
