"""Released networks by name: fetched from a loopback host (as a --mirror), resumed, verified
against what each project publishes, and converted as a local file would be."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import zipfile

import numpy as np
import pytest
import torch

from apretrieval.cli import main
from apretrieval.convert import convert
from apretrieval.data.fetch import ChecksumError, DownloadError
from apretrieval.released import RELEASED, fetch_released, released_network
from loopback import FakeHost
from test_convert import fake_sklearn, make_cirtorch, make_dirtorch  # noqa: F401 (a fixture)


def test_the_registry_holds_what_the_projects_publish():
    for name, net in RELEASED.items():
        assert net.name == name and net.source in ("dirtorch", "cirtorch")
        assert net.path.startswith(f"{net.source}/")
        if net.source == "cirtorch":  # <name>-<sha256 prefix>.pth on the project's host
            assert net.url.startswith("http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/")
            assert net.url.endswith("/" + net.filename)
            assert re.fullmatch(rf"{re.escape(name)}-([0-9a-f]{{7}})\.pth", net.filename)
            assert net.filename == f"{name}-{net.sha256_prefix}.pth" and not net.archive
        else:  # a zip on Google Drive, by file id
            assert net.archive and net.sha256_prefix is None
            assert re.search(r"[?&]id=[\w-]{33}$", net.url), net.url
    assert "Resnet101-AP-GeM" in RELEASED and "gl18-tl-resnet101-gem-w" in RELEASED
    assert not any("vgg" in n or "MAC" in n for n in RELEASED)  # not convertible: not listed


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cirtorch_file(tmp_path):
    """A cirtorch checkpoint's bytes and a registry entry whose name publishes its hash."""
    make_cirtorch(tmp_path / "src.pth")
    data = (tmp_path / "src.pth").read_bytes()
    real = RELEASED["gl18-tl-resnet101-gem-w"]
    net = dataclasses.replace(
        real,
        sha256_prefix=_sha(data)[:7],
        path=f"cirtorch/gl18-tl-resnet101-gem-w-{_sha(data)[:7]}.pth",
    )
    return data, net


def test_a_cirtorch_name_is_fetched_resumed_verified_and_reused(tmp_path, cirtorch_file):
    data, net = cirtorch_file
    with FakeHost() as host:
        host.files[net.path] = data
        host.cut[net.path] = len(data) // 3  # the connection drops a third of the way in
        path = fetch_released(net, tmp_path / "dl", mirror=host.url, progress=False, log=None)
        assert path.read_bytes() == data and path == tmp_path / "dl" / net.path
        assert any(rng == f"bytes={len(data) // 3}-" for _, rng in host.requests)  # resumed
        before = len(host.requests)
        assert fetch_released(net, tmp_path / "dl", mirror=host.url, log=None) == path
        assert len(host.requests) == before  # kept: nothing fetched again
    got, want = convert("cirtorch", path), convert("cirtorch", tmp_path / "src.pth")
    x = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(got.model.eval()(x), want.model.eval()(x))


def test_a_file_that_does_not_match_its_published_hash_is_removed(tmp_path, cirtorch_file):
    data, net = cirtorch_file
    wrong = dataclasses.replace(net, sha256_prefix="0000000")
    with FakeHost() as host:
        host.files[net.path] = data
        with pytest.raises(ChecksumError, match="does not start with the 0000000"):
            fetch_released(wrong, tmp_path / "dl", mirror=host.url, progress=False, log=None)
    assert not (tmp_path / "dl" / net.path).exists()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_a_dirtorch_name_is_unzipped_to_its_one_checkpoint(tmp_path, fake_sklearn):  # noqa: F811
    make_dirtorch(tmp_path / "src.pt", fake_sklearn)
    pt = (tmp_path / "src.pt").read_bytes()
    net = RELEASED["Resnet101-AP-GeM"]
    with FakeHost() as host:
        host.files[net.path] = _zip({"Resnet-101-AP-GeM.pt": pt})
        path = fetch_released(net, tmp_path / "dl", mirror=host.url, progress=False, log=None)
        assert path.read_bytes() == pt and path.name == "Resnet101-AP-GeM.pt"
        assert not (tmp_path / "dl" / net.path).exists()  # the archive is not kept
        assert fetch_released(net, tmp_path / "dl", mirror=host.url, log=None) == path
        assert len(host.requests) == 1
    converted = convert("dirtorch", path)
    assert set(converted.whitenings) == {"Landmarks_clean"}


@pytest.mark.parametrize(
    ("served", "message"),
    [
        (b"<!DOCTYPE html><html>Google Drive - quota exceeded</html>", "sent a web page"),
        (b"not an archive at all", "not a zip archive"),
        (_zip({"a.pt": b"1", "b.pt": b"2"}), r"expected one \.pt checkpoint inside"),
        (_zip({"README": b"x"}), "found none"),
    ],
)
def test_what_drive_may_send_instead_is_said_as_such(tmp_path, served, message):
    net = RELEASED["Resnet50-AP-GeM"]
    with FakeHost() as host:
        host.files[net.path] = served
        with pytest.raises(DownloadError, match=message):
            fetch_released(net, tmp_path / "dl", mirror=host.url, progress=False, log=None)
    assert not (tmp_path / "dl" / "dirtorch" / "Resnet50-AP-GeM.pt").exists()


def test_cli_convert_by_name(tmp_path, cirtorch_file, monkeypatch, capsys):
    import apretrieval.released as released

    data, net = cirtorch_file
    monkeypatch.setitem(released.RELEASED, net.name, net)
    out = tmp_path / "conv" / "gl18.pt"
    argv = ["convert", "--from", "cirtorch", net.name, "--out", str(out)]
    argv += ["--download-dir", str(tmp_path / "dl"), "--no-progress"]
    with FakeHost() as host:
        host.files[net.path] = data
        assert main([*argv, "--mirror", host.url]) == 0
    assert "downloading cirtorch gl18-tl-resnet101-gem-w" in capsys.readouterr().out
    assert out.is_file() and (tmp_path / "dl" / net.path).is_file()
    # a name of the other project, an unknown name, --mirror with a file: usage errors
    assert main(["convert", "--from", "dirtorch", net.name, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nor the name of a released dirtorch network; released: Resnet101-TL-GeM" in err
    assert main(["convert", "--from", "cirtorch", "no-such-net", "--out", str(out)]) == 2
    local = ["convert", "--from", "cirtorch", str(tmp_path / "src.pth"), "--out", str(out)]
    assert main([*local, "--mirror", "http://127.0.0.1:1"]) == 2
    assert "--mirror applies to a released name" in capsys.readouterr().err


def test_released_network_lookup():
    assert released_network("gl18-tl-resnet50-gem-w").source == "cirtorch"
    with pytest.raises(ValueError, match="released: Resnet101-TL-GeM, Resnet50-AP-GeM"):
        released_network("gl18-tl-resnet50-gem-w", "dirtorch")
    assert np.all([released_network(n).name == n for n in RELEASED])
