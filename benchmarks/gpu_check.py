"""One prepared GPU check (``make gpu-check``): at most ~8 minutes on one CUDA GPU.

Runs from the source tree with the machine's own PyTorch (``PYTHONPATH=src python3
benchmarks/gpu_check.py``; needs torch + torchvision, never faiss) and prints / writes one
markdown table (``--out``, default ``gpu-check.md``):

1. every test marked ``cuda`` (pytest, when installed);
2. the AP loss, forward + backward, at B = 4096 / 16384 / 65536, D = 2048, 20 bins: time and
   peak CUDA memory above the inputs (``torch.cuda.max_memory_allocated``), against the dense
   autograd formulation (B x B x bins tensors) where that fits;
3. a single-GPU ``torchrun`` step over an NCCL process group, with bf16 autocast;
4. images/s of ResNet-50/101 multistage steps at 512 px: fp32, bf16, channels_last + bf16;
5. extraction images/s (ResNet-101, 3 scales, 1024 x 768);
6. the rank losses (Smooth-AP, SupAP, ROADMAP, Recall@k), forward + backward at B = 4096 /
   16384 / 65536, D = 2048, 8 images per class: time against the three matmuls, peak memory.

Without CUDA it prints one line and exits 0. Each section has a time cap and reports what it
skipped, so one failure never hides the others.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 450.0  # whole run, 7.5 minutes: leaves room for start-up under the 8-minute cap
ROWS: list[tuple[str, str, str]] = []
_T0 = time.monotonic()


def _left() -> float:
    return BUDGET_S - (time.monotonic() - _T0)


def _row(check: str, setting: str, result: str) -> None:
    ROWS.append((check, setting, result))
    print(f"| {check} | {setting} | {result} |", flush=True)


def _section(name: str, need_s: float, fn: Callable[[], None]) -> None:
    if _left() < need_s:
        _row(name, "-", f"skipped: {_left():.0f} s left of the budget")
        return
    try:
        fn()
    except Exception as err:  # report and go on: one broken section must not hide the rest
        _row(name, "-", f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    finally:
        torch.cuda.empty_cache()


def _time_cuda(fn: Callable[[], object], repeat: int = 3) -> tuple[float, float]:
    """(median seconds, peak MiB above the memory allocated before) of fn()."""
    fn()  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return sorted(times)[len(times) // 2], peak


# --------------------------------------------------------------------------------------------
# 1. cuda tests


def run_cuda_tests() -> None:
    try:
        import pytest  # noqa: F401
    except ImportError:
        _row("cuda tests", "tests/test_cuda.py", "skipped: pytest is not installed")
        return
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "test_cuda.py"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=max(30.0, min(150.0, _left() - 240)),
    )
    last = (out.stdout.strip().splitlines() or ["no output"])[-1]
    if out.returncode != 0:
        print(out.stdout[-3000:], out.stderr[-2000:], sep="\n")
    _row("cuda tests", "pytest -m cuda tests/test_cuda.py", last)


# --------------------------------------------------------------------------------------------
# 2. the loss at scale


def _dense_ap_loss(d: torch.Tensor, labels: torch.Tensor, num_bins: int = 20) -> torch.Tensor:
    """The textbook formulation: all B x B x bins soft assignments through autograd."""
    s = d @ d.T
    n = s.shape[0]
    rel = (labels[:, None] == labels[None, :]).float()
    keep = 1.0 - torch.eye(n, device=d.device)
    centres = torch.linspace(1.0, -1.0, num_bins, device=d.device)
    delta = 2.0 / (num_bins - 1)
    w = (1.0 - (s[..., None] - centres).abs() / delta).clamp(min=0) * keep[..., None]
    pos = (w * rel[..., None]).sum(1)  # (B, M)
    tot = w.sum(1)
    prec = pos.cumsum(1) / tot.cumsum(1).clamp(min=1e-12)
    npos = (rel * keep).sum(1)
    ap = (prec * pos).sum(1) / npos.clamp(min=1)
    return 1.0 - ap[npos > 0].mean()


def run_loss() -> None:
    from apretrieval.losses.ap import APLoss

    dim, per_class = 2048, 4
    for b in (4096, 16384, 65536):
        if _left() < 120:
            _row("AP loss", f"B={b}", "skipped: time budget")
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        d = torch.nn.functional.normalize(
            torch.randn(b, dim, device="cuda", generator=g), dim=1
        ).requires_grad_()
        labels = torch.arange(b, device="cuda") // per_class
        loss_fn = APLoss(num_bins=20)

        def ours(d=d, labels=labels, loss_fn=loss_fn) -> None:
            d.grad = None
            loss_fn(d, labels).backward()

        t, peak = _time_cuda(ours)
        flops = 3 * 2 * b * b * dim  # the three B x D x B products
        mm = torch.empty(b, b, device="cuda")

        def three_matmuls(d=d, mm=mm) -> None:
            x = d.detach()
            torch.mm(x, x.T, out=mm)
            mm @ x
            mm.T @ x

        t_mm, _ = _time_cuda(three_matmuls)
        del mm
        _row(
            "AP loss fwd+bwd",
            f"B={b}, D={dim}, 20 bins",
            f"{t * 1e3:.1f} ms, peak +{peak:.0f} MiB; {t / t_mm:.2f}x the 3 matmuls "
            f"({flops / t_mm / 1e12:.0f} TFLOP/s)",
        )
        need = b * b * 20 * 4 * 6 / 2**20  # about six B x B x M float tensors live
        free = torch.cuda.mem_get_info()[0] / 2**20
        if need > 0.8 * free:
            _row("dense formulation", f"B={b}", f"skipped: needs ~{need / 1024:.0f} GiB")
            continue

        def dense(d=d, labels=labels) -> None:
            d.grad = None
            _dense_ap_loss(d, labels).backward()

        try:
            t_d, peak_d = _time_cuda(dense, repeat=1)
            _row("dense formulation", f"B={b}", f"{t_d * 1e3:.1f} ms, peak +{peak_d:.0f} MiB")
        except torch.cuda.OutOfMemoryError:
            _row("dense formulation", f"B={b}", "out of memory")
        del d


def run_rank_losses() -> None:
    from apretrieval.losses.recall_at_k import RecallAtKLoss
    from apretrieval.losses.smooth_ap import SmoothAPLoss
    from apretrieval.losses.supap import RoadmapLoss, SupAPLoss

    dim, per_class = 2048, 8
    losses = {
        "Smooth-AP": SmoothAPLoss,
        "SupAP": SupAPLoss,
        "ROADMAP": RoadmapLoss,
        "Recall@k": RecallAtKLoss,
    }
    for b in (4096, 16384, 65536):
        g = torch.Generator(device="cuda").manual_seed(0)
        d = torch.nn.functional.normalize(
            torch.randn(b, dim, device="cuda", generator=g), dim=1
        ).requires_grad_()
        labels = torch.arange(b, device="cuda") // per_class
        mm = torch.empty(b, b, device="cuda")

        def three_matmuls(d=d, mm=mm) -> None:
            x = d.detach()
            torch.mm(x, x.T, out=mm)
            mm @ x
            mm.T @ x

        t_mm, _ = _time_cuda(three_matmuls, repeat=1)
        del mm
        torch.cuda.empty_cache()
        for name, cls in losses.items():
            if _left() < (60 if b < 65536 else 120):
                _row(f"{name} fwd+bwd", f"B={b}", "skipped: time budget")
                continue
            loss_fn = cls()

            def step(d=d, labels=labels, loss_fn=loss_fn) -> None:
                d.grad = None
                loss_fn(d, labels).backward()

            t, peak = _time_cuda(step, repeat=1 if b == 65536 else 3)
            _row(
                f"{name} fwd+bwd",
                f"B={b}, D={dim}, {per_class} per class",
                f"{t * 1e3:.1f} ms, peak +{peak:.0f} MiB; {t / t_mm:.2f}x the 3 matmuls",
            )
        del d


# --------------------------------------------------------------------------------------------
# 3. torchrun + NCCL + AMP


class _Autocast(torch.nn.Module):
    """model under bf16 autocast, float32 out (the loss and dL/dD stay float32)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.model(x).float()


def ddp_worker() -> int:
    """One rank of a torchrun job: NCCL group, a multistage AMP step, gradients all-reduced."""
    import torch.distributed as dist

    from apretrieval.distributed import distributed_multistage_backward, init_distributed
    from apretrieval.losses.ap import APLoss
    from apretrieval.models import build_model

    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    ctx = init_distributed("nccl", 120.0, "cuda")
    model = build_model("resnet18", out_dim=128).cuda().train()
    x = torch.rand(32, 3, 224, 224, device="cuda")
    labels = torch.arange(32, device="cuda") // 4
    step = distributed_multistage_backward(_Autocast(model), x, labels, APLoss(), 8, ctx=ctx)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    before = grads.clone()
    dist.all_reduce(grads)  # a real NCCL collective, world size 1: the sum is the tensor
    ok = torch.isfinite(grads).all().item() and torch.equal(grads, before)
    print(f"RESULT loss={step.loss:.4f} backend={dist.get_backend()} grads_ok={ok}", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


def run_torchrun() -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        str(Path(__file__).resolve()),
        "--ddp-worker",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    res = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    if out.returncode != 0 or not res:
        print(out.stdout[-2000:], out.stderr[-3000:], sep="\n")
        _row("torchrun NCCL step", "1 GPU, bf16 autocast", f"FAILED (exit {out.returncode})")
    else:
        _row(
            "torchrun NCCL step",
            "1 GPU, bf16 autocast, ResNet-18, B=32",
            res[0].removeprefix("RESULT "),
        )


# --------------------------------------------------------------------------------------------
# 4. multistage throughput


def run_multistage() -> None:
    from apretrieval.losses.ap import APLoss
    from apretrieval.models import build_model
    from apretrieval.multistage import multistage_step

    batch, chunk, size = 64, 16, 512
    for name in ("resnet50", "resnet101"):
        for mode in ("fp32", "bf16", "channels_last+bf16"):
            if _left() < 60:
                _row("multistage step", f"{name} {mode}", "skipped: time budget")
                continue
            model = build_model(name, whiten=True).cuda().train()
            x = torch.rand(batch, 3, size, size, device="cuda")
            if mode.startswith("channels_last"):
                model = model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            net = model if mode == "fp32" else _Autocast(model)
            labels = torch.arange(batch, device="cuda") // 4
            loss_fn = APLoss()

            def step(net=net, x=x, labels=labels, model=model, loss_fn=loss_fn) -> None:
                model.zero_grad(set_to_none=True)
                multistage_step(net, x, labels, loss_fn, chunk)

            t, peak = _time_cuda(step, repeat=2)
            _row(
                "multistage step",
                f"{name} {size}px B={batch} chunk={chunk} {mode}",
                f"{batch / t:.0f} img/s, peak +{peak / 1024:.1f} GiB",
            )
            del model, net, x


# --------------------------------------------------------------------------------------------
# 5. extraction throughput


def run_extraction() -> None:
    from apretrieval.extraction.loop import extract_descriptors
    from apretrieval.models import build_model

    n = 48
    images = [torch.rand(3, 768, 1024) for _ in range(n)]
    model = build_model("resnet101").cuda().eval()
    for mode in ("fp32", "bf16"):
        net = model if mode == "fp32" else _Autocast(model)
        kw = {"batch_size": 8, "num_workers": 0, "progress": False, "device": "cuda"}
        extract_descriptors(net, images[:8], **kw)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        extract_descriptors(net, images, **kw)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        _row("extraction", f"resnet101 1024x768, 3 scales, {mode}", f"{n / dt:.1f} img/s")


# --------------------------------------------------------------------------------------------


def _table() -> str:
    dev = torch.cuda.get_device_name(0)
    head = [
        f"GPU check on {dev}, torch {torch.__version__}, CUDA {torch.version.cuda} "
        f"({time.monotonic() - _T0:.0f} s)",
        "",
        "| check | setting | result |",
        "|---|---|---|",
    ]
    return "\n".join(head + [f"| {c} | {s} | {r} |" for c, s, r in ROWS]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check.md"), help="markdown table")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device available (torch.cuda.is_available() is False); "
            "nothing to do"
        )
        return 0
    if args.ddp_worker:
        return ddp_worker()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the rows below
    print("| check | setting | result |\n|---|---|---|", flush=True)
    _section("cuda tests", 200, run_cuda_tests)
    _section("AP loss", 150, run_loss)
    _section("torchrun NCCL step", 100, run_torchrun)
    _section("multistage step", 60, run_multistage)
    _section("extraction", 30, run_extraction)
    _section("rank losses", 60, run_rank_losses)
    from apretrieval.atomic import atomic_write_text

    atomic_write_text(args.out, _table())
    print(f"table: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
