"""Nearest-neighbour search over descriptors: exact chunked k-NN and exact re-ranking.

Conventions (the same as faiss, so the two are interchangeable): similarity is the inner product
of L2-normalised descriptors (cosine), results are ``scores (Q, k)`` sorted descending and
``indices (Q, k)`` int64 into the database rows. When ``k`` exceeds the database size the missing
places hold score ``-inf`` and index ``-1``.

This module needs neither faiss nor a model. faiss indexes live in
:mod:`apretrieval.faiss_index`, the descriptor files in :mod:`apretrieval.descriptors`, and the
extraction of query images in :mod:`apretrieval.pipeline`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import overload

import numpy as np
import torch
from torch import Tensor

__all__ = ["knn", "ranked_ids", "rerank_candidates"]


# Budget for one block of the score matrix in knn (elements, i.e. 4 bytes each): 32M floats =
# 128 MiB keeps the matrix-product blocks large enough to run at BLAS speed while the whole
# search, even of 1M x 2048 descriptors, stays far below the memory of the database itself.
_BLOCK_ELEMENTS = 32 * 2**20


# --------------------------------------------------------------------------------------------
# Exact search in torch
# --------------------------------------------------------------------------------------------


def _as_2d(name: str, x: np.ndarray | Tensor) -> np.ndarray | Tensor:
    if not isinstance(x, np.ndarray | Tensor):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {tuple(x.shape)}")
    return x


def _chunk_to_torch(x: np.ndarray | Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rows of a numpy array (possibly a memmap) or tensor as a tensor on ``device``/``dtype``."""
    if isinstance(x, np.ndarray):
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        if x.dtype != np_dtype or not x.flags.c_contiguous:
            x = np.array(x, dtype=np_dtype, order="C")  # one copy, straight to the compute dtype
        # Checked in numpy: single-threaded and cheap next to the product it feeds.
        finite = bool(np.isfinite(x).all())
        with warnings.catch_warnings():
            # A read-only memmap is wrapped without a copy; nothing here writes to it.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(x)
    else:
        finite = bool(torch.isfinite(x).all())
    if not finite:
        raise ValueError("descriptors contain NaN/inf values")
    return x.to(device=device, dtype=dtype)


def _topk_first(s: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` per row of ``s (q, c)``; among ties the leftmost columns win, and the kept
    columns come back in column order. ``torch.topk`` picks ties arbitrarily, which would make
    results depend on the chunking."""
    if k >= s.shape[1]:
        cols = torch.arange(s.shape[1], device=s.device).expand(s.shape[0], -1)
        return s, cols
    vals, cols = s.topk(k + 1, dim=1, sorted=True)
    # Rows whose k-th and (k+1)-th values differ have no tie across the cut: topk's set is the
    # answer. Only rows with such a tie (rare for real descriptors) take the exact pass below.
    tie = vals[:, k - 1] == vals[:, k]
    cols = cols[:, :k].sort(dim=1).values
    if tie.any():
        rows = tie.nonzero()[:, 0]
        cols[rows] = _tie_cols(s[rows], vals[rows, k - 1 : k], k)
    return s.gather(1, cols), cols


def _tie_cols(s: Tensor, kth: Tensor, k: int) -> Tensor:
    """Columns of the top-``k`` of ``s`` given its k-th value ``kth (q, 1)``: all greater
    values, then the leftmost of those equal to it; in column order."""
    greater = s > kth
    tied = s == kth
    need = k - greater.sum(dim=1, keepdim=True)
    keep = greater | (tied & (tied.cumsum(dim=1) <= need))
    return keep.nonzero()[:, 1].view(s.shape[0], k)  # row-major: exactly k per row, in order


@overload
def knn(
    queries: np.ndarray,
    database: np.ndarray | Tensor,
    k: int,
    *,
    block_elements: int = _BLOCK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def knn(
    queries: Tensor,
    database: np.ndarray | Tensor,
    k: int,
    *,
    block_elements: int = _BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor]: ...
def knn(
    queries: np.ndarray | Tensor,
    database: np.ndarray | Tensor,
    k: int,
    *,
    block_elements: int = _BLOCK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray] | tuple[Tensor, Tensor]:
    """Exact top-``k`` inner-product search, chunked so no full ``(Q, N)`` matrix is built.

    queries (Q, D), database (N, D): numpy arrays (a ``np.memmap`` is read block by block) or
    tensors. Returns ``(scores, indices)``, each ``(Q, k)``, scores descending; numpy in, numpy
    out (float32 scores, int64 indices); tensors in, tensors out on the queries' device. The
    score blocks hold at most ``block_elements`` values: the database is scanned in chunks and
    each chunk's top-k is merged into the running top-k, so memory is ``O(block + Q k)``.
    """
    _as_2d("queries", queries)
    _as_2d("database", database)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"queries and database dimensions differ: {queries.shape[1]} vs {database.shape[1]}"
        )
    if block_elements < 1:
        raise ValueError(f"block_elements must be >= 1, got {block_elements!r}")
    as_numpy = isinstance(queries, np.ndarray)
    device = queries.device if isinstance(queries, Tensor) else torch.device("cpu")
    # float64 only when both sides are float64; everything else (float16 on CPU included) is
    # computed in float32, the precision faiss uses.
    both_double = all(
        (x.dtype == torch.float64) if isinstance(x, Tensor) else (x.dtype == np.float64)
        for x in (queries, database)
    )
    dtype = torch.float64 if both_double else torch.float32

    nq, n = queries.shape[0], database.shape[0]
    out_scores = torch.full((nq, k), -math.inf, dtype=dtype, device=device)
    out_indices = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    if nq and n:
        # Query blocks leave room for database chunks of >= 4096 rows (or 4k), so the merges
        # stay cheap next to the products; database chunks bound the score block.
        q_block = max(1, min(nq, block_elements // max(4096, 4 * k)))
        for q0 in range(0, nq, q_block):
            q = _chunk_to_torch(queries[q0 : q0 + q_block], device, dtype)
            # The chunk of database rows is bounded like the score block: a (c, D) float32
            # copy (or mapped pages) of at most block_elements values.
            n_chunk = max(k, min(block_elements // q.shape[0], block_elements // queries.shape[1]))
            best_s, best_i = _scan(q, database, k, n_chunk, device, dtype)
            out_scores[q0 : q0 + q.shape[0], : best_s.shape[1]] = best_s
            out_indices[q0 : q0 + q.shape[0], : best_i.shape[1]] = best_i
    if as_numpy:
        return out_scores.cpu().numpy(), out_indices.cpu().numpy()
    return out_scores, out_indices


def _scan(
    q: Tensor,
    database: np.ndarray | Tensor,
    k: int,
    n_chunk: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Running top-k of one query block over the database, chunk by chunk (scores descending,
    ties by database index)."""
    best_s: Tensor | None = None
    best_i: Tensor | None = None
    n = database.shape[0]
    for start in range(0, n, n_chunk):
        chunk = _chunk_to_torch(database[start : start + n_chunk], device, dtype)
        s = q @ chunk.T  # (q, c): the only score matrix, bounded by the block budget
        s, i = _topk_first(s, k)
        i = i + start
        if best_s is not None and best_i is not None:
            # Kept entries stay in index order, and every earlier chunk precedes this one, so
            # "leftmost wins ties" in the merge is "lowest index wins ties".
            s, cols = _topk_first(torch.cat([best_s, s], dim=1), k)
            i = torch.cat([best_i, i], dim=1).gather(1, cols)
        best_s, best_i = s, i
    assert best_s is not None and best_i is not None  # knn scans only a non-empty database
    order = best_s.argsort(dim=1, descending=True, stable=True)
    return best_s.gather(1, order), best_i.gather(1, order)


def rerank_candidates(
    queries: np.ndarray | Tensor,
    database: np.ndarray | Tensor,
    candidates: np.ndarray,
    k: int,
    *,
    block_elements: int = _BLOCK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` among ``candidates (Q, C)`` (database rows; -1 = none), e.g. the
    shortlist of an approximate index: each is re-scored as ``queries[q] . database[c]``.

    ``database`` may be a memmap: only candidate rows are read. Returns numpy ``scores``,
    ``indices`` ``(Q, k)``, scores descending, ties by index, padding ``-inf`` / ``-1``.
    """
    if isinstance(queries, Tensor):
        queries = queries.detach().cpu().numpy()
    if isinstance(database, Tensor):
        database = database.detach().cpu().numpy()
    _as_2d("queries", queries)
    _as_2d("database", database)
    cand = np.asarray(candidates, dtype=np.int64)
    if cand.ndim != 2 or cand.shape[0] != queries.shape[0]:
        raise ValueError(f"candidates must be (Q={queries.shape[0]}, C), got {cand.shape}")
    if cand.size and cand.max() >= database.shape[0]:
        raise ValueError(f"candidate {cand.max()} outside the database of {database.shape[0]}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    nq, c = cand.shape
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    q_block = max(1, block_elements // max(1, c * database.shape[1]))
    for q0 in range(0, nq, q_block):
        cb = np.sort(cand[q0 : q0 + q_block], axis=1)
        cb[:, 1:][cb[:, 1:] == cb[:, :-1]] = -1  # a candidate listed twice counts once
        rows = np.unique(cb[cb >= 0])  # sorted: a memmap is read in file order
        vecs = np.asarray(database[rows], dtype=np.float32)
        if not np.isfinite(vecs).all():
            raise ValueError("descriptors contain NaN/inf values")
        qb = np.asarray(queries[q0 : q0 + q_block], dtype=np.float32)
        sc = qb @ vecs.T  # (q, unique candidates of the block)
        pos = np.searchsorted(rows, np.maximum(cb, 0))
        s = np.where(cb >= 0, np.take_along_axis(sc, pos, axis=1), -np.inf).astype(np.float32)
        # Sort by score descending, then index ascending (padding, -1 at -inf, goes last).
        order = np.lexsort((np.where(cb >= 0, cb, np.iinfo(np.int64).max), -s), axis=1)[:, :k]
        out_s[q0 : q0 + q_block, : order.shape[1]] = np.take_along_axis(s, order, axis=1)
        out_i[q0 : q0 + q_block, : order.shape[1]] = np.take_along_axis(cb, order, axis=1)
    out_i[np.isneginf(out_s)] = -1
    return out_s, out_i


def ranked_ids(
    ids: Sequence[str], scores: np.ndarray, indices: np.ndarray
) -> list[list[tuple[str, float]]]:
    """Per query, ``(id, score)`` best first, dropping padding (index -1)."""
    return [
        [(ids[int(i)], float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
        for row_s, row_i in zip(scores, indices, strict=True)
    ]
