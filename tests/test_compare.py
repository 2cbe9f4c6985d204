"""The regularizer comparison report on real zoos: files, the numbers behind them, the CLI, bad input,
and the statistics it rests on (energy distance, Holm, chromatic fraction)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from detector.cli import main
from detector.compare import (
    CompareError,
    Group,
    choose_baseline,
    chromatic_fraction,
    compare_zoo,
    energy_test,
    holm,
    init_chromatic_fraction,
)
from detector.evaluate import zoo_weights
from detector.files import load_detector
from modelzoo.architectures import build_model, flatten, layout
from modelzoo.generate import generate
from modelzoo.spec import parse_spec
from modelzoo.store import ZooStore
from tests.conftest import tiny_spec_dict

MNIST_FIGURES = {"detector", "projection", "layer_shifts", "colour_sensitivity", "tradeoff", "distances"}


@pytest.fixture(scope="module")
def reg_zoo(ray_local, tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """16 tiny ColoredMNIST models: vanilla and NDR at two γ, two σ², both pools (one model per cell)."""
    raw = tiny_spec_dict(n_models=16, models_per_task=4)
    raw["sweep"] = {"sigma2": [0.02, 0.05], "pool": ["A", "B"], "regularizer": ["none", "ndr"],
                    "gamma": [0.1, 1.0]}
    out = tmp_path_factory.mktemp("compare") / "reg.zarr"
    assert generate(parse_spec(raw), out, data_dir=data_root, progress=False).n_done == 16
    return out


@pytest.fixture(scope="module")
def face_zoo(ray_local, tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """4 face models: favouring east Asians or balanced, vanilla or GRAD."""
    raw = {"zoo": {"task": "face_gender", "arch": "gender-cnn", "dataset": "utkface_crop_part1",
                   "n_models": 4, "seed": 2, "models_per_task": 2},
           "fixed": {"epochs": 2, "train_size": 120, "batch_size": 32, "skew": 0.8, "pool": "A",
                     "gamma": 0.1},
           "sweep": {"bias_group": ["east_asian", "balanced"], "regularizer": ["none", "grad"]}}
    out = tmp_path_factory.mktemp("compare") / "faces.zarr"
    assert generate(parse_spec(raw), out, data_dir=data_root, progress=False).n_done == 4
    return out


def _numbers(value, path: str = ""):
    """Every (path, number) in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}/{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path, value


def _check_files(out: Path, summary: dict) -> None:
    markdown, page = (out / "index.md").read_text(), (out / "index.html").read_text()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    for name in summary["figures"].values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in markdown and f'src="{name}"' in page
    assert all(math.isfinite(v) for _, v in _numbers(on_disk))


# ---------------------------------------------------------------- statistics


def test_energy_test_sees_a_shift_and_not_a_copy() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 5))
    same = energy_test(x, x.copy(), n_permutations=199, seed=1)
    assert same.statistic == pytest.approx(0.0, abs=1e-9) and same.p_value == 1.0
    shifted = energy_test(x, rng.standard_normal((20, 5)) + 1.5, n_permutations=199, seed=1)
    assert shifted.statistic > shifted.null_q95 > 0 and shifted.p_value == pytest.approx(1 / 200)
    null = energy_test(x, rng.standard_normal((20, 5)), n_permutations=199, seed=1)
    assert null.p_value > 0.05 and null.statistic >= 0
    assert energy_test(x, x + 1.5, 99, seed=3) == energy_test(x, x + 1.5, 99, seed=3)  # seeded
    with pytest.raises(CompareError, match=r"one width, got shapes \(20, 5\) and \(3, 4\)"):
        energy_test(x, np.zeros((3, 4)))
    with pytest.raises(CompareError, match="n_permutations must be a non-negative int"):
        energy_test(x, x, n_permutations=-1)


def test_holm_matches_a_hand_computation() -> None:
    # Sorted 0.01, 0.02, 0.04 → 3·0.01, max(0.03, 2·0.02), max(0.04, 1·0.04); order restored.
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_chromatic_fraction_from_colour_blind_to_opponent_filters() -> None:
    model = build_model("digit-cnn")
    slots = layout(model)
    weights = np.repeat(flatten(model)[None], 3, axis=0)
    conv1 = slice(slots[0].offset, slots[0].offset + slots[0].size)
    kernels = weights[:, conv1].reshape(3, *slots[0].shape)  # (models, filters, RGB, 5, 5)
    kernels[0] = kernels[0, :, :1]  # every channel the same: sees brightness only
    kernels[1] -= kernels[1].mean(axis=1, keepdims=True)  # channels sum to zero: colour only
    weights[:, conv1] = kernels.reshape(3, -1)
    fraction = chromatic_fraction(weights, slots)
    assert fraction[0] == pytest.approx(0.0, abs=1e-12) and fraction[1] == pytest.approx(1.0)
    assert 0.55 < fraction[2] < 0.8  # untouched initialisation: channels independent, about 2/3
    assert init_chromatic_fraction("digit-cnn", 1.0) == pytest.approx(2 / 3, abs=0.03)


def test_without_vanilla_the_lowest_gamma_group_with_enough_models_is_the_baseline() -> None:
    groups = [Group("ndr γ=0.01", "ndr", (0.01,), np.arange(2)),
              Group("ndr γ=1", "ndr", (1.0,), np.arange(5)),
              Group("end γ=0.5", "end", (0.5,), np.arange(5))]
    baseline, note = choose_baseline(groups, min_models=3)
    assert baseline.label == "end γ=0.5" and "no vanilla" in note and "end γ=0.5" in note
    vanilla = Group("none", "none", (1.0,), np.arange(3))
    assert choose_baseline([*groups, vanilla], min_models=3) == (vanilla, None)


# ---------------------------------------------------------------- the report on real zoos


def test_report_on_a_regularizer_zoo_with_a_detector(reg_zoo: Path, tmp_path: Path) -> None:
    detector = tmp_path / "det"
    assert main(["detector", "train", str(reg_zoo), "--target", "biased", "--out", str(detector)]) == 0
    out = tmp_path / "report"
    summary = compare_zoo(reg_zoo, out, detector, n_permutations=99, progress=False)
    _check_files(out, summary)
    assert set(summary["figures"]) == MNIST_FIGURES

    store = ZooStore.open(reg_zoo)
    groups = {g["label"]: g for g in summary["groups"]}
    assert {k: g["n_models"] for k, g in groups.items()} == {"none": 8, "ndr γ=0.1": 4, "ndr γ=1": 4}
    assert sorted(r for g in groups.values() for r in g["rows"]) == list(range(16))
    assert summary["baseline"] == {"label": "none", "is_vanilla": True, "note": None}
    accuracy = store.field("metrics/unbiased_acc")
    for group in groups.values():
        assert group["unbiased_acc"]["mean"] == pytest.approx(float(accuracy[group["rows"]].mean()), rel=1e-6)

    # The detector was trained on pool A of this zoo: only pool B's 8 models are scored.
    scored = summary["detector"]["per_model"]
    assert sorted(scored["row"]) == list(np.flatnonzero(store.field("config/pool") == "B"))
    det, _ = load_detector(detector)
    proba = det.predict_proba(zoo_weights(store, np.array(scored["row"])))
    unbiased = list(det.classes_).index("unbiased")
    np.testing.assert_allclose(scored["score"], 1 - proba[:, unbiased], rtol=1e-5, atol=1e-6)
    assert any("held-out" in note for note in summary["notes"])

    for label in ("ndr γ=0.1", "ndr γ=1"):
        test = summary["distances"]["per_group"][label]
        assert test["energy_distance"] >= 0 and 1 / 100 <= test["p_value"] <= test["p_holm"] <= 1
        assert (test["n_group"], test["n_baseline"]) == (4, 8)
        shifts = summary["layer_shifts"]["values"][label]
        assert all(len(shifts[m]) == len(store.layout) for m in summary["layer_shifts"]["measures"])
    assert summary["distances"]["baseline_split_half"]["p_value"] > 0.05  # vanilla vs vanilla: no difference
    chroma = summary["colour_sensitivity"]["per_model"]["chromatic_fraction"]
    assert len(chroma) == 16 and all(0 < c < 1 for c in chroma)
    assert sum(summary["projection"]["explained_variance_ratio"]) <= 1
    assert "colored_mnist" in summary["insidebias"]["skipped"]


def test_cli_reports_groups_too_small_to_test(reg_zoo: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    argv = ["compare", str(reg_zoo), "--out", str(out), "--permutations", "49", "--min-models", "5",
            "--features", "stats"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'index.html'}: 3 groups of 16 models, baseline none" in printed
    summary = json.loads((out / "summary.json").read_text())
    _check_files(out, summary)
    assert summary["feature_kind"] == "stats" and summary["n_permutations"] == 49
    for label in ("ndr γ=0.1", "ndr γ=1"):
        assert "fewer than --min-models 5" in summary["distances"]["per_group"][label]["skipped"]
        assert any(f"'{label}' has 4 model(s)" in note for note in summary["notes"])
    assert summary["distances"]["baseline_split_half"]["n_permutations"] == 49
    assert "detector" not in summary["figures"] and summary["detector"] == {"skipped": "no --detector given"}


def test_cli_refuses_bad_input_with_one_line(reg_zoo: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    cases = [
        (["compare", str(tmp_path / "missing.zarr"), "--out", str(out)], "no zoo store here"),
        (["compare", str(reg_zoo), "--out", str(out), "--permutations", "-1"], "--permutations must be"),
        (["compare", str(reg_zoo), "--out", str(out), "--min-models", "1"], "--min-models must be"),
        (["compare", str(reg_zoo), "--out", str(out), "--detector", str(tmp_path)], "not a detector folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert not out.exists()
    afile = tmp_path / "file.txt"
    afile.write_text("keep me")
    assert main(["compare", str(reg_zoo), "--out", str(afile)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err and afile.read_text() == "keep me"


def test_zoo_without_vanilla_falls_back_with_a_note(ray_local, tmp_path: Path, data_root: Path) -> None:
    raw = tiny_spec_dict(n_models=4, models_per_task=2, regularizer="end", sigma2=0.02)
    raw["sweep"] = {"gamma": [0.1, 1.0], "reg.beta": [0.1, 0.5]}
    zoo = tmp_path / "end.zarr"
    generate(parse_spec(raw), zoo, data_dir=data_root, progress=False)
    summary = compare_zoo(zoo, tmp_path / "report", n_permutations=19, min_models=2, progress=False)
    _check_files(tmp_path / "report", summary)
    assert summary["baseline"]["label"] == "end γ=0.1" and not summary["baseline"]["is_vanilla"]
    assert "no vanilla" in summary["notes"][0]
    assert "no vanilla" in (tmp_path / "report" / "index.md").read_text()
    # Groups are (regularizer, γ): the two β values of each γ are pooled, and the report says so.
    assert "group 'end γ=1' pools models with different reg.beta values (0.1, 0.5)" in summary["notes"]
    assert summary["distances"]["per_group"]["end γ=1"]["n_baseline"] == 2
    assert "a split-half check needs 4+" in summary["distances"]["baseline_split_half"]["skipped"]


def test_face_zoo_report_has_insidebias_and_skips_it_without_data(face_zoo: Path, tmp_path: Path,
                                                                    data_root: Path) -> None:
    out = tmp_path / "report"
    summary = compare_zoo(face_zoo, out, n_permutations=19, min_models=2, data_dir=data_root,
                          probes_per_group=3, progress=False)
    _check_files(out, summary)
    assert "insidebias" in summary["figures"] and "colour_sensitivity" not in summary["figures"]
    inside = summary["insidebias"]
    assert inside["layer"] == "conv5" and set(inside["per_group"]) == {"none", "grad γ=0.1"}
    for entry in inside["per_group"].values():
        assert 0 < entry["min_ratio"]["min"] <= entry["min_ratio"]["max"] <= 1
        assert sum(entry["lowest_group_share"].values()) == pytest.approx(1.0)
    assert len(inside["per_model"]["lowest_group"]) == 4

    empty = tmp_path / "no_data"
    empty.mkdir()
    skipped = compare_zoo(face_zoo, tmp_path / "report2", n_permutations=19, min_models=2, data_dir=empty,
                          progress=False)
    assert "face probes could not be loaded" in skipped["insidebias"]["skipped"]
    assert any(note.startswith("InsideBias skipped") for note in skipped["notes"])
    assert "insidebias" not in skipped["figures"]
