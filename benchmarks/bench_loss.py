"""APLoss forward+backward: time and peak memory vs the dense (Q, M, N) formulation and the
matrix-product floor. Each (method, B) runs in its own process so peaks do not mix.

    python benchmarks/bench_loss.py [--sizes 1024 4096 16384] [--dim 2048] [--repeats 5]

Peak memory is the process's peak resident set (VmHWM, reset after the inputs exist) minus the
resident set at that moment: what the method needs beyond its inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from apretrieval import APLoss


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")


def dense_loss(desc: torch.Tensor, labels: torch.Tensor, num_bins: int = 20) -> torch.Tensor:
    """The textbook formulation: explicit (B, M, B) triangular soft assignment, autograd."""
    delta = 2.0 / (num_bins - 1)
    centres = torch.linspace(1.0, -1.0, num_bins)
    sims = desc @ desc.T
    b = len(labels)
    not_self = ~torch.eye(b, dtype=torch.bool)
    y = ((labels[:, None] == labels[None]) & not_self).float()
    assign = (1 - (sims.clamp(-1, 1)[:, None] - centres[:, None]).abs() / delta).clamp(min=0)
    assign = assign * not_self[:, None].float()
    hist_pos = torch.einsum("bmn,bn->bm", assign, y)
    hist_all = assign.sum(-1)
    prec = hist_pos.cumsum(1) / hist_all.cumsum(1).clamp(min=1e-12)
    ap = (prec * hist_pos).sum(1) / y.sum(1).clamp(min=1)
    return 1 - ap[y.sum(1) > 0].mean()


def matmul_floor(desc: torch.Tensor) -> None:
    """The three products any exact method needs: S = D D^T, then G D and G^T D."""
    s = desc @ desc.T
    _ = s @ desc
    _ = s.T @ desc


def run_one(method: str, b: int, dim: int, repeats: int) -> dict:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    desc = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1)
    labels = torch.randint(0, max(1, b // 8), (b,), generator=g)
    # "whole": the default (symmetric B x B matrix held when it fits the memory budget);
    # "chunked": the O(chunk B) mode that larger batches use.
    loss_fn = APLoss(num_bins=20, memory_budget_mb=0 if method == "chunked" else 1536)

    def step() -> None:
        d = desc.clone().requires_grad_()
        loss = dense_loss(d, labels) if method == "dense" else loss_fn(d, labels)
        loss.backward()

    step()  # warm-up (thread pools, allocator)
    base = _rss_mb("VmRSS")
    _reset_peak()
    step()
    peak = _rss_mb("VmHWM") - base
    # Time the method and the matmul floor interleaved in this process, so that a change in
    # machine load hits both alike and their ratio stays meaningful.
    times, floors = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        matmul_floor(desc)
        times.append(t1 - t0)
        floors.append(time.perf_counter() - t1)
    return {
        "time_s": statistics.median(times),
        "peak_mb": peak,
        "floor_s": statistics.median(floors),
    }


def dense_fits(b: int, budget_gb: float) -> bool:
    # autograd keeps about six (B, 20, B) float32 tensors alive at once
    return 6 * 20 * b * b * 4 / 1e9 < budget_gb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dense-budget-gb", type=float, default=12.0)
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]), args.dim, args.repeats)))
        return

    def child(method: str, b: int) -> dict | None:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            method,
            str(b),
            "--dim",
            str(args.dim),
            "--repeats",
            str(args.repeats),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"<!-- {method} B={b} failed: {out.stderr.strip().splitlines()[-1:]} -->")
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, 2 threads, D={args.dim}, 20 bins, B/8 classes\n"
    )
    print(
        "| B | APLoss mode | time (s) | peak extra (MB) | floor: 3 matmuls (s) | time / floor "
        "| dense time (s) | dense peak extra (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for b in args.sizes:
        dense = child("dense", b) if dense_fits(b, args.dense_budget_gb) else None
        dense_t = f"{dense['time_s']:.2f}" if dense else "does not fit"
        dense_m = f"{dense['peak_mb']:.0f}" if dense else "-"
        for mode in ("whole", "chunked"):  # side by side, same run
            fast = child(mode, b)
            ratio = f"{fast['time_s'] / fast['floor_s']:.2f}" if fast else "-"
            fast_t = f"{fast['time_s']:.2f}" if fast else "failed"
            fast_m = f"{fast['peak_mb']:.0f}" if fast else "-"
            floor_t = f"{fast['floor_s']:.2f}" if fast else "failed"
            print(
                f"| {b} | {mode} | {fast_t} | {fast_m} | {floor_t} | {ratio} | {dense_t} "
                f"| {dense_m} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
