"""Content identity of a file: size + mtime + inode as the fast path, SHA-256 as the truth.

A file's key ``{"size", "mtime_ns", "ino", "sha256"}`` is recorded beside what was derived from
it (the descriptors of a checkpoint, the manifest of an index). Later, :func:`matches` answers
"is this still the same content?": a different size is a different file; the same size, mtime
and inode is taken as the same file without reading it; anything else (a copy, a ``touch``, a
replacement) is decided by hashing. The inode is part of the fast path because files here are
replaced by renaming a new file over the old one (:mod:`apretrieval.atomic`): the new file has
another inode even when written within the same clock tick as the old one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

__all__ = ["file_key", "matches", "sha256_file"]

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_key(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"size", "mtime_ns", "ino", "sha256"}`` of ``path`` (JSON-ready)."""
    st = os.stat(path)
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ino": st.st_ino,
        "sha256": sha256_file(path),
    }


def matches(key: Any, path: str | os.PathLike[str], *, verify: bool = False) -> bool:
    """Whether ``path`` still has the content ``key`` (from :func:`file_key`) describes.

    ``verify``: always hash (for files that are read in full anyway).
    """
    if not isinstance(key, dict) or not {"size", "sha256"} <= key.keys():
        return False
    try:
        st = os.stat(Path(path))
    except OSError:
        return False
    if st.st_size != key["size"]:
        return False
    if not verify and (st.st_mtime_ns, st.st_ino) == (key.get("mtime_ns"), key.get("ino")):
        return True
    return bool(sha256_file(path) == key["sha256"])
