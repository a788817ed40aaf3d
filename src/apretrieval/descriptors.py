"""The descriptor file: ``X.npy`` (N, D) float32 rows + ``X.json`` manifest, written and read here.

The manifest is a JSON object: ``ids`` (N image ids, in row order), ``dim``, the extraction
settings (``scales``, ``max_side``, ``checkpoint``, ``gem_p``, ...) and ``data``, the content
key of its ``.npy`` partner (size, mtime, inode, SHA-256; see :mod:`apretrieval.filekey`).

The two files are one unit. Each is replaced atomically, the array first; a writer that dies
between the two leaves a new array beside the old manifest, and the manifest's ``data`` key no
longer matches, so :func:`load_features` refuses the pair instead of pairing new rows with old
ids. (Files written before manifests carried ``data`` are read without that check; an ``X.npy``
with no manifest at all reads with its row numbers as ids.)

The array is written with plain writes into preallocated space, not through a memory map: on a
full disk a memory-mapped write dies with SIGBUS, while here it is one ``OSError`` (ENOSPC)
before any row is written.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from apretrieval.atomic import atomic_open
from apretrieval.filekey import matches

__all__ = [
    "FEATURES_FORMAT",
    "FeatureSet",
    "check_finite",
    "features_paths",
    "load_features",
    "read_manifest",
    "write_features",
]

FEATURES_FORMAT = "apretrieval-features/1"
# Manifest keys FeatureSet holds as fields (or that describe the file pair, not the rows).
_OWN_KEYS = ("ids", "checkpoint", "scales", "data")


@dataclass
class FeatureSet:
    """Descriptors ``(N, D)`` with their ordered image ids and extraction metadata."""

    descriptors: np.ndarray
    ids: list[str]
    checkpoint: str | None = None
    scales: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: str | None = None  # the .npy file, when read from disk


def features_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(``X.npy``, ``X.json``) for an output prefix ``X`` (or ``X.npy``)."""
    out = Path(out)
    npy = out if out.suffix == ".npy" else out.with_name(out.name + ".npy")
    return npy, npy.with_suffix(".json")


def check_finite(block: np.ndarray, ids: Sequence[str], start: int = 0) -> None:
    """ValueError naming the first image whose descriptor holds NaN/inf (rows of ``block``
    are ``ids[start:]``): such a row would silently vanish from every ranking."""
    bad = ~np.isfinite(block).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{rows.size} descriptor(s) are not finite (NaN/inf), e.g. image "
            f"{ids[start + int(rows[0])]!r}: the model's weights or inputs are broken"
        )


def _preallocate(f: IO[bytes], size: int, path: Path) -> None:
    """Reserve ``size`` bytes so a full disk fails here, with ENOSPC, not halfway through."""
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except AttributeError:  # not on this platform: the writes report ENOSPC themselves
        return
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC, f"No space left on device ({size} bytes needed)", str(path)
            ) from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # e.g. unsupported by the fs
            raise


def write_features(
    out: str | os.PathLike[str],
    blocks: np.ndarray | Iterable[np.ndarray],
    ids: Sequence[str],
    meta: dict[str, Any] | None = None,
    *,
    dim: int | None = None,
) -> Path:
    """Write the descriptor file pair ``X.npy`` + ``X.json``; returns the ``.npy`` path.

    ``blocks``: the ``(N, D)`` descriptors, or consecutive ``(n_i, D)`` blocks of them (so a
    result larger than memory is written block by block; ``dim`` is then needed when there are
    no blocks). ``meta`` is recorded in the manifest beside ``ids``. Non-finite rows are refused.
    """
    ids = [str(i) for i in ids]
    if isinstance(blocks, np.ndarray):
        if blocks.ndim != 2:
            raise ValueError(f"descriptors must be (N, D), got shape {blocks.shape}")
        dim, blocks = blocks.shape[1], [blocks]
    blocks = iter(blocks)
    first = next(blocks, None)
    if first is not None:
        dim = first.shape[1]
    if dim is None:
        raise ValueError("dim is needed to write an empty descriptor file")
    npy, manifest_path = features_paths(out)
    header = {"descr": "<f4", "fortran_order": False, "shape": (len(ids), dim)}
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, header)
    digest = hashlib.sha256(head.getvalue())  # of the whole file, as a reader would hash it
    written = 0
    with atomic_open(npy, "wb") as f:
        _preallocate(f, len(head.getvalue()) + 4 * len(ids) * dim, npy)
        f.write(head.getvalue())
        for block in [first, *blocks] if first is not None else []:
            block = np.ascontiguousarray(block, dtype="<f4")
            if block.ndim != 2 or block.shape[1] != dim:
                raise ValueError(f"descriptor block of shape {block.shape}, expected (n, {dim})")
            if written + block.shape[0] > len(ids):
                raise ValueError(f"more descriptor rows than the {len(ids)} ids")
            check_finite(block, ids, written)
            data = block.tobytes()
            digest.update(data)
            f.write(data)
            written += block.shape[0]
        if written != len(ids):
            raise ValueError(f"{written} descriptor rows for {len(ids)} ids")
    st = npy.stat()
    manifest = {
        "format": FEATURES_FORMAT,
        **(meta or {}),
        "ids": ids,
        "dim": dim,
        "data": {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ino": st.st_ino,
            "sha256": digest.hexdigest(),
        },
    }
    with atomic_open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    return npy


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest JSON object (ValueError when it is not one, or has no ``ids`` list)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("ids"), list):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a descriptor manifest: no 'ids' list ({keys})")
    return data


def load_features(
    features: str | os.PathLike[str], manifest: str | os.PathLike[str] | None = None
) -> FeatureSet:
    """Read a descriptor file: ``X.npy`` (memory-mapped) and its manifest ``X.json`` (or the
    ``manifest`` given). Without a manifest, ids are the row numbers."""
    path = Path(features)
    if not path.is_file():
        raise ValueError(f"features file not found: {path}")
    manifest_path = features_paths(path)[1] if manifest is None else Path(manifest)
    if manifest is not None and not manifest_path.is_file():
        raise ValueError(f"manifest file not found: {manifest_path}")
    data = read_manifest(manifest_path) if manifest_path.is_file() else None
    # Checked before the array is opened: a half-replaced pair may not even parse.
    if data is not None and "data" in data and not matches(data["data"], path):
        raise ValueError(
            f"{manifest_path} does not describe {path} (its size or content differ): the pair "
            "was not written together, e.g. an interrupted extraction; extract again"
        )
    try:
        desc = np.load(path, mmap_mode="r")  # memory-mapped: 1M x 2048 need not fit in RAM
    except ValueError as err:
        raise ValueError(f"{path} is not a .npy array: {err}") from None
    if desc.ndim != 2:
        raise ValueError(f"{path}: descriptors must be (N, D), got shape {desc.shape}")
    if data is None:
        return FeatureSet(desc, [str(i) for i in range(desc.shape[0])], path=str(path.resolve()))
    ids = [str(v) for v in data["ids"]]
    if len(ids) != desc.shape[0]:
        raise ValueError(
            f"{manifest_path} lists {len(ids)} ids but {path} holds {desc.shape[0]} descriptors"
        )
    checkpoint, scales = data.get("checkpoint"), data.get("scales")
    # Everything else (max_side, gem_p, dataset, ...) travels along, e.g. into an index.
    extra = {key: value for key, value in data.items() if key not in _OWN_KEYS}
    return FeatureSet(
        desc,
        ids,
        checkpoint=None if checkpoint is None else str(checkpoint),
        scales=None if scales is None else [float(s) for s in scales],
        extra=extra,
        path=str(path.resolve()),
    )
