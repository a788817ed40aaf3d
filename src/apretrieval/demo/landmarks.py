"""Landmarks: cells of the source photographs, and their split into train and test.

Large photographs are cut into a grid of *cells*; each cell holds one landmark (its central
*core*). Views of a landmark never leave its cell, so different landmarks share no pixels.
Coordinates are *canonical*: pixels of the source photograph (for the stereo pair, the left
image).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from apretrieval.demo.config import BenchmarkConfig
from apretrieval.demo.sources import CATALOGUE, LANDMARK, motorcycle_disparity

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Landmark:
    """A landmark: a region of one photograph (canonical pixel coordinates)."""

    id: str
    photo: str
    cell: Box
    core: Box
    split: str  # "train" or "test"
    # Second real viewpoint (the right image of the stereo pair): photo key, the x shift
    # taking canonical (left-image) coordinates to it, and the cell the shifted footprint
    # must stay in so it still shows only this landmark despite parallax.
    second_photo: str | None = None
    second_dx: float = 0.0
    second_cell: Box | None = None


def grid_cells(height: int, width: int, cell_size: int) -> list[Box]:
    """Tile a (height, width) photo into a grid of about ``cell_size`` cells (row-major)."""
    rows, cols = max(1, round(height / cell_size)), max(1, round(width / cell_size))
    ys, xs = np.linspace(0, height, rows + 1), np.linspace(0, width, cols + 1)
    return [
        (float(xs[c]), float(ys[r]), float(xs[c + 1]), float(ys[r + 1]))
        for r in range(rows)
        for c in range(cols)
    ]


def shrink(box: Box, fraction: float) -> Box:
    """The central ``fraction`` (per side) of ``box``."""
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * (1 - fraction) / 2, (y1 - y0) * (1 - fraction) / 2
    return (x0 + mx, y0 + my, x1 - mx, y1 - my)


def has_content(photo: np.ndarray, box: Box) -> bool:
    """A usable landmark: not all black (retina corners) and not flat (plain walls).

    The deep field is mostly black with galaxies, so "mostly dark" alone is allowed.
    """
    x0, y0, x1, y1 = (round(v) for v in box)
    lum = photo[y0:y1, x0:x1].astype(np.float32).mean(axis=2) / 255.0
    return bool((lum < 0.08).mean() < 0.92 and lum.std() > 0.04)


def plan_landmarks(photos: dict[str, np.ndarray], cfg: BenchmarkConfig) -> list[Landmark]:
    """Cut the landmark photos into landmarks and split them (per photo) into train / test."""
    rng = np.random.default_rng([cfg.seed, 1])
    disparity = motorcycle_disparity() if "motorcycle_right" in photos else None
    landmarks: list[Landmark] = []
    for source in CATALOGUE:
        if source.role != LANDMARK or source.key not in photos:
            continue
        photo = photos[source.key]
        height, width = photo.shape[:2]
        cells = [
            c
            for c in grid_cells(height, width, cfg.cell_size)
            if has_content(photo, shrink(c, cfg.core_fraction))
        ]
        chosen = sorted(rng.permutation(len(cells))[: cfg.max_landmarks_per_photo].tolist())
        # Hold out a share of every photo (at least one landmark of any photo with two or
        # more), so train and test cover the same kinds of scene with disjoint landmarks.
        n_test = max(1, round(len(chosen) * cfg.test_fraction)) if len(chosen) > 1 else 0
        test_ranks = set(rng.permutation(len(chosen))[:n_test].tolist())
        for rank, i in enumerate(chosen):
            split = "test" if rank in test_ranks else "train"
            landmarks.append(_landmark(source.key, i, cells[i], cfg, split, disparity))
    return landmarks


def _landmark(
    key: str,
    index: int,
    cell: Box,
    cfg: BenchmarkConfig,
    split: str,
    disparity: np.ndarray | None,
) -> Landmark:
    core = shrink(cell, cfg.core_fraction)
    lm = Landmark(id=f"{key}_{index:02d}", photo=key, cell=cell, core=core, split=split)
    if key != "motorcycle_left" or disparity is None:
        return lm
    x0, y0, x1, y1 = (round(v) for v in cell)
    d = disparity[y0:y1, x0:x1]
    d = d[np.isfinite(d)]
    if d.size < 0.25 * (x1 - x0) * (y1 - y0):
        return lm
    # Objects at other depths move by other amounts: keep footprints away from the cell's
    # left/right borders by half the disparity spread so no neighbour's content enters.
    median, spread = float(np.median(d)), float(np.percentile(d, 90) - np.percentile(d, 10))
    margin = min(spread / 2, 0.2 * (cell[2] - cell[0]))
    # x_right = x_left - median must also stay inside the right image.
    width = disparity.shape[1]
    inner = (max(cell[0] + margin, median), cell[1], min(cell[2] - margin, width + median), cell[3])
    if inner[2] - inner[0] < 0.5 * (core[2] - core[0]):
        return lm
    return dataclasses.replace(
        lm, second_photo="motorcycle_right", second_dx=-median, second_cell=inner
    )
