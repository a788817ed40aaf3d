"""Descriptor post-processing: PCA whitening, alpha query expansion, database-side augmentation.

Pure functions on ``(N, D)`` float arrays of L2-normalised rows (numpy); outputs are
L2-normalised float32 rows.

* PCA whitening (learned on a *separate* image set, never on the test images):
  ``y = normalize(diag(lambda)^(-power) U^T (x - mean))`` with the top ``dim`` eigenpairs of
  the covariance of the learning set. ``power = 0.5`` whitens (unit variance per component),
  ``power = 0`` only rotates/projects (PCA); values in between shrink the dominant directions
  partially (the "power" of the power-law normalisation in the whitening literature).
* Learned whitening from matching pairs (Radenović et al., "Fine-tuning CNN image retrieval
  with no human annotation", TPAMI 2018): with ``d_i = x_{q_i} - x_{p_i}`` the differences of
  P matching pairs and ``C_S = (1/P) sum_i d_i d_i^T`` their covariance, ``L_w = C_S^(-1/2)``
  whitens what varies *within* a match (viewpoint, light); the query descriptors, centred on
  their mean ``m`` and whitened, are then rotated onto their principal directions ``V``
  (``C_D = (1/P) sum_i L_w (x_{q_i} - m)(x_{q_i} - m)^T L_w``), which orders the output
  dimensions by the variance *between* images: ``y = normalize(V^T L_w (x - m))``, truncated
  to the top ``dim`` components. Stored like the PCA whitening (``mean = m``,
  ``projection = V^T L_w``).
* alpha-QE (Radenović et al.): each query is replaced by ``normalize(q + sum_i s_i^alpha d_i)``
  over its ``k`` nearest database items ``d_i`` (similarity ``s_i``, clipped at 0);
  ``alpha = 0`` is average QE.
* DBA: the same weighted sum applied to every database item over its ``k`` nearest *other*
  database items.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apretrieval.atomic import atomic_open

__all__ = [
    "Whitening",
    "alpha_query_expansion",
    "apply_whitening",
    "database_augmentation",
    "l2_normalize",
    "learn_pairs_whitening",
    "learn_whitening",
    "load_whitening",
    "pca_whitening_matrix",
    "save_whitening",
]


log = logging.getLogger("apretrieval.postprocess")


def _as_rows(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be an (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN/inf values")
    return x


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32: (N, D) -> (N, D). All-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit: np.ndarray = (x / np.maximum(norms, eps)).astype(np.float32)
    return unit


@dataclass(frozen=True)
class Whitening:
    """``mean`` (D,) and ``projection`` (dim, D): ``y = normalize((x - mean) @ projection.T)``.

    Checked when made (learned, converted or read): shapes that fit and finite values only, so
    a whitening that would turn every descriptor into NaN is refused before any extraction.
    """

    mean: np.ndarray
    projection: np.ndarray
    power: float

    def __post_init__(self) -> None:
        mean, proj = np.asarray(self.mean), np.asarray(self.projection)
        if mean.ndim != 1 or proj.ndim != 2 or proj.shape[1] != mean.shape[0]:
            raise ValueError(
                f"a whitening needs mean (D,) and projection (dim, D), got {mean.shape} and "
                f"{proj.shape}"
            )
        for name, values in (("mean", mean), ("projection", proj)):
            bad = int(np.size(values) - np.isfinite(values).sum())
            if bad:
                raise ValueError(f"the whitening's {name} holds {bad} NaN/inf values")
        if not np.isfinite(self.power):
            raise ValueError(f"the whitening's power must be finite, got {self.power}")

    @property
    def dim(self) -> int:
        return int(self.projection.shape[0])


def pca_whitening_matrix(
    x: np.ndarray, dim: int, power: float = 0.5, eps: float = 1e-8
) -> tuple[np.ndarray, np.ndarray]:
    """The one PCA whitening of the library: (mean (D,), projection (dim, D)), float64.

    ``projection = diag(lambda + floor)^(-power) U^T`` over the top ``dim`` eigenpairs
    (lambda, U) of the sample covariance ``(x - mean)^T (x - mean) / (N - 1)`` of ``x`` (N, D);
    ``floor = eps * lambda_max`` keeps the near-null directions from exploding. When ``dim``
    exceeds the N - 1 directions centred data can span (N <= dim), the others take the scale
    of the weakest spanned one: the learning set says nothing about them, and scaling them up
    by 1 / sqrt(floor) would let them dominate every new descriptor. Conventions, chosen once
    for every caller:

    * ``N - 1``: the unbiased sample covariance, as ``np.cov`` / ``torch.cov``, so the
      whitened learning set has unit sample variance per component (``power = 0.5``). Every
      caller L2-normalises afterwards, where a global scale cancels: the choice changes no
      descriptor, only what a reader checks the matrix against.
    * Each eigenvector's sign is fixed (its largest-magnitude entry positive): LAPACK may
      return either sign, and a fixed one makes the result, and a model initialised from it,
      the same on every machine. A sign flip of a whole component changes no inner product.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected descriptors (N, D), got shape {x.shape}")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"PCA needs at least 2 descriptors, got {n}")
    if not 1 <= dim <= d:
        raise ValueError(f"dim must be in [1, D] = [1, {d}], got {dim}")
    if not 0 <= power <= 1:
        raise ValueError(f"power must lie in [0, 1], got {power}")
    mean = x.mean(axis=0)
    xc = x - mean
    eigval, eigvec = np.linalg.eigh(xc.T @ xc / (n - 1))  # ascending
    eigval, eigvec = eigval[::-1][:dim], eigvec[:, ::-1][:, :dim]
    rows = np.abs(eigvec).argmax(axis=0)
    eigvec = eigvec * np.sign(eigvec[rows, np.arange(dim)])
    lam = np.maximum(eigval, 0.0) + eps * max(float(eigval[0]), 1e-30)
    spanned = min(n - 1, d)
    if dim > spanned:  # unspanned directions: the weakest spanned one's scale
        lam[spanned:] = lam[spanned - 1]
    return mean, (eigvec / lam**power).T


def learn_whitening(
    x: np.ndarray, dim: int | None = None, power: float = 0.5, eps: float = 1e-8
) -> Whitening:
    """PCA whitening learned on ``x`` (N, D), a set disjoint from the test images.

    ``dim``: output dimension (default: the most the data supports, min(N - 1, D));
    ``power``: exponent of the eigenvalue scaling (0.5 = full whitening, 0 = plain PCA).
    ``eps`` (relative to the largest eigenvalue) keeps near-null directions from exploding.
    See :func:`pca_whitening_matrix` for the conventions.
    """
    x = _as_rows("x", x)
    n, d = x.shape
    rank = min(n - 1, d)  # centred data span at most N - 1 directions
    dim = rank if dim is None else int(dim)
    if not 1 <= dim <= rank:
        raise ValueError(f"dim must be in [1, min(N - 1, D)] = [1, {rank}], got {dim}")
    if rank < d:  # the descriptors lose every direction the learning set does not span
        log.warning(
            "the whitening is learned from %d descriptors of %d dimensions: they span only %d, "
            "so the whitened descriptors have %d dimensions and retrieval suffers; this set "
            "fits --whiten-dim (dim) up to %d, a %d-dimensional whitening needs more than %d "
            "descriptors (many times more to be reliable)",
            n,
            d,
            rank,
            dim,
            rank,
            d,
            d,
        )
    mean, projection = pca_whitening_matrix(x, dim, power, eps)
    return Whitening(mean.astype(np.float32), projection.astype(np.float32), float(power))


def _inverse_sqrt(c: np.ndarray, eps: float) -> np.ndarray:
    """Symmetric ``C^(-1/2)`` of a covariance (D, D); eigenvalues floored at ``eps * max``."""
    eigval, eigvec = np.linalg.eigh(c)
    lam = np.maximum(eigval, 0.0) + eps * max(float(eigval[-1]), 1e-30)
    result: np.ndarray = (eigvec / np.sqrt(lam)) @ eigvec.T
    return result


def learn_pairs_whitening(
    x: np.ndarray,
    qidxs: np.ndarray,
    pidxs: np.ndarray,
    dim: int | None = None,
    eps: float = 1e-8,
) -> Whitening:
    """Whitening learned from matching pairs (see the module docstring): descriptors ``x``
    (N, D), pairs ``(qidxs[i], pidxs[i])`` of row indices (P,). Returns ``mean`` = the mean of
    the query rows and ``projection = V^T C_S^(-1/2)`` (dim, D), float32.

    ``dim``: output dimension (default: the most the queries support, min(P - 1, D));
    ``eps`` (relative to the largest eigenvalue of ``C_S``) keeps directions in which no pair
    differs from exploding. The PCA step follows :func:`pca_whitening_matrix`'s conventions
    (fixed eigenvector signs).
    """
    x = _as_rows("x", x).astype(np.float64)
    q = np.asarray(qidxs, dtype=np.int64).reshape(-1)
    p = np.asarray(pidxs, dtype=np.int64).reshape(-1)
    if q.shape != p.shape:
        raise ValueError(f"{q.size} query indices but {p.size} positive indices")
    n, d = x.shape
    if q.size < 2:
        raise ValueError(f"learning a whitening needs at least 2 pairs, got {q.size}")
    for name, idx in (("qidxs", q), ("pidxs", p)):
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"{name} must index the {n} descriptors, got {idx.min()}..{idx.max()}")
    rank = min(q.size - 1, d)
    dim = rank if dim is None else int(dim)
    if not 1 <= dim <= rank:
        raise ValueError(f"dim must be in [1, min(P - 1, D)] = [1, {rank}], got {dim}")
    diff = x[q] - x[p]
    lw = _inverse_sqrt(diff.T @ diff / q.size, eps)
    mean = x[q].mean(axis=0)
    whitened = (x[q] - mean) @ lw  # lw is symmetric: rows times lw^T
    _, rotation = pca_whitening_matrix(whitened, dim, power=0.0)  # V^T: (dim, D)
    return Whitening(mean.astype(np.float32), (rotation @ lw).astype(np.float32), 0.5)


def apply_whitening(x: np.ndarray, whitening: Whitening) -> np.ndarray:
    """Whitened, L2-normalised descriptors: (N, D) -> (N, dim) float32."""
    x = _as_rows("x", x)
    if x.shape[1] != whitening.mean.shape[0]:
        raise ValueError(
            f"descriptors have dimension {x.shape[1]}, the whitening expects "
            f"{whitening.mean.shape[0]}"
        )
    y = (x.astype(np.float32) - whitening.mean) @ whitening.projection.T
    return l2_normalize(y)


def save_whitening(path: str | os.PathLike[str], whitening: Whitening) -> Path:
    """Write ``whitening`` to an ``.npz`` file atomically."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        np.savez(
            f,
            mean=whitening.mean,
            projection=whitening.projection,
            power=np.float64(whitening.power),
        )
    return path


def load_whitening(path: str | os.PathLike[str]) -> Whitening:
    """Read a whitening written by :func:`save_whitening` (no pickles are loaded)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return Whitening(z["mean"], z["projection"], float(z["power"]))
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path} is not a whitening file: {err}") from None


def _weighted_neighbour_sum(
    x: np.ndarray, database: np.ndarray, scores: np.ndarray, indices: np.ndarray, alpha: float
) -> np.ndarray:
    # Weights s^alpha of the neighbours (negative similarities count zero, also for alpha = 0
    # where 0**0 would be 1); the item itself keeps weight 1, i.e. its own similarity.
    s = scores.astype(np.float64)
    w = np.where(s > 0, np.clip(s, 0.0, None) ** alpha, 0.0)
    agg = x.astype(np.float64).copy()
    for j in range(indices.shape[1]):
        agg += w[:, j : j + 1] * database[indices[:, j]].astype(np.float64)
    return l2_normalize(agg)


def _check_k_alpha(k: int, alpha: float, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    if k > n:
        raise ValueError(f"k = {k} exceeds the {n} available neighbours")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")


def alpha_query_expansion(
    queries: np.ndarray, database: np.ndarray, k: int, alpha: float = 3.0
) -> np.ndarray:
    """alpha-QE: (Q, D) queries expanded with their ``k`` nearest of database (N, D).

    ``k = 0`` returns the (normalised) queries unchanged; ``alpha = 0`` is average QE.
    """
    from apretrieval.search import knn

    queries = _as_rows("queries", queries)
    database = _as_rows("database", database)
    _check_k_alpha(k, alpha, database.shape[0])
    if k == 0:
        return l2_normalize(queries)
    scores, indices = knn(
        np.ascontiguousarray(queries, np.float32),
        np.ascontiguousarray(database, np.float32),
        int(k),
    )
    return _weighted_neighbour_sum(queries, database, scores, indices, alpha)


def database_augmentation(database: np.ndarray, k: int, alpha: float = 3.0) -> np.ndarray:
    """DBA: every database item (N, D) combined with its ``k`` nearest other items.

    The item itself is excluded from its own neighbours (it already has weight 1).
    """
    from apretrieval.search import knn

    database = _as_rows("database", database)
    n = database.shape[0]
    _check_k_alpha(k, alpha, n - 1)
    if k == 0:
        return l2_normalize(database)
    db32 = np.ascontiguousarray(database, np.float32)
    scores, indices = knn(db32, db32, int(k) + 1)
    # Drop the item itself (usually first, but duplicates may tie with it, so search for it).
    is_self = indices == np.arange(n)[:, None]
    has_self = is_self.any(axis=1)
    drop = np.where(has_self, is_self.argmax(axis=1), k)  # no self found: drop the k+1-th
    keep = np.ones_like(indices, dtype=bool)
    keep[np.arange(n), drop] = False
    scores = scores[keep].reshape(n, k)
    indices = indices[keep].reshape(n, k)
    return _weighted_neighbour_sum(database, database, scores, indices, alpha)
