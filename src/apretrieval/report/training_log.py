"""Training logs for the report: the records of a JSONL log (``metrics.jsonl``) as numbers."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apretrieval.jsonl import read_jsonl

__all__ = ["flatten_record", "read_training_log", "validation_protocol"]


def flatten_record(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) log record, keys joined by ``/``; booleans are skipped."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_record(value, name + "/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[name] = float(value)
    return out


def read_training_log(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """The records of a JSONL training log (``metrics.jsonl``), flattened to numbers.

    Blank lines and a torn last line (a run killed mid-write) are skipped; another line that
    is not a JSON object is a ValueError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"training log not found: {path}")
    return [flatten_record(r) for r in read_jsonl(path)]


def validation_protocol(path: str | os.PathLike[str]) -> str | None:
    """How the log's validation scored (its last ``val_protocol``), None when not recorded."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"training log not found: {path}")
    found = [r["val_protocol"] for r in read_jsonl(path) if isinstance(r.get("val_protocol"), str)]
    return found[-1] if found else None
