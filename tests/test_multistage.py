"""Multistaged backpropagation == plain backpropagation (float64), with replayed augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from apretrieval.augment_config import AugmentConfig
from apretrieval.data.transforms import TrainTransform, batch_seeds
from apretrieval.losses.ap import APLoss
from apretrieval.losses.baselines import ContrastiveLoss, TripletLoss
from apretrieval.model_config import ModelConfig
from apretrieval.models import RetrievalNet
from apretrieval.multistage import (
    backward_descriptor_grads,
    check_replayable,
    compute_descriptors,
    descriptor_loss_grads,
    multistage_backward,
)

B = 8
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def tiny_model(seed: int = 0) -> RetrievalNet:
    """Conv + frozen BatchNorm trunk (8 channels) -> GeM -> whitening, float64."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
    )
    with torch.no_grad():  # non-trivial frozen statistics
        for m in trunk:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model = RetrievalNet(trunk, 8, ModelConfig(name="tiny", out_dim=6))
    return model.double().train()


def pil_images(n: int = B, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(30 + 3 * i, 24 + 2 * (i % 3)) for i in range(n)]  # all different
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in sizes]


def loaders(images, square: bool, step: int = 5):
    """Per-sample loaders with augmentation replayed from (seed, step, position)."""
    tf = TrainTransform(
        AugmentConfig(max_side=20, square=square, tilt=0.3, tilt_prob=1.0, hue=0.05, hflip=0.5)
    )
    seeds = batch_seeds(0, step, len(images))
    return [lambda img=img, s=s: tf(img, s) for img, s in zip(images, seeds, strict=True)]


def assert_grad_equal(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """float64 gradients equal to rounding: relative 1e-9 (entries go down to ~1e-7, the real
    error is ~1e-16), with an absolute floor far below any entry that matters."""
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-15, msg=lambda m: f"{name}: {m}")


def plain_grads(model, images: list[torch.Tensor], labels, loss_fn):
    """Reference: one autograd graph over the whole batch (each image at its own size)."""
    model.zero_grad(set_to_none=True)
    d = torch.cat([model(x[None].double()) for x in images])
    loss = loss_fn(d, labels)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("square", [True, False], ids=["same-size", "variable-size"])
@pytest.mark.parametrize("chunk_size", [1, 3, B])
def test_multistage_gradients_equal_plain_backprop(square, chunk_size):
    model = tiny_model()
    inputs = loaders(pil_images(), square)
    loss_fn = APLoss(num_bins=10)
    ref_loss, ref = plain_grads(model, [f() for f in inputs], LABELS, loss_fn)
    model.zero_grad(set_to_none=True)
    loss = multistage_backward(model, inputs, LABELS, loss_fn, chunk_size)
    assert loss == pytest.approx(ref_loss, abs=1e-12)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert_grad_equal(p.grad, ref[name], name)
    # Every trainable parameter takes part (non-zero gradient), GeM power included.
    assert all(p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_tensor_input_and_thread_loading_match():
    model = tiny_model()
    x = torch.rand(B, 3, 16, 18, dtype=torch.float64)
    loss_fn = APLoss()
    ref_loss, ref = plain_grads(model, list(x), LABELS, loss_fn)
    for inputs, workers in ((x, 0), (list(x), 2), ([lambda t=t: t for t in x], 2)):
        model.zero_grad(set_to_none=True)
        loss = multistage_backward(model, inputs, LABELS, loss_fn, 3, num_workers=workers)
        assert loss == pytest.approx(ref_loss, abs=1e-12)
        for name, p in model.named_parameters():
            assert_grad_equal(p.grad, ref[name], name)


@pytest.mark.parametrize("loss_fn", [ContrastiveLoss(margin=0.7), TripletLoss(margin=0.3)])
def test_baseline_losses_through_multistage(loss_fn):
    model = tiny_model()
    x = torch.rand(B, 3, 14, 14, dtype=torch.float64)
    _, ref = plain_grads(model, list(x), LABELS, loss_fn)
    model.zero_grad(set_to_none=True)
    multistage_backward(model, x, LABELS, loss_fn, 3)
    for name, p in model.named_parameters():
        assert_grad_equal(p.grad, ref[name], name)


def test_gradients_accumulate_like_backward():
    """Like loss.backward(), the stages add to existing .grad instead of overwriting it."""
    model = tiny_model()
    x = torch.rand(B, 3, 12, 12, dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    multistage_backward(model, x, LABELS, APLoss(), 4)
    once = {n: p.grad.clone() for n, p in model.named_parameters()}
    multistage_backward(model, x, LABELS, APLoss(), 4)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, 2 * once[n])


def test_unreadable_inputs_are_left_out():
    model = tiny_model()
    x = torch.rand(B, 3, 12, 12, dtype=torch.float64)
    items = [lambda t=t: t for t in x]
    items[2] = lambda: None  # e.g. a corrupt file
    keep = [i for i in range(B) if i != 2]
    _, ref = plain_grads(model, [x[i] for i in keep], LABELS[keep], APLoss())
    model.zero_grad(set_to_none=True)
    multistage_backward(model, items, LABELS, APLoss(), 3)
    for name, p in model.named_parameters():
        assert_grad_equal(p.grad, ref[name], name)


def test_stages_compose_to_multistage():
    """The three public stages (the building blocks of a distributed step) == the whole."""
    model = tiny_model()
    x = torch.rand(B, 3, 12, 12, dtype=torch.float64)
    multistage_backward(model, x, LABELS, APLoss(), 3)
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    d, kept = compute_descriptors(model, x, 5)
    assert d.shape == (B, 6) and not d.requires_grad and kept.tolist() == list(range(B))
    _, g = descriptor_loss_grads(APLoss(), d, LABELS)
    assert g.shape == d.shape
    # Stage 3 in two halves (as two ranks would), summed: same gradients.
    backward_descriptor_grads(model, x, g[:4], 2, indices=range(4))
    backward_descriptor_grads(model, x, g[4:], 2, indices=range(4, B))
    for n, p in model.named_parameters():
        assert_grad_equal(p.grad, ref[n], n)


def test_batchnorm_in_training_mode_is_refused():
    model = tiny_model()
    model.config.frozen_bn = False
    model.train()
    with pytest.raises(ValueError, match="BatchNorm"):
        multistage_backward(model, torch.rand(B, 3, 8, 8, dtype=torch.float64), LABELS, APLoss(), 2)


def test_non_replayed_augmentation_is_detected():
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    items = [lambda: torch.rand(3, 10, 10, generator=gen, dtype=torch.float64)] * B  # redrawn
    with pytest.raises(RuntimeError, match="not replayed"):
        multistage_backward(model, items, LABELS, APLoss(), 4)


def test_bad_arguments():
    model = tiny_model()
    x = torch.rand(B, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunk_size"):
        multistage_backward(model, x, LABELS, APLoss(), 0)
    with pytest.raises(ValueError, match="labels"):
        multistage_backward(model, x, LABELS[:3], APLoss(), 2)
    with pytest.raises(ValueError, match="none of the"):
        multistage_backward(model, [lambda: None] * B, LABELS, APLoss(), 2)


def test_active_dropout_or_training_batchnorm_is_refused_and_bad_chunks_too():
    """Stage 3 replays stage 1 chunk by chunk: a module whose output depends on randomness
    (active Dropout) or on the chunk (BatchNorm in training mode) is refused before any work."""
    model = tiny_model()
    check_replayable(model)  # frozen BatchNorm: accepted
    head = nn.Sequential(nn.Dropout(0.3))
    check_replayable(head.eval())  # Dropout in eval mode: accepted
    check_replayable(nn.Sequential(nn.Dropout(0.0)).train())  # p = 0 is the identity
    with pytest.raises(ValueError, match="Dropout '0' is active"):
        check_replayable(head.train())
    imgs = torch.rand(B, 3, 12, 12, dtype=torch.float64)
    dropout_model = tiny_model()
    dropout_model.backbone.append(nn.Dropout(0.5))
    with pytest.raises(ValueError, match="Dropout"):
        multistage_backward(dropout_model, imgs, LABELS, APLoss(num_bins=10), chunk_size=4)
    assert all(p.grad is None for p in dropout_model.parameters())  # refused before stage 1
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            multistage_backward(tiny_model(), imgs, LABELS, APLoss(num_bins=10), chunk_size=bad)
