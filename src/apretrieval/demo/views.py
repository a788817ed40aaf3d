"""The benchmark's images of landmarks: training views, queries, database views, clutter.

Each view comes with the geometry needed to label it against a query (how much of the query
region it shows, and how hard the view is): see :func:`label_view`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from apretrieval.demo import render as rd
from apretrieval.demo.config import BenchmarkConfig
from apretrieval.demo.landmarks import Box, Landmark, shrink
from apretrieval.demo.sources import CATALOGUE, CLUTTER


@dataclass
class View:
    """A rendered view and the geometry needed to label it."""

    image: Image.Image
    h: np.ndarray  # canonical -> output homography
    placement: tuple[int, int, int, int]
    occluded: np.ndarray  # (H, W) bool
    difficulty: float
    second_view: bool


class Renderer:
    """Renders views of landmarks and clutter photos (holds the photos as PIL images)."""

    def __init__(self, photos: dict[str, np.ndarray]) -> None:
        self.photos = {k: Image.fromarray(v) for k, v in photos.items()}
        clutter_keys = [p.key for p in CATALOGUE if p.role == CLUTTER and p.key in photos]
        if not clutter_keys:
            raise ValueError("no clutter photo could be loaded (scikit-image missing?)")
        self.clutter = [self.photos[k] for k in clutter_keys]

    def view(
        self,
        rng: np.random.Generator,
        lm: Landmark,
        out_size: tuple[int, int],
        difficulty: float,
        *,
        scale_range: tuple[float, float] | None = None,
        occlusion: bool = True,
        far_prob: float = 0.4,
        allow_second: bool = True,
    ) -> View:
        second = allow_second and lm.second_photo is not None and rng.uniform() < 0.5
        cell = lm.second_cell if second and lm.second_cell is not None else lm.cell
        cam = rd.sample_camera(
            rng, lm.core, cell, out_size, difficulty, scale_range=scale_range, far_prob=far_prob
        )
        photo = self.photos[lm.second_photo if second and lm.second_photo is not None else lm.photo]
        quad = cam.quad + np.array([lm.second_dx, 0.0]) if second else cam.quad
        image, occluded = rd.render(
            rng, photo, quad, cam, self.clutter, difficulty, occlusion=occlusion
        )
        return View(image, cam.h, cam.placement, occluded, difficulty, second)

    def clutter_view(self, rng: np.random.Generator, out_size: tuple[int, int]) -> Image.Image:
        """A distractor photograph showing no landmark."""
        k = int(rng.integers(len(self.clutter)))
        w, h = self.clutter[k].size
        whole: Box = (0.0, 0.0, float(w), float(h))
        pseudo = Landmark(id="clutter", photo="", cell=whole, core=shrink(whole, 0.6), split="")
        cam = rd.sample_camera(rng, pseudo.core, whole, out_size, rng.uniform(), far_prob=0.0)
        image, _ = rd.render(rng, self.clutter[k], cam.quad, cam, self.clutter, rng.uniform())
        return image


def frame_size(rng: np.random.Generator, long_side: int) -> tuple[int, int]:
    """Landscape or portrait frame with a random aspect ratio, (width, height)."""
    short = round(long_side * rng.uniform(0.7, 1.0))
    return (long_side, short) if rng.uniform() < 0.6 else (short, long_side)


def stratified(rng: np.random.Generator, n: int) -> np.ndarray:
    """n difficulties covering [0, 1] evenly (one per stratum), shuffled."""
    return rng.permutation((np.arange(n) + rng.uniform(size=n)) / n)


def label_view(visible: float, difficulty: float) -> str:
    """Revisited-style label of a view of the query's landmark.

    easy: most of the query region, clearly shown; hard: a good part of it, or most of it
    under a strong change of viewpoint / light / occlusion; junk: too little of it to tell.
    """
    if visible >= 0.5 and difficulty <= 0.5:
        return "easy"
    if visible >= 0.25:
        return "hard"
    return "junk"


def query_view(
    renderer: Renderer, rng: np.random.Generator, lm: Landmark, long_side: int
) -> tuple[Image.Image, list[float], np.ndarray]:
    """A query photo with context, its box [x1, y1, x2, y2], canonical samples (N, 2) of it."""
    for _ in range(20):
        size = frame_size(rng, long_side)
        view = renderer.view(
            rng,
            lm,
            size,
            rng.uniform(0.0, 0.2),
            scale_range=(1.1, 1.45),
            occlusion=False,
            far_prob=0.0,
            allow_second=False,
        )
        # The query region: a random sub-rectangle of the landmark core, boxed in the photo.
        x0, y0, x1, y1 = lm.core
        fw, fh = rng.uniform(0.55, 0.95, 2)
        ox, oy = rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh)
        region = rd.rect_corners(
            x0 + ox * (x1 - x0),
            y0 + oy * (y1 - y0),
            x0 + (ox + fw) * (x1 - x0),
            y0 + (oy + fh) * (y1 - y0),
        )
        uv = rd.apply_h(view.h, region)
        bx0, by0 = np.clip(uv.min(0), 0, size)
        bx1, by1 = np.clip(uv.max(0), 0, size)
        if (bx1 - bx0) * (by1 - by0) < 0.2 * size[0] * size[1]:
            continue
        gu, gv = np.meshgrid(np.linspace(bx0, bx1, 24), np.linspace(by0, by1, 24))
        samples = rd.apply_h(np.linalg.inv(view.h), np.c_[gu.ravel(), gv.ravel()])
        bbx = [round(float(v), 1) for v in (bx0, by0, bx1, by1)]
        return view.image, bbx, samples
    raise AssertionError("could not place a query box")  # unreachable for sane configs


def db_view(
    renderer: Renderer,
    rng: np.random.Generator,
    lm: Landmark,
    cfg: BenchmarkConfig,
    difficulty: float,
    lm_queries: list[dict[str, Any]],
) -> dict[str, Any]:
    """A database view of ``lm`` with the visible fraction of each of its queries' regions."""
    view = renderer.view(rng, lm, frame_size(rng, cfg.image_size), difficulty)
    visible = [
        rd.visible_fraction(q["samples"], view.h, view.placement, view.occluded) for q in lm_queries
    ]
    return {
        "image": view.image,
        "landmark": lm.id,
        "difficulty": view.difficulty,
        "second_view": view.second_view,
        "visible": visible,
        "rng": rng,
    }
