"""Google Landmarks v2: its published layout and its download.

Published under ``https://s3.amazonaws.com/google-landmark/`` (a mirror reproduces the paths
below under ``<mirror>/gldv2/``)::

    train/images_000.tar ... images_499.tar      index/images_000.tar ... images_099.tar
    test/images_000.tar ... images_019.tar       md5sum/<folder>/md5.images_NNN.txt
    metadata/train_clean.csv   landmark_id,images  (image ids space-separated)
    metadata/train.csv         id,url,landmark_id
    metadata/index.csv         id            metadata/test.csv   id
    ground_truth/retrieval_solution_v2.1.csv   id,images,Usage  (Public / Private / Ignored)

Local layout (what ``train --data DIR/train_clean.csv`` and the ``gldv2-retrieval`` benchmark
read): the CSVs in ``DIR``, the images of a shard member ``a/b/c/<id>.jpg`` under
``DIR/<train|index|test>/a/b/c/<id>.jpg``, and the shards' downloads, MD5 files and markers in
``DIR/shards/<folder>/``. ``train-clean`` is the clean list over the ``train`` shards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from apretrieval.data.download import RemoteFile, download_files, mirror_url
from apretrieval.data.gldv2_retrieval import RETRIEVAL_SOLUTION
from apretrieval.data.shards import Shard, fetch_shards, parse_shard_range

__all__ = [
    "GLDV2_URL",
    "MIRROR_FOLDER",
    "SPLITS",
    "download_gldv2",
    "gldv2_metadata",
    "gldv2_shards",
]

GLDV2_URL = "https://s3.amazonaws.com/google-landmark/"
MIRROR_FOLDER = "gldv2"
_SOLUTION_PATH = f"ground_truth/{RETRIEVAL_SOLUTION}"

# split -> (image folder, number of shards, published metadata files). The retrieval
# solution comes with both halves of the retrieval benchmark (index and test).
SPLITS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "train-clean": ("train", 500, ("metadata/train_clean.csv",)),
    "train": ("train", 500, ("metadata/train.csv",)),
    "index": ("index", 100, ("metadata/index.csv", _SOLUTION_PATH)),
    "test": ("test", 20, ("metadata/test.csv", _SOLUTION_PATH)),
}


def _split(split: str) -> tuple[str, int, tuple[str, ...]]:
    if split not in SPLITS:
        raise ValueError(f"unknown GLDv2 split {split!r}; choose from {sorted(SPLITS)}")
    return SPLITS[split]


def _url(path: str, mirror: str | None) -> str:
    if mirror is None:
        return GLDV2_URL + path
    return mirror_url(mirror, f"{MIRROR_FOLDER}/{path}")


def gldv2_metadata(split: str, mirror: str | None = None) -> tuple[RemoteFile, ...]:
    """The CSV files of ``split`` (kept as they are in the download folder)."""
    _, _, files = _split(split)
    return tuple(RemoteFile(_url(p, mirror), p) for p in files)


def gldv2_shards(
    split: str,
    root: str | os.PathLike[str],
    shards: str | None = None,
    mirror: str | None = None,
) -> list[Shard]:
    """The image shards of ``split`` numbered in ``shards`` (``"A-B"`` inclusive, ``"A"``;
    None: all), to be extracted under ``root/<folder>/``."""
    folder, count, _ = _split(split)
    root = Path(root)
    return [
        Shard(
            name=f"{folder}/images_{i:03d}.tar",
            url=_url(f"{folder}/images_{i:03d}.tar", mirror),
            md5_url=_url(f"md5sum/{folder}/md5.images_{i:03d}.txt", mirror),
            work=root / "shards" / folder,
            dest=root / folder,
        )
        for i in parse_shard_range(shards, count)
    ]


def download_gldv2(
    split: str,
    root: str | os.PathLike[str],
    *,
    shards: str | None = None,
    jobs: int = 4,
    mirror: str | None = None,
    keep_archives: bool = False,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Download the metadata and the image shards ``shards`` of ``split`` into ``root``.

    Shards go ``jobs`` at a time, each resumable and checked against its published MD5
    (:func:`apretrieval.data.shards.fetch_shards`); a rerun fetches only what is missing.
    """
    shard_list = gldv2_shards(split, root, shards, mirror)  # validates split and range first
    root = Path(root)
    download_files(
        gldv2_metadata(split, mirror),
        root,
        progress=progress,
        retries=retries,
        timeout=timeout,
        log=log,
    )
    fetch_shards(
        shard_list,
        jobs=jobs,
        keep_archives=keep_archives,
        progress=progress,
        retries=retries,
        timeout=timeout,
        label=f"gldv2 {split}",
        log=log,
    )
    return root
