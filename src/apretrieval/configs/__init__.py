"""Recipes shipped with the package: YAML files beside this module, found by name or by path.

``apretrieval train --config cpu-small`` and ``--config path/to/recipe.yaml`` both work: an
existing file wins, otherwise the name (with or without ``.yaml``) is looked up here.

Example:
    >>> recipe_path("cpu-small").name
    'cpu-small.yaml'
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["RECIPES_DIR", "bundled_recipes", "recipe_path"]

RECIPES_DIR = Path(__file__).resolve().parent


def bundled_recipes() -> dict[str, Path]:
    """Name (file stem) -> path of every recipe shipped with the package."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_path(name_or_path: str | os.PathLike[str]) -> Path:
    """The recipe file ``name_or_path`` means: an existing file, else a bundled recipe.

    ValueError listing the bundled names when it is neither.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = bundled_recipes()
    key = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.parent == Path(".") and key in bundled:
        return bundled[key]
    if path.is_dir():
        raise ValueError(f"config {path} is a folder, expected a YAML file")
    raise ValueError(
        f"config file not found: {path} (bundled recipes: {', '.join(bundled) or 'none'})"
    )
