"""evaluate_revisited vs the textbook procedure (full argsort per query, then the per-query
official evaluation of each protocol), same inputs, same run.

    python benchmarks/bench_eval.py [--sizes 4993 100000 1004993] [--queries 70]

Ground truth: the real ROxford5k pickle when ``../shared/data/revisited`` is there (70 queries,
realistic easy/hard/junk sizes, indices into the first 4993 items; the rest are distractors,
as in the +R1M setting), else synthetic lists of the same sizes. Scores are float32, tie-free
(a rank transform of Gaussian noise plus a signal on the positives), so both methods must
return identical numbers.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from apretrieval.data.revisited import load_gnd
from apretrieval.evaluation import PROTOCOLS, evaluate_revisited, protocol_sets

GND = Path(__file__).resolve().parents[2] / "shared/data/revisited/gnd_roxford5k.pkl"


def benchmark_gnd(num_queries: int, rng: np.random.Generator) -> tuple[list[dict], str]:
    if GND.exists():
        gnd = load_gnd(GND)["gnd"]
        return [gnd[i % len(gnd)] for i in range(num_queries)], "real ROxford5k"
    out = []
    for _ in range(num_queries):
        idx = rng.permutation(4993)[:150]
        out.append({"easy": idx[:50].tolist(), "hard": idx[50:110].tolist(), "junk": idx[110:]})
    return out, "synthetic (50 easy / 60 hard / 40 junk)"


def make_scores(gnd: list[dict], n: int, rng: np.random.Generator) -> np.ndarray:
    scores = np.empty((len(gnd), n), dtype=np.float32)
    ranks = np.arange(n, dtype=np.float32)  # distinct and exact in float32 below 2**24
    for i, e in enumerate(gnd):
        z = rng.standard_normal(n)
        z[e["easy"]] += 2.5
        z[e["hard"]] += 1.5
        z[e["junk"]] += 1.0
        scores[i, np.argsort(z)] = ranks / n
    return scores


def textbook(scores: np.ndarray, gnd: list[dict], kappas=(1, 5, 10)) -> dict:
    """Full argsort per query (as the official code does), then each protocol's procedure."""
    sums = {p: [0.0, np.zeros(len(kappas)), 0] for p in PROTOCOLS}
    for i, e in enumerate(gnd):
        order = np.argsort(-scores[i])
        for p in PROTOCOLS:
            pos, junk = protocol_sets(e, p)
            if len(pos) == 0:
                continue
            ppos = np.flatnonzero(np.isin(order, pos))
            jpos = np.flatnonzero(np.isin(order, junk))
            ranks = ppos - np.searchsorted(jpos, ppos)  # junk removed from the ranking
            ap = 0.0
            for j, r in enumerate(ranks):
                ap += ((j / r if r else 1.0) + (j + 1) / (r + 1)) / 2 / len(pos)
            last = ranks[-1] + 1
            prec = [np.sum(ranks + 1 <= min(last, k)) / min(last, k) for k in kappas]
            sums[p][0] += ap
            sums[p][1] += prec
            sums[p][2] += 1
    return {
        p: {"mAP": s[0] / s[2], "mP@k": dict(zip(kappas, (s[1] / s[2]).tolist(), strict=True))}
        for p, s in sums.items()
    }


def max_diff(a: dict, b: dict) -> float:
    d = 0.0
    for p in PROTOCOLS:
        d = max(d, abs(a[p]["mAP"] - b[p]["mAP"]))
        d = max(d, *(abs(a[p]["mP@k"][k] - b[p]["mP@k"][k]) for k in a[p]["mP@k"]))
    return d


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4993, 100_000, 1_004_993])
    ap.add_argument("--queries", type=int, default=70)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    gnd, source = benchmark_gnd(args.queries, rng)
    print(
        f"machine: {platform.processor() or platform.machine()}, numpy {np.__version__}; "
        f"gnd: {source}; {args.queries} queries; best of {args.repeats}\n"
    )
    print(
        "| database | full argsort + per-query (s) | evaluate_revisited (s) | speed-up "
        "| max abs diff | Medium mAP |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        scores = make_scores(gnd, n, rng)
        t_ref, ref = timed(lambda s=scores: textbook(s, gnd), args.repeats)
        t_new, new = timed(lambda s=scores: evaluate_revisited(s, gnd), args.repeats)
        diff = max_diff(ref, new)
        print(
            f"| {args.queries} x {n:,} | {t_ref:.3f} | {t_new:.3f} | {t_ref / t_new:.1f}x "
            f"| {diff:.1e} | {100 * new['medium']['mAP']:.2f} |",
            flush=True,
        )
        del scores


if __name__ == "__main__":
    main()
