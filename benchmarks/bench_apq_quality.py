"""How closely each AP_Q estimator follows the exact AP, on synthetic retrieval scores.

    python benchmarks/bench_apq_quality.py [--queries 300] [--items 5000] [--seed 0]
        [--bins 20] [--sweep 5 10 20 40] [--demo DIR] [--json out.json]

Per query: positives ~ N(mu_p, 0.15) with mu_p ~ U(0.2, 0.7), negatives ~ N(mu_n, 0.1) with
mu_n ~ U(0.05, 0.15), 5-150 positives among ``--items`` scores, clipped to [-1, 1]. For the
estimators ``plain`` (the paper's), ``tie_aware`` and ``sharp`` of ``quantized_ap`` (bins over
[-1, 1]) it prints, against the exact AP of ``average_precision``: the Pearson correlation over
queries, the mean bias (AP_Q - AP) and the mean and max absolute error. ``--sweep`` repeats the
table for other numbers of bins.

``--demo DIR`` adds the same table on the demo benchmark (``apretrieval demo``'s generator,
default size, generated or reused under DIR) scored by the ImageNet-pretrained demo network
(the network fine-tuning starts from): per query, Medium protocol (easy + hard positives),
junk removed, the query ranking the whole database. Generation and extraction take minutes
(the descriptors are kept under DIR and reused).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from apretrieval import average_precision, quantized_ap
from apretrieval.atomic import atomic_open

ESTIMATORS = ("plain", "tie_aware", "sharp")


def synthetic_scores(
    num_queries: int, num_items: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (Q, N) float64 in [-1, 1] and relevance (Q, N) bool, as in the module docstring."""
    rng = np.random.default_rng(seed)
    mu_p = rng.uniform(0.2, 0.7, num_queries)
    mu_n = rng.uniform(0.05, 0.15, num_queries)
    n_pos = rng.integers(5, 151, num_queries)
    scores = rng.normal(mu_n[:, None], 0.1, (num_queries, num_items))
    rel = np.zeros((num_queries, num_items), dtype=bool)
    for q in range(num_queries):
        cols = rng.choice(num_items, size=n_pos[q], replace=False)
        rel[q, cols] = True
        scores[q, cols] = rng.normal(mu_p[q], 0.15, n_pos[q])
    return torch.from_numpy(np.clip(scores, -1.0, 1.0)), torch.from_numpy(rel)


def agreement(estimate: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """Pearson r, mean bias, mean |error| and max |error| of estimate vs exact, both (Q,)."""
    err = estimate - exact
    return {
        "pearson_r": float(np.corrcoef(estimate, exact)[0, 1]),
        "mean_bias": float(err.mean()),
        "mean_abs_err": float(np.abs(err).mean()),
        "max_abs_err": float(np.abs(err).max()),
    }


def compare(blocks: Sequence[tuple[torch.Tensor, torch.Tensor]], num_bins: int) -> dict[str, dict]:
    """Each estimator's agreement with the exact AP over the queries that have a positive.

    blocks: (scores (Q_b, N_b), relevance (Q_b, N_b)) pairs, their queries pooled."""
    exact = torch.cat([average_precision(s, r) for s, r in blocks])
    ok = ~torch.isnan(exact)
    out = {}
    for name in ESTIMATORS:
        est = torch.cat(
            [quantized_ap(s, r, num_bins, (-1.0, 1.0), estimator=name) for s, r in blocks]
        )
        out[name] = agreement(est[ok].numpy(), exact[ok].numpy())
    return out


def demo_rows(out_dir: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per demo query with a positive: scores (1, N_q) float64 and relevance (1, N_q) bool
    over the database without that query's junk (so N_q varies and queries go one by one)."""
    from apretrieval.data.revisited import RevisitedDataset
    from apretrieval.demo.dataset import prepare_benchmark
    from apretrieval.demo.run import DemoConfig
    from apretrieval.models import build_model
    from apretrieval.pipeline import ExtractionSettings, extract_benchmark

    cfg = DemoConfig()
    bench = prepare_benchmark(out_dir, cfg.benchmark)
    test = RevisitedDataset(bench.name, bench.test_dir)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.backbone, pretrained="imagenet").eval()
    settings = ExtractionSettings(
        scales=cfg.scales, max_side=cfg.eval_max_side, num_workers=0, device="cpu"
    )
    q, d = extract_benchmark(model, test, settings, Path(out_dir) / "pretrained")  # kept
    scores = np.asarray(q, dtype=np.float64) @ np.asarray(d, dtype=np.float64).T
    rows = []
    for i, g in enumerate(test.gnd):
        keep = np.ones(scores.shape[1], dtype=bool)
        keep[np.asarray(g["junk"], dtype=np.int64)] = False
        rel = np.zeros(scores.shape[1], dtype=bool)
        rel[np.asarray(list(g["easy"]) + list(g["hard"]), dtype=np.int64)] = True
        if rel[keep].any():
            rows.append(
                (torch.from_numpy(scores[i, keep])[None], torch.from_numpy(rel[keep])[None])
            )
    return rows


def table(results: dict[str, dict], num_bins: int, what: str) -> str:
    lines = [
        f"| {what}: estimator, {num_bins} bins on [-1, 1] | Pearson r | mean bias | mean abs err | "
        "max abs err |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['pearson_r']:.4f} | {r['mean_bias']:+.4f} | "
            f"{r['mean_abs_err']:.4f} | {r['max_abs_err']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bins", type=int, default=20)
    p.add_argument("--sweep", type=int, nargs="*", default=[], help="more numbers of bins")
    p.add_argument("--demo", metavar="DIR", help="also measure on the demo benchmark (in DIR)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)

    scores, rel = synthetic_scores(args.queries, args.items, args.seed)
    print(
        f"synthetic scores: {args.queries} queries x {args.items} items, seed {args.seed}, "
        f"{int(rel.sum())} positives\n"
    )
    record: dict = {"queries": args.queries, "items": args.items, "seed": args.seed}
    record["synthetic"] = {}
    for m in dict.fromkeys([args.bins, *args.sweep]):
        record["synthetic"][str(m)] = res = compare([(scores, rel)], m)
        print(table(res, m, "synthetic") + "\n")
    if args.demo:
        rows = demo_rows(args.demo)
        print(f"demo benchmark ({args.demo}): {len(rows)} queries, pretrained network\n")
        record["demo"] = {"queries": len(rows)}
        for m in dict.fromkeys([args.bins, *args.sweep]):
            record["demo"][str(m)] = res = compare(rows, m)
            print(table(res, m, "demo") + "\n")
    if args.json:
        with atomic_open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
