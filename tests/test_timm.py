"""timm trunks (random init, nothing downloads): a CNN and a ViT through the whole pipeline."""

from __future__ import annotations

import sys

import pytest
import torch

from apretrieval.extraction.loop import extract_descriptors
from apretrieval.extraction.multiscale import multiscale_descriptors
from apretrieval.losses.ap import APLoss
from apretrieval.models import build_model, load_model, save_checkpoint
from apretrieval.multistage import multistage_step

timm = pytest.importorskip("timm")

NAMES = ["timm/resnet18", "timm/vit_tiny_patch16_224"]


def _model(name, dtype=torch.float32):
    torch.manual_seed(0)
    return build_model(name, out_dim=24).to(dtype).train()


def test_missing_timm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ValueError, match=r"pip install"):
        build_model("timm/resnet18")


def test_unknown_timm_model():
    with pytest.raises(ValueError, match="unknown timm model"):
        build_model("timm/not_a_model_xyz")


@pytest.mark.parametrize("name", NAMES)
def test_descriptor_any_size_and_checkpoint_roundtrip(name, tmp_path):
    model = _model(name).eval()
    with torch.no_grad():
        for h, w in ((32, 48), (45, 37)):  # ViT: not multiples of the patch size
            d = model(torch.rand(2, 3, h, w))
            assert d.shape == (2, 24)
            torch.testing.assert_close(d.norm(dim=1), torch.ones(2))
    path = save_checkpoint(tmp_path / "m.pt", model)
    again = load_model(path).eval()
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    assert again.config.mean == model.config.mean  # the model's own normalisation


@pytest.mark.parametrize("name", NAMES)
def test_multistage_gradients_equal_plain_backprop(name):
    model = _model(name, torch.float64)
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss_fn = APLoss()
    loss_fn(model(x), labels).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    multistage_step(model, x, labels, loss_fn, 4)
    ms = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert plain.keys() == ms.keys() and len(plain) > 10
    for n in plain:
        # timm resamples a ViT's position embedding to the input's grid in float32 (whatever
        # the model's dtype): that gradient is exact to float32 rounding only.
        # the float32 rounding is relative to the tensor's scale: atol 1e-6 of its largest entry
        # (measured: 2.6e-10 against a largest entry of 0.19).
        if n.endswith("pos_embed"):
            rtol, atol = 1e-5, 1e-6 * float(plain[n].abs().max())
        else:
            rtol, atol = 1e-9, 1e-12
        torch.testing.assert_close(ms[n], plain[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("name", NAMES)
def test_training_step_and_extraction(name):
    model = _model(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(4, 3, 32, 32)
    labels = torch.tensor([0, 0, 1, 1])
    before = [p.detach().clone() for p in model.parameters()]
    step = multistage_step(model, x, labels, APLoss(), 2)
    opt.step()
    assert 0 <= step.loss <= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    images = [torch.rand(3, 40, 56), torch.rand(3, 40, 56), torch.rand(3, 48, 32)]
    out = extract_descriptors(model, images, batch_size=2, num_workers=0, progress=False)
    model.eval()
    ref = multiscale_descriptors(model, images[2][None])
    assert out.shape == (3, 24)
    assert abs(out[2] - ref[0].numpy()).max() < 1e-5


def test_offline_weights_file(tmp_path):
    """weights=PATH: a timm state dict from disk, loaded without any download."""
    torch.manual_seed(1)
    src = timm.create_model("resnet18", num_classes=0)
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    model = build_model("timm/resnet18", weights=path)
    ours = model.backbone.model.state_dict()
    for k, v in src.state_dict().items():
        torch.testing.assert_close(ours[k], v, msg=k)
    with pytest.raises(ValueError, match="not found"):
        build_model("timm/resnet18", weights=tmp_path / "missing.pth")
