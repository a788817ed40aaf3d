"""How closely AP_Q, the quantized AP that training optimises, follows the exact AP.

The AP loss replaces the ranking by a histogram: every score is soft-assigned to ``num_bins``
bins spread over ``score_range`` (:func:`apretrieval.losses.histogram.quantized_ap`). Positives that
share a bin with negatives count as tied with them, so on real rankings AP_Q tends to sit below
the exact AP; the supplementary's Fig. 1 plots one against the other per query and
reports a Pearson correlation of ~0.98 on RParis (Medium protocol, M = 20 bins).

The comparison here ranks what the official evaluation ranks: per query, the junk of the chosen
protocol is removed before either AP is computed. Two exact APs can stand beside AP_Q: the
official one (:func:`ap_vs_quantized_ap`, trapezoid rule) and the non-interpolated one
(:func:`exact_ap_per_query`), which is what AP_Q estimates: the trapezoid rule averages the
precision just before and just after each positive, which lowers a positive at rank 2 behind
one negative from 1/2 to 1/4, so measured against the official AP a faithful estimator would
look biased high.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from apretrieval.binning import DEFAULT_NUM_BINS, check_num_bins
from apretrieval.data.gnd import query_sets
from apretrieval.evaluation import (
    PROTOCOLS,
    as_scores,
    evaluate_revisited_per_query,
    gnd_entries,
    protocol_sets,
)
from apretrieval.losses.histogram import quantized_ap

__all__ = [
    "APComparison",
    "APQSettings",
    "ap_vs_quantized_ap",
    "exact_ap_per_query",
    "pearson",
    "quantized_ap_per_query",
]


@dataclass(frozen=True)
class APQSettings:
    """The AP_Q of the analysis: protocol whose positives/junk apply, bins and score range.

    The defaults are the paper's: Medium protocol, 20 bins over cosine similarities [-1, 1].
    """

    protocol: str = "medium"
    num_bins: int = DEFAULT_NUM_BINS
    score_range: tuple[float, float] = (-1.0, 1.0)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        object.__setattr__(self, "num_bins", check_num_bins(self.num_bins))
        lo, hi = (float(v) for v in self.score_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"score_range must be finite (low, high), got {self.score_range!r}")
        object.__setattr__(self, "score_range", (lo, hi))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two (n,) arrays; NaN if n < 2 or one of them is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x {x.shape} and y {y.shape} must be equal 1-D shapes")
    if x.size < 2:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / den if den > 0 else math.nan


@dataclass(frozen=True)
class APComparison:
    """Exact (official) AP and quantized AP per query, and their Pearson correlation."""

    ap: np.ndarray  # (Q,), NaN for queries without a positive
    ap_q: np.ndarray  # (Q,), NaN likewise
    pearson: float
    settings: APQSettings = field(default_factory=APQSettings)


def _protocol_rows(scores: Any, gnd: Any, protocol: str) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Per query with a positive under ``protocol``: (index, scores (1, N'), relevance (1, N'))
    of its ranking with the protocol's junk removed (as the official evaluation ranks it)."""
    s = as_scores(scores)
    entries = gnd_entries(gnd)
    q, n = s.shape
    if len(entries) != q:
        raise ValueError(f"scores has {q} query rows but gnd has {len(entries)} entries")
    for i, entry in enumerate(entries):
        pos, junk = protocol_sets(query_sets(entry, i, n), protocol)
        if pos.size == 0:
            continue
        keep = np.ones(n, dtype=bool)
        keep[junk] = False
        rel = np.zeros(n, dtype=bool)
        rel[pos] = True
        row = torch.from_numpy(np.ascontiguousarray(s[i][keep], dtype=np.float64))[None]
        yield i, row, torch.from_numpy(rel[keep])[None]


def quantized_ap_per_query(
    scores: Any, gnd: Any, settings: APQSettings | None = None, estimator: str = "plain"
) -> np.ndarray:
    """AP_Q per query, junk of ``settings.protocol`` removed -> (Q,), NaN without a positive.

    scores (Q, N) numpy or torch; gnd: Q per-query ``{"easy", "hard", "junk"}`` dicts (or the
    pickle dict). Rows are evaluated one at a time, so ``scores`` may be one block of queries
    with the matching slice of ``gnd``. ``estimator``: that of :func:`quantized_ap`.
    """
    settings = settings or APQSettings()
    out = np.full(len(gnd_entries(gnd)), np.nan)
    for i, row, rel in _protocol_rows(scores, gnd, settings.protocol):
        value = quantized_ap(row, rel, settings.num_bins, settings.score_range, estimator=estimator)
        out[i] = float(value[0])
    return out


def exact_ap_per_query(scores: Any, gnd: Any, protocol: str = "medium") -> np.ndarray:
    """Non-interpolated AP per query (the quantity AP_Q estimates), junk of ``protocol``
    removed -> (Q,), NaN without a positive. Ties: database order, as the official ranking.

    The evaluation's own pass (:func:`evaluate_revisited_per_query`), which ranks only the
    positives and junk and keeps both APs of that ranking.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    result = evaluate_revisited_per_query(scores, gnd)[protocol]
    assert result.ap_exact is not None  # the evaluation always fills it
    return result.ap_exact


def ap_vs_quantized_ap(
    scores: Any,
    gnd: Any,
    protocol: str = "medium",
    num_bins: int = DEFAULT_NUM_BINS,
    score_range: tuple[float, float] = (-1.0, 1.0),
) -> APComparison:
    """Per-query official AP vs AP_Q (``quantized_ap``, junk removed) and their correlation.

    scores (Q, N), gnd as :func:`apretrieval.evaluation.evaluate_revisited` takes them.
    """
    settings = APQSettings(protocol, num_bins, score_range)
    s = as_scores(scores)
    entries: Sequence[Mapping[str, Any]] = gnd_entries(gnd)
    exact = evaluate_revisited_per_query(s, entries)[settings.protocol].ap
    ap_q = quantized_ap_per_query(s, entries, settings)
    ok = ~np.isnan(exact)
    return APComparison(exact, ap_q, pearson(exact[ok], ap_q[ok]), settings)
