"""Miniatures of the published training-set files (GLDv2 shards, MD5 files and CSVs;
SfM-120k pickles and image archive), in exactly their formats, for a loopback host."""

from __future__ import annotations

import hashlib
import io
import pickle

import numpy as np
from PIL import Image

from apretrieval.data.sfm120k import cid_path
from loopback import FakeHost, tar_bytes


def jpeg(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def gldv2_id(i: int) -> str:
    return hashlib.sha1(b"%d" % i).hexdigest()[:16]


def member(image_id: str) -> str:
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def serve_gldv2_train(host: FakeHost, num_shards: int = 3, per_landmark: int = 3) -> dict:
    """Train shards of 3 landmarks x ``per_landmark`` images, dealt over ``num_shards`` shards,
    with their MD5 files and train_clean.csv. Returns id -> (landmark, shard)."""
    where: dict[str, tuple[int, int]] = {}
    members: list[dict[str, bytes]] = [{} for _ in range(num_shards)]
    rows = []
    n = 0
    for landmark in (7, 31, 2):
        ids = []
        for _ in range(per_landmark):
            image_id = gldv2_id(n)
            members[n % num_shards][member(image_id)] = jpeg(n)
            where[image_id] = (landmark, n % num_shards)
            ids.append(image_id)
            n += 1
        rows.append(f"{landmark},{' '.join(ids)}")
    for s, m in enumerate(members):
        data = tar_bytes(m)
        host.files[f"gldv2/train/images_{s:03d}.tar"] = data
        host.files[f"gldv2/md5sum/train/md5.images_{s:03d}.txt"] = (
            f"{md5(data)}  images_{s:03d}.tar\n".encode()
        )
    host.files["gldv2/metadata/train_clean.csv"] = (
        "landmark_id,images\n" + "\n".join(rows) + "\n"
    ).encode()
    return where


def sfm_cid(i: int) -> str:
    return hashlib.sha1(b"sfm%d" % i).hexdigest()[:20]


def sfm_db(num_clusters: int = 3, per_cluster: int = 4, num_val: int = 4) -> tuple[dict, dict]:
    """A retrieval-SfM-120k.pkl and -whiten.pkl in the published structure."""

    def part(offset: int, clusters: int, per: int) -> dict:
        cids = [sfm_cid(offset + i) for i in range(clusters * per)]
        cluster = [100 + i // per for i in range(clusters * per)]
        qidxs = [i for i in range(0, len(cids), per)]
        pidxs = [i + 1 for i in qidxs]
        return {"cids": cids, "cluster": cluster, "qidxs": qidxs, "pidxs": pidxs}

    db = {"train": part(0, num_clusters, per_cluster), "val": part(1000, 2, num_val // 2)}
    whiten = {"cids": db["train"]["cids"], "qidxs": [0, 4, 8], "pidxs": [1, 5, 9]}
    return db, whiten


def serve_sfm120k(host: FakeHost, db: dict, whiten: dict) -> None:
    cids = sorted({*db["train"]["cids"], *db["val"]["cids"]})
    members = {cid_path("", c).as_posix(): jpeg(i) for i, c in enumerate(cids)}
    host.files["sfm120k/ims.tar.gz"] = tar_bytes(members, mode="w:gz")
    host.files["sfm120k/retrieval-SfM-120k.pkl"] = pickle.dumps(db)
    host.files["sfm120k/retrieval-SfM-120k-whiten.pkl"] = pickle.dumps(whiten)


def serve_gldv2_retrieval(host: FakeHost) -> dict:
    """A GLDv2 retrieval benchmark whose answer is known whatever the model: six test images
    (A..E scored, F Ignored), an index of a copy of each of A..E plus two other images.
    A and C (Public / Private) have their own copy as the only relevant image: AP@100 = 1.
    B and E (Public / Private) have every index image *but* their own copy as relevant: the
    copy ranks first (identical image), the 6 others fill ranks 2..7, so
    AP@100 = (1/6) sum_{i=2..7} (i-1)/i. D (Private) has its copy and every other: AP = 1.
    Returns {"public": mAP@100, "private": mAP@100, "p1": {...}} by that arithmetic."""
    queries = {name: gldv2_id(1000 + i) for i, name in enumerate("ABCDEF")}
    images = {q: jpeg(50 + i, size=32) for i, q in enumerate(queries.values())}
    index: dict[str, bytes] = {}
    copy_of = {}
    for i, name in enumerate("ABCDE"):
        copy_id = gldv2_id(2000 + i)
        index[copy_id] = images[queries[name]]
        copy_of[name] = copy_id
    for i in range(2):
        index[gldv2_id(3000 + i)] = jpeg(90 + i, size=32)
    others = {name: [j for j in index if j != copy_of[name]] for name in "ABCDE"}
    solution = {
        "A": ([copy_of["A"]], "Public"),
        "B": (others["B"], "Public"),
        "C": ([copy_of["C"]], "Private"),
        "D": (list(index), "Private"),
        "E": (others["E"], "Private"),
    }
    rows = [f"{queries[n]},{' '.join(ids)},{usage}" for n, (ids, usage) in solution.items()]
    rows.append(f"{queries['F']},None,Ignored")
    for split, members in (
        ("index", index),
        ("test", {queries[n]: images[queries[n]] for n in "ABCDEF"}),
    ):
        data = tar_bytes({member(i): b for i, b in members.items()})
        host.files[f"gldv2/{split}/images_000.tar"] = data
        host.files[f"gldv2/md5sum/{split}/md5.images_000.txt"] = (
            f"{md5(data)}  images_000.tar\n".encode()
        )
    host.files["gldv2/metadata/index.csv"] = ("id\n" + "\n".join(index) + "\n").encode()
    host.files["gldv2/metadata/test.csv"] = ("id\n" + "\n".join(queries.values()) + "\n").encode()
    host.files["gldv2/ground_truth/retrieval_solution_v2.1.csv"] = (
        "id,images,Usage\n" + "\n".join(rows) + "\n"
    ).encode()
    v = sum((i - 1) / i for i in range(2, 8)) / 6
    return {
        "public": (1 + v) / 2,
        "private": (1 + 1 + v) / 3,
        "p1": {"public": 0.5, "private": 2 / 3},
    }
