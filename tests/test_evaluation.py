"""Revisited-protocol metrics equal a straightforward reference (full stable sort per query)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apretrieval.evaluation import (
    PROTOCOLS,
    ProtocolResult,
    evaluate_protocol,
    evaluate_revisited,
    evaluate_revisited_per_query,
    stable_ranks,
    stable_topk,
)
from apretrieval.results import load_results
from conftest import without_thread_line

SAMPLES = Path(__file__).parent / "data" / "revisited"


def load_sample(name: str) -> dict:
    """A few real queries of a benchmark's ground truth (see data/revisited/README.md)."""
    # Plain containers only (checked when the samples were made); the project's restricted
    # loader has its own tests.
    with open(SAMPLES / f"{name}_sample.pkl", "rb") as f:
        return pickle.load(f)


# --------------------------------------------------------------------------------------------
# Reference: sort the whole database (stable, descending), drop junk, walk the positives.


def reference_sets(entry, protocol):
    """(positives, junk) of one gnd entry, written from the protocol definitions."""
    easy, hard, junk = list(entry["easy"]), list(entry["hard"]), list(entry["junk"])
    return {
        "easy": (easy, junk + hard),
        "medium": (easy + hard, junk),
        "hard": (hard, junk + easy),
    }[protocol]


def reference_query(row, pos, junk, kappas):
    order = np.argsort(-row, kind="stable")
    ranked = order[~np.isin(order, junk)]  # junk leaves the ranking
    positions = np.flatnonzero(np.isin(ranked, pos))  # 0-based ranks of positives
    n = len(pos)
    ap = 0.0
    for j, r in enumerate(positions):
        before = j / r if r != 0 else 1.0
        after = (j + 1) / (r + 1)
        ap += (before + after) / 2.0 / n
    last = positions[-1] + 1
    prec = []
    for k in kappas:
        kk = min(last, k)
        prec.append(np.sum(positions + 1 <= kk) / kk)
    return ap, np.array(prec)


def reference_revisited(scores, gnd, kappas=(1, 5, 10)):
    out = {}
    for p in PROTOCOLS:
        aps, precs = [], []
        for i, entry in enumerate(gnd):
            pos, junk = reference_sets(entry, p)
            if len(pos) == 0:
                aps.append(np.nan)
                precs.append(np.full(len(kappas), np.nan))
                continue
            ap, prec = reference_query(scores[i], pos, junk, kappas)
            aps.append(ap)
            precs.append(prec)
        out[p] = (np.array(aps), np.array(precs))
    return out


def reference_metrics(scores, gnd, kappas=(1, 5, 10)):
    """``evaluate_revisited``'s dict from the reference (protocols with a positive only)."""
    out = {}
    for p, (ap, prec) in reference_revisited(np.asarray(scores), gnd, kappas).items():
        ok = ~np.isnan(ap)
        if ok.any():
            mp = prec[ok].mean(axis=0)
            out[p] = {"mAP": float(ap[ok].mean()), "mP@k": dict(zip(kappas, mp, strict=True))}
    return out


def random_gnd(rng, q, n, max_items=30):
    gnd = []
    for _ in range(q):
        k = rng.integers(0, min(n, 3 * max_items) + 1)
        idx = rng.permutation(n)[:k]
        cut = np.sort(rng.integers(0, k + 1, size=2))
        gnd.append(
            {
                "easy": sorted(idx[: cut[0]].tolist()),
                "hard": sorted(idx[cut[0] : cut[1]].tolist()),
                "junk": sorted(idx[cut[1] :].tolist()),
            }
        )
    return gnd


def assert_matches_reference(scores, gnd, kappas=(1, 5, 10)):
    got = evaluate_revisited_per_query(scores, gnd, kappas)
    ref = reference_revisited(np.asarray(scores), gnd, kappas)
    for p in PROTOCOLS:
        np.testing.assert_allclose(got[p].ap, ref[p][0], rtol=0, atol=1e-12, equal_nan=True)
        np.testing.assert_allclose(got[p].precision, ref[p][1], rtol=0, atol=1e-12, equal_nan=True)
    return got


# --------------------------------------------------------------------------------------------
# Ranks


@pytest.mark.parametrize("kind", ["float32", "float64", "ties", "constant"])
def test_stable_ranks_equal_inverse_of_stable_argsort(kind):
    rng = np.random.default_rng(1)
    for trial in range(60):
        n = int(rng.integers(1, 2000))
        row = {
            "float32": rng.standard_normal(n).astype(np.float32),
            "float64": rng.standard_normal(n),
            "ties": rng.integers(0, 4, n).astype(np.float32),
            "constant": np.full(n, 0.25),
        }[kind]
        items = rng.choice(n, int(rng.integers(0, min(n, 100) + 1)), replace=False)
        order = np.argsort(-row, kind="stable")
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.arange(n)
        buckets = None if trial % 2 else int(rng.integers(1, 40))
        np.testing.assert_array_equal(stable_ranks(row, items, buckets), inverse[items])


def test_tie_convention_lower_database_index_ranks_first():
    row = np.array([0.5, 0.9, 0.5, 0.5, 0.1])
    # 0.9 first, then the three 0.5 in index order, then 0.1
    np.testing.assert_array_equal(stable_ranks(row, np.array([3, 0, 2, 1, 4])), [3, 1, 2, 0, 4])
    np.testing.assert_array_equal(stable_topk(row, 3), [1, 0, 2])


def test_stable_topk_equals_stable_argsort_prefix():
    rng = np.random.default_rng(2)
    for _ in range(50):
        n = int(rng.integers(1, 500))
        row = rng.integers(0, 6, n).astype(np.float64) if rng.random() < 0.5 else rng.random(n)
        k = int(rng.integers(1, n + 5))
        np.testing.assert_array_equal(stable_topk(row, k), np.argsort(-row, kind="stable")[:k])


# --------------------------------------------------------------------------------------------
# Metrics vs reference


def test_random_inputs_match_reference():
    rng = np.random.default_rng(3)
    for _ in range(20):
        q, n = int(rng.integers(1, 8)), int(rng.integers(1, 400))
        scores = rng.standard_normal((q, n)).astype(np.float32)
        assert_matches_reference(scores, random_gnd(rng, q, n))


def test_tied_scores_follow_the_stable_sort():
    rng = np.random.default_rng(4)
    for _ in range(10):
        q, n = 4, 300
        scores = rng.integers(0, 5, (q, n)).astype(np.float64) / 4
        assert_matches_reference(scores, random_gnd(rng, q, n))


def test_real_roxford_gnd_random_scores():
    data = load_sample("roxford5k")
    gnd = data["gnd"]
    q, n = len(gnd), len(data["imlist"]) + 700  # plus distractor columns
    assert q == 12
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((q, n)).astype(np.float32)
    # Make positives rank high-ish so the metrics are far from trivial.
    for i, e in enumerate(gnd):
        scores[i, e["easy"]] += 1.5
        scores[i, e["hard"]] += 0.8
    got = assert_matches_reference(scores, gnd)
    # The two queries without easy positives (real queries 11 and 66) leave the Easy means.
    assert got["easy"].num_queries == q - 2
    assert np.flatnonzero(np.isnan(got["easy"].ap)).tolist() == [5, 11]
    assert got["medium"].num_queries == got["hard"].num_queries == q
    res = evaluate_revisited(scores, data)  # the whole pickle dict works too
    assert res["easy"]["mAP"] == pytest.approx(np.nanmean(got["easy"].ap), abs=1e-15)
    assert set(res["medium"]["mP@k"]) == {1, 5, 10}


def test_real_rparis_gnd_random_scores():
    data = load_sample("rparis6k")
    rng = np.random.default_rng(6)
    scores = rng.random((len(data["gnd"]), len(data["imlist"]) + 1000))
    got = assert_matches_reference(scores, data["gnd"], kappas=(1, 3, 100))
    assert not data["gnd"][2]["junk"] and got["hard"].num_queries == 7  # no junk: still fine


def test_perfect_ranking_gives_one():
    gnd = [{"easy": [2, 5], "hard": [7], "junk": [0]}]
    scores = np.zeros((1, 10))
    scores[0, [2, 5]] = 3.0
    scores[0, 7] = 2.0
    scores[0, 0] = 5.0  # junk on top is ignored
    res = evaluate_revisited(scores, gnd)
    for p in PROTOCOLS:
        assert res[p]["mAP"] == 1.0
        assert res[p]["mP@k"] == {1: 1.0, 5: 1.0, 10: 1.0}  # k capped at the last positive


def test_single_positive_closed_form():
    # One positive at 0-based rank r (junk removed): AP = (0 + 1/(r+1)) / 2, P@k = [r < k] / k
    # for k <= r + 1, else capped at r + 1 -> 1 / (r + 1).
    n, r = 20, 4
    scores = -np.arange(n, dtype=np.float64)[None]  # item i at rank i
    junk = [1, 3]  # two junk items above the positive
    res = evaluate_protocol(scores, [[r + 2]], [junk], kappas=(1, 5, 10))
    assert res.ap[0] == pytest.approx(1 / (2 * (r + 1)))
    np.testing.assert_allclose(res.precision[0], [0.0, 1 / 5, 1 / 5])


def test_positive_on_top_counts_precision_one_before():
    res = evaluate_protocol(np.array([[3.0, 2.0, 1.0]]), [[0, 2]], [[]], kappas=(1, 2))
    # ranks 0 and 2: (1 + 1)/2/2 + (1/2 + 2/3)/2/2
    assert res.ap[0] == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    np.testing.assert_allclose(res.precision[0], [1.0, 0.5])


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(7)
    scores = rng.standard_normal((5, 100)).astype(np.float32)
    gnd = random_gnd(rng, 5, 100)
    a = evaluate_revisited_per_query(scores, gnd)
    b = evaluate_revisited_per_query(torch.from_numpy(scores), gnd)
    for p in PROTOCOLS:
        np.testing.assert_array_equal(a[p].ap, b[p].ap)


def test_half_precision_scores_keep_their_ties():
    # float16 rounding makes many scores equal; they must rank by database index exactly as
    # the reference does on the same rounded values (widening float16 is exact).
    rng = np.random.default_rng(7)
    scores = torch.from_numpy(rng.standard_normal((6, 400)) * 0.05).half()
    gnd = random_gnd(rng, 6, 400)
    rounded = scores.double().numpy()
    assert np.unique(rounded).size < rounded.size  # the test needs ties
    got = evaluate_revisited_per_query(scores, gnd)
    ref = reference_revisited(rounded, gnd)
    for p in PROTOCOLS:
        np.testing.assert_allclose(got[p].ap, ref[p][0], rtol=0, atol=1e-12, equal_nan=True)


def test_evaluate_protocol_equals_medium():
    rng = np.random.default_rng(8)
    scores = rng.standard_normal((6, 150))
    gnd = random_gnd(rng, 6, 150)
    med = evaluate_revisited_per_query(scores, gnd)["medium"]
    pos = [e["easy"] + e["hard"] for e in gnd]
    junk = [e["junk"] for e in gnd]
    res = evaluate_protocol(scores, pos, junk)
    np.testing.assert_array_equal(res.ap, med.ap)


def test_blocks_of_queries_concatenate_to_the_whole():
    rng = np.random.default_rng(14)
    scores = rng.standard_normal((7, 90))
    gnd = random_gnd(rng, 7, 90)
    whole = evaluate_revisited_per_query(scores, gnd)
    parts = [evaluate_revisited_per_query(scores[s : s + 3], gnd[s : s + 3]) for s in (0, 3, 6)]
    for p in PROTOCOLS:
        joined = ProtocolResult.concatenate([part[p] for part in parts])
        np.testing.assert_array_equal(joined.ap, whole[p].ap)
        np.testing.assert_array_equal(joined.precision, whole[p].precision)
    other = ProtocolResult(np.zeros(1), np.zeros((1, 1)), (1,))
    with pytest.raises(ValueError, match="kappas"):
        ProtocolResult.concatenate([whole["easy"], other])


def test_protocol_without_positive_is_a_clear_error():
    gnd = [{"easy": [], "hard": [1], "junk": [2]}, {"easy": [], "hard": [0], "junk": []}]
    scores = np.random.default_rng(0).random((2, 5))
    per = evaluate_revisited_per_query(scores, gnd)
    assert per["easy"].num_queries == 0
    with pytest.raises(ValueError, match="easy"):
        evaluate_revisited(scores, gnd)


@pytest.mark.parametrize(
    ("gnd", "match"),
    [
        ([{"easy": [9], "hard": [], "junk": []}], "outside the database"),
        ([{"easy": [1], "hard": [1], "junk": []}], "disjoint"),
        ([{"easy": [1, 1], "hard": [], "junk": []}], "more than once"),
        ([{"easy": [1], "junk": []}], "lacks key"),
        ([{"easy": [1.5], "hard": [], "junk": []}], "integer"),
        ([], "query rows"),
    ],
)
def test_bad_gnd_is_rejected(gnd, match):
    with pytest.raises(ValueError, match=match):
        evaluate_revisited(np.zeros((1, 5)), gnd)


def test_bad_scores_are_rejected():
    gnd = [{"easy": [1], "hard": [], "junk": []}]
    with pytest.raises(ValueError, match="NaN"):
        evaluate_revisited(np.array([[0.0, np.nan, 1.0]]), gnd)
    with pytest.raises(ValueError, match="shape"):
        evaluate_revisited(np.zeros(5), gnd)
    with pytest.raises(ValueError, match="kappas"):
        evaluate_revisited(np.zeros((1, 5)), gnd, kappas=(0,))


# --------------------------------------------------------------------------------------------
# Library route and CLI: extraction -> whitening / DBA / QE -> metrics -> results JSON


def _reference_postprocess(q, db, separate, dim, dba_k, qe_k, alpha=3.0):
    """Whitening, DBA and alpha-QE written from their definitions (float64, full sort).

    PCA whitening: project on the top ``dim`` eigenvectors of the learning set's covariance,
    scale by eigenvalue^-1/2, L2-normalise (covariance scale and eigenvector signs cancel in
    the inner products compared). DBA: each item + its ``k`` most similar other items, weighted
    by max(similarity, 0)^alpha. alpha-QE: each query + its ``k`` nearest (augmented) items.
    """

    def norm(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    x = separate.astype(np.float64)
    mean = x.mean(axis=0)
    lam, u = np.linalg.eigh(np.cov(x - mean, rowvar=False))
    top = np.argsort(lam)[::-1][:dim]
    proj = u[:, top] / np.sqrt(lam[top])
    q = norm((q.astype(np.float64) - mean) @ proj)
    db = norm((db.astype(np.float64) - mean) @ proj)

    def expand(rows, base, k, skip_self):
        sims = rows @ base.T
        out = rows.copy()
        for i in range(rows.shape[0]):
            order = [j for j in np.argsort(-sims[i], kind="stable") if not (skip_self and j == i)]
            for j in order[:k]:
                out[i] += max(sims[i, j], 0.0) ** alpha * base[j]
        return norm(out)

    db = expand(db, db, dba_k, skip_self=True)
    q = expand(q, db, qe_k, skip_self=False)
    return q, db


def test_cli_evaluate_end_to_end(tmp_path, monkeypatch, capsys):
    import apretrieval.pipeline as pipeline
    from apretrieval.cli import main
    from apretrieval.data.revisited import RevisitedDataset
    from apretrieval.extraction.images import ImageFiles
    from apretrieval.extraction.loop import extract_descriptors
    from test_extraction import TinyNet, fake_benchmark

    model = TinyNet()
    monkeypatch.setattr(pipeline, "load_checkpoint_model", lambda path, device=None: model)
    rng = np.random.default_rng(12)
    root = tmp_path / "rox"
    fake_benchmark(root, rng, n_db=8)
    # Descriptors from the extraction (tested on its own); everything after it is checked
    # against an independent reference: post-processing, ranking, metrics.
    ds = RevisitedDataset("roxford5k", root)
    q = extract_descriptors(
        model, ImageFiles(ds.query_paths(), ds.query_boxes()), num_workers=0, progress=False
    )
    db = extract_descriptors(model, ImageFiles(ds.db_paths()), num_workers=0, progress=False)
    # The whitening set: other "images" around these descriptors, so that whitening spreads
    # the (similar) descriptors of this tiny network and the ranking is far from ties.
    both = np.concatenate([q, db])
    noise = 0.3 * both.std(axis=0) * rng.standard_normal((40, both.shape[1]))
    separate = (both[rng.integers(0, len(both), 40)] + noise).astype(np.float32)
    white = tmp_path / "white.npy"
    np.save(white, separate)
    out = tmp_path / "res.json"
    argv = [
        "evaluate",
        "--checkpoint",
        "m.pt",
        "--dataset",
        "roxford5k",
        "--root",
        str(root),
        "--out",
        str(out),
        "--whiten",
        str(white),
        "--whiten-dim",
        "4",
        "--dba",
        "2",
        "--qe",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--num-bins",
        "10",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Medium" in printed and "mP@10" in printed and "roxford5k: mAP E:" in printed
    res = load_results(out)
    q, db = _reference_postprocess(q, db, separate, dim=4, dba_k=2, qe_k=1)
    scores = q @ db.T
    assert np.diff(np.sort(scores, axis=1)).min() > 1e-4  # no near-tie decides a rank
    want = reference_metrics(scores, ds.gnd)
    assert set(res["metrics"]) == set(want)
    for p in want:
        assert res["metrics"][p]["mAP"] == pytest.approx(want[p]["mAP"], abs=1e-6)
        for k in (1, 5, 10):
            assert res["metrics"][p]["mP@k"][k] == pytest.approx(want[p]["mP@k"][k], abs=1e-6)
    for i, row in enumerate(res["queries"]):
        assert row["topk"] == np.argsort(-scores[i], kind="stable").tolist()
        np.testing.assert_allclose(row["topk_scores"], np.sort(scores[i])[::-1], atol=1e-5)
    assert res["settings"]["dba"] == 2 and res["settings"]["whiten_dim"] == 4
    assert res["settings"]["qe"] == 1 and res["settings"]["scales"] == [1.0, 2**-0.5, 0.5]
    assert res["apq_analysis"] == {"protocol": "medium", "num_bins": 10, "score_range": [-1, 1]}
    assert res["database"][0] == "jpg/db_0.jpg" and res["queries"][0]["image"] == "jpg/q_0.jpg"
    assert len(res["queries"][0]["topk"]) == 8


def test_library_route_equals_the_command(tmp_path, monkeypatch):
    """evaluate_checkpoint with typed settings: what the command runs, block by block."""
    import apretrieval.pipeline as pipeline
    from apretrieval.benchmark_results import PostProcessing
    from apretrieval.cli import main
    from apretrieval.data.revisited import RevisitedDataset
    from apretrieval.pipeline import ExtractionSettings, evaluate_checkpoint
    from test_extraction import TinyNet, fake_benchmark

    model = TinyNet()
    monkeypatch.setattr(pipeline, "load_checkpoint_model", lambda path, device=None: model)
    fake_benchmark(tmp_path / "rox", np.random.default_rng(15), n_db=9)
    ds = RevisitedDataset("roxford5k", tmp_path / "rox")
    settings = ExtractionSettings(scales=(1.0, 0.5), num_workers=0, progress=False)
    post = PostProcessing(dba=1, qe=1, qe_alpha=1.0)
    whole = evaluate_checkpoint(model, ds, settings, post=post, out=tmp_path / "a.json")
    by_one = evaluate_checkpoint(model, ds, settings, post=post, block_size=1)
    assert by_one.metrics == whole.metrics and by_one.queries == whole.queries
    argv = [
        "evaluate",
        "--checkpoint",
        "m.pt",
        "--dataset",
        "roxford5k",
        "--root",
        str(tmp_path / "rox"),
        "--out",
        str(tmp_path / "b.json"),
        "--scales",
        "1",
        "0.5",
        "--dba",
        "1",
        "--qe",
        "1",
        "--qe-alpha",
        "1",
        "--workers",
        "0",
        "--no-progress",
    ]
    assert main(argv) == 0
    from apretrieval.results import RetrievalResults

    cli = RetrievalResults.load(tmp_path / "b.json")
    assert cli.metrics == whole.metrics and cli.queries == whole.queries
    assert RetrievalResults.load(tmp_path / "a.json").metrics == whole.metrics
    assert whole.settings.scales == (1.0, 0.5) and whole.settings.dba == 1


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    """A small random ResNet-18 saved with models.save_checkpoint."""
    from apretrieval.models import build_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    return save_checkpoint(path, build_model("resnet18", out_dim=32))


def _benchmark_without_images(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "gnd_rparis6k.pkl").write_bytes(
        pickle.dumps(
            {
                "imlist": ["a"],
                "qimlist": ["q"],
                "gnd": [{"bbx": [0, 0, 1, 1], "easy": [0], "hard": [], "junk": []}],
            }
        )
    )


@pytest.mark.parametrize("command", ["evaluate", "extract"])
def test_cli_reports_missing_images(tmp_path, capsys, real_checkpoint, command):
    from apretrieval.cli import main

    root = tmp_path / "paris"
    _benchmark_without_images(root)
    rc = main(
        [
            command,
            "--checkpoint",
            str(real_checkpoint),
            "--dataset",
            "rparis6k",
            "--root",
            str(root),
            "--out",
            str(tmp_path / "r.json"),
            "--no-progress",
            "--workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    err = without_thread_line(capsys.readouterr().err)
    assert rc == 2, err
    assert err.startswith(f"apretrieval {command}: error: 2 image(s) missing, e.g. ")
    assert str(root / "jpg" / "q.jpg") in err
    assert f"run `apretrieval download rparis6k --root {root}`" in err
    assert not (tmp_path / "r.json").exists()


def test_cli_evaluate_unwritable_out_fails_before_extraction(tmp_path, capsys, monkeypatch):
    import apretrieval.pipeline as pipeline
    from apretrieval.cli import main
    from test_extraction import fake_benchmark

    def no_extraction(*args, **kwargs):
        raise AssertionError("extraction started")

    monkeypatch.setattr(pipeline, "extract_benchmark", no_extraction)
    monkeypatch.setattr(pipeline, "load_checkpoint_model", no_extraction)
    fake_benchmark(tmp_path / "rox", np.random.default_rng(16))
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    # parent is a file: the write fails (status 1); a folder: a path to change (status 2)
    for out, status in ((blocker / "res.json", 1), (tmp_path, 2)):
        rc = main(
            [
                "evaluate",
                "--checkpoint",
                "m.pt",
                "--dataset",
                "roxford5k",
                "--root",
                str(tmp_path / "rox"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        err = capsys.readouterr().err
        assert rc == status and "cannot write the results" in err and str(out) in err, err


def test_cli_evaluate_with_a_real_checkpoint(tmp_path, capsys, real_checkpoint, monkeypatch):
    """Integration with models.save_checkpoint / load_model, descriptors kept in files."""
    import apretrieval.pipeline as pipeline
    from apretrieval.cli import main
    from test_extraction import fake_benchmark

    fake_benchmark(tmp_path / "rox", np.random.default_rng(13))
    out = tmp_path / "res.json"
    feats = tmp_path / "feats" / "rox"
    argv = [
        "evaluate",
        "--checkpoint",
        str(real_checkpoint),
        "--dataset",
        "roxford5k",
        "--root",
        str(tmp_path / "rox"),
        "--out",
        str(out),
        "--scales",
        "1",
        "0.5",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--features",
        str(feats),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    res = load_results(out)
    assert res["model"] == str(real_checkpoint) and set(res["metrics"]) == set(PROTOCOLS)
    q = np.load(f"{feats}.queries.npy")
    db = np.load(f"{feats}.db.npy")
    assert q.shape == (2, 32) and db.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(db, axis=1), 1.0, atol=1e-5)
    # The metrics are those of the kept descriptors, by the independent reference.
    scores = q.astype(np.float64) @ db.T.astype(np.float64)
    want = reference_metrics(scores, _gnd_of(tmp_path / "rox"))
    for p in PROTOCOLS:
        assert res["metrics"][p]["mAP"] == pytest.approx(want[p]["mAP"], abs=1e-6)
    assert [r["topk"] for r in res["queries"]] == np.argsort(-scores, axis=1).tolist()
    # A second run reuses the kept descriptors: no image goes through the model again.
    calls = []
    real_extract = pipeline.extract_to_file

    def counting(model, images, *args, **kwargs):
        model.register_forward_hook(lambda *a: calls.append(1))
        return real_extract(model, images, *args, **kwargs)

    monkeypatch.setattr(pipeline, "extract_to_file", counting)
    assert main(argv) == 0
    assert calls == [] and load_results(out)["metrics"] == res["metrics"]


def test_cli_evaluate_with_r1m_distractors(tmp_path, monkeypatch, capsys):
    """`evaluate --r1m`: the distractors join the database, rank like any image, are named."""
    import apretrieval.pipeline as pipeline
    from apretrieval.cli import main
    from apretrieval.data.revisited import RevisitedDataset
    from apretrieval.extraction.images import ImageFiles
    from apretrieval.extraction.loop import extract_descriptors
    from test_extraction import TinyNet, fake_benchmark

    model = TinyNet()
    monkeypatch.setattr(pipeline, "load_checkpoint_model", lambda path, device=None: model)
    rng = np.random.default_rng(30)
    root, r1m = tmp_path / "rox", tmp_path / "r1m"
    fake_benchmark(root, rng, n_db=6)
    (r1m / "jpg" / "0").mkdir(parents=True)
    for i in range(3):
        arr = rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(r1m / "jpg" / "0" / f"d{i}.jpg")
    # A distractor that is the first query's own crop (lossless): it must outrank everything.
    with Image.open(root / "jpg" / "q_0.jpg") as im:
        im.crop((2, 3, 30, 35)).save(r1m / "jpg" / "0" / "d3.png")
    os.rename(r1m / "jpg" / "0" / "d3.png", r1m / "jpg" / "0" / "d3.jpg")
    (r1m / "revisitop1m.txt").write_text("".join(f"0/d{i}.jpg\n" for i in range(4)))
    common = ["--checkpoint", "m.pt", "--dataset", "roxford5k", "--root", str(root)]
    common += ["--workers", "0", "--no-progress", "--device", "cpu", "--scales", "1"]
    out = tmp_path / "res.json"
    assert main(["evaluate", *common, "--r1m", str(r1m), "--out", str(out)]) == 0
    assert "roxford5k+R1M" in capsys.readouterr().out
    res = load_results(out)
    distractors = [str((r1m / "jpg" / "0" / f"d{i}.jpg").resolve()) for i in range(4)]
    assert res["database"][6:] == distractors and len(res["database"]) == 10
    assert res["settings"]["r1m"] == str(r1m)
    # Independent reference: descriptors of every file, ranked with the distractors appended.
    ds = RevisitedDataset("roxford5k", root)
    opts = dict(scales=(1.0,), num_workers=0, progress=False)
    q = extract_descriptors(model, ImageFiles(ds.query_paths(), ds.query_boxes()), **opts)
    db = extract_descriptors(model, ImageFiles([*ds.db_paths(), *distractors]), **opts)
    scores = q.astype(np.float64) @ db.T.astype(np.float64)
    want = reference_metrics(scores, _gnd_of(root))
    for p in PROTOCOLS:
        assert res["metrics"][p]["mAP"] == pytest.approx(want[p]["mAP"], abs=1e-6)
    assert res["queries"][0]["topk"][0] == 9  # the copy of the query, ahead of its positives
    # Without the distractors the same descriptors score strictly higher on that query.
    alone = reference_metrics(scores[:, :6], _gnd_of(root))
    assert alone["medium"]["mAP"] > want["medium"]["mAP"]


def _gnd_of(root: Path) -> list:
    from apretrieval.data.revisited import load_gnd

    return load_gnd(root / "gnd_roxford5k.pkl")["gnd"]


def test_cli_evaluate_several_benchmarks_in_one_table(tmp_path, monkeypatch, capsys):
    import apretrieval.pipeline as pipeline
    from apretrieval.cli import main
    from test_extraction import TinyNet, fake_benchmark

    model = TinyNet()
    monkeypatch.setattr(pipeline, "load_checkpoint_model", lambda path, device=None: model)
    data = tmp_path / "data"  # the layout cirtorch users have: DATA/<name>/gnd_<name>.pkl
    fake_benchmark(data / "roxford5k", np.random.default_rng(20), n_db=6)
    fake_benchmark(data / "rparis6k", np.random.default_rng(21), n_db=7)
    (data / "rparis6k" / "gnd_roxford5k.pkl").rename(data / "rparis6k" / "gnd_rparis6k.pkl")
    common = ["--checkpoint", "m.pt", "--workers", "0", "--no-progress", "--device", "cpu"]
    out = tmp_path / "several"
    argv = ["evaluate", *common, "--datasets", "roxford5k,rparis6k", "--root", str(data)]
    assert main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    # each benchmark alone, given by its ground-truth file: the same numbers
    single = {}
    for name in ("roxford5k", "rparis6k"):
        gnd = data / name / f"gnd_{name}.pkl"
        one = tmp_path / f"{name}.json"
        assert main(["evaluate", *common, "--dataset", str(gnd), "--out", str(one)]) == 0
        single[name] = load_results(one)
        assert load_results(out / f"{name}.json")["metrics"] == single[name]["metrics"]
    capsys.readouterr()
    lines = table.splitlines()
    head = next(ln for ln in lines if "roxford5k E" in ln)
    columns = [f"{n} {p}" for n in ("roxford5k", "rparis6k") for p in "EMH"]
    assert [head.index(c) for c in columns] == sorted(head.index(c) for c in columns)
    below = lines[lines.index(head) + 1 :]  # the title line above also starts with "mAP"
    row = next(ln for ln in below if ln.startswith("mAP")).split()[1:]
    want = [
        f"{100 * single[n]['metrics'][p]['mAP']:.2f}"
        for n in ("roxford5k", "rparis6k")
        for p in PROTOCOLS
    ]
    assert row == want
    # mistakes are one line each, before any extraction
    for bad, message in (
        (["--datasets", "roxford5k,roxford5k", "--root", str(data)], "twice"),
        (["--dataset", "roxford5k"], "root is required"),
        (["--dataset", str(data / "x.pkl")], "gnd_NAME.pkl"),
    ):
        assert main(["evaluate", *common, *bad, "--out", str(tmp_path / "x.json")]) == 2
        assert message in capsys.readouterr().err


def test_first_positive_is_the_rank_of_the_best_positive_with_junk_removed():
    from apretrieval.data.gnd import query_sets
    from apretrieval.evaluation import PROTOCOLS, evaluate_revisited_per_query

    rng = np.random.default_rng(11)
    n = 60
    gnd = []
    for _ in range(25):
        idx = rng.permutation(n)
        k_e, k_h, k_j = rng.integers(0, 5, 3)
        gnd.append(
            {
                "easy": idx[:k_e].tolist(),
                "hard": idx[k_e : k_e + k_h].tolist(),
                "junk": idx[k_e + k_h : k_e + k_h + k_j].tolist(),
            }
        )
    scores = rng.standard_normal((len(gnd), n))
    per = evaluate_revisited_per_query(scores, gnd)
    for i, entry in enumerate(gnd):
        sets = query_sets(entry, i, n)
        for p in PROTOCOLS:
            pos = {
                "easy": sets["easy"],
                "medium": np.r_[sets["easy"], sets["hard"]],
                "hard": sets["hard"],
            }[p]
            junk = {
                "easy": np.r_[sets["junk"], sets["hard"]],
                "medium": sets["junk"],
                "hard": np.r_[sets["junk"], sets["easy"]],
            }[p]
            got = per[p].first_positive[i]
            if pos.size == 0:
                assert np.isnan(got)
                continue
            order = [j for j in np.argsort(-scores[i], kind="stable") if j not in set(junk)]
            want = 1 + next(r for r, j in enumerate(order) if j in set(pos))
            assert got == want, (i, p, got, want)
