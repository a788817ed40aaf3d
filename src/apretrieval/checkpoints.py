"""Weights files: read without running code, load into a network strictly, write atomically.

``torch.load(weights_only=True)`` refuses pickled objects other than tensors, containers and
numbers, so an untrusted file can never execute code; :func:`safe_load` turns torch's errors
into messages a person can act on (and never repeats torch's advice to load unsafely).
The checkpoint *format* (what the dict holds) is :mod:`apretrieval.models`' business.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apretrieval.atomic import atomic_open

__all__ = [
    "CheckpointError",
    "NonFiniteWeights",
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "load_weights",
    "non_finite_tensors",
    "require_finite_weights",
    "safe_load",
]


class CheckpointError(ValueError):
    """A weights or checkpoint file cannot be used: unreadable, or made for another network."""

    exit_code = 1


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The file holds pickled Python objects beyond tensors and containers; none was run."""


class NonFiniteWeights(CheckpointError):
    """Weights holding NaN/inf: written, they would pass silently into every descriptor."""


def non_finite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or an inf."""
    return [
        name
        for name, t in state_dict.items()
        if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def require_finite_weights(state_dict: Mapping[str, Any], what: str, verb: str = "write") -> None:
    """NonFiniteWeights naming the first bad tensors of ``state_dict`` (``what``: its file,
    ``verb``: what was to be done with it, ``write`` or ``load``)."""
    bad = non_finite_tensors(state_dict)
    if bad:
        raise NonFiniteWeights(
            f"refusing to {verb} {what}: {len(bad)} of {len(state_dict)} tensors hold NaN/inf "
            f"(e.g. {', '.join(bad[:3])})"
        )


def safe_load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors, containers, numbers; never runs code.

    A file that needs more (arbitrary pickled objects) raises UnsafeCheckpointError without
    torch's advice to load it unsafely: such a file may come from anywhere and is not run.
    Empty, truncated or corrupt files raise CheckpointError naming the file.
    """
    p = Path(path)
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        if not _looks_pickled(p):  # bytes that are no pickle at all: a damaged file
            raise CheckpointError(
                f"{p} is not a readable checkpoint: truncated or corrupt "
                f"({p.stat().st_size} bytes, neither a zip archive nor a pickle)"
            ) from None
        raise UnsafeCheckpointError(
            f"{p} is not a plain checkpoint (it holds pickled Python objects besides tensors "
            "and numbers); nothing in it was executed. Load only files written by "
            "apretrieval or torch.save of a state dict"
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, UnicodeDecodeError, ValueError) as err:
        if isinstance(err, RuntimeError) and "CUDA" in str(err):
            raise  # a readable file asked onto a device this machine lacks: not damage
        size = p.stat().st_size if p.exists() else 0
        what = "empty" if size == 0 else f"truncated or corrupt ({size} bytes)"
        first = " ".join(str(err).split())[:160]
        raise CheckpointError(f"{p} is not a readable checkpoint: {what} ({first})") from None


def _looks_pickled(path: Path) -> bool:
    """A torch zip archive, or a pickle stream (PROTO opcode, protocol 2-5)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def load_weights(module: nn.Module, state_dict: Any, source: str) -> None:
    """``module.load_state_dict(state_dict)`` (strict), failing with a short CheckpointError.

    torch's message lists every key; this one counts missing, unexpected and mis-shaped
    entries and names the first few, which is what tells an architecture change apart.
    Weights holding NaN/inf are refused (NonFiniteWeights): every command that loads a
    network loads it here, and such weights would give NaN descriptors (an empty search
    result, an exported model that outputs NaN) without an error.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f"{source}: the weights are a {type(state_dict).__name__}, not a dict of tensors"
        )
    odd = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if odd:
        raise CheckpointError(
            f"{source}: the weights hold {len(odd)} entries that are not named tensors "
            f"(e.g. {', '.join(repr(k) for k in odd[:3])})"
        )
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and hasattr(state_dict[k], "shape") and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(items)} {label} (e.g. {', '.join(items[:3])})"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("of another shape", shapes),
            )
            if items
        ]
        raise CheckpointError(
            f"{source}: the weights do not fit this model ({type(module).__name__}): "
            + "; ".join(parts)
            + ". It was made for another backbone or out_dim: use the same settings, or "
            "another output folder / weights file"
        )
    require_finite_weights(state_dict, source, verb="load")
    module.load_state_dict(state_dict, strict=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """torch.save to a temporary file in the same folder, then os.replace: never half-written."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return path
