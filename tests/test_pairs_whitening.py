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
