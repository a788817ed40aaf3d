"""A sharper AP_Q: per-query bins, mid-tie counts read at each positive's own score.

Exact AP only depends on the items ranked above the lowest positive, yet the paper's bins cover
the whole score range for every query. Here each query gets its own M bins, from its top score
``hi`` down to two bins below its lowest positive ``p``; items further down are dropped (they
cannot change the estimate, see below). On the bin axis

    K = M - 3,   Delta = (hi - p) / K,   t_i = (hi - s_i) / Delta  (clamped to [0, M - 1]),

so the top item sits at t = 0 and the lowest positive at t = K. Triangular soft counts give a
negative histogram n_m and a positive one q_m (as in ``histogram``). For each, the number of
items ranked above the centre of bin m is taken at the middle of the tie and corrected for
the smoothing of the kernels:

    c_m = sum_{k<m} h_k + h_m / 2 - E_m,   E_m = clamp(beta (h_{m+1} - h_{m-1}) / 2, +-h_m / 2).

Soft assignment then linear interpolation blur each item over a kernel of variance 1/3 bin^2,
which inflates a cumulative count by (1/6) x (density slope) to second order: ``beta = 1/6``
removes that (it is most of the remaining low bias, where negatives pile up below the
positives). The clamp keeps c_m within [sum_{k<m} h_k, sum_{k<=m} h_k], so the counts stay
monotone and non-negative and the precision stays in (0, 1]. Positive j reads the cumulative
counts at its own position, C_j = (1 - f_j) c_{k_j} + f_j c_{k_j + 1} (k_j, f_j: its bin and
fraction), and

    P_j = (Cq_j + 1/2) / (Cq_j + Cn_j + 1/2),   AP_Q = mean_j P_j

(its own mid-tie half-count is exactly 1/2 at any position, replaced by a full 1). c_m for
m <= K only involves items with t < K + 2, hence the two bins of margin: dropping the items
below is exact. Everything is O(Q N + Q M): scatters into the histograms, O(M) prefix sums,
gathers back; the gradient is analytic, including the dependence of ``hi`` and ``p`` on the
scores, so it is the true gradient of the value (the estimate is invariant to a positive affine
map of a query's scores, and so its gradient sums to zero along both directions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from apretrieval.binning import SHARP_MIN_BINS

__all__ = ["sharp_ap_and_grad"]

_BETA = 1.0 / 6.0  # half the variance of the two triangular kernels, in bin^2


class _Geometry(Protocol):  # read-only: the histogram's frozen bins satisfy it
    @property
    def num_bins(self) -> int: ...
    @property
    def low(self) -> float: ...
    @property
    def high(self) -> float: ...


def sharp_ap_and_grad(
    scores: Tensor,
    relevance: Tensor,
    bins: _Geometry,
    need_grad: bool,
    exclude: Tensor | None = None,
    grad_scale: Tensor | None = None,
    *,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Sharp AP_Q per query and its gradient w.r.t. the scores, for one block of queries.

    scores (Q, N) float32/float64, clamped to [low, high] of ``bins`` (only the number of
    bins matters otherwise); relevance (Q, N) bool; exclude (Q,) int64: one column per query
    that takes no part; grad_scale (Q,): dL/dAP_Q; ``out`` (Q, N): where to write grad (it
    may be ``scores`` itself, read before). Returns ap (Q,), grad (Q, N) = grad_scale *
    dAP_Q/dscores or None, has_pos (Q,) bool; queries without a positive get 0 and no gradient.
    """
    m = bins.num_bins
    assert m >= SHARP_MIN_BINS, m
    rows = torch.arange(scores.shape[0], device=scores.device)
    s = scores.clamp(bins.low, bins.high)
    outside = (scores < bins.low) | (scores > bins.high)  # clamped: zero derivative
    rel = relevance
    if exclude is not None:
        rel = relevance.clone()
        rel[rows, exclude] = False
        s[rows, exclude] = -math.inf  # never the top score; dropped below
    n_pos = rel.sum(1)
    has_pos = n_pos > 0
    geo = _query_range(s, rel, has_pos, m)
    t = s.sub(geo.hi[:, None]).div_(-geo.width[:, None]).clamp_(0.0, m - 1)
    dropped = t >= m - 1  # at or below the grid's bottom: no part in any count used
    lower = t.floor().clamp_(max=m - 2)
    frac = t - lower
    k = lower.long()
    del lower
    neg, pos = _histograms(k, frac, rel, m)
    c_neg, e_neg = _cumulative(neg)
    c_pos, e_pos = _cumulative(pos)

    # Cumulative counts read at each item's own position (used for the positives only).
    k1 = k + 1
    cq_k, cq_k1 = c_pos.gather(1, k), c_pos.gather(1, k1)
    cn_k, cn_k1 = c_neg.gather(1, k), c_neg.gather(1, k1)
    num = torch.lerp(cq_k, cq_k1, frac).add_(0.5)
    den = torch.lerp(cn_k, cn_k1, frac).add_(num)
    prec = num / den
    relf = rel.to(s.dtype)
    inv_n = torch.where(has_pos, 1.0 / n_pos.clamp(min=1).to(s.dtype), torch.zeros_like(geo.hi))
    ap = (prec * relf).sum(1) * inv_n
    if not need_grad:
        return ap, None, has_pos

    # dAP/dCq_j and dAP/dCn_j for each positive (zero for negatives).
    scale = inv_n if grad_scale is None else inv_n * grad_scale
    a = relf * scale[:, None] / den
    b = -a * prec  # dP/dCn = -P / den
    a += b  # dP/dCq = (1 - P) / den (Cq is in the numerator and the denominator)
    # Through the positions t_j at which the counts are read ...
    g = a * (cq_k1 - cq_k) + b * (cn_k1 - cn_k)
    # ... and through the histograms: per-bin coefficients gathered back per item.
    g_pos = _count_coefficients(_spread(a, k, frac, m), pos, e_pos)
    g_neg = _count_coefficients(_spread(b, k, frac, m), neg, e_neg)
    coef = torch.cat([g_neg, g_pos], 1)
    idx = k + rel.long() * m
    g += coef.gather(1, idx + 1) - coef.gather(1, idx)
    g.masked_fill_(dropped, 0.0)
    # A score clamped to [low, high] has no derivative, whichever role (hi, p) it plays.
    grad = _to_scores(g, t, geo, has_pos, m).masked_fill_(outside, 0.0)
    return ap, (grad if out is None else out.copy_(grad)), has_pos


@dataclass(frozen=True)
class _Range:
    """Per-query grid, all (Q,): top score ``hi`` and its column ``i_hi``, lowest positive
    ``p`` and its column ``i_p``, ``span = hi - p`` (floored), bin ``width``; ``moving``:
    whether ``hi`` and ``p`` move with the scores (a query with a positive, span not floored)."""

    hi: Tensor
    i_hi: Tensor
    p: Tensor
    i_p: Tensor
    span: Tensor
    width: Tensor
    moving: Tensor


def _query_range(s: Tensor, rel: Tensor, has_pos: Tensor, m: int) -> _Range:
    """The grid of each query of s (Q, N), rel (Q, N) bool; queries without a positive get a
    harmless placeholder (their AP and gradient are zeroed)."""
    hi, i_hi = s.max(1)
    p, i_p = s.masked_fill(~rel, math.inf).min(1)
    hi = torch.where(has_pos, hi, torch.zeros_like(hi))
    p = torch.where(has_pos, p, hi - 1.0)
    # A floor keeps Delta > 0 when the lowest positive is the top score (AP_Q then depends on
    # the items tied with it only, and the grid is held fixed).
    floor = 64 * torch.finfo(s.dtype).eps * hi.abs().clamp(min=1.0)
    raw = hi - p
    span = torch.maximum(raw, floor)
    return _Range(hi, i_hi, p, i_p, span, span / (m - 3), has_pos & (raw > floor))


def _histograms(k: Tensor, frac: Tensor, rel: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Triangular soft counts: negatives (Q, M) and positives (Q, M); bin k gets 1 - frac,
    bin k + 1 gets frac. One index space, [0, M) negatives and [M, 2M) positives."""
    idx = k + rel.long() * m
    hist = frac.new_zeros(frac.shape[0], 2 * m)
    hist.scatter_add_(1, idx, 1.0 - frac).scatter_add_(1, idx + 1, frac)
    return hist[:, :m], hist[:, m:]


def _cumulative(h: Tensor) -> tuple[Tensor, Tensor]:
    """Corrected mid-tie cumulative counts c (Q, M) of histogram h (Q, M), and the clamp
    state (Q, M) of the slope correction: 0 inside, +1 / -1 held at +h/2 / -h/2."""
    padded = torch.nn.functional.pad(h, (1, 1))
    raw = (padded[:, 2:] - padded[:, :-2]) * (_BETA / 2)
    half = 0.5 * h
    state = (raw >= half).to(h.dtype) - (raw <= -half).to(h.dtype)
    state[(raw >= half) & (raw <= -half)] = 0.0  # h = 0 and raw = 0: nothing to correct
    corr = torch.minimum(torch.maximum(raw, -half), half)
    return h.cumsum(1) - half - corr, state


def _spread(w: Tensor, k: Tensor, frac: Tensor, m: int) -> Tensor:
    """Adjoint of reading c at (k, frac): per-item weights w (Q, N) -> per-bin (Q, M)."""
    out = w.new_zeros(w.shape[0], m)
    return out.scatter_add_(1, k, w * (1.0 - frac)).scatter_add_(1, k + 1, w * frac)


def _count_coefficients(dc: Tensor, h: Tensor, state: Tensor) -> Tensor:
    """dAP/dh (Q, M) from dAP/dc (Q, M), through c_m = sum_{k<m} h_k + h_m/2 - E_m."""
    free = dc * (state == 0)
    padded = torch.nn.functional.pad(free, (1, 1))
    # Inside the clamp E_m = beta (h_{m+1} - h_{m-1}) / 2; held, E_m = +-h_m / 2.
    d_corr = (padded[:, :-2] - padded[:, 2:]) * (_BETA / 2) + 0.5 * state * dc
    after = dc.flip(1).cumsum(1).flip(1) - dc  # sum over bins m > k
    return after + 0.5 * dc - d_corr


def _to_scores(g: Tensor, t: Tensor, geo: _Range, has_pos: Tensor, m: int) -> Tensor:
    """dAP/ds (Q, N) from dAP/dt (Q, N): directly (-1/Delta) and through hi and p, which set
    the grid: dt_i/dhi = (K - t_i) / span, dt_i/dp = t_i / span."""
    k_low = m - 3
    on = geo.moving.to(g.dtype) / geo.span
    d_hi = (g * (k_low - t)).sum(1) * on
    d_p = (g * t).sum(1) * on
    grad = g.div_(-geo.width[:, None])
    grad.scatter_add_(1, geo.i_hi[:, None], d_hi[:, None])
    grad.scatter_add_(1, geo.i_p[:, None], d_p[:, None])
    return grad.mul_(has_pos[:, None])
