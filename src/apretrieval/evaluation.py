"""Revisited Oxford/Paris evaluation: exact AP and mP@k of the official protocol, at scale.

The official protocol (Radenović et al., CVPR 2018), per query and per setup:

* Easy: positives = ``easy``; ``junk + hard`` are ignored.
  Medium: positives = ``easy + hard``; ``junk`` ignored.  Hard: positives = ``hard``;
  ``junk + easy`` ignored.  Ignored ("junk") items are removed from the ranking.
* AP by the trapezoid rule: with ``r_k`` the 0-based rank (junk removed) of the k-th positive
  (k = 0, 1, ...), ``AP = sum_k (P_before + P_after) / 2 / n_pos`` where
  ``P_before = k / r_k`` (1 if ``r_k == 0``) and ``P_after = (k + 1) / (r_k + 1)``.
* mP@k: precision at ``min(k, rank of the last positive)`` (1-based, junk removed).
* Queries without a positive are left out of both means.

Ranks follow a stable descending sort of the scores: item ``i`` comes after every item with a
strictly higher score and after every item with the *same* score and a smaller database index.

Speed: only the ranks of the positives and junk matter, so nothing sorts the database.  Each
query makes a few vectorised passes over its row (bucket every score by a monotone linear map,
histogram the buckets) and resolves exactly only the items that share a bucket with a
positive/junk item; see :func:`stable_ranks`.  Queries are independent, so a score matrix can
be evaluated a block of rows at a time and the per-query results concatenated
(:meth:`ProtocolResult.concatenate`).

This module is ranks and metrics only: typed results and the results file are in
:mod:`apretrieval.results`, the AP vs AP_Q analysis in :mod:`apretrieval.apq_analysis`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from apretrieval.data.gnd import index_array, query_sets

__all__ = [
    "PROTOCOLS",
    "ProtocolResult",
    "as_scores",
    "evaluate_protocol",
    "evaluate_revisited",
    "evaluate_revisited_per_query",
    "gnd_entries",
    "protocol_sets",
    "stable_ranks",
    "stable_topk",
]

PROTOCOLS: tuple[str, ...] = ("easy", "medium", "hard")

# Buckets per query for stable_ranks: enough that a bucket holds a handful of items at the
# +1M scale, few enough that the histogram stays cheap.
_MAX_BUCKETS = 1 << 16


# --------------------------------------------------------------------------------------------
# Input handling


def as_scores(scores: Any) -> np.ndarray:
    """(Q, N) numpy view of numpy/torch scores; float16 is widened (exact, keeps ties)."""
    if hasattr(scores, "detach") and hasattr(scores, "cpu"):  # torch tensor, any device
        scores = scores.detach().cpu().numpy()
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be a (num_queries, num_db) array, got shape {s.shape}")
    if s.shape[1] == 0:
        raise ValueError(f"scores has no database column, shape {s.shape}")
    if s.dtype == np.float16 or not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64 if not np.issubdtype(s.dtype, np.floating) else np.float32)
    return s


def gnd_entries(gnd: Any) -> list[Mapping[str, Any]]:
    """The per-query list from either the list itself or the whole pickle dict."""
    if isinstance(gnd, Mapping):
        if "gnd" not in gnd:
            raise ValueError(f"gnd dict has no 'gnd' key (keys: {sorted(gnd)})")
        gnd = gnd["gnd"]
    if not isinstance(gnd, Sequence) or isinstance(gnd, str | bytes):
        raise ValueError(f"gnd must be a list of per-query dicts, got {type(gnd).__name__}")
    return list(gnd)


def protocol_sets(entry: Mapping[str, Any], protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, junk) index arrays of one query's gnd entry under ``protocol``."""
    easy = np.asarray(entry.get("easy", []), dtype=np.int64).reshape(-1)
    hard = np.asarray(entry.get("hard", []), dtype=np.int64).reshape(-1)
    junk = np.asarray(entry.get("junk", []), dtype=np.int64).reshape(-1)
    if protocol == "easy":
        return easy, np.concatenate([junk, hard])
    if protocol == "medium":
        return np.concatenate([easy, hard]), junk
    if protocol == "hard":
        return hard, np.concatenate([junk, easy])
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def _check_kappas(kappas: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(kappas)
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1]
    if not ks or bad:
        raise ValueError(f"kappas must be positive integers, got {kappas!r}")
    return tuple(int(k) for k in ks)


# --------------------------------------------------------------------------------------------
# Ranks without sorting the database


def _sorted_positions(row: np.ndarray, cand: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Position of each of ``items`` in ``cand`` (ascending indices) sorted by (-score, index)."""
    # cand is ascending, so a stable sort on -score breaks ties by database index.
    order = np.argsort(-row[cand], kind="stable")
    pos_of = np.empty(cand.size, dtype=np.int64)
    pos_of[order] = np.arange(cand.size)
    return pos_of[np.searchsorted(cand, items)]


class _Ranker:
    """stable_ranks with reusable (N,) buffers, so a loop over queries allocates nothing big."""

    def __init__(self, n: int, dtype: np.dtype, num_buckets: int | None = None) -> None:
        self.buckets = int(num_buckets or max(1, min(_MAX_BUCKETS, n // 4)))
        # float32 rows are bucketed in float32 (half the memory traffic); others in float64.
        self.ftype = np.float32 if dtype == np.float32 else np.float64
        self.x: np.ndarray = np.empty(n, dtype=self.ftype)
        self.b: np.ndarray = np.empty(n, dtype=np.intp)

    def __call__(self, row: np.ndarray, items: np.ndarray) -> np.ndarray:
        if items.size == 0:
            return np.zeros(0, dtype=np.int64)
        lo = float(row[items].min())  # nothing below the lowest item can outrank an item
        span = float(row.max()) - lo
        nb = self.buckets
        scale = nb / span if span > 0 else math.inf
        if not 0 < scale < float(np.finfo(self.ftype).max) / 4:  # no usable span: exact path
            return _sorted_positions(row, np.flatnonzero(row >= lo), items)
        # Bucket b(s) = trunc(clip((s - lo) * scale + 1, 0, B)): 0 holds everything below lo,
        # and b is non-decreasing in s because each float operation rounds monotonically. So
        # an item in a bucket above b(t) scores > t, one below scores < t, and only the items
        # sharing a bucket with one of `items` need an exact comparison.
        x, b, ft = self.x, self.b, self.ftype
        np.subtract(row, ft(lo), out=x, casting="same_kind")
        x *= ft(scale)
        x += ft(1.0)
        np.clip(x, 0, nb, out=x)
        b[...] = x  # truncation == floor on [0, B]
        hist = np.bincount(b, minlength=nb + 1)
        item_b = b[items]
        is_item_bucket = np.zeros(nb + 1, dtype=bool)
        is_item_bucket[item_b] = True
        # Items outside the item buckets are counted from the histogram; the rest are sorted.
        hist[is_item_bucket] = 0
        above = np.cumsum(hist[::-1])[::-1]  # above[k] = count in buckets >= k
        above = np.append(above[1:], 0)  # -> count in buckets > k
        cand = np.flatnonzero(is_item_bucket[b])
        ranks: np.ndarray = above[item_b] + _sorted_positions(row, cand, items)
        return ranks


def stable_ranks(row: np.ndarray, items: np.ndarray, num_buckets: int | None = None) -> np.ndarray:
    """0-based ranks of ``items`` in the stable descending order of ``row``.

    row (N,) finite scores; items (m,) distinct indices -> (m,) int64, where
    ``rank(i) = #{j : row[j] > row[i]} + #{j < i : row[j] == row[i]}``, i.e. the result equals
    ``argsort(-row, kind="stable")`` inverted at ``items``. Cost: a few vectorised O(N) passes
    plus a sort of the few items that share a score bucket with one of ``items``.
    """
    row = np.asarray(row)
    if row.dtype == np.float16 or not np.issubdtype(row.dtype, np.floating):
        row = row.astype(np.float64)
    items = np.asarray(items, dtype=np.int64)
    return _Ranker(row.shape[0], row.dtype, num_buckets)(row, items)


def stable_topk(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best items of ``row`` (N,), best first, ties by database index."""
    row = np.asarray(row)
    n = row.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k == n:
        return np.argsort(-row, kind="stable")
    # The k-th best value v: everything above v is in, then the first tied ones by index.
    v = row[np.argpartition(-row, k - 1)[k - 1]]
    above = np.flatnonzero(row > v)
    tied = np.flatnonzero(row == v)[: k - above.size]
    cand = np.sort(np.concatenate([above, tied]))
    return cand[np.argsort(-row[cand], kind="stable")]


# --------------------------------------------------------------------------------------------
# Metrics


def _ap_and_precision(
    pos_ranks: np.ndarray, junk_ranks: np.ndarray, kappas: tuple[int, ...]
) -> tuple[float, float, np.ndarray]:
    """Official AP, non-interpolated AP and P@k from full-ranking ranks of the positives and
    junk (0-based)."""
    r = np.sort(pos_ranks)
    # Remove junk from the ranking: each positive moves up by the junk ranked before it.
    r = r - np.searchsorted(np.sort(junk_ranks), r)
    k = np.arange(r.size, dtype=np.float64)
    rf = r.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        before = np.where(r > 0, k / rf, 1.0)
    after = (k + 1.0) / (rf + 1.0)
    ap = float(np.sum((before + after) / 2.0) / r.size)
    ap_exact = float(np.mean(after))  # precision at each positive: what AP_Q estimates
    one_based = r + 1
    last = int(one_based[-1])
    prec = np.array([np.count_nonzero(one_based <= min(last, kk)) / min(last, kk) for kk in kappas])
    return ap, ap_exact, prec


@dataclass(frozen=True)
class ProtocolResult:
    """Per-query results of one protocol: ``ap`` (Q,), ``precision`` (Q, len(kappas)), and
    ``ap_exact`` (Q,), the non-interpolated AP of the same ranking (the official ``ap`` uses
    the trapezoid rule; AP_Q estimates ``ap_exact``), and ``first_positive`` (Q,), the rank
    (1-based, junk removed as for the AP) of the query's best-ranked positive.

    Queries without a positive hold NaN and are left out of ``mAP`` / ``mP``.
    """

    ap: np.ndarray
    precision: np.ndarray
    kappas: tuple[int, ...]
    ap_exact: np.ndarray | None = None
    first_positive: np.ndarray | None = None

    @classmethod
    def concatenate(cls, parts: Sequence[ProtocolResult]) -> ProtocolResult:
        """The results of consecutive query blocks as one (queries in the parts' order)."""
        if not parts:
            raise ValueError("no results to concatenate")
        kappas = parts[0].kappas
        if any(p.kappas != kappas for p in parts):
            raise ValueError(f"results with different kappas: {[p.kappas for p in parts]}")
        exact = [p.ap_exact for p in parts if p.ap_exact is not None]
        first = [p.first_positive for p in parts if p.first_positive is not None]
        return cls(
            np.concatenate([p.ap for p in parts]),
            np.concatenate([p.precision for p in parts]),
            kappas,
            np.concatenate(exact) if len(exact) == len(parts) else None,
            np.concatenate(first) if len(first) == len(parts) else None,
        )

    @property
    def valid(self) -> np.ndarray:
        valid: np.ndarray = ~np.isnan(self.ap)
        return valid

    @property
    def num_queries(self) -> int:
        return int(self.valid.sum())

    @property
    def mAP(self) -> float:
        if self.num_queries == 0:
            raise ValueError("no query has a positive under this protocol: mAP is undefined")
        return float(np.mean(self.ap[self.valid]))

    @property
    def mP(self) -> dict[int, float]:
        if self.num_queries == 0:
            raise ValueError("no query has a positive under this protocol: mP@k is undefined")
        means = self.precision[self.valid].mean(axis=0)
        return {k: float(m) for k, m in zip(self.kappas, means, strict=True)}

    def summary(self) -> dict[str, Any]:
        """``{"mAP": float, "mP@k": {k: float}}``, fractions in [0, 1]."""
        return {"mAP": self.mAP, "mP@k": self.mP}


def evaluate_protocol(
    scores: Any,
    positives: Sequence[Sequence[int]],
    junk: Sequence[Sequence[int]],
    kappas: Sequence[int] = (1, 5, 10),
) -> ProtocolResult:
    """Official AP / P@k per query for explicit positive and junk lists.

    scores (Q, N), higher = more similar; positives/junk: Q index lists each.
    """
    s = as_scores(scores)
    ks = _check_kappas(kappas)
    q, n = s.shape
    if len(positives) != q or len(junk) != q:
        raise ValueError(f"{q} score rows but {len(positives)} positive / {len(junk)} junk lists")
    ap, exact = np.full(q, np.nan), np.full(q, np.nan)
    prec = np.full((q, len(ks)), np.nan)
    ranker = _Ranker(n, s.dtype)
    for i in range(q):
        pos = index_array(positives[i], f"positives[{i}]", n)
        jnk = index_array(junk[i], f"junk[{i}]", n)
        if np.intersect1d(pos, jnk).size:
            raise ValueError(f"query {i}: positives and junk overlap")
        if pos.size == 0:
            continue
        row = _finite_row(s, i)
        ranks = ranker(row, np.concatenate([pos, jnk]))
        ap[i], exact[i], prec[i] = _ap_and_precision(ranks[: pos.size], ranks[pos.size :], ks)
    return ProtocolResult(ap, prec, ks, exact)


def _finite_row(s: np.ndarray, i: int) -> np.ndarray:
    row: np.ndarray = s[i]
    if not np.isfinite(row).all():
        raise ValueError(f"scores row {i} contains NaN/inf values")
    return row


def evaluate_revisited_per_query(
    scores: Any, gnd: Any, kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, ProtocolResult]:
    """Per-query AP / P@k under Easy, Medium and Hard (NaN where a query has no positive).

    scores (Q, N) numpy or torch, higher = more similar; gnd: the official per-query list of
    ``{"easy", "hard", "junk"}`` index lists (or the whole pickle dict).
    """
    s = as_scores(scores)
    entries = gnd_entries(gnd)
    ks = _check_kappas(kappas)
    q, n = s.shape
    if len(entries) != q:
        raise ValueError(f"scores has {q} query rows but gnd has {len(entries)} entries")
    ap = {p: np.full(q, np.nan) for p in PROTOCOLS}
    exact = {p: np.full(q, np.nan) for p in PROTOCOLS}
    first = {p: np.full(q, np.nan) for p in PROTOCOLS}
    prec = {p: np.full((q, len(ks)), np.nan) for p in PROTOCOLS}
    ranker = _Ranker(n, s.dtype)
    for i, entry in enumerate(entries):
        sets = query_sets(entry, i, n)
        union = np.concatenate([sets["easy"], sets["hard"], sets["junk"]])
        if union.size == 0:
            continue
        # One pass over the row serves the three protocols: they only regroup these items.
        ranks = ranker(_finite_row(s, i), union)
        ne, nh = sets["easy"].size, sets["hard"].size
        r = {"easy": ranks[:ne], "hard": ranks[ne : ne + nh], "junk": ranks[ne + nh :]}
        groups = {
            "easy": (r["easy"], np.concatenate([r["junk"], r["hard"]])),
            "medium": (np.concatenate([r["easy"], r["hard"]]), r["junk"]),
            "hard": (r["hard"], np.concatenate([r["junk"], r["easy"]])),
        }
        for p, (pos_r, junk_r) in groups.items():
            if pos_r.size:
                ap[p][i], exact[p][i], prec[p][i] = _ap_and_precision(pos_r, junk_r, ks)
                best = pos_r.min()  # 0-based among all items; junk ranked above it drops out
                first[p][i] = best - np.count_nonzero(junk_r < best) + 1
    return {p: ProtocolResult(ap[p], prec[p], ks, exact[p], first[p]) for p in PROTOCOLS}


def evaluate_revisited(
    scores: Any, gnd: Any, kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, Any]]:
    """mAP and mP@k of the revisited protocol, exactly as the official evaluation.

    scores (Q, N) numpy or torch, higher = more similar; gnd: per-query list of
    ``{"easy", "hard", "junk"}`` (or the pickle dict). Returns
    ``{"easy"|"medium"|"hard": {"mAP": float, "mP@k": {k: float}}}``, fractions in [0, 1].
    Raises ValueError when a protocol has no query with a positive.
    """
    per_query = evaluate_revisited_per_query(scores, gnd, kappas)
    out = {}
    for p, res in per_query.items():
        if res.num_queries == 0:
            raise ValueError(f"no query has a positive under the {p!r} protocol")
        out[p] = res.summary()
    return out
