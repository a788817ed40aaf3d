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

Everything derives from one seed: the same seed gives the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from apretrieval.demo import render as rd
from apretrieval.demo.sources import (
    CATALOGUE,
    CLUTTER,
    LANDMARK,
    available_photos,
    credits_markdown,
    motorcycle_disparity,
)

# Bump when the generator's output changes for a given config, so caches are rebuilt.
GENERATOR_VERSION = 2
DATASET_NAME = "demo"

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class BenchmarkConfig:
    """How the benchmark is generated (every field is part of the cache key)."""

    seed: int = 0
    image_size: int = 128  # long side of test images, px
    train_image_size: int = 128  # side of the (square) training images, px
    cell_size: int = 160  # target landmark cell size in source-photo pixels
    core_fraction: float = 0.7  # landmark core = this central fraction of its cell (per side)
    max_landmarks_per_photo: int = 10
    test_fraction: float = 0.4  # share of each photo's landmarks held out for testing
    query_landmark_fraction: float = 0.75  # test landmarks with queries; the rest distract
    queries_per_landmark: int = 2
    db_views_per_landmark: int = 10  # database views of each test landmark
    clutter_images: int = 30  # database images of clutter photos (no landmark)
    train_views_per_landmark: int = 24
    photos: tuple[str, ...] | None = None  # restrict source photos (None: all that load)

    def __post_init__(self) -> None:
        for name in ("image_size", "train_image_size", "cell_size"):
            if getattr(self, name) < 16:
                raise ValueError(f"{name} must be >= 16, got {getattr(self, name)}")
        for name in ("core_fraction", "test_fraction", "query_landmark_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("queries_per_landmark", "db_views_per_landmark", "train_views_per_landmark"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def key(self) -> str:
        """Short hash identifying the generated files."""
        blob = json.dumps([GENERATOR_VERSION, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


@dataclass(frozen=True)
class Benchmark:
    """Paths of a generated benchmark."""

    root: Path
    train_dir: Path  # image folder, one subfolder per landmark
    test_dir: Path  # Revisited layout
    gnd_file: Path
    name: str = DATASET_NAME
    info: dict = field(default_factory=dict)


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
        cells = [
            c for c in grid_cells(*photo.shape[:2], cfg.cell_size)
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
    key: str, index: int, cell: Box, cfg: BenchmarkConfig, split: str,
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


@dataclass
class _View:
    """A rendered view and the geometry needed to label it."""

    image: Image.Image
    h: np.ndarray  # canonical -> output homography
    placement: tuple[int, int, int, int]
    occluded: np.ndarray  # (H, W) bool
    difficulty: float
    second_view: bool


class _Renderer:
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
    ) -> _View:
        second = allow_second and lm.second_photo is not None and rng.uniform() < 0.5
        cell = lm.second_cell if second and lm.second_cell is not None else lm.cell
        cam = rd.sample_camera(
            rng, lm.core, cell, out_size, difficulty, scale_range=scale_range, far_prob=far_prob
        )
        photo = self.photos[lm.second_photo] if second else self.photos[lm.photo]  # type: ignore[index]
        quad = cam.quad + np.array([lm.second_dx, 0.0]) if second else cam.quad
        image, occluded = rd.render(
            rng, photo, quad, cam, self.clutter, difficulty, occlusion=occlusion
        )
        return _View(image, cam.h, cam.placement, occluded, difficulty, second)

    def clutter_view(self, rng: np.random.Generator, out_size: tuple[int, int]) -> Image.Image:
        """A distractor photograph showing no landmark."""
        k = int(rng.integers(len(self.clutter)))
        w, h = self.clutter[k].size
        whole: Box = (0.0, 0.0, float(w), float(h))
        pseudo = Landmark(id="clutter", photo="", cell=whole, core=shrink(whole, 0.6), split="")
        cam = rd.sample_camera(rng, pseudo.core, whole, out_size, rng.uniform(), far_prob=0.0)
        image, _ = rd.render(rng, self.clutter[k], cam.quad, cam, self.clutter, rng.uniform())
        return image


def _test_size(rng: np.random.Generator, long_side: int) -> tuple[int, int]:
    """Landscape or portrait frame with a random aspect ratio, (width, height)."""
    short = round(long_side * rng.uniform(0.7, 1.0))
    return (long_side, short) if rng.uniform() < 0.6 else (short, long_side)


def _stratified(rng: np.random.Generator, n: int) -> np.ndarray:
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


def _query(
    renderer: _Renderer, rng: np.random.Generator, lm: Landmark, long_side: int
) -> tuple[Image.Image, list[float], np.ndarray]:
    """A query photo with context, its box [x1, y1, x2, y2], canonical samples (N, 2) of it."""
    for _ in range(20):
        size = _test_size(rng, long_side)
        view = renderer.view(
            rng, lm, size, rng.uniform(0.0, 0.2), scale_range=(1.1, 1.45), occlusion=False,
            far_prob=0.0, allow_second=False,
        )
        # The query region: a random sub-rectangle of the landmark core, boxed in the photo.
        x0, y0, x1, y1 = lm.core
        fw, fh = rng.uniform(0.55, 0.95, 2)
        ox, oy = rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh)
        region = rd.rect_corners(
            x0 + ox * (x1 - x0), y0 + oy * (y1 - y0),
            x0 + (ox + fw) * (x1 - x0), y0 + (oy + fh) * (y1 - y0),
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


def _rng(cfg: BenchmarkConfig, *stream: int) -> np.random.Generator:
    """Independent stream per image, so one image never depends on how many came before."""
    return np.random.default_rng([cfg.seed, *stream])


def _save_jpeg(path: Path, image: Image.Image, rng: np.random.Generator) -> None:
    path.write_bytes(rd.jpeg_bytes(image, int(rng.integers(75, 96))))


def _db_view(
    renderer: _Renderer, rng: np.random.Generator, lm: Landmark, cfg: BenchmarkConfig,
    difficulty: float, lm_queries: list[dict],
) -> dict:
    """A database view of ``lm`` with the visible fraction of each of its queries' regions."""
    view = renderer.view(rng, lm, _test_size(rng, cfg.image_size), difficulty)
    visible = [rd.visible_fraction(q["samples"], view.h, view.placement, view.occluded)
               for q in lm_queries]
    return {"image": view.image, "landmark": lm.id, "difficulty": view.difficulty,
            "second_view": view.second_view, "visible": visible, "rng": rng}


def generate(root: Path, cfg: BenchmarkConfig, *, progress: bool = True) -> dict:
    """Write the benchmark into the empty folder ``root``; returns the manifest (also written)."""
    photos = available_photos(cfg.photos)
    landmarks = plan_landmarks(photos, cfg)
    train = [lm for lm in landmarks if lm.split == "train"]
    test = [lm for lm in landmarks if lm.split == "test"]
    if len(train) < 2 or not test:
        raise ValueError(
            f"too few landmarks ({len(train)} train, {len(test)} test): lower cell_size "
            f"({cfg.cell_size}) or use more photos"
        )
    renderer = _Renderer(photos)
    order = np.random.default_rng([cfg.seed, 2]).permutation(len(test))
    n_query_lm = max(1, round(len(test) * cfg.query_landmark_fraction))
    query_lms = [test[i] for i in sorted(order[:n_query_lm].tolist())]
    distractor_lms = [test[i] for i in sorted(order[n_query_lm:].tolist())]
    n_distractor_views = max(1, cfg.db_views_per_landmark // 2)
    total = (
        len(train) * cfg.train_views_per_landmark
        + len(query_lms) * (cfg.queries_per_landmark + cfg.db_views_per_landmark)
        + len(distractor_lms) * n_distractor_views + cfg.clutter_images
    )
    bar = tqdm(total=total, desc="generating benchmark", unit="img", disable=not progress)

    # Training set: image folder, one class per landmark.
    tsize = (cfg.train_image_size, cfg.train_image_size)
    for li, lm in enumerate(train):
        folder = root / "train" / lm.id
        folder.mkdir(parents=True)
        rng = _rng(cfg, 6, li)
        for k, d in enumerate(_stratified(rng, cfg.train_views_per_landmark)):
            vrng = _rng(cfg, 6, li, k)
            _save_jpeg(folder / f"{k:03d}.jpg", renderer.view(vrng, lm, tsize, d).image, vrng)
            bar.update()

    # Test set: queries, database views labelled against each query, distractors.
    queries: list[dict] = []  # name -> image, bbx, landmark, canonical samples
    db: list[dict] = []
    for li, lm in enumerate(query_lms):
        lm_queries = []
        for k in range(cfg.queries_per_landmark):
            qrng = _rng(cfg, 3, li, k)
            image, bbx, samples = _query(renderer, qrng, lm, cfg.image_size)
            lm_queries.append({"image": image, "bbx": bbx, "landmark": lm.id, "index": k,
                               "samples": samples, "rng": qrng})
            bar.update()
        rng = _rng(cfg, 4, li)
        planned = _stratified(rng, cfg.db_views_per_landmark).tolist()
        views = [_db_view(renderer, _rng(cfg, 4, li, k), lm, cfg, d, lm_queries)
                 for k, d in enumerate(planned)]
        bar.update(len(planned))
        # Every query needs an easy positive (Easy mAP is undefined otherwise): add clear
        # views of its region until one is easy.
        for qi in range(len(lm_queries)):
            for extra in range(8):
                if any(label_view(v["visible"][qi], v["difficulty"]) == "easy" for v in views):
                    break
                vrng = _rng(cfg, 8, li, qi, extra)
                views.append(_db_view(renderer, vrng, lm, cfg, vrng.uniform(0.0, 0.2), lm_queries))
                bar.total += 1
                bar.update()
        db.extend(views)
        queries.extend(lm_queries)
    for li, lm in enumerate(distractor_lms):
        for k in range(n_distractor_views):
            vrng = _rng(cfg, 5, li, k)
            view = renderer.view(vrng, lm, _test_size(vrng, cfg.image_size), vrng.uniform())
            db.append({"image": view.image, "landmark": lm.id, "difficulty": view.difficulty,
                       "second_view": view.second_view, "visible": [], "rng": vrng})
            bar.update()
    for k in range(cfg.clutter_images):
        vrng = _rng(cfg, 7, k)
        db.append({"image": renderer.clutter_view(vrng, _test_size(vrng, cfg.image_size)),
                   "landmark": None, "difficulty": None, "second_view": False, "visible": [],
                   "rng": vrng})
        bar.update()
    bar.close()
    return _write_test(root, cfg, landmarks, queries, db)


def _write_test(
    root: Path, cfg: BenchmarkConfig, landmarks: list[Landmark], queries: list[dict],
    db: list[dict],
) -> dict:
    """Write the Revisited-layout test set, the manifest and the README; returns the manifest."""
    jpg = root / "test" / "jpg"
    jpg.mkdir(parents=True)
    # Shuffle so that file order says nothing about landmarks (ties, adjacent names).
    shuffle = np.random.default_rng([cfg.seed, 9])
    db = [db[i] for i in shuffle.permutation(len(db))]
    queries = [queries[i] for i in shuffle.permutation(len(queries))]
    imlist = [f"db_{i:04d}" for i in range(len(db))]
    qimlist = [f"query_{i:03d}" for i in range(len(queries))]
    for name, item in zip(imlist + qimlist, db + queries, strict=True):
        _save_jpeg(jpg / f"{name}.jpg", item["image"], item["rng"])
    gnd = []
    for q in queries:
        lists: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
        for j, item in enumerate(db):
            if item["landmark"] == q["landmark"]:
                lists[label_view(item["visible"][q["index"]], item["difficulty"])].append(j)
        gnd.append({"bbx": [float(v) for v in q["bbx"]], **lists})
    # Plain lists, ints, floats and strings only, protocol 3: what the official files hold.
    with open(root / "test" / f"gnd_{DATASET_NAME}.pkl", "wb") as f:
        pickle.dump({"gnd": gnd, "imlist": imlist, "qimlist": qimlist}, f, protocol=3)

    query_ids = {q["landmark"] for q in queries}
    manifest = {
        "name": DATASET_NAME,
        "generator_version": GENERATOR_VERSION,
        "key": cfg.key(),
        "config": dataclasses.asdict(cfg),
        "counts": {
            "train_landmarks": sum(lm.split == "train" for lm in landmarks),
            "train_images": sum(1 for _ in (root / "train").glob("*/*.jpg")),
            "test_landmarks": sum(lm.split == "test" for lm in landmarks),
            "query_landmarks": len(query_ids),
            "queries": len(queries),
            "database": len(db),
            "positives_per_query": {
                k: float(np.mean([len(g[k]) for g in gnd])) for k in ("easy", "hard", "junk")
            },
        },
        "landmarks": [
            {"id": lm.id, "photo": lm.photo, "split": lm.split, "cell": lm.cell, "core": lm.core,
             "queries": lm.id in query_ids, "second_view": lm.second_photo}
            for lm in landmarks
        ],
        "database": [
            {"name": n, "landmark": d["landmark"], "difficulty": d["difficulty"],
             "second_view": d["second_view"]}
            for n, d in zip(imlist, db, strict=True)
        ],
        "queries": [
            {"name": n, "landmark": q["landmark"], "bbx": q["bbx"]}
            for n, q in zip(qimlist, queries, strict=True)
        ],
    }
    used = {lm.photo for lm in landmarks} | {p.key for p in CATALOGUE if p.role != LANDMARK}
    (root / "README.md").write_text(_readme(manifest, used), encoding="utf-8")
    # Written last: a folder with a manifest is complete.
    text = json.dumps(manifest, indent=1)
    (root / "manifest.json").write_text(text, encoding="utf-8")
    return json.loads(text)  # the cached form (tuples as lists), same as a later cache hit


def _readme(manifest: dict, photos: set[str]) -> str:
    c = manifest["counts"]
    return f"""# apretrieval demo benchmark (generated)

A small landmark-retrieval benchmark rendered from real photographs that ship inside Python
packages (scikit-image, matplotlib). Generator version {manifest["generator_version"]},
seed {manifest["config"]["seed"]}, cache key `{manifest["key"]}`.

Each photograph is cut into a grid of cells; the centre of a cell is one "landmark". Views of
a landmark are rendered with changes of viewpoint (perspective tilt, roll, partial crops,
zoom, far-away views framed by clutter), illumination and colour, blur, noise, JPEG and
occluders; the stereo motorcycle pair gives real second viewpoints. Views never leave their
cell, so different landmarks share no pixels, and train and test landmarks are disjoint.

- `train/<landmark>/*.jpg`: {c["train_images"]} images of {c["train_landmarks"]} landmarks.
- `test/`: Revisited Oxford/Paris layout: `jpg/<name>.jpg` and `gnd_{manifest["name"]}.pkl`
  (`imlist`, `qimlist`, `gnd[i] = {{bbx, easy, hard, junk}}`). {c["queries"]} queries of
  {c["query_landmarks"]} landmarks, {c["database"]} database images (views of
  {c["test_landmarks"]} test landmarks, the others distractors, plus clutter photos).
  Database views of a query's landmark are `easy` when they show at least half of the
  query's box under a mild change, `hard` when they show at least a quarter of it (or half of
  it under a strong change), `junk` otherwise.
- `manifest.json`: the configuration and every image's landmark and difficulty.

## Photographs and licences

{credits_markdown(photos)}"""


def prepare_benchmark(
    out_dir: str | os.PathLike, cfg: BenchmarkConfig | None = None, *, progress: bool = True
) -> Benchmark:
    """Generate the benchmark under ``out_dir/data`` unless the same one is already cached."""
    cfg = cfg or BenchmarkConfig()
    out = Path(out_dir)
    root = out / "data"
    manifest = root / "manifest.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text(encoding="utf-8"))
        if info.get("key") == cfg.key():
            return _benchmark(root, info)
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


def _benchmark(root: Path, info: dict) -> Benchmark:
    test = root / "test"
    return Benchmark(root=root, train_dir=root / "train", test_dir=test,
                     gnd_file=test / f"gnd_{info['name']}.pkl", name=info["name"], info=info)
