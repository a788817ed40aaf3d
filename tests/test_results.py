"""Typed results, their file, the one table renderer, block-wise scoring and AP vs AP_Q."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from apretrieval.apq_analysis import APQSettings, ap_vs_quantized_ap, pearson
from apretrieval.atomic import check_writable
from apretrieval.evaluation import PROTOCOLS
from apretrieval.results import (
    EvaluationSettings,
    ProtocolMetrics,
    QueryResult,
    RetrievalResults,
    load_results,
    metrics_from_dict,
)
from apretrieval.scoring import evaluate_descriptors, evaluate_score_blocks, score_blocks
from apretrieval.scoring import write_results as write_results_here
from apretrieval.tables import format_results_table, model_table, protocol_table, render_table
from test_evaluation import load_sample, random_gnd, reference_metrics, reference_revisited

# --------------------------------------------------------------------------------------------
# AP vs AP_Q


def _reference_quantized_ap(row, pos, junk, num_bins, lo, hi):
    """AP_Q from the paper's definition, loops only: triangular soft counts per bin (centres
    from hi down to lo), precision and incremental recall per bin, sum of their products."""
    keep = [j for j in range(row.size) if j not in set(junk)]
    s = np.clip(row[keep], lo, hi)
    rel = np.isin(keep, pos)
    delta = (hi - lo) / (num_bins - 1)
    centres = [hi - m * delta for m in range(num_bins)]
    pos_counts = [sum(max(0.0, 1 - abs(v - b) / delta) for v in s[rel]) for b in centres]
    all_counts = [sum(max(0.0, 1 - abs(v - b) / delta) for v in s) for b in centres]
    ap, cum_pos, cum_all = 0.0, 0.0, 0.0
    for m in range(num_bins):
        cum_pos += pos_counts[m]
        cum_all += all_counts[m]
        if cum_all > 0:
            ap += cum_pos / cum_all * pos_counts[m] / rel.sum()
    return ap


def test_pearson_equals_numpy():
    rng = np.random.default_rng(9)
    x, y = rng.random(50), rng.random(50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert math.isnan(pearson(np.ones(5), y[:5]))


def _sample_scores(seed):
    data = load_sample("rparis6k")
    gnd = data["gnd"]
    rng = np.random.default_rng(seed)
    q, n = len(gnd), len(data["imlist"]) + 400
    strength = rng.uniform(0.0, 1.5, size=q)
    scores = rng.normal(0.0, 0.25, (q, n))
    for i, e in enumerate(gnd):
        scores[i, e["easy"] + e["hard"]] += strength[i]
    return np.clip(scores, -1, 1), gnd


def test_ap_vs_ap_q_on_real_gnd():
    scores, gnd = _sample_scores(10)
    cmp = ap_vs_quantized_ap(scores, gnd, protocol="medium", num_bins=20)
    ref = reference_revisited(scores, gnd)
    assert cmp.ap.shape == cmp.ap_q.shape == (len(gnd),)
    np.testing.assert_allclose(cmp.ap, ref["medium"][0], rtol=0, atol=1e-12)
    assert cmp.pearson > 0.95  # the supplementary reports ~0.98 on RParis
    assert cmp.pearson == pytest.approx(np.corrcoef(cmp.ap, cmp.ap_q)[0, 1], abs=1e-12)
    # Many bins: the quantized AP approaches the exact non-interpolated AP.
    fine = ap_vs_quantized_ap(scores[:3], gnd[:3], num_bins=20000)
    assert np.max(np.abs(fine.ap_q - fine.ap)) < 0.01


def test_ap_q_follows_protocol_bins_and_range():
    rng = np.random.default_rng(17)
    scores = rng.uniform(-0.5, 2.0, (4, 60))
    gnd = random_gnd(rng, 4, 60, max_items=8)
    gnd[0] = {"easy": [1, 2], "hard": [3], "junk": [4, 5]}
    settings = APQSettings(protocol="hard", num_bins=7, score_range=(0.0, 2.0))
    cmp = ap_vs_quantized_ap(scores, gnd, "hard", 7, (0.0, 2.0))
    assert cmp.settings == settings
    np.testing.assert_allclose(cmp.ap, reference_revisited(scores, gnd)["hard"][0], atol=1e-12)
    for i, e in enumerate(gnd):
        if not e["hard"]:
            assert math.isnan(cmp.ap_q[i])
            continue
        want = _reference_quantized_ap(scores[i], e["hard"], e["junk"] + e["easy"], 7, 0.0, 2.0)
        assert cmp.ap_q[i] == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"protocol": "mediun"}, "protocol"),
        ({"num_bins": 1}, "num_bins"),
        ({"score_range": (1.0, 1.0)}, "score_range"),
    ],
)
def test_apq_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        APQSettings(**kwargs)


# --------------------------------------------------------------------------------------------
# Block-wise scoring


def test_score_blocks_are_the_rows_of_the_product(tmp_path, monkeypatch):
    import apretrieval.scoring as scoring

    rng = np.random.default_rng(18)
    q = rng.standard_normal((7, 5)).astype(np.float32)
    db = rng.standard_normal((23, 5)).astype(np.float32)
    np.save(tmp_path / "db.npy", db)
    mapped = np.load(tmp_path / "db.npy", mmap_mode="r")
    monkeypatch.setattr(scoring, "DB_CHUNK_ROWS", 4)  # several database chunks per block
    blocks = list(score_blocks(q, mapped, block_size=3))
    assert [s for s, _ in blocks] == [0, 3, 6]
    assert [b.shape for _, b in blocks] == [(3, 23), (3, 23), (1, 23)]
    np.testing.assert_allclose(np.concatenate([b for _, b in blocks]), q @ db.T, atol=1e-5)
    # Default block: what fits the score budget.
    monkeypatch.setattr(scoring, "SCORE_BLOCK_BYTES", 2 * 23 * 4)
    assert [b.shape[0] for _, b in score_blocks(q, db)] == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="block_size"):
        next(score_blocks(q, db, block_size=0))


@pytest.mark.parametrize("block_size", [1, 2, 5, None])
def test_evaluation_by_blocks_equals_the_reference(block_size):
    rng = np.random.default_rng(19)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    db = rng.standard_normal((60, 8)).astype(np.float32)
    gnd = random_gnd(rng, 5, 60, max_items=10)
    gnd[1] = {"easy": [], "hard": [], "junk": [3]}  # no positive at all
    names = [f"q{i}.jpg" for i in range(5)]
    metrics, rows = evaluate_descriptors(q, db, gnd, names, block_size=block_size, topk=7)
    scores = (q @ db.T).astype(np.float64)
    want = reference_metrics(scores, gnd)
    assert set(metrics) == set(want)
    for p, m in metrics.items():
        assert m.mAP == pytest.approx(want[p]["mAP"], abs=1e-6)
        assert m.mP == pytest.approx(want[p]["mP@k"], abs=1e-6)
    ref = reference_revisited(scores, gnd)
    for i, row in enumerate(rows):
        assert row.image == names[i]
        assert list(row.topk) == np.argsort(-scores[i], kind="stable")[:7].tolist()
        for p in PROTOCOLS:
            want_ap = ref[p][0][i]
            assert (row.ap[p] is None) == bool(np.isnan(want_ap))
            if row.ap[p] is not None:
                assert row.ap[p] == pytest.approx(want_ap, abs=1e-6)
    assert rows[1].ap_q is None and rows[0].ap_q is not None


def test_each_block_is_evaluated_once(monkeypatch):
    import apretrieval.scoring as scoring

    calls = []
    real = scoring.evaluate_revisited_per_query

    def counting(scores, gnd, kappas):
        calls.append(np.asarray(scores).shape[0])
        return real(scores, gnd, kappas)

    monkeypatch.setattr(scoring, "evaluate_revisited_per_query", counting)
    rng = np.random.default_rng(20)
    scores = rng.standard_normal((6, 30))
    gnd = random_gnd(rng, 6, 30)
    blocks = [(0, scores[:4]), (4, scores[4:])]
    evaluate_score_blocks(blocks, gnd, [str(i) for i in range(6)])
    assert calls == [4, 2]
    with pytest.raises(ValueError, match="cover 4 of 6"):
        evaluate_score_blocks([(0, scores[:4])], gnd, [str(i) for i in range(6)])


# --------------------------------------------------------------------------------------------
# Results file


def _write(tmp_path, rng, **kwargs):
    q, n = 3, 40
    scores = rng.uniform(-1, 1, (q, n)).astype(np.float32)
    gnd = random_gnd(rng, q, n, max_items=5)
    gnd[0] = {"easy": [], "hard": [1], "junk": [2], "bbx": [1, 2.5, 30, 40]}
    out = tmp_path / "sub" / "results.json"
    written = write_results_here(
        out,
        scores=scores,
        gnd=gnd,
        dataset="roxford5k",
        root=tmp_path,
        database=[f"jpg/db{i}.jpg" for i in range(n)],
        queries=[f"jpg/q{i}.jpg" for i in range(q)],
        model="ckpt.pt",
        topk=10,
        **kwargs,
    )
    return out, written, scores, gnd


def test_write_and_load_results_roundtrip(tmp_path):
    from apretrieval.evaluation import evaluate_revisited_per_query

    out, written, scores, gnd = _write(tmp_path, np.random.default_rng(11))
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.json"]  # no temp left
    raw = json.loads(out.read_text())
    assert raw["root"] == str(tmp_path.resolve()) and raw["gnd_file"] == "gnd_roxford5k.pkl"
    assert raw["metrics"]["hard"]["mP@k"].keys() == {"1", "5", "10"}  # JSON: string keys
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
    typed = RetrievalResults.load(out)
    assert RetrievalResults.from_dict(typed.to_dict()) == typed
    assert typed.metrics["hard"].mP.keys() == {1, 5, 10}


def test_results_record_the_ap_q_analysis(tmp_path):
    out, _, scores, gnd = _write(tmp_path, np.random.default_rng(21), num_bins=6)
    res = RetrievalResults.load(out)
    assert res.apq == APQSettings("medium", 6, (-1.0, 1.0))
    assert json.loads(out.read_text())["apq_analysis"]["num_bins"] == 6
    cmp = ap_vs_quantized_ap(scores, gnd, "medium", 6)
    got = np.array([np.nan if q.ap_q is None else q.ap_q for q in res.queries])
    np.testing.assert_allclose(got, cmp.ap_q, atol=1e-12, equal_nan=True)
    # AP_Q is set against the AP it estimates: non-interpolated, same ranking (junk out).
    exact = np.array([_medium_ap(scores[i], e) for i, e in enumerate(gnd)])
    assert res.apq_reference == "non-interpolated"
    ap, ap_q = res.apq_pairs()
    ok = ~np.isnan(exact)
    np.testing.assert_allclose(ap, exact[ok], atol=1e-12)
    np.testing.assert_allclose(ap_q, cmp.ap_q[ok])
    assert res.apq_pearson() == pytest.approx(pearson(exact[ok], cmp.ap_q[ok]))
    # ... which sits above the official trapezoid AP wherever a negative precedes a positive.
    assert np.all(exact[ok] >= cmp.ap[ok] - 1e-12) and np.any(exact[ok] > cmp.ap[ok] + 1e-3)
    # Files without it (written before) fall back to the official AP.
    older = dataclasses.replace(
        res, queries=tuple(dataclasses.replace(q, ap_exact=None) for q in res.queries)
    )
    assert older.apq_reference == "official"
    np.testing.assert_allclose(older.apq_pairs()[0], cmp.ap[ok])


def test_exact_ap_per_query_with_ties_follows_database_order():
    from apretrieval.apq_analysis import exact_ap_per_query

    rng = np.random.default_rng(23)
    scores = np.round(rng.uniform(-1, 1, (6, 80)), 1)  # about 4 items share every score
    gnd = random_gnd(rng, 6, 80, max_items=10)
    got = exact_ap_per_query(scores, gnd, "medium")
    want = [_medium_ap(scores[i], e) for i, e in enumerate(gnd)]
    np.testing.assert_allclose(got, want, atol=1e-12, equal_nan=True)


def _medium_ap(row: np.ndarray, entry: dict) -> float:
    """Non-interpolated AP under Medium (easy + hard positives, junk removed), by hand: the mean
    over positives of the precision at their rank, ties by database order."""
    pos, junk = set(entry["easy"]) | set(entry["hard"]), set(entry["junk"])
    ranked = [j for j in sorted(range(len(row)), key=lambda j: (-row[j], j)) if j not in junk]
    hits, precisions = 0, []
    for rank, j in enumerate(ranked, 1):
        if j in pos:
            hits += 1
            precisions.append(hits / rank)
    return float(np.mean(precisions)) if precisions else math.nan


def test_results_carry_the_sharp_ap_q_of_each_query(tmp_path):
    """``ap_q_sharp``: the sharp estimator on the Medium ranking (junk out), beside ``ap_q``."""
    from apretrieval.losses.histogram import quantized_ap

    rng = np.random.default_rng(22)
    q, n = 6, 300
    gnd = []
    scores = rng.normal(0.1, 0.1, (q, n))
    for i in range(q):
        easy, hard, junk = np.split(rng.choice(n, 30, replace=False), [12, 20])
        scores[i, easy] += rng.uniform(0.2, 0.5)
        scores[i, hard] += rng.uniform(0.0, 0.3)
        gnd.append({"easy": easy.tolist(), "hard": hard.tolist(), "junk": junk.tolist()})
    scores = np.clip(scores, -1, 1).astype(np.float32)
    out = tmp_path / "r.json"
    write_results_here(
        out, scores=scores, gnd=gnd, dataset="roxford5k", root=tmp_path, model="m",
        database=[f"d{j}" for j in range(n)], queries=[f"q{i}" for i in range(q)],
    )  # fmt: skip
    res = RetrievalResults.load(out)
    assert json.loads(out.read_text())["queries"][0]["ap_q_sharp"] == res.queries[0].ap_q_sharp
    for i, entry in enumerate(gnd):
        keep = np.setdiff1d(np.arange(n), entry["junk"])  # Medium: easy + hard, junk removed
        rel = np.isin(keep, entry["easy"] + entry["hard"])
        row = torch.from_numpy(scores[i, keep].astype(np.float64))[None]
        rel_t = torch.from_numpy(rel)[None]
        want = float(quantized_ap(row, rel_t, 20, estimator="sharp")[0])
        assert res.queries[i].ap_q_sharp == pytest.approx(want, abs=1e-9)
    ap, sharp = res.apq_pairs("sharp")
    _, plain = res.apq_pairs()
    assert np.abs(sharp - ap).mean() < 0.25 * np.abs(plain - ap).mean()
    with pytest.raises(ValueError, match="estimator"):
        res.apq_pairs("tie_aware")


def test_results_files_written_before_the_typed_format_load(tmp_path):
    """The layout written so far (string mP@k keys, no analysis record, free-form settings)."""
    old = {
        "dataset": "demo",
        "root": str(tmp_path),
        "gnd_file": "gnd_demo.pkl",
        "metrics": {
            "easy": {"mAP": 0.5, "mP@k": {"1": 1.0, "5": 0.4, "10": 0.3}},
            "medium": {"mAP": 0.25, "mP@k": {"1": 0.0, "5": 0.2, "10": 0.2}},
        },
        "database": ["jpg/a.jpg", "jpg/b.jpg"],
        "queries": [
            {
                "image": "jpg/q.jpg",
                "bbx": None,
                "topk": [1, 0],
                "topk_scores": [0.9, 0.1],
                "ap": {"easy": 0.5, "medium": 0.25, "hard": None},
                "ap_q": 0.2,
            }
        ],
        "model": "ap",
        "settings": {"scales": [1.0], "method": "ap"},
    }
    path = tmp_path / "results_ap.json"
    path.write_text(json.dumps(old))
    res = RetrievalResults.load(path)
    assert res.metrics["easy"] == ProtocolMetrics(0.5, {1: 1.0, 5: 0.4, 10: 0.3})
    assert "hard" not in res.metrics and res.apq == APQSettings()
    assert res.settings.scales == (1.0,) and res.settings.other == {"method": "ap"}
    assert res.queries[0] == QueryResult(
        "jpg/q.jpg", (1, 0), (0.9, 0.1), {"easy": 0.5, "medium": 0.25, "hard": None}, 0.2
    )
    assert load_results(path)["settings"]["method"] == "ap"
    assert res.apq_pairs("sharp")[0].size == 0  # no sharp AP_Q recorded then


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2]", "not an apretrieval results file"),
        ("{", "not JSON"),
        ('{"metrics": {}}', "lacks 'queries'"),
        ('{"metrics": {"mediun": {}}, "queries": [], "database": []}', "unknown protocol"),
        ('{"metrics": {"easy": {"mAP": 1}}, "queries": [], "database": []}', "mP@k"),
        (
            '{"metrics": {}, "queries": [{"image": "q", "topk": [3]}], "database": ["a"]}',
            "outside the database",
        ),
    ],
)
def test_load_results_rejects_other_json(tmp_path, content, match):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_results(path)


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "new" / "r.json") == tmp_path / "new" / "r.json"
    assert list((tmp_path / "new").iterdir()) == []  # the probe is gone
    (tmp_path / "f").write_text("")
    with pytest.raises(OSError, match="cannot write the output there") as err:
        check_writable(tmp_path / "f" / "r.json")
    assert err.value.filename == str(tmp_path / "f" / "r.json")  # the error layer names it
    with pytest.raises(ValueError, match="it is a folder"):
        check_writable(tmp_path)


def test_settings_record_keeps_unknown_values():
    s = EvaluationSettings.from_dict({"scales": [1, 0.5], "dba": 2, "method": "ap"})
    assert s.scales == (1.0, 0.5) and s.dba == 2 and s.other == {"method": "ap"}
    assert EvaluationSettings.from_dict(s.to_dict()) == s


# --------------------------------------------------------------------------------------------
# Tables


def _metrics(values, kappas=(1, 5, 10)):
    return {
        p: {"mAP": v, "mP@k": {k: 1.0 - 0.1 * n for n, k in enumerate(kappas)}}
        for p, v in zip(PROTOCOLS, values, strict=True)
    }


def test_format_results_table_in_percent():
    metrics = _metrics((0.8481, 0.6467, 0.3847))
    table = format_results_table(metrics, title="roxford5k")
    lines = table.splitlines()
    assert lines[0] == "roxford5k"
    assert lines[1].split() == ["mAP", "mP@1", "mP@5", "mP@10"]
    assert lines[2].split() == ["Easy", "84.81", "100.00", "90.00", "80.00"]
    assert lines[4].split()[:2] == ["Hard", "38.47"]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned columns


def test_table_marks_a_protocol_without_metrics_and_reads_string_keys():
    metrics = {"medium": {"mAP": 0.5, "mP@k": {"10": 0.25}}}  # as JSON gives it back
    rows = render_table(protocol_table(metrics), "text").splitlines()
    assert rows[1].split() == ["Easy", "n/a", "n/a"]
    assert rows[2].split() == ["Medium", "50.00", "25.00"]
    assert metrics_from_dict(metrics)["medium"].mP == {10: 0.25}


def test_one_table_three_renderings():
    table = protocol_table(_metrics((0.5, 0.25, 0.125)), decimals=1)
    md = render_table(table, "markdown").splitlines()
    assert (
        md[0] == "|  | mAP | mP@1 | mP@5 | mP@10 |"
        and md[1] == "| --- | ---: | ---: | ---: | ---: |"
    )
    assert md[3] == "| Medium | 25.0 | 100.0 | 90.0 | 80.0 |"
    page = render_table(table, "html")
    assert '<tr data-protocol="hard"><td>Hard</td><td>12.5</td><td>100.0</td>' in page
    with pytest.raises(ValueError, match="style"):
        render_table(table, "latex")


def test_model_table_compares_models():
    models = {"a": _metrics((0.5, 0.75, 0.6)), "b": {"medium": _metrics((0, 0.1, 0))["medium"]}}
    table = model_table(models, labels={"a": "model <A>"}, kappas=(10,))
    md = render_table(table, "markdown").splitlines()
    assert md[0] == (
        "| model | Easy mAP | Easy mP@10 | Medium mAP | Medium mP@10 | Hard mAP | Hard mP@10 |"
    )
    assert md[2] == "| model <A> | 50.0 | 80.0 | 75.0 | 80.0 | 60.0 | 80.0 |"
    assert md[3] == "| b | n/a | n/a | 10.0 | 80.0 | n/a | n/a |"
    assert 'data-model="a"><td>model &lt;A&gt;</td>' in render_table(table, "html")


def test_torch_scores_write_the_same_results(tmp_path):
    rng = np.random.default_rng(22)
    scores = rng.uniform(-1, 1, (2, 12)).astype(np.float32)
    gnd = [{"easy": [1], "hard": [2], "junk": []}, {"easy": [3], "hard": [], "junk": [4]}]
    kw = {
        "gnd": gnd,
        "dataset": "x",
        "root": tmp_path,
        "model": "m",
        "database": [str(i) for i in range(12)],
        "queries": ["a", "b"],
    }
    a = write_results_here(tmp_path / "a.json", scores=scores, **kw)
    b = write_results_here(tmp_path / "b.json", scores=torch.from_numpy(scores), **kw)
    assert a == b
