"""Outputs under faults: paths of another kind (devices, FIFOs) never replaced, one writer per
results file, stale temporaries swept by their owner, full disks named as such."""

from __future__ import annotations

import importlib.util
import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apretrieval.cli import main
from apretrieval.extraction.loop import extract_descriptors
from conftest import without_thread_line
from test_faults_files import _extract_cli, _images, stand_in

__all__ = ["stand_in"]  # test_faults_files' fixture: the checkpoint loader returns TinyNet


# ------------------------------------------------------------------ outputs of another kind


def test_outputs_never_replace_a_fifo_or_a_device(tmp_path):
    from apretrieval.atomic import atomic_write_text

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    null = tmp_path / "null"
    null.symlink_to("/dev/null")  # replacing the link itself would be harmless; refused too
    for target, kind in ((fifo, r"a FIFO \(named pipe\)"), (null, "a character device")):
        with pytest.raises(ValueError, match=f"it is {kind}, not a regular file"):
            atomic_write_text(target, "x")
    assert fifo.is_fifo() and null.is_symlink() and Path("/dev/null").is_char_device()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_commands_refuse_an_output_of_another_kind_before_any_work(
    tmp_path, stand_in, monkeypatch, capsys
):
    import apretrieval.models as models

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    loaded = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(1))
    rc = main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--out", str(fifo)])
    assert rc == 2 and "it is a FIFO" in capsys.readouterr().err and loaded == []
    np.save(tmp_path / "f.npy", np.eye(4, dtype=np.float32))
    rc = main(["index", "build", "--features", str(tmp_path / "f.npy"), "--out", str(fifo)])
    assert rc == 2 and "it is a FIFO (named pipe), not a folder" in capsys.readouterr().err
    from test_extraction import fake_benchmark

    fake_benchmark(tmp_path / "bench", np.random.default_rng(0))
    stand_in.calls = 0
    args = ["--checkpoint", str(tmp_path / "m.pt"), "--dataset", "roxford5k"]
    rc = main(["evaluate", *args, "--root", str(tmp_path / "bench"), "--out", str(fifo)])
    assert rc == 2 and "it is a FIFO" in capsys.readouterr().err and stand_in.calls == 0
    assert fifo.is_fifo()
    # extraction's descriptor file: refused before any image is extracted
    npy = tmp_path / "x.npy"
    os.mkfifo(npy)
    _images(tmp_path / "imgs", 2)
    stand_in.calls = 0
    assert _extract_cli(tmp_path / "m.pt", tmp_path / "imgs", tmp_path / "x") == 2
    assert "it is a FIFO" in capsys.readouterr().err and npy.is_fifo() and stand_in.calls == 0


# ------------------------------------------------------------------ one writer per results file


@pytest.mark.parametrize("several", [False, True], ids=["one-benchmark", "two-benchmarks"])
def test_evaluate_refuses_a_results_output_another_run_writes(tmp_path, stand_in, capsys, several):
    from test_extraction import fake_benchmark

    for name in ("roxford5k", "rparis6k"):
        fake_benchmark(tmp_path / name, np.random.default_rng(0))
        if name != "roxford5k":
            (tmp_path / name / "gnd_roxford5k.pkl").rename(tmp_path / name / f"gnd_{name}.pkl")
    gnds = [str(tmp_path / n / f"gnd_{n}.pkl") for n in ("roxford5k", "rparis6k")]
    out = tmp_path / ("res" if several else "res.json")
    holder = os.getppid()  # a live process: the other run
    lock = out.with_name(out.name + ".lock")
    lock.write_text(f"{holder}\n{socket.gethostname()}\n")
    stand_in.calls = 0
    argv = ["evaluate", "--checkpoint", "m.pt", "--datasets", ",".join(gnds[: 1 + several])]
    assert main([*argv, "--out", str(out), "--workers", "0", "--no-progress"]) == 1
    err = without_thread_line(capsys.readouterr().err)
    assert f"being written by process {holder}" in err and err.count("\n") == 1
    assert stand_in.calls == 0 and not (out / "roxford5k.json" if several else out).exists()
    lock.unlink()  # the other run ended: this one runs, and leaves no lock behind
    assert main([*argv, "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")] == []


# ------------------------------------------------------------------ what a kill -9 leaves


def test_an_extraction_killed_while_it_replaced_its_settings_resumes(tmp_path, stand_in):
    from apretrieval.descriptors import load_features

    _images(tmp_path / "imgs", 3)
    parts = tmp_path / "x.parts"
    parts.mkdir()
    # kill -9 inside atomic_open(settings.json): the temporary exists, settings.json does not
    (parts / ".settings.json.k2j4h1.tmp").write_text('{"scales": [1.0], "max_')
    assert _extract_cli(tmp_path / "m.pt", tmp_path / "imgs", tmp_path / "x") == 0
    assert load_features(tmp_path / "x.npy").ids == ["im00.png", "im01.png", "im02.png"]
    assert not parts.exists()


def test_owners_sweep_the_temporaries_a_killed_writer_left(tmp_path, stand_in):
    from test_extraction import fake_benchmark

    def leftovers(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))

    _images(tmp_path / "imgs", 2)
    stale = [".x.json.d4e5f6.tmp", ".x.npy.a1b2c3.tmp"]
    for name in stale:
        (tmp_path / name).write_bytes(b"\0" * 100_000)  # a killed write of the descriptors
    assert leftovers(tmp_path) == stale
    assert _extract_cli(tmp_path / "m.pt", tmp_path / "imgs", tmp_path / "x") == 0
    assert leftovers(tmp_path) == []
    if importlib.util.find_spec("faiss") is not None:
        ix = tmp_path / "ix"
        ix.mkdir()
        for name in (".index.faiss.j1k2l3.tmp", ".manifest.json.m4n5o6.tmp"):
            (ix / name).write_bytes(b"\0" * 1000)
        args = ["--features", str(tmp_path / "x.npy"), "--out", str(ix)]
        assert main(["index", "build", *args, "--checkpoint", str(tmp_path / "m.pt")]) == 0
        assert leftovers(ix) == []
    fake_benchmark(tmp_path / "bench", np.random.default_rng(0))
    (tmp_path / ".res.json.p7q8r9.tmp").write_text('{"dataset": "roxf')
    argv = ["evaluate", "--checkpoint", "m.pt", "--dataset", "roxford5k", "--workers", "0"]
    argv += ["--root", str(tmp_path / "bench"), "--out", str(tmp_path / "res.json")]
    assert main([*argv, "--no-progress"]) == 0
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------ a full disk, said as such


def _full_disk_line(mnt: Path, name: str) -> str:
    return f"no space left on {mnt} writing {mnt / name}; free some disk space"


def test_a_full_disk_is_named_whoever_writes(small_disk, capsys):
    import torch

    from apretrieval.atomic import atomic_open, atomic_write_bytes
    from apretrieval.checkpoints import atomic_torch_save
    from apretrieval.cli.errors import describe
    from apretrieval.jsonl import append_jsonl

    def numpy_save():
        with atomic_open(small_disk / "x.npy", "wb") as f:
            np.save(f, np.zeros(500_000, np.float32))

    writers = {
        "c.pt": lambda: atomic_torch_save({"w": torch.zeros(500_000)}, small_disk / "c.pt"),
        "x.npy": numpy_save,  # numpy: "2000000 requested and 1015808 written"
        "b.bin": lambda: atomic_write_bytes(small_disk / "b.bin", b"x" * 2_000_000),
        "log.jsonl": lambda: append_jsonl(small_disk / "log.jsonl", {"x": "y" * 2_000_000}),
    }
    for name, write in writers.items():
        with pytest.raises(OSError) as info:
            write()
        message, status = describe(info.value)
        assert message.startswith(_full_disk_line(small_disk, name)) and status == 1, message
        if name != "log.jsonl":  # an append leaves what it wrote; an atomic write nothing
            assert list(small_disk.iterdir()) == [], list(small_disk.iterdir())
        (small_disk / name).unlink(missing_ok=True)


def test_a_full_disk_is_one_line_through_a_command(small_disk, tmp_path, capsys):
    import torch

    from apretrieval.models import build_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("resnet18", pretrained=None, out_dim=8))
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(small_disk / "m.ts")]) == 1
    err = without_thread_line(capsys.readouterr().err).strip()
    line = _full_disk_line(small_disk, "m.ts")
    assert err == f"apretrieval export: error: {line} or choose another location", err


def test_a_short_write_is_called_a_full_disk_only_when_the_disk_is_full(tmp_path, monkeypatch):
    from apretrieval import atomic

    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert atomic.full_disk_error(torn, tmp_path / "c.pt") is None  # room left: not a full disk
    monkeypatch.setattr(atomic, "_no_room", lambda path: True)
    full = atomic.full_disk_error(torn, tmp_path / "c.pt")
    assert full is not None and full.errno == 28 and full.filename == str(tmp_path / "c.pt")
    other = RuntimeError("something else went wrong")
    assert atomic.full_disk_error(other, tmp_path / "c.pt") is None


# ------------------------------------------------------------------ the per-image reuse


def test_an_image_replaced_with_the_same_size_and_mtime_is_extracted_again(tmp_path, stand_in):
    import time

    from apretrieval.descriptors import load_features

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # uncompressed: every image of these dimensions has the same size
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(folder / f"{i}.ppm")
    assert _extract_cli(tmp_path / "m.pt", folder, tmp_path / "x") == 0
    before = load_features(tmp_path / "x.npy").descriptors
    target = folder / "1.ppm"
    st = os.stat(target)
    time.sleep(0.05)  # a write in a later clock tick than the first one
    with open(target, "r+b") as f:  # in place (same inode), same size, mtime set back
        img = Image.fromarray(np.full((32, 40, 3), 200, dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PPM")
        assert len(buf.getvalue()) == st.st_size
        f.write(buf.getvalue())
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(target).st_size, os.stat(target).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert _extract_cli(tmp_path / "m.pt", folder, tmp_path / "x") == 0
    after = load_features(tmp_path / "x.npy").descriptors
    want = extract_descriptors(stand_in, sorted(folder.iterdir()), num_workers=0, progress=False)
    np.testing.assert_allclose(after, want, atol=1e-6)  # image 1 is the new one
    assert np.abs(after[1] - before[1]).max() > 1e-3
