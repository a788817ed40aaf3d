"""The listwise loss machinery on descriptors, and the AP loss ``1 - mean_q AP_Q(q)``.

A loss of the listwise family (:class:`ListwiseLoss`) is one function of a block of score rows,
``_rows``: (c, N) scores, (c, N) relevance, the column each row must not rank -> the per-query
value (c,) and ``dL/dS`` for the block. Everything else is written once, here. Scores are inner
products of L2-normalised descriptors, ``S = Q X^T`` (Q queries, N database items), formed
``chunk_size`` queries at a time; each block's dL/dS is turned at once into descriptor
gradients (Eq. 10 of Revaud et al.), ``dL/dQ = dL/dS X`` and ``dL/dX = dL/dS^T Q``, so the
backward pass is a rescaling. The batch form may instead hold the symmetric (B, B) matrix whole
(``dL/dX = (G + G^T) X``). The loss is ``1 - sum_q value_q / n_valid`` over the n_valid queries
that have a positive; the memory bank, multistaged and distributed training use any member.

``APLoss``: value = AP_Q, the histogram-binned AP of ``histogram`` (Revaud et al., ICCV 2019).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from apretrieval.binning import DEFAULT_NUM_BINS
from apretrieval.losses._checks import check_descriptors
from apretrieval.losses.histogram import _ap_and_grad, _compute_dtype, _make_bins

__all__ = ["APLoss", "ListwiseLoss", "TieAwareAPLoss"]

# (scores (c, N), relevance (c, N) bool, exclude (c,) int64 | None, need_grad, grad_scale (c,),
#  out (c, N) | None) -> (value (c,), grad (c, N) | None); see ListwiseLoss._rows.
RowFunction = Callable[..., tuple[Tensor, Tensor | None]]


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


def _blocks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


def _totals(
    loss: ListwiseLoss, q: Tensor, ql: Tensor, x: Tensor, xl: Tensor,
    query_index: Tensor | None, chunk_size: int, s: Tensor | None = None,
) -> Tensor | None:  # fmt: skip
    """The loss's batch-wide statistics (``ListwiseLoss._row_totals``) summed over row blocks,
    read from the held matrix ``s`` or from blocks formed again; None when it has none."""
    if not loss.needs_totals:
        return None
    total = None
    for start, stop in _blocks(q.shape[0], chunk_size):
        block = s[start:stop] if s is not None else q[start:stop] @ x.T
        rel = ql[start:stop, None] == xl[None, :]
        exclude = None if query_index is None else query_index[start:stop]
        t = loss._row_totals(block, rel, exclude)
        total = t if total is None else total + t
    return total


def _ap_loss_and_grads(
    queries: Tensor,
    query_labels: Tensor,
    database: Tensor,
    database_labels: Tensor,
    loss: ListwiseLoss,
    chunk_size: int,
    self_db: bool,
    need_grad: bool,
    query_index: Tensor | None = None,
    whole: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """1 - sum of ``loss``'s per-query values / n_valid; and dL/dqueries, dL/ddatabase.

    queries (Q, D), database (N, D); labels (Q,), (N,). Peak extra memory O(chunk_size * N)
    plus the gradients. ``self_db``: queries *are* the database (batch form): query i does not
    rank item i, and a single gradient (returned as the first one) serves both roles.
    ``query_index`` (Q,) int64: otherwise, the database column each query must not rank.
    ``whole`` (batch form only): hold the (B, B) matrix, see ``_whole_batch_loss_and_grad``.
    """
    dtype = _compute_dtype(queries)
    q, x = queries.to(dtype), database.to(dtype)
    if self_db:
        query_index = torch.arange(q.shape[0], device=q.device)
    n_pos = _positives_per_query(query_labels, database_labels, query_index)
    n_valid = int((n_pos > 0).sum())
    if n_valid == 0:
        raise ValueError(
            f"no query has a positive in the database: {type(loss).__name__} is undefined "
            f"({q.shape[0]} queries, labels e.g. {query_labels[:8].tolist()})"
        )
    if self_db and whole:
        value, g = _whole_batch_loss_and_grad(q, query_labels, loss, chunk_size, need_grad, n_valid)
        return value, g, None
    totals = _totals(loss, q, query_labels, x, database_labels, query_index, chunk_size)
    gq = torch.zeros_like(q) if need_grad else None
    gx = (gq if self_db else torch.zeros_like(x)) if need_grad else None
    # dL/dvalue_q = -1 / n_valid for every query (those without a positive get no gradient).
    scale = torch.full((min(chunk_size, q.shape[0]),), -1.0 / n_valid, dtype=dtype, device=q.device)
    value_sum = q.new_zeros(())
    for start, stop in _blocks(q.shape[0], chunk_size):
        s = q[start:stop] @ x.T
        rel = query_labels[start:stop, None] == database_labels[None, :]
        exclude = None if query_index is None else query_index[start:stop]
        value, g = loss._rows(
            s, rel, exclude, need_grad, scale[: stop - start], out=None, totals=totals
        )
        value_sum += value.sum()
        if gq is not None and gx is not None:  # need_grad
            assert g is not None  # _rows returns the gradient when asked for it
            # S = Q X^T: dL/dQ = dL/dS X and dL/dX = dL/dS^T Q (Eq. 10).
            gq[start:stop].addmm_(g, x)
            gx.addmm_(g.T, q[start:stop])
            del g
    result = 1.0 - value_sum / n_valid
    return result, gq, (None if self_db else gx)


def _panels(n: int) -> list[tuple[int, int]]:
    """About 16 row panels [start, stop) of an n x n matrix: the upper triangle costs
    (1 + 1/16) / 2 of the full product, while each product keeps BLAS-sized operands."""
    step = max(128, -(-n // 16))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _symmetric_scores(x: Tensor) -> Tensor:
    """S = X X^T (B, B) from the panels on and right of the diagonal, mirrored below it."""
    s = x.new_empty(x.shape[0], x.shape[0])
    for i, j in _panels(x.shape[0]):
        s[i:j, i:].addmm_(x[i:j], x[i:].T, beta=0)  # beta=0: the empty buffer is not read
        s[j:, i:j] = s[i:j, j:].T
    return s


def _symmetrize_(g: Tensor) -> Tensor:
    """G <- G + G^T in place, one row panel at a time (one panel of extra memory).

    Panel [i, j) reads its row panel and its column panel, which earlier panels (rows and
    columns before i) have not written."""
    for i, j in _panels(g.shape[0]):
        h = g[i:j, i:] + g[i:, i:j].T
        g[i:j, i:] = h
        g[j:, i:j] = h[:, j - i :].T
    return g


def _whole_batch_loss_and_grad(
    x: Tensor, labels: Tensor, loss: ListwiseLoss, chunk_size: int, need_grad: bool, n_valid: int
) -> tuple[Tensor, Tensor | None]:
    """Batch form with the (B, B) matrix held whole: 1 - sum value / n_valid and dL/dX (B, D).

    S = X X^T is symmetric, so only its upper panels are multiplied out (about half of one
    B x B x D product). Each row block of S is overwritten by its dL/dS (G), and
    dL/dX = G X + G^T X = (G + G^T) X is one product. Together about 1.5 products instead of
    the 3 of the chunked form, for B^2 floats of memory.
    """
    s = _symmetric_scores(x)
    self_cols = torch.arange(x.shape[0], device=x.device)
    totals = _totals(loss, x, labels, x, labels, self_cols, chunk_size, s=s)
    value_sum = x.new_zeros(())
    scale = torch.full((min(chunk_size, x.shape[0]),), -1.0 / n_valid, dtype=x.dtype)
    scale = scale.to(x.device)
    for start, stop in _blocks(x.shape[0], chunk_size):
        block = s[start:stop]  # whole rows: contiguous
        rel = labels[start:stop, None] == labels[None, :]
        value, g = loss._rows(
            block, rel, self_cols[start:stop], need_grad, scale[: stop - start],
            out=block if need_grad else None, totals=totals,
        )  # fmt: skip
        if g is not None and g.data_ptr() != block.data_ptr():
            block.copy_(g)
        value_sum += value.sum()
    result = 1.0 - value_sum / n_valid
    return result, (_symmetrize_(s) @ x if need_grad else None)


class _ListwiseFunction(torch.autograd.Function):
    """Fused forward/backward: the gradient is computed with the loss, chunk by chunk."""

    @staticmethod
    def forward(
        ctx: Any,
        queries: Tensor,
        query_labels: Tensor,
        database: Tensor,
        database_labels: Tensor,
        loss: ListwiseLoss,
        chunk: int,
        self_db: bool,
        query_index: Tensor | None,
        grad_enabled: bool,
        whole: bool,
    ) -> Tensor:
        # Grad mode is off inside forward; the caller's mode says whether autograd records us.
        need = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[2])
        value, gq, gx = _ap_loss_and_grads(
            queries, query_labels, database, database_labels, loss, chunk, self_db, need,
            query_index, whole,
        )  # fmt: skip
        ctx.self_db = self_db
        ctx.dtypes = (queries.dtype, database.dtype)
        empty = queries.new_empty(0)
        ctx.save_for_backward(gq if gq is not None else empty, gx if gx is not None else empty)
        return value.to(queries.dtype)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        gq, gx = ctx.saved_tensors
        scale = grad_loss.to(gq.dtype) if gq.numel() else grad_loss
        dq = (gq * scale).to(ctx.dtypes[0]) if gq.numel() else None
        dx = (gx * scale).to(ctx.dtypes[1]) if gx.numel() else None
        return dq, None, dx, None, None, None, None, None, None, None


# The (B, B) score matrix is held whole up to this size (MiB): 1.5 GiB, B up to about 20,000
# in float32. One default for every member of the family.
DEFAULT_MEMORY_BUDGET_MB = 1536.0


class ListwiseLoss(nn.Module):
    """Base of the listwise losses: ``1 - sum_q value_q / n_valid`` over the queries.

    ``loss_fn(descriptors, labels)``: (B, D), (B,) -> scalar; every item is a query ranking the
    other B - 1 (itself excluded). ``loss_fn(queries, query_labels, database, database_labels)``:
    (Q, D), (Q,), (N, D), (N,) -> scalar; e.g. the batch against a memory bank. When the
    queries are also in the database (batch + bank), ``query_index`` (Q,) int64 gives each
    query's own column, which it does not rank; gradients reach both roles through autograd.

    A subclass writes ``_rows`` (and, for a batch-wide statistic, ``_row_totals`` with
    ``needs_totals = True``). Descriptors are expected L2-normalised; rows whose norm is not 1
    (within 1e-3) raise one warning per loss object; ``normalize=True`` L2-normalises the
    inputs first (inside the autograd graph).

    Memory and speed: the gradient is computed with the loss, so backward is a rescaling. The
    batch form holds the (B, B) matrix whole when it fits in ``memory_budget_mb`` (MiB): S is
    symmetric, so only half of it is multiplied out, and dL/dD = (G + G^T) D is one product,
    about 1.5 B x B x D products instead of 3, for B^2 floats. Otherwise (and for the
    query/database form) scores are formed ``chunk_size`` queries at a time: peak extra memory
    O(chunk_size * N + N * D). ``chunk_size=None`` picks about 2M scores per block.
    """

    needs_totals = False  # whether _rows reads batch-wide statistics (one more pass over S)

    def __init__(
        self,
        chunk_size: int | None = None,
        *,
        normalize: bool = False,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    ) -> None:
        super().__init__()
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        if not (isinstance(memory_budget_mb, int | float) and memory_budget_mb >= 0):
            raise ValueError(f"memory_budget_mb must be a number >= 0, got {memory_budget_mb!r}")
        self.normalize, self.memory_budget_mb = bool(normalize), float(memory_budget_mb)
        self._warned = False

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
        """Per-query value (c,) and ``grad_scale[:, None] * dvalue/dscores`` (c, N) or None.

        scores (c, N) float32/float64, which may be overwritten; relevance (c, N) bool;
        exclude (c,) int64: the column each row does not rank (or None); ``out``: where the
        gradient may be written (it may be ``scores``); ``totals``: ``_row_totals`` summed
        over all rows. A query without a positive contributes its value (0 for a ranking
        metric) and no ranking gradient.
        """
        raise NotImplementedError

    def _row_totals(self, scores: Tensor, relevance: Tensor, exclude: Tensor | None) -> Tensor:
        """Batch-wide statistics of a block of rows (summed over blocks); see ``needs_totals``."""
        raise NotImplementedError

    def _scale_note(self) -> str:
        return "their gradients are distorted"

    def _prepare(self, x: Tensor) -> Tensor:
        """L2-normalise (``normalize``) or warn once about rows whose norm is not 1."""
        if self.normalize:
            return nn.functional.normalize(x, dim=1)
        if not self._warned:
            norms = x.detach().float().norm(dim=1)
            # Half-precision rows of unit norm are off by their rounding (bfloat16: ~0.4%).
            if (norms - 1).abs().max() > max(1e-3, 2 * torch.finfo(x.dtype).eps):
                self._warned = True
                warnings.warn(
                    f"{type(self).__name__}: descriptors are not L2-normalised (row norms "
                    f"{float(norms.min()):.3g}..{float(norms.max()):.3g}); "
                    f"{self._scale_note()}. Normalise them or pass normalize=True",
                    stacklevel=3,
                )
        return x

    def forward(
        self,
        queries: Tensor,
        query_labels: Tensor,
        database: Tensor | None = None,
        database_labels: Tensor | None = None,
        *,
        query_index: Tensor | None = None,
    ) -> Tensor:
        check_descriptors("descriptors" if database is None else "queries", queries, query_labels)
        if (database is None) != (database_labels is None):
            raise ValueError("pass both database and database_labels, or neither")
        self_db = database is None
        if database is None or database_labels is None:  # both, checked above
            database, database_labels = queries, query_labels
        else:
            check_descriptors("database", database, database_labels)
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
        grad_enabled = torch.is_grad_enabled()
        queries = self._prepare(queries)
        if self_db:
            # Same tensor for both roles; the Function returns one combined gradient.
            database = queries.detach()
        else:
            database = self._prepare(database)
        n = queries.shape[0]
        itemsize = 8 if queries.dtype == torch.float64 else 4
        whole = self_db and n * n * itemsize <= self.memory_budget_mb * 2**20
        loss: Tensor = _ListwiseFunction.apply(
            queries, query_labels, database, database_labels, self, chunk, self_db,
            query_index, grad_enabled, whole,
        )  # fmt: skip
        return loss


class APLoss(ListwiseLoss):
    """Listwise AP loss: ``1 - mean_q AP_Q(q)`` over the queries that have a positive.

    The call forms, memory and speed are those of :class:`ListwiseLoss`. Scores are expected
    in ``score_range``: a score beyond it sits fully in the end bin and gets an exactly zero
    gradient (descriptors x 10 give a zero gradient almost everywhere).

    ``estimator``: the AP_Q (``"plain"``, the paper's; ``"tie_aware"``; ``"sharp"``, see
    :func:`apretrieval.losses.histogram.quantized_ap`); None: the class's own (plain here).
    """

    tie_aware = False

    def __init__(
        self,
        num_bins: int = DEFAULT_NUM_BINS,
        score_range: tuple[float, float] = (-1.0, 1.0),
        chunk_size: int | None = None,
        estimator: str | None = None,
        *,
        normalize: bool = False,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    ) -> None:
        super().__init__(chunk_size, normalize=normalize, memory_budget_mb=memory_budget_mb)
        if estimator is None:
            estimator = "tie_aware" if self.tie_aware else "plain"
        self.bins = _make_bins(num_bins, score_range, estimator)

    @property
    def num_bins(self) -> int:
        return self.bins.num_bins

    @property
    def score_range(self) -> tuple[float, float]:
        return (self.bins.low, self.bins.high)

    @property
    def estimator(self) -> str:
        return self.bins.estimator

    def extra_repr(self) -> str:
        return (
            f"num_bins={self.num_bins}, score_range={self.score_range}, "
            f"chunk_size={self.chunk_size}, estimator={self.estimator!r}, "
            f"normalize={self.normalize}, memory_budget_mb={self.memory_budget_mb:g}"
        )

    def _scale_note(self) -> str:
        return f"scores outside score_range={self.score_range} get a zero gradient"

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
        ap, g, _ = _ap_and_grad(
            scores, relevance, self.bins, need_grad, exclude=exclude, grad_scale=grad_scale,
            inplace=True, out=out,
        )  # fmt: skip
        return ap, g  # queries without a positive: AP 0


class TieAwareAPLoss(APLoss):
    """AP loss where items sharing a bin count as tied.

    The plain AP_Q ranks every item of bin m before every positive of bin m, a pessimistic
    reading of a tie. Here the precision of bin m is taken at the middle of the tie: the
    expected counts ranked before a positive drawn uniformly inside the bin,
    ``P_m = (P_{<m} + (pos_m + 1) / 2) / (A_{<m} + (all_m + 1) / 2)`` (a ratio-of-expectations
    form of tie-aware AP). Perfect separation still gives 1. Same interface as APLoss.
    """

    tie_aware = True
