"""Pickles as untrusted input: plain data only, nothing executed.

The published ground truth (``gnd_*.pkl``) and training lists (``retrieval-SfM-120k*.pkl``) are
pickles, and ``pickle.load`` runs whatever a pickle names. :func:`load_plain_pickle` never
does: its unpickler resolves no global except numpy's array/dtype/scalar reconstruction, so a
pickle that references anything else (``os.system``, ``builtins.eval``, ...) is refused before
it can run, and the loaded value is then checked to be plain data (containers, numbers,
strings, numeric arrays).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_plain_pickle"]


def _numpy_globals() -> dict[tuple[str, str], Any]:
    # The reconstruction helpers, taken from numpy's own reductions rather than private
    # imports, under both their numpy 1 (numpy.core) and numpy 2 (numpy._core) module names.
    reconstruct = np.array([0]).__reduce__()[0]
    scalar = np.int64(0).__reduce__()[0]
    frombuffer = np.array([0]).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Plain containers, numbers, strings and numpy arrays; any other global is refused."""

    def __init__(self, file: io.BufferedIOBase, source: str, what: str) -> None:
        super().__init__(file)
        self._source = source
        self._what = what
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise ValueError(
                f"{self._source}: refusing to load a pickle that references {module}.{name} "
                f"(a {self._what} holds only lists, dicts, numbers, strings and arrays)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise ValueError(f"{self._source}: persistent ids are not allowed in a {self._what}")


_PLAIN = (str, bytes, int, float, bool, type(None), np.number, np.bool_)


def _check_plain(obj: Any, source: str, what: str, depth: int = 0) -> None:
    if depth > 20:
        raise ValueError(f"{source}: nesting deeper than any {what}")
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise ValueError(f"{source}: object arrays are not allowed in a {what}")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, source, what, depth + 1)
            _check_plain(v, source, what, depth + 1)
        return
    if isinstance(obj, list | tuple | set | frozenset):
        for v in obj:
            _check_plain(v, source, what, depth + 1)
        return
    raise ValueError(f"{source}: unexpected {type(obj).__name__} in a {what}")


def load_plain_pickle(path: str | os.PathLike[str], what: str = "data file") -> Any:
    """The plain data stored in the pickle at ``path``; ValueError (naming ``what`` the file
    should be) for a pickle that references code or holds anything but plain data."""
    path = Path(path)
    data = path.read_bytes()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), str(path), what).load()
    except ValueError:
        raise
    except Exception as err:  # truncated/garbled bytes: one clear error, not a traceback
        raise ValueError(f"{path}: not a readable {what} ({err})") from None
    _check_plain(obj, str(path), what)
    return obj
