"""Generalized-mean (GeM) pooling of convolutional feature maps.

``gem(x, p)_c = (mean_{h,w} max(x_{c,h,w}, eps)^p)^(1/p)``: p = 1 is average pooling, p -> inf
max pooling. The clamp keeps the base positive (x^p of a negative or zero value has no real
p-th root / an infinite gradient at 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GeM", "gem"]


def gem(x: Tensor, p: float | Tensor = 3.0, eps: float = 1e-6) -> Tensor:
    """GeM pooling of a feature map: (B, C, H, W) -> (B, C).

    ``p`` is a float or a tensor broadcastable to (B, C) (a learnable scalar in ``GeM``).
    Values below ``eps`` are clamped to ``eps`` before the power.
    """
    if x.dim() != 4:
        raise ValueError(f"gem expects a (B, C, H, W) feature map, got shape {tuple(x.shape)}")
    if not isinstance(p, Tensor) and p <= 0:
        raise ValueError(f"GeM power p must be > 0, got {p}")
    # Mean over the spatial dims, then the 1/p root; written with pow so p can be a tensor.
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling with a (by default learnable) power ``p``, initialised at 3.

    (B, C, H, W) -> (B, C). ``p`` is stored as a 1-element parameter so that the optimizer can
    learn it; ``learnable=False`` keeps it fixed (a buffer).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM power p must be > 0, got {p}")
        if eps <= 0:
            raise ValueError(f"GeM eps must be > 0, got {eps}")
        self.eps = float(eps)
        value = torch.tensor([float(p)])
        if learnable:
            self.p = nn.Parameter(value)
        else:
            self.register_buffer("p", value)

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()):.4f}, eps={self.eps}"
