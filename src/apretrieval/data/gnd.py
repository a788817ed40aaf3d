"""What a ground-truth entry of a Revisited benchmark must be, checked in one place.

A ``gnd[i]`` entry holds the query's box ``bbx`` = ``[x1, y1, x2, y2]`` (four finite numbers,
x1 < x2 and y1 < y2, pixels of the uncropped query image) and index lists into the database:
``easy``, ``hard`` and ``junk`` (``ok`` and ``junk`` in the old Oxford/Paris protocol). Each
list holds distinct integer indices in ``[0, num_db)`` (integral floats are accepted, since
they lose nothing; 2.5 is refused, never truncated), and the lists of an entry are disjoint.

The benchmark loader (:class:`apretrieval.data.revisited.RevisitedDataset`) checks every entry
when it reads the file, so a bad file fails before any image is decoded; scoring checks the
lists it is given (a caller's own ground truth) with the same functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["INDEX_KEYS", "check_bbx", "check_entry", "index_array", "query_sets"]

INDEX_KEYS = ("easy", "hard", "junk", "ok")


def index_array(values: Any, what: str, num_db: int) -> np.ndarray:
    """``values`` as distinct int64 indices in ``[0, num_db)``; ValueError naming ``what``."""
    try:
        a = np.asarray(values if values is not None else [], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a list of integer indices, got {values!r}") from None
    if a.size and (not np.all(np.isfinite(a)) or np.any(a != np.round(a))):
        bad = a[~np.isfinite(a) | (a != np.round(a))][0]
        raise ValueError(f"{what} must hold integer indices, got {float(bad)!r}")
    idx = a.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= num_db):
        bad = idx[(idx < 0) | (idx >= num_db)][0]
        raise ValueError(f"{what} has index {bad} outside the database [0, {num_db})")
    if np.unique(idx).size != idx.size:
        raise ValueError(f"{what} lists an index more than once")
    return idx


def query_sets(entry: Mapping[str, Any], q: int, num_db: int) -> dict[str, np.ndarray]:
    """Validated ``easy`` / ``hard`` / ``junk`` index arrays of query ``q``'s gnd entry."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"gnd[{q}] must be a dict, got {type(entry).__name__}")
    missing = [k for k in ("easy", "hard", "junk") if k not in entry]
    if missing:
        raise ValueError(f"gnd[{q}] lacks key(s) {missing} (has {sorted(entry)})")
    sets = {k: index_array(entry[k], f"gnd[{q}]['{k}']", num_db) for k in ("easy", "hard", "junk")}
    _require_disjoint(sets, q)
    return sets


def check_bbx(bbx: Any, what: str) -> tuple[float, float, float, float]:
    """``bbx`` as (x1, y1, x2, y2): four finite numbers with x1 < x2 and y1 < y2."""
    try:
        box = np.asarray(bbx, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be 4 numbers [x1, y1, x2, y2], got {bbx!r}") from None
    if box.size != 4 or not np.all(np.isfinite(box)):
        raise ValueError(f"{what} must be 4 finite numbers [x1, y1, x2, y2], got {bbx!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"{what} {[x1, y1, x2, y2]} is empty: need x1 < x2 and y1 < y2")
    return x1, y1, x2, y2


def check_entry(entry: Any, q: int, num_db: int) -> dict[str, Any]:
    """Entry ``q`` as plain values (``bbx`` list, int index lists), every rule checked."""
    if not isinstance(entry, Mapping) or "bbx" not in entry:
        raise ValueError(f"gnd[{q}] must be a dict with a 'bbx'")
    out: dict[str, Any] = {"bbx": list(check_bbx(entry["bbx"], f"gnd[{q}]['bbx']"))}
    sets = {k: index_array(entry[k], f"gnd[{q}]['{k}']", num_db) for k in INDEX_KEYS if k in entry}
    _require_disjoint(sets, q)
    out.update({k: [int(v) for v in idx] for k, idx in sets.items()})
    return out


def _require_disjoint(sets: Mapping[str, np.ndarray], q: int) -> None:
    allidx = np.concatenate([np.zeros(0, np.int64), *sets.values()])
    if np.unique(allidx).size != allidx.size:
        raise ValueError(f"gnd[{q}]: {', '.join(map(repr, sets))} must be disjoint")
