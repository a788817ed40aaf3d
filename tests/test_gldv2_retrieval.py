"""GLDv2 retrieval: mAP@100 by hand, the benchmark's files, and an evaluation with a known
answer on a miniature downloaded from a loopback host (results file, tables, report)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apretrieval.cli import main
from apretrieval.data.gldv2 import download_gldv2
from apretrieval.data.gldv2_retrieval import Gldv2Retrieval, image_path
from apretrieval.gldv2_evaluation import (
    evaluate_gldv2_checkpoint,
    evaluate_gldv2_descriptor_files,
    rank_top_k,
)
from apretrieval.map_at_k import average_precision_at_k, precision_at_k
from apretrieval.models import build_model, save_checkpoint
from apretrieval.pipeline import ExtractionSettings
from apretrieval.results import RetrievalResults
from apretrieval.tables import benchmarks_table, model_table, protocol_table, render_table
from loopback import FakeHost
from miniatures import serve_gldv2_retrieval


@pytest.fixture
def host():
    with FakeHost() as h:
        yield h


# --------------------------------------------------------------------------------------------
# The metric


def test_map_at_k_by_hand():
    # Relevant {1, 3, 9}; ranked 1, 5, 3, 7: hits at ranks 1 and 3.
    # AP@100 = (P(1) + P(3)) / min(3, 100) = (1 + 2/3) / 3 = 5/9; AP@2 = P(1) / min(3, 2) = 1/2.
    topk = np.array([[1, 5, 3, 7]])
    relevant = [np.array([1, 3, 9])]
    np.testing.assert_allclose(average_precision_at_k(topk, relevant, 100), [5 / 9])
    np.testing.assert_allclose(average_precision_at_k(topk, relevant, 2), [1 / 2])
    # precision at 1, 2, 5: the list's missing fifth place counts as irrelevant
    np.testing.assert_allclose(precision_at_k(topk, relevant, (1, 2, 5)), [[1, 1 / 2, 2 / 5]])
    # More relevant images than k: the divisor is k, so a perfect top-k scores 1
    many = [np.arange(150)]
    assert average_precision_at_k(np.arange(100)[None], many, 100)[0] == pytest.approx(1.0)
    # Padding (-1) never counts, a query without relevant images is NaN
    out = average_precision_at_k(np.array([[-1, 4], [0, 1]]), [np.array([4]), np.array([])])
    assert out[0] == pytest.approx(1 / 2) and np.isnan(out[1])
    with pytest.raises(ValueError, match="2 relevance lists for 1 queries"):
        average_precision_at_k(topk, relevant * 2)


def test_faiss_and_exact_search_agree():
    rng = np.random.default_rng(0)
    db = rng.normal(size=(500, 16)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:20] + 0.1 * rng.normal(size=(20, 16)).astype(np.float32)
    s1, i1, how1 = rank_top_k(q, db, 100, "exact")
    s2, i2, how2 = rank_top_k(q, db, 100, "faiss")
    assert how1 == "exact knn" and how2.startswith("faiss")
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)
    assert rank_top_k(q, db[:30], 100, "exact")[1].shape == (20, 30)  # k capped at N


def test_benchmark_files_are_checked(tmp_path):
    (tmp_path / "index.csv").write_text("id\naaa111\nbbb222\n")
    solution = tmp_path / "retrieval_solution_v2.1.csv"
    solution.write_text("id,images,Usage\nq00001,aaa111,Public\nq00002,None,Ignored\n")
    ds = Gldv2Retrieval(tmp_path)
    assert ds.query_ids == ["q00001"] and ds.usage == ["public"] and ds.num_db == 2
    assert ds.query_names == ["test/q/0/0/q00001.jpg"]
    assert len(ds.missing_images()) == 3
    solution.write_text("id,images,Usage\nq00001,zzz999,Private\n")
    with pytest.raises(ValueError, match=r"'zzz999' is not in index\.csv"):
        Gldv2Retrieval(tmp_path)
    solution.write_text("id,images,Usage\nq00001,aaa111,Secret\n")
    with pytest.raises(ValueError, match="Usage must be"):
        Gldv2Retrieval(tmp_path)
    (tmp_path / "index.csv").unlink()
    with pytest.raises(ValueError, match="download gldv2"):
        Gldv2Retrieval(tmp_path)
    with pytest.raises(ValueError, match="GLDv2 image id"):
        image_path("index", "../x")


# --------------------------------------------------------------------------------------------
# Downloaded, then evaluated


@pytest.fixture
def benchmark(host, tmp_path):
    answer = serve_gldv2_retrieval(host)
    root = tmp_path / "gldv2"
    for split in ("index", "test"):
        download_gldv2(split, root, shards="0", mirror=host.url, progress=False, log=None)
    model = build_model("resnet18", pretrained=None, out_dim=16)
    ckpt = save_checkpoint(tmp_path / "m.pt", model)
    return root, ckpt, answer


EXTRACTION = ["--scales", "1", "--max-side", "32", "--workers", "0", "--device", "cpu"]


def test_gldv2_retrieval_known_answer(benchmark, tmp_path, capsys):
    root, ckpt, answer = benchmark
    out = tmp_path / "gldv2.json"
    args = ["evaluate", "--checkpoint", str(ckpt), "--dataset", "gldv2-retrieval"]
    args += ["--root", str(root), "--out", str(out), "--features", str(tmp_path / "f")]
    assert main([*args, *EXTRACTION, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    res = RetrievalResults.load(out)
    assert res.dataset == "gldv2-retrieval" and list(res.metrics) == ["public", "private"]
    for split in ("public", "private"):
        assert res.metrics[split].mAP == pytest.approx(answer[split], abs=1e-12)
        assert res.metrics[split].mP[1] == pytest.approx(answer["p1"][split], abs=1e-12)
    assert len(res.queries) == 5 and len(res.database) == 7  # the Ignored query left out
    assert res.queries[1].ap == {"public": pytest.approx((answer["public"] * 2) - 1)}
    assert res.settings.other["metric"] == "mAP@100"
    assert res.queries[0].image.startswith("test/") and res.database[0].startswith("index/")
    # The printed table and summary line
    assert "mAP@100" in printed and "Public" in printed and "Private" in printed
    assert (
        f"Public: {100 * answer['public']:.2f}, Private: {100 * answer['private']:.2f}" in printed
    )

    # The same descriptors read back from their files: the same results
    again = evaluate_gldv2_descriptor_files(
        tmp_path / "f.queries.npy", tmp_path / "f.db.npy", Gldv2Retrieval(root)
    )
    assert again.metrics == res.metrics

    # Tables: one model, several models, several benchmarks
    text = render_table(protocol_table(res.metrics), "text")
    assert text.splitlines()[0].split() == ["mAP@100", "mP@1", "mP@5", "mP@10"]
    assert [ln.split()[0] for ln in text.splitlines()[1:]] == ["Public", "Private"]
    cols = model_table({"m": res.metrics}).columns
    assert cols[0] == "Public mAP@100" and "Private mP@10" in cols
    revisited = {"easy": {"mAP": 0.5, "mP@k": {10: 0.5}}}
    bt = benchmarks_table({"roxford5k": revisited, "gldv2-retrieval": res.metrics})
    assert bt.columns[-2:] == ("gldv2-retrieval Publ", "gldv2-retrieval Priv")
    assert bt.columns[:3] == ("roxford5k E", "roxford5k M", "roxford5k H")

    # The report: a grid per query under its own split, borders from the solution
    assert main(["report", "--results", str(out), "--out", str(tmp_path / "report")]) == 0
    html = (tmp_path / "report" / "index.html").read_text()
    assert 'data-protocol="public"' in html and 'data-protocol="private"' in html
    assert "worst #1 by AP@100" in html and "mAP@100" in html
    # B's first result is its own copy, not relevant: a negative border at rank 1
    b_block = html.split('id="query-1"')[1].split("</section>")[0]
    assert b_block.index('data-label="negative"') < b_block.index('data-label="positive"')
    # The comparison page of two results files of the benchmark
    other = tmp_path / "again.json"
    again.save(other)
    assert main(["report", "--results", str(out), str(other), "--out", str(tmp_path / "c")]) == 0
    assert "AP@100" in (tmp_path / "c" / "index.html").read_text()


def test_gldv2_retrieval_in_memory_equals_the_file_route(benchmark, tmp_path):
    root, ckpt, answer = benchmark
    settings = ExtractionSettings(scales=(1.0,), max_side=32, num_workers=0, device="cpu")
    res = evaluate_gldv2_checkpoint(str(ckpt), Gldv2Retrieval(root), settings, search="exact")
    assert res.metrics["private"].mAP == pytest.approx(answer["private"], abs=1e-12)
    assert res.settings.other["search"] == "exact knn"
    json.dumps(res.to_dict())  # plain values throughout


def test_gldv2_retrieval_missing_images_name_the_download(benchmark, capsys):
    root, ckpt, _ = benchmark
    victim = next((root / "index").rglob("*.jpg"))
    victim.unlink()
    args = ["evaluate", "--checkpoint", str(ckpt), "--dataset", "gldv2-retrieval"]
    rc = main([*args, "--root", str(root), "--out", str(root / "r.json"), *EXTRACTION])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "1 image(s) missing" in err and "download gldv2 --split index" in err
