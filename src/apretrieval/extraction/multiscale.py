"""Multi-scale descriptors of one batch of same-size images.

For an image ``x`` and scales ``s_1..s_S`` (default 1, 1/sqrt(2), 1/2), the model gives one
L2-normalised descriptor ``d_s`` per rescaled copy; they are combined by the generalized mean
of power ``p = model.gem_p`` (the power the model pools with) and L2-normalised again:

    v = normalize( sgn(m) |m|^(1/p) ),   m = mean_s sgn(d_s) |d_s|^p

The signed powers make this well defined for descriptors with negative components (after a
whitening layer); for non-negative descriptors it is the plain power mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apretrieval.extraction.settings import DEFAULT_SCALES, scaled_size

__all__ = ["combine_scales", "multiscale_descriptors"]


def combine_scales(descs: Tensor, p: float) -> Tensor:
    """Signed generalized mean over scales, then L2: (S, B, D) -> (B, D)."""
    if descs.dim() != 3:
        raise ValueError(f"expected (scales, B, D) descriptors, got shape {tuple(descs.shape)}")
    if not p > 0:
        raise ValueError(f"power p must be > 0, got {p}")
    if descs.shape[0] == 1:
        return F.normalize(descs[0], dim=-1)
    d = descs.double()
    m = (d.sign() * d.abs().pow(p)).mean(dim=0)
    v = m.sign() * m.abs().pow(1.0 / p)
    return F.normalize(v, dim=-1).to(descs.dtype)


def _rescale(x: Tensor, s: float) -> Tensor:
    if s == 1.0:
        return x
    h, w = x.shape[-2:]
    size = (scaled_size(h, s), scaled_size(w, s))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def multiscale_descriptors(
    model: nn.Module,
    images: Tensor,
    scales: Sequence[float] = DEFAULT_SCALES,
    p: float | None = None,
) -> Tensor:
    """Descriptors of a batch of same-size images: (B, 3, H, W) in [0, 1] -> (B, D).

    ``p`` defaults to ``model.gem_p`` (3 for a model without one).
    """
    if p is None:
        p = float(getattr(model, "gem_p", 3.0))
    descs = torch.stack([F.normalize(model(_rescale(images, s)), dim=-1) for s in scales])
    return combine_scales(descs, p)
