"""What rebuilds a RetrievalNet: ``ModelConfig``, stored as a plain dict in every checkpoint.

A checkpoint may come from anywhere, so the dict read back is checked value by value
(:meth:`ModelConfig.from_dict`) before a network is built from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["ModelConfig"]


def _number(v: Any, above: float = -math.inf) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and above < v < math.inf


def _triple(v: Any) -> bool:
    return isinstance(v, list | tuple) and len(v) == 3 and all(map(_number, v))


# What each ModelConfig field may hold when read from a checkpoint (a file from anywhere).
_CONFIG_CHECKS: dict[str, Callable[[Any], bool]] = {
    "name": lambda v: isinstance(v, str),
    "out_dim": lambda v: v is None or (isinstance(v, int) and _number(v, 0)),
    "gem_p": lambda v: _number(v, 0),
    **dict.fromkeys(("frozen_bn", "whiten", "normalize_pooled"), lambda v: isinstance(v, bool)),
    **dict.fromkeys(("mean", "std"), lambda v: v is None or _triple(v)),
}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a RetrievalNet (stored as a plain dict in checkpoints)."""

    name: str = "resnet101"
    out_dim: int | None = None  # whitening output dimension; None = backbone width
    gem_p: float = 3.0
    frozen_bn: bool = True
    whiten: bool = True
    # Input normalisation (None: ImageNet's); a timm or converted model carries its own.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # L2 before the whitening FC; False applies the FC to the raw GeM vector (as converted
    # dirtorch models do).
    normalize_pooled: bool = True

    @classmethod
    def from_dict(cls, d: Any) -> ModelConfig:
        """The config a checkpoint stores; ValueError naming the first value that does not fit."""
        if not isinstance(d, dict):
            raise ValueError(f"the model config must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        for key, value in d.items():
            if not _CONFIG_CHECKS[key](value):
                raise ValueError(f"model config {key!r}: unexpected value {value!r}")
        return cls(**{**d, **{k: tuple(map(float, d[k])) for k in ("mean", "std") if d.get(k)}})
