"""Extraction defaults and the check of a scale list (plain Python: no torch is imported)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["DEFAULT_MAX_SIDE", "DEFAULT_SCALES", "check_scales", "scaled_size"]

DEFAULT_SCALES: tuple[float, ...] = (1.0, 2**-0.5, 0.5)
# Longer image side before scaling, pixels (the size multi-scale test images start from).
DEFAULT_MAX_SIDE = 1024


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """``scales`` as a tuple of floats; ValueError unless they are finite positive numbers."""
    out = tuple(float(s) for s in scales)
    if not out or any(not (math.isfinite(s) and s > 0) for s in out):
        raise ValueError(f"scales must be positive numbers, got {list(scales)!r}")
    return out


def scaled_size(n: int, s: float) -> int:
    """``n`` pixels at scale ``s``, rounded half up (not Python's half-to-even ``round``): one
    rule that the exported ONNX / TorchScript graphs compute the same way (int() truncates)."""
    return max(1, int(n * s + 0.5))
