"""Detectors as real scikit-learn: clone, cross-validation, grid search, parameter validation,
NotFittedError, n_features_in_, scikit-learn's own estimator checks on the torch heads, detector
files that give back the same probabilities, and a public API that imports nothing heavy.

Weight rows are real digit-cnns (quarter width, so ~3,700 weights each) freshly initialised
with their own seeds; the "biased" half get their first convolution scaled up, a trace the
weight statistics see. No training is needed, so these tests are fast.
"""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.utils._param_validation import InvalidParameterError
from sklearn.utils.estimator_checks import parametrize_with_checks

import detector
from detector import names
from detector.battery import digit_battery
from detector.evaluate import zoo_features
from detector.files import load_detector, save_detector
from detector.heads import DeepSetsClassifier, LayerConvClassifier
from detector.models import DETECTORS, DetectorError, make_detector
from detector.ordinal import LogisticHead
from detector.transform import WeightFeatures
from detector.workflow import fit_on_zoo
from modelzoo.architectures import build_model, flatten, layout
from modelzoo.zoo import open_zoo
from tests.test_detector import write_weight_zoo

WIDTH = 0.25
FAST = {"layer_conv": {"epochs": 40}, "deepsets": {"epochs": 60}, "dense": {"max_iter": 50},
        "boosting": {"max_iter": 40}, "probe": {"C": 1.0}, "rescaled": {"C": 1.0},
        "hybrid": {"C": 1.0}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def weight_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(X, y, layout): n fresh digit-cnns; the odd ones ("biased") have conv1 scaled by 1.8."""
    rows = []
    for i in range(n):
        torch.manual_seed(1000 * seed + i)
        model = build_model("digit-cnn", WIDTH)
        if i % 2:
            with torch.no_grad():
                model.conv1.weight.mul_(1.8)
        rows.append(flatten(model))
    y = np.where(np.arange(n) % 2 == 1, "biased", "unbiased")
    return np.stack(rows), y, tuple(layout(model))


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, np.ndarray, tuple]:
    return weight_rows(48)


@pytest.fixture(scope="module")
def build(mnist):
    """``make_detector`` with what the probe detector needs besides the layout (a small battery)."""
    battery = digit_battery("colored_mnist", mnist.test_images, mnist.test_labels, per_class=2, steps=3)

    def make(name: str, slots, **params):
        context = {"arch": "digit-cnn", "battery": battery} if name in ("probe", "hybrid") else {}
        return make_detector(name, slots, **context, **params)
    return make


def test_names_for_the_command_line_match_the_registries() -> None:
    assert tuple(DETECTORS) == names.DETECTOR_NAMES
    assert tuple(n for n, kind in DETECTORS.items() if kind.width_independent) == names.WIDTH_INDEPENDENT
    assert detector.TARGETS is names.TARGETS and detector.SPLITS is names.SPLITS


def test_clone_gives_an_unfitted_copy_with_equal_parameters(rows) -> None:
    X, y, slots = rows
    fitted = make_detector("deepsets", slots, **FAST["deepsets"]).fit(X, y)
    copy = clone(fitted)
    assert copy.get_params()["classifier__set_sizes"] == (6, 12, 16, 32)
    assert copy.get_params()["features__layout"] == slots and copy[-1] is not fitted[-1]
    with pytest.raises(NotFittedError):
        copy.predict(X)
    np.testing.assert_array_equal(copy.fit(X, y).predict_proba(X), fitted.predict_proba(X))  # seeded


def test_cross_val_score_and_grid_search_run_on_weight_rows(rows) -> None:
    X, y, slots = rows
    boosting = make_detector("boosting", slots, **FAST["boosting"])
    assert cross_val_score(boosting, X, y, cv=3).min() >= 0.9
    search = GridSearchCV(boosting, {"features__kind": ["stats", "first_layer"],
                                     "classifier__learning_rate": [0.05, 0.2]}, cv=3).fit(X, y)
    assert search.best_score_ >= 0.9 and len(search.cv_results_["params"]) == 4
    assert isinstance(search.best_estimator_, Pipeline)
    # The searched kind reached the feature step: its features have the matching column count.
    kind = search.best_params_["features__kind"]
    assert search.best_estimator_[-1].n_features_in_ == (130 if kind == "stats" else 30)
    deepsets = make_detector("deepsets", slots, **FAST["deepsets"])
    assert cross_val_score(deepsets, X, y, cv=2).mean() >= 0.8


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_predicting_before_fit_raises_not_fitted_error(name: str, rows, build) -> None:
    X, _, slots = rows
    with pytest.raises(NotFittedError):
        build(name, slots).predict(X)
    with pytest.raises(NotFittedError):
        build(name, slots).predict_proba(X)


@pytest.mark.parametrize(("estimator", "message"), [
    (DeepSetsClassifier(epochs=-1), "'epochs' parameter of DeepSetsClassifier must be an int in the range"),
    (LayerConvClassifier(lr=0.0), "'lr' parameter of LayerConvClassifier must be a float in the range"),
    (DeepSetsClassifier(element_dim=0), "'element_dim' parameter"),
    (WeightFeatures(kind="pixels", layout=()), "'kind' parameter of WeightFeatures must be one of"),
    (WeightFeatures(kind="stats+stats", layout=()), "each once"),
])
def test_bad_parameters_are_refused_before_any_work(estimator, message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message):
        estimator.fit(np.zeros((4, 3)), ["a", "b", "a", "b"])


def test_bad_parameters_in_a_pipeline_are_refused_by_name(rows) -> None:
    X, y, slots = rows
    with pytest.raises(InvalidParameterError, match="'epochs' parameter"):
        make_detector("deepsets", slots, epochs=-1).fit(X, y)
    with pytest.raises(DetectorError, match=r"has no parameter\(s\) \['epoch'\]"):
        make_detector("deepsets", slots, epoch=5)
    with pytest.raises(DetectorError, match="add up to 10 columns; X has 3"):
        LayerConvClassifier(layer_sizes=(4, 6)).fit(np.zeros((4, 3)), ["a", "b", "a", "b"])


def test_n_features_in_and_shape_checks(rows) -> None:
    X, y, slots = rows
    fitted = make_detector("boosting", slots, **FAST["boosting"]).fit(X, y)
    assert fitted.n_features_in_ == fitted[0].n_features_in_ == X.shape[1] == 3734
    assert fitted[-1].n_features_in_ == fitted[0].n_features_out() == 160
    assert list(fitted[0].get_feature_names_out()[:2]) == ["conv1.weight:mean", "conv1.weight:std"]
    with pytest.raises(DetectorError, match=r"shape \(models, 3734\).*got \(48, 3733\)"):
        fitted.predict(X[:, :-1])
    head = DeepSetsClassifier(epochs=5).fit(np.random.default_rng(0).normal(size=(8, 4)), [0, 1] * 4)
    assert head.n_features_in_ == 4
    with pytest.raises(ValueError, match="X has 3 features, but DeepSetsClassifier is expecting 4"):
        head.predict(np.zeros((2, 3)))


# scikit-learn's own estimator checks on the torch heads: all 55 of the legacy set, with fewer epochs
# than the defaults only for speed. Expected failures, each with its reason:
EXPECTED_FAILED_CHECKS = {
    "DeepSetsClassifier": {
        # With set_sizes=None every column is an element of one set, and a set function cannot see
        # which column an element came from: on blobs whose classes differ by column order it cannot
        # reach the 0.83 training accuracy asked. On weights that is the point (units of a layer
        # have no order); tests/test_detector.py checks it learns there.
        "check_classifiers_train": "a set function is blind to column order by design",
    },
}


def _expected_failures(estimator) -> dict[str, str]:
    return EXPECTED_FAILED_CHECKS.get(type(estimator).__name__, {})


@parametrize_with_checks([LayerConvClassifier(epochs=60), DeepSetsClassifier(epochs=100), LogisticHead()],
                         expected_failed_checks=_expected_failures)
def test_heads_pass_scikit_learns_estimator_checks(estimator, check) -> None:
    check(estimator)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_a_saved_detector_loads_back_with_identical_probabilities(name: str, rows, build,
                                                                  tmp_path: Path) -> None:
    X, y, slots = rows
    fitted = build(name, slots, **FAST[name]).fit(X[:32], y[:32])
    save_detector(fitted, tmp_path / "det", {"target": "biased"})
    loaded, meta = load_detector(tmp_path / "det")
    assert (meta["detector"], meta["target"], meta["classes"]) == (name, "biased", ["biased", "unbiased"])
    assert [type(step) for _, step in loaded.steps] == [type(step) for _, step in fitted.steps]
    assert loaded.get_params()["features__layout"] == slots
    np.testing.assert_array_equal(loaded.predict_proba(X[32:]), fitted.predict_proba(X[32:]))
    np.testing.assert_array_equal(loaded.predict(X[32:]), fitted.predict(X[32:]))
    assert not list(tmp_path.glob("det/*.pkl")) and not list(tmp_path.glob("det/*.pt"))


def test_chunked_fit_on_a_zoo_equals_fit_in_memory(tmp_path: Path) -> None:
    zoo = open_zoo(write_weight_zoo(tmp_path / "zoo.zarr", n_models=12))
    rows = np.flatnonzero(zoo.done)
    features = WeightFeatures("stats+first_layer", zoo.layout)
    in_memory = features.transform(zoo.weights(rows))
    np.testing.assert_array_equal(zoo_features(zoo, rows, features, chunk_models=5), in_memory)
    scattered = np.array([7, 0, 7, 3])
    np.testing.assert_array_equal(zoo_features(zoo, scattered, features, chunk_models=3),
                                  features.transform(zoo.weights(scattered)))
    y = detector.labels(zoo, "biased")[rows]
    for name in ("boosting", "deepsets"):
        chunked = fit_on_zoo(make_detector(name, zoo.layout, **FAST[name]), zoo, rows, y)
        whole = make_detector(name, zoo.layout, **FAST[name]).fit(zoo.weights(rows), y)
        np.testing.assert_array_equal(chunked.predict_proba(zoo.weights(rows)),
                                      whole.predict_proba(zoo.weights(rows)))
    with pytest.raises(DetectorError, match=r"raw features keep 49,562 numbers per model.*memory budget"):
        zoo_features(zoo, rows, WeightFeatures("raw", zoo.layout), memory_budget=1e5)


def test_the_package_docstring_examples_run() -> None:
    for module in (detector, detector.transform):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted >= 1 and result.failed == 0, module.__name__


def test_command_line_and_package_import_neither_torch_nor_sklearn_nor_ray() -> None:
    code = ("import sys, detector, detector.commands, detector.names; detector.DETECTORS; "
            "print([m for m in ('torch', 'sklearn', 'ray') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert sorted(detector.__all__) == detector.__all__ and "compare" in detector.__all__
    assert detector.insidebias.__name__ == "insidebias"  # the function, not a module of that name
