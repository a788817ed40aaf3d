"""Atomic writes: the target is replaced whole, or left untouched when writing fails."""

import json
import os
import stat
import subprocess
import sys

import pytest

from apretrieval.atomic import (
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temporaries,
)


def test_success_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_open(target, "w", encoding="utf-8") as f:
        f.write("new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_failure_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_permissions_open_would_give(tmp_path, umask):
    """mkstemp creates 0600 files; atomic writes honour the umask like open() does."""
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
        atomic_write_text(tmp_path / "atomic", "x")
        with atomic_path(tmp_path / "by_path") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert want == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "atomic").stat().st_mode) == want
    assert stat.S_IMODE((tmp_path / "by_path").stat().st_mode) == want


def test_helpers_write_whole_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"k": [1, 2]}, indent=1)
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": [1, 2]}
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    # A value JSON cannot hold fails before the previous file is touched.
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "a.json", {"x": float("nan")}, allow_nan=False)
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "c", "a"):
            pass


def test_stale_temporaries_of_one_path_are_removed(tmp_path):
    """What a SIGKILL mid-write leaves (.NAME.<random>.tmp) is cleared; nothing else."""
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"good")
    stale = [tmp_path / ".checkpoint.pt.abc123.tmp", tmp_path / ".checkpoint.pt.x.tmp"]
    keep = [tmp_path / ".model.pt.abc.tmp", tmp_path / "checkpoint.pt.tmp", tmp_path / "notes"]
    for p in stale + keep:
        p.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(target)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted([target, *keep])
    assert remove_stale_temporaries(tmp_path / "missing" / "f") == []


def test_a_killed_writer_leaves_a_temporary_that_the_helper_finds(tmp_path):
    code = (
        "import os, sys\n"
        "from apretrieval.atomic import atomic_open\n"
        "with atomic_open(sys.argv[1], 'wb') as f:\n"
        "    f.write(b'half'); f.flush(); os.kill(os.getpid(), 9)\n"
    )
    target = tmp_path / "model.pt"
    proc = subprocess.run([sys.executable, "-c", code, str(target)], check=False)
    assert proc.returncode == -9
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and not target.exists()
    assert remove_stale_temporaries(target) == leftovers
    assert list(tmp_path.iterdir()) == []
