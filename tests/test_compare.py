"""The regularizer comparison report on real zoos: files, the numbers behind them, the CLI, bad input,
and the statistics it rests on (energy distance, Holm, chromatic fraction); one section as a plain
dict, and the atomic writing of the report's files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from detector.cli import main
from detector.features import weight_features
from detector.files import load_detector
from detector.report import CompareError, compare
from detector.report.chroma import chromatic_fraction, init_chromatic_fraction
from detector.report.context import Context
from detector.report.sections_weights import distance_section
from detector.report.stats import Group, choose_baseline, energy_test, holm, standardise
from modelzoo.architectures import build_model, flatten, layout
from modelzoo.atomic import write_atomic
from modelzoo.generation import generate
from modelzoo.spec import parse_spec
from modelzoo.zoo import open_zoo
from tests.conftest import fill_disk, tiny_spec_dict

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


def _energy_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """2·E‖X−Y‖ − E‖X−X′‖ − E‖Y−Y′‖ straight from the definition (all pairs, numpy only)."""
    def mean_distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a[:, None] - b[None], axis=-1).mean())
    return 2 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y)


def _check_files(out: Path, summary: dict) -> None:
    markdown, page = (out / "index.md").read_text(), (out / "index.html").read_text()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    for name in summary["figures"].values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in markdown and f'src="{name}"' in page
    # Exactly the figures the summary names, and no temporary file of the atomic writes left over.
    assert {p.name for p in out.glob("*.png")} == set(summary["figures"].values())
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".png")) == [
        "index.html", "index.md", "summary.json"]


# ---------------------------------------------------------------- statistics


def test_energy_test_sees_a_shift_and_not_a_copy() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 5))
    same = energy_test(x, x.copy(), n_permutations=199, seed=1)
    assert same.statistic == pytest.approx(0.0, abs=1e-9) and same.p_value == 1.0
    y = rng.standard_normal((20, 5)) + 1.5
    shifted = energy_test(x, y, n_permutations=199, seed=1)
    assert shifted.statistic == pytest.approx(_energy_by_hand(x, y), rel=1e-12)
    assert shifted.statistic > shifted.null_q95 > 0 and shifted.p_value == pytest.approx(1 / 200)
    y = rng.standard_normal((20, 5))
    null = energy_test(x, y, n_permutations=199, seed=1)
    assert null.p_value > 0.05 and null.statistic == pytest.approx(_energy_by_hand(x, y), rel=1e-12)
    assert null.statistic < shifted.statistic
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


def test_distance_section_is_a_plain_dict_with_known_values() -> None:
    rng = np.random.default_rng(4)
    z = np.vstack([rng.standard_normal((6, 3)), rng.standard_normal((4, 3)) + 3.0,
                   rng.standard_normal((2, 3))])
    baseline = Group("none", "none", (0.0,), np.arange(6))
    far = Group("ndr γ=1", "ndr", (1.0,), np.arange(6, 10))
    small = Group("end γ=1", "end", (1.0,), np.arange(10, 12))
    group_of = np.array(["none"] * 6 + ["ndr γ=1"] * 4 + ["end γ=1"] * 2)
    # The section reads no zoo: everything it needs is in the context and the features.
    ctx = Context(zoo=None, groups=[baseline, far, small], baseline=baseline, rows=np.arange(12),
                  group_of=group_of, level=np.array(["0.02"] * 12), level_values=np.full(12, 0.02),
                  min_models=3, progress=False)
    part = distance_section(ctx, z, n_permutations=99, seed=0)
    assert json.loads(json.dumps(part, allow_nan=False)) == part  # plain JSON types only, no NaN
    tested = part["per_group"]["ndr γ=1"]
    assert tested["energy_distance"] == pytest.approx(_energy_by_hand(z[6:10], z[:6]), rel=1e-12)
    assert (tested["n_group"], tested["n_baseline"], tested["p_holm"]) == (4, 6, tested["p_value"])
    assert tested["p_value"] <= 0.05  # three standard deviations apart
    assert part["per_group"]["end γ=1"] == {"skipped": "'end γ=1' has 2 model(s), fewer than --min-models 3"}
    assert part["baseline_split_half"]["n_group"] + part["baseline_split_half"]["n_baseline"] == 6


def test_write_atomic_leaves_the_old_file_or_the_new_one_never_a_part(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"

    def fails_half_way(handle) -> None:
        handle.write(b'{"half": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fails_half_way)
    assert list(tmp_path.iterdir()) == []  # no 0-byte target, no temporary file
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fails_half_way)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    write_atomic(target, lambda handle: handle.write(b"new"))
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # as open() makes it, not private


# ---------------------------------------------------------------- the report on real zoos


@pytest.mark.slow
def test_report_on_a_regularizer_zoo_with_a_detector(reg_zoo: Path, tmp_path: Path) -> None:
    detector = tmp_path / "det"
    assert main(["detector", "train", str(reg_zoo), "--detector", "boosting", "--target", "biased",
                 "--out", str(detector)]) == 0
    out = tmp_path / "report"
    summary = compare(reg_zoo, out, detector, n_permutations=99, progress=False)
    _check_files(out, summary)
    assert set(summary["figures"]) == MNIST_FIGURES

    store = open_zoo(reg_zoo)
    groups = {g["label"]: g for g in summary["groups"]}
    assert {k: g["n_models"] for k, g in groups.items()} == {"none": 8, "ndr γ=0.1": 4, "ndr γ=1": 4}
    assert sorted(r for g in groups.values() for r in g["rows"]) == list(range(16))
    assert summary["baseline"] == {"label": "none", "is_vanilla": True, "note": None}
    accuracy = store.column("metrics/unbiased_acc")
    for group in groups.values():
        assert group["unbiased_acc"]["mean"] == pytest.approx(float(accuracy[group["rows"]].mean()), rel=1e-6)

    # The detector was trained on pool A of this zoo: only pool B's 8 models are scored.
    scored = summary["detector"]["per_model"]
    assert sorted(scored["row"]) == list(np.flatnonzero(store.column("config/pool") == "B"))
    det, _ = load_detector(detector)
    proba = det.predict_proba(store.weights(np.array(scored["row"])))
    unbiased = list(det.classes_).index("unbiased")
    np.testing.assert_allclose(scored["score"], 1 - proba[:, unbiased], rtol=1e-5, atol=1e-6)
    assert any("held-out" in note for note in summary["notes"])

    # The distances and the projection, recomputed from the weights: the report's own features
    # (invariant, standardised over the zoo) and the energy distance from its definition.
    weights = store.weights(np.arange(16))
    z = standardise(weight_features(weights, store.layout, "invariant").astype(np.float32))
    tests = summary["distances"]["per_group"]
    for label in ("ndr γ=0.1", "ndr γ=1"):
        test = tests[label]
        by_hand = _energy_by_hand(z[groups[label]["rows"]], z[groups["none"]["rows"]])
        assert test["energy_distance"] == pytest.approx(by_hand, rel=1e-6)
        assert (test["n_group"], test["n_baseline"]) == (4, 8)
        shifts = summary["layer_shifts"]["values"][label]
        assert all(len(shifts[m]) == len(store.layout) for m in summary["layer_shifts"]["measures"])
    # Holm over two tests by hand: the smaller p doubled, the larger not below it.
    low, high = sorted(tests.values(), key=lambda t: t["p_value"])
    assert low["p_holm"] == pytest.approx(min(1.0, 2 * low["p_value"]))
    assert high["p_holm"] == pytest.approx(max(low["p_holm"], high["p_value"]))
    assert summary["distances"]["baseline_split_half"]["p_value"] > 0.05  # vanilla vs vanilla: no difference
    colour = summary["colour_sensitivity"]
    np.testing.assert_allclose(colour["per_model"]["chromatic_fraction"],
                               chromatic_fraction(weights, store.layout))
    for label, group in groups.items():
        chroma = chromatic_fraction(weights[group["rows"]], store.layout)
        assert colour["per_group"][label]["chromatic_fraction"]["mean"] == pytest.approx(chroma.mean())
    projection = summary["projection"]
    pc1, pc2 = np.array(projection["per_model"]["pc1"]), np.array(projection["per_model"]["pc2"])
    ratio = projection["explained_variance_ratio"]
    assert np.array([np.var(pc1), np.var(pc2)]) / z.var(axis=0).sum() == pytest.approx(ratio, rel=1e-6)
    assert ratio[0] >= ratio[1] and abs(np.corrcoef(pc1, pc2)[0, 1]) < 1e-6
    assert "colored_mnist" in summary["insidebias"]["skipped"]


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert "is a file, not a folder" in capsys.readouterr().err and afile.read_text() == "keep me"
    assert main(["compare", str(reg_zoo), "--out", str(reg_zoo / "report")]) == 2  # inside the store
    assert "lies inside the Zarr store" in capsys.readouterr().err and not (reg_zoo / "report").exists()


@pytest.mark.slow
def test_zoo_without_vanilla_falls_back_with_a_note(ray_local, tmp_path: Path, data_root: Path) -> None:
    raw = tiny_spec_dict(n_models=4, models_per_task=2, regularizer="end", sigma2=0.02)
    raw["sweep"] = {"gamma": [0.1, 1.0], "reg.beta": [0.1, 0.5]}
    zoo = tmp_path / "end.zarr"
    generate(parse_spec(raw), zoo, data_dir=data_root, progress=False)
    summary = compare(zoo, tmp_path / "report", n_permutations=19, min_models=2, progress=False)
    _check_files(tmp_path / "report", summary)
    assert summary["baseline"]["label"] == "end γ=0.1" and not summary["baseline"]["is_vanilla"]
    assert "no vanilla" in summary["notes"][0]
    assert "no vanilla" in (tmp_path / "report" / "index.md").read_text()
    # Groups are (regularizer, γ): the two β values of each γ are pooled, and the report says so.
    assert "group 'end γ=1' pools models with different reg.beta values (0.1, 0.5)" in summary["notes"]
    assert summary["distances"]["per_group"]["end γ=1"]["n_baseline"] == 2
    assert "a split-half check needs 4+" in summary["distances"]["baseline_split_half"]["skipped"]


@pytest.mark.slow
def test_face_zoo_report_has_insidebias_and_skips_it_without_data(face_zoo: Path, tmp_path: Path,
                                                                    data_root: Path) -> None:
    out = tmp_path / "report"
    summary = compare(face_zoo, out, n_permutations=19, min_models=2, data_dir=data_root,
                      probes_per_group=3, progress=False)
    _check_files(out, summary)
    assert "insidebias" in summary["figures"] and "colour_sensitivity" not in summary["figures"]
    inside = summary["insidebias"]
    assert inside["layer"] == "conv5" and set(inside["per_group"]) == {"none", "grad γ=0.1"}
    assert len(inside["per_model"]["lowest_group"]) == 4
    # Each group's entry is its own models' numbers (per_model), not another group's.
    model = inside["per_model"]
    for label, entry in inside["per_group"].items():
        mine = [i for i, g in enumerate(model["group"]) if g == label]
        assert [model["row"][i] for i in mine] == {g["label"]: g["rows"] for g in summary["groups"]}[label]
        assert entry["min_ratio"]["mean"] == pytest.approx(np.mean([model["min_ratio"][i] for i in mine]))
        lowest = [model["lowest_group"][i] for i in mine]
        shares = {c: lowest.count(c) / len(mine) for c in entry["lowest_group_share"]}
        assert entry["lowest_group_share"] == shares

    empty = tmp_path / "no_data"
    empty.mkdir()
    skipped = compare(face_zoo, tmp_path / "report2", n_permutations=19, min_models=2, data_dir=empty,
                      progress=False)
    assert "face probes could not be loaded" in skipped["insidebias"]["skipped"]
    assert any(note.startswith("InsideBias skipped") for note in skipped["notes"])
    assert "insidebias" not in skipped["figures"]


def test_a_full_disk_leaves_no_partial_report(reg_zoo: Path, small_disk) -> None:
    mount = small_disk("1m")
    fill_disk(mount, leave=60 * 1024)  # room for a plot or two, not a whole report
    with pytest.raises(CompareError, match=r"cannot write the report \(No space left on device\)"):
        compare(reg_zoo, mount / "report", n_permutations=9, progress=False)
    assert sorted(p.name for p in mount.iterdir()) == ["filler"]


def test_a_lost_per_group_chunk_is_refused_not_averaged_over(reg_zoo: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "zoo.zarr"
    shutil.copytree(reg_zoo, copy)
    (copy / "metrics" / "per_group_acc" / "c" / "0" / "0").unlink()  # models 0..3 read back as NaN
    with pytest.raises(CompareError, match=r"models \[0, 1, 2, 3\] have no per-group accuracy"):
        compare(copy, tmp_path / "report", n_permutations=9, progress=False)
    assert not (tmp_path / "report").exists()
