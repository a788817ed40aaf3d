"""The package surface: lazy top-level names, no torch on import or `--help`, bundled recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import apretrieval
from apretrieval.configs import bundled_recipes, recipe_path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    """sys.modules of a fresh interpreter after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_import_and_help_do_not_import_torch():
    for code in (
        "import apretrieval",
        "import apretrieval; apretrieval.__version__; dir(apretrieval)",
        "from apretrieval.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
        "    pass",
        "from apretrieval.cli import main; main(['--version'])",
    ):
        loaded = _modules_after(code)
        assert "torch" not in loaded, code
        assert "numpy" not in loaded, code  # nothing heavy at all


def test_every_public_name_imports_and_is_the_defining_modules_object():
    for name in apretrieval.__all__:
        value = getattr(apretrieval, name)
        if name == "__version__":
            assert isinstance(value, str)
            continue
        module = __import__(apretrieval._PUBLIC[name], fromlist=[name])
        assert value is getattr(module, name), name
        assert value.__module__ == module.__name__, name  # the owner, not a re-export
    assert set(apretrieval.__all__) == {*apretrieval._PUBLIC, "__version__"}
    assert dir(apretrieval) == sorted(apretrieval.__all__)  # no Any, TYPE_CHECKING, importlib


def test_the_names_of_the_public_contract_import():
    from apretrieval import (  # noqa: F401  (the contract of the design notes)
        APLoss,
        GeM,
        TrainConfig,
        average_precision,
        build_model,
        evaluate_revisited,
        knn,
        load_model,
        quantized_ap,
        train,
    )

    assert APLoss.__name__ == "APLoss" and callable(quantized_ap)


def test_submodules_and_unknown_names():
    assert apretrieval.pooling.GeM is apretrieval.GeM  # attribute access imports a submodule
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        apretrieval.nonexistent  # noqa: B018
    with pytest.raises(ImportError):
        exec("from apretrieval import nonexistent")


def test_recipes_ship_inside_the_package():
    recipes = bundled_recipes()
    assert {"cpu-small", "demo", "landmarks-clean-r101-gem-ap"} <= set(recipes)
    for path in recipes.values():
        assert path.parent == Path(apretrieval.__file__).parent / "configs"
    assert recipe_path("cpu-small") == recipes["cpu-small"]
    assert recipe_path("cpu-small.yaml") == recipes["cpu-small"]
    with pytest.raises(ValueError, match=r"bundled recipes: .*cpu-small"):
        recipe_path("cpu-smal")


def test_a_file_path_wins_over_a_bundled_name(tmp_path, monkeypatch):
    own = tmp_path / "cpu-small.yaml"
    own.write_text("steps: 3\n")
    monkeypatch.chdir(tmp_path)
    assert recipe_path("cpu-small.yaml") == Path("cpu-small.yaml")
    assert recipe_path(own) == own


def test_pyproject_packages_the_recipes():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"configs/*.yaml"' in text  # package-data of apretrieval: src/apretrieval/configs
    assert (ROOT / "src" / "apretrieval" / "configs" / "cpu-small.yaml").is_file()
    assert not (ROOT / "configs").exists()
