"""A small landmark-retrieval benchmark generated from real photographs shipped in packages.

Large photographs are cut into a grid of *cells*; each cell holds one landmark (its central
*core*). Views of a landmark never leave its cell, so different landmarks share no pixels.
Landmarks are split into disjoint train and test sets:

- ``train/<landmark>/<k>.jpg``: an image folder, one class per landmark;
- ``test/``: the official Revisited Oxford/Paris layout, ``jpg/<name>.jpg`` and
  ``gnd_<name>.pkl`` (``imlist``, ``qimlist``, ``gnd[i] = {bbx, easy, hard, junk}``). Queries
  show their landmark with context and a bounding box; every database view of the same
  landmark is labelled from how much of the query region it shows (and how hard the view is):
  ``easy``, ``hard`` or ``junk``. Views of other landmarks and clutter photos are negatives.

Everything derives from one seed: the same seed gives the same files. This module runs the
generator and caches its output; the steps live in ``config`` (settings, named sizes),
``landmarks`` (cells and the train/test split), ``views`` (rendering and labelling) and
``layout`` (the files written). ``BenchmarkConfig.preset("large")`` is a bigger benchmark
from the same generator (more, smaller landmarks per photo; over 200 queries and 2000
database images).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from apretrieval.demo.config import (
    DATASET_NAME,
    BenchmarkConfig,
)
from apretrieval.demo.landmarks import (
    Landmark,
    plan_landmarks,
)
from apretrieval.demo.layout import read_manifest, save_jpeg, write_test_set
from apretrieval.demo.sources import available_photos
from apretrieval.demo.views import (
    Renderer,
    db_view,
    frame_size,
    label_view,
    query_view,
    stratified,
)

__all__ = [
    "Benchmark",
    "generate",
    "planned_counts",
    "prepare_benchmark",
]


@dataclass(frozen=True)
class Benchmark:
    """Paths of a generated benchmark."""

    root: Path
    train_dir: Path  # image folder, one subfolder per landmark
    test_dir: Path  # Revisited layout
    gnd_file: Path
    name: str = DATASET_NAME
    info: dict[str, Any] = field(default_factory=dict)


def generate(root: Path, cfg: BenchmarkConfig, *, progress: bool = True) -> dict[str, Any]:
    """Write the benchmark into the empty folder ``root``; returns the manifest (also written)."""
    photos = available_photos(cfg.photos)
    landmarks = plan_landmarks(photos, cfg)
    train, query_lms, distractor_lms = _roles(landmarks, cfg)
    renderer = Renderer(photos)
    total = sum(planned_counts(landmarks, cfg).values())
    bar = tqdm(total=total, desc="generating benchmark", unit="img", disable=not progress)
    _write_train_set(root, cfg, renderer, train, bar)
    queries, db = _render_test_set(cfg, renderer, query_lms, distractor_lms, bar)
    bar.close()
    return write_test_set(root, cfg, landmarks, queries, db)


def _roles(
    landmarks: list[Landmark], cfg: BenchmarkConfig
) -> tuple[list[Landmark], list[Landmark], list[Landmark]]:
    """(train, query, distractor) landmarks: test landmarks with queries or without."""
    train = [lm for lm in landmarks if lm.split == "train"]
    test = [lm for lm in landmarks if lm.split == "test"]
    if len(train) < 2 or not test:
        raise ValueError(
            f"too few landmarks ({len(train)} train, {len(test)} test): lower cell_size "
            f"({cfg.cell_size}) or use more photos"
        )
    order = np.random.default_rng([cfg.seed, 2]).permutation(len(test))
    n_query_lm = max(1, round(len(test) * cfg.query_landmark_fraction))
    query_lms = [test[i] for i in sorted(order[:n_query_lm].tolist())]
    distractor_lms = [test[i] for i in sorted(order[n_query_lm:].tolist())]
    return train, query_lms, distractor_lms


def planned_counts(landmarks: list[Landmark], cfg: BenchmarkConfig) -> dict[str, int]:
    """Images the generator renders for ``landmarks`` (from :func:`plan_landmarks`).

    ``database`` is a lower bound: a few clear views are added when a query has no easy
    positive yet.
    """
    train, query_lms, distractor_lms = _roles(landmarks, cfg)
    return {
        "train_images": len(train) * cfg.train_views_per_landmark,
        "queries": len(query_lms) * cfg.queries_per_landmark,
        "database": len(query_lms) * cfg.db_views_per_landmark
        + len(distractor_lms) * _distractor_views(cfg)
        + cfg.clutter_images,
    }


def _distractor_views(cfg: BenchmarkConfig) -> int:
    """Database views of each test landmark without queries."""
    return max(1, cfg.db_views_per_landmark // 2)


def _write_train_set(
    root: Path, cfg: BenchmarkConfig, renderer: Renderer, train: list[Landmark], bar: tqdm[Any]
) -> None:
    """``train/<landmark>/<k>.jpg``: an image folder, one class per landmark."""
    tsize = (cfg.train_image_size, cfg.train_image_size)
    for li, lm in enumerate(train):
        folder = root / "train" / lm.id
        folder.mkdir(parents=True)
        rng = cfg.rng(6, li)
        for k, d in enumerate(stratified(rng, cfg.train_views_per_landmark)):
            vrng = cfg.rng(6, li, k)
            save_jpeg(folder / f"{k:03d}.jpg", renderer.view(vrng, lm, tsize, d).image, vrng)
            bar.update()


def _render_test_set(
    cfg: BenchmarkConfig,
    renderer: Renderer,
    query_lms: list[Landmark],
    distractor_lms: list[Landmark],
    bar: tqdm[Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Queries, database views labelled against each query, distractors (in memory)."""
    # Queries: image, bbx, landmark, canonical samples of the query region.
    queries: list[dict[str, Any]] = []
    db: list[dict[str, Any]] = []
    for li, lm in enumerate(query_lms):
        lm_queries = []
        for k in range(cfg.queries_per_landmark):
            qrng = cfg.rng(3, li, k)
            image, bbx, samples = query_view(renderer, qrng, lm, cfg.image_size)
            lm_queries.append(
                {
                    "image": image,
                    "bbx": bbx,
                    "landmark": lm.id,
                    "index": k,
                    "samples": samples,
                    "rng": qrng,
                }
            )
            bar.update()
        rng = cfg.rng(4, li)
        planned = stratified(rng, cfg.db_views_per_landmark).tolist()
        views = [
            db_view(renderer, cfg.rng(4, li, k), lm, cfg, d, lm_queries)
            for k, d in enumerate(planned)
        ]
        bar.update(len(planned))
        # Every query needs an easy positive (Easy mAP is undefined otherwise): add clear
        # views of its region until one is easy.
        for qi in range(len(lm_queries)):
            for extra in range(8):
                if any(label_view(v["visible"][qi], v["difficulty"]) == "easy" for v in views):
                    break
                vrng = cfg.rng(8, li, qi, extra)
                views.append(db_view(renderer, vrng, lm, cfg, vrng.uniform(0.0, 0.2), lm_queries))
                bar.total = (bar.total or 0) + 1
                bar.update()
        db.extend(views)
        queries.extend(lm_queries)
    for li, lm in enumerate(distractor_lms):
        for k in range(_distractor_views(cfg)):
            vrng = cfg.rng(5, li, k)
            view = renderer.view(vrng, lm, frame_size(vrng, cfg.image_size), vrng.uniform())
            db.append(
                {
                    "image": view.image,
                    "landmark": lm.id,
                    "difficulty": view.difficulty,
                    "second_view": view.second_view,
                    "visible": [],
                    "rng": vrng,
                }
            )
            bar.update()
    for k in range(cfg.clutter_images):
        vrng = cfg.rng(7, k)
        db.append(
            {
                "image": renderer.clutter_view(vrng, frame_size(vrng, cfg.image_size)),
                "landmark": None,
                "difficulty": None,
                "second_view": False,
                "visible": [],
                "rng": vrng,
            }
        )
        bar.update()
    return queries, db


def prepare_benchmark(
    out_dir: str | os.PathLike[str], cfg: BenchmarkConfig | None = None, *, progress: bool = True
) -> Benchmark:
    """Generate the benchmark under ``out_dir/data`` unless the same one is already cached."""
    cfg = cfg or BenchmarkConfig()
    out = Path(out_dir)
    root = out / "data"
    cached = read_manifest(root)
    if cached is not None and cached.get("key") == cfg.key():
        return _benchmark(root, cached)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".data-", dir=out))
    try:
        info = generate(tmp, cfg, progress=progress)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _benchmark(root, info)


def _benchmark(root: Path, info: dict[str, Any]) -> Benchmark:
    test = root / "test"
    return Benchmark(
        root=root,
        train_dir=root / "train",
        test_dir=test,
        gnd_file=test / f"gnd_{info['name']}.pkl",
        name=info["name"],
        info=info,
    )
