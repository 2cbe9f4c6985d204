"""Zoo specs: configs are pure functions of (spec, index); bad specs name their key."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from modelzoo.config import ModelConfig
from modelzoo.spec import SpecError, load_spec, parse_spec
from tests.conftest import REPO, tiny_spec_dict


@pytest.mark.parametrize("name", sorted(path.name for path in (REPO / "examples").glob("*.toml")))
def test_example_specs_are_valid(name: str) -> None:
    spec = load_spec(REPO / "examples" / name)
    assert spec.task in ("colored_mnist", "biased_mnist", "face_gender") and spec.n_models >= 8


def test_configs_are_pure_and_cover_the_grid() -> None:
    spec = load_spec(REPO / "examples" / "digitwdb.toml")
    assert spec.config(17) == load_spec(REPO / "examples" / "digitwdb.toml").config(17)
    cells = [(spec.config(i).task_axes["sigma2"], spec.config(i).pool) for i in range(16)]
    assert len(set(cells[:8])) == 8 and cells[:8] == cells[8:]
    assert [spec.config(i).bias_level for i in range(16)] == [sigma2 for sigma2, _ in cells]
    lrs = {spec.config(i).lr for i in range(16)}
    assert len(lrs) == 16 and all(3e-4 <= lr <= 3e-3 for lr in lrs)
    assert all(spec.config(i).epochs in (1, 2, 3) for i in range(50))
    assert spec.config(0).seed != spec.config(1).seed
    with pytest.raises(IndexError):
        spec.config(spec.n_models)


def test_blocks_tile_the_models() -> None:
    spec = parse_spec(tiny_spec_dict(n_models=5, models_per_task=2))
    assert [list(b) for b in spec.blocks()] == [[0, 1], [2, 3], [4]]


def _broken(path: tuple[str, ...], value) -> dict:
    raw = copy.deepcopy(tiny_spec_dict())
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


@pytest.mark.parametrize(("path", "value", "message"), [
    (("zoo", "task"), "cifar", "zoo.task"),
    (("zoo", "arch"), KeyError, "zoo.arch: required"),
    (("zoo", "n_models"), 0, "zoo.n_models"),
    (("zoo", "n_models"), "ten", "zoo.n_models: expected int"),
    (("zoo", "colour"), 1, "zoo.colour: unknown key"),
    (("sweep", "sigma2"), [0.02, 1.5], "sweep.sigma2"),
    (("sweep", "sigma2"), [], "sweep.sigma2: must be a non-empty list"),
    (("sweep", "rho"), [0.99], "sweep.rho: unknown axis"),
    (("sweep", "pool"), ["C"], "sweep.pool"),
    (("fixed", "optimizer"), "lbfgs", "fixed.optimizer"),
    (("fixed", "epochs"), 0, "fixed.epochs"),
    (("fixed", "lr"), 1e-3, None),
    (("sample", "lr"), {"normal": [0, 1]}, "sample.lr"),
    (("sample", "seed"), {"log_uniform": [64, 8]}, "sample.seed.log_uniform"),
    (("sample", "optimizer"), {"uniform": [0, 1]}, "sample.optimizer.uniform"),
    (("hyper", "x"), 1, "hyper: unknown table"),
    (("sweep", "regularizer"), ["none", "ndr", "bogus"], "sweep.regularizer: unknown regularizer 'bogus'"),
    (("sweep", "regularizer"), ["ndr+grad"], "sweep.regularizer: composite names"),
    (("sweep", "regularizer"), ["none", "unsupervised+end", "binary_mi"], None),
    (("fixed", "gamma"), -0.5, "fixed.gamma"),
])
def test_invalid_specs_name_the_key(path, value, message) -> None:
    raw = _broken(path, value)
    if message is None:  # control: a valid edit passes
        parse_spec(raw)
        return
    with pytest.raises(SpecError, match=message.replace(".", r"\.")):
        parse_spec(raw)


def test_regularizer_options_are_axes(tmp_path: Path) -> None:
    toml = tmp_path / "options.toml"
    toml.write_text('''
[zoo]
task = "colored_mnist"
arch = "digit-cnn"
n_models = 4
[fixed]
sigma2 = 0.02
reg.alpha = 0.5
[sweep]
regularizer = ["end", "group_balanced"]
reg.per_class = [true, false]
''')
    spec = load_spec(toml)
    assert spec.axes[-2:] == ["reg.alpha", "reg.per_class"] and spec.axis_type("reg.per_class") is bool
    configs = [spec.config(i) for i in range(4)]
    assert {(c.regularizer, c.reg_options["per_class"]) for c in configs} == {
        ("end", True), ("end", False), ("group_balanced", True), ("group_balanced", False)}
    assert all(c.reg_options["alpha"] == 0.5 for c in configs)
    # The flat form is the store's columns: reg.<option> keys, and from_dict inverts it.
    flat = spec.config_values(1)
    assert flat == configs[1].to_dict() and {"reg.alpha", "reg.per_class"} <= set(flat)
    assert ModelConfig.from_dict("colored_mnist", flat) == configs[1]


@pytest.mark.parametrize(("tables", "message"), [
    ({"fixed": {"regularizer": "ndr", "reg": {"alpha": 0.5}}}, "fixed.reg.alpha: no regularizer"),
    ({"sweep": {"reg": {"beta": [0.1]}}}, "sweep.reg.beta: no regularizer in this spec (none)"),
    ({"fixed": {"regularizer": "end", "reg": {"alpha": [1, 2]}}}, "fixed.reg.alpha: a regularizer option"),
    ({"fixed": {"regularizer": "end"}, "sweep": {"reg": {"beta": [0.1, "x"]}}},
     "sweep.reg.beta: values must"),
    ({"fixed": {"regularizer": "end", "reg": 3}}, "fixed.reg: write regularizer options"),
])
def test_bad_regularizer_options_name_the_key(tables: dict, message: str) -> None:
    raw = tiny_spec_dict()
    for table, entries in tables.items():
        raw[table].update(entries)
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(raw)


def test_an_axis_given_twice_and_a_missing_bias_level_are_errors() -> None:
    raw = tiny_spec_dict()
    raw["fixed"]["pool"] = "A"
    with pytest.raises(SpecError, match=r"sweep\.pool: also given in fixed\.pool"):
        parse_spec(raw)
    raw = tiny_spec_dict()
    del raw["sweep"]["sigma2"]
    with pytest.raises(SpecError, match="sigma2: task colored_mnist needs its bias level"):
        parse_spec(raw)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[zoo\ntask = 1")
    with pytest.raises(SpecError, match=r"bad\.toml: not a TOML text file \(Expected"):
        load_spec(bad)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")


def test_cli_rejects_a_bad_spec_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from detector.cli import main  # the `weightbias` entry point, run in this process

    bad = tmp_path / "bad.toml"
    bad.write_text('[zoo]\ntask = "colored_mnist"\narch = "digit-cnn"\nn_models = 4\n'
                   '[sweep]\nsigma2 = [0.02, 2.0]\n')
    out = tmp_path / "never.zarr"
    assert main(["zoo", "generate", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "weightbias: error: sweep.sigma2: value 2.0 must be in (0, 1)" in err
    assert "Traceback" not in err and not out.exists()


def test_a_regularizer_option_it_refuses_fails_at_parse_time() -> None:
    raw = tiny_spec_dict(regularizer="grad")
    raw["sweep"]["reg.hidden"] = [8, -1]
    with pytest.raises(SpecError, match=r"^sweep\.reg\.hidden: regularizer grad refuses -1"):
        parse_spec(raw)
    # A store re-reading its own (already checked) spec skips building the regularizers.
    assert parse_spec(raw, build_regularizers=False).sweep["reg.hidden"] == [8, -1]


def test_a_regularizers_tap_is_a_spec_axis_checked_against_the_architecture() -> None:
    raw = tiny_spec_dict(regularizer="ndr")
    raw["sweep"]["reg.layer"] = ["conv1", "fc1"]
    raw["fixed"]["reg.activation"] = "pre"
    spec = parse_spec(raw)
    assert {spec.config(i).reg_options["layer"] for i in range(spec.n_models)} == {"conv1", "fc1"}
    assert spec.config_values(0)["reg.activation"] == "pre"  # a store column, like any option
    raw["sweep"]["reg.layer"] = ["conv1", "conv9"]
    with pytest.raises(SpecError, match=r"^sweep\.reg\.layer: regularizer ndr refuses 'conv9' "
                                        r"\(DigitCNN has no layer 'conv9'; available: \['conv1'"):
        parse_spec(raw)
    raw["sweep"]["reg.layer"] = ["conv1"]
    raw["fixed"]["reg.activation"] = "gelu"
    with pytest.raises(SpecError, match=r"^fixed\.reg\.activation: regularizer ndr refuses 'gelu'"):
        parse_spec(raw)


def test_model_configs_are_typed_values() -> None:
    spec = parse_spec({"zoo": {"task": "face_gender", "arch": "gender-cnn", "n_models": 2, "dataset": "x"},
                       "fixed": {"skew": 0.9, "regularizer": "end", "reg": {"alpha": 0.25}},
                       "sweep": {"bias_group": ["caucasian", "balanced"]}})
    config = spec.config(0)
    assert config.task_axes == {"bias_group": "caucasian", "skew": 0.9} and config.bias_level == "caucasian"
    assert config.reg_options == {"alpha": 0.25} and config.task_info.name == "face_gender"
    shorter = config.replace(epochs=1)
    assert shorter.epochs == 1 and config.epochs == 2 and shorter.replace(epochs=2) == config
    flat = config.to_dict()
    assert flat["reg.alpha"] == 0.25 and flat["bias_group"] == "caucasian" and "task_axes" not in flat
    assert ModelConfig.from_dict("face_gender", flat) == config
    with pytest.raises(TypeError):
        ModelConfig.from_dict("face_gender", flat | {"colour": 3})


def test_a_range_from_zero_to_minus_zero_is_the_point_zero() -> None:
    # Found by the property tests: -0.0 == 0.0 passes low <= high, but numpy refused to draw.
    raw = tiny_spec_dict(n_models=2)
    raw["sample"] = {"gamma": {"uniform": [0.0, -0.0]}}
    spec = parse_spec(raw)
    assert [spec.config(i).gamma for i in range(2)] == [0.0, 0.0]


def test_ends_form_is_a_spec_option_checked_by_the_regularizer() -> None:
    raw = tiny_spec_dict(regularizer="end")
    raw["sweep"]["reg.form"] = ["source", "pairwise"]
    spec = parse_spec(raw)
    assert {spec.config(i).reg_options["form"] for i in range(spec.n_models)} == {"source", "pairwise"}
    raw["sweep"]["reg.form"] = ["source", "paper"]
    with pytest.raises(SpecError, match=r"^sweep\.reg\.form: regularizer end refuses 'paper' "
                                        r"\(form must be one of"):
        parse_spec(raw)
