"""Distributed multistaged step on this CPU: 1 process vs 2 (gloo), bytes exchanged per step,
and a projection on paper for 8 GPUs at the paper's setting.

Each configuration runs in fresh processes launched as torchrun would (RANK, WORLD_SIZE,
MASTER_ADDR/PORT on 127.0.0.1); configurations alternate over ``--rounds`` rounds and the
best median per configuration is kept (the machine is shared). A step is the full training
step: stage 1 on the shard, descriptor all-gather, stage 2 on the whole batch, stage 3 on the
shard, gradient all-reduce, Adam. On a shared machine wall time depends on the other load;
the CPU time of rank 0 per step shows the work each rank does whatever the load. Collectives
are counted by wrapping ``torch.distributed``: payload = the tensors handed to each call;
per-rank traffic assumes ring algorithms (an all-gather of W blocks moves W - 1 blocks in
and out of each rank, an all-reduce of S bytes 2 (W - 1) / W S).

    python benchmarks/bench_distributed.py [--backbone resnet18] [--batch 32] [--size 96]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from apretrieval.distributed import (
    distributed_multistage_backward,
    init_distributed,
    shard_bounds,
)
from apretrieval.losses.ap import APLoss
from apretrieval.models import build_model

K = 4  # images per class


# --------------------------------------------------------------------------------------------
# Worker: one rank of one configuration.


class _Counter:
    """Wraps torch.distributed collectives: bytes handed over and seconds spent, per kind."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.seconds = 0.0
        self.world = 1
        for name in ("all_gather", "all_reduce", "broadcast", "all_gather_object", "barrier"):
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def wrapped(*args, **kw):
            t = args[1] if name == "all_gather" else (args[0] if args else None)
            if isinstance(t, torch.Tensor):
                kind = name
                if name == "all_gather":
                    kind = (
                        "all_gather (descriptors)"
                        if t.dim() == 2
                        else "all_gather (sizes, labels, status)"
                    )
                elif name == "all_reduce" and t.numel() > 1:
                    kind = "all_reduce (gradients)"
                self.bytes[kind] = self.bytes.get(kind, 0) + t.numel() * t.element_size()
            tic = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.seconds += time.perf_counter() - tic

        return wrapped

    def reset(self) -> None:
        self.bytes, self.seconds = {}, 0.0


def _worker(args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(args.threads)
    counter = _Counter()
    ctx = init_distributed("gloo", timeout_s=300.0, device="cpu")
    torch.manual_seed(0)
    model = build_model(args.backbone, pretrained=None, out_dim=args.out_dim).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    loss_fn = APLoss(num_bins=20)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=g)
    labels = torch.arange(args.batch) // K
    lo, hi = shard_bounds(args.batch, ctx.rank, ctx.world_size)
    times, cpu, comm, nbytes = [], [], [], {}
    for step in range(args.steps + 1):  # step 0: warm-up
        if ctx.world_size > 1:
            dist.barrier()
        counter.reset()
        tic, cpu_tic = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        distributed_multistage_backward(
            model, images[lo:hi], labels[lo:hi], loss_fn, args.chunk, ctx=ctx
        )
        opt.step()
        if step:
            times.append(time.perf_counter() - tic)
            cpu.append(time.process_time() - cpu_tic)
            comm.append(counter.seconds)
            nbytes = dict(counter.bytes)
    if ctx.rank == 0:
        params = sum(p.numel() for p in model.parameters())
        (out / "result.json").write_text(
            json.dumps(
                {
                    "world": ctx.world_size,
                    "threads": args.threads,
                    "step_s": statistics.median(times),
                    "cpu_s": statistics.median(cpu),
                    "comm_s": statistics.median(comm),
                    "bytes": nbytes,
                    "params": params,
                    "dim": args.out_dim or 512,
                }
            )
        )
    if ctx.world_size > 1:
        dist.destroy_process_group()


def _run(args: argparse.Namespace, world: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        argv = [
            sys.executable,
            __file__,
            "--worker",
            tmp,
            "--threads",
            str(threads),
            "--backbone",
            args.backbone,
            "--batch",
            str(args.batch),
            "--size",
            str(args.size),
            "--chunk",
            str(args.chunk),
            "--steps",
            str(args.steps),
            "--out-dim",
            str(args.out_dim),
        ]
        procs = [
            subprocess.Popen(
                argv,
                env=dict(
                    os.environ,
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
                    WORLD_SIZE=str(world),
                    RANK=str(r),
                    LOCAL_RANK=str(r),
                    OMP_NUM_THREADS=str(threads),
                ),
            )
            for r in range(world)
        ]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"worker failed (world={world})")
        return json.loads((Path(tmp) / "result.json").read_text())


def _ring(kind: str, payload: int, world: int) -> float:
    """Bytes a rank sends (= receives) for one collective under ring algorithms."""
    if world == 1:
        return 0.0
    if kind.startswith("all_gather"):
        return (world - 1) * payload
    if kind.startswith("all_reduce"):
        return 2 * (world - 1) / world * payload
    return payload


def _size(x: float) -> str:
    return f"{x / 2**20:.2f} MB" if x >= 2**20 else f"{x / 2**10:.1f} KB"


# --------------------------------------------------------------------------------------------
# Projection on paper: 8 GPUs, B = 4096 at 800 px, ResNet-101, D = 2048.


def projection(world: int = 8, batch: int = 4096, side: int = 800, dim: int = 2048) -> str:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):  # shapes only: nothing is allocated or computed
        model = build_model("resnet101", pretrained=None, out_dim=dim)
    params = sum(p.numel() for p in model.parameters())
    trunk = sum(p.numel() for p in model.backbone.parameters())
    flops = {}
    for h, w in ((side, side), (side * 3 // 4, side)):
        with FlopCounterMode(display=False) as fc:
            model(torch.empty(1, 3, h, w, device="meta"))
        flops[(h, w)] = fc.get_total_flops()
    per_rank = batch // world
    gather = batch * dim * 4
    reduce = params * 4
    rows = [
        ("images per GPU per step", f"{per_rank}"),
        ("descriptor all-gather, whole batch (B x D x 4 B)", f"{gather / 2**20:.1f} MB"),
        (
            "  received by each GPU ((W-1)/W of it)",
            f"{gather * (world - 1) / world / 2**20:.1f} MB",
        ),
        ("labels all-gather (B x 8 B)", f"{batch * 8 / 2**10:.0f} KB"),
        (f"parameters (trunk {trunk / 1e6:.1f}M + whitening + GeM)", f"{params / 1e6:.1f}M"),
        ("gradient all-reduce payload (float32)", f"{reduce / 2**20:.0f} MB"),
        (
            "  sent (= received) per GPU, ring: 2 (W-1)/W x payload",
            f"{2 * (world - 1) / world * reduce / 2**20:.0f} MB",
        ),
    ]
    stage2 = 3 * 2 * batch * batch * dim  # S = D D^T, G D, G^T D
    for (h, w), f in flops.items():
        step = per_rank * 4 * f  # stage 1 forward + stage 3 forward + backward (~2 forwards)
        rows += [
            (f"forward FLOPs per image, {w}x{h}", f"{f / 1e9:.0f} GFLOP"),
            (
                f"stages 1+3 per GPU per step, {w}x{h} (4 x forward x {per_rank})",
                f"{step / 1e12:.0f} TFLOP",
            ),
        ]
    rows += [
        ("stage 2 per GPU (whole batch, 3 B x B x D products)", f"{stage2 / 1e12:.2f} TFLOP"),
    ]
    out = ["| quantity (8 GPUs, B = 4096, 800 px, ResNet-101, D = 2048) | value |", "|---|---|"]
    out += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--out-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if args.worker:
        _worker(args, Path(args.worker))
        return
    configs = [(1, 2), (1, 1), (2, 1)]  # (processes, threads each)
    best: dict[tuple[int, int], dict] = {}
    for _ in range(args.rounds):
        for world, threads in configs:
            r = _run(args, world, threads)
            key = (world, threads)
            if key not in best or r["step_s"] < best[key]["step_s"]:
                best[key] = r
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"{args.backbone} (D = {args.out_dim}), B = {args.batch} at {args.size}x{args.size}, "
        f"chunk {args.chunk}, median of {args.steps} steps, best of {args.rounds} rounds\n"
    )
    base = best[(1, 1)]["step_s"]
    print(
        "| processes x threads | step (s) | images/s | vs 1x1 | rank 0 CPU time per step (s) "
        "| time in collectives (s) |"
    )
    print("|---|---|---|---|---|---|")
    for world, threads in configs:
        r = best[(world, threads)]
        print(
            f"| {world} x {threads} | {r['step_s']:.2f} | {args.batch / r['step_s']:.1f} | "
            f"{base / r['step_s']:.2f}x | {r['cpu_s']:.2f} | {r['comm_s']:.3f} |"
        )
    r = best[(2, 1)]
    print(f"\nBytes exchanged per step, 2 processes ({r['params'] / 1e6:.2f}M parameters):\n")
    print("| collective | payload per rank | sent per rank, ring |")
    print("|---|---|---|")
    total = 0.0
    for kind, n in sorted(r["bytes"].items()):
        sent = _ring(kind, n, 2)
        total += sent
        print(f"| {kind} | {_size(n)} | {_size(sent)} |")
    print(f"| total | | {_size(total)} |")
    print("\nProjection on paper:\n")
    print(projection())


if __name__ == "__main__":
    main()
