"""Writing a generated benchmark: the Revisited Oxford/Paris test layout, manifest, README.

``test/`` holds ``jpg/<name>.jpg`` and ``gnd_<name>.pkl`` (``imlist``, ``qimlist``,
``gnd[i] = {bbx, easy, hard, junk}``), the official format; ``manifest.json`` holds the config
and every image's landmark and difficulty, and is written last (a folder with a manifest is
complete).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from apretrieval.demo import render as rd
from apretrieval.demo.config import DATASET_NAME, GENERATOR_VERSION, BenchmarkConfig
from apretrieval.demo.landmarks import Landmark
from apretrieval.demo.sources import CATALOGUE, LANDMARK, credits_markdown
from apretrieval.demo.views import label_view


def save_jpeg(path: Path, image: Image.Image, rng: np.random.Generator) -> None:
    path.write_bytes(rd.jpeg_bytes(image, int(rng.integers(75, 96))))


def write_test_set(
    root: Path,
    cfg: BenchmarkConfig,
    landmarks: list[Landmark],
    queries: list[dict[str, Any]],
    db: list[dict[str, Any]],
) -> dict[str, Any]:
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
        save_jpeg(jpg / f"{name}.jpg", item["image"], item["rng"])
    gnd: list[dict[str, list[float] | list[int]]] = []
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
            {
                "id": lm.id,
                "photo": lm.photo,
                "split": lm.split,
                "cell": lm.cell,
                "core": lm.core,
                "queries": lm.id in query_ids,
                "second_view": lm.second_photo,
            }
            for lm in landmarks
        ],
        "database": [
            {
                "name": n,
                "landmark": d["landmark"],
                "difficulty": d["difficulty"],
                "second_view": d["second_view"],
            }
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
    cached: dict[str, Any] = json.loads(text)
    return cached  # the cached form (tuples as lists), same as a later cache hit


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a generated benchmark folder; None when there is none (not finished)."""
    path = root / "manifest.json"
    if not path.is_file():
        return None
    info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return info


def _readme(manifest: dict[str, Any], photos: set[str]) -> str:
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
