"""GLDv2 retrieval at its scale: ranking the scored test queries against the index and scoring
mAP@100, through a faiss flat index and through the exact chunked knn over a memory-mapped
descriptor file (what ``evaluate --dataset gldv2-retrieval`` does after extraction).

    python benchmarks/bench_gldv2.py [--num-db 761757] [--queries 1129] [--dim 2048]

Descriptors are random unit rows (the ranking cost does not depend on their content), the
database written to a temporary ``.npy`` and read memory-mapped, as the evaluation reads the
index descriptor file; each query gets 20 relevant rows. Both routes must give the same top-100
and the same mAP@100. Prints a markdown table: seconds and peak resident memory per route.
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from apretrieval.gldv2_evaluation import rank_top_k
from apretrieval.map_at_k import average_precision_at_k


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-db", type=int, default=761_757)
    parser.add_argument("--queries", type=int, default=1129)
    parser.add_argument("--dim", type=int, default=2048)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "db.npy"
        db = np.lib.format.open_memmap(path, "w+", np.float32, (args.num_db, args.dim))
        for i in range(0, args.num_db, 65536):  # written in blocks: never all in memory
            block = rng.standard_normal((min(65536, args.num_db - i), args.dim), np.float32)
            db[i : i + block.shape[0]] = block / np.linalg.norm(block, axis=1, keepdims=True)
        db.flush()
        del db
        q = rng.standard_normal((args.queries, args.dim), np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        relevant = [rng.choice(args.num_db, 20, replace=False) for _ in range(args.queries)]
        rows = []
        results = {}
        for search in ("exact", "faiss"):
            mapped = np.load(path, mmap_mode="r")
            t0 = time.perf_counter()
            _, idx, how = rank_top_k(q, mapped, 100, search)
            ap = average_precision_at_k(idx, relevant, 100)
            seconds = time.perf_counter() - t0
            results[search] = (idx, float(np.nanmean(ap)))
            rows.append(f"| {how} | {seconds:.1f} | {_rss_gib():.1f} |")
        same = np.array_equal(results["exact"][0], results["faiss"][0])
    print(
        f"{args.queries} queries x {args.num_db} index rows x {args.dim} dims, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"top-100 identical: {same}; mAP@100 {results['exact'][1]:.6f} / {results['faiss'][1]:.6f}"
    )
    print("| route | seconds (rank + score) | peak RSS so far (GiB) |")
    print("| --- | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
