"""timm models as retrieval trunks (optional extra ``apretrieval[timm]``).

``timm/<name>`` names any model of the timm library (``timm/resnet50``,
``timm/convnext_tiny``, ``timm/vit_small_patch16_224`` ...). The trunk returns the model's last
feature map as (B, C, h, w), so every timm model gets the same head as the torchvision
backbones: GeM -> L2 -> whitening FC -> L2 (see :mod:`apretrieval.models`).

Vision transformers: GeM over the patch tokens, not the class token. The patch tokens of the
last block (after the final norm, the prefix tokens dropped) are laid out on their (h, w) grid
and pooled like a convolutional map, because

* the head is then the same for every trunk: GeM's learned power ``p`` keeps its meaning, the
  multi-scale combination uses it, and the PCA initialisation of the whitening sees the same
  kind of vector;
* it works for every timm trunk, including those that have no class token (Swin, ConvNeXt,
  ViTs built with ``class_token=False``), and at any image size: ViTs are built with
  ``dynamic_img_size=True`` / ``dynamic_img_pad=True`` so the position embeddings are
  resampled to the image instead of forcing the pretraining resolution; retrieval extracts at
  up to 1024 px over several scales.

The tokens are signed (LayerNorm output), and GeM clamps its input at ``eps``: only the positive
part of each channel is pooled, the CNN situation after a ReLU. The final norm's learned shift
moves channels into that domain during fine-tuning.

Weights: ``pretrained="imagenet"`` lets timm fetch the model's default pretrained weights (this
needs the network or timm's cache); ``weights=PATH`` loads a local file offline (a timm
``.safetensors`` / ``.pth`` / ``.bin`` state dict of that model, e.g. downloaded beforehand
from its model page) through timm's own loader, which adapts the classifier and the position
embeddings. Neither: random initialisation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from apretrieval.backbone_names import TIMM_PREFIX, is_timm_name

__all__ = ["TimmTrunk", "timm_trunk"]

_INSTALL_HINT = "pip install 'apretrieval[timm]'  (or: pip install timm)"


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as err:
        raise ValueError(f"timm backbones need the timm package: {_INSTALL_HINT}") from err
    return timm


class TimmTrunk(nn.Module):
    """A timm model cut after its last stage: (B, 3, H, W) normalised images -> (B, C, h, w).

    Uses timm's ``forward_intermediates`` (last stage, final norm applied, NCHW), the one
    interface timm offers for spatial maps of CNNs and transformers alike.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model  # forward_intermediates is timm's, not nn.Module's

    def forward(self, x: Tensor) -> Tensor:
        feats: list[Tensor] = self.model.forward_intermediates(
            x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return feats[-1]


def _create(timm: Any, arch: str, **kwargs: Any) -> Any:
    """timm.create_model, with the ViT options for any image size when the model takes them."""
    try:
        return timm.create_model(arch, dynamic_img_size=True, dynamic_img_pad=True, **kwargs)
    except TypeError:  # not a ViT-like model: these options are unknown to it
        return timm.create_model(arch, **kwargs)


def timm_trunk(
    name: str,
    *,
    pretrained: str | None = None,
    weights: str | os.PathLike[str] | None = None,
) -> tuple[TimmTrunk, int, tuple[float, ...], tuple[float, ...]]:
    """(trunk, feature width, input mean, input std) for ``timm/<arch>``.

    ``pretrained``: None or ``"imagenet"`` (timm's default weights for the model);
    ``weights``: a local weights file (no download). Mean/std are the ones the model's
    pretrained weights expect (timm's ``pretrained_cfg``).
    """
    if not is_timm_name(name):
        raise ValueError(f"not a timm backbone name (expected 'timm/<model>'): {name!r}")
    arch = name[len(TIMM_PREFIX) :]
    timm = _import_timm()
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r} (see timm.list_models())")
    if pretrained not in (None, "imagenet"):
        raise ValueError(f"pretrained must be None or 'imagenet', got {pretrained!r}")
    kwargs: dict[str, Any] = {"num_classes": 0}
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ValueError(f"weights file not found: {path}")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    elif pretrained == "imagenet":
        kwargs["pretrained"] = True
    try:
        model = _create(timm, arch, **kwargs)
    except RuntimeError as err:  # state dict mismatch from timm's loader
        raise ValueError(f"weights do not fit timm model {arch}: {str(err)[:500]}") from err
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"timm model {arch!r} has no forward_intermediates (no feature map)")
    # Drop what the last feature map does not use (classifier head, its norm): no dead weights.
    if hasattr(model, "prune_intermediate_layers"):
        model.prune_intermediate_layers(indices=1, prune_norm=False, prune_head=True)
    width = int(model.feature_info[-1]["num_chs"])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
    return TimmTrunk(model), width, mean, std
