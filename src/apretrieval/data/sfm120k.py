"""SfM-120k (retrieval-SfM-120k): the training set of Radenović et al., and its download.

Published files (``http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/``; a mirror holds
them under ``<mirror>/sfm120k/``)::

    ims/ims.tar.gz                     members cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid (no extension)
    dbs/retrieval-SfM-120k.pkl         {"train": part, "val": part}; a part holds
                                       cids (image names), cluster (3D-model id per image),
                                       qidxs, pidxs (parallel query / positive indices into cids)
    dbs/retrieval-SfM-120k-whiten.pkl  cids, qidxs, pidxs at the top level (matching pairs)

Local layout: ``DIR/ims/<the archive's tree>``, ``DIR/retrieval-SfM-120k.pkl``,
``DIR/retrieval-SfM-120k-whiten.pkl``. Both pickles are untrusted input, read through
:func:`apretrieval.data.plain_pickle.load_plain_pickle` and checked for the structure above.
Training uses a part's images with their ``cluster`` ids as classes (:func:`training_images`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apretrieval.data.download import RemoteFile, download_files, mirrored
from apretrieval.data.fetch import DownloadError, bytes_on_disk, remote_size
from apretrieval.data.plain_pickle import load_plain_pickle
from apretrieval.data.shards import check_free_space, disk_space_needed

__all__ = [
    "DB_FILE",
    "IMAGES_FOLDER",
    "PARTS",
    "SFM120K_FILES",
    "WHITEN_FILE",
    "MatchingPairs",
    "cid_path",
    "download_sfm120k",
    "load_sfm120k",
    "load_whiten_pairs",
    "training_images",
]

_URL = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train"
DB_FILE = "retrieval-SfM-120k.pkl"
WHITEN_FILE = "retrieval-SfM-120k-whiten.pkl"
IMAGES_FOLDER = "ims"
PARTS = ("train", "val")

SFM120K_FILES: tuple[RemoteFile, ...] = (
    RemoteFile(f"{_URL}/dbs/{DB_FILE}", f"sfm120k/{DB_FILE}"),
    RemoteFile(f"{_URL}/dbs/{WHITEN_FILE}", f"sfm120k/{WHITEN_FILE}"),
    RemoteFile(f"{_URL}/ims/ims.tar.gz", "sfm120k/ims.tar.gz", extract="tree", into="ims"),
)


def cid_path(images: str | os.PathLike[str], cid: str) -> Path:
    """Where image ``cid`` lives under the images folder: ``cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid``."""
    if len(cid) < 6 or "/" in cid or cid in (".", ".."):
        raise ValueError(f"not an SfM-120k image name: {cid!r}")
    return Path(images) / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


@dataclass(frozen=True)
class MatchingPairs:
    """Images and matching pairs: ``cids`` (N names), ``qidxs`` / ``pidxs`` (P,) int64 indices
    into ``cids`` (query i matches positive i), ``cluster`` (N,) int64 or None."""

    cids: tuple[str, ...]
    qidxs: np.ndarray
    pidxs: np.ndarray
    cluster: np.ndarray | None = None


def _indices(value: Any, n: int, where: str) -> np.ndarray:
    try:
        idx = np.asarray(value, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a list of integer indices") from None
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{where}: index outside [0, {n})")
    return idx


def _pairs(part: Any, where: str, need_cluster: bool) -> MatchingPairs:
    keys = ("cids", "qidxs", "pidxs") + (("cluster",) if need_cluster else ())
    if not isinstance(part, Mapping) or not set(keys) <= set(part):
        got = sorted(part) if isinstance(part, Mapping) else type(part).__name__
        raise ValueError(f"{where}: expected a dict with {', '.join(keys)}, got {got}")
    cids = tuple(str(c) for c in part["cids"])
    n = len(cids)
    qidxs = _indices(part["qidxs"], n, f"{where}: qidxs")
    pidxs = _indices(part["pidxs"], n, f"{where}: pidxs")
    if qidxs.shape != pidxs.shape:
        raise ValueError(f"{where}: {qidxs.size} qidxs but {pidxs.size} pidxs")
    cluster = None
    if need_cluster:
        cluster = np.asarray(part["cluster"]).reshape(-1)
        if cluster.shape[0] != n or not np.issubdtype(cluster.dtype, np.number):
            raise ValueError(f"{where}: cluster must hold one number per image ({n})")
        cluster = cluster.astype(np.int64)
    return MatchingPairs(cids, qidxs, pidxs, cluster)


def load_sfm120k(path: str | os.PathLike[str]) -> dict[str, MatchingPairs]:
    """The ``train`` and ``val`` parts of ``retrieval-SfM-120k.pkl`` (read safely)."""
    obj = load_plain_pickle(path, "SfM-120k file")
    if not isinstance(obj, Mapping) or not set(PARTS) <= set(obj):
        got = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{path}: expected a dict with 'train' and 'val', got {got}")
    return {p: _pairs(obj[p], f"{path}: {p}", need_cluster=True) for p in PARTS}


def load_whiten_pairs(path: str | os.PathLike[str]) -> MatchingPairs:
    """The matching pairs of ``retrieval-SfM-120k-whiten.pkl`` (read safely)."""
    return _pairs(load_plain_pickle(path, "SfM-120k file"), str(path), need_cluster=False)


def training_images(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    part: str = "train",
) -> list[tuple[str, str]]:
    """(image path, class name) of every image of ``part`` of ``retrieval-SfM-120k.pkl``; the
    class is the image's ``cluster`` (3D model) id. ``image_root``: the folder of the image
    tree (default ``<the pickle's folder>/ims``). The training list reader is
    :func:`apretrieval.data.lists.sfm120k_list`."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"SfM-120k file not found: {path}")
    pairs = load_sfm120k(path)[part]
    assert pairs.cluster is not None
    root = Path(image_root) if image_root is not None else path.parent / IMAGES_FOLDER
    return [
        (str(cid_path(root, c)), str(k)) for c, k in zip(pairs.cids, pairs.cluster, strict=True)
    ]


def _check_pickle(path: Path, load: Callable[[Path], Any]) -> None:
    try:
        load(path)
    except ValueError as err:
        path.unlink(missing_ok=True)  # never leave it where training would read it
        raise DownloadError(f"{err} (removed)") from None


def download_sfm120k(
    root: str | os.PathLike[str],
    *,
    mirror: str | None = None,
    keep_archives: bool = False,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Download SfM-120k into ``root``: both pickles (checked to be plain data of the expected
    structure), then the images (resumable; extracted under ``root/ims``), once the free disk
    space is known to hold the archive and its images (when the server says its size)."""
    files = mirrored(SFM120K_FILES, mirror)
    root = Path(root)
    # The two small pickles first: a refused one stops the run before the large archive.
    download_files(files[:2], root, progress=progress, retries=retries, timeout=timeout, log=log)
    _check_pickle(root / DB_FILE, load_sfm120k)
    _check_pickle(root / WHITEN_FILE, load_whiten_pairs)
    archive = files[2]
    size = None if archive.marker(root).exists() else remote_size(archive.url)
    if size is not None:  # the archive beside its images (JPEGs: gzip barely shrinks them)
        have = bytes_on_disk(root / archive.filename)
        need = disk_space_needed([size], [have], 1, keep_archives)
        check_free_space(root, need, "the images")
    download_files(
        files[2:],
        root,
        keep_archives=keep_archives,
        progress=progress,
        retries=retries,
        timeout=timeout,
        log=log,
    )
    return root
