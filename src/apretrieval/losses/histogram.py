"""Histogram-binned AP of a score matrix and its analytic gradient (triangular kernel).

Notation follows the supplementary material of Revaud et al. (ICCV 2019): M bins with centres
``b_1 = max > ... > b_M = min`` spaced ``Delta = (max - min) / (M - 1)``; each score ``s`` is
soft-assigned to the (at most two) neighbouring bins by a triangular kernel; per bin
``pos_m`` / ``all_m`` are the soft counts of positives / of all items, and

    AP_Q = sum_m P_m * dr_m,   P_m = cumsum(pos)_m / cumsum(all)_m,   dr_m = pos_m / N_pos.

Nothing here builds the ``(Q, M, N)`` soft-assignment tensor: counting is an ``O(Q N)`` scatter
into the two bins each score touches, and the gradient (Eqs. 4-10) is computed analytically per
bin, ``O(Q M)``, then gathered back to the scores, ``O(Q N)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from apretrieval.binning import DEFAULT_NUM_BINS, check_num_bins
from apretrieval.losses._checks import check_pair
from apretrieval.losses.sharp import sharp_ap_and_grad

__all__ = ["ESTIMATORS", "quantized_ap"]

# The paper's AP_Q; with the mid-tie precision (TieAwareAPLoss); per-query bins (``sharp``).
ESTIMATORS = ("plain", "tie_aware", "sharp")


@dataclass(frozen=True)
class _Bins:
    """Histogram geometry and the AP_Q estimator (one of ``ESTIMATORS``)."""

    num_bins: int
    low: float
    high: float
    estimator: str = "plain"

    @property
    def tie_aware(self) -> bool:
        return self.estimator == "tie_aware"

    @property
    def width(self) -> float:
        return (self.high - self.low) / (self.num_bins - 1)


def _make_bins(num_bins: int, score_range: tuple[float, float], estimator: str) -> _Bins:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    num_bins = check_num_bins(num_bins, estimator)
    try:
        low, high = (float(v) for v in score_range)
    except (TypeError, ValueError):
        raise ValueError(f"score_range must be a pair (min, max), got {score_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        raise ValueError(f"score_range must satisfy min < max (finite), got {score_range!r}")
    return _Bins(num_bins, low, high, estimator)


def _ap_and_grad(
    scores: Tensor,
    relevance: Tensor,
    bins: _Bins,
    need_grad: bool,
    exclude: Tensor | None = None,
    grad_scale: Tensor | None = None,
    inplace: bool = False,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """AP_Q per query and its gradient w.r.t. the scores, for one block of queries.

    scores (Q, N) float32/float64 (overwritten when ``inplace``); relevance (Q, N) bool;
    exclude (Q,) int64: for each query, one database column that takes no part (the query
    itself in the batch form); grad_scale (Q,): dL/dAP_Q, folded in per bin before the gather.
    Returns ap (Q,), grad (Q, N) = grad_scale * dAP_Q/dscores or None, has_pos (Q,) bool.
    ``out`` (Q, N): where to write grad; it may be ``scores`` itself (``inplace``), whose
    values are no longer needed once the histograms exist.
    Queries without a positive get AP 0 and zero gradient.
    """
    if bins.estimator == "sharp":
        return sharp_ap_and_grad(scores, relevance, bins, need_grad, exclude, grad_scale, out=out)
    m, width = bins.num_bins, bins.width
    rows = torch.arange(scores.shape[0], device=scores.device)
    if exclude is not None:
        # The excluded item (self, similarity ~1) is moved mid-range before binning, so it
        # does not trigger the out-of-range mask below, and is subtracted again afterwards.
        excl_rel = relevance[rows, exclude]
        excl_score = scores.new_full(rows.shape, (bins.low + bins.high) / 2)
        scores = scores if inplace else scores.clone()
        inplace = True
        scores[rows, exclude] = excl_score
    outside = None
    if need_grad and (scores.max() >= bins.high or scores.min() <= bins.low):
        outside = (scores <= bins.low) | (scores >= bins.high)  # clamped: zero derivative
    # Position on the bin axis: t = 0 at the top centre (max), M - 1 at the bottom (min);
    # clamping puts out-of-range scores fully in the end bin. In-place: one (Q, N) float
    # buffer for t and then frac, one for the bin index (these passes dominate the cost).
    t = scores if inplace else scores.clone()
    t.mul_(-1.0 / width).add_(bins.high / width).clamp_(0.0, m - 1)
    lower = t.floor().clamp_(max=m - 2)  # the higher-score bin of the two a score touches
    frac = t.sub_(lower)  # weight of the next (lower-score) bin
    # One index space for both histograms: [0, M) negatives, [M, 2M) positives.
    idx = lower.add_(relevance, alpha=m).long()
    del lower
    # Bin k receives (1 - frac), bin k + 1 receives frac: counts minus shifted fractions.
    spill = scores.new_zeros(scores.shape[0], 2 * m).scatter_add_(1, idx, frac)
    hist = scores.new_zeros(scores.shape[0], 2 * m)
    hist.scatter_add_(1, idx, scores.new_ones(1, 1).expand_as(frac)).sub_(spill)
    hist[:, 1:] += spill[:, :-1]  # k <= M - 2, so nothing spills from negatives into positives
    n_pos = relevance.sum(1)
    if exclude is not None:
        _remove_items(hist, excl_score, excl_rel, bins)
        n_pos = n_pos - excl_rel.long()
    neg, pos = hist[:, :m], hist[:, m:]
    alls = neg + pos

    n_pos = n_pos.to(scores.dtype)  # the true count, a constant of the ranking
    has_pos = n_pos > 0
    inv_n = torch.where(has_pos, 1.0 / n_pos.clamp(min=1), torch.zeros_like(n_pos))[:, None]
    # Precision at bin m. Plain: everything in bins 1..m counts as ranked before. Tie-aware:
    # the precision in the middle of the tie,
    #   (P_{<m} + (pos_m + 1) / 2) / (A_{<m} + (all_m + 1) / 2).
    a, c = (0.5, 0.5) if bins.tie_aware else (0.0, 0.0)
    num = pos.cumsum(1) - a * pos + c
    den = alls.cumsum(1) - a * alls + c
    nonzero = den > 0
    safe_den = torch.where(nonzero, den, torch.ones_like(den))
    prec = torch.where(nonzero, num / safe_den, torch.zeros_like(den))
    d_rec = pos * inv_n
    ap = (prec * d_rec).sum(1)
    if not need_grad:
        return ap, None, has_pos

    # Per-bin derivatives (Eqs. 8-9): u = dAP/dnum_m, v = dAP/dden_m; through the cumulative
    # sums they reach pos_k / all_k as reverse cumulative sums.
    u = torch.where(nonzero, d_rec / safe_den, torch.zeros_like(den))
    v = -u * prec
    g_pos = prec * inv_n + _rev_cumsum(u) - a * u
    g_all = _rev_cumsum(v) - a * v
    coef = torch.cat([g_all, g_all + g_pos], 1)  # dAP/d(weight) for a negative / a positive
    # Eq. 7: the weight of bin k grows with the score at rate 1/Delta, that of bin k + 1 falls;
    # one gather of the per-bin difference gives d/ds for every score.
    diff = torch.zeros_like(coef)
    diff[:, :-1] = coef[:, :-1] - coef[:, 1:]
    diff *= (grad_scale[:, None] if grad_scale is not None else 1.0) / width
    grad = diff.gather(1, idx) if out is None else torch.gather(diff, 1, idx, out=out)
    if outside is not None:
        grad.masked_fill_(outside, 0.0)
    if exclude is not None:
        grad[rows, exclude] = 0.0
    return ap, grad, has_pos


def _remove_items(hist: Tensor, score: Tensor, rel: Tensor, bins: _Bins) -> None:
    """Subtract one item per row (score (Q,), rel (Q,) bool) from the (Q, 2M) histograms."""
    m = bins.num_bins
    t = ((bins.high - score) / bins.width).clamp(0.0, m - 1)
    lower = t.floor().clamp(max=m - 2)
    frac = (t - lower)[:, None]
    idx = (lower.long() + rel.long() * m)[:, None]
    hist.scatter_add_(1, idx, frac - 1.0).scatter_add_(1, idx + 1, -frac)


def _rev_cumsum(x: Tensor) -> Tensor:
    """Reverse cumulative sum along dim 1: out_k = sum_{m >= k} x_m."""
    return x.flip(1).cumsum(1).flip(1)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Half-precision inputs are accumulated in float32 (bin counts reach thousands).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _QuantizedAPFunction(torch.autograd.Function):
    """quantized_ap with the analytic backward of the supplementary (Eqs. 4-10)."""

    @staticmethod
    def forward(
        ctx: Any, scores: Tensor, relevance: Tensor, bins: _Bins, grad_enabled: bool
    ) -> Tensor:
        s = scores.to(_compute_dtype(scores))
        need = grad_enabled and ctx.needs_input_grad[0]  # grad mode is off inside forward
        ap, grad, _ = _ap_and_grad(s, relevance, bins, need, inplace=False)
        ctx.save_for_backward(grad if grad is not None else s.new_empty(0))
        ctx.in_dtype = scores.dtype
        return ap.to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad_ap: Tensor) -> tuple[Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0:
            return None, None, None, None
        return (grad * grad_ap.to(grad.dtype)[:, None]).to(ctx.in_dtype), None, None, None


def quantized_ap(
    scores: Tensor,
    relevance: Tensor,
    num_bins: int = DEFAULT_NUM_BINS,
    score_range: tuple[float, float] = (-1.0, 1.0),
    *,
    tie_aware: bool = False,
    estimator: str = "plain",
) -> Tensor:
    """Histogram-binned AP per query, differentiable w.r.t. ``scores``.

    scores (Q, N) float, higher = more similar; relevance (Q, N) bool -> AP_Q (Q,).
    Queries without any relevant item get 0 (and no gradient). ``estimator``: ``"plain"``
    (the paper's), ``"tie_aware"`` (also ``tie_aware=True``) or ``"sharp"`` (bins spanning
    each query's own top score to lowest positive, see :mod:`apretrieval.losses.sharp`).
    """
    if tie_aware and estimator != "tie_aware":
        if estimator != "plain":
            raise ValueError(f"tie_aware=True conflicts with estimator={estimator!r}")
        estimator = "tie_aware"
    bins = _make_bins(num_bins, score_range, estimator)
    check_pair(scores, relevance)
    ap: Tensor = _QuantizedAPFunction.apply(scores, relevance.bool(), bins, torch.is_grad_enabled())
    return ap
