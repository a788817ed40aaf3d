"""CUDA checks (marked ``cuda``; skipped without a GPU; run by benchmarks/gpu_check.py)."""

from __future__ import annotations

import pytest
import torch

from apretrieval.extraction.loop import extract_descriptors
from apretrieval.losses.ap import APLoss
from apretrieval.losses.recall_at_k import RecallAtKLoss
from apretrieval.losses.smooth_ap import SmoothAPLoss
from apretrieval.losses.supap import RoadmapLoss, SupAPLoss
from apretrieval.models import build_model
from apretrieval.multistage import multistage_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _batch(n=24, dim=32, seed=0, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=1)
    return d.to(device), (torch.arange(n) // 4).to(device)


def test_loss_on_cuda_equals_cpu():
    d, labels = _batch()
    loss_fn = APLoss(num_bins=20)
    cpu = d.clone().requires_grad_()
    gpu = d.cuda().requires_grad_()
    lc, lg = loss_fn(cpu, labels), loss_fn(gpu, labels.cuda())
    lc.backward()
    lg.backward()
    assert abs(lc.item() - lg.item()) < 1e-10
    torch.testing.assert_close(gpu.grad.cpu(), cpu.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", [SmoothAPLoss, SupAPLoss, RoadmapLoss, RecallAtKLoss])
@pytest.mark.parametrize("options", [{}, {"memory_budget_mb": 0, "chunk_size": 5}])
def test_rank_losses_on_cuda_equal_cpu(cls, options):
    d, labels = _batch()
    loss_fn = cls(tau=0.05, **options)
    cpu = d.clone().requires_grad_()
    gpu = d.cuda().requires_grad_()
    lc, lg = loss_fn(cpu, labels), loss_fn(gpu, labels.cuda())
    lc.backward()
    lg.backward()
    assert abs(lc.item() - lg.item()) < 1e-10
    torch.testing.assert_close(gpu.grad.cpu(), cpu.grad, rtol=0, atol=1e-10)


def _model(device, dtype=torch.float64):
    torch.manual_seed(0)
    return build_model("resnet18", out_dim=16).to(device, dtype).train()


def test_multistage_on_cuda_equals_plain_backprop():
    torch.backends.cudnn.deterministic = True
    model = _model("cuda")
    x = torch.rand(8, 3, 48, 48, dtype=torch.float64, device="cuda")
    labels = torch.arange(8, device="cuda") // 2
    loss_fn = APLoss()
    loss_fn(model(x), labels).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    multistage_step(model, x, labels, loss_fn, 3)
    for a, b in zip(plain, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9)


def test_bf16_autocast_step_close_to_fp32():
    model = _model("cuda", torch.float32)
    x = torch.rand(8, 3, 64, 64, device="cuda")
    labels = torch.arange(8, device="cuda") // 2
    loss_fn = APLoss()
    loss_fn(model(x), labels).backward()
    ref = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        d = model(x)
    loss_fn(d.float(), labels).backward()
    amp = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(amp).all()
    cos = torch.nn.functional.cosine_similarity(amp, ref, dim=0)
    assert cos > 0.95, cos


def test_extraction_on_cuda_equals_cpu():
    model = _model("cpu", torch.float32).eval()
    images = [torch.rand(3, 64, 80) for _ in range(5)]
    kw = {"batch_size": 2, "num_workers": 0, "progress": False}
    cpu = extract_descriptors(model, images, device="cpu", **kw)
    gpu = extract_descriptors(model.cuda(), images, device="cuda", **kw)
    assert abs(cpu - gpu).max() < 1e-4
