"""From descriptors (or a score matrix) to per-query results, one block of queries at a time.

Evaluation needs each query's full ranking of the database, not the whole ``(Q, N)`` score
matrix at once: the queries are scored against the database a block of rows at a time
(``block_size x N`` float32; the database is read in chunks, so a memory-mapped R1M never sits
in memory), each block is evaluated (protocol AP and P@k, top-k, AP_Q) and dropped. Per-query
numbers do not depend on the blocking; the means are taken over all queries at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apretrieval.apq_analysis import APQSettings, quantized_ap_per_query
from apretrieval.binning import DEFAULT_NUM_BINS, SHARP_MIN_BINS
from apretrieval.evaluation import (
    PROTOCOLS,
    ProtocolResult,
    as_scores,
    evaluate_revisited_per_query,
    gnd_entries,
    stable_topk,
)
from apretrieval.results import ProtocolMetrics, QueryResult, RetrievalResults

__all__ = [
    "evaluate_descriptors",
    "evaluate_score_blocks",
    "row_blocks",
    "score_blocks",
    "write_results",
]

# Scores held at once when no block size is given: R1M (1M x 4 bytes per query) in blocks of
# 64 queries, a small benchmark in one block.
SCORE_BLOCK_BYTES = 256 * 2**20
# Database rows read per matrix product (a memory map is read chunk by chunk).
DB_CHUNK_ROWS = 65536


def _block_size(block_size: int | None, num_db: int) -> int:
    if block_size is None:
        return max(1, SCORE_BLOCK_BYTES // (4 * max(num_db, 1)))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    return block_size


def score_blocks(
    queries: np.ndarray, database: np.ndarray, block_size: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, scores)`` for consecutive blocks of query rows: inner products of queries
    ``(Q, D)`` with database ``(N, D)`` (may be a memory map) -> ``(b, N)`` float32.

    ``block_size`` None: as many queries as fit in :data:`SCORE_BLOCK_BYTES` of scores.
    """
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"queries {queries.shape} and database {database.shape} must be (Q, D), (N, D)"
        )
    q32 = np.ascontiguousarray(queries, dtype=np.float32)
    n = database.shape[0]
    step = _block_size(block_size, n)
    for start in range(0, q32.shape[0], step):
        block = q32[start : start + step]
        out = np.empty((block.shape[0], n), dtype=np.float32)
        for s in range(0, n, DB_CHUNK_ROWS):
            chunk = np.asarray(database[s : s + DB_CHUNK_ROWS], dtype=np.float32)
            out[:, s : s + chunk.shape[0]] = block @ chunk.T
        yield start, out


def row_blocks(scores: Any, block_size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows)`` blocks of a given ``(Q, N)`` score matrix (numpy or torch)."""
    s = as_scores(scores)
    step = _block_size(block_size, s.shape[1])
    for start in range(0, s.shape[0], step):
        yield start, s[start : start + step]


def evaluate_score_blocks(
    blocks: Iterable[tuple[int, np.ndarray]],
    gnd: Any,
    query_images: Sequence[str],
    *,
    kappas: Sequence[int] = (1, 5, 10),
    topk: int = 100,
    apq: APQSettings | None = None,
) -> tuple[dict[str, ProtocolMetrics], tuple[QueryResult, ...]]:
    """Metrics and per-query results from consecutive ``(start, (b, N) scores)`` blocks.

    gnd: Q per-query ``{"easy", "hard", "junk"}`` dicts (``bbx`` is recorded when present);
    ``query_images``: the Q query image names. A protocol under which no query has a
    positive has no metrics (the results leave it out).
    """
    apq = apq or APQSettings()
    entries = gnd_entries(gnd)
    if len(query_images) != len(entries):
        raise ValueError(f"{len(query_images)} query names for {len(entries)} gnd entries")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
    parts: dict[str, list[ProtocolResult]] = {p: [] for p in PROTOCOLS}
    queries: list[QueryResult] = []
    for start, block in blocks:
        assert start == len(queries), "blocks must be consecutive"
        sub = entries[start : start + block.shape[0]]
        per = evaluate_revisited_per_query(block, sub, kappas)
        ap_q = quantized_ap_per_query(block, sub, apq)
        ap_q_sharp = (
            quantized_ap_per_query(block, sub, apq, estimator="sharp")
            if apq.num_bins >= SHARP_MIN_BINS
            else np.full(len(sub), np.nan)
        )
        exact = per[apq.protocol].ap_exact
        assert exact is not None  # the evaluation always fills it
        for i, entry in enumerate(sub):
            top = stable_topk(block[i], topk)
            bbx = entry.get("bbx")
            queries.append(
                QueryResult(
                    image=str(query_images[start + i]),
                    topk=tuple(int(j) for j in top),
                    topk_scores=tuple(float(v) for v in block[i][top]),
                    ap={p: _finite(per[p].ap[i]) for p in PROTOCOLS},
                    ap_q=_finite(ap_q[i]),
                    bbx=None if bbx is None else tuple(float(v) for v in np.ravel(bbx)),
                    ap_q_sharp=_finite(ap_q_sharp[i]),
                    ap_exact=_finite(exact[i]),  # what AP_Q estimates
                    first_positive={p: _rank(per[p].first_positive, i) for p in PROTOCOLS},
                )
            )
        for p in PROTOCOLS:
            parts[p].append(per[p])
    if len(queries) != len(entries):
        raise ValueError(f"score blocks cover {len(queries)} of {len(entries)} queries")
    merged = {p: ProtocolResult.concatenate(parts[p]) for p in PROTOCOLS}
    metrics = {p: ProtocolMetrics.from_result(r) for p, r in merged.items() if r.num_queries}
    return metrics, tuple(queries)


def _finite(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _rank(ranks: np.ndarray | None, i: int) -> int | None:
    return None if ranks is None or np.isnan(ranks[i]) else int(ranks[i])


def evaluate_descriptors(
    queries: np.ndarray,
    database: np.ndarray,
    gnd: Any,
    query_images: Sequence[str],
    *,
    block_size: int | None = None,
    kappas: Sequence[int] = (1, 5, 10),
    topk: int = 100,
    apq: APQSettings | None = None,
) -> tuple[dict[str, ProtocolMetrics], tuple[QueryResult, ...]]:
    """Rank database ``(N, D)`` by inner product with queries ``(Q, D)`` and evaluate, a
    block of ``block_size`` queries at a time (see :func:`score_blocks`)."""
    blocks = score_blocks(queries, database, block_size)
    return evaluate_score_blocks(blocks, gnd, query_images, kappas=kappas, topk=topk, apq=apq)


def write_results(
    path: str | os.PathLike[str],
    *,
    scores: Any,
    gnd: Any,
    dataset: str,
    root: str | os.PathLike[str],
    database: Sequence[str],
    queries: Sequence[str],
    model: str,
    gnd_file: str | None = None,
    kappas: Sequence[int] = (1, 5, 10),
    topk: int = 100,
    num_bins: int = DEFAULT_NUM_BINS,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a score matrix ``(Q, N)`` and write its results file; returns its content.

    ``database`` / ``queries``: image paths relative to ``root`` (N and Q of them); the query
    ``bbx`` comes from ``gnd``. ``extra`` keys are added at the top level (e.g. settings).
    The typed route is :func:`evaluate_score_blocks` + :meth:`RetrievalResults.save`.
    """
    s = as_scores(scores)
    q, n = s.shape
    if len(database) != n or len(queries) != q:
        raise ValueError(
            f"scores {s.shape} vs {len(queries)} query and {len(database)} database names"
        )
    apq = APQSettings(num_bins=num_bins)
    metrics, rows = evaluate_score_blocks(
        row_blocks(s), gnd, queries, kappas=kappas, topk=topk, apq=apq
    )
    res = RetrievalResults(
        dataset=dataset,
        model=str(model),
        metrics=metrics,
        queries=rows,
        database=tuple(str(d) for d in database),
        root=str(Path(root).resolve()),
        gnd_file=gnd_file or "",
        apq=apq,
    )
    if extra:
        res = RetrievalResults.from_dict({**res.to_dict(), **extra}, "results")
    res.save(path)
    return res.to_dict()
