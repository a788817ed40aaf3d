"""Ranks of the positives, the common step of the rank-based listwise losses.

For query row i, positive p and every database item j (the query itself never), with
``d_j = s_ij - s_ip``, the smooth rank of p is ``R(p) = 1 + sum_{j != p} r(d_j)``. Only the
positives need a rank, so a block of c rows costs ``sum_i |P_i| * N`` evaluations, O(B^2 P)
for a batch, never a (B, B, B) tensor: the (row, positive) pairs are taken in blocks of K,
each a (K, N) matrix of differences whose size ``pair_budget_mb`` bounds.

In a block, the differences at j = p and at the row's excluded column are set to -inf, so
every ``r`` used here (sigmoid, step, ...) gives them weight 0 and slope 0: no mask is needed.
A row has few positives, so what concerns them only (R+, their share of R) is read at their
columns, a (K, P) gather, instead of a (K, N) relevance mask: the (K, N) passes, which set
the cost, are only those that every item needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from apretrieval.losses.ap import DEFAULT_MEMORY_BUDGET_MB, ListwiseLoss

__all__ = ["PairBlock", "RankLoss", "pair_blocks", "scatter_pair_grads"]

_BUFFERS = 5  # (K, N) temporaries a loss holds at once: differences, weights, relevance, ...


@dataclass
class Positives:
    """The positives of a block of rows: relevance without the excluded column (c, N) bool,
    each row's count (c,) int64, the pairs' rows and columns (P,) int64 (row-major), and each
    row's positive columns (c, max count), padded with -1."""

    relevance: Tensor
    count: Tensor
    rows: Tensor
    cols: Tensor
    padded: Tensor


def positives(relevance: Tensor, exclude: Tensor | None) -> Positives:
    rel = relevance
    if exclude is not None:
        rel = relevance.clone()
        rel[torch.arange(rel.shape[0], device=rel.device), exclude] = False
    rows, cols = rel.nonzero(as_tuple=True)
    count = rel.sum(1)
    slot = torch.arange(rows.shape[0], device=rel.device) - (count.cumsum(0) - count)[rows]
    width = max(1, int(count.max())) if rows.numel() else 1
    padded = torch.full((rel.shape[0], width), -1, dtype=torch.long, device=rel.device)
    padded[rows, slot] = cols
    return Positives(rel, count, rows, cols, padded)


@dataclass
class PairBlock:
    """K (row, positive) pairs: ``index`` their slice of the pairs, ``rows``/``cols`` (K,),
    ``d`` (K, N) the differences s_ij - s_ip (-inf at j = p and at the excluded column) and
    ``positives`` (K, P): the columns of the row's positives, padded with p itself (where
    d = -inf, so a padded entry reads weight 0 and slope 0)."""

    index: slice
    rows: Tensor
    cols: Tensor
    d: Tensor
    positives: Tensor


def pair_blocks(
    scores: Tensor, pos: Positives, exclude: Tensor | None, budget_mb: float
) -> Iterator[PairBlock]:
    """The pairs of ``pos`` in blocks whose (K, N) temporaries fit in ``budget_mb`` MiB."""
    n = scores.shape[1]
    k = max(1, int(budget_mb * 2**20) // (_BUFFERS * n * scores.element_size()))
    for a in range(0, pos.rows.shape[0], k):
        b = min(a + k, pos.rows.shape[0])
        r, p = pos.rows[a:b], pos.cols[a:b]
        lane = torch.arange(b - a, device=scores.device)
        d = scores.index_select(0, r)
        d.sub_(d[lane, p][:, None])
        d[lane, p] = -math.inf
        if exclude is not None:
            d[lane, exclude[r]] = -math.inf
        pc = pos.padded[r]
        yield PairBlock(slice(a, b), r, p, d, torch.where(pc < 0, p[:, None], pc))


def scatter_pair_grads(grad: Tensor, block: PairBlock, w: Tensor) -> None:
    """Add dvalue/dd (K, N) of each pair to grad (c, N): d = s_ij - s_ip moves with s_ij (+w)
    and with s_ip (-sum_j w)."""
    grad.index_add_(0, block.rows, w)
    grad.index_put_((block.rows, block.cols), -w.sum(1), accumulate=True)


def sigmoid_and_slope(d: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """g = sigmoid(d / tau) and ``tau`` x its derivative w.r.t. d, g (1 - g) (callers fold
    the 1 / tau into their per-pair coefficients: one pass less); ``d`` is overwritten."""
    sig = torch.sigmoid(d.div_(tau))
    return sig, torch.addcmul(sig, sig, sig, value=-1.0, out=d)


def check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


class RankLoss(ListwiseLoss):
    """A listwise loss computed from the smooth ranks of the positives (see the module).

    ``pair_budget_mb`` (MiB) bounds the (K, N) temporaries of a block of pairs; the call
    forms, ``chunk_size``, ``normalize`` and ``memory_budget_mb`` are those of
    :class:`ListwiseLoss`.
    """

    def __init__(
        self,
        chunk_size: int | None = None,
        *,
        normalize: bool = False,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
        pair_budget_mb: float = 64.0,
    ) -> None:
        super().__init__(chunk_size, normalize=normalize, memory_budget_mb=memory_budget_mb)
        self.pair_budget_mb = check_positive("pair_budget_mb", pair_budget_mb)

    def _scale_note(self) -> str:
        return "the temperatures are set for cosine scores"
