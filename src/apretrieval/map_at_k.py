"""Mean average precision at k (GLDv2 retrieval) and precision at k, from ranked lists.

For a query with the set ``R`` of relevant database items and a ranked list ``r_1, r_2, ...``
(best first), the Google Landmarks v2 retrieval metric (Weyand et al., CVPR 2020) is

    AP@k = (1 / min(|R|, k)) * sum_{i <= k} P(i) * rel(i),

where ``rel(i)`` is 1 when ``r_i`` is in ``R`` and ``P(i)`` is the precision of the first ``i``
items; mAP@k is its mean over the queries (GLDv2: k = 100, each split on its own). Precision at
``kappa`` is the fraction of relevant items among the first ``kappa`` (a shorter list counts
its missing places as irrelevant). Queries without a relevant item get NaN, left out of the
means by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["average_precision_at_k", "hits", "precision_at_k"]


def hits(topk: np.ndarray, relevant: Sequence[np.ndarray]) -> np.ndarray:
    """(Q, K) bool: whether each ranked item is relevant. ``topk`` (Q, K) database indices,
    best first (``-1`` pads a short list); ``relevant[q]``: the relevant indices of query q."""
    topk = np.asarray(topk)
    if topk.ndim != 2:
        raise ValueError(f"topk must be (num_queries, k), got shape {topk.shape}")
    if len(relevant) != topk.shape[0]:
        raise ValueError(f"{len(relevant)} relevance lists for {topk.shape[0]} queries")
    return (
        np.stack([np.isin(row, rel) & (row >= 0) for row, rel in zip(topk, relevant, strict=True)])
        if topk.shape[0]
        else np.zeros(topk.shape, dtype=bool)
    )


def average_precision_at_k(
    topk: np.ndarray, relevant: Sequence[np.ndarray], k: int = 100
) -> np.ndarray:
    """AP@k of every query -> (Q,) float64 (NaN without a relevant item); see the module
    docstring. Only the first ``k`` columns of ``topk`` count."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    h = hits(np.asarray(topk)[:, :k], relevant).astype(np.float64)
    ranks = np.arange(1, h.shape[1] + 1, dtype=np.float64)
    precision = np.cumsum(h, axis=1) / ranks
    counts = np.array([np.unique(r).size for r in relevant], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (precision * h).sum(axis=1) / np.minimum(counts, k)
    return np.where(counts > 0, ap, np.nan)


def precision_at_k(
    topk: np.ndarray, relevant: Sequence[np.ndarray], kappas: Sequence[int] = (1, 5, 10)
) -> np.ndarray:
    """Precision at each ``kappa`` -> (Q, len(kappas)) float64 (NaN without a relevant item)."""
    if not kappas or any(isinstance(c, bool) or int(c) < 1 for c in kappas):
        raise ValueError(f"kappas must be positive integers, got {list(kappas)}")
    h = hits(topk, relevant)
    counts = np.array([np.unique(r).size for r in relevant])
    out = np.stack([h[:, : int(c)].sum(axis=1) / int(c) for c in kappas], axis=1)
    return np.where(counts[:, None] > 0, out, np.nan)
