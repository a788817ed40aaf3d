"""Revisited-protocol metrics equal a straightforward reference (full stable sort per query)."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from apretrieval.evaluation import (
    PROTOCOLS,
    ap_vs_quantized_ap,
    evaluate_protocol,
    evaluate_revisited,
    evaluate_revisited_per_query,
    format_results_table,
    load_results,
    pearson,
    protocol_sets,
    stable_ranks,
    stable_topk,
    write_results,
)

GND_DIR = Path(__file__).parents[2] / "shared/data/revisited"


def _load_real(name: str) -> dict:
    path = GND_DIR / f"gnd_{name}.pkl"
    if not path.exists():
        pytest.skip(f"real ground truth not found at {path}")
    # These two files are known to hold only dicts/lists/str/int/float (checked in their
    # README); the project's restricted loader has its own tests.
    with open(path, "rb") as f:
        return pickle.load(f)


# --------------------------------------------------------------------------------------------
# Reference: sort the whole database (stable, descending), drop junk, walk the positives.


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
            pos, junk = protocol_sets(entry, p)
            if len(pos) == 0:
                aps.append(np.nan)
                precs.append(np.full(len(kappas), np.nan))
                continue
            ap, prec = reference_query(scores[i], pos, junk, kappas)
            aps.append(ap)
            precs.append(prec)
        out[p] = (np.array(aps), np.array(precs))
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
    data = _load_real("roxford5k")
    gnd = data["gnd"]
    assert len(gnd) == 70 and len(data["imlist"]) == 4993
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((70, 4993)).astype(np.float32)
    # Make positives rank high-ish so the metrics are far from trivial.
    for i, e in enumerate(gnd):
        scores[i, e["easy"]] += 1.5
        scores[i, e["hard"]] += 0.8
    got = assert_matches_reference(scores, gnd)
    # The two queries without easy positives (11 and 66) leave the Easy means.
    assert got["easy"].num_queries == 68
    assert np.flatnonzero(np.isnan(got["easy"].ap)).tolist() == [11, 66]
    assert got["medium"].num_queries == got["hard"].num_queries == 70
    res = evaluate_revisited(scores, data)  # the whole pickle dict works too
    assert res["easy"]["mAP"] == pytest.approx(np.nanmean(got["easy"].ap), abs=1e-15)
    assert set(res["medium"]["mP@k"]) == {1, 5, 10}


def test_real_rparis_gnd_random_scores():
    data = _load_real("rparis6k")
    rng = np.random.default_rng(6)
    scores = rng.random((70, 6322))
    assert_matches_reference(scores, data["gnd"], kappas=(1, 3, 100))


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
    c = evaluate_revisited_per_query(torch.from_numpy(scores).half().float(), gnd)
    for p in PROTOCOLS:
        np.testing.assert_array_equal(a[p].ap, b[p].ap)
        assert np.isfinite(c[p].ap).sum() == np.isfinite(a[p].ap).sum()


def test_evaluate_protocol_equals_medium():
    rng = np.random.default_rng(8)
    scores = rng.standard_normal((6, 150))
    gnd = random_gnd(rng, 6, 150)
    med = evaluate_revisited_per_query(scores, gnd)["medium"]
    pos = [protocol_sets(e, "medium")[0] for e in gnd]
    junk = [protocol_sets(e, "medium")[1] for e in gnd]
    res = evaluate_protocol(scores, pos, junk)
    np.testing.assert_array_equal(res.ap, med.ap)


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
# AP vs AP_Q


def test_pearson_equals_numpy():
    rng = np.random.default_rng(9)
    x, y = rng.random(50), rng.random(50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert math.isnan(pearson(np.ones(5), y[:5]))


def test_ap_vs_ap_q_on_real_gnd():
    data = _load_real("rparis6k")
    gnd = data["gnd"]
    rng = np.random.default_rng(10)
    q, n = 70, 6322
    strength = rng.uniform(0.0, 1.5, size=q)[:, None]
    scores = rng.normal(0.0, 0.25, (q, n))
    for i, e in enumerate(gnd):
        scores[i, e["easy"] + e["hard"]] += strength[i, 0]
    scores = np.clip(scores, -1, 1)
    cmp = ap_vs_quantized_ap(scores, gnd, protocol="medium", num_bins=20)
    assert cmp.ap.shape == cmp.ap_q.shape == (q,)
    np.testing.assert_allclose(cmp.ap, evaluate_revisited_per_query(scores, gnd)["medium"].ap)
    assert cmp.pearson > 0.95  # the supplementary reports ~0.98 on RParis
    # Many bins: the quantized AP approaches the exact non-interpolated AP.
    fine = ap_vs_quantized_ap(scores[:5], gnd[:5], num_bins=20000)
    assert np.max(np.abs(fine.ap_q - fine.ap)) < 0.01


# --------------------------------------------------------------------------------------------
# Results file


def test_write_and_load_results_roundtrip(tmp_path):
    rng = np.random.default_rng(11)
    q, n = 3, 40
    scores = rng.uniform(-1, 1, (q, n)).astype(np.float32)
    gnd = random_gnd(rng, q, n, max_items=5)
    gnd[0] = {"easy": [], "hard": [1], "junk": [2], "bbx": [1, 2.5, 30, 40]}
    out = tmp_path / "sub" / "results.json"
    written = write_results(
        out,
        scores=scores,
        gnd=gnd,
        dataset="roxford5k",
        root=tmp_path,
        database=[f"jpg/db{i}.jpg" for i in range(n)],
        queries=[f"jpg/q{i}.jpg" for i in range(q)],
        model="ckpt.pt",
        topk=10,
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.json"]  # no temp left
    raw = json.loads(out.read_text())
    assert raw["root"] == str(tmp_path.resolve()) and raw["gnd_file"] == "gnd_roxford5k.pkl"
    res = load_results(out)
    assert res["metrics"] == written["metrics"]  # floats and int mP@k keys survive
    for p in res["metrics"]:
        assert set(res["metrics"][p]["mP@k"]) == {1, 5, 10}
    q0 = res["queries"][0]
    assert q0["ap"]["easy"] is None and q0["bbx"] == [1.0, 2.5, 30.0, 40.0]
    assert q0["topk"] == np.argsort(-scores[0], kind="stable")[:10].tolist()
    np.testing.assert_allclose(q0["topk_scores"], np.sort(scores[0])[::-1][:10])
    per = evaluate_revisited_per_query(scores, gnd)
    for i, row in enumerate(res["queries"]):
        for p in PROTOCOLS:
            want = per[p].ap[i]
            assert (row["ap"][p] is None) == bool(np.isnan(want))
            if row["ap"][p] is not None:
                assert row["ap"][p] == pytest.approx(want)


def test_load_results_rejects_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="results"):
        load_results(path)


def test_format_results_table_in_percent():
    metrics = {
        p: {"mAP": v, "mP@k": {1: 1.0, 5: 0.9, 10: 0.8}}
        for p, v in zip(PROTOCOLS, (0.8481, 0.6467, 0.3847), strict=True)
    }
    table = format_results_table(metrics, title="roxford5k")
    lines = table.splitlines()
    assert lines[0] == "roxford5k"
    assert lines[1].split() == ["mAP", "mP@1", "mP@5", "mP@10"]
    assert lines[2].split() == ["Easy", "84.81", "100.00", "90.00", "80.00"]
    assert lines[4].split()[:2] == ["Hard", "38.47"]


# --------------------------------------------------------------------------------------------
# CLI: extraction -> whitening / DBA / QE -> metrics -> results JSON


def test_cli_evaluate_end_to_end(tmp_path, monkeypatch, capsys):
    import apretrieval.cli.extract as cli_extract
    from apretrieval.cli import main
    from apretrieval.data.revisited import RevisitedDataset
    from apretrieval.extraction import ImageFiles, extract_descriptors
    from apretrieval.postprocess import (
        alpha_query_expansion,
        apply_whitening,
        database_augmentation,
        learn_whitening,
    )
    from test_extraction import TinyNet, fake_benchmark

    model = TinyNet()
    monkeypatch.setattr(cli_extract, "load_checkpoint_model", lambda path, device: model)
    rng = np.random.default_rng(12)
    root = tmp_path / "rox"
    fake_benchmark(root, rng, n_db=8)
    white = tmp_path / "white.npy"
    separate = rng.standard_normal((40, 6)).astype(np.float32)  # a disjoint image set
    np.save(white, separate)
    out = tmp_path / "res.json"
    rc = main(["evaluate", "--checkpoint", "m.pt", "--dataset", "roxford5k", "--root", str(root),
               "--out", str(out), "--whiten", str(white), "--whiten-dim", "4", "--dba", "2",
               "--qe", "1", "--workers", "0", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Medium" in printed and "mP@10" in printed and "roxford5k: mAP E:" in printed
    # The same pipeline by hand.
    ds = RevisitedDataset("roxford5k", root)
    q = extract_descriptors(model, ImageFiles(ds.query_paths(), ds.query_boxes()),
                            num_workers=0, progress=False)
    db = extract_descriptors(model, ImageFiles(ds.db_paths()), num_workers=0, progress=False)
    w = learn_whitening(separate, dim=4)
    q, db = apply_whitening(q, w), apply_whitening(db, w)
    db = database_augmentation(db, 2)
    q = alpha_query_expansion(q, db, 1)
    want = evaluate_revisited(q @ db.T, ds.gnd)
    res = load_results(out)
    for p in PROTOCOLS:
        assert res["metrics"][p]["mAP"] == pytest.approx(want[p]["mAP"], abs=1e-6)
    assert res["settings"]["dba"] == 2 and res["settings"]["whiten_dim"] == 4
    assert res["database"][0] == "jpg/db_0.jpg" and res["queries"][0]["image"] == "jpg/q_0.jpg"
    assert len(res["queries"][0]["topk"]) == 8


def test_cli_evaluate_reports_missing_images(tmp_path, capsys):
    from apretrieval.cli import main

    (tmp_path / "gnd_rparis6k.pkl").write_bytes(
        pickle.dumps({"imlist": ["a"], "qimlist": ["q"],
                      "gnd": [{"bbx": [0, 0, 1, 1], "easy": [0], "hard": [], "junk": []}]})
    )
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--dataset", "rparis6k",
               "--root", str(tmp_path), "--out", str(tmp_path / "r.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("apretrieval evaluate: error:")


def test_cli_evaluate_with_a_real_checkpoint(tmp_path, capsys):
    """Integration with models.save_checkpoint / load_model (small random ResNet-18)."""
    from apretrieval.cli import main
    from apretrieval.models import build_model, save_checkpoint
    from test_extraction import fake_benchmark

    fake_benchmark(tmp_path / "rox", np.random.default_rng(13))
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("resnet18", out_dim=32))
    out = tmp_path / "res.json"
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--dataset", "roxford5k", "--root",
               str(tmp_path / "rox"), "--out", str(out), "--scales", "1", "0.5",
               "--workers", "0", "--device", "cpu", "--no-progress",
               "--features", str(tmp_path / "feats" / "rox")])
    assert rc == 0, capsys.readouterr().err
    res = load_results(out)
    assert res["model"] == str(ckpt) and set(res["metrics"]) == set(PROTOCOLS)
    assert np.load(tmp_path / "feats" / "rox.db.npy").shape == (5, 32)
