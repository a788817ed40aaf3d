"""Evaluating descriptor files without a checkpoint: same results as the checkpoint route,
rows matched by id whatever their order or spelling, clear errors otherwise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apretrieval.benchmark_results import evaluate_descriptor_files
from apretrieval.cli import main
from apretrieval.data.revisited import RevisitedDataset
from apretrieval.descriptors import load_features, write_features
from apretrieval.pipeline import ExtractionSettings
from apretrieval.results import RetrievalResults
from test_extraction import TinyNet, fake_benchmark


@pytest.fixture
def stand_in(monkeypatch):
    import apretrieval.pipeline as pipeline

    model = TinyNet()
    monkeypatch.setattr(pipeline, "load_checkpoint_model", lambda path, device=None: model)
    return model


@pytest.fixture
def extracted(tmp_path, stand_in):
    """A benchmark, its descriptors as `extract` writes them, and the checkpoint's results."""
    fake_benchmark(tmp_path / "rox", np.random.default_rng(3), n_db=9)
    argv = ["--dataset", "roxford5k", "--root", str(tmp_path / "rox"), "--workers", "0"]
    assert main(["extract", "--checkpoint", "m.pt", *argv, "--out", str(tmp_path / "f")]) == 0
    assert main(["evaluate", "--checkpoint", "m.pt", *argv, "--out", str(tmp_path / "c.json")]) == 0
    return tmp_path, RetrievalResults.load(tmp_path / "c.json")


def test_descriptor_files_give_the_checkpoints_results(extracted, capsys):
    tmp, by_checkpoint = extracted
    capsys.readouterr()
    argv = [
        "evaluate",
        "--query-descriptors",
        str(tmp / "f.queries.npy"),
        "--database-descriptors",
        str(tmp / "f.db.npy"),
        "--dataset",
        "roxford5k",
        "--root",
        str(tmp / "rox"),
        "--out",
        str(tmp / "d.json"),
    ]
    assert main(argv) == 0
    assert "Medium" in capsys.readouterr().out
    by_files = RetrievalResults.load(tmp / "d.json")
    assert by_files.metrics == by_checkpoint.metrics
    assert by_files.queries == by_checkpoint.queries
    assert by_files.model == "m.pt"  # the checkpoint the manifests record
    assert by_files.settings.other["query_descriptors"].endswith("f.queries.npy")


def test_another_tools_files_in_any_order_and_spelling(extracted):
    """Rows shuffled, ids as bare file names or absolute paths: matched by file name."""
    tmp, by_checkpoint = extracted
    q, db = load_features(tmp / "f.queries.npy"), load_features(tmp / "f.db.npy")
    rng = np.random.default_rng(0)
    q_order, db_order = rng.permutation(len(q.ids)), rng.permutation(len(db.ids))
    write_features(
        tmp / "other" / "q.npy",
        np.asarray(q.descriptors)[q_order],
        [f"{q.ids[i]}.jpg" for i in q_order],
    )
    # the least another tool has to write: the array and {"ids": [...]}
    np.save(tmp / "other" / "db.npy", np.asarray(db.descriptors)[db_order])
    ids = [f"/elsewhere/{db.ids[i].split('/')[-1]}" for i in db_order]
    (tmp / "other" / "db.json").write_text(json.dumps({"ids": ids}))
    ds = RevisitedDataset("roxford5k", tmp / "rox")
    res = evaluate_descriptor_files(tmp / "other" / "q.npy", tmp / "other" / "db.npy", ds)
    assert res.metrics == by_checkpoint.metrics and res.queries == by_checkpoint.queries
    assert res.model.endswith("q.npy")  # no checkpoint recorded: named by its file


def test_a_file_without_manifest_is_taken_in_the_benchmarks_order(extracted):
    tmp, by_checkpoint = extracted
    for part in ("queries", "db"):
        np.save(tmp / f"bare.{part}.npy", np.load(tmp / f"f.{part}.npy"))
    ds = RevisitedDataset("roxford5k", tmp / "rox")
    res = evaluate_descriptor_files(tmp / "bare.queries.npy", tmp / "bare.db.npy", ds)
    assert res.metrics == by_checkpoint.metrics
    np.save(tmp / "short.npy", np.load(tmp / "f.db.npy")[:-1])
    with pytest.raises(ValueError, match="8 database descriptors and no manifest"):
        evaluate_descriptor_files(tmp / "bare.queries.npy", tmp / "short.npy", ds)


def test_mismatches_are_clear_errors(extracted, capsys):
    tmp, _ = extracted
    ds = RevisitedDataset("roxford5k", tmp / "rox")
    db = load_features(tmp / "f.db.npy")
    write_features(tmp / "missing.npy", np.asarray(db.descriptors)[1:], db.ids[1:])
    with pytest.raises(ValueError, match=r"the database image 'jpg/db_0.jpg' is not among its 8"):
        evaluate_descriptor_files(tmp / "f.queries.npy", tmp / "missing.npy", ds)
    write_features(tmp / "narrow.npy", np.asarray(db.descriptors)[:, :3], db.ids)
    with pytest.raises(ValueError, match="query descriptors have 6 dimensions, database ones 3"):
        evaluate_descriptor_files(tmp / "f.queries.npy", tmp / "narrow.npy", ds)
    twice = [f"db_{i}.jpg" for i in range(8)] + ["other/db_0.png"]  # two ids named db_0
    write_features(tmp / "twice.npy", np.asarray(db.descriptors), twice)
    with pytest.raises(ValueError, match=r"'jpg/db_0\.jpg' matches several"):
        evaluate_descriptor_files(tmp / "f.queries.npy", tmp / "twice.npy", ds)
    base = ["evaluate", "--dataset", "roxford5k", "--root", str(tmp / "rox"), "--out", "x.json"]
    q = ["--query-descriptors", str(tmp / "f.queries.npy")]
    assert main([*base, *q]) == 2  # no database descriptors
    assert "both --query-descriptors Q.npy and" in capsys.readouterr().err
    both = [*q, "--database-descriptors", str(tmp / "f.db.npy"), "--checkpoint", "m.pt"]
    assert main([*base, *both]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(base) == 2
    assert "what to evaluate" in capsys.readouterr().err


def test_settings_recorded_in_the_manifest_travel_into_the_results(extracted):
    tmp, by_checkpoint = extracted
    manifest = json.loads((tmp / "f.queries.json").read_text())
    res = RetrievalResults.load(tmp / "c.json")
    assert res.settings.scales == tuple(manifest["scales"])
    ds = RevisitedDataset("roxford5k", tmp / "rox")
    from_files = evaluate_descriptor_files(tmp / "f.queries.npy", tmp / "f.db.npy", ds)
    assert from_files.settings.scales == by_checkpoint.settings.scales
    assert from_files.settings.max_side == by_checkpoint.settings.max_side
    assert from_files.settings.gem_p == pytest.approx(by_checkpoint.settings.gem_p)
    assert by_checkpoint.settings.scales == ExtractionSettings().scales  # the default scales
