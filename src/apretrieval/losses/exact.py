"""Exact AP (the evaluation metric; not differentiable)."""

from __future__ import annotations

from typing import overload

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from apretrieval.losses._checks import check_pair

__all__ = ["average_precision"]


@overload
def average_precision(scores: Tensor, relevance: Tensor) -> Tensor: ...
@overload
def average_precision(scores: npt.ArrayLike, relevance: npt.ArrayLike) -> np.ndarray: ...
def average_precision(
    scores: Tensor | npt.ArrayLike, relevance: Tensor | npt.ArrayLike
) -> Tensor | np.ndarray:
    """Exact non-interpolated AP per query: mean over positives of precision at their rank.

    scores (Q, N), relevance (Q, N) bool; numpy arrays or torch tensors -> (Q,) of the same
    kind. Ties are broken by a stable sort (database order). Queries without any positive: NaN.
    """
    if isinstance(scores, Tensor):
        if not isinstance(relevance, Tensor):  # the message of check_pair
            raise ValueError("scores and relevance must be torch tensors")
        return _average_precision_torch(scores, relevance)
    return _average_precision_numpy(scores, relevance)


def _average_precision_torch(scores: Tensor, relevance: Tensor) -> Tensor:
    check_pair(scores, relevance)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rel = relevance.bool().gather(1, order).to(torch.float64)
    hits = rel.cumsum(1)
    ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64, device=rel.device)
    n_pos = rel.sum(1)
    ap = (rel * hits / ranks).sum(1) / n_pos
    return torch.where(n_pos > 0, ap, torch.full_like(ap, float("nan")))


def _average_precision_numpy(scores: npt.ArrayLike, relevance: npt.ArrayLike) -> np.ndarray:
    s, r = np.asarray(scores), np.asarray(relevance).astype(bool)
    if s.ndim != 2 or r.shape != s.shape:
        raise ValueError(f"scores {s.shape} and relevance {r.shape} must be equal (Q, N) shapes")
    if s.size == 0:
        raise ValueError(f"scores is empty, shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contains NaN/inf values")
    order = np.argsort(-s, axis=1, kind="stable")
    rel = np.take_along_axis(r, order, axis=1).astype(np.float64)
    hits = rel.cumsum(1)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    n_pos = rel.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (rel * hits / ranks).sum(1) / n_pos
    return np.where(n_pos > 0, ap, np.nan)
