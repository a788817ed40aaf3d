"""Exact chunked k-NN, faiss indexes (flat == knn, IVF-PQ recall), index files and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apretrieval.descriptors import FeatureSet, load_features
from apretrieval.faiss_index import IndexConfig, SearchIndex, build_index, load_index
from apretrieval.search import knn, ranked_ids, rerank_candidates
from conftest import without_thread_line


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: the full score matrix in float64, sorted by (score desc, index asc)."""
    s = q.astype(np.float64) @ db.astype(np.float64).T
    idx = np.lexsort((np.broadcast_to(np.arange(db.shape[0]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    db = _unit(rng, 3000, 48)
    q = _unit(rng, 37, 48)
    return q, db


# ---------------------------------------------------------------------------------- knn


@pytest.mark.parametrize("block_elements", [64, 37 * 10, 37 * 777, 10**9])
def test_knn_matches_full_sort_for_any_chunking(data, block_elements):
    q, db = data
    s, i = knn(q, db, 10, block_elements=block_elements)
    ref_s, ref_i = _brute(q, db, 10)
    assert s.shape == i.shape == (37, 10)
    assert s.dtype == np.float32 and i.dtype == np.int64
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-6)
    assert (np.diff(s, axis=1) <= 0).all()


def test_knn_chunking_does_not_change_results_bitwise(data):
    q, db = data
    s1, i1 = knn(q, db, 25, block_elements=500)
    s2, i2 = knn(q, db, 25)
    np.testing.assert_array_equal(i1, i2)
    # Every score is one dot product of the same rows; only BLAS blocking could differ.
    np.testing.assert_allclose(s1, s2, atol=1e-6)


def test_knn_ties_are_ordered_by_index_whatever_the_chunks():
    db = np.ones((50, 4), dtype=np.float32)
    q = np.ones((2, 4), dtype=np.float32)
    for block in (4, 13, 10**6):
        s, i = knn(q, db, 7, block_elements=block)
        np.testing.assert_array_equal(i, np.tile(np.arange(7), (2, 1)))
        assert (s == 4.0).all()


def test_knn_torch_in_torch_out_and_memmap(data, tmp_path):
    q, db = data
    path = tmp_path / "db.npy"
    np.save(path, db)
    mm = np.load(path, mmap_mode="r")
    s_np, i_np = knn(q, mm, 5, block_elements=1000)
    s_t, i_t = knn(torch.from_numpy(q), torch.from_numpy(db), 5)
    assert isinstance(s_t, torch.Tensor) and s_t.dtype == torch.float32
    assert i_t.dtype == torch.int64
    np.testing.assert_array_equal(i_t.numpy(), i_np)
    np.testing.assert_allclose(s_t.numpy(), s_np, atol=1e-6)


def test_knn_float64_stays_float64(data):
    q, db = data
    s, i = knn(q.astype(np.float64), db.astype(np.float64), 3)
    ref_s, ref_i = _brute(q, db, 3)
    assert s.dtype == np.float64
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, rtol=0, atol=1e-12)


def test_knn_rejects_non_finite_descriptors(data):
    q, db = data
    bad = db.copy()
    bad[1234, 5] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        knn(q, bad, 3)
    with pytest.raises(ValueError, match="NaN/inf"):
        knn(torch.full((1, 48), torch.inf), torch.from_numpy(db), 3)


def test_knn_pads_like_faiss_when_k_exceeds_database():
    rng = np.random.default_rng(1)
    db, q = _unit(rng, 4, 8), _unit(rng, 3, 8)
    s, i = knn(q, db, 6)
    assert (i[:, 4:] == -1).all() and np.isneginf(s[:, 4:]).all()
    assert sorted(i[0, :4].tolist()) == [0, 1, 2, 3]
    s0, i0 = knn(q, db[:0], 2)
    assert (i0 == -1).all() and np.isneginf(s0).all()


@pytest.mark.parametrize(
    ("queries", "database", "k", "match"),
    [
        (np.zeros((2, 3), np.float32), np.zeros((5, 4), np.float32), 1, "dimensions differ"),
        (np.zeros((2, 3), np.float32), np.zeros((5, 3), np.float32), 0, "k must be"),
        (np.zeros(3, np.float32), np.zeros((5, 3), np.float32), 1, r"shape \(N, D\)"),
        ([[0.0]], np.zeros((5, 1), np.float32), 1, "numpy array or torch tensor"),
    ],
)
def test_knn_rejects_bad_input(queries, database, k, match):
    with pytest.raises(ValueError, match=match):
        knn(queries, database, k)


# ---------------------------------------------------------------------------------- faiss


def test_flat_faiss_equals_knn(data):
    q, db = data
    idx = SearchIndex(build_index(db), [f"im{i}" for i in range(len(db))])
    for k in (1, 10, 100):
        fs, fi = idx.search(q, k)
        s, i = knn(q, db, k)
        np.testing.assert_array_equal(fi, i)
        # faiss and torch call different BLAS kernels: scores agree to float32 rounding.
        np.testing.assert_allclose(fs, s, rtol=0, atol=2e-7)


def test_flat_faiss_equals_knn_bitwise_on_exact_arithmetic():
    """Dyadic entries make every dot product exact in float32, whatever the summation order:
    scores must then be bit-identical, and indices identical wherever the score is not tied
    with the k-th one (which of several boundary ties faiss keeps is unspecified)."""
    rng = np.random.default_rng(2)
    db = (rng.integers(-3, 4, (2000, 16)) / 8).astype(np.float32)
    q = (rng.integers(-3, 4, (30, 16)) / 8).astype(np.float32)
    idx = SearchIndex(build_index(db), [str(i) for i in range(len(db))])
    fs, fi = idx.search(q, 40)
    s, i = knn(q, db, 40, block_elements=3000)
    np.testing.assert_array_equal(fs, s)
    clear = s > s[:, -1:]
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(fi[clear], i[clear])


def test_ivfpq_recall_and_nprobe():
    rng = np.random.default_rng(3)
    centres = _unit(rng, 64, 16)
    db = centres[rng.integers(0, 64, 2000)] + 0.15 * rng.standard_normal((2000, 16))
    db = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float32)
    q = db[:50] + 0.05 * rng.standard_normal((50, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    cfg = IndexConfig(type="ivfpq", nlist=16, m=8, nbits=6, nprobe=16, train_size=1500)
    idx = SearchIndex(build_index(db, cfg), [str(i) for i in range(len(db))], cfg)
    _, exact = knn(q, db, 10)

    def recall(nprobe: int) -> float:
        _, approx = idx.search(q, 10, nprobe=nprobe)
        return np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])

    full, one = recall(16), recall(1)
    assert full > 0.6  # all cells visited: only PQ error remains
    assert one <= full
    s, _ = idx.search(q, 10)
    assert (np.diff(s, axis=1) <= 0).all()


def test_rerank_of_all_candidates_is_knn(data):
    q, db = data
    everything = np.tile(np.arange(len(db)), (len(q), 1))
    s, i = rerank_candidates(q, db, everything[:, ::-1].copy(), 10, block_elements=50_000)
    ref_s, ref_i = knn(q, db, 10)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-6)


def test_rerank_scores_are_exact_and_padding_stays_last():
    rng = np.random.default_rng(8)
    db, q = _unit(rng, 50, 8), _unit(rng, 2, 8)
    cand = np.array([[7, -1, 3, 3], [-1, -1, -1, 9]])
    s, i = rerank_candidates(q, db, cand, 3)
    assert i[0, :2].tolist() == sorted([7, 3], key=lambda j: -(q[0] @ db[j])) and i[0, 2] == -1
    assert i[1].tolist() == [9, -1, -1] and np.isneginf(s[1, 1:]).all()
    np.testing.assert_allclose(s[1, 0], q[1] @ db[9], rtol=1e-6)
    with pytest.raises(ValueError, match="outside the database"):
        rerank_candidates(q, db, np.array([[50], [0]]), 1)


def test_ivfpq_rerank_from_the_recorded_features(tmp_path):
    rng = np.random.default_rng(9)
    db = _unit(rng, 1500, 16)
    q = db[:40] + 0.05 * rng.standard_normal((40, 16)).astype(np.float32)
    np.save(tmp_path / "f.npy", db)
    cfg = IndexConfig(type="ivfpq", nlist=8, m=4, nbits=6, nprobe=8)
    SearchIndex.from_features(load_features(tmp_path / "f.npy"), cfg).save(tmp_path / "ix")
    idx = load_index(tmp_path / "ix")
    assert idx.features == str((tmp_path / "f.npy").resolve())
    _, exact = knn(q, db, 10)
    _, plain = idx.search(q, 10)
    s, re = idx.search(q, 10, rerank=200)

    def overlap(a):
        return np.mean([len(set(x) & set(e)) / 10 for x, e in zip(a, exact, strict=True)])

    assert overlap(re) > overlap(plain) and overlap(re) > 0.9
    ok = re >= 0
    np.testing.assert_allclose(s[ok], np.einsum("qd,qkd->qk", q, db[re])[ok], atol=1e-6)
    with pytest.raises(ValueError, match="rerank must be"):
        idx.search(q, 10, rerank=-1)


def test_ivfpq_rejects_impossible_configs():
    db = _unit(np.random.default_rng(4), 100, 30)
    with pytest.raises(ValueError, match="must divide"):
        build_index(db, IndexConfig(type="ivfpq", nlist=4, m=8))
    with pytest.raises(ValueError, match="at least 256 training vectors"):
        build_index(db, IndexConfig(type="ivfpq", nlist=4, m=5, nbits=8))
    with pytest.raises(ValueError, match="index type"):
        IndexConfig(type="hnsw")
    with pytest.raises(ValueError, match="nprobe"):
        IndexConfig(nprobe=0)


def test_index_save_load_roundtrip(data, tmp_path):
    q, db = data
    feats = FeatureSet(db, [f"a/{i}.jpg" for i in range(len(db))], "ckpt.pt", [1.0, 0.5])
    idx = SearchIndex.from_features(feats)
    idx.save(tmp_path / "ix")
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == ["index.faiss", "manifest.json"]
    back = load_index(tmp_path / "ix")
    assert back.ids == feats.ids and back.checkpoint == "ckpt.pt" and back.scales == [1.0, 0.5]
    assert back.config == idx.config and back.dim == 48 and len(back) == 3000
    s1, i1 = idx.search(q, 7)
    s2, i2 = back.search(q, 7)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    with pytest.raises(ValueError, match=r"missing index\.faiss"):
        load_index(tmp_path)


def test_ivfpq_save_load_keeps_nprobe(tmp_path):
    db = _unit(np.random.default_rng(5), 600, 16)
    cfg = IndexConfig(type="ivfpq", nlist=8, m=4, nbits=6, nprobe=3)
    SearchIndex.from_features(FeatureSet(db, [str(i) for i in range(600)]), cfg).save(tmp_path)
    import faiss

    back = load_index(tmp_path)
    assert back.config == cfg
    assert faiss.extract_index_ivf(back.index).nprobe == 3


# ---------------------------------------------------------------------------------- files


def test_load_features_manifest_forms(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "f.npy", x)
    bare = load_features(tmp_path / "f.npy")
    assert bare.ids == ["0", "1", "2"] and bare.checkpoint is None
    (tmp_path / "f.json").write_text(
        json.dumps({"ids": ["a", "b", "c"], "checkpoint": "m.pt", "scales": [1, 0.5], "dim": 4})
    )
    f = load_features(tmp_path / "f.npy")
    assert f.ids == ["a", "b", "c"] and f.checkpoint == "m.pt" and f.scales == [1.0, 0.5]
    assert f.extra == {"dim": 4}
    np.testing.assert_array_equal(f.descriptors, x)
    (tmp_path / "other.json").write_text(json.dumps({"ids": ["x", "y", "z"]}))
    assert load_features(tmp_path / "f.npy", tmp_path / "other.json").ids == ["x", "y", "z"]
    # One format: the id list is `ids`, nothing is guessed.
    (tmp_path / "guess.json").write_text(json.dumps({"images": ["x", "y", "z"]}))
    with pytest.raises(ValueError, match="no 'ids' list"):
        load_features(tmp_path / "f.npy", tmp_path / "guess.json")
    (tmp_path / "bad.json").write_text(json.dumps({"ids": ["x"]}))
    with pytest.raises(ValueError, match="lists 1 ids but"):
        load_features(tmp_path / "f.npy", tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not found"):
        load_features(tmp_path / "missing.npy")


def test_ranked_ids_drops_padding():
    out = ranked_ids(["a", "b"], np.array([[0.9, -np.inf]]), np.array([[1, -1]]))
    assert out == [[("b", 0.9)]]


# ---------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def image_index(tmp_path_factory) -> dict:
    """A tiny checkpoint, an image folder extracted with it, and a flat index over it."""
    from PIL import Image, ImageDraw

    from apretrieval.cli import main
    from apretrieval.extraction.images import ImageFiles
    from apretrieval.extraction.resumable import extract_to_file
    from apretrieval.models import build_model, save_checkpoint

    base = tmp_path_factory.mktemp("search_cli")
    folder = base / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(6):
        img = Image.new("RGB", (48, 40), tuple(int(v) for v in rng.integers(0, 255, 3)))
        ImageDraw.Draw(img).ellipse((4 + 3 * i, 6, 30 + 2 * i, 34), fill=(255, 255, 255))
        names.append(f"im{i}.png")
        img.save(folder / names[-1])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("resnet18", out_dim=16).eval()
    ckpt = save_checkpoint(base / "tiny.pt", model)
    npy = extract_to_file(
        model,
        ImageFiles([folder / n for n in names], None, 64),
        names,
        base / "feats",
        scales=(1.0, 0.75),
        max_side=64,
        num_workers=0,
        progress=False,
        meta={"checkpoint": str(ckpt)},
    )
    rc = main(
        ["index", "build", "--features", str(npy), "--out", str(base / "ix"), "--no-progress"]
    )
    assert rc == 0
    return {
        "base": base,
        "folder": folder,
        "names": names,
        "ckpt": ckpt,
        "npy": npy,
        "index": base / "ix",
    }


def test_cli_index_records_extraction_settings(image_index):
    idx = load_index(image_index["index"])
    assert idx.ids == image_index["names"]
    assert idx.checkpoint == str(image_index["ckpt"].resolve())
    assert idx.scales == [1.0, 0.75] and idx.extra["max_side"] == 64
    assert idx.config.type == "flat" and idx.dim == 16


def test_cli_search_finds_each_database_image_first(image_index, capsys):
    from apretrieval.cli import main

    queries = [str(image_index["folder"] / n) for n in ("im2.png", "im5.png")]
    rc = main(
        [
            "search",
            "--index",
            str(image_index["index"]),
            "--query",
            queries[0],
            "--query",
            queries[1],
            "--k",
            "3",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in out["results"]] == queries
    for q, res in zip(("im2.png", "im5.png"), out["results"], strict=True):
        ranks = res["results"]
        assert [r["rank"] for r in ranks] == [1, 2, 3]
        # Extracted exactly as the database was, a database image is its own best match.
        assert ranks[0]["id"] == q and ranks[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert ranks[0]["score"] >= ranks[1]["score"] >= ranks[2]["score"]
    # Exact re-ranking of a flat index's shortlist changes nothing.
    rc = main(
        [
            "search",
            "--index",
            str(image_index["index"]),
            "--query",
            queries[0],
            "--k",
            "3",
            "--json",
            "--rerank",
            "4",
        ]
    )
    reranked = json.loads(capsys.readouterr().out)["results"][0]["results"]
    assert [r["id"] for r in reranked] == [r["id"] for r in out["results"][0]["results"]]
    # The table form ranks the same ids.
    assert main(["search", "--index", str(image_index["index"]), "--query", queries[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"query: {queries[0]}" and lines[1].split()[0] == "1"
    assert lines[1].split()[2] == "im2.png" and len(lines) == 1 + 6  # k=10 > 6 images


def test_cli_search_a_folder_of_queries(image_index, capsys, tmp_path):
    from apretrieval.cli import main

    folder = tmp_path / "queries"
    (folder / "sub").mkdir(parents=True)
    for name, where in (("im1.png", folder), ("im4.png", folder / "sub")):
        (where / name).write_bytes((image_index["folder"] / name).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    ix = str(image_index["index"])
    assert main(["search", "--index", ix, "--query", str(folder), "--k", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    # one block per image of the folder (sorted, sub-folders included), each finds itself
    assert [r["query"] for r in results] == [str(folder / "im1.png"), str(folder / "sub/im4.png")]
    assert [r["results"][0]["id"] for r in results] == ["im1.png", "im4.png"]
    # the table: the same blocks, each headed by its image
    assert main(["search", "--index", ix, "--query", str(folder), "--k", "2"]) == 0
    heads = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("query: ")]
    assert heads == [f"query: {folder / 'im1.png'}", f"query: {folder / 'sub/im4.png'}"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["search", "--index", ix, "--query", str(empty)]) == 2
    assert "no image in this folder" in capsys.readouterr().err


def test_cli_search_extracts_queries_as_extract_does(image_index, capsys, monkeypatch):
    """The queries go through extract's route: batches of similar sizes, decoding workers
    (none for a single batch), and the same descriptors as the index's database."""
    import apretrieval.pipeline as pipeline
    from apretrieval.cli import main

    calls = []
    real = pipeline.extract_descriptors

    def recording(model, images, **kw):
        calls.append({k: kw[k] for k in ("batch_size", "num_workers", "sort_by_size") if k in kw})
        out = real(model, images, **kw)
        calls[-1]["rows"] = out
        return out

    monkeypatch.setattr(pipeline, "extract_descriptors", recording)
    ix, folder = str(image_index["index"]), str(image_index["folder"])
    argv = ["search", "--index", ix, "--query", folder, "--json", "--batch-size", "2"]
    assert main([*argv, "--workers", "1"]) == 0
    assert calls[-1]["batch_size"] == 2 and calls[-1]["num_workers"] == 1  # 6 images: 3 batches
    assert calls[-1].get("sort_by_size", True)  # size-sorted (the default)
    np.testing.assert_allclose(calls[-1]["rows"], np.load(image_index["npy"]), atol=1e-5)
    assert main([*argv[:-2], "--batch-size", "8", "--workers", "2"]) == 0
    assert calls[-1]["num_workers"] == 0  # one batch: no worker processes to start
    assert main([*argv, "--workers", "-1"]) == 2
    capsys.readouterr()


def test_cli_search_errors_are_one_line(image_index, capsys, tmp_path):
    from apretrieval.cli import main

    ix = str(image_index["index"])
    assert main(["search", "--index", ix, "--query", str(tmp_path / "nope.jpg")]) == 2
    assert "query image not found" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path), "--query", "x.jpg"]) == 2
    assert "not an index directory" in capsys.readouterr().err
    # An index built from features without a checkpoint needs --checkpoint.
    np.save(tmp_path / "f.npy", np.eye(4, dtype=np.float32))
    assert (
        main(
            [
                "index",
                "build",
                "--features",
                str(tmp_path / "f.npy"),
                "--out",
                str(tmp_path / "ix"),
                "--no-progress",
            ]
        )
        == 0
    )
    img = str(image_index["folder"] / "im0.png")
    assert main(["search", "--index", str(tmp_path / "ix"), "--query", img]) == 2
    assert "records no checkpoint" in capsys.readouterr().err


def test_cli_index_build_ivfpq_and_info(tmp_path, capsys):
    from apretrieval.cli import main

    x = _unit(np.random.default_rng(6), 700, 16)
    np.save(tmp_path / "f.npy", x)
    (tmp_path / "f.json").write_text(json.dumps({"ids": [f"i{k}" for k in range(700)]}))
    args = [
        "index",
        "build",
        "--features",
        str(tmp_path / "f.npy"),
        "--out",
        str(tmp_path / "ix"),
        "--type",
        "ivfpq",
        "--nlist",
        "8",
        "--m",
        "4",
        "--nbits",
        "6",
        "--nprobe",
        "8",
        "--train-size",
        "0",
        "--no-progress",
    ]
    assert main(args) == 0
    idx = load_index(tmp_path / "ix")
    assert idx.config == IndexConfig(type="ivfpq", nlist=8, m=4, nbits=6, nprobe=8, train_size=None)
    _, i = idx.search(x[:20], 1)
    assert (i[:, 0] == np.arange(20)).mean() > 0.8  # PQ codes still find the vector itself
    capsys.readouterr()
    assert main(["index", "info", str(tmp_path / "ix")]) == 0
    assert "IVF-PQ nlist=8 m=4 nbits=6 nprobe=8" in capsys.readouterr().out
    assert main([*args[:-9], "--type", "ivfpq", "--m", "5", "--no-progress"]) == 2
    assert "must divide" in capsys.readouterr().err


def test_missing_faiss_is_a_clear_error(monkeypatch, tmp_path, capsys):
    import sys

    from apretrieval.cli import main
    from apretrieval.faiss_index import require_faiss

    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(ImportError, match=r"apretrieval\[search\]"):
        require_faiss()
    with pytest.raises(ImportError, match="faiss-cpu"):
        build_index(np.eye(4, dtype=np.float32))
    # knn needs no faiss.
    assert knn(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32), 1)[1].ravel().tolist() == [
        0,
        1,
        2,
        3,
    ]
    np.save(tmp_path / "f.npy", np.eye(4, dtype=np.float32))
    args = ["index", "build", "--features", str(tmp_path / "f.npy"), "--out", str(tmp_path / "x")]
    assert main(args) == 1
    err = without_thread_line(capsys.readouterr().err)
    assert err.count("\n") == 1 and "pip install 'apretrieval[search]'" in err
