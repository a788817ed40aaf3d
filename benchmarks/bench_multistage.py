"""Multistaged backpropagation on CPU: peak memory vs batch size, and step time vs plain backprop.

Targets: at a fixed chunk size, the memory of a training step stays flat from B = 64 to 1024
(at most +15% beyond the (B, D) descriptors themselves); a multistage step costs at most 1.5x a
plain step (the method adds one forward pass without autograd).

Memory: each configuration runs in a fresh process; the step's memory is the peak resident set
during the step (kernel high-water mark, reset just before it) minus the resident set before
it. Images come from per-sample loaders, as in training, so the batch is never held at once
(the plain step must stack it). It is measured with glibc's mmap threshold pinned (the peak
then follows live tensors) and with the default allocator (whose heap keeps freed buffers, so
its numbers depend on allocation history). The loss is built as training builds it.
Time: median of interleaved repeated steps on one pre-built batch tensor.

    python benchmarks/bench_multistage.py [--backbone resnet18] [--size 96] [--chunk 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from apretrieval.models import build_model
from apretrieval.multistage import multistage_backward
from apretrieval.train_config import TrainConfig
from apretrieval.train_setup import make_loss

K = 4  # images per class


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:  # Linux: "5" resets VmHWM, the peak resident set size, to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Image:
    """A deterministic random image produced on demand (stands in for decoding a file)."""

    def __init__(self, i: int, size: int) -> None:
        self.i, self.size = i, size

    def __call__(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.i)
        return torch.rand(3, self.size, self.size, generator=gen)


def _loss(batch_size: int) -> torch.nn.Module:
    """The AP loss exactly as training builds it (20 bins, score blocks bounded in size)."""
    return make_loss(TrainConfig(data="-", batch_size=batch_size, images_per_class=K))


def child(args: argparse.Namespace) -> None:
    """One memory measurement: prints a JSON line."""
    torch.set_num_threads(args.threads)
    model = build_model(args.backbone).train()
    b = args.child_batch
    loss_fn = _loss(b)
    warm = [_Image(i, args.size) for i in range(2 * K)]
    multistage_backward(model, warm, torch.arange(2 * K) // K, loss_fn, args.chunk)  # warm-up
    model.zero_grad(set_to_none=False)  # .grad buffers exist before the step in both modes
    inputs = [_Image(i, args.size) for i in range(b)]
    labels = torch.arange(b) // K
    exact = _reset_peak()
    before = _status_kb("VmRSS")
    if args.child_mode == "multistage":
        multistage_backward(model, inputs, labels, loss_fn, args.chunk)
    else:
        x = torch.stack([f() for f in inputs])
        loss_fn(model(x), labels).backward()
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "before_mb": before / 1024,
                "peak_mb": peak / 1024,
                "step_mb": (peak - before) / 1024,
                "exact": exact,
            }
        )
    )


def measure_memory(args: argparse.Namespace, mode: str, batch: int, pinned: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child-batch",
        str(batch),
        "--child-mode",
        mode,
        "--backbone",
        args.backbone,
        "--size",
        str(args.size),
        "--chunk",
        str(args.chunk),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ)
    if pinned:
        # glibc raises its mmap threshold after large frees, after which freed activation
        # buffers stay in the heap: the RSS high-water mark then reflects allocator history.
        # A fixed threshold returns them to the OS, so the peak tracks live tensors.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_steps(args: argparse.Namespace) -> tuple[float, float]:
    torch.set_num_threads(args.threads)
    model = build_model(args.backbone).train()
    b = args.time_batch
    loss_fn = _loss(b)
    x = torch.stack([_Image(i, args.size)() for i in range(b)])
    labels = torch.arange(b) // K

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), labels).backward()

    def multi() -> None:
        model.zero_grad(set_to_none=True)
        multistage_backward(model, x, labels, loss_fn, args.chunk)

    plain(), multi()  # warm-up
    tp, tm = [], []
    for _ in range(args.repeats):  # interleaved, so machine load affects both alike
        for fn, acc in ((plain, tp), (multi, tm)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    return statistics.median(tp), statistics.median(tm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=96, help="image side, pixels")
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--batches", default="64,256,1024")
    p.add_argument("--plain-batches", default="64,256", help="plain backprop memory runs")
    p.add_argument("--time-batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allocator", choices=["pinned", "default", "both"], default="both")
    p.add_argument("--child-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_batch:
        child(args)
        return

    width = build_model(args.backbone).out_dim
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads} threads; {args.backbone} at "
        f"{args.size}x{args.size}, chunk {args.chunk}, AP loss (20 bins)\n"
    )
    allocators = {"pinned": [True], "default": [False], "both": [True, False]}[args.allocator]
    print("| malloc | mode | B | RSS before step (MB) | step peak above it (MB) | D (MB) |")
    print("|---|---|---|---|---|---|")
    verdicts = []
    for pinned in allocators:
        rows = {}
        alloc = "pinned mmap threshold" if pinned else "glibc default"
        for mode, batches in (("multistage", args.batches), ("plain", args.plain_batches)):
            for b in (int(v) for v in batches.split(",") if v):
                r = measure_memory(args, mode, b, pinned)
                rows[(mode, b)] = r
                desc = b * width * 4 / 2**20
                print(
                    f"| {alloc} | {mode} | {b} | {r['before_mb']:.0f} | {r['step_mb']:.1f} "
                    f"| {desc:.2f} |"
                )
        bs = sorted(b for m, b in rows if m == "multistage")
        if len(bs) > 1:
            lo, hi = rows[("multistage", bs[0])], rows[("multistage", bs[-1])]
            extra_desc = (bs[-1] - bs[0]) * width * 4 * 2 / 2**20  # D and dL/dD, float32
            raw = hi["step_mb"] / lo["step_mb"] - 1
            growth = (hi["step_mb"] - extra_desc) / lo["step_mb"] - 1
            ok = "PASS" if growth <= 0.15 else "FAIL"
            verdicts.append(
                f"{alloc}: multistage step memory B={bs[0]} -> B={bs[-1]}: "
                f"{100 * raw:+.1f}% raw, {100 * growth:+.1f}% beyond D and dL/dD "
                f"(target <= +15%: {ok})"
            )
    print("\n" + "\n".join(verdicts))

    tp, tm = time_steps(args)
    print("\n| B | plain step (s) | multistage step (s) | ratio |\n|---|---|---|---|")
    print(f"| {args.time_batch} | {tp:.3f} | {tm:.3f} | {tm / tp:.2f} |")
    print(
        f"\nmultistage / plain step time: {tm / tp:.2f} "
        f"(target <= 1.5: {'PASS' if tm / tp <= 1.5 else 'FAIL'})"
    )


if __name__ == "__main__":
    main()
