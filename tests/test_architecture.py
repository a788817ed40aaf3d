"""The rules of ARCHITECTURE.md that import-linter cannot state: each name is imported from the
module that defines it, no module-level ``__getattr__`` routes names (the lazy top-level
package aside), command modules keep torch out of ``--help``, and no module is too long."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from apretrieval.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "apretrieval"
# The one statement of the module-size rule: past ~400 lines a module becomes a package.
MAX_LINES = 450


def _module_file(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _defined(name: str) -> set[str]:
    """Names a module defines at its top (classes, functions, assignments, also under ``if`` /
    ``try``), plus the sub-modules of a package; imported names are not counted."""
    path = _module_file(name)
    assert path is not None, f"no module {name}"
    out: set[str] = set()
    body = list(ast.parse(path.read_text(encoding="utf-8")).body)
    for node in list(body):
        if isinstance(node, ast.If | ast.Try):
            body += node.body
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    if path.name == "__init__.py":
        out |= {p.stem for p in path.parent.glob("*.py")}
        out |= {p.name for p in path.parent.iterdir() if (p / "__init__.py").is_file()}
    return out


def _python_files() -> list[Path]:
    return sorted(p for d in ("src", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py"))


def test_every_name_is_imported_from_the_module_that_defines_it():
    wrong = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            # `from apretrieval import X`: the lazy public names (tests/test_package.py)
            if not node.module.startswith("apretrieval.") or node.module.endswith("__init__"):
                continue
            defined = _defined(node.module)
            wrong += [
                f"{path.relative_to(ROOT)}:{node.lineno}: {node.module} does not define {a.name}"
                for a in node.names
                if a.name not in defined
            ]
    assert not wrong, "\n".join(wrong)


def test_no_module_routes_names_it_does_not_own():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        if path != PACKAGE / "__init__.py":  # the lazy package: _PUBLIC + __getattr__
            assert "__getattr__" not in functions, path
        if path.name == "__init__.py" and path.parent != PACKAGE:
            package = ".".join(path.parent.relative_to(SRC).parts)
            used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            facade = [
                a.name
                for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and (n.module or "").startswith(package + ".")
                for a in n.names
                if (a.asname or a.name) not in used  # imported only to be found here
            ]
            assert not facade, f"{path}: a package's __init__ re-exports nothing: {facade}"


def test_the_owner_check_tells_definitions_from_imports():
    # The check above reads names from the AST: a re-export is not a definition.
    assert "extract_to_file" in _defined("apretrieval.extraction.resumable")
    assert "ImageFiles" not in _defined("apretrieval.pipeline")  # imported there, not defined
    assert "resumable" in _defined("apretrieval.extraction")  # a sub-module of the package


def test_no_module_over_the_size_limit():
    sizes = {
        str(p.relative_to(SRC)): len(p.read_text(encoding="utf-8").splitlines())
        for p in PACKAGE.rglob("*.py")
    }
    assert len(sizes) > 50
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"over {MAX_LINES} lines (make it a package): {too_long}"


_HELP_PROBE = """
import json, sys
from apretrieval.cli import main
loaded = {}
for command in sys.argv[1:]:
    try:
        main([command, "--help"])
    except SystemExit:
        pass
    loaded[command] = sorted(m for m in ("torch", "torchvision", "numpy") if m in sys.modules)
print(json.dumps(loaded))
"""


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_every_command_loads_no_torch(command):
    out = subprocess.run(
        [sys.executable, "-c", _HELP_PROBE, command],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    loaded = json.loads(out.strip().splitlines()[-1])[command]
    assert "torch" not in loaded and "torchvision" not in loaded, (command, loaded)


def test_command_modules_keep_torch_out_of_their_top_level_imports():
    # Importing every command module (what `apretrieval X --help` does) loads no torch: their
    # heavy imports stay inside `run`, or under TYPE_CHECKING.
    modules = sorted(p.stem for p in (PACKAGE / "cli").glob("*.py") if p.stem != "__init__")
    code = "import sys\n" + "".join(f"import apretrieval.cli.{m}\n" for m in modules)
    code += "print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == "False", modules
