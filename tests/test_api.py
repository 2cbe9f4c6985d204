"""The public API: its examples run, its light half stays light, its layout table is the modules'.

* Every example (``>>>``) in the docstrings of modelzoo, fairtrain and detector runs and gives
  what it says (``doctest``, with ``...`` allowed), and modelzoo has examples at all.
* Opening a store and reading a spec through ``import modelzoo`` imports neither torch, nor
  scikit-learn, nor Ray: checked in a fresh interpreter, since this one has torch loaded.
* The torch-free layout table (:func:`modelzoo.layouts.arch_layout`) is exactly the layout of
  the torch modules at several widths.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import modelzoo
from modelzoo.architectures import build_model, layout
from modelzoo.errors import WeightbiasError
from modelzoo.layouts import ARCH_INFO, arch_layout
from tests.conftest import REPO, random_zoo

HEAVY = ("torch", "sklearn", "ray")


def _modules(package: str) -> list[str]:
    """The package and every submodule of it whose source holds an example, by file, so that a
    module under construction is still listed (and fails loudly if it does not import)."""
    root = REPO / package
    names = []
    for path in sorted(root.rglob("*.py")):
        if ">>>" in path.read_text(encoding="utf-8"):
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _doctests(name: str) -> doctest.TestResults:
    return doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, report=False)


@pytest.mark.slow  # the package example renders a ColoredMNIST pool and trains a model
def test_the_modelzoo_package_example_runs() -> None:
    failed, attempted = _doctests("modelzoo")
    assert attempted > 0, "modelzoo's front page has no example"
    assert failed == 0, "see the doctest report above"


@pytest.mark.parametrize("name", [n for n in _modules("modelzoo") if n != "modelzoo"])
def test_modelzoo_module_examples_run(name: str) -> None:
    failed, attempted = _doctests(name)
    assert failed == 0, f"{name}: {failed} of {attempted} examples failed (report above)"


def test_modelzoo_has_examples_beyond_its_front_page() -> None:
    expected = {"modelzoo", "modelzoo.spec", "modelzoo.architectures", "modelzoo.zoo"}
    assert expected <= set(_modules("modelzoo"))
    assert sum(_doctests(name).attempted for name in ("modelzoo.spec", "modelzoo.architectures")) > 0


@pytest.mark.parametrize("name", _modules("fairtrain") + _modules("detector"))
def test_fairtrain_and_detector_examples_run(name: str) -> None:
    failed, attempted = _doctests(name)
    assert failed == 0, f"{name}: {failed} of {attempted} examples failed (report above)"


def test_every_public_name_resolves_to_what_it_names() -> None:
    for package in (modelzoo, importlib.import_module("fairtrain")):
        for name in package.__all__:
            value = getattr(package, name)
            # A submodule of the same name must not shadow the function (modelzoo.generate).
            assert not isinstance(value, ModuleType), f"{package.__name__}.{name} is a module"
    assert modelzoo.generate.__module__ == "modelzoo.generation" and callable(modelzoo.generate)


def _all_modules(package: str) -> list[ModuleType]:
    root = importlib.import_module(package)
    return [root, *(importlib.import_module(info.name)
                    for info in pkgutil.walk_packages(root.__path__, f"{package}."))]


@pytest.mark.parametrize("package", ["modelzoo", "fairtrain"])
def test_every_error_a_user_can_meet_is_a_weightbias_error(package: str) -> None:
    classes = {cls for module in _all_modules(package)
               for _, cls in inspect.getmembers(module, inspect.isclass)}
    errors = {cls for cls in classes if issubclass(cls, Exception) and cls.__module__.startswith(package)}
    assert len(errors) >= (10 if package == "modelzoo" else 1), errors
    assert {cls.__name__ for cls in errors if not issubclass(cls, WeightbiasError)} == set()


# ----------------------------------------------------------------------------- light imports


def _small_store(path: Path, **fixed) -> Path:
    """Four digit-cnns (width 0.25) of random weights, two of them done."""
    spec = modelzoo.parse_spec({
        "zoo": {"task": "colored_mnist", "arch": "digit-cnn", "width": 0.25, "n_models": 4,
                "models_per_task": 2},
        "fixed": {"epochs": 1, **fixed},
        "sweep": {"sigma2": [0.02, 0.05]},
    })
    random_zoo(path, spec, n_done=2)
    return path


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _small_store(tmp_path_factory.mktemp("api") / "small.zarr", optimizer="sgd")


LIGHT_READ = """
import json, sys
import modelzoo

zoo = modelzoo.open_zoo(sys.argv[1])
report = zoo.verify()
facts = {
    "done": zoo.done.tolist(), "ok": report.ok, "n_checked": report.n_checked,
    "sigma2": zoo.column("config/sigma2").tolist(), "rows": zoo.weights([0, 1]).shape[0],
    "first": float(zoo.model_weights(0)[0]), "optimizer": zoo.config(1).optimizer,
    "info_done": zoo.info()["n_done"], "layout": len(zoo.layout),
    "example": modelzoo.load_spec(sys.argv[2]).n_models,
    "parsed": modelzoo.parse_spec({"zoo": {"task": "biased_mnist", "arch": "digit-cnn", "n_models": 2},
                                   "sweep": {"rho": [0.99, 0.1]}}).config(1).bias_level,
}
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "sklearn", "ray"})
print(json.dumps({"facts": facts, "heavy": heavy}))
"""


def test_reading_a_store_and_specs_imports_no_torch_sklearn_or_ray(small_store: Path) -> None:
    example = REPO / "examples" / "digitwdb.toml"
    assert "regularizer" not in example.read_text()
    run = subprocess.run([sys.executable, "-c", LIGHT_READ, str(small_store), str(example)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    facts = result["facts"]
    assert facts["done"] == [True, True, False, False] and facts["ok"] and facts["n_checked"] == 2
    assert facts["sigma2"] == [0.02, 0.05, 0.02, 0.05] and facts["rows"] == 2 and facts["info_done"] == 2
    assert facts["first"] == pytest.approx(float(modelzoo.open_zoo(small_store).model_weights(0)[0]))
    assert facts["optimizer"] == "sgd" and facts["layout"] == 10
    assert facts["example"] == modelzoo.load_spec(example).n_models and facts["parsed"] == 0.1
    assert result["heavy"] == [], f"reading a store or a spec imported {result['heavy']}"


def _heavy_imports(store: Path, code: str = LIGHT_READ) -> list[str]:
    run = subprocess.run([sys.executable, "-c", code, str(store), str(REPO / "examples" / "digitwdb.toml")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])["heavy"]


@pytest.mark.slow  # a fresh interpreter importing torch: 3-6 s
def test_the_probe_would_see_torch_if_it_were_imported(small_store: Path) -> None:
    """Control for the test above: building a spec's regularizers does import torch, and the
    probe reports it."""
    code = LIGHT_READ.replace('"sweep": {"rho": [0.99, 0.1]}}', '"sweep": {"rho": [0.99, 0.1]}, '
                              '"fixed": {"regularizer": "ndr"}}')
    assert code != LIGHT_READ
    assert "torch" in _heavy_imports(small_store, code)


def test_reading_a_zoo_with_a_regularizer_imports_no_torch(tmp_path: Path) -> None:
    store = _small_store(tmp_path / "fair.zarr", regularizer="end", reg={"alpha": 0.5})
    assert _heavy_imports(store) == []


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("width", [0.25, 0.5, 1, 1.5])
@pytest.mark.parametrize("arch", sorted(ARCH_INFO))
def test_the_torch_free_layout_is_the_modules_layout(arch: str, width: float) -> None:
    model = build_model(arch, width)
    assert arch_layout(arch, width) == layout(model)
    last = modelzoo.arch_layout(arch, width)[-1]
    assert last.offset + last.size == sum(t.numel() for t in model.state_dict().values())
    info = ARCH_INFO[arch]
    assert (info.input_shape, info.num_classes) == (model.input_shape, model.num_classes)
