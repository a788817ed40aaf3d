"""Downloads against a loopback HTTP server: resume, validation, safe extraction, offline."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from apretrieval.cli import main
from apretrieval.data.download import dataset_files, download_dataset, extract_archive
from apretrieval.data.fetch import DownloadError, download_file
from conftest import without_thread_line
from loopback import FakeHost, closed_port_url, tar_bytes

SAMPLES = Path(__file__).parent / "data" / "revisited"


@pytest.fixture
def host():
    with FakeHost() as h:
        yield h


def tgz(members: dict[str, bytes], extra=None) -> bytes:
    return tar_bytes(members, extra, mode="w:gz")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PAYLOAD = bytes(range(256)) * 400  # 100 KiB


# --------------------------------------------------------------------------------------------
# download_file


def test_download_is_complete_validated_and_atomic(host, tmp_path):
    host.files["a.bin"] = PAYLOAD
    out = download_file(
        f"{host.url}/a.bin",
        tmp_path / "a.bin",
        size=len(PAYLOAD),
        sha256=sha(PAYLOAD),
        progress=False,
    )
    assert out.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]  # no .part left
    # A second call keeps the valid file without any request.
    n = len(host.requests)
    download_file(f"{host.url}/a.bin", out, size=len(PAYLOAD), sha256=sha(PAYLOAD), progress=False)
    assert len(host.requests) == n


def test_interrupted_transfer_resumes_with_range(host, tmp_path):
    host.files["big.tgz"] = PAYLOAD
    host.cut["big.tgz"] = 30_000
    dest = tmp_path / "big.tgz"
    with pytest.raises(DownloadError, match="resume"):
        download_file(f"{host.url}/big.tgz", dest, retries=0, progress=False, chunk_size=4096)
    assert not dest.exists()
    part = tmp_path / "big.tgz.part"
    assert part.stat().st_size == 30_000
    download_file(f"{host.url}/big.tgz", dest, sha256=sha(PAYLOAD), retries=0, progress=False)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert host.requests[-1] == ("big.tgz", "bytes=30000-")


def test_cut_transfer_is_resumed_within_one_call(host, tmp_path):
    host.files["f"] = PAYLOAD
    host.cut["f"] = 12_345
    dest = download_file(
        f"{host.url}/f", tmp_path / "f", size=len(PAYLOAD), retries=2, progress=False
    )
    assert dest.read_bytes() == PAYLOAD
    assert [r for _, r in host.requests] == [None, "bytes=12345-"]


def test_server_without_range_support_restarts(host, tmp_path):
    host.files["f"] = PAYLOAD
    (tmp_path / "f.part").write_bytes(b"garbage that must not survive")
    host.ignore_range = True
    dest = download_file(f"{host.url}/f", tmp_path / "f", sha256=sha(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_is_finished_after_416(host, tmp_path):
    host.files["f"] = PAYLOAD
    (tmp_path / "f.part").write_bytes(PAYLOAD)
    dest = download_file(f"{host.url}/f", tmp_path / "f", sha256=sha(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_checksum_and_size_mismatch_are_errors(host, tmp_path):
    host.files["f"] = PAYLOAD
    with pytest.raises(DownloadError, match="SHA-256"):
        download_file(f"{host.url}/f", tmp_path / "f", sha256="0" * 64, progress=False)
    assert not (tmp_path / "f").exists() and not (tmp_path / "f.part").exists()
    with pytest.raises(DownloadError, match="expected 5"):
        download_file(f"{host.url}/f", tmp_path / "g", size=5, progress=False)


def test_http_error_and_offline_are_clear(host, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(f"{host.url}/missing", tmp_path / "m", progress=False)
    with pytest.raises(DownloadError, match="offline"):
        download_file(f"{closed_port_url()}/x", tmp_path / "x", retries=1, progress=False)


# --------------------------------------------------------------------------------------------
# Archives


def test_extract_flattens_and_skips_unsafe_members(tmp_path):
    link = tarfile.TarInfo("oxbuild/link.jpg")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    data = tgz(
        {"oxbuild/a/x.jpg": b"x", "oxbuild/b/y.jpg": b"y", "../evil.jpg": b"e", "/abs.jpg": b"a"},
        extra=[link],
    )
    arc = tmp_path / "a.tgz"
    arc.write_bytes(data)
    n = extract_archive(arc, tmp_path / "out" / "jpg", flatten=True, progress=False)
    assert n == 2
    assert sorted(p.name for p in (tmp_path / "out" / "jpg").iterdir()) == ["x.jpg", "y.jpg"]
    assert not (tmp_path / "out" / "evil.jpg").exists() and not (tmp_path / "evil.jpg").exists()
    n = extract_archive(arc, tmp_path / "tree", flatten=False, progress=False)
    assert (tmp_path / "tree" / "oxbuild" / "a" / "x.jpg").read_bytes() == b"x" and n == 2


def test_extract_rejects_non_archive(tmp_path):
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not a tar")
    with pytest.raises(DownloadError, match="tar"):
        extract_archive(bad, tmp_path / "o", progress=False)


# --------------------------------------------------------------------------------------------
# Datasets and CLI


def test_official_urls():
    files = {f.filename: f for f in dataset_files("rparis6k")}
    assert files["paris_1-v1.tgz"].url == (
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz"
    )
    assert files["gnd_rparis6k.pkl"].url == (
        "http://cmp.felk.cvut.cz/revisitop/data/datasets/rparis6k/gnd_rparis6k.pkl"
    )
    r1m = dataset_files("revisitop1m")
    assert len(r1m) == 101
    assert r1m[0].url == "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.1.tar.gz"
    assert r1m[-1].url == "http://ptak.felk.cvut.cz/revisitop/revisitop1m/revisitop1m.txt"
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_files("oxford105k")


def _serve_roxford(host: FakeHost, monkeypatch) -> bytes:
    """The roxford5k file set on the fake host, its ground truth a real-format sample whose
    size and SHA-256 replace the published ones in the dataset table for the test."""
    import dataclasses

    import apretrieval.data.download as download

    gnd = (SAMPLES / "roxford5k_sample.pkl").read_bytes()
    files = download.DATASETS["roxford5k"]
    assert [f.filename for f in files] == ["oxbuild_images-v1.tgz", "gnd_roxford5k.pkl"]
    assert files[1].size == 149871  # the published file's
    sample = dataclasses.replace(files[1], size=len(gnd), sha256=sha(gnd))
    monkeypatch.setitem(download.DATASETS, "roxford5k", (files[0], sample))
    host.files["oxbuildings/oxbuild_images-v1.tgz"] = tgz(
        {"oxbuild_images/all_souls_000013.jpg": b"q", "oxbuild_images/ashmolean_000283.jpg": b"d"}
    )
    host.files["roxford5k/gnd_roxford5k.pkl"] = gnd
    return gnd


def test_download_dataset_from_mirror_is_idempotent(host, tmp_path, monkeypatch):
    gnd = _serve_roxford(host, monkeypatch)
    root = download_dataset(
        "roxford5k", tmp_path / "rox", mirror=host.url, progress=False, log=None
    )
    assert (root / "gnd_roxford5k.pkl").read_bytes() == gnd
    assert sorted(p.name for p in (root / "jpg").iterdir()) == [
        "all_souls_000013.jpg",
        "ashmolean_000283.jpg",
    ]
    assert not (root / "oxbuild_images-v1.tgz").exists()  # archive removed after extraction
    n = len(host.requests)
    download_dataset("roxford5k", root, mirror=host.url, progress=False, log=None)
    assert len(host.requests) == n


def test_wrong_gnd_bytes_are_rejected(host, tmp_path, monkeypatch):
    gnd = _serve_roxford(host, monkeypatch)
    host.files["roxford5k/gnd_roxford5k.pkl"] = b"x" * len(gnd)  # right size, wrong content
    with pytest.raises(DownloadError, match="SHA-256"):
        download_dataset("roxford5k", tmp_path, mirror=host.url, progress=False, log=None)


def test_r1m_layout_keeps_archive_paths(host, tmp_path):
    for i in range(1, 101):
        host.files[f"revisitop1m/jpg/revisitop1m.{i}.tar.gz"] = tgz({f"{i:03d}/img{i}.jpg": b"z"})
    host.files["revisitop1m/revisitop1m.txt"] = b"001/img1.jpg\n"
    root = download_dataset("revisitop1m", tmp_path, mirror=host.url, progress=False, log=None)
    assert (root / "jpg" / "100" / "img100.jpg").exists()
    assert (root / "revisitop1m.txt").read_text() == "001/img1.jpg\n"


def test_cli_download(host, tmp_path, capsys, monkeypatch):
    _serve_roxford(host, monkeypatch)
    rc = main(
        ["download", "roxford5k", "--root", str(tmp_path), "--mirror", host.url, "--no-progress"]
    )
    assert rc == 0 and (tmp_path / "jpg" / "all_souls_000013.jpg").exists()
    assert "ready" in capsys.readouterr().out


def test_cli_download_offline_is_one_clear_line(tmp_path, capsys):
    rc = main(
        [
            "download",
            "rparis6k",
            "--root",
            str(tmp_path),
            "--mirror",
            closed_port_url(),
            "--retries",
            "0",
            "--no-progress",
        ]
    )
    err = without_thread_line(capsys.readouterr().err).strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith("apretrieval download: error: cannot download") and "offline" in err


def test_stale_destination_is_fetched_again(host, tmp_path):
    host.files["f"] = PAYLOAD
    dest = tmp_path / "f"
    dest.write_bytes(b"truncated")
    download_file(f"{host.url}/f", dest, size=len(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_rparis6k_two_archives_and_an_interrupted_extraction_resume(host, tmp_path, monkeypatch):
    """rparis6k ships its images in two archives; extraction stopped inside the second one
    keeps the first one's work (its marker) and no half-written image, and the next run
    finishes without fetching the first archive again."""
    import dataclasses

    import apretrieval.data.download as download

    files = download.DATASETS["rparis6k"]
    assert [f.filename for f in files] == ["paris_1-v1.tgz", "paris_2-v1.tgz", "gnd_rparis6k.pkl"]
    gnd = b"ground truth bytes"
    sample = dataclasses.replace(files[2], size=len(gnd), sha256=sha(gnd))
    monkeypatch.setitem(download.DATASETS, "rparis6k", (files[0], files[1], sample))
    first = {f"paris/defense/paris_defense_{i:06d}.jpg": b"d%d" % i for i in range(3)}
    second = {f"paris/eiffel/paris_eiffel_{i:06d}.jpg": b"e%d" % i for i in range(3)}
    host.files["parisbuildings/paris_1-v1.tgz"] = tgz(first)
    host.files["parisbuildings/paris_2-v1.tgz"] = tgz(second)
    host.files["rparis6k/gnd_rparis6k.pkl"] = gnd

    real_copy, copied = download.shutil.copyfileobj, []

    def power_cut(src, dst, length=0):
        if len(copied) == 4:  # the second image of the second archive
            dst.write(b"half")
            raise KeyboardInterrupt
        copied.append(1)
        return real_copy(src, dst, length)

    monkeypatch.setattr(download.shutil, "copyfileobj", power_cut)
    with pytest.raises(KeyboardInterrupt):
        download_dataset("rparis6k", tmp_path, mirror=host.url, progress=False, log=None)
    jpg = tmp_path / "jpg"
    assert (tmp_path / ".paris_1-v1.tgz.done").read_text() == "3\n"
    assert not (tmp_path / ".paris_2-v1.tgz.done").exists()
    assert sorted(p.name for p in jpg.iterdir()) == [
        "paris_defense_000000.jpg",
        "paris_defense_000001.jpg",
        "paris_defense_000002.jpg",
        "paris_eiffel_000000.jpg",
    ]  # flattened, and nothing half-written (no temporary left either)
    assert (tmp_path / "paris_2-v1.tgz").exists()  # kept for the rerun

    monkeypatch.setattr(download.shutil, "copyfileobj", real_copy)
    fetched_before = [p for p, _ in host.requests]
    download_dataset("rparis6k", tmp_path, mirror=host.url, progress=False, log=None)
    fetched_after = [p for p, _ in host.requests][len(fetched_before) :]
    assert not any("paris_1" in p for p in fetched_after)
    want = {Path(k).name: v for k, v in {**first, **second}.items()}
    assert {p.name: p.read_bytes() for p in jpg.iterdir()} == want
    assert (tmp_path / "gnd_rparis6k.pkl").read_bytes() == gnd
    assert not (tmp_path / "paris_1-v1.tgz").exists() and not (tmp_path / "paris_2-v1.tgz").exists()
