"""Training lists of the downloaded training sets (SfM-120k pickle, GLDv2 train_clean.csv),
landmark exclusion, and a few training steps on each set fetched from a loopback host."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from apretrieval.cli import main
from apretrieval.data.gldv2 import download_gldv2
from apretrieval.data.lists import (
    ImageList,
    gldv2_csv,
    open_image_list,
    read_class_names,
    sfm120k_list,
)
from apretrieval.data.sfm120k import download_sfm120k
from conftest import tiny_train_argv
from loopback import FakeHost
from miniatures import member, serve_gldv2_train, serve_sfm120k, sfm_db


@pytest.fixture
def host():
    with FakeHost() as h:
        yield h


def tiny_train_args(data: Path, out: Path) -> list[str]:
    # The start summary (data counts) is part of the progress output.
    return tiny_train_argv(data, out, "--progress", "true")


# --------------------------------------------------------------------------------------------
# Lists


def test_without_classes_renumbers_and_keeps_order():
    images = ImageList(["a", "b", "c", "d", "e"], [0, 1, 2, 1, 0], ["7", "31", "2"])
    kept = images.without_classes({"31", "999"})
    assert kept.paths == ["a", "c", "e"] and kept.classes == ["7", "2"]
    np.testing.assert_array_equal(kept.labels, [0, 1, 0])
    assert kept.excluded_classes == 1


def test_read_class_names(tmp_path):
    path = tmp_path / "exclude.txt"
    path.write_text("# shared with ROxford\n12\n\n 345  # a comment\n12\n")
    assert read_class_names(path) == {"12", "345"}
    with pytest.raises(ValueError, match="landmark list not found"):
        read_class_names(tmp_path / "none.txt")


def test_gldv2_csv_finds_images_under_train(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train_clean.csv").write_text("landmark_id,images\n5,abc123 abd456\n")
    images = gldv2_csv(tmp_path / "train_clean.csv")
    assert images.paths[0] == str(tmp_path / "train" / "a" / "b" / "c" / "abc123.jpg")
    # Without a train/ folder the CSV's own folder is the root, as before.
    (tmp_path / "train").rmdir()
    assert gldv2_csv(tmp_path / "train_clean.csv").paths[0].startswith(str(tmp_path / "a"))


def test_sfm120k_list_uses_clusters_as_classes(tmp_path):
    db, _ = sfm_db(num_clusters=3, per_cluster=4)
    path = tmp_path / "retrieval-SfM-120k.pkl"
    path.write_bytes(pickle.dumps(db))
    images = sfm120k_list(path)
    assert images.classes == ["100", "101", "102"] and len(images) == 12
    np.testing.assert_array_equal(images.labels, np.repeat([0, 1, 2], 4))
    cid = db["train"]["cids"][0]
    assert images.paths[0] == str(tmp_path / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid)
    # Through the generic reader: .pkl is SfM-120k; no image on disk, so each one is dropped.
    checked = open_image_list(path)
    assert len(checked) == 0 and checked.dropped == 12


def test_malicious_training_pickle_is_refused_by_train(tmp_path, capsys):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "retrieval-SfM-120k.pkl"
    path.write_bytes(pickle.dumps({"train": Exploit(), "val": {}}))
    rc = main(tiny_train_args(path, tmp_path / "run"))
    err = capsys.readouterr()
    assert rc == 2 and "pwned" not in err.out
    assert "refusing to load a pickle that references builtins.print" in err.err


# --------------------------------------------------------------------------------------------
# Downloaded, then trained on


def test_train_on_downloaded_gldv2_train_clean_with_exclusion(host, tmp_path, capsys):
    where = serve_gldv2_train(host, num_shards=3, per_landmark=4)
    root = tmp_path / "gldv2"
    # Two of the three shards: a third of the images are missing and dropped with a count.
    download_gldv2("train-clean", root, shards="0-1", mirror=host.url, progress=False, log=None)
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("31\n")
    images = open_image_list(root / "train_clean.csv", exclude_classes=exclude)
    kept = {member(i) for i, (landmark, shard) in where.items() if landmark != 31 and shard < 2}
    missing = sum(1 for landmark, shard in where.values() if landmark != 31 and shard == 2)
    assert images.classes == ["2", "7"] and images.dropped == missing == 3
    assert {Path(p).relative_to(root / "train").as_posix() for p in images.paths} == kept

    out = tmp_path / "run"
    args = tiny_train_args(root / "train_clean.csv", out)
    assert main([*args, "--exclude-landmarks", str(exclude)]) == 0
    assert (out / "model.pt").is_file()
    summary = "".join(capsys.readouterr())  # the start summary goes to stderr
    assert f"{len(images)} images, 2 classes" in summary
    assert "3 missing or unreadable files" in summary
    assert "1 classes excluded by --exclude-landmarks" in summary


def test_train_on_downloaded_sfm120k(host, tmp_path, capsys):
    db, whiten = sfm_db(num_clusters=3, per_cluster=4)
    serve_sfm120k(host, db, whiten)
    root = download_sfm120k(tmp_path / "sfm", mirror=host.url, progress=False, log=None)
    out = tmp_path / "run"
    assert main(tiny_train_args(root / "retrieval-SfM-120k.pkl", out)) == 0
    assert (out / "model.pt").is_file()
    assert "12 images, 3 classes" in "".join(capsys.readouterr())
