"""Mixed precision on CPU: bf16/fp16 multistage gradients against float32, the float16 loss
scale across the three stages (overflow skips a step, resume keeps the scale), channels-last."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from apretrieval.losses.ap import APLoss
from apretrieval.model_config import ModelConfig
from apretrieval.models import RetrievalNet, load_checkpoint
from apretrieval.multistage import multistage_step
from apretrieval.precision import LossScale, PrecisionNet, amp_dtype, fast_net
from apretrieval.training import train_step

LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def tiny_model(seed: int = 0) -> RetrievalNet:
    """Conv trunk (frozen BatchNorm) -> GeM -> whitening FC, float32."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, stride=2, padding=1),
        nn.ReLU(),
    )
    return RetrievalNet(trunk, 24, ModelConfig(name="tiny", out_dim=12)).train()


def grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def step_grads(model: nn.Module, net: nn.Module, x: torch.Tensor, scale: float = 1.0):
    model.zero_grad(set_to_none=True)
    res = multistage_step(net, x, LABELS, APLoss(num_bins=10), 3, grad_scale=scale)
    return res, grads(model)


@pytest.mark.parametrize(("amp", "bound"), [("bf16", 0.1), ("fp16", 0.03)])
def test_half_precision_multistage_gradients_follow_float32(amp, bound):
    x = torch.rand(8, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    model = tiny_model()
    ref, g32 = step_grads(model, model, x)
    res, g16 = step_grads(model, fast_net(model, amp), x)
    # The descriptors leave the network as float32: the loss works in float32 throughout.
    assert res.descriptors.dtype == torch.float32
    assert abs(res.loss - ref.loss) < 1e-4  # measured: 1e-5 (bf16), 5e-6 (fp16)
    # Relative error of the whole gradient, measured on 3 seeds: bf16 0.032-0.046, fp16
    # 0.005-0.009 (8 and 11 mantissa bits); the bounds are 2-3x that.
    rel = ((g16 - g32).norm() / g32.norm()).item()
    assert rel < bound, rel
    # ... and half precision did run: float32 with only the final re-normalisation differs
    # by ~1e-7, far below what 8 or 11 mantissa bits leave.
    assert rel > 1e-3, rel


def test_loss_scale_multiplies_the_gradients_not_the_loss():
    x = torch.rand(8, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    model = tiny_model()
    ref, g = step_grads(model, model, x)
    res, g_scaled = step_grads(model, model, x, scale=1024.0)
    assert res.loss == ref.loss
    torch.testing.assert_close(g_scaled, 1024.0 * g, rtol=1e-5, atol=1e-9)


def test_overflow_skips_the_step_and_halves_the_scale():
    x = torch.rand(8, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scale = LossScale(scale=2.0**10, growth_interval=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # an inf injected into the gradients (as a float16 overflow would leave them)
    hook = model.whiten.weight.register_hook(lambda g: g * math.inf)
    train_step(model, opt, x, LABELS, APLoss(num_bins=10), 3, loss_scale=scale)
    hook.remove()
    assert scale.scale == 2.0**9 and scale.skipped == 1
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update at all
    # finite steps update the weights with the unscaled gradients, and grow the scale
    ref = tiny_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        train_step(model, opt, x, LABELS, APLoss(num_bins=10), 3, loss_scale=scale)
        train_step(ref, ref_opt, x, LABELS, APLoss(num_bins=10), 3)
    assert scale.scale == 2.0**10 and scale.good_steps == 0
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=k)


def test_channels_last_gives_the_same_gradients():
    x = torch.rand(8, 3, 20, 20, generator=torch.Generator().manual_seed(4))
    model = tiny_model()
    _, g = step_grads(model, model, x)
    net = fast_net(model, "off", channels_last=True)
    assert isinstance(net, PrecisionNet) and net.net is model
    _, g_cl = step_grads(model, net, x)
    torch.testing.assert_close(g_cl, g, rtol=1e-4, atol=1e-6)


def test_switches_off_is_the_network_itself_and_bad_mode_is_refused():
    model = tiny_model()
    assert fast_net(model) is model
    assert amp_dtype("bf16") == torch.bfloat16 and amp_dtype("off") is None
    with pytest.raises(ValueError, match="amp must be one of"):
        amp_dtype("fp8")


def test_fp16_training_run_resumes_with_its_loss_scale(tmp_path):
    import numpy as np
    from PIL import Image

    from apretrieval.train_config import TrainConfig
    from apretrieval.training import train

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            arr = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    cfg = TrainConfig(
        data=str(tmp_path / "data"), backbone="resnet18", pretrained=None, out_dim=16,
        batch_size=6, images_per_class=2, chunk_size=6, max_side=24, steps=2, lr=1e-3,
        output_dir=str(tmp_path / "run"), num_workers=0, checkpoint_every=1, progress=False,
        amp="fp16", channels_last=True,
    )  # fmt: skip
    train(cfg)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["loss_scale"]
    # An overflow skips the step and halves the scale (no growth within 2000 steps).
    assert 0 <= state["skipped"] <= 2 and state["scale"] * 2 ** state["skipped"] == 2.0**16
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all('"loss_scale": ' in ln for ln in lines)
    train(cfg.replace(steps=4), resume=True)
    again = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert again["step"] == 4
    # The scale and the count carry on from the checkpoint: a fresh scale would start again
    # at 2**16 with no skip counted.
    assert again["loss_scale"]["skipped"] >= state["skipped"]
    assert again["loss_scale"]["scale"] <= state["scale"]
    assert again["loss_scale"]["scale"] * 2 ** again["loss_scale"]["skipped"] == 2.0**16


def test_extraction_in_half_precision_is_close_and_recorded(tmp_path):
    import json

    import numpy as np

    from apretrieval.extraction.loop import extract_descriptors
    from apretrieval.extraction.resumable import extract_to_file

    model = tiny_model().eval()
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 40 + 4 * i, 48, generator=g) for i in range(4)]
    kw = dict(num_workers=0, progress=False, scales=(1.0, 0.5))
    d32 = extract_descriptors(model, images, **kw)
    d16 = extract_descriptors(model, images, amp="bf16", **kw)
    assert not model.training  # the model's mode is left as it was
    cos = (d32 * d16).sum(axis=1)
    assert cos.min() > 0.999 and not np.array_equal(d32, d16)  # measured: 0.99997
    np.testing.assert_allclose(np.linalg.norm(d16, axis=1), 1.0, atol=1e-5)
    # A descriptor file records the mode: a float32 file is not reused for bf16.
    ids = [f"im{i}" for i in range(4)]
    npy = extract_to_file(model, images, ids, tmp_path / "f", **kw)
    again = extract_to_file(model, images, ids, tmp_path / "f", amp="bf16", **kw)
    assert again == npy
    np.testing.assert_array_equal(np.load(npy), d16)
    manifest = json.loads((tmp_path / "f.json").read_text())
    assert manifest["fingerprint"]["amp"] == "bf16"
