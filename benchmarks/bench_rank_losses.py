"""The rank-based listwise losses (Smooth-AP, SupAP, ROADMAP, Recall@k) forward + backward:
time against the three-matmul floor and memory beyond the inputs; and Smooth-AP side by side
with pytorch-metric-learning's ``SmoothAPLoss`` (a dense B x B x B formulation), when that
optional package is installed (``pip install pytorch-metric-learning``).

    python benchmarks/bench_rank_losses.py [--device cuda] [--sizes 4096 16384] [--dim 2048]
    python benchmarks/bench_rank_losses.py --pml-only          # the side-by-side table alone

Targets: B = 4096, D = 2048, 8 images per class: <= 2.0x the floor and <= 400 MB beyond the
inputs; B = 16384: <= 2.0x and <= 1.5 GB. Against pytorch-metric-learning at B = 512,
D = 128 (contiguous labels, as it requires): >= 100x faster, >= 100x less memory. The
largest B that fits 20 GB is estimated from the measured scaling of each (the dense tensor
grows as B^3; ours as B^2 while the score matrix is held whole, then as B x D), and is
printed as an estimate.

CPU memory is the process's peak resident set (VmHWM, reset once the inputs exist) minus the
resident set then, each (loss, B) in its own process; CUDA memory is
``max_memory_allocated`` above the allocation before the step. The floor is the three
B x B x D products any exact method needs (S = D D^T, G D, G^T D), timed interleaved with
the loss so that a change in load hits both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from apretrieval.losses.ap import APLoss
from apretrieval.losses.recall_at_k import RecallAtKLoss
from apretrieval.losses.smooth_ap import SmoothAPLoss
from apretrieval.losses.supap import RoadmapLoss, SupAPLoss

LOSSES: dict[str, Callable[[], torch.nn.Module]] = {
    "smooth_ap": SmoothAPLoss,
    "sup_ap": SupAPLoss,
    "roadmap": RoadmapLoss,
    "recall_at_k": RecallAtKLoss,
    "ap (reference)": APLoss,
}
PER_CLASS = 8
BUDGET_GB = 20.0


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def inputs(b: int, dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    desc = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1).to(device)
    labels = (torch.arange(b) // PER_CLASS).to(device)  # contiguous classes of 8
    return desc, labels


def pml_smooth_ap() -> Callable | None:
    """pytorch-metric-learning's SmoothAPLoss (temperature 0.01), or None when absent."""
    try:
        from pytorch_metric_learning.losses import SmoothAPLoss as PMLSmoothAP
    except ImportError:
        return None
    return PMLSmoothAP(temperature=0.01)


def measure(step: Callable[[], None], floor: Callable[[], None], device: str, repeats: int):
    """(median time, median floor time, peak MB beyond the inputs) of step()."""
    step()  # warm-up: kernels, thread pools, allocator
    _sync(device)
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mb("VmRSS")
        _reset_peak()
    step()
    _sync(device)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _rss_mb("VmHWM") - base
    times, floors = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        _sync(device)
        t1 = time.perf_counter()
        floor()
        _sync(device)
        times.append(t1 - t0)
        floors.append(time.perf_counter() - t1)
    return statistics.median(times), statistics.median(floors), peak


def run_one(name: str, b: int, dim: int, device: str, repeats: int) -> dict:
    desc, labels = inputs(b, dim, device)
    if name == "pml smooth_ap":
        loss_fn = pml_smooth_ap()
        if loss_fn is None:
            raise SystemExit("pytorch-metric-learning is not installed")
    else:
        loss_fn = LOSSES[name]()

    def step() -> None:
        d = desc.clone().requires_grad_()
        loss_fn(d, labels).backward()

    def floor() -> None:
        s = desc @ desc.T
        _ = s @ desc
        _ = s.T @ desc

    t, t_floor, peak = measure(step, floor, device, repeats)
    return {"time_s": t, "floor_s": t_floor, "peak_mb": peak}


def child(name: str, b: int, args: argparse.Namespace) -> dict | None:
    """One measurement in its own process (separate memory peaks)."""
    cmd = [sys.executable, __file__, "--child", name, str(b), "--dim", str(args.dim)]
    cmd += ["--device", args.device, "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        print(f"<!-- {name} B={b} failed: {tail} -->", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def largest_batch(sizes: list[int], peaks_mb: list[float], power: float) -> float:
    """B at which ``peak = c B^power`` (c fitted on the largest measured size) reaches
    BUDGET_GB: an extrapolation, reported as an estimate."""
    c = peaks_mb[-1] / sizes[-1] ** power
    return (BUDGET_GB * 1024 / c) ** (1 / power)


def table_losses(args: argparse.Namespace) -> None:
    print(
        "| loss | B | D | time (s) | floor: 3 matmuls (s) | time / floor | peak extra (MB) |\n"
        "|---|---|---|---|---|---|---|"
    )
    for b in args.sizes:
        for name in LOSSES:
            r = child(name, b, args)
            if r is None:
                continue
            print(
                f"| {name} | {b} | {args.dim} | {r['time_s']:.3f} | {r['floor_s']:.3f} | "
                f"{r['time_s'] / r['floor_s']:.2f} | {r['peak_mb']:.0f} |",
                flush=True,
            )


def table_pml(args: argparse.Namespace) -> None:
    if pml_smooth_ap() is None:
        print("\n(pytorch-metric-learning not installed: no side-by-side table)")
        return
    dim, b = 128, args.pml_batch
    print(
        f"\nSmooth-AP side by side, D = {dim}, {PER_CLASS} per class (contiguous labels):\n\n"
        "| implementation | B | time (s) | peak extra (MB) |\n|---|---|---|---|"
    )
    sub = argparse.Namespace(**{**vars(args), "dim": dim})
    scaling: dict[str, tuple[list[int], list[float]]] = {}
    for name, sizes in (("pml smooth_ap", [b // 4, b // 2, b]), ("smooth_ap", [b, 4 * b])):
        for size in sizes:
            r = child(name, size, sub)
            if r is None:
                continue
            scaling.setdefault(name, ([], []))
            scaling[name][0].append(size)
            scaling[name][1].append(max(r["peak_mb"], 1e-3))
            print(f"| {name} | {size} | {r['time_s']:.4f} | {r['peak_mb']:.1f} |", flush=True)
    for name, (sizes, peaks) in scaling.items():
        if len(sizes) < 2:
            continue
        power = math.log(peaks[-1] / peaks[0]) / math.log(sizes[-1] / sizes[0])
        # Ours holds the B x B matrix (power ~2) until memory_budget_mb, then chunks (~1).
        est = largest_batch(sizes, peaks, max(power, 1.0))
        print(
            f"\n{name}: peak memory grows as B^{power:.2f} from B = {sizes[0]} to {sizes[-1]}; "
            f"estimated largest B in {BUDGET_GB:g} GB: ~{est:,.0f} (extrapolated)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pml-batch", type=int, default=512)
    ap.add_argument("--pml-only", action="store_true", help="only the side-by-side table")
    ap.add_argument("--no-pml", action="store_true", help="skip the side-by-side table")
    ap.add_argument("--child", nargs=2, metavar=("LOSS", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]), args.dim, args.device,
                                 args.repeats)))  # fmt: skip
        return
    dev = torch.cuda.get_device_name() if args.device == "cuda" else platform.machine()
    print(f"device: {dev}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    if not args.pml_only:
        table_losses(args)
    if not args.no_pml:
        table_pml(args)


if __name__ == "__main__":
    main()
