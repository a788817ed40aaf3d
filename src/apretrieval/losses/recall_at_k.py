"""Recall@k surrogate (Patel et al., "Recall@k Surrogate Loss with Large Batches and Similarity
Mixup", CVPR 2022).

The rank of positive p of query i is Smooth-AP's, ``R(p) = 1 + sum_{j != p} sigmoid(d_j / tau)``
with d_j = s_ij - s_ip over the database (never the query itself). Whether p is within the
top k is smoothed again, and the count of positives there is capped by what is reachable:

    recall_k(i) = min(sum_{p in P_i} sigmoid((k - R(p)) / tau_k), m) / m,   m = min(k, |P_i|),
    loss        = 1 - mean over the queries with a positive and over k in ``k``.

The gradient is analytic: ``drecall_k/dR(p) = -1[sum <= m] sigmoid'((k - R(p)) / tau_k) /
(m tau_k)``, then through R(p) as in Smooth-AP; the ranks are formed twice (once for the
per-query sums, once for the gradient), so memory stays that of one block of pairs.

The original ranks the query among its own results (a constant +1 in R); here the query is
not in its own ranking, as in retrieval evaluation and in ``APLoss``: the constant would shift
every k by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from apretrieval.losses._pairs import (
    RankLoss,
    check_positive,
    pair_blocks,
    positives,
    scatter_pair_grads,
    sigmoid_and_slope,
)

__all__ = ["RecallAtKLoss"]


def _check_ks(k: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(k) if isinstance(k, Sequence) else (k,)
    if not ks or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ks):
        raise ValueError(f"k must be one or more integers >= 1, got {k!r}")
    return ks


class RecallAtKLoss(RankLoss):
    """Recall@k surrogate ``1 - mean_{i, k} recall_k(i)`` (see the module; the paper's
    k = 1, 2, 4, 8, 16, tau = 0.01, tau_k = 1). Call forms: see ``ListwiseLoss``."""

    def __init__(
        self,
        k: Sequence[int] = (1, 2, 4, 8, 16),
        tau: float = 0.01,
        tau_k: float = 1.0,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(chunk_size, **kwargs)
        self.k = _check_ks(k)
        self.tau = check_positive("tau", tau)
        self.tau_k = check_positive("tau_k", tau_k)

    def extra_repr(self) -> str:
        return f"k={self.k}, tau={self.tau:g}, tau_k={self.tau_k:g}, chunk_size={self.chunk_size}"

    def _rows(
        self,
        scores: Tensor,
        relevance: Tensor,
        exclude: Tensor | None,
        need_grad: bool,
        grad_scale: Tensor,
        *,
        out: Tensor | None = None,
        totals: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        pos = positives(relevance, exclude)
        rank = scores.new_empty(pos.rows.shape[0])
        for blk in pair_blocks(scores, pos, exclude, self.pair_budget_mb):
            rank[blk.index] = torch.sigmoid(blk.d.div_(self.tau)).sum(1).add_(1.0)
        ks = torch.tensor(self.k, dtype=scores.dtype, device=scores.device)
        # Per pair and k (P, K): is p within the top k, smoothly; summed per row (c, K).
        inside = torch.sigmoid((ks[None, :] - rank[:, None]) / self.tau_k)
        found = scores.new_zeros(scores.shape[0], len(self.k)).index_add_(0, pos.rows, inside)
        reach = torch.minimum(ks[None, :], pos.count[:, None].to(scores.dtype))
        has_pos = pos.count > 0
        safe = torch.where(has_pos[:, None], reach, torch.ones_like(reach))
        recall = torch.minimum(found, reach) / safe * has_pos[:, None]
        value = recall.mean(1)
        if not need_grad:
            return value, None
        # dvalue/dR(p) (P,), with dL/dvalue_i folded in; min(x, m) passes a gradient at x <= m.
        dfound = (found <= reach) / (safe * len(self.k)) * grad_scale[:, None]
        d_rank = -(dfound[pos.rows] * inside * (1.0 - inside)).sum(1) / self.tau_k
        grad = torch.zeros_like(scores)
        for blk in pair_blocks(scores, pos, exclude, self.pair_budget_mb):
            _, slope = sigmoid_and_slope(blk.d, self.tau)
            scatter_pair_grads(grad, blk, slope.mul_(d_rank[blk.index, None] / self.tau))
        return value, grad
