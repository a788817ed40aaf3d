"""Released dirtorch / cirtorch models: conversion against an independent reference forward.

The source checkpoints are synthetic (random weights, random BatchNorm statistics) in each
project's published format. The reference forward below is written from the two projects'
model definitions with plain functional ops on the *source* weight names, so it shares nothing
with the converted RetrievalNet or the key mapping of the converter.
"""

from __future__ import annotations

import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from apretrieval.cli import main
from apretrieval.convert import (
    convert,
    convert_cirtorch,
    load_untrusted_checkpoint,
    save_converted,
)
from apretrieval.models import load_model
from apretrieval.postprocess import apply_whitening, load_whitening

# --------------------------------------------------------------------------------------------
# Reference forward (functional ResNet on source key names)


def _bn(x, sd, pre):
    return F.batch_norm(
        x,
        sd[pre + "running_mean"],
        sd[pre + "running_var"],
        sd[pre + "weight"],
        sd[pre + "bias"],
        False,
        0.0,
        1e-5,
    )


def _block(x, sd, pre, stride):
    bottleneck = pre + "conv3.weight" in sd
    if bottleneck:  # 1x1 -> 3x3 (stride) -> 1x1
        out = F.relu(_bn(F.conv2d(x, sd[pre + "conv1.weight"]), sd, pre + "bn1."))
        out = F.relu(
            _bn(F.conv2d(out, sd[pre + "conv2.weight"], stride=stride, padding=1), sd, pre + "bn2.")
        )
        out = _bn(F.conv2d(out, sd[pre + "conv3.weight"]), sd, pre + "bn3.")
    else:  # 3x3 (stride) -> 3x3
        out = F.relu(
            _bn(F.conv2d(x, sd[pre + "conv1.weight"], stride=stride, padding=1), sd, pre + "bn1.")
        )
        out = _bn(F.conv2d(out, sd[pre + "conv2.weight"], padding=1), sd, pre + "bn2.")
    if pre + "downsample.0.weight" in sd:
        x = _bn(
            F.conv2d(x, sd[pre + "downsample.0.weight"], stride=stride), sd, pre + "downsample.1."
        )
    return F.relu(out + x)


def _resnet(x, sd, names):
    """names: source prefixes of conv1, bn1, layer1..layer4."""
    conv1, bn1, *layers = names
    x = F.relu(_bn(F.conv2d(x, sd[conv1 + "weight"], stride=2, padding=3), sd, bn1))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for i, layer in enumerate(layers):
        n = len({k[len(layer) :].split(".")[0] for k in sd if k.startswith(layer)})
        for j in range(n):
            x = _block(x, sd, f"{layer}{j}.", 2 if (i > 0 and j == 0) else 1)
    return x


def _gem(x, p, eps=1e-6):
    return F.avg_pool2d(x.clamp(min=eps).pow(p), x.shape[-2:]).pow(1.0 / p).flatten(1)


def _normalise(img, mean, std):
    return (img - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def dirtorch_reference(img, ckpt):
    """ResNet_RMAC.forward: trunk -> GeM -> [L2 if norm_features] -> fc -> L2."""
    sd = {k.removeprefix("module."): v.double() for k, v in ckpt["state_dict"].items()}
    pre = ckpt.get("preprocess", {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    x = _resnet(
        _normalise(img.double(), pre["mean"], pre["std"]),
        sd,
        ["conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4."],
    )
    x = _gem(x, sd["adpool.p"])
    if ckpt["model_options"].get("norm_features", False):
        x = F.normalize(x, dim=1)
    x = F.linear(x, sd["fc.weight"], sd["fc.bias"])
    return F.normalize(x, dim=-1)


def cirtorch_reference(img, ckpt):
    """ImageRetrievalNet.forward: features -> GeM -> L2N -> [whiten -> L2N]."""
    sd = {k: v.double() for k, v in ckpt["state_dict"].items()}
    meta = ckpt["meta"]
    x = _resnet(
        _normalise(img.double(), meta["mean"], meta["std"]),
        sd,
        ["features.0.", "features.1.", "features.4.", "features.5.", "features.6.", "features.7."],
    )
    l2n = lambda v: v / (v.norm(dim=1, keepdim=True) + 1e-6)  # noqa: E731 (cirtorch's L2N)
    x = l2n(_gem(x, sd["pool.p"]))
    if meta["whitening"]:
        x = l2n(F.linear(x, sd["whiten.weight"], sd["whiten.bias"]))
    return x


# --------------------------------------------------------------------------------------------
# Synthetic source checkpoints


def _random_resnet_state(arch, seed):
    """torchvision ResNet weights with random BatchNorm statistics (BN is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sd = getattr(torchvision.models, arch)(weights=None).state_dict()
    for k, v in sd.items():
        if k.endswith("running_mean"):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("bn3.weight") or k.endswith("bn2.weight"):
            sd[k] = 0.5 + 0.5 * torch.rand(v.shape, generator=g)  # keep activations alive
        elif k.endswith(".bias") and "bn" in k:
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


@pytest.fixture
def fake_sklearn(monkeypatch):
    """A stand-in `sklearn.decomposition.pca.PCA` class so that tests can pickle one."""
    mod = types.ModuleType("sklearn.decomposition.pca")

    class PCA:
        pass

    PCA.__module__, PCA.__qualname__ = mod.__name__, "PCA"
    mod.PCA = PCA
    for name in ("sklearn", "sklearn.decomposition", "sklearn.decomposition.pca"):
        monkeypatch.setitem(
            sys.modules, name, types.ModuleType(name) if name != mod.__name__ else mod
        )
    return PCA


def _pca(cls, dim, seed, whiten=True):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    pca = cls()
    pca.__dict__.update(
        n_components=None,
        whiten=whiten,
        mean_=rng.standard_normal(dim) * 0.01,
        components_=q.T.astype(np.float64),
        explained_variance_=rng.uniform(0.01, 1.0, dim),
        noise_variance_=np.float64(0.0),
        _sklearn_version="0.20.3",
    )
    return pca


def make_dirtorch(
    path, fake_sklearn, *, arch="resnet18", norm_features=False, legacy=False, mean_std=None
):
    sd = _random_resnet_state(arch, seed=1)
    width = sd["layer4.1.bn2.weight"].numel() if arch == "resnet18" else 2048
    g = torch.Generator().manual_seed(2)
    sd["adpool.p"] = torch.tensor([3.37])
    sd["fc.weight"] = torch.randn(width, width, generator=g) / width**0.5
    sd["fc.bias"] = 0.3 * torch.randn(width, generator=g)  # large: L2-before-FC matters
    ckpt = {
        "model_options": {
            "arch": f"{arch}_rmac",
            "out_dim": width,
            "pooling": "gem",
            "gemp": 3,
            "norm_features": norm_features,
            "without_fc": False,
        },
        "state_dict": {"module." + k: v for k, v in sd.items()},  # as saved from DataParallel
        "pca": {"Landmarks_clean": _pca(fake_sklearn, width, 3)},
        "epoch": 7,
    }
    if mean_std is not None:
        ckpt["preprocess"] = {"mean": mean_std[0], "std": mean_std[1], "input_size": 224}
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    return ckpt


def make_cirtorch(path, *, arch="resnet18", whitening=True):
    tv = _random_resnet_state(arch, seed=4)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    sd = {f"features.{names.index(k.split('.')[0])}.{k.split('.', 1)[1]}": v for k, v in tv.items()}
    width = 512 if arch in ("resnet18", "resnet34") else 2048
    g = torch.Generator().manual_seed(5)
    sd["pool.p"] = torch.tensor([2.81])
    if whitening:
        sd["whiten.weight"] = torch.randn(width, width, generator=g) / width**0.5
        sd["whiten.bias"] = 0.3 * torch.randn(width, generator=g)
    rng = np.random.default_rng(6)
    lw = {
        "ss": {
            "m": rng.standard_normal((width, 1)) * 0.01,
            "P": rng.standard_normal((width, width)),
        },
        "ms": {
            "m": rng.standard_normal((width, 1)) * 0.01,
            "P": rng.standard_normal((width, width)),
        },
    }
    meta = {
        "architecture": arch,
        "local_whitening": False,
        "pooling": "gem",
        "regional": False,
        "whitening": whitening,
        "mean": [0.5, 0.45, 0.4],
        "std": [0.25, 0.2, 0.22],
        "outputdim": width,
        "Lw": {"retrieval-SfM-120k": lw},
    }
    ckpt = {"meta": meta, "state_dict": sd, "epoch": 3}
    torch.save(ckpt, path)
    return ckpt


def _cosine(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 96, 80, generator=g)


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize(("norm_features", "legacy"), [(False, False), (True, True)])
def test_dirtorch_descriptor_matches_reference(
    tmp_path, fake_sklearn, images, norm_features, legacy
):
    src = tmp_path / "dir.pt"
    ckpt = make_dirtorch(
        src,
        fake_sklearn,
        norm_features=norm_features,
        legacy=legacy,
        mean_std=([0.4, 0.5, 0.6], [0.3, 0.2, 0.25]),
    )
    converted = convert("dirtorch", src)
    model = converted.model.eval()
    with torch.no_grad():
        ours = model(images)
    ref = dirtorch_reference(images, ckpt)
    cos = _cosine(ours, ref)
    assert cos.min() >= 0.9999, cos
    assert model.gem_p == pytest.approx(3.37)
    # The check has teeth: the other L2 placement gives another descriptor.
    other = dirtorch_reference(
        images,
        {**ckpt, "model_options": {**ckpt["model_options"], "norm_features": not norm_features}},
    )
    assert (ours - ref).abs().max() < 2e-5
    assert (ours - other).abs().max() > 1e-4


def test_dirtorch_resnet50_and_roundtrip(tmp_path, fake_sklearn, images):
    src = tmp_path / "r50.pt"
    ckpt = make_dirtorch(src, fake_sklearn, arch="resnet50")
    out = tmp_path / "ours.pt"
    paths = save_converted(out, convert("dirtorch", src))
    model = load_model(paths["model"]).eval()  # through our checkpoint (weights_only)
    torch.load(paths["model"], weights_only=True)
    with torch.no_grad():
        ours = model(images)
    assert _cosine(ours, dirtorch_reference(images, ckpt)).min() >= 0.9999


def test_dirtorch_whitening_reproduces_whitenp(tmp_path, fake_sklearn, images):
    """evaluate --whiten with the written .npz == dirtorch's transform with whitenp=0.25."""
    src = tmp_path / "dir.pt"
    ckpt = make_dirtorch(src, fake_sklearn)
    paths = save_converted(tmp_path / "ours.pt", convert("dirtorch", src))
    w = load_whitening(paths["Landmarks_clean"])
    assert w.power == 0.25
    x = dirtorch_reference(images, ckpt).numpy()
    pca = ckpt["pca"]["Landmarks_clean"]
    ref = (x - pca.mean_) @ pca.components_.T / np.power(pca.explained_variance_, 0.25)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(apply_whitening(x, w), ref, atol=1e-5)
    wrong = (x - pca.mean_) @ pca.components_.T / np.power(pca.explained_variance_, 0.5)
    wrong /= np.linalg.norm(wrong, axis=1, keepdims=True)
    assert np.abs(apply_whitening(x, w) - wrong).max() > 1e-3


@pytest.mark.parametrize("whitening", [True, False])
def test_cirtorch_descriptor_matches_reference(tmp_path, images, whitening):
    src = tmp_path / "cir.pth"
    ckpt = make_cirtorch(src, whitening=whitening)
    converted = convert("cirtorch", src)
    with torch.no_grad():
        ours = converted.model.eval()(images)
    assert _cosine(ours, cirtorch_reference(images, ckpt)).min() >= 0.9999
    assert converted.model.gem_p == pytest.approx(2.81)
    # Its own mean/std (not ImageNet's) is part of the network.
    imagenet = {
        **ckpt,
        "meta": {**ckpt["meta"], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }
    assert (ours - cirtorch_reference(images, ckpt)).abs().max() < 2e-5
    assert (ours - cirtorch_reference(images, imagenet)).abs().max() > 1e-4


def test_cirtorch_lw_whitening(tmp_path, images):
    src = tmp_path / "cir.pth"
    ckpt = make_cirtorch(src)
    paths = save_converted(tmp_path / "ours.pt", convert("cirtorch", src))
    x = cirtorch_reference(images, ckpt).numpy()
    for mode in ("ss", "ms"):
        lw = ckpt["meta"]["Lw"]["retrieval-SfM-120k"][mode]
        ref = lw["P"] @ (x.T - lw["m"])  # cirtorch's whitenapply on D x N columns
        ref = (ref / np.linalg.norm(ref, axis=0, keepdims=True)).T
        w = load_whitening(paths[f"retrieval-SfM-120k-{mode}"])
        np.testing.assert_allclose(apply_whitening(x, w), ref, atol=1e-4)


def test_restricted_loader_refuses_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))  # any callable outside the allow-list

    path = tmp_path / "evil.pt"
    torch.save({"meta": {}, "state_dict": {}, "x": Boom()}, path)
    with pytest.raises(ValueError, match="cannot load"):
        load_untrusted_checkpoint(path)
    path.write_bytes(pickle.dumps({"a": 1}))  # not a torch file at all
    with pytest.raises(ValueError):
        load_untrusted_checkpoint(path)


def test_unsupported_sources_fail_clearly(tmp_path):
    ckpt = {"meta": {"architecture": "vgg16", "pooling": "gem"}, "state_dict": {}}
    with pytest.raises(ValueError, match="vgg16"):
        convert_cirtorch(ckpt)
    ckpt = {"meta": {"architecture": "resnet18", "pooling": "mac"}, "state_dict": {}}
    with pytest.raises(ValueError, match="mac"):
        convert_cirtorch(ckpt)
    with pytest.raises(ValueError, match="unknown source"):
        convert("caffe", tmp_path / "x.pt")


def test_cli_convert(tmp_path, capsys, images):
    src = tmp_path / "cir.pth"
    ckpt = make_cirtorch(src)
    out = tmp_path / "conv" / "model.pt"
    assert main(["convert", "--from", "cirtorch", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.whiten-retrieval-SfM-120k-ss.npz" in printed
    with torch.no_grad():
        ours = load_model(out).eval()(images)
    assert _cosine(ours, cirtorch_reference(images, ckpt)).min() >= 0.9999
    assert main(["convert", "--from", "dirtorch", str(src), "--out", str(out)]) == 2
