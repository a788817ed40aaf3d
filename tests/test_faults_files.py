"""Output files under faults: one writer per output, file pairs replaced as a unit, the
descriptor cache keyed on checkpoint content, non-finite descriptors refused, bad images
skipped, resumed extraction keeping unchanged work, full disks and unwritable outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apretrieval.cli import main
from apretrieval.descriptors import features_paths, load_features
from apretrieval.extraction.loop import extract_descriptors
from apretrieval.extraction.resumable import extract_to_file
from apretrieval.faiss_index import IndexConfig, SearchIndex, load_index
from conftest import without_thread_line
from test_extraction import TinyNet, make_images

TESTS = Path(__file__).parent


def _images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"im{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def stand_in(monkeypatch):
    """The checkpoint loader returns TinyNet (whose weights the test may change)."""
    import apretrieval.pipeline as pipeline

    model = TinyNet()
    monkeypatch.setattr(pipeline, "load_checkpoint_model", lambda path, device=None: model)
    return model


def _extract_cli(ckpt, folder, out, *extra) -> int:
    args = ["extract", "--checkpoint", str(ckpt), "--images", str(folder), "--out", str(out)]
    return main([*args, "--workers", "0", "--no-progress", *extra])


# ------------------------------------------------------------------ one writer per output


def test_second_writer_of_a_descriptor_prefix_is_refused(tmp_path, stand_in, capsys):
    folder = tmp_path / "imgs"
    _images(folder, 3)
    out = tmp_path / "f" / "x"
    out.parent.mkdir()
    # Another live process (our parent) holds the prefix.
    (tmp_path / "f" / "x.lock").write_text(f"{os.getppid()}\n{os.uname().nodename}\n")
    stand_in.calls = 0
    rc = _extract_cli(tmp_path / "m.pt", folder, out)
    err = without_thread_line(capsys.readouterr().err)
    assert rc == 1 and err.count("\n") == 1
    assert f"being written by process {os.getppid()}" in err
    assert stand_in.calls == 0 and not features_paths(out)[0].exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    imgs = make_images(np.random.default_rng(0), [(32, 32)] * 3)
    lock = tmp_path / "x.lock"
    lock.write_text(f"{_dead_pid()}\n{os.uname().nodename}\n")
    path = extract_to_file(
        TinyNet(), imgs, list("abc"), tmp_path / "x", num_workers=0, progress=False
    )
    assert load_features(path).ids == list("abc") and not lock.exists()


def test_locks_exclude_each_other_across_processes(tmp_path):
    """While one process holds an output, another process is refused it."""
    script = (
        "import sys, time, pathlib\n"
        "from apretrieval.locking import output_lock, OutputLockedError\n"
        "try:\n"
        "    with output_lock(sys.argv[1]):\n"
        "        print('held', flush=True)\n"
        "        release = pathlib.Path(sys.argv[2])\n"
        "        for _ in range(1200):\n"
        "            if release.exists(): break\n"
        "            time.sleep(0.1)\n"
        "except OutputLockedError as e:\n"
        "    print('refused', e, flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent / "src")}
    args = [sys.executable, "-c", script, str(tmp_path / "out"), str(tmp_path / "release")]
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert second.stdout.startswith("refused") and f"process {first.pid}" in second.stdout
    finally:
        (tmp_path / "release").touch()
        first.wait(timeout=300)
    assert first.returncode == 0 and not (tmp_path / "out.lock").exists()


def test_second_index_builder_is_refused(tmp_path, capsys):
    np.save(tmp_path / "f.npy", np.eye(4, dtype=np.float32))
    (tmp_path / "ix.lock").write_text(f"{os.getppid()}\n{os.uname().nodename}\n")
    rc = main(
        [
            "index",
            "build",
            "--features",
            str(tmp_path / "f.npy"),
            "--out",
            str(tmp_path / "ix"),
            "--no-progress",
        ]
    )
    err = without_thread_line(capsys.readouterr().err)
    assert rc == 1 and err.count("\n") == 1 and "being written by process" in err
    assert not (tmp_path / "ix" / "index.faiss").exists()


# ------------------------------------------------------------------ file pairs as one unit


def test_descriptor_array_replaced_without_its_manifest_is_refused(tmp_path, capsys):
    imgs = make_images(np.random.default_rng(1), [(32, 32)] * 4)
    path = extract_to_file(
        TinyNet(), imgs, list("abcd"), tmp_path / "x", num_workers=0, progress=False
    )
    # Another extraction's array (same shape) lands, its manifest never does.
    np.save(tmp_path / "other.npy", -np.load(path))
    os.replace(tmp_path / "other.npy", path)
    with pytest.raises(ValueError, match="does not describe"):
        load_features(path)
    rc = main(["index", "build", "--features", str(path), "--out", str(tmp_path / "ix")])
    assert rc == 2 and "does not describe" in capsys.readouterr().err


def test_index_replaced_without_its_manifest_is_refused(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((50, 8)).astype(np.float32)
    ids = [f"i{k}" for k in range(50)]
    from apretrieval.descriptors import FeatureSet

    SearchIndex.from_features(FeatureSet(a, ids)).save(tmp_path / "ix")
    SearchIndex.from_features(FeatureSet(a[::-1].copy(), ids)).save(tmp_path / "new")
    os.replace(tmp_path / "new" / "index.faiss", tmp_path / "ix" / "index.faiss")
    with pytest.raises(ValueError, match="does not describe"):
        load_index(tmp_path / "ix")


def test_rerank_refuses_features_changed_since_the_build(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    np.save(tmp_path / "f.npy", x)
    cfg = IndexConfig(type="ivfpq", nlist=2, m=2, nbits=4)
    SearchIndex.from_features(load_features(tmp_path / "f.npy"), cfg).save(tmp_path / "ix")
    np.save(tmp_path / "f.npy", x[::-1].copy())
    with pytest.raises(ValueError, match="changed since the index was built"):
        load_index(tmp_path / "ix").search(x[:2], 3, rerank=10)


# ------------------------------------------------------------------ cache keyed on content


def test_descriptor_cache_follows_checkpoint_content_not_path(tmp_path, stand_in):
    folder = tmp_path / "imgs"
    paths = _images(folder, 3)
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights A")
    out = tmp_path / "feats"
    assert _extract_cli(ckpt, folder, out) == 0
    first = np.load(features_paths(out)[0])
    # The same path now holds other weights: the cache must not answer.
    with torch.no_grad():
        stand_in.whiten.weight.mul_(-1.0)
    ckpt.write_bytes(b"weights B")
    assert _extract_cli(ckpt, folder, out) == 0
    second = np.load(features_paths(out)[0])
    want = extract_descriptors(stand_in, paths, num_workers=0, progress=False)
    np.testing.assert_allclose(second, want, atol=1e-6)
    assert np.abs(second - first).max() > 0.1
    # Same content, new mtime (a copy, a touch): reused without a forward pass.
    os.utime(ckpt, ns=(1, 1))
    stand_in.calls = 0
    assert _extract_cli(ckpt, folder, out) == 0
    assert stand_in.calls == 0


# ------------------------------------------------------------------ non-finite descriptors


def test_nan_descriptors_are_refused_at_write_and_index_build(tmp_path, capsys):
    model = TinyNet()
    with torch.no_grad():
        model.whiten.weight.fill_(float("nan"))
    imgs = make_images(np.random.default_rng(4), [(32, 32)] * 3)
    with pytest.raises(ValueError, match="not finite"):
        extract_to_file(model, imgs, list("abc"), tmp_path / "x", num_workers=0, progress=False)
    assert not features_paths(tmp_path / "x")[0].exists()
    x = np.eye(4, dtype=np.float32)
    x[2, 1] = np.nan
    np.save(tmp_path / "n.npy", x)
    rc = main(
        ["index", "build", "--features", str(tmp_path / "n.npy"), "--out", str(tmp_path / "ix")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "not finite" in err and "row 2" in err
    assert not (tmp_path / "ix" / "index.faiss").exists()


# ------------------------------------------------------------------ bad images, resuming


def test_skip_bad_lists_and_counts_unreadable_images(tmp_path, stand_in):
    folder = tmp_path / "imgs"
    paths = _images(folder, 4)
    (folder / "im02.png").write_bytes(b"not a png")
    out = tmp_path / "feats"
    assert _extract_cli(tmp_path / "m.pt", folder, out, "--skip-bad", "--shard-size", "2") == 0
    m = json.loads(features_paths(out)[1].read_text())
    assert m["ids"] == ["im00.png", "im01.png", "im03.png"] and m["num_skipped"] == 1
    assert m["skipped"][0]["id"] == "im02.png" and m["skipped"][0]["error"]
    good = [p for p in paths if p.name != "im02.png"]
    want = extract_descriptors(stand_in, good, num_workers=0, progress=False)
    np.testing.assert_allclose(np.load(features_paths(out)[0]), want, atol=1e-6)


def test_resume_after_removing_a_bad_image_keeps_finished_shards(tmp_path, stand_in, capsys):
    folder = tmp_path / "imgs"
    paths = _images(folder, 7)
    (folder / "im05.png").write_bytes(b"broken")
    out = tmp_path / "feats"
    args = ("--shard-size", "2", "--scales", "1")
    assert _extract_cli(tmp_path / "m.pt", folder, out, *args) == 2
    assert "cannot read image" in capsys.readouterr().err
    (folder / "im05.png").unlink()
    # Shards {0,1}, {2,3} are finished; only 4 and 6 remain (the ids after 5 shifted).
    stand_in.calls = 0
    assert _extract_cli(tmp_path / "m.pt", folder, out, *args) == 0
    assert stand_in.calls == 2
    kept = [p for p in paths if p.name != "im05.png"]
    want = extract_descriptors(stand_in, kept, scales=(1.0,), num_workers=0, progress=False)
    np.testing.assert_allclose(np.load(features_paths(out)[0]), want, atol=1e-6)


def test_resume_reextracts_an_image_whose_file_changed(tmp_path):
    paths = _images(tmp_path / "imgs", 4)
    ids = [p.name for p in paths]
    model = TinyNet()
    out = tmp_path / "x"

    class Once(list):
        """Paths; the item at ``fail_at`` interrupts once."""

        fail_at = 3

        def __getitem__(self, i):
            if i == self.fail_at:
                self.fail_at = None
                raise KeyboardInterrupt
            return super().__getitem__(i)

    with pytest.raises(KeyboardInterrupt):
        extract_to_file(
            model, Once(paths), ids, out, shard_size=1, num_workers=0, scales=(1.0,), progress=False
        )
    Image.new("RGB", (40, 32), (255, 0, 0)).save(paths[1])  # changed while interrupted
    model.calls = 0
    path = extract_to_file(
        model, list(paths), ids, out, shard_size=1, num_workers=0, scales=(1.0,), progress=False
    )
    assert model.calls == 2  # image 1 (changed) and image 3 (never done)
    want = extract_descriptors(model, paths, scales=(1.0,), num_workers=0, progress=False)
    np.testing.assert_allclose(np.load(path), want, atol=1e-6)


# ------------------------------------------------------------------ full disk, unwritable


_FULL_DISK = """
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np
from apretrieval.extraction.resumable import extract_to_file
from test_extraction import TinyNet, make_images

imgs = make_images(np.random.default_rng(0), [(32, 32)] * 40)
try:
    extract_to_file(TinyNet(dim=4096), imgs, [str(i) for i in range(40)], sys.argv[1],
                    shard_size=40, num_workers=0, scales=(1.0,), progress=False)
except OSError as err:
    print(f"OSError errno={err.errno} {err}")
    sys.exit(1)
"""


def test_full_disk_at_final_assembly_is_one_clear_error(small_disk):
    # Room for the shard (40 x 4096 float32 = 640 KiB) but not for the final file as well.
    mnt = small_disk
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(mnt / "x"), str(TESTS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # not SIGBUS (-7)
    assert "errno=28" in proc.stdout and "x.npy" in proc.stdout
    assert not (mnt / "x.npy").exists()
    assert [p.name for p in mnt.iterdir() if p.name.startswith(".x.npy")] == []
    assert (mnt / "x.parts").is_dir()  # the finished work stays for a rerun


def test_unwritable_outputs_fail_before_any_work(tmp_path, monkeypatch, capsys):
    import apretrieval.faiss_index as faiss_index
    import apretrieval.pipeline as pipeline

    loaded, built = [], []
    monkeypatch.setattr(pipeline, "load_checkpoint_model", lambda *a, **k: loaded.append(1))
    real_build = faiss_index.build_index
    monkeypatch.setattr(
        faiss_index, "build_index", lambda *a, **k: built.append(1) or real_build(*a, **k)
    )
    (tmp_path / "file").write_text("a file, not a folder")
    _images(tmp_path / "imgs", 2)
    rc = _extract_cli(tmp_path / "m.pt", tmp_path / "imgs", tmp_path / "file" / "sub" / "x")
    assert rc == 1 and "file" in capsys.readouterr().err and loaded == []
    np.save(tmp_path / "f.npy", np.eye(4, dtype=np.float32))
    rc = main(
        [
            "index",
            "build",
            "--features",
            str(tmp_path / "f.npy"),
            "--out",
            str(tmp_path / "file" / "ix"),
        ]
    )
    assert rc == 1 and "file" in capsys.readouterr().err and built == []
