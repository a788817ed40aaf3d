"""Whitening learned from matching pairs: a case computed by hand, and the properties that
define it (within-pair differences whitened, components ordered by between-image variance)."""

from __future__ import annotations

import numpy as np
import pytest

from apretrieval.postprocess import (
    apply_whitening,
    learn_pairs_whitening,
    load_whitening,
    save_whitening,
)


def test_hand_computed_case(tmp_path):
    # Four pairs whose differences are d = (2, 0), (-2, 0), (0, 1), (0, -1):
    #   C_S = sum d d^T / 4 = diag(2, 1/2), so L_w = C_S^(-1/2) = diag(1/sqrt2, sqrt2).
    # Queries m + c_i with m = (0, 2) and c_i = L_w^(-1) w_i, chosen so that the whitened
    # centred queries are w = +-(1, -2), +-(1, 1/2): their covariance has eigenvectors
    # (1, -2)/sqrt5 (eigenvalue 10/4) and (2, 1)/sqrt5 (2.5/4); with the largest entry of each
    # made positive, V = [(-1, 2), (2, 1)] / sqrt5 and
    #   V^T L_w = [[-1/sqrt2, 2 sqrt2], [2/sqrt2, sqrt2]] / sqrt5 = [[-1, 4], [2, 2]] / sqrt10.
    r = np.sqrt(2.0)
    m = np.array([0.0, 2.0])
    c = np.array([[r, -r], [-r, r], [r, 0.5 / r], [-r, -0.5 / r]])
    d = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    queries = m + c
    x = np.vstack([queries, queries - d])
    w = learn_pairs_whitening(x, qidxs=[0, 1, 2, 3], pidxs=[4, 5, 6, 7], eps=0.0)
    assert w.dim == 2  # min(P - 1, D)
    np.testing.assert_allclose(w.mean, m, atol=1e-6)
    expected = np.array([[-1.0, 4.0], [2.0, 2.0]]) / np.sqrt(10.0)
    np.testing.assert_allclose(w.projection, expected, rtol=1e-6, atol=1e-6)
    # dim=1 keeps the first row
    w1 = learn_pairs_whitening(x, [0, 1, 2, 3], [4, 5, 6, 7], dim=1, eps=0.0)
    np.testing.assert_allclose(w1.projection, expected[:1], rtol=1e-6, atol=1e-6)
    # Same .npz format as the PCA whitening, read back by the same loader
    back = load_whitening(save_whitening(tmp_path / "w.npz", w))
    np.testing.assert_array_equal(back.projection, w.projection)
    np.testing.assert_array_equal(back.mean, w.mean)


def test_pair_differences_come_out_white_and_components_ordered():
    rng = np.random.default_rng(0)
    n, d = 400, 6
    base = rng.normal(size=(n, d)) * np.array([3.0, 2.0, 1.5, 1.0, 0.5, 0.2])
    noise = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3  # correlated, within-pair
    x = np.vstack([base, base + noise])
    q, p = np.arange(n), np.arange(n, 2 * n)
    w = learn_pairs_whitening(x, q, p, dim=d, eps=0.0)
    proj = w.projection.astype(np.float64)
    diff = x[q] - x[p]
    c_s = diff.T @ diff / n
    # P C_S P^T = V^T L_w C_S L_w V = I: within-pair variation is white in every direction
    np.testing.assert_allclose(proj @ c_s @ proj.T, np.eye(d), atol=1e-4)
    # Between-image variance of the projected queries: decreasing along the components
    y = (x[q] - w.mean) @ proj.T
    var = y.var(axis=0)
    assert np.all(np.diff(var) <= 1e-6) and var[0] > var[-1]
    # Applying it: unit rows of the requested dimension
    out = apply_whitening(x[:5].astype(np.float32), w)
    assert out.shape == (5, d)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_bad_input_is_refused():
    x = np.eye(4)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        learn_pairs_whitening(x, [0], [1])
    with pytest.raises(ValueError, match="3 query indices but 2"):
        learn_pairs_whitening(x, [0, 1, 2], [1, 2])
    with pytest.raises(ValueError, match="pidxs must index the 4"):
        learn_pairs_whitening(x, [0, 1], [1, 7])
    with pytest.raises(ValueError, match="dim must be in"):
        learn_pairs_whitening(x, [0, 1, 2], [1, 2, 3], dim=3)


# --------------------------------------------------------------------------------------------
# `apretrieval whiten`: a checkpoint and SfM-120k's pairs -> the .npz


def test_whiten_command_from_images_and_from_descriptors(tmp_path, capsys):
    import pickle

    from apretrieval.cli import main
    from apretrieval.data.sfm120k import cid_path
    from apretrieval.models import build_model, save_checkpoint
    from apretrieval.pipeline import ExtractionSettings, extract_images
    from miniatures import jpeg, sfm_db

    db, whiten = sfm_db(num_clusters=3, per_cluster=4)
    root = tmp_path / "sfm"
    for i, cid in enumerate(db["train"]["cids"]):
        path = cid_path(root / "ims", cid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(i))
    pairs = root / "retrieval-SfM-120k-whiten.pkl"
    pairs.write_bytes(pickle.dumps(whiten))
    model = build_model("resnet18", pretrained=None, out_dim=8)
    ckpt = save_checkpoint(tmp_path / "m.pt", model)
    extraction = ["--scales", "1", "--max-side", "24", "--workers", "0", "--device", "cpu"]
    out = tmp_path / "w.npz"
    args = ["whiten", "--pairs", str(pairs), "--out", str(out), *extraction, "--no-progress"]
    assert main([*args, "--checkpoint", str(ckpt)]) == 0
    assert "8 -> 2 dimensions" in capsys.readouterr().out  # 3 pairs: min(P - 1, D) = 2
    learned = load_whitening(out)

    # The same whitening by hand: the pair images' descriptors, then learn_pairs_whitening.
    used = sorted({*whiten["qidxs"], *whiten["pidxs"]})
    names = [whiten["cids"][i] for i in used]
    settings = ExtractionSettings(scales=(1.0,), max_side=24, num_workers=0, device="cpu")
    x = extract_images(model, [cid_path(root / "ims", c) for c in names], names, settings)
    row = {j: k for k, j in enumerate(used)}
    expected = learn_pairs_whitening(
        x, [row[i] for i in whiten["qidxs"]], [row[i] for i in whiten["pidxs"]]
    )
    np.testing.assert_allclose(learned.projection, expected.projection, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(learned.mean, expected.mean, rtol=1e-5, atol=1e-6)

    # From a descriptor file whose ids are the images' tree paths (as `extract --images` names
    # them): matched to the pairs by file name.
    ids = [cid_path("", c).as_posix() for c in names]
    files = [cid_path(root / "ims", c) for c in names]
    extract_images(model, files, ids, settings, out=tmp_path / "feats")
    out2 = tmp_path / "w2.npz"
    args2 = ["whiten", "--pairs", str(pairs), "--out", str(out2), "--descriptors"]
    assert main([*args2, str(tmp_path / "feats.npy")]) == 0
    np.testing.assert_allclose(
        load_whitening(out2).projection, expected.projection, rtol=1e-4, atol=1e-5
    )


def test_whiten_command_names_missing_images(tmp_path, capsys):
    import pickle

    from apretrieval.cli import main
    from apretrieval.models import build_model, save_checkpoint
    from miniatures import sfm_db

    _, whiten = sfm_db()
    pairs = tmp_path / "retrieval-SfM-120k-whiten.pkl"
    pairs.write_bytes(pickle.dumps(whiten))
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("resnet18", pretrained=None, out_dim=8))
    rc = main(
        [
            "whiten",
            "--pairs",
            str(pairs),
            "--out",
            str(tmp_path / "w.npz"),
            "--checkpoint",
            str(ckpt),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "6 pair images are missing" in err[-1] and "download sfm120k" in err[-1]
