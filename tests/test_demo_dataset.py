"""The demo benchmark generator: determinism, Revisited layout, ground-truth validity, splits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage", reason="the demo photographs ship with scikit-image")

from apretrieval.data.decode import crop_box
from apretrieval.data.revisited import load_gnd
from apretrieval.demo import render as rd
from apretrieval.demo.config import BENCHMARK_SIZES, BenchmarkConfig
from apretrieval.demo.dataset import planned_counts, prepare_benchmark
from apretrieval.demo.landmarks import grid_cells, plan_landmarks
from apretrieval.demo.sources import CATALOGUE, LANDMARK, available_photos
from apretrieval.demo.views import label_view
from apretrieval.evaluation import evaluate_revisited

# Small and fast: a few photos, tiny images, few views.
SMALL = BenchmarkConfig(
    seed=3,
    image_size=64,
    train_image_size=48,
    cell_size=200,
    max_landmarks_per_photo=4,
    queries_per_landmark=2,
    db_views_per_landmark=6,
    clutter_images=5,
    train_views_per_landmark=3,
    photos=("astronaut", "coffee", "rocket", "camera", "brick", "grass"),
)


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return prepare_benchmark(tmp_path_factory.mktemp("demo"), SMALL, progress=False)


@pytest.fixture(scope="module")
def gnd(bench):
    return load_gnd(bench.gnd_file)


@pytest.fixture(scope="module")
def photos():
    return available_photos()


def test_every_catalogue_photo_loads_offline(photos):
    for source in CATALOGUE:
        assert source.key in photos, f"{source.key} did not load"
        image = photos[source.key]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert min(image.shape[:2]) >= 150


def test_same_seed_same_files_other_seed_other_files(bench, tmp_path):
    again = prepare_benchmark(tmp_path / "a", SMALL, progress=False)
    assert _digest(again.root) == _digest(bench.root)
    other = prepare_benchmark(
        tmp_path / "b", BenchmarkConfig(**{**vars(SMALL), "seed": 4}), progress=False
    )
    assert _digest(other.test_dir / "jpg") != _digest(bench.test_dir / "jpg")


def test_cached_unless_config_changes(tmp_path):
    cfg = BenchmarkConfig(**{**vars(SMALL), "photos": ("coffee", "rocket", "grass")})
    first = prepare_benchmark(tmp_path, cfg, progress=False)
    stamp = (first.root / "manifest.json").stat().st_mtime_ns
    assert prepare_benchmark(tmp_path, cfg, progress=False).info == first.info
    assert (first.root / "manifest.json").stat().st_mtime_ns == stamp
    changed = prepare_benchmark(
        tmp_path, BenchmarkConfig(**{**vars(cfg), "seed": 9}), progress=False
    )
    assert changed.info["key"] != first.info["key"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".data-")]  # no leftovers


def test_revisited_layout(bench, gnd):
    assert bench.gnd_file == bench.test_dir / "gnd_demo.pkl"
    names = gnd["imlist"] + gnd["qimlist"]
    assert len(set(names)) == len(names)  # queries are not in the database
    assert not set(gnd["qimlist"]) & set(gnd["imlist"])
    files = {p.stem for p in (bench.test_dir / "jpg").glob("*.jpg")}
    assert files == set(names)
    for name in gnd["qimlist"][:3] + gnd["imlist"][:3]:
        with Image.open(bench.test_dir / "jpg" / f"{name}.jpg") as im:
            assert im.mode == "RGB" and max(im.size) == SMALL.image_size


def test_ground_truth_is_valid(bench, gnd):
    n = len(gnd["imlist"])
    for entry, qname in zip(gnd["gnd"], gnd["qimlist"], strict=True):
        lists = [entry[k] for k in ("easy", "hard", "junk")]
        for lst in lists:
            assert lst == sorted(set(lst)) and all(0 <= j < n for j in lst)
        assert not (
            set(lists[0]) & set(lists[1])
            or set(lists[0]) & set(lists[2])
            or set(lists[1]) & set(lists[2])
        )
        assert entry["easy"], "every query has an easy positive"
        with Image.open(bench.test_dir / "jpg" / f"{qname}.jpg") as im:
            x1, y1, x2, y2 = crop_box(entry["bbx"], im.size)
            assert (x2 - x1) * (y2 - y1) >= 0.2 * im.size[0] * im.size[1]


def test_labels_follow_landmarks(bench, gnd):
    info = bench.info
    db_landmark = [d["landmark"] for d in info["database"]]
    assert [d["name"] for d in info["database"]] == gnd["imlist"]
    for entry, q in zip(gnd["gnd"], info["queries"], strict=True):
        same = {j for j, lm in enumerate(db_landmark) if lm == q["landmark"]}
        labelled = set(entry["easy"]) | set(entry["hard"]) | set(entry["junk"])
        assert labelled == same  # every view of the landmark is labelled, nothing else is
    assert None in db_landmark  # clutter distractors
    query_lms = {q["landmark"] for q in info["queries"]}
    assert set(db_landmark) - query_lms - {None}, "views of distractor landmarks"


def test_a_perfect_ranking_scores_one(gnd, bench):
    # Rank every view of the query's landmark above everything else.
    db_landmark = np.array([str(d["landmark"]) for d in bench.info["database"]])
    q_landmark = np.array([q["landmark"] for q in bench.info["queries"]])
    scores = (q_landmark[:, None] == db_landmark[None, :]).astype(np.float64)
    res = evaluate_revisited(scores, gnd["gnd"])
    for protocol in ("easy", "medium", "hard"):
        assert res[protocol]["mAP"] == pytest.approx(1.0)
    reversed_res = evaluate_revisited(-scores, gnd["gnd"])
    assert reversed_res["medium"]["mAP"] < 0.5


def test_train_and_test_landmarks_are_disjoint(bench):
    train_classes = {p.name for p in bench.train_dir.iterdir() if p.is_dir()}
    landmarks = bench.info["landmarks"]
    test_ids = {lm["id"] for lm in landmarks if lm["split"] == "test"}
    assert train_classes == {lm["id"] for lm in landmarks if lm["split"] == "train"}
    assert train_classes and test_ids and not train_classes & test_ids
    assert {d["landmark"] for d in bench.info["database"]} - {None} <= test_ids
    # No two landmarks of one photo overlap, so no pixel is shared between train and test.
    for a in landmarks:
        for b in landmarks:
            if a["id"] < b["id"] and a["photo"] == b["photo"]:
                ax0, ay0, ax1, ay1 = a["cell"]
                bx0, by0, bx1, by1 = b["cell"]
                assert min(ax1, bx1) <= max(ax0, bx0) or min(ay1, by1) <= max(ay0, by0)
    per_class = [len(list(bench.train_dir.glob(f"{c}/*.jpg"))) for c in train_classes]
    assert set(per_class) == {SMALL.train_views_per_landmark}


def test_split_holds_out_part_of_every_photo(photos):
    lms = plan_landmarks(photos, BenchmarkConfig())
    by_photo: dict[str, set[str]] = {}
    for lm in lms:
        by_photo.setdefault(lm.photo, set()).add(lm.split)
    landmark_photos = {p.key for p in CATALOGUE if p.role == LANDMARK}
    assert set(by_photo) <= landmark_photos
    multi = [p for p in by_photo if sum(lm.photo == p for lm in lms) > 1]
    assert multi and all(by_photo[p] == {"train", "test"} for p in multi)
    # The stereo pair provides a real second viewpoint.
    assert any(lm.second_photo == "motorcycle_right" for lm in lms)


def test_readme_credits_every_photo(bench):
    text = (bench.root / "README.md").read_text(encoding="utf-8")
    for key in {lm["photo"] for lm in bench.info["landmarks"]}:
        assert f"`{key}`" in text
    assert "licence" in text.lower()
    assert json.loads((bench.root / "manifest.json").read_text())["key"] == SMALL.key()


def test_default_size_is_the_demo_benchmark(photos):
    # README and BENCHMARKS numbers come from this benchmark: its config (and so its cache
    # key and files) must not change under the default name.
    assert BenchmarkConfig.preset("default", seed=3) == BenchmarkConfig(seed=3)
    assert BenchmarkConfig.preset().key() == BenchmarkConfig().key() == "1621acddddea7474"
    default = BenchmarkConfig()
    counts = planned_counts(plan_landmarks(photos, default), default)
    assert counts == {"train_images": 1296, "queries": 54, "database": 345}


def test_large_size_has_200_queries_and_2000_database_images(photos):
    for seed in (0, 1):
        large = BenchmarkConfig.preset("large", seed=seed)
        landmarks = plan_landmarks(photos, large)
        counts = planned_counts(landmarks, large)
        assert counts["queries"] >= 200 and counts["database"] >= 2000, counts
        default = plan_landmarks(photos, BenchmarkConfig(seed=seed))
        # More landmarks cut from the same catalogue photos (smaller cells: some small photos
        # only yield a landmark with them).
        landmark_photos = {p.key for p in CATALOGUE if p.role == LANDMARK}
        assert {lm.photo for lm in default} <= {lm.photo for lm in landmarks} <= landmark_photos
        assert len(landmarks) >= 2.5 * len(default)


def test_planned_counts_match_the_generated_files(bench):
    counts = planned_counts(plan_landmarks(available_photos(SMALL.photos), SMALL), SMALL)
    made = bench.info["counts"]
    assert counts["train_images"] == made["train_images"]
    assert counts["queries"] == made["queries"]
    # Clear views are only ever added (at most 8 per query) so that every query has an easy one.
    assert counts["database"] <= made["database"] <= counts["database"] + 8 * made["queries"]


def test_large_settings_generate_a_valid_benchmark(tmp_path):
    # The large size's geometry and query counts, on tiny images of two photos.
    cfg = BenchmarkConfig(
        **{
            **BENCHMARK_SIZES["large"],
            "seed": 5,
            "image_size": 40,
            "train_image_size": 32,
            "db_views_per_landmark": 4,
            "clutter_images": 3,
            "train_views_per_landmark": 2,
            "photos": ("coffee", "brick"),
        }
    )
    bench = prepare_benchmark(tmp_path, cfg, progress=False)
    gnd = load_gnd(bench.gnd_file)
    by_landmark: dict[str, int] = {}
    for q in bench.info["queries"]:
        by_landmark[q["landmark"]] = by_landmark.get(q["landmark"], 0) + 1
    assert set(by_landmark.values()) == {BENCHMARK_SIZES["large"]["queries_per_landmark"]}
    assert len(gnd["qimlist"]) == bench.info["counts"]["queries"] >= 6
    for entry in gnd["gnd"]:
        assert entry["easy"]


def test_bad_config_is_a_value_error():
    with pytest.raises(ValueError, match="image_size"):
        BenchmarkConfig(image_size=4)
    with pytest.raises(ValueError, match="test_fraction"):
        BenchmarkConfig(test_fraction=0.0)
    with pytest.raises(ValueError, match="huge"):
        BenchmarkConfig.preset("huge")


# Geometry helpers.


def test_homography_maps_the_four_points_and_inverts():
    rng = np.random.default_rng(0)
    src = rd.rect_corners(0, 0, 100, 60) + rng.uniform(-10, 10, (4, 2))
    dst = rd.rect_corners(5, 7, 80, 90)
    h = rd.homography(src, dst)
    np.testing.assert_allclose(rd.apply_h(h, src), dst, atol=1e-9)
    pts = rng.uniform(0, 60, (10, 2))
    np.testing.assert_allclose(rd.apply_h(np.linalg.inv(h), rd.apply_h(h, pts)), pts, atol=1e-8)


def test_fit_quad_stays_inside_the_box():
    rng = np.random.default_rng(1)
    box = (10.0, 20.0, 110.0, 70.0)
    for _ in range(50):
        quad = rng.uniform(-100, 200, (4, 2))
        out = rd.fit_quad(quad, box)
        assert (out[:, 0] >= box[0] - 1e-9).all() and (out[:, 0] <= box[2] + 1e-9).all()
        assert (out[:, 1] >= box[1] - 1e-9).all() and (out[:, 1] <= box[3] + 1e-9).all()


def test_sampled_cameras_never_leave_their_cell():
    rng = np.random.default_rng(2)
    cell = (100.0, 50.0, 340.0, 290.0)
    core = (136.0, 86.0, 304.0, 254.0)
    for d in np.linspace(0, 1, 30):
        cam = rd.sample_camera(rng, core, cell, (64, 48), d)
        assert (cam.quad >= np.array(cell[:2]) - 1e-9).all()
        assert (cam.quad <= np.array(cell[2:]) + 1e-9).all()


def test_visible_fraction():
    quad = rd.rect_corners(0, 0, 100, 100)
    h = rd.homography(quad, rd.rect_corners(0, 0, 50, 50))
    gu, gv = np.meshgrid(np.linspace(1, 99, 10), np.linspace(1, 99, 10))
    pts = np.c_[gu.ravel(), gv.ravel()]
    clear = np.zeros((50, 50), dtype=bool)
    assert rd.visible_fraction(pts, h, (0, 0, 50, 50), clear) == 1.0
    assert rd.visible_fraction(pts + 500, h, (0, 0, 50, 50), clear) == 0.0
    half = clear.copy()
    half[:, :25] = True  # left half occluded
    assert rd.visible_fraction(pts, h, (0, 0, 50, 50), half) == pytest.approx(0.5)


def test_label_view_thresholds():
    assert label_view(0.9, 0.1) == "easy"
    assert label_view(0.9, 0.9) == "hard"
    assert label_view(0.3, 0.1) == "hard"
    assert label_view(0.1, 0.1) == "junk"
    assert label_view(0.0, 0.0) == "junk"


def test_grid_cells_tile_the_photo():
    cells = grid_cells(300, 451, 240)
    assert len(cells) == 2
    area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in cells)
    assert area == pytest.approx(300 * 451)
