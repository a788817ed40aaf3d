"""Labelled training image lists: image folder, Google Landmarks v2 CSV, Landmarks-clean list,
SfM-120k pickle.

Every reader returns an ``ImageList``: image paths, int64 labels 0..C-1 and the original class
names. Missing files are dropped when the list is built (reported with a count); images that
fail to decode later are reported and skipped by ``ImageList.load`` (it returns None), so a
long run never dies on one bad file.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from apretrieval.data.decode import DECODE_ERRORS, decode_rgb
from apretrieval.data.sfm120k import training_images

__all__ = [
    "DATA_FORMATS",
    "IMAGE_EXTENSIONS",
    "ImageList",
    "gldv2_csv",
    "image_folder",
    "landmarks_clean_list",
    "open_image_list",
    "read_class_names",
    "sfm120k_list",
]

log = logging.getLogger("apretrieval.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
CHECKS = ("none", "exists", "header")
_MAX_REPORTED = 10


class ImageList:
    """Images with class labels. ``paths[i]`` (absolute), ``labels`` (N,) int64 in [0, C)."""

    def __init__(
        self, paths: Sequence[str], labels: Sequence[int] | np.ndarray, classes: Sequence[str]
    ) -> None:
        labels_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(paths) != labels_arr.shape[0]:
            raise ValueError(f"{len(paths)} paths but {labels_arr.shape[0]} labels")
        if labels_arr.size and (labels_arr.min() < 0 or labels_arr.max() >= len(classes)):
            raise ValueError(f"labels must lie in [0, {len(classes)}), got {labels_arr.max()}")
        self.paths = list(paths)
        self.labels = labels_arr
        self.classes = list(classes)
        self.num_bad = 0  # images that failed to decode in this process

    # Files left out by ``check`` (missing or unreadable) and classes left out by
    # ``without_classes``, for the run's summary.
    dropped: int = 0
    excluded_classes: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load(self, i: int, fn: Callable[[Image.Image], Any] | None = None) -> Any | None:
        """``fn(image)`` of image ``i``, or the RGB image itself when ``fn`` is None.

        ``fn`` gets the lazily opened file in its own mode (so it may call ``draft`` before
        decoding, and must decode it with ``data.decode.decode_rgb``). Unreadable files are
        reported and give None.
        """
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                return fn(img) if fn is not None else decode_rgb(img)
        except DECODE_ERRORS as err:
            self.num_bad += 1
            if self.num_bad <= _MAX_REPORTED:
                log.warning("skipping unreadable image %s: %s", path, err)
            elif self.num_bad == _MAX_REPORTED + 1:
                log.warning("further unreadable images are counted but not listed")
            return None

    def check(self, mode: str = "exists") -> ImageList:
        """Drop missing (``exists``) or unidentifiable (``header``) files, with a report."""
        if mode not in CHECKS:
            raise ValueError(f"check must be one of {CHECKS}, got {mode!r}")
        if mode == "none":
            return self
        keep = np.array([_usable(p, mode == "header") for p in self.paths], dtype=bool)
        dropped = [p for p, k in zip(self.paths, keep, strict=True) if not k]
        if dropped:
            shown = ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else "")
            log.warning(
                "dropped %d of %d images (missing or unreadable): %s",
                len(dropped),
                len(self.paths),
                shown,
            )
        kept = self.subset(np.flatnonzero(keep))
        kept.dropped = len(dropped)
        kept.excluded_classes = self.excluded_classes
        return kept

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageList:
        """The images at ``indices``; labels keep their numbering (classes unchanged)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageList([self.paths[i] for i in idx], self.labels[idx], self.classes)

    def without_classes(self, names: Iterable[str]) -> ImageList:
        """The images of every class not in ``names`` (class names, e.g. landmark ids), the
        remaining classes renumbered 0..C'-1 in their order. Names absent here are ignored."""
        drop = set(names)
        keep_class = np.array([c not in drop for c in self.classes], dtype=bool)
        new_label = np.cumsum(keep_class) - 1  # old label -> new label where kept
        keep = np.flatnonzero(keep_class[self.labels])
        classes = [c for c, k in zip(self.classes, keep_class, strict=True) if k]
        out = ImageList([self.paths[i] for i in keep], new_label[self.labels[keep]], classes)
        out.dropped = self.dropped
        out.excluded_classes = self.excluded_classes + self.num_classes - len(classes)
        return out


def _usable(path: str, header: bool) -> bool:
    if not header:
        return os.path.isfile(path)
    try:
        with Image.open(path) as img:  # reads the header only
            return img.size[0] > 0 and img.size[1] > 0
    except DECODE_ERRORS:
        return False


def _from_pairs(pairs: list[tuple[str, str]], source: str) -> ImageList:
    """ImageList from (path, class name) pairs; classes numbered in sorted order."""
    if not pairs:
        raise ValueError(f"no images found in {source}")
    names = sorted({c for _, c in pairs}, key=_natural_key)
    index = {c: i for i, c in enumerate(names)}
    return ImageList([p for p, _ in pairs], [index[c] for _, c in pairs], names)


def _natural_key(name: str) -> tuple[int, int | str]:
    # Numeric landmark ids sort as numbers (2 < 10), other names as strings after them.
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)


def image_folder(
    root: str | os.PathLike[str], extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> ImageList:
    """``root/<class>/<image>``: one sub-folder per class (nested folders are searched too)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    exts = tuple(e.lower() for e in extensions)
    pairs = []
    for cls in sorted(d for d in os.listdir(root) if (root / d).is_dir()):
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames.sort()  # deterministic order
            pairs += [
                (os.path.join(dirpath, f), cls)
                for f in sorted(filenames)
                if f.lower().endswith(exts) and not f.startswith(".")
            ]
    return _from_pairs(pairs, f"image folder {root} (expected {root}/<class>/<image>)")


def gldv2_path(image_root: Path, image_id: str) -> str:
    """Google Landmarks v2 layout: ``<root>/a/b/c/abc....jpg`` for id ``abc...``."""
    return str(image_root / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg")


def gldv2_csv(
    csv_path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None
) -> ImageList:
    """A Google Landmarks v2 style CSV.

    ``train_clean.csv``: ``landmark_id,images`` (space-separated image ids per landmark);
    ``train.csv``: ``id,url,landmark_id`` (a ``path`` column, or a non-URL ``url`` value, is
    read as an image path relative to ``image_root``; otherwise the id gives the GLDv2 layout
    path). ``image_root`` defaults to the CSV's folder, or to its ``train/`` sub-folder when
    there is one (the layout ``apretrieval download gldv2`` writes).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ValueError(f"CSV list not found: {csv_path}")
    root = Path(image_root) if image_root is not None else _gldv2_image_root(csv_path.parent)
    pairs: list[tuple[str, str]] = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        if {"landmark_id", "images"} <= cols:
            for row in reader:
                pairs += [(gldv2_path(root, i), row["landmark_id"]) for i in row["images"].split()]
        elif {"id", "landmark_id"} <= cols:
            for row in reader:
                where = row.get("path") or row.get("url") or ""
                if where and "://" not in where:
                    path = str(root / where)
                else:
                    path = gldv2_path(root, row["id"])
                pairs.append((path, row["landmark_id"]))
        else:
            raise ValueError(
                f"{csv_path}: expected columns 'landmark_id,images' (train_clean) or "
                f"'id,url,landmark_id' (train), got {sorted(cols)}"
            )
    return _from_pairs(pairs, str(csv_path))


def _gldv2_image_root(folder: Path) -> Path:
    # The downloaded layout keeps the CSVs beside the train/ (index/, test/) image trees.
    return folder / "train" if (folder / "train").is_dir() else folder


def sfm120k_list(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None
) -> ImageList:
    """The ``train`` part of ``retrieval-SfM-120k.pkl``, its ``cluster`` ids as classes; images
    under ``image_root`` (default: ``ims/`` beside the pickle; see :mod:`.sfm120k`)."""
    return _from_pairs(training_images(path, image_root), str(path))


def read_class_names(path: str | os.PathLike[str]) -> set[str]:
    """Class names (landmark ids) listed one per line; blank lines and ``#`` comments skipped
    (the file of ``--exclude-landmarks``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"landmark list not found: {path}")
    names = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(line)
    return names


def landmarks_clean_list(
    list_path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None
) -> ImageList:
    """Landmarks-clean text list: one ``relative/image/path label`` per line (space-separated).

    Blank lines and ``#`` comments are skipped; ``image_root`` defaults to the list's folder.
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise ValueError(f"image list not found: {list_path}")
    root = Path(image_root) if image_root is not None else list_path.parent
    pairs = []
    with open(list_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)  # the path itself may contain spaces
            if len(parts) != 2:
                raise ValueError(f"{list_path}:{lineno}: expected 'path label', got {line!r}")
            pairs.append((str(root / parts[0]), parts[1]))
    return _from_pairs(pairs, str(list_path))


DATA_FORMATS = ("auto", "folder", "csv", "list", "sfm120k")
_BY_SUFFIX = {".csv": "csv", ".pkl": "sfm120k"}


def open_image_list(
    path: str | os.PathLike[str],
    data_format: str = "auto",
    image_root: str | os.PathLike[str] | None = None,
    check: str = "exists",
    exclude_classes: str | os.PathLike[str] | None = None,
) -> ImageList:
    """Read a training list: ``folder`` (directory), ``csv`` (GLDv2), ``list`` (text) or
    ``sfm120k`` (``retrieval-SfM-120k.pkl``).

    ``auto`` picks by the path: a directory is a folder, ``*.csv`` a CSV, ``*.pkl`` SfM-120k,
    anything else a list. ``exclude_classes``: a file of class names (landmark ids) whose
    images are left out (:func:`read_class_names`), before the files are checked.
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    excluded = read_class_names(exclude_classes) if exclude_classes is not None else None
    p = Path(path)
    if data_format == "auto":
        data_format = "folder" if p.is_dir() else _BY_SUFFIX.get(p.suffix.lower(), "list")
    if data_format == "folder":
        images = image_folder(p)
    elif data_format == "csv":
        images = gldv2_csv(p, image_root)
    elif data_format == "sfm120k":
        images = sfm120k_list(p, image_root)
    else:
        images = landmarks_clean_list(p, image_root)
    if excluded is not None:
        kept = images.without_classes(excluded)
        if not len(kept):
            raise ValueError(f"no images left after excluding the classes in {exclude_classes}")
        images = kept
    return images.check(check)
