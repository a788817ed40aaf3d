"""Mixed precision on CPU: one multistaged training step in float32, bf16, fp16 and with
channels-last, its time and how far its gradient is from float32's.

    python benchmarks/bench_amp.py [--backbone mobilenet_v2] [--size 128] [--batch 32]
        [--chunk 16] [--repeats 3] [--threads 2]

One network (the demo's ImageNet MobileNetV2 when its weights are installed, else random
init; frozen BatchNorm as in training), one batch, the AP loss with 20 bins; each mode runs
the same multistage step (``fast_net`` as training builds it; fp16 with the loss scale that
training starts from, 2^16, divided out of the gradients afterwards). The modes
are timed interleaved (mode after mode, ``--repeats`` rounds, median), so a change in machine
load hits them alike. Gradient error: ||g - g_fp32|| / ||g_fp32|| over every trainable
parameter; descriptor error: max |d - d_fp32| (unit vectors). On CPU, half precision saves
memory bandwidth but most kernels gain nothing (or lose) without bf16/fp16 matrix units;
GPUs are where it pays (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from apretrieval.losses.ap import APLoss
from apretrieval.models import MissingWeightsError, build_model
from apretrieval.multistage import multistage_step
from apretrieval.precision import LossScale, fast_net

MODES = {  # name: (amp, channels_last)
    "fp32": ("off", False),
    "fp32 + channels_last": ("off", True),
    "bf16": ("bf16", False),
    "bf16 + channels_last": ("bf16", True),
    "fp16": ("fp16", False),
}


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def step(
    model, mode: str, x, labels, chunk: int, scale: LossScale
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One multistage step in ``mode`` -> (seconds, gradient (P,), descriptors (B, D)).

    fp16 runs as training runs it: the descriptor gradient multiplied by ``scale`` so that
    small weight gradients do not underflow, divided out afterwards; ``scale`` is halved after
    an overflow, as training does (the step is then redone, untimed).
    """
    amp, channels_last = MODES[mode]
    model.to(memory_format=torch.contiguous_format)  # fast_net switches it in place
    net = fast_net(model, amp, channels_last=channels_last)
    loss_fn = APLoss(num_bins=20, chunk_size=chunk)
    while True:
        model.zero_grad(set_to_none=True)
        factor = scale.scale if amp == "fp16" else 1.0
        t0 = time.perf_counter()
        res = multistage_step(net, x, labels, loss_fn, chunk, grad_scale=factor)
        finite = amp != "fp16" or scale.unscale(model.parameters())
        elapsed = time.perf_counter() - t0
        if finite:
            return elapsed, _grads(model).clone(), res.descriptors.detach().clone()
        scale.update(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--size", type=int, default=128, help="image side, pixels")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        model = build_model(args.backbone, pretrained="imagenet", out_dim=256, download=False)
        weights = "ImageNet weights"
    except MissingWeightsError:
        model = build_model(args.backbone, pretrained=None, out_dim=256)
        weights = "random init"
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(args.batch) // 4  # 4 images per class
    ref: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    scale = LossScale()  # fp16's, found during the warm-up and kept
    for mode in MODES:  # warm-up (thread pools, allocator, oneDNN kernels) and the gradients
        _, g, d = step(model, mode, x, labels, args.chunk, scale)
        ref[mode] = (g, d)
    for _ in range(args.repeats):
        for mode in MODES:
            times[mode].append(step(model, mode, x, labels, args.chunk, scale)[0])
    g32, d32 = ref["fp32"]
    t32 = statistics.median(times["fp32"])
    print(
        f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
        f"{args.backbone} ({weights}) at {args.size} px, B = {args.batch}, chunk {args.chunk}, "
        f"AP loss 20 bins; median of {args.repeats} interleaved steps; fp16 loss scale "
        f"{scale.scale:g}\n"
    )
    print("| mode | step (s) | vs fp32 | gradient rel. error | descriptor max abs error |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        g, d = ref[mode]
        t = statistics.median(times[mode])
        rel = float((g - g32).norm() / g32.norm())
        err = float((d - d32).abs().max())
        print(f"| {mode} | {t:.2f} | {t / t32:.2f}x | {rel:.2e} | {err:.2e} |")


if __name__ == "__main__":
    main()
