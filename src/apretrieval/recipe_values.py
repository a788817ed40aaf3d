"""Recipe files and their values: a YAML mapping of settings read safely (plain values only,
the line of a syntax error named), written atomically, and one value coerced to the type its
setting declares (also as a person types it on a command line)."""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from apretrieval.atomic import atomic_open

__all__ = ["coerce_value", "read_yaml_mapping", "write_yaml_atomic"]

_NULL_WORDS = ("none", "null", "~")


def coerce_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` (from YAML, or as typed on a command line: ``"0.5,1.0"``, ``"none"``) checked
    and converted to the declared type ``hint`` of setting ``name``; ValueError otherwise."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional and isinstance(value, str) and value.strip().lower() in _NULL_WORDS:
        value = None  # `--pretrained none`, as a person types it
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} cannot be null")
    base = next(a for a in args if a is not type(None)) if optional else hint
    origin = typing.get_origin(base)
    try:
        if origin is tuple:
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = [value]  # `--recall-k 4`
            if isinstance(value, str):  # `--crop-scale 0.5,1.0`
                value = [v for v in value.strip("[]() ").split(",") if v.strip()]
            items = list(value) if isinstance(value, list | tuple) else None
            kinds = typing.get_args(base)
            if kinds[-1:] == (Ellipsis,):  # tuple[int, ...]: any length, whole numbers
                if items is None or any(float(v) != int(float(v)) for v in items):
                    raise TypeError
                return tuple(int(float(v)) for v in items)
            if items is None or len(items) != len(kinds):
                raise TypeError
            return tuple(float(v) for v in items)
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if base is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ValueError(f"{name}: expected {_type_name(hint)}, got {value!r}") from None
    return value


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def read_yaml_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file holding a mapping of settings (safe loader: plain values, no tags).

    ValueError naming the file and the line for a syntax error or a ``!!python`` tag.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"config file not found: {p}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{p}: not a text (UTF-8) YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{p}, line {mark.line + 1}" if mark is not None else str(p)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if "python/" in str(err):
            problem += " (recipes hold plain values; Python tags are never executed)"
        raise ValueError(f"{where}: invalid YAML: {problem}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of settings, got {type(data).__name__}")
    return data


def write_yaml_atomic(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write ``data`` as YAML through :func:`apretrieval.atomic.atomic_open`."""
    path = Path(path)
    with atomic_open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path
