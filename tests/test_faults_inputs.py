"""Inputs under faults: checkpoints holding NaN or the wrong structure, ground truth checked
whole before any work, non-finite whitening, huge k, image bombs, odd file names."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apretrieval.checkpoints import NonFiniteWeights
from apretrieval.cli import main
from apretrieval.models import build_model, load_checkpoint, load_model, save_checkpoint
from conftest import without_thread_line
from test_convert import fake_sklearn
from test_faults_files import stand_in
from test_training import folder

# Fixtures of other test modules: a small training folder, a TinyNet checkpoint loader, a
# pickleable stand-in for scikit-learn's PCA class.
__all__ = ["fake_sklearn", "folder", "stand_in"]


def _one_error(capsys, command: str) -> str:
    err = without_thread_line(capsys.readouterr().err).strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"apretrieval {command}: error: "), err
    return err[0]


def _image(path: Path, seed: int = 0, size=(40, 32)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small finite checkpoint (random ResNet-18, 8 dimensions)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    return save_checkpoint(path, build_model("resnet18", pretrained=None, out_dim=8), step=1)


# ------------------------------------------------------------------ NaN weights


@pytest.fixture(scope="module")
def nan_checkpoint(checkpoint, tmp_path_factory) -> Path:
    """``checkpoint`` with one NaN weight (written by torch.save: save_checkpoint refuses it)."""
    ckpt = load_checkpoint(checkpoint)
    ckpt["state_dict"]["whiten.weight"][0, 0] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "nan.pt"
    torch.save(ckpt, path)
    return path


def test_nan_weights_are_refused_wherever_a_checkpoint_is_loaded(nan_checkpoint, tmp_path):
    with pytest.raises(NonFiniteWeights, match=r"refusing to load .*nan\.pt.*whiten\.weight"):
        load_model(nan_checkpoint)
    with pytest.raises(NonFiniteWeights, match="NaN/inf"):
        build_model("resnet18", pretrained=None, out_dim=8, weights=nan_checkpoint)


def test_export_and_search_refuse_nan_weights(nan_checkpoint, checkpoint, tmp_path, capsys):
    out = tmp_path / "model.ts"
    assert main(["export", "--checkpoint", str(nan_checkpoint), "--out", str(out)]) == 1
    assert "NaN/inf" in _one_error(capsys, "export") and not out.exists()
    pytest.importorskip("faiss")
    q = _image(tmp_path / "q.png")
    np.save(tmp_path / "f.npy", np.eye(8, dtype=np.float32))
    args = ["--features", str(tmp_path / "f.npy"), "--checkpoint", str(checkpoint)]
    assert main(["index", "build", *args, "--out", str(tmp_path / "ix")]) == 0
    capsys.readouterr()
    argv = ["search", "--index", str(tmp_path / "ix"), "--query", str(q)]
    assert main([*argv, "--checkpoint", str(nan_checkpoint)]) == 1
    assert "NaN/inf" in _one_error(capsys, "search")
    assert main(argv) == 0  # the finite checkpoint recorded in the index: 8 results
    assert capsys.readouterr().out.count("\n") == 9


# ------------------------------------------------------------------ ground truth checked whole

SAMPLES = Path(__file__).parent / "data" / "revisited"


def _benchmark(root: Path, name: str = "roxford5k", **change) -> Path:
    """A 6-image benchmark in the Revisited layout; ``change``: replace entry 1's values."""
    from test_extraction import fake_benchmark

    fake_benchmark(root, np.random.default_rng(3), n_db=6)
    gnd_file = root / "gnd_roxford5k.pkl"
    data = pickle.loads(gnd_file.read_bytes())
    data["gnd"][1].update(change)
    gnd_file.unlink()
    (root / f"gnd_{name}.pkl").write_bytes(pickle.dumps(data, protocol=3))
    return root


BAD_GROUND_TRUTH = {
    "index-out-of-range": ({"junk": [6]}, r"gnd\[1\]\['junk'\] has index 6 outside"),
    "negative-index": ({"hard": [-1]}, r"index -1 outside"),
    "float-index": ({"easy": [2.5]}, r"gnd\[1\]\['easy'\] must hold integer indices, got 2.5"),
    "nan-bbx": ({"bbx": [0, float("nan"), 4, 4]}, r"gnd\[1\]\['bbx'\] must be 4 finite"),
    "three-value-bbx": ({"bbx": [0, 0, 4]}, r"must be 4 finite numbers"),
    "empty-bbx": ({"bbx": [5, 0, 5, 4]}, r"is empty"),
    "overlapping-lists": ({"easy": [4], "junk": [4]}, r"must be disjoint"),
    "duplicate-index": ({"hard": [0, 0]}, r"more than once"),
}


@pytest.mark.parametrize("case", list(BAD_GROUND_TRUTH))
def test_a_bad_ground_truth_file_is_refused_when_read(tmp_path, case):
    from apretrieval.data.revisited import RevisitedDataset

    change, message = BAD_GROUND_TRUTH[case]
    root = _benchmark(tmp_path / "b", **change)
    with pytest.raises(ValueError, match=r"gnd_roxford5k\.pkl: .*" + message):
        RevisitedDataset("roxford5k", root)


def test_real_ground_truth_and_integral_float_indices_are_accepted(tmp_path):
    from apretrieval.data.revisited import RevisitedDataset

    for name in ("roxford5k", "rparis6k", "oxford5k"):
        (tmp_path / f"gnd_{name}.pkl").write_bytes((SAMPLES / f"{name}_sample.pkl").read_bytes())
        assert RevisitedDataset(name, tmp_path).num_queries > 0
    ds = RevisitedDataset("roxford5k", _benchmark(tmp_path / "b", easy=np.array([4.0])))
    assert ds.gnd[1]["easy"] == [4]


def test_evaluate_checks_every_benchmark_before_extracting_any(tmp_path, monkeypatch, capsys):
    import apretrieval.pipeline as pipeline

    loaded = []
    monkeypatch.setattr(pipeline, "load_checkpoint_model", lambda *a, **k: loaded.append(1))
    _benchmark(tmp_path / "good")
    _benchmark(tmp_path / "bad", name="rparis6k", easy=[1.5])
    good, bad = tmp_path / "good" / "gnd_roxford5k.pkl", tmp_path / "bad" / "gnd_rparis6k.pkl"
    benchmarks = f"{good},{bad}"
    argv = ["evaluate", "--checkpoint", "m.pt", "--datasets", benchmarks]
    assert main([*argv, "--out", str(tmp_path / "res")]) == 2
    assert "gnd_rparis6k.pkl: gnd[1]['easy']" in _one_error(capsys, "evaluate")
    assert loaded == []  # not even the first benchmark was extracted


def test_training_checks_its_validation_benchmark_before_the_first_step(folder, tmp_path):
    from apretrieval.training import train
    from test_training import tiny_config

    _benchmark(tmp_path / "bad", bbx=[1, 2, 3])
    cfg = tiny_config(
        folder,
        tmp_path / "run",
        val_dataset="roxford5k",
        val_root=str(tmp_path / "bad"),
        val_every=1,
    )
    with pytest.raises(ValueError, match=r"gnd\[1\]\['bbx'\] must be 4 finite"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ------------------------------------------------------------------ hostile images


def _bomb(path: Path, side: int = 50000) -> Path:
    """A PNG of a few dozen bytes whose header declares ``side`` x ``side`` pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
    path.write_bytes(png + chunk(b"IEND", b""))
    return path


def test_skip_bad_skips_a_decompression_bomb(tmp_path, stand_in, capsys):
    from apretrieval.descriptors import load_features
    from test_faults_files import _extract_cli

    _image(tmp_path / "imgs" / "a.png")
    assert _bomb(tmp_path / "imgs" / "bomb.png").stat().st_size < 100
    assert _extract_cli(tmp_path / "m.pt", tmp_path / "imgs", tmp_path / "x", "--skip-bad") == 0
    features = load_features(tmp_path / "x.npy")
    assert features.ids == ["a.png"]
    assert [s["id"] for s in features.extra["skipped"]] == ["bomb.png"]
    assert "decompression bomb" in features.extra["skipped"][0]["error"]
    capsys.readouterr()
    # Without --skip-bad: one line naming the file.
    assert _extract_cli(tmp_path / "m.pt", tmp_path / "imgs", tmp_path / "y") == 2
    line = _one_error(capsys, "extract")
    assert "cannot read image" in line and "bomb.png" in line


def test_a_file_name_that_is_not_utf8_is_extracted_and_printed(tmp_path, stand_in, checkpoint):
    import os
    import subprocess
    import sys

    from apretrieval.descriptors import load_features
    from test_faults_files import _extract_cli

    imgs = tmp_path / "imgs"
    _image(imgs / "ok.png")
    latin1 = imgs / os.fsdecode(b"caf\xe9.png")  # a Latin-1 name: byte 0xE9 alone
    _image(latin1, seed=1)
    for out, extra in (("x", ()), ("y", ("--skip-bad",))):
        assert _extract_cli(tmp_path / "m.pt", imgs, tmp_path / out, *extra) == 0
        assert load_features(tmp_path / f"{out}.npy").ids == ["caf\\xe9.png", "ok.png"]
    # Printed where stdout cannot encode the name as it is (a strict UTF-8 locale).
    pytest.importorskip("faiss")
    np.save(tmp_path / "f.npy", np.eye(8, dtype=np.float32))  # the checkpoint's 8 dimensions
    argv = ["index", "build", "--features", str(tmp_path / "f.npy")]
    assert main([*argv, "--out", str(tmp_path / "ix")]) == 0
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "PYTHONIOENCODING": "utf-8:strict"}
    code = "import sys; from apretrieval.cli import main; sys.exit(main())"
    argv = ["search", "--index", str(tmp_path / "ix"), "--query", str(latin1)]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv, "--checkpoint", str(checkpoint), "--k", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "caf\\udce9.png" in proc.stdout.splitlines()[0]


# ------------------------------------------------------------------ non-finite whitening


@pytest.mark.parametrize(
    ("attr", "value", "message"),
    [
        ("explained_variance_", 0.0, r"explained_variance_ holds \d+ values that are not > 0"),
        ("mean_", float("nan"), r"the whitening's mean holds \d+ NaN/inf values"),
    ],
    ids=["zero-variance", "nan-mean"],
)
def test_convert_refuses_a_whitening_that_is_not_finite(
    tmp_path, fake_sklearn, capsys, attr, value, message
):
    from test_convert import make_dirtorch

    src = tmp_path / "dir.pth"
    ckpt = make_dirtorch(src, fake_sklearn)
    pca = ckpt["pca"]["Landmarks_clean"]
    values = getattr(pca, attr)
    values[0] = value
    torch.save(ckpt, src)
    out = tmp_path / "conv" / "model.pt"
    assert main(["convert", "--from", "dirtorch", str(src), "--out", str(out)]) == 2
    line = _one_error(capsys, "convert")
    assert "pca['Landmarks_clean']" in line and re.search(message, line), line
    assert not (tmp_path / "conv").exists() or list((tmp_path / "conv").iterdir()) == []


def test_evaluate_refuses_a_non_finite_whitening_before_extracting(tmp_path, stand_in, capsys):
    from test_extraction import fake_benchmark

    fake_benchmark(tmp_path / "bench", np.random.default_rng(0))
    projection = np.eye(6, dtype=np.float32)
    projection[2, 2] = np.inf
    w = tmp_path / "w.npz"
    np.savez(w, mean=np.zeros(6, np.float32), projection=projection, power=np.float64(0.5))
    stand_in.calls = 0
    argv = ["evaluate", "--checkpoint", "m.pt", "--dataset", "roxford5k", "--workers", "0"]
    argv += ["--root", str(tmp_path / "bench"), "--whiten", str(w), "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "projection holds 1 NaN/inf values" in _one_error(capsys, "evaluate")
    assert stand_in.calls == 0


# ------------------------------------------------------------------ a device the machine lacks


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_device_without_cuda_is_named_as_such(checkpoint, tmp_path, capsys):
    from apretrieval.checkpoints import CheckpointError

    _image(tmp_path / "imgs" / "a.png")
    argv = ["extract", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "imgs")]
    assert main([*argv, "--out", str(tmp_path / "x"), "--device", "cuda", "--workers", "0"]) == 1
    line = _one_error(capsys, "extract")
    assert "CUDA is not available" in line and "corrupt" not in line
    with pytest.raises(RuntimeError, match="CUDA") as info:
        load_model(checkpoint, map_location="cuda")  # the library: not called a damaged file
    assert not isinstance(info.value, CheckpointError)


# ------------------------------------------------------------------ checkpoints of odd structure

ODD_RELEASES = {
    "empty-file": ("dirtorch", None, r"cannot load .* safely: the file is empty"),
    "options-not-a-dict": (
        "dirtorch",
        {"model_options": 5, "state_dict": {}},
        r"'model_options' must be a dict, got int",
    ),
    "weights-a-list": (
        "dirtorch",
        {"model_options": {"arch": "resnet18_rmac"}, "state_dict": [1, 2]},
        r"'state_dict' must be a dict of tensors, got list",
    ),
    "meta-not-a-dict": ("cirtorch", {"meta": 5, "state_dict": {}}, r"'meta' must be a dict"),
    "cirtorch-weights-a-list": (
        "cirtorch",
        {"meta": {"architecture": "resnet18"}, "state_dict": [1]},
        r"'state_dict' must be a dict of tensors",
    ),
}


@pytest.mark.parametrize("case", list(ODD_RELEASES))
def test_convert_names_what_is_wrong_with_a_released_file(tmp_path, capsys, case):
    source, content, message = ODD_RELEASES[case]
    path = tmp_path / "release.pth"
    if content is None:
        path.write_bytes(b"")
    else:
        torch.save(content, path)
    assert main(["convert", "--from", source, str(path), "--out", str(tmp_path / "o.pt")]) == 2
    line = _one_error(capsys, "convert")
    assert re.search(message, line) and "Error:" not in line, line


ODD_CHECKPOINTS = {
    "config-not-a-dict": ({"config": 5, "state_dict": {}}, r"model config must be a dict"),
    "no-config": ({"state_dict": {}}, r"the checkpoint lacks 'config'"),
    "weights-a-list": ({"config": {"name": "resnet18"}, "state_dict": [1]}, r"are a list"),
    "odd-config-value": (
        {"config": {"name": "resnet18", "out_dim": "x"}, "state_dict": {}},
        r"model config 'out_dim': unexpected value 'x'",
    ),
    "odd-mean": (
        {"config": {"name": "resnet18", "mean": [0.5, None, 1]}, "state_dict": {}},
        r"model config 'mean'",
    ),
}


@pytest.mark.parametrize("case", list(ODD_CHECKPOINTS))
def test_a_checkpoint_of_odd_structure_is_one_clear_error(tmp_path, capsys, case):
    content, message = ODD_CHECKPOINTS[case]
    path = tmp_path / "odd.pt"
    torch.save({"format": "apretrieval-model", **content}, path)
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "m.ts")]) == 1
    line = _one_error(capsys, "export")
    assert re.search(message, line) and "Error:" not in line, line


# ------------------------------------------------------------------ k beyond the index


def test_search_clamps_k_to_the_index_size(checkpoint, tmp_path, capsys):
    pytest.importorskip("faiss")
    from apretrieval.faiss_index import load_index

    np.save(tmp_path / "f.npy", np.eye(8, dtype=np.float32))
    argv = ["index", "build", "--features", str(tmp_path / "f.npy"), "--out", str(tmp_path / "ix")]
    assert main([*argv, "--checkpoint", str(checkpoint)]) == 0
    index = load_index(tmp_path / "ix")
    scores, indices = index.search(np.eye(8, dtype=np.float32)[:2], 10**11)
    assert scores.shape == indices.shape == (2, 8)  # not (2, 10**11): 1.2 TB
    assert index.search(np.eye(8, dtype=np.float32)[:1], 10**11, rerank=10**11)[1].shape == (1, 8)
    capsys.readouterr()
    q = _image(tmp_path / "q.png")
    argv = ["search", "--index", str(tmp_path / "ix"), "--query", str(q), "--k", str(10**11)]
    assert main(argv) == 0
    assert capsys.readouterr().out.count("\n") == 9  # the query line and all 8 items


# ------------------------------------------------------------------ a whitening of too few


def test_a_whitening_learned_from_too_few_descriptors_is_warned_about(
    tmp_path, stand_in, caplog, capsys
):
    from test_extraction import fake_benchmark

    fake_benchmark(tmp_path / "bench", np.random.default_rng(0))
    rng = np.random.default_rng(1)
    few = rng.standard_normal((3, 6)).astype(np.float32)  # TinyNet's 6 dimensions
    np.save(tmp_path / "few.npy", few / np.linalg.norm(few, axis=1, keepdims=True))
    argv = ["evaluate", "--checkpoint", "m.pt", "--dataset", "roxford5k", "--workers", "0"]
    argv += ["--root", str(tmp_path / "bench"), "--no-progress"]
    with caplog.at_level("WARNING", logger="apretrieval.postprocess"):
        assert (
            main([*argv, "--whiten", str(tmp_path / "few.npy"), "--out", str(tmp_path / "a")]) == 0
        )
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "learned from 3 descriptors of 6 dimensions: they span only 2" in text
    assert "fits --whiten-dim (dim) up to 2" in text and "needs more than 6" in text
    caplog.clear()
    many = rng.standard_normal((50, 6)).astype(np.float32)
    np.save(tmp_path / "many.npy", many / np.linalg.norm(many, axis=1, keepdims=True))
    with caplog.at_level("WARNING", logger="apretrieval.postprocess"):
        assert (
            main([*argv, "--whiten", str(tmp_path / "many.npy"), "--out", str(tmp_path / "b")]) == 0
        )
    assert not caplog.records  # enough descriptors: nothing to say
