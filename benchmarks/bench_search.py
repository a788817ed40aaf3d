"""Search at scale: queries/s and memory of exact search (``knn``, faiss flat) and IVF-PQ, and
IVF-PQ recall against exact, on synthetic L2-normalised descriptors.

    python benchmarks/bench_search.py [--sizes 100000 1000000] [--dims 128 2048]
        [--queries 500] [--k 10] [--nprobe 16 64] [--rerank 100] [--workdir DIR] [--keep]

Synthetic data: a mixture of 1000 clusters (each vector ``normalize(c + noise)``, cosine ~0.6 to
its centre), written to ``DIR/db_N_D.npy`` in chunks and memory-mapped, so the database never
has to sit in this process's memory. Queries are noisy copies of random database vectors
(cosine ~0.8 to their source), so each has true near neighbours.

Each (method, N, D) runs in its own process (2 threads for torch and faiss). Memory is sampled
every 20 ms: "extra anon" is the peak anonymous memory (heap, faiss storage) above the process
after imports; "mapped" is the peak of file pages of the memory-mapped database resident in
the process (page cache, reclaimable). Queries/s is over all queries searched in one call
(median of ``--repeats``), after a warm-up search of 20 queries (thread pools; it also pulls the
mapped file into the page cache when it fits). k-recall@k: mean overlap of the top-k with the
exact top-k (``knn``); 1-recall@k: how often the exact nearest neighbour is in the top-k.

``knn`` reads the memory-mapped database block by block; faiss flat copies it into its own
float32 storage (N x D x 4 bytes); IVF-PQ keeps ``m`` bytes per vector (plus its 8-byte id)
and is trained on ``--train-size`` random vectors. "+ exact re-rank of R": the IVF-PQ top R
re-scored exactly against the memory-mapped descriptors (``rerank_candidates``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

THREADS = 2
NUM_CLUSTERS = 1000


# --------------------------------------------------------------------------------------------
# Memory sampling


def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 1024  # MiB
    return out


class PeakMemory:
    """Peak RssAnon / RssFile (MiB) while the block runs, sampled from a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.base = _status()
        self.peak = dict(self.base)
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, v in _status().items():
                self.peak[k] = max(self.peak[k], v)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for k, v in _status().items():
            self.peak[k] = max(self.peak[k], v)

    @property
    def extra_anon_mb(self) -> float:
        return self.peak["RssAnon"] - self.base["RssAnon"]

    @property
    def mapped_mb(self) -> float:
        return self.peak["RssFile"] - self.base["RssFile"]


# --------------------------------------------------------------------------------------------
# Synthetic data


def make_data(workdir: Path, n: int, d: int, num_queries: int, seed: int = 0) -> tuple[Path, Path]:
    """``db_N_D.npy`` (N, D) and ``q_N_D_Q.npy`` (Q, D) float32 unit rows (made once, cached)."""
    import torch

    torch.set_num_threads(THREADS)
    db_path = workdir / f"db_{n}_{d}.npy"
    q_path = workdir / f"q_{n}_{d}_{num_queries}.npy"
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(NUM_CLUSTERS, d, generator=g), dim=1)
    # |noise| = 1.33 -> cosine to the centre 1 / sqrt(1 + 1.33^2) ~ 0.6
    sigma = 1.33 / d**0.5
    if not db_path.exists():
        tmp = db_path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, d))
        step = max(1, (64 << 20) // (4 * d))  # 64 MiB chunks
        for s in range(0, n, step):
            m = min(step, n - s)
            labels = torch.randint(0, NUM_CLUSTERS, (m,), generator=g)
            x = centres[labels] + sigma * torch.randn(m, d, generator=g)
            out[s : s + m] = torch.nn.functional.normalize(x, dim=1).numpy()
        out.flush()
        del out
        os.replace(tmp, db_path)
    if not q_path.exists():
        db = np.load(db_path, mmap_mode="r")
        rows = np.sort(np.random.default_rng(seed).choice(n, num_queries, replace=False))
        src = torch.from_numpy(np.ascontiguousarray(db[rows]))
        # |noise| = 0.75 -> cosine ~0.8 to the source vector
        q = src + (0.75 / d**0.5) * torch.randn(src.shape, generator=g)
        np.save(q_path, torch.nn.functional.normalize(q, dim=1).numpy())
    return db_path, q_path


# --------------------------------------------------------------------------------------------
# One measurement (child process)


def run_child(a: argparse.Namespace) -> list[dict]:
    """Build (for faiss) and search; one result per nprobe for IVF-PQ (one build for all)."""
    import faiss
    import torch

    from apretrieval.faiss_index import IndexConfig, build_index
    from apretrieval.search import knn, rerank_candidates

    torch.set_num_threads(THREADS)
    faiss.omp_set_num_threads(THREADS)
    db = np.load(a.db, mmap_mode="r")
    q = np.load(a.q)
    n, d = db.shape
    results = []
    mem = PeakMemory()
    with mem:
        t0 = time.perf_counter()
        if a.method == "knn":
            index, build_s, index_mb = None, 0.0, 0.0
        else:
            if a.method == "flat":
                cfg = IndexConfig(type="flat")
            else:
                cfg = IndexConfig(
                    type="ivfpq", nlist=a.nlist, m=a.m, nbits=8, train_size=a.train_size
                )
            index = build_index(db, cfg)
            build_s = time.perf_counter() - t0
            # A flat index is its float32 matrix (serialising 8 GB would double the memory).
            index_mb = (
                n * d * 4 / 2**20
                if a.method == "flat"
                else len(faiss.serialize_index(index)) / 2**20
            )

        variants = [(0, 0)]
        if a.method == "ivfpq":
            variants = [(p, r) for p in a.nprobe for r in ([0, a.rerank] if a.rerank else [0])]
        for nprobe, rerank in variants:
            if nprobe:
                faiss.extract_index_ivf(index).nprobe = nprobe

            def search(queries: np.ndarray, rerank: int = rerank) -> np.ndarray:
                if index is None:
                    return knn(queries, db, a.k)[1]
                queries = np.ascontiguousarray(queries)
                if not rerank:
                    return index.search(queries, a.k)[1]
                # Shortlist from the codes, exact scores from the mapped descriptors.
                cand = index.search(queries, max(rerank, a.k))[1]
                return rerank_candidates(queries, db, cand, a.k)[1]

            # Warm-up on a few queries: thread pools, and the page cache of the mapped file.
            search(q[:20])
            times, idx = [], None
            for _ in range(a.repeats):
                t1 = time.perf_counter()
                idx = search(q)
                times.append(time.perf_counter() - t1)
            tag = (f"_p{nprobe}" if nprobe else "") + (f"_r{rerank}" if rerank else "")
            out = a.out.with_name(a.out.stem + tag + ".npy")
            np.save(out, np.asarray(idx, dtype=np.int64))
            results.append(
                {
                    "method": a.method,
                    "n": n,
                    "d": d,
                    "nprobe": nprobe,
                    "rerank": rerank,
                    "build_s": build_s,
                    "index_mb": index_mb,
                    "out": str(out),
                    "qps": len(q) / statistics.median(times),
                }
            )
    for r in results:  # one build, so one memory figure for all nprobe rows
        r["extra_anon_mb"] = mem.extra_anon_mb
        r["mapped_mb"] = mem.mapped_mb
    return results


# --------------------------------------------------------------------------------------------
# Driver


def _child(
    args: argparse.Namespace, method: str, db: Path, q: Path, out: Path, nlist: int = 0, m: int = 0
) -> list[dict]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--db",
        str(db),
        "--q",
        str(q),
        "--out",
        str(out),
        "--k",
        str(args.k),
        "--repeats",
        str(args.repeats),
        "--nlist",
        str(nlist),
        "--m",
        str(m),
        "--train-size",
        str(args.train_size),
        "--rerank",
        str(args.rerank),
        "--nprobe",
        *map(str, args.nprobe),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        print(f"<!-- {method} {db.name} failed (exit {run.returncode}): {tail} -->", flush=True)
        return []
    return json.loads(run.stdout.strip().splitlines()[-1])


def recall(approx: np.ndarray, exact: np.ndarray, k: int) -> tuple[float, float]:
    """(k-recall@k: mean overlap of the top-k sets / k; 1-recall@k: exact top-1 in approx top-k)."""
    overlap = np.mean(
        [len(set(a[:k]) & set(e[:k])) / k for a, e in zip(approx, exact, strict=True)]
    )
    first = np.mean([e[0] in set(a[:k]) for a, e in zip(approx, exact, strict=True)])
    return float(overlap), float(first)


def ivfpq_params(n: int, d: int) -> tuple[int, int]:
    """(nlist, m): about sqrt(N) cells; one PQ code byte per 32 dimensions at 2048-D (64 B per
    vector) and per 8 at 128-D (16 B)."""
    nlist = 1024 if n >= 500_000 else 256
    m = d // 32 if d >= 1024 else d // 8
    return nlist, m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 2048])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--train-size", type=int, default=32768)
    ap.add_argument(
        "--rerank",
        type=int,
        default=100,
        help="also time IVF-PQ + exact re-ranking of its top R (0: off)",
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--methods", nargs="+", default=["knn", "flat", "ivfpq"], choices=["knn", "flat", "ivfpq"]
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/apretrieval-bench-search"))
    ap.add_argument("--keep", action="store_true", help="keep the generated data files")
    ap.add_argument("--child", metavar="METHOD", help=argparse.SUPPRESS)
    for name in ("--db", "--q", "--out"):
        ap.add_argument(name, type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--nlist", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--m", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.method = args.child
        print(json.dumps(run_child(args)))
        return

    import faiss
    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM, "
        f"torch {torch.__version__}, faiss {faiss.__version__}, {THREADS} threads; "
        f"{args.queries} queries, k={args.k}\n"
    )
    print(
        "| N | D | method | build (s) | queries/s | index (MiB) | extra anon (MiB) "
        "| mapped db (MiB) | 10-recall@10 | 1-recall@10 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for d in args.dims:
            t0 = time.perf_counter()
            db, q = make_data(args.workdir, n, d, args.queries)
            gen_s = time.perf_counter() - t0
            exact = None
            rows = []
            for method in args.methods:
                nlist, m = ivfpq_params(n, d) if method == "ivfpq" else (0, 0)
                out = args.workdir / f"idx_{method}_{n}_{d}.npy"
                for r in _child(args, method, db, q, out, nlist, m):
                    r["label"] = {
                        "knn": "knn (torch, exact)",
                        "flat": "faiss flat (exact)",
                        "ivfpq": f"IVF{nlist},PQ{m}x8 nprobe={r['nprobe']}"
                        + (f" + exact re-rank of {r['rerank']}" if r.get("rerank") else ""),
                    }[method]
                    rows.append(r)
                    if exact is None and method != "ivfpq":
                        exact = np.load(r["out"])
            for r in rows:
                rec = ("-", "-")
                if exact is not None:
                    r10, r1 = recall(np.load(r["out"]), exact, args.k)
                    rec = (f"{r10:.3f}", f"{r1:.3f}")
                print(
                    f"| {n} | {d} | {r['label']} | {r['build_s']:.1f} | {r['qps']:.0f} "
                    f"| {r['index_mb']:.0f} | {r['extra_anon_mb']:.0f} | {r['mapped_mb']:.0f} "
                    f"| {rec[0]} | {rec[1]} |",
                    flush=True,
                )
            print(f"<!-- N={n} D={d}: data generated in {gen_s:.0f} s -->", flush=True)
            if not args.keep:
                for p in args.workdir.glob(f"*_{n}_{d}*.npy"):
                    p.unlink()


if __name__ == "__main__":
    main()
