"""SupAP and ROADMAP (Ramzi et al., "Robust and Decomposable Average Precision for Image
Retrieval", NeurIPS 2021).

SupAP keeps the exact rank among the positives and smooths it among the negatives only, with
a surrogate that upper-bounds the step and keeps a gradient for well-ranked negatives. For
query i, positive p, d = s_ij - s_ip (j != p, never the query itself):

    r+(d) = 1[d >= 0]                                   (positives j; no gradient)
    r-(d) = sigmoid(d / tau)                 d <= 0      (negatives j)
          = start + sigmoid(d / tau)         0 < d <= delta
          = rho (d - delta) + offset         d > delta,  offset = start + sigmoid(delta / tau)
    R+(p) = 1 + sum_{j in P_i, j != p} r+(d_j),  R(p) = R+(p) + sum_{j negative} r-(d_j),
    AP_i  = (1 / |P_i|) sum_p R+(p) / R(p),      loss = 1 - mean_i AP_i.

ROADMAP adds a calibration term on the scores themselves (``RoadmapLoss``):
``w * (mean of (pos_margin - s)+ over the positive pairs where it is non-zero + mean of
(s - neg_margin)+ over the negative pairs where it is non-zero)``, the recipe's w = 1,
margins 0.9 / 0.6. Its normalisers are counts over the whole batch, read in one more pass
over the scores (``_row_totals``) before the gradients are formed.

The original ranks the query among its own results (a constant +1 in R+ and R); here the
query is not in its own ranking, as in retrieval evaluation and in ``APLoss``, since the
constant biases AP upwards, most for queries with few positives.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from apretrieval.losses._pairs import (
    Positives,
    RankLoss,
    check_positive,
    pair_blocks,
    positives,
    scatter_pair_grads,
)

__all__ = ["RoadmapLoss", "SupAPLoss"]


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class SupAPLoss(RankLoss):
    """SupAP loss ``1 - mean_i AP_i`` (see the module; ROADMAP's defaults).

    ``offset=None``: ``start + sigmoid(delta / tau)``, which makes r- continuous at delta.
    Call forms, memory bank, chunking and budgets: see :class:`~apretrieval.losses.ListwiseLoss`.
    """

    def __init__(
        self,
        tau: float = 0.01,
        rho: float = 100.0,
        delta: float = 0.05,
        start: float = 0.5,
        offset: float | None = None,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(chunk_size, **kwargs)
        self.tau = check_positive("tau", tau)
        self.rho = _finite("rho", rho)
        if self.rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho!r}")
        self.delta = _finite("delta", delta)
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta!r}")
        self.start = _finite("start", start)
        if offset is None:
            offset = self.start + 1.0 / (1.0 + math.exp(-self.delta / self.tau))
        self.offset = _finite("offset", offset)

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau:g}, rho={self.rho:g}, delta={self.delta:g}, start={self.start:g}, "
            f"offset={self.offset:g}, chunk_size={self.chunk_size}"
        )

    def _negative_rank(self, d: Tensor) -> tuple[Tensor, Tensor]:
        """r-(d) and ``tau`` x its slope (K, N) (callers fold the 1 / tau into their
        coefficients); the slope overwrites ``d``."""
        far = d > self.delta
        sig = (d / self.tau).sigmoid_()
        r = sig.add(d > 0, alpha=self.start)
        r = torch.where(far, d.sub(self.delta).mul_(self.rho).add_(self.offset), r)
        slope = torch.addcmul(sig, sig, sig, value=-1.0, out=d)
        return r, slope.masked_fill_(far, self.rho * self.tau)

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
            # R+ from the positives' columns; R = R+ + r- summed over every item but them.
            d_pos = blk.d.gather(1, blk.positives)
            rank_pos = (d_pos >= 0).sum(1).to(scores.dtype).add_(1.0)
            r, slope = self._negative_rank(blk.d)
            rank = r.sum(1).sub_(r.gather(1, blk.positives).sum(1)).add_(rank_pos)
            del r
            value.index_add_(0, blk.rows, rank_pos / rank * inv_n[blk.rows])
            if grad is None:
                continue
            # Only the negatives carry a gradient: df/dd_j = -R+ / R^2 * r-'(d_j).
            coef = -(grad_scale * inv_n)[blk.rows] * rank_pos / (rank**2 * self.tau)
            w = slope.mul_(coef[:, None]).scatter_(1, blk.positives, 0.0)
            scatter_pair_grads(grad, blk, w)
        return value, grad


class RoadmapLoss(SupAPLoss):
    """ROADMAP: SupAP + ``calibration_weight`` x the calibration term (see the module).

    The per-query value is AP_i minus that query's share of the calibration term, so the
    listwise machinery (chunks, memory bank, multistage, distributed) is unchanged; a query
    without a positive still contributes its negative pairs' calibration.
    """

    needs_totals = True

    def __init__(
        self,
        tau: float = 0.01,
        rho: float = 100.0,
        delta: float = 0.05,
        start: float = 0.5,
        offset: float | None = None,
        chunk_size: int | None = None,
        *,
        calibration_weight: float = 1.0,
        pos_margin: float = 0.9,
        neg_margin: float = 0.6,
        **kwargs: Any,
    ) -> None:
        super().__init__(tau, rho, delta, start, offset, chunk_size, **kwargs)
        self.calibration_weight = _finite("calibration_weight", calibration_weight)
        if self.calibration_weight < 0:
            raise ValueError(f"calibration_weight must be >= 0, got {calibration_weight!r}")
        self.pos_margin = _finite("pos_margin", pos_margin)
        self.neg_margin = _finite("neg_margin", neg_margin)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, calibration_weight={self.calibration_weight:g}, "
            f"pos_margin={self.pos_margin:g}, neg_margin={self.neg_margin:g}"
        )

    def _hinges(
        self, scores: Tensor, relevance: Tensor, exclude: Tensor | None
    ) -> tuple[Tensor, Tensor, Positives]:
        """Hinge terms (c, N) of the positive and the negative pairs (0 elsewhere and at the
        excluded column) and the rows' positives (with the exclusion)."""
        pos = positives(relevance, exclude)
        neg = ~relevance
        if exclude is not None:
            neg[torch.arange(neg.shape[0], device=neg.device), exclude] = False
        hinge_pos = (self.pos_margin - scores).clamp_(min=0.0).mul_(pos.relevance)
        hinge_neg = (scores - self.neg_margin).clamp_(min=0.0).mul_(neg)
        return hinge_pos, hinge_neg, pos

    def _row_totals(self, scores: Tensor, relevance: Tensor, exclude: Tensor | None) -> Tensor:
        """[non-zero positive terms, non-zero negative terms, queries with a positive]."""
        hinge_pos, hinge_neg, pos = self._hinges(scores, relevance, exclude)
        counts = [(hinge_pos > 0).sum(), (hinge_neg > 0).sum(), (pos.count > 0).sum()]
        return torch.stack(counts).to(scores.dtype)

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
        assert totals is not None  # needs_totals: the machinery passes them
        hinge_pos, hinge_neg, _ = self._hinges(scores, relevance, exclude)
        value, grad = super()._rows(scores, relevance, exclude, need_grad, grad_scale)
        n_pos_terms, n_neg_terms, n_valid = (float(t) for t in totals)
        inv_p = 1.0 / n_pos_terms if n_pos_terms else 0.0
        inv_q = 1.0 / n_neg_terms if n_neg_terms else 0.0
        w = self.calibration_weight * n_valid  # loss = 1 - sum(value) / n_valid
        value -= w * (hinge_pos.sum(1) * inv_p + hinge_neg.sum(1) * inv_q)
        if grad is not None:
            # d(hinge)/ds: -1 on a positive pair with a non-zero term, +1 on such a negative.
            slope = (hinge_neg > 0).to(scores.dtype).mul_(inv_q)
            slope.sub_((hinge_pos > 0).to(scores.dtype).mul_(inv_p))
            grad.sub_(slope.mul_((w * grad_scale)[:, None]))
        return value, grad
