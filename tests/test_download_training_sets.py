"""SfM-120k and GLDv2 downloads from a loopback host holding miniatures of the published files:
layout, parallel shards, resume after kill -9, MD5 mismatch, full disk, offline, bad pickles,
unsafe archive members."""

from __future__ import annotations

import errno
import io
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

import apretrieval.data.fetch as fetch
import apretrieval.data.shards as shards_module
from apretrieval.cli import main
from apretrieval.data.gldv2 import download_gldv2, gldv2_shards
from apretrieval.data.sfm120k import (
    cid_path,
    load_sfm120k,
    load_whiten_pairs,
)
from apretrieval.data.shards import disk_space_needed, parse_shard_range
from conftest import without_thread_line
from loopback import FakeHost, closed_port_url, tar_bytes
from miniatures import gldv2_id, md5, member, serve_gldv2_train, serve_sfm120k, sfm_db


@pytest.fixture
def host():
    with FakeHost() as h:
        yield h


def shard_requests(host: FakeHost) -> list[str]:
    return [p for p, _ in host.requests if p.endswith(".tar")]


def gldv2_argv(root: Path, split: str, shards: str | None, *extra: str) -> list[str]:
    """``apretrieval download gldv2`` of ``split``'s ``shards`` into ``root``."""
    argv = ["download", "gldv2", "--split", split, "--root", str(root)]
    return argv + (["--shards", shards] if shards is not None else []) + list(extra)


def one_line_failure(argv: list[str], capsys) -> str:
    """The error of a command that must fail with status 1 and say so in one line."""
    rc = main(argv)
    err = without_thread_line(capsys.readouterr().err).strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    return err


# --------------------------------------------------------------------------------------------
# GLDv2


def test_shard_range_and_published_paths(tmp_path):
    assert parse_shard_range(None, 500) == range(500)
    assert parse_shard_range("3-5", 500) == range(3, 6)
    assert parse_shard_range("7", 20) == range(7, 8)
    for bad in ("5-3", "0-500", "x", "-1"):
        with pytest.raises(ValueError, match="shards"):
            parse_shard_range(bad, 500)
    train = gldv2_shards("train-clean", tmp_path)
    assert len(train) == 500 and train[-1].name == "train/images_499.tar"
    assert train[0].url == "https://s3.amazonaws.com/google-landmark/train/images_000.tar"
    assert train[0].md5_url == (
        "https://s3.amazonaws.com/google-landmark/md5sum/train/md5.images_000.txt"
    )
    assert train[0].dest == tmp_path / "train"
    assert [s.name for s in gldv2_shards("test", tmp_path, "18-19")] == [
        "test/images_018.tar",
        "test/images_019.tar",
    ]
    assert len(gldv2_shards("index", tmp_path)) == 100
    mirrored = gldv2_shards("index", tmp_path, "0", mirror="http://m/x")
    assert mirrored[0].url == "http://m/x/gldv2/index/images_000.tar"
    with pytest.raises(ValueError, match="split"):
        gldv2_shards("val", tmp_path)


def test_gldv2_train_clean_downloads_verifies_and_reruns_nothing(host, tmp_path):
    where = serve_gldv2_train(host)
    root = download_gldv2(
        "train-clean", tmp_path, shards="0-2", jobs=2, mirror=host.url, progress=False, log=None
    )
    assert (root / "train_clean.csv").read_bytes() == host.files["gldv2/metadata/train_clean.csv"]
    for image_id in where:
        assert (root / "train" / member(image_id)).is_file()
    work = root / "shards" / "train"
    assert sorted(p.name for p in work.glob("*.done")) == [
        f"images_00{i}.tar.done" for i in range(3)
    ]
    assert not list(work.glob("*.tar")) and not list(work.glob("*.part"))  # archives removed
    assert sorted(host.heads) == [f"gldv2/train/images_00{i}.tar" for i in range(3)]
    n = len(host.requests)
    download_gldv2(
        "train-clean", tmp_path, shards="0-2", jobs=2, mirror=host.url, progress=False, log=None
    )
    assert len(host.requests) == n  # everything in place: not one request


def test_gldv2_shard_subset(host, tmp_path):
    serve_gldv2_train(host, num_shards=3)
    download_gldv2("train-clean", tmp_path, shards="1-1", mirror=host.url, progress=False, log=None)
    assert shard_requests(host) == ["gldv2/train/images_001.tar"]
    assert [p.name for p in (tmp_path / "shards" / "train").glob("*.done")] == [
        "images_001.tar.done"
    ]


def test_wrong_md5_fails_naming_the_shard_and_keeps_the_others(host, tmp_path, capsys):
    serve_gldv2_train(host)
    host.files["gldv2/md5sum/train/md5.images_001.txt"] = b"0" * 32 + b"  images_001.tar\n"
    args = gldv2_argv(tmp_path, "train-clean", "0-2", "--mirror", host.url, "--no-progress")
    err = one_line_failure([*args, "--jobs", "3"], capsys)
    assert "MD5 mismatch" in err and "train/images_001.tar" in err
    assert "images_000" not in err and "images_002" not in err
    work = tmp_path / "shards" / "train"
    assert sorted(p.name for p in work.glob("*.done")) == [
        "images_000.tar.done",
        "images_002.tar.done",
    ]
    assert not (work / "images_001.tar").exists() and not (work / "images_001.tar.part").exists()
    # Fixed at the source: the rerun fetches that shard alone.
    good = host.files["gldv2/train/images_001.tar"]
    host.files["gldv2/md5sum/train/md5.images_001.txt"] = f"{md5(good)}  images_001.tar\n".encode()
    before = len(shard_requests(host))
    assert main(args) == 0
    assert shard_requests(host)[before:] == ["gldv2/train/images_001.tar"]


def test_full_disk_is_refused_before_any_shard(host, tmp_path, monkeypatch, capsys):
    serve_gldv2_train(host)
    total = sum(len(v) for k, v in host.files.items() if k.endswith(".tar"))

    class Usage:
        free = total  # the images alone take that much: archives do not fit beside them

    monkeypatch.setattr(shards_module.shutil, "disk_usage", lambda _path: Usage)
    args = gldv2_argv(tmp_path, "train-clean", "0-2", "--mirror", host.url, "--no-progress")
    err = one_line_failure(args, capsys)
    assert "not enough free disk space" in err and "3 shards" in err
    assert shard_requests(host) == []


def test_disk_filling_up_mid_shard_is_one_line_and_not_retried(host, tmp_path, monkeypatch, capsys):
    serve_gldv2_train(host, num_shards=1)

    class Full(io.BytesIO):
        def write(self, _data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real = fetch._append
    monkeypatch.setattr(
        fetch,
        "_append",
        lambda part: Full() if part.suffix == ".part" and ".tar" in part.name else real(part),
    )
    args = gldv2_argv(tmp_path, "train-clean", "0", "--mirror", host.url, "--no-progress")
    err = one_line_failure([*args, "--retries", "3"], capsys)
    assert "no space left on" in err and "free some disk space" in err
    assert "images_000.tar.part" in err
    assert shard_requests(host) == ["gldv2/train/images_000.tar"]  # no retry against a full disk


def test_offline_is_one_clear_line(tmp_path, capsys):
    args = gldv2_argv(tmp_path, "test", None, "--mirror", closed_port_url(), "--no-progress")
    err = one_line_failure([*args, "--retries", "0"], capsys)
    assert "cannot download" in err and "offline" in err


def test_gldv2_needs_a_split_and_others_refuse_gldv2_flags(tmp_path, capsys):
    assert main(["download", "gldv2", "--root", str(tmp_path)]) == 2
    assert "--split" in capsys.readouterr().err
    assert main(["download", "sfm120k", "--root", str(tmp_path), "--shards", "0-1"]) == 2
    assert "gldv2 only" in capsys.readouterr().err


def test_kill_9_mid_shard_then_resume(host, tmp_path):
    """A download killed (SIGKILL) in the middle of a shard leaves its .part; the rerun asks
    only for the missing bytes (Range) and ends with the verified, extracted shard."""
    big = {member(gldv2_id(i)): os.urandom(60_000) for i in range(4)}
    data = tar_bytes(big)
    host.files["gldv2/test/images_000.tar"] = data
    host.files["gldv2/md5sum/test/md5.images_000.txt"] = f"{md5(data)}  images_000.tar\n".encode()
    host.files["gldv2/metadata/test.csv"] = b"id\n" + "\n".join(map(gldv2_id, range(4))).encode()
    host.files["gldv2/ground_truth/retrieval_solution_v2.1.csv"] = b"id,images,Usage\n"
    host.slow["gldv2/test/images_000.tar"] = (4096, 0.05)  # ~3 s in all
    args = gldv2_argv(tmp_path, "test", "0", "--mirror", host.url, "--no-progress")
    code = "import sys; from apretrieval.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.DEVNULL)
    part = tmp_path / "shards" / "test" / "images_000.tar.part"
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size >= 8192):
        assert proc.poll() is None, "the download ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    have = part.stat().st_size
    assert 0 < have < len(data)
    del host.slow["gldv2/test/images_000.tar"]
    assert main(args) == 0
    assert host.requests[-1] == ("gldv2/test/images_000.tar", f"bytes={have}-")
    for name, content in big.items():
        assert (tmp_path / "test" / name).read_bytes() == content
    assert (tmp_path / "shards" / "test" / "images_000.tar.done").is_file()
    assert (tmp_path / "retrieval_solution_v2.1.csv").is_file()


def test_unsafe_shard_members_are_never_written(host, tmp_path):
    link = tarfile.TarInfo("a/b/c/link.jpg")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    hard = tarfile.TarInfo("a/b/c/hard.jpg")
    hard.type = tarfile.LNKTYPE
    hard.linkname = "../../../../outside.jpg"
    data = tar_bytes(
        {"a/b/c/abc0.jpg": b"ok", "../../escape.jpg": b"x", "/abs.jpg": b"y"}, [link, hard]
    )
    host.files["gldv2/index/images_000.tar"] = data
    host.files["gldv2/md5sum/index/md5.images_000.txt"] = f"{md5(data)}  x\n".encode()
    host.files["gldv2/metadata/index.csv"] = b"id\nabc0\n"
    host.files["gldv2/ground_truth/retrieval_solution_v2.1.csv"] = b"id,images,Usage\n"
    root = tmp_path / "root"
    download_gldv2("index", root, shards="0", mirror=host.url, progress=False, log=None)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg"))
    assert written == ["root/index/a/b/c/abc0.jpg"]


def test_disk_space_estimate():
    # Three 10-byte shards, 4 bytes of one already there, two at a time: images (30) + the two
    # largest remaining archives (10 + 10); keeping archives: all remaining ones (26).
    assert disk_space_needed([10, 10, 10], [4, 0, 0], jobs=2, keep_archives=False) == 50
    assert disk_space_needed([10, 10, 10], [4, 0, 0], jobs=2, keep_archives=True) == 56


# --------------------------------------------------------------------------------------------
# SfM-120k


def test_sfm120k_download_layout(host, tmp_path, capsys):
    db, whiten = sfm_db()
    serve_sfm120k(host, db, whiten)
    rc = main(
        ["download", "sfm120k", "--root", str(tmp_path), "--mirror", host.url, "--no-progress"]
    )
    assert rc == 0 and "sfm120k: ready" in capsys.readouterr().out
    cid = db["train"]["cids"][5]
    assert (tmp_path / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid).is_file()
    parts = load_sfm120k(tmp_path / "retrieval-SfM-120k.pkl")
    assert parts["train"].cids == tuple(db["train"]["cids"])
    np.testing.assert_array_equal(parts["train"].cluster, db["train"]["cluster"])
    pairs = load_whiten_pairs(tmp_path / "retrieval-SfM-120k-whiten.pkl")
    np.testing.assert_array_equal(pairs.qidxs, [0, 4, 8])
    assert not (tmp_path / "ims.tar.gz").exists() and (tmp_path / ".ims.tar.gz.done").is_file()


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_sfm120k_pickle_is_refused_removed_and_not_run(host, tmp_path, capsys):
    db, whiten = sfm_db()
    serve_sfm120k(host, db, whiten)
    marker = tmp_path / "pwned"
    db["train"]["cluster"] = _Exploit(marker)
    host.files["sfm120k/retrieval-SfM-120k.pkl"] = pickle.dumps(db)
    root = tmp_path / "sfm"
    argv = ["download", "sfm120k", "--root", str(root), "--mirror", host.url, "--no-progress"]
    err = one_line_failure(argv, capsys)
    assert "refusing" in err and "system" in err
    assert not marker.exists() and not (root / "retrieval-SfM-120k.pkl").exists()
    assert not any(p.endswith("ims.tar.gz") for p, _ in host.requests)  # stopped before images


def test_sfm120k_full_disk_is_refused_before_the_images(host, tmp_path, monkeypatch, capsys):
    db, whiten = sfm_db()
    serve_sfm120k(host, db, whiten)
    size = len(host.files["sfm120k/ims.tar.gz"])

    class Usage:
        free = 2 * size - 1  # the archive and its images need twice its size

    monkeypatch.setattr(shards_module.shutil, "disk_usage", lambda _path: Usage)
    args = ["download", "sfm120k", "--root", str(tmp_path), "--mirror", host.url, "--no-progress"]
    err = one_line_failure(args, capsys)
    assert "not enough free disk space" in err
    assert f"need about {2 * size / 1024:.1f} KiB" in err
    assert not any(p.endswith("ims.tar.gz") for p, _ in host.requests)
    Usage.free = 2 * size
    assert main(args) == 0


def test_sfm120k_structure_errors(tmp_path):
    path = tmp_path / "retrieval-SfM-120k.pkl"
    path.write_bytes(pickle.dumps({"train": {"cids": ["a" * 8]}}))
    with pytest.raises(ValueError, match="'train' and 'val'"):
        load_sfm120k(path)
    db, _ = sfm_db()
    db["val"]["pidxs"] = [999]
    path.write_bytes(pickle.dumps(db))
    with pytest.raises(ValueError, match="val: pidxs: index outside"):
        load_sfm120k(path)
    with pytest.raises(ValueError, match="SfM-120k image name"):
        cid_path("ims", "../x")
