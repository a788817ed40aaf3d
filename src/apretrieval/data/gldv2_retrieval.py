"""The Google Landmarks v2 retrieval benchmark: test queries against the index images.

Layout (what ``apretrieval download gldv2 --split index`` and ``--split test`` write)::

    <root>/index.csv                      id (one index image per row)
    <root>/retrieval_solution_v2.1.csv    id,images,Usage: a test image, the index images that
                                          show its landmark (space-separated ids), and
                                          Public / Private / Ignored
    <root>/index/a/b/c/<id>.jpg           the 761,757 index images
    <root>/test/a/b/c/<id>.jpg            the test images

The queries are the solution's Public and Private rows, in file order (Ignored rows, test
images without a landmark of the index, are skipped); each is scored on the split its row
names (:mod:`apretrieval.gldv2_evaluation`). The database is every image of ``index.csv``, in
its order; ``relevant[i]`` holds the database rows of query ``i``'s relevant images.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

__all__ = [
    "GLDV2_RETRIEVAL",
    "INDEX_LIST",
    "RETRIEVAL_SOLUTION",
    "USAGES",
    "Gldv2Retrieval",
    "image_path",
]

GLDV2_RETRIEVAL = "gldv2-retrieval"
INDEX_LIST = "index.csv"
RETRIEVAL_SOLUTION = "retrieval_solution_v2.1.csv"
USAGES: tuple[str, ...] = ("public", "private")  # the scored splits, as the results name them


def image_path(split: str, image_id: str) -> str:
    """Path of a GLDv2 image relative to the root: ``<split>/a/b/c/<id>.jpg`` for id ``abc...``."""
    if len(image_id) < 3 or not image_id.isalnum():
        raise ValueError(f"not a GLDv2 image id: {image_id!r}")
    return f"{split}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def _rows(path: Path, columns: set[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise ValueError(
            f"{path} not found (run `apretrieval download gldv2 --split index` and "
            f"`--split test` with --root {path.parent})"
        )
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        found = set(reader.fieldnames or ())
        if not columns <= found:
            raise ValueError(f"{path}: expected columns {sorted(columns)}, got {sorted(found)}")
        return list(reader)


class Gldv2Retrieval:
    """The benchmark in ``root``: ``query_ids`` (Q) with their ``usage`` (``public`` or
    ``private``), ``index_ids`` (N) and ``relevant`` (Q arrays of database rows)."""

    name = GLDV2_RETRIEVAL

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.gnd_path = self.root / RETRIEVAL_SOLUTION
        self.index_ids = [r["id"] for r in _rows(self.root / INDEX_LIST, {"id"})]
        row_of = {image_id: j for j, image_id in enumerate(self.index_ids)}
        if len(row_of) != len(self.index_ids):
            raise ValueError(f"{self.root / INDEX_LIST} lists an index image twice")
        self.query_ids: list[str] = []
        self.usage: list[str] = []
        self.relevant: list[np.ndarray] = []
        for n, row in enumerate(_rows(self.gnd_path, {"id", "images", "Usage"}), 2):
            usage = row["Usage"].strip().lower()
            if usage == "ignored":
                continue
            if usage not in USAGES:
                raise ValueError(f"{self.gnd_path}:{n}: Usage must be Public, Private or Ignored")
            ids = row["images"].split()
            unknown = [i for i in ids if i not in row_of]
            if unknown or not ids:
                what = f"index image {unknown[0]!r} is not in {INDEX_LIST}" if ids else "no image"
                raise ValueError(f"{self.gnd_path}:{n}: {what}")
            self.query_ids.append(row["id"])
            self.usage.append(usage)
            self.relevant.append(np.unique([row_of[i] for i in ids]).astype(np.int64))
        if not self.query_ids:
            raise ValueError(f"{self.gnd_path}: no Public or Private query")

    def __repr__(self) -> str:
        return f"Gldv2Retrieval({str(self.root)!r}, {self.num_queries} queries, {self.num_db} db)"

    @property
    def num_queries(self) -> int:
        return len(self.query_ids)

    @property
    def num_db(self) -> int:
        return len(self.index_ids)

    @property
    def query_names(self) -> list[str]:
        """Relative query paths (``test/a/b/c/<id>.jpg``): the results' and descriptors' ids."""
        return [image_path("test", i) for i in self.query_ids]

    @property
    def db_names(self) -> list[str]:
        """Relative database paths (``index/a/b/c/<id>.jpg``)."""
        return [image_path("index", i) for i in self.index_ids]

    def query_paths(self) -> list[Path]:
        return [self.root / p for p in self.query_names]

    def db_paths(self) -> list[Path]:
        return [self.root / p for p in self.db_names]

    def missing_images(self) -> list[Path]:
        """Image files the lists name but the disk lacks (empty when complete)."""
        return [p for p in self.query_paths() + self.db_paths() if not p.is_file()]
