"""PCA whitening, alpha-QE and DBA satisfy their defining properties."""

from __future__ import annotations

import numpy as np
import pytest

from apretrieval.postprocess import (
    alpha_query_expansion,
    apply_whitening,
    database_augmentation,
    l2_normalize,
    learn_whitening,
    load_whitening,
    save_whitening,
)


def unit_rows(rng, n, d, scale=None):
    x = rng.standard_normal((n, d))
    if scale is not None:
        x *= scale
    return l2_normalize(x)


def test_whitening_gives_identity_covariance_on_its_learning_set():
    rng = np.random.default_rng(0)
    x = unit_rows(rng, 500, 16, scale=np.linspace(0.1, 3.0, 16))
    w = learn_whitening(x, power=0.5)
    y = (x - w.mean) @ w.projection.T  # before the final L2 normalisation
    # Unit *sample* variance: the whitening uses the N - 1 covariance (pca_whitening_matrix).
    np.testing.assert_allclose(np.cov(y.T), np.eye(w.dim), atol=1e-4)


def test_power_zero_is_a_rotation_that_preserves_distances():
    rng = np.random.default_rng(1)
    x = unit_rows(rng, 300, 8)
    w = learn_whitening(x, power=0.0, dim=8)
    np.testing.assert_allclose(w.projection @ w.projection.T, np.eye(8), atol=1e-5)
    a = (x - w.mean) @ w.projection.T
    np.testing.assert_allclose(
        np.linalg.norm(a, axis=1), np.linalg.norm(x - w.mean, axis=1), rtol=1e-5
    )


def test_intermediate_power_shrinks_dominant_directions_partially():
    rng = np.random.default_rng(2)
    x = unit_rows(rng, 2000, 6, scale=np.array([4.0, 2.0, 1.0, 1.0, 0.5, 0.5]))
    var = [
        np.var((x - w.mean) @ w.projection.T, axis=0)
        for w in (learn_whitening(x, power=p) for p in (0.0, 0.25, 0.5))
    ]
    ratio = [v[0] / v[-1] for v in var]  # spread between the largest and smallest components
    assert ratio[0] > ratio[1] > ratio[2] and ratio[2] == pytest.approx(1.0, rel=1e-3)
    assert ratio[1] == pytest.approx(np.sqrt(ratio[0]), rel=1e-3)  # lambda^(1 - 2p), p = 1/4


def test_reduced_dimension_keeps_the_largest_variance_directions():
    rng = np.random.default_rng(3)
    x = unit_rows(rng, 1000, 10, scale=np.array([5.0, 3.0] + [0.2] * 8))
    w = learn_whitening(x, dim=2, power=0.0)
    # The two kept axes span (almost) the two dominant coordinates.
    energy = np.sum(w.projection[:, :2] ** 2, axis=1)
    assert np.all(energy > 0.95)
    out = apply_whitening(x, w)
    assert out.shape == (1000, 2) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_whitening_save_load_and_errors(tmp_path):
    rng = np.random.default_rng(4)
    x = unit_rows(rng, 50, 8)
    w = learn_whitening(x, dim=4, power=0.3)
    path = save_whitening(tmp_path / "w.npz", w)
    w2 = load_whitening(path)
    np.testing.assert_array_equal(w2.projection, w.projection)
    assert w2.power == pytest.approx(0.3)
    with pytest.raises(ValueError, match="dimension"):
        apply_whitening(x[:, :5], w)
    with pytest.raises(ValueError, match="dim must be"):
        learn_whitening(x[:5], dim=5)
    with pytest.raises(ValueError, match="power"):
        learn_whitening(x, power=2.0)
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(ValueError, match="whitening file"):
        load_whitening(tmp_path / "bad.npz")


def test_alpha_qe_hand_example():
    q = np.array([[1.0, 0.0]])
    db = l2_normalize(np.array([[1.0, 1.0], [1.0, -0.2], [-1.0, 0.0]]))
    s = db @ q[0]
    # k = 2: the two most similar are db[1] (s=0.98) and db[0] (s=0.707)
    want = l2_normalize(q + s[1] ** 3 * db[1] + s[0] ** 3 * db[0])
    np.testing.assert_allclose(alpha_query_expansion(q, db, k=2, alpha=3.0), want, rtol=1e-6)
    avg = l2_normalize(q + db[1] + db[0])
    np.testing.assert_allclose(alpha_query_expansion(q, db, k=2, alpha=0.0), avg, rtol=1e-6)
    np.testing.assert_allclose(alpha_query_expansion(q, db, k=0), q)


def test_alpha_qe_ignores_negative_similarities_and_keeps_unit_norm():
    rng = np.random.default_rng(5)
    q, db = unit_rows(rng, 7, 5), unit_rows(rng, 40, 5)
    out = alpha_query_expansion(q, db, k=40, alpha=1.0)
    s = q @ db.T
    want = l2_normalize(q + np.clip(s, 0, None) @ db)
    np.testing.assert_allclose(out, want, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds"):
        alpha_query_expansion(q, db, k=41)


def test_dba_excludes_self_and_equals_weighted_sum():
    rng = np.random.default_rng(6)
    db = unit_rows(rng, 30, 4)
    out = database_augmentation(db, k=3, alpha=3.0)
    s = db @ db.T
    np.fill_diagonal(s, -np.inf)
    for i in range(30):
        nn = np.argsort(-s[i], kind="stable")[:3]
        want = l2_normalize(db[i : i + 1] + (np.clip(s[i, nn], 0, None) ** 3) @ db[nn])
        np.testing.assert_allclose(out[i : i + 1], want, atol=1e-5)
    np.testing.assert_allclose(database_augmentation(db, k=0), db, atol=1e-6)


def test_dba_is_permutation_equivariant_and_merges_duplicates():
    rng = np.random.default_rng(7)
    db = unit_rows(rng, 25, 6)
    perm = rng.permutation(25)
    out_perm = database_augmentation(db[perm], 4)
    np.testing.assert_allclose(out_perm, database_augmentation(db, 4)[perm], atol=1e-6)
    dup = np.concatenate([db[:1], db[:1], db[1:]])
    out = database_augmentation(dup, k=1, alpha=3.0)
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)  # each one's neighbour is the other
    np.testing.assert_allclose(out[0], db[0], atol=1e-6)


def test_average_qe_gives_negative_neighbours_no_weight():
    """alpha = 0 is average QE over the neighbours with a positive similarity: a negative one
    counts zero (0**0 would give it weight 1)."""
    q = np.array([[1.0, 0.0]])
    db = np.array([[0.6, 0.8], [-0.6, 0.8], [0.0, 1.0]])  # similarities 0.6, -0.6, 0
    out = alpha_query_expansion(q, db, k=3, alpha=0.0)
    np.testing.assert_allclose(out, l2_normalize(q + db[:1]), atol=1e-7)
    # the same rule in DBA: here every pair has similarity -1 or 0
    db2 = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    out = database_augmentation(db2, k=2, alpha=0.0)
    np.testing.assert_allclose(out, db2, atol=1e-7)  # no neighbour with s > 0: unchanged
