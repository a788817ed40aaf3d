"""Smooth-AP (Brown et al., "Smooth-AP: Smoothing the Path Towards Large-Scale Image
Retrieval", ECCV 2020): AP with the rank's step function replaced by a sigmoid.

For query i with positives P_i, positive p and every other database item j (j != p, never
the query itself), with d_j = s_ij - s_ip and g(d) = sigmoid(d / tau):

    R(p)  = 1 + sum_{j != p} g(d_j),   R+(p) = 1 + sum_{j in P_i, j != p} g(d_j),
    AP_i  = (1 / |P_i|) sum_{p in P_i} R+(p) / R(p),      loss = 1 - mean_i AP_i

over the queries with a positive. The gradient is analytic: with f = R+ / R,
``df/dd_j = g'(d_j) (1[j in P_i] / R - R+ / R^2)``, which reaches s_ij directly and s_ip
with the opposite sign (d_j moves with both). Cost O(B^2 P) per batch, see ``_pairs``.

The original ranks the query among its own results (it is in its similarity row, as a
positive with similarity 1), which adds about 1 to both ranks. Here the query is not in its
own ranking, as in retrieval evaluation and as in :class:`~apretrieval.losses.APLoss`: the
constant would bias every AP towards 1 (most for queries with few positives) and weaken
their gradients.
"""

from __future__ import annotations

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

__all__ = ["SmoothAPLoss"]


class SmoothAPLoss(RankLoss):
    """Smooth-AP loss ``1 - mean_i AP_i`` with sigmoid temperature ``tau`` (the paper: 0.01).

    Call forms, memory bank, chunking and budgets: see :class:`~apretrieval.losses.ListwiseLoss`
    and :class:`RankLoss`.

    Example:
        >>> import torch
        >>> x = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)  # (B, D)
        >>> SmoothAPLoss(tau=0.01)(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).shape
        torch.Size([])
    """

    def __init__(self, tau: float = 0.01, chunk_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(chunk_size, **kwargs)
        self.tau = check_positive("tau", tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau:g}, chunk_size={self.chunk_size}"

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
        inv_n = 1.0 / pos.count.clamp(min=1).to(scores.dtype)
        value = scores.new_zeros(scores.shape[0])
        grad = torch.zeros_like(scores) if need_grad else None
        for blk in pair_blocks(scores, pos, exclude, self.pair_budget_mb):
            sig, slope = sigmoid_and_slope(blk.d, self.tau)
            rank = sig.sum(1).add_(1.0)
            rank_pos = sig.gather(1, blk.positives).sum(1).add_(1.0)
            value.index_add_(0, blk.rows, rank_pos / rank * inv_n[blk.rows])
            if grad is None:
                continue
            # df/dd_j = g'(d_j) (1[j positive] / R - R+ / R^2), times dL/dAP_i / |P_i|; the
            # slope comes without its 1 / tau. Every item gets the second term, the
            # positives also the first.
            coef = (grad_scale * inv_n)[blk.rows] / self.tau
            at_pos = slope.gather(1, blk.positives).mul_((coef / rank)[:, None])
            w = slope.mul_((-coef * rank_pos / rank**2)[:, None])
            w.scatter_add_(1, blk.positives, at_pos)
            scatter_pair_grads(grad, blk, w)
        return value, grad
