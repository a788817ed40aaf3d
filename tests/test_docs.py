"""The documentation covers the public API and its links hold.

`make test` builds the site with ``mkdocs build --strict``, which fails on a reference that does
not resolve; these tests make sure there is a reference for every public name to check, and
check the README's links, which the site build does not read.
"""

from __future__ import annotations

import re
from pathlib import Path

import apretrieval

ROOT = Path(__file__).resolve().parents[1]
API_INDEX = ROOT / "docs" / "api" / "index.md"


def _public_paths() -> dict[str, str]:
    """Public name -> dotted path of the object in the module that defines it."""
    paths = {}
    for name in apretrieval.__all__:
        if name == "__version__":
            continue
        obj = getattr(apretrieval, name)
        paths[name] = f"{obj.__module__}.{obj.__qualname__}"
    return paths


def test_every_public_name_is_linked_at_its_defining_module():
    links = dict(re.findall(r"\[`(\w+)`\]\[([\w.]+)\]", API_INDEX.read_text(encoding="utf-8")))
    assert links == _public_paths()


def test_every_linked_module_is_rendered_by_the_reference():
    directives = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        directives |= set(re.findall(r"^::: ([\w.]+)$", page.read_text(encoding="utf-8"), re.M))
    for name, path in _public_paths().items():
        module = path.rsplit(".", 1)[0]
        assert module in directives, f"{name}: no '::: {module}' in docs/api/"


def test_readme_relative_links_point_to_files():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in t]
    assert targets, "the README links to the documentation"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
