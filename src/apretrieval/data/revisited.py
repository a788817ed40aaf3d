"""Revisited Oxford / Paris (ROxford5k, RParis6k) and the R1M distractors.

Official layout::

    <root>/gnd_<name>.pkl          dict: imlist, qimlist, gnd[i] = {bbx, easy, hard, junk}
    <root>/jpg/<image name>.jpg    database images and (uncropped) query images
    <r1m_root>/revisitop1m.txt     one image path per line, relative to <r1m_root>/jpg/
    <r1m_root>/jpg/...

Ground-truth pickles are untrusted input: :func:`load_gnd` reads them with
:func:`apretrieval.data.plain_pickle.load_plain_pickle`, which refuses any pickle that
references something other than plain data (``os.system``, ``builtins.eval``, ...) before it
can run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from apretrieval.data.decode import crop_box, decode_rgb, oriented_size
from apretrieval.data.gnd import check_entry
from apretrieval.data.plain_pickle import load_plain_pickle

__all__ = [
    "R1M_LIST",
    "REVISITED_DATASETS",
    "RevisitedDataset",
    "load_gnd",
    "locate_benchmark",
    "read_r1m_list",
]

REVISITED_DATASETS: tuple[str, ...] = ("roxford5k", "rparis6k")
R1M_LIST = "revisitop1m.txt"


def load_gnd(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a ground-truth pickle (``gnd_<name>.pkl``) safely.

    Returns the dict as stored (``imlist``, ``qimlist``, ``gnd`` and, in the old protocol,
    ``qidx``). Raises ValueError for anything that is not such plain data.
    """
    path = Path(path)
    obj = load_plain_pickle(path, "ground-truth file")
    if not isinstance(obj, dict) or not {"imlist", "qimlist", "gnd"} <= set(obj):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected a dict with imlist, qimlist and gnd, got {keys}")
    if len(obj["gnd"]) != len(obj["qimlist"]):
        raise ValueError(f"{path}: {len(obj['gnd'])} gnd entries for {len(obj['qimlist'])} queries")
    return obj


def read_r1m_list(r1m_root: str | os.PathLike[str]) -> list[str]:
    """Image paths of the R1M distractors, relative to ``<r1m_root>/jpg`` (``.jpg`` added
    where a line has no extension)."""
    path = Path(r1m_root) / R1M_LIST
    if not path.is_file():
        raise ValueError(
            f"R1M image list not found: {path} (run `apretrieval download revisitop1m`)"
        )
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            names.append(line if Path(line).suffix else line + ".jpg")
    return names


@dataclass(frozen=True)
class _Query:
    name: str
    bbx: tuple[float, float, float, float]


def locate_benchmark(entry: str, root: str | os.PathLike[str] | None) -> tuple[str, Path]:
    """(name, folder) of a benchmark given as NAME (in ROOT or ROOT/NAME) or a gnd_NAME.pkl."""
    path = Path(entry)
    if path.suffix == ".pkl":
        if not path.name.startswith("gnd_"):
            raise ValueError(f"{entry}: a ground-truth file is named gnd_NAME.pkl")
        return path.stem[len("gnd_") :], path.parent
    if root is None:
        raise ValueError(
            f"a benchmark root is required for {entry} (--root; or give its gnd_*.pkl)"
        )
    root = Path(root)
    nested = root / entry
    if not (root / f"gnd_{entry}.pkl").is_file() and (nested / f"gnd_{entry}.pkl").is_file():
        return entry, nested
    return entry, root


class RevisitedDataset:
    """One of the revisited benchmarks: 70 cropped queries and a database (optionally + R1M).

    ``gnd`` holds, per query, ``easy``/``hard``/``junk`` lists of database indices (what
    :func:`apretrieval.evaluation.evaluate_revisited` takes) and the ``bbx``. R1M distractors
    come after the dataset's own images, so the ground-truth indices stay valid.
    """

    def __init__(
        self,
        name: str,
        root: str | os.PathLike[str],
        r1m_root: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self.root = Path(root)
        self.gnd_path = self.root / f"gnd_{name}.pkl"
        # Any benchmark in the official layout works (e.g. the demo's generated one); the two
        # official names get a download hint when their files are missing.
        if not self.gnd_path.is_file():
            if name in REVISITED_DATASETS:
                raise ValueError(
                    f"{self.gnd_path} not found (run `apretrieval download {name} --root {root}`)"
                )
            raise ValueError(
                f"{self.gnd_path} not found: dataset must be one of {REVISITED_DATASETS} or "
                f"a folder in the same layout (jpg/ + gnd_{name}.pkl), got {name!r}"
            )
        raw = load_gnd(self.gnd_path)
        self.images: list[str] = [str(n) for n in raw["imlist"]]
        # Every entry checked now (indices, boxes): a bad file fails before any extraction.
        try:
            self.gnd: list[dict[str, Any]] = [
                check_entry(g, i, len(self.images)) for i, g in enumerate(raw["gnd"])
            ]
        except ValueError as err:
            raise ValueError(f"{self.gnd_path}: {err}") from None
        self._queries = [
            _Query(str(q), (b[0], b[1], b[2], b[3]))
            for q, b in zip(raw["qimlist"], (g["bbx"] for g in self.gnd), strict=True)
        ]
        self.r1m_root = Path(r1m_root) if r1m_root is not None else None
        self.distractors: list[str] = read_r1m_list(self.r1m_root) if self.r1m_root else []

    def __repr__(self) -> str:
        r1m = f", +{len(self.distractors)} distractors" if self.distractors else ""
        return f"RevisitedDataset({self.name!r}, {self.num_queries} queries, {self.num_db} db{r1m})"

    @property
    def num_queries(self) -> int:
        return len(self._queries)

    @property
    def num_db(self) -> int:
        return len(self.images) + len(self.distractors)

    @property
    def query_names(self) -> list[str]:
        return [q.name for q in self._queries]

    def query_path(self, i: int) -> Path:
        return self.root / "jpg" / f"{self._queries[i].name}.jpg"

    def query_bbx(self, i: int) -> tuple[float, float, float, float]:
        return self._queries[i].bbx

    def db_path(self, i: int) -> Path:
        n = len(self.images)
        if i < n:
            return self.root / "jpg" / f"{self.images[i]}.jpg"
        assert self.r1m_root is not None
        return self.r1m_root / "jpg" / self.distractors[i - n]

    def query_paths(self) -> list[Path]:
        return [self.query_path(i) for i in range(self.num_queries)]

    def query_boxes(self) -> list[tuple[float, float, float, float]]:
        return [q.bbx for q in self._queries]

    def db_paths(self) -> list[Path]:
        return [self.db_path(i) for i in range(self.num_db)]

    def relative(self, path: Path) -> str:
        """``path`` relative to ``root`` when inside it (absolute otherwise, e.g. R1M)."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path.resolve())

    def load_query(self, i: int) -> Image.Image:
        """Query ``i`` cropped to its ``bbx``, RGB."""
        with Image.open(self.query_path(i)) as img:
            return decode_rgb(img, crop_box(self.query_bbx(i), oriented_size(img)))

    def load_db(self, i: int) -> Image.Image:
        with Image.open(self.db_path(i)) as img:
            return decode_rgb(img)

    def missing_images(self) -> list[Path]:
        """Image files the lists name but the disk lacks (empty when complete)."""
        paths = self.query_paths() + self.db_paths()
        return [p for p in paths if not p.is_file()]
