"""Training image lists: folder, GLDv2 CSV, Landmarks-clean list; bad files skipped."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from apretrieval.data.lists import (
    gldv2_csv,
    image_folder,
    landmarks_clean_list,
    open_image_list,
)


def _img(path, size=(12, 9), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)
    return path


def test_image_folder_classes_and_labels(tmp_path):
    for cls, n in (("b", 2), ("a", 3)):
        for i in range(n):
            _img(tmp_path / cls / f"{i}.jpg")
    _img(tmp_path / "a" / "deeper" / "x.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "stray.jpg").write_bytes(b"")  # files at the root belong to no class
    images = image_folder(tmp_path)
    assert images.classes == ["a", "b"] and len(images) == 6
    assert images.labels.dtype == np.int64
    assert images.labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert all(p.endswith((".jpg", ".png")) for p in images.paths)
    with pytest.raises(ValueError, match="not found"):
        image_folder(tmp_path / "missing")


def test_gldv2_train_clean_csv(tmp_path):
    ids = ["abc123", "abd999", "f00baa"]
    for i in ids:
        _img(tmp_path / "train" / i[0] / i[1] / i[2] / f"{i}.jpg")
    csv = tmp_path / "train_clean.csv"
    csv.write_text("landmark_id,images\n10,abc123 abd999\n2,f00baa\n")
    images = gldv2_csv(csv, tmp_path / "train")
    assert images.classes == ["2", "10"]  # numeric ids sort as numbers
    assert images.labels.tolist() == [1, 1, 0]
    assert images.paths[0].endswith("train/a/b/c/abc123.jpg")
    assert images.load(0).size == (12, 9)


def test_gldv2_train_csv_with_urls_or_paths(tmp_path):
    _img(tmp_path / "a" / "b" / "c" / "abc.jpg")
    _img(tmp_path / "local" / "x.jpg")
    csv = tmp_path / "train.csv"
    csv.write_text("id,url,landmark_id\nabc,http://example.org/abc.jpg,5\nxyz,local/x.jpg,7\n")
    images = gldv2_csv(csv)
    assert images.paths == [str(tmp_path / "a/b/c/abc.jpg"), str(tmp_path / "local/x.jpg")]
    assert images.classes == ["5", "7"]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,cls\nx,1\n")
    with pytest.raises(ValueError, match="expected columns"):
        gldv2_csv(bad)


def test_landmarks_clean_list(tmp_path):
    _img(tmp_path / "imgs" / "0001" / "a.jpg")
    _img(tmp_path / "imgs" / "with space" / "b.jpg")
    lst = tmp_path / "annotation_clean_train.txt"
    lst.write_text("# comment\n0001/a.jpg 3\n\nwith space/b.jpg 1\n")
    images = landmarks_clean_list(lst, tmp_path / "imgs")
    assert images.classes == ["1", "3"] and images.labels.tolist() == [1, 0]
    assert images.paths[1] == str(tmp_path / "imgs" / "with space" / "b.jpg")
    lst.write_text("just-a-path\n")
    with pytest.raises(ValueError, match=":1: expected 'path label'"):
        landmarks_clean_list(lst)


def test_missing_and_corrupt_files_are_reported_and_skipped(tmp_path, caplog):
    _img(tmp_path / "a" / "ok.jpg")
    _img(tmp_path / "a" / "gray.png", mode="L")
    (tmp_path / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    lst = tmp_path / "list.txt"
    lst.write_text("a/ok.jpg 0\na/gone.jpg 0\na/corrupt.jpg 1\na/gray.png 1\n")
    with caplog.at_level(logging.WARNING, logger="apretrieval.data"):
        images = open_image_list(lst, check="exists")
    assert len(images) == 3 and "dropped 1 of 4" in caplog.text and "gone.jpg" in caplog.text
    assert images.load(2).mode == "RGB"  # grey image converted
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="apretrieval.data"):
        assert images.load(1) is None  # corrupt: reported, not raised
    assert images.num_bad == 1 and "corrupt.jpg" in caplog.text
    assert len(open_image_list(lst, check="header")) == 2  # header check catches it upfront
    assert len(open_image_list(lst, check="none")) == 4


def test_open_image_list_format_detection(tmp_path):
    _img(tmp_path / "c" / "x.jpg")
    assert open_image_list(tmp_path).classes == ["c"]
    csv = tmp_path / "l.csv"
    csv.write_text("id,url,landmark_id\nx,c/x.jpg,4\n")
    assert open_image_list(csv).classes == ["4"]
    with pytest.raises(ValueError, match="data_format"):
        open_image_list(tmp_path, data_format="tfrecord")
    with pytest.raises(ValueError, match="check"):
        open_image_list(tmp_path, check="deep")
