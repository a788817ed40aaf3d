"""The extraction route of the commands, as library functions with typed settings."""

from __future__ import annotations

import numpy as np
import pytest

from apretrieval.data.revisited import RevisitedDataset
from apretrieval.extraction.images import ImageFiles
from apretrieval.extraction.loop import extract_descriptors
from apretrieval.extraction.settings import DEFAULT_MAX_SIDE
from apretrieval.pipeline import (
    ExtractionSettings,
    extract_benchmark,
    extract_folder,
    load_checkpoint_model,
    resolve_device,
)
from test_extraction import TinyNet, fake_benchmark


def test_settings_validate_and_default_once():
    s = ExtractionSettings(scales=[1, 0.5])
    assert s.scales == (1.0, 0.5) and s.max_side == DEFAULT_MAX_SIDE
    assert ExtractionSettings(max_side=None).max_side is None
    for bad in ({"scales": (1.0, 0.0)}, {"scales": ()}, {"scales": (float("nan"),)}):
        with pytest.raises(ValueError, match="scales"):
            ExtractionSettings(**bad)
    for name in ("batch_size", "shard_size", "max_side"):
        with pytest.raises(ValueError, match=name):
            ExtractionSettings(**{name: 0})
    with pytest.raises(ValueError, match="num_workers"):
        ExtractionSettings(num_workers=-1)
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu7")
    with pytest.raises(ValueError, match="checkpoint not found"):
        load_checkpoint_model("missing.pt", "cpu")


def test_extract_benchmark_in_memory_and_through_files_agree(tmp_path):
    fake_benchmark(tmp_path / "rox", np.random.default_rng(0))
    ds = RevisitedDataset("roxford5k", tmp_path / "rox")
    model = TinyNet()
    settings = ExtractionSettings(num_workers=0, progress=False, shard_size=2)
    q, db = extract_benchmark(model, ds, settings)
    # The definition: cropped queries, whole database images, in the ground truth's order.
    want_q = extract_descriptors(
        model, ImageFiles(ds.query_paths(), ds.query_boxes()), num_workers=0, progress=False
    )
    want_db = extract_descriptors(model, ImageFiles(ds.db_paths()), num_workers=0, progress=False)
    np.testing.assert_allclose(q, want_q, atol=1e-6)
    np.testing.assert_allclose(db, want_db, atol=1e-6)
    q2, db2 = extract_benchmark(model, ds, settings, tmp_path / "cache" / "rox")
    np.testing.assert_allclose(q2, q, atol=1e-6)
    np.testing.assert_allclose(db2, db, atol=1e-6)
    assert (tmp_path / "cache" / "rox.db.json").is_file()
    with pytest.raises(ValueError, match="skip_bad"):
        extract_benchmark(model, ds, ExtractionSettings(skip_bad=True))


def test_missing_benchmark_images_are_named_once(tmp_path):
    fake_benchmark(tmp_path / "rox", np.random.default_rng(1))
    (tmp_path / "rox" / "jpg" / "db_3.jpg").unlink()
    ds = RevisitedDataset("roxford5k", tmp_path / "rox")
    model = TinyNet()
    for prefix in (None, tmp_path / "cache"):
        with pytest.raises(ValueError, match=r"1 image\(s\) missing, e.g. .*db_3.jpg.*download"):
            extract_benchmark(model, ds, ExtractionSettings(num_workers=0), prefix)
    assert model.calls == 0


def test_extract_folder_ids_are_relative_paths(tmp_path):
    from PIL import Image

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("b.png", "sub/a.png"):
        Image.new("RGB", (20, 30), (10, 200, 30)).save(tmp_path / "imgs" / name)
    settings = ExtractionSettings(num_workers=0, progress=False)
    npy = extract_folder(TinyNet(), tmp_path / "imgs", tmp_path / "f", settings, checkpoint="m.pt")
    from apretrieval.descriptors import load_features

    fs = load_features(npy)
    assert fs.ids == ["b.png", "sub/a.png"] and fs.checkpoint == "m.pt"
    assert fs.descriptors.shape == (2, 6)
