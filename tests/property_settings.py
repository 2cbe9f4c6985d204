"""Shared settings of the property-based tests (hypothesis): how many cases each property runs,
which errors count as the project's own, and the odd strings both doors get."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from modelzoo.errors import WeightbiasError

# How many generated cases each property runs (hypothesis may stop earlier when it has
# exhausted a small search space). With these the two property files took 25-40 s on the 2-core
# machine at load average 7-10; runs of 10x as many cases found nothing more.
MAX_EXAMPLES = {"spec": 300, "spec_values": 300, "checkpoint_content": 120, "checkpoint_bytes": 300,
                "pickle_payload": 40, "h5_content": 80, "detector_folder": 60, "cli_args": 120}
# The project's own errors (checkpoint, recognition, detector, architecture): all WeightbiasErrors.
PROJECT_ERRORS = (WeightbiasError,)


def property_settings(name: str) -> settings:
    return settings(max_examples=MAX_EXAMPLES[name], deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# Names a user might type, mistype or paste: empty, reserved, path-like, over-long, non-ASCII.
weird_text = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["", " ", "A", "B", "C", "all", "none", "grad", "adam", "lbfgs", "digit-cnn",
                     "gender-cnn", "resnet", "cifar", "\x00", "ü", "../../etc/passwd", "a" * 300,
                     "reg.", "reg.alpha", "zoo.task", "colored_mnist", "face_gender", "balanced"]),
)
