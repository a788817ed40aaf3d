"""Listwise Average-Precision losses (histogram-binned AP, triangular kernel).

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

import torch
from torch import Tensor, nn

__all__ = [
    "APLoss",
    "ContrastiveLoss",
    "TieAwareAPLoss",
    "TripletLoss",
    "average_precision",
    "quantized_ap",
]


@dataclass(frozen=True)
class _Bins:
    """Histogram geometry; ``tie_aware`` selects the mid-tie precision (see TieAwareAPLoss)."""

    num_bins: int
    low: float
    high: float
    tie_aware: bool = False

    @property
    def width(self) -> float:
        return (self.high - self.low) / (self.num_bins - 1)


def _make_bins(num_bins: int, score_range: tuple[float, float], tie_aware: bool) -> _Bins:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
    try:
        low, high = (float(v) for v in score_range)
    except (TypeError, ValueError):
        raise ValueError(f"score_range must be a pair (min, max), got {score_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        raise ValueError(f"score_range must satisfy min < max (finite), got {score_range!r}")
    return _Bins(num_bins, low, high, tie_aware)


def _check_finite(name: str, x: Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN/inf value(s)")


def _ap_and_grad(
    scores: Tensor,
    relevance: Tensor,
    bins: _Bins,
    need_grad: bool,
    exclude: Tensor | None = None,
    grad_scale: Tensor | None = None,
    inplace: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """AP_Q per query and its gradient w.r.t. the scores, for one block of queries.

    scores (Q, N) float32/float64 (overwritten when ``inplace``); relevance (Q, N) bool;
    exclude (Q,) int64: for each query, one database column that takes no part (the query
    itself in the batch form); grad_scale (Q,): dL/dAP_Q, folded in per bin before the gather.
    Returns ap (Q,), grad (Q, N) = grad_scale * dAP_Q/dscores or None, has_pos (Q,) bool.
    Queries without a positive get AP 0 and zero gradient.
    """
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
    grad = diff.gather(1, idx)
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
    def forward(ctx, scores: Tensor, relevance: Tensor, bins: _Bins) -> Tensor:  # type: ignore[override]
        s = scores.to(_compute_dtype(scores))
        ap, grad, _ = _ap_and_grad(s, relevance, bins, ctx.needs_input_grad[0], inplace=False)
        ctx.save_for_backward(grad if grad is not None else s.new_empty(0))
        ctx.in_dtype = scores.dtype
        return ap.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_ap: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0:
            return None, None, None
        return (grad * grad_ap.to(grad.dtype)[:, None]).to(ctx.in_dtype), None, None


def quantized_ap(
    scores: Tensor,
    relevance: Tensor,
    num_bins: int = 20,
    score_range: tuple[float, float] = (-1.0, 1.0),
    *,
    tie_aware: bool = False,
) -> Tensor:
    """Histogram-binned AP per query, differentiable w.r.t. ``scores``.

    scores (Q, N) float, higher = more similar; relevance (Q, N) bool -> AP_Q (Q,).
    Queries without any relevant item get 0 (and no gradient).
    """
    bins = _make_bins(num_bins, score_range, tie_aware)
    _check_pair(scores, relevance)
    return _QuantizedAPFunction.apply(scores, relevance.bool(), bins)


def _check_pair(scores: Tensor, relevance: Tensor) -> None:
    if not isinstance(scores, Tensor) or not isinstance(relevance, Tensor):
        raise ValueError("scores and relevance must be torch tensors")
    if scores.dim() != 2:
        raise ValueError(f"scores must be (Q, N), got shape {tuple(scores.shape)}")
    if relevance.shape != scores.shape:
        raise ValueError(
            f"relevance shape {tuple(relevance.shape)} != scores shape {tuple(scores.shape)}"
        )
    if scores.numel() == 0:
        raise ValueError(f"scores is empty, shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    _check_finite("scores", scores)


# --------------------------------------------------------------------------------------------
# The loss on descriptors: S = Q X^T formed in query chunks, gradient accumulated on the fly.


def _positives_per_query(
    query_labels: Tensor, database_labels: Tensor, exclude: Tensor | None
) -> Tensor:
    """Database items sharing each query's label, (Q,) int64, without a Q x N mask; items at
    the ``exclude`` columns (Q,) do not count."""
    uniq, counts = torch.unique(database_labels, return_counts=True)
    pos = torch.searchsorted(uniq, query_labels).clamp(max=len(uniq) - 1)
    n = torch.where(uniq[pos] == query_labels, counts[pos], torch.zeros_like(counts[pos]))
    if exclude is not None:
        n = n - (database_labels[exclude] == query_labels).long()
    return n


def _ap_loss_and_grads(
    queries: Tensor,
    query_labels: Tensor,
    database: Tensor,
    database_labels: Tensor,
    bins: _Bins,
    chunk_size: int,
    self_db: bool,
    need_grad: bool,
    query_index: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """1 - mean AP_Q over queries with a positive; and dL/dqueries, dL/ddatabase.

    queries (Q, D), database (N, D); labels (Q,), (N,). Peak extra memory O(chunk_size * N)
    plus the gradients. ``self_db``: queries *are* the database (batch form): query i does not
    rank item i, and a single gradient (returned as the first one) serves both roles.
    ``query_index`` (Q,) int64: otherwise, the database column each query must not rank.
    """
    dtype = _compute_dtype(queries)
    q, x = queries.to(dtype), database.to(dtype)
    if self_db:
        query_index = torch.arange(q.shape[0], device=q.device)
    n_pos = _positives_per_query(query_labels, database_labels, query_index)
    n_valid = int((n_pos > 0).sum())
    if n_valid == 0:
        raise ValueError(
            "no query has a positive in the database: the AP loss is undefined "
            f"({q.shape[0]} queries, labels e.g. {query_labels[:8].tolist()})"
        )
    gq = torch.zeros_like(q) if need_grad else None
    gx = (gq if self_db else torch.zeros_like(x)) if need_grad else None
    # dL/dAP_q = -1 / n_valid for every query with a positive (the others get no gradient).
    scale = torch.full((min(chunk_size, q.shape[0]),), -1.0 / n_valid, dtype=dtype, device=q.device)
    ap_sum = q.new_zeros(())
    for start in range(0, q.shape[0], chunk_size):
        stop = min(start + chunk_size, q.shape[0])
        s = q[start:stop] @ x.T
        rel = query_labels[start:stop, None] == database_labels[None, :]
        exclude = None if query_index is None else query_index[start:stop]
        ap, g, _ = _ap_and_grad(
            s, rel, bins, need_grad, exclude=exclude, grad_scale=scale[: stop - start], inplace=True
        )
        ap_sum += ap.sum()  # queries without a positive contribute AP 0
        if need_grad:
            # S = Q X^T: dL/dQ = dL/dS X and dL/dX = dL/dS^T Q (Eq. 10).
            gq[start:stop].addmm_(g, x)
            gx.addmm_(g.T, q[start:stop])
            del g
    loss = 1.0 - ap_sum / n_valid
    return loss, gq, (None if self_db else gx)


class _APLossFunction(torch.autograd.Function):
    """Fused forward/backward: the gradient is computed with the loss, chunk by chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, queries, query_labels, database, database_labels, bins, chunk, self_db, query_index
    ):
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        loss, gq, gx = _ap_loss_and_grads(
            queries, query_labels, database, database_labels, bins, chunk, self_db, need,
            query_index,
        )
        ctx.self_db = self_db
        ctx.dtypes = (queries.dtype, database.dtype)
        empty = queries.new_empty(0)
        ctx.save_for_backward(gq if gq is not None else empty, gx if gx is not None else empty)
        return loss.to(queries.dtype)

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        gq, gx = ctx.saved_tensors
        scale = grad_loss.to(gq.dtype) if gq.numel() else grad_loss
        dq = (gq * scale).to(ctx.dtypes[0]) if gq.numel() else None
        dx = (gx * scale).to(ctx.dtypes[1]) if gx.numel() else None
        return dq, None, dx, None, None, None, None, None


def _check_descriptors(name: str, x: Tensor, labels: Tensor) -> None:
    if not isinstance(x, Tensor) or not isinstance(labels, Tensor):
        raise ValueError(f"{name} and its labels must be torch tensors")
    if x.dim() != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name} labels must be ({x.shape[0]},), got shape {tuple(labels.shape)}"
        )
    _check_finite(name, x)


class APLoss(nn.Module):
    """Listwise AP loss: ``1 - mean_q AP_Q(q)`` over the queries that have a positive.

    ``loss_fn(descriptors, labels)``: (B, D), (B,) -> scalar; every item is a query ranking the
    other B - 1 (itself excluded). ``loss_fn(queries, query_labels, database, database_labels)``:
    (Q, D), (Q,), (N, D), (N,) -> scalar; e.g. the batch against a memory bank. When the
    queries are also in the database (batch + bank), ``query_index`` (Q,) int64 gives each
    query's own column, which it does not rank; gradients reach both roles through autograd.
    Descriptors are expected L2-normalised (scores in ``score_range``).

    Memory: the score matrix is formed ``chunk_size`` queries at a time and the gradient is
    accumulated during the forward pass, so peak extra memory is O(chunk_size * N + N * D).
    ``chunk_size=None`` picks about 2M scores per chunk.
    """

    tie_aware = False

    def __init__(
        self,
        num_bins: int = 20,
        score_range: tuple[float, float] = (-1.0, 1.0),
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.bins = _make_bins(num_bins, score_range, self.tie_aware)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.chunk_size = chunk_size

    @property
    def num_bins(self) -> int:
        return self.bins.num_bins

    @property
    def score_range(self) -> tuple[float, float]:
        return (self.bins.low, self.bins.high)

    def extra_repr(self) -> str:
        return (
            f"num_bins={self.num_bins}, score_range={self.score_range}, "
            f"chunk_size={self.chunk_size}"
        )

    def forward(
        self,
        queries: Tensor,
        query_labels: Tensor,
        database: Tensor | None = None,
        database_labels: Tensor | None = None,
        *,
        query_index: Tensor | None = None,
    ) -> Tensor:
        _check_descriptors("descriptors" if database is None else "queries", queries, query_labels)
        if (database is None) != (database_labels is None):
            raise ValueError("pass both database and database_labels, or neither")
        self_db = database is None
        if self_db:
            database, database_labels = queries, query_labels
        else:
            _check_descriptors("database", database, database_labels)
            if database.shape[1] != queries.shape[1]:
                raise ValueError(
                    f"queries have dimension {queries.shape[1]}, database {database.shape[1]}"
                )
        if query_index is not None:
            if self_db:
                raise ValueError("query_index is for the query/database form only")
            query_index = torch.as_tensor(query_index, dtype=torch.long, device=queries.device)
            if query_index.shape != query_labels.shape or (
                len(query_index)
                and (query_index.min() < 0 or query_index.max() >= database.shape[0])
            ):
                raise ValueError(
                    f"query_index must be ({queries.shape[0]},) columns of the database "
                    f"(N={database.shape[0]}), got {query_index.tolist()[:8]}..."
                )
        chunk = self.chunk_size or max(1, (1 << 21) // database.shape[0])
        if self_db:
            # Same tensor for both roles; the Function returns one combined gradient.
            return _APLossFunction.apply(
                queries, query_labels, queries.detach(), database_labels, self.bins, chunk, True,
                None,
            )
        return _APLossFunction.apply(
            queries, query_labels, database, database_labels, self.bins, chunk, False, query_index
        )


class TieAwareAPLoss(APLoss):
    """AP loss where items sharing a bin count as tied.

    The plain AP_Q ranks every item of bin m before every positive of bin m, a pessimistic
    reading of a tie. Here the precision of bin m is taken at the middle of the tie: the
    expected counts ranked before a positive drawn uniformly inside the bin,
    ``P_m = (P_{<m} + (pos_m + 1) / 2) / (A_{<m} + (all_m + 1) / 2)`` (a ratio-of-expectations
    form of tie-aware AP). Perfect separation still gives 1. Same interface as APLoss.
    """

    tie_aware = True


# --------------------------------------------------------------------------------------------
# Baselines the paper compares against.


def _pairwise_labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


class ContrastiveLoss(nn.Module):
    """Contrastive loss on all positive pairs and the hardest negatives of the batch.

    For each anchor: ``0.5 * ||a - p||^2`` for every positive, and
    ``0.5 * max(0, margin - ||a - n||)^2`` for its ``num_hard`` most similar negatives
    (hard-negative mining inside the batch, the batch acting as the mining pool).
    (B, D), (B,) -> scalar mean over the selected pairs.
    """

    def __init__(self, margin: float = 0.7, num_hard: int = 5) -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        if num_hard < 1:
            raise ValueError(f"num_hard must be >= 1, got {num_hard}")
        self.margin, self.num_hard = float(margin), int(num_hard)

    def forward(self, descriptors: Tensor, labels: Tensor) -> Tensor:
        _check_descriptors("descriptors", descriptors, labels)
        dist = torch.cdist(descriptors, descriptors).clamp(min=0)
        pos, neg = _pairwise_labels(labels)
        terms = [0.5 * dist[pos].pow(2)]
        k = min(self.num_hard, int(neg.sum(1).max()))
        if k > 0:
            masked = dist.masked_fill(~neg, float("inf"))
            hard, _ = masked.topk(k, dim=1, largest=False)
            hard = hard[torch.isfinite(hard)]
            terms.append(0.5 * (self.margin - hard).clamp(min=0).pow(2))
        all_terms = torch.cat(terms)
        if all_terms.numel() == 0:
            raise ValueError("batch has no positive nor negative pair")
        return all_terms.mean()


class TripletLoss(nn.Module):
    """Triplet loss with batch-hard mining: ``max(0, margin + d(a, p_hard) - d(a, n_hard))``.

    Anchors without a positive or a negative are skipped. (B, D), (B,) -> scalar.
    """

    def __init__(self, margin: float = 0.1) -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        self.margin = float(margin)

    def forward(self, descriptors: Tensor, labels: Tensor) -> Tensor:
        _check_descriptors("descriptors", descriptors, labels)
        dist = torch.cdist(descriptors, descriptors).clamp(min=0)
        pos, neg = _pairwise_labels(labels)
        ok = pos.any(1) & neg.any(1)
        if not ok.any():
            raise ValueError("no anchor has both a positive and a negative in the batch")
        d_pos = dist.masked_fill(~pos, float("-inf")).amax(1)
        d_neg = dist.masked_fill(~neg, float("inf")).amin(1)
        return (self.margin + d_pos[ok] - d_neg[ok]).clamp(min=0).mean()


# --------------------------------------------------------------------------------------------
# Exact AP (evaluation metric, not differentiable).


def average_precision(scores, relevance):
    """Exact non-interpolated AP per query: mean over positives of precision at their rank.

    scores (Q, N), relevance (Q, N) bool; numpy arrays or torch tensors -> (Q,) of the same
    kind. Ties are broken by a stable sort (database order). Queries without any positive: NaN.
    """
    if isinstance(scores, Tensor):
        _check_pair(scores, relevance)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        rel = relevance.bool().gather(1, order).to(torch.float64)
        hits = rel.cumsum(1)
        ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64, device=rel.device)
        n_pos = rel.sum(1)
        ap = (rel * hits / ranks).sum(1) / n_pos
        return torch.where(n_pos > 0, ap, torch.full_like(ap, float("nan")))
    import numpy as np

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
