"""Input validation shared by the losses: ValueError naming the offending value."""

from __future__ import annotations

import torch
from torch import Tensor


def check_finite(name: str, x: Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN/inf value(s)")


def check_pair(scores: Tensor, relevance: Tensor) -> None:
    if not isinstance(scores, Tensor) or not isinstance(relevance, Tensor):
        raise ValueError("scores and relevance must be torch tensors")
    if scores.dim() != 2:
        raise ValueError(f"scores must be (Q, N), got shape {tuple(scores.shape)}")
    if relevance.shape != scores.shape:
        raise ValueError(
            f"relevance shape {tuple(relevance.shape)} != scores shape {tuple(scores.shape)}"
        )
    if scores.numel() == 0:
        raise ValueError(f"scores is empty, shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    check_finite("scores", scores)


def check_descriptors(name: str, x: Tensor, labels: Tensor) -> None:
    if not isinstance(x, Tensor) or not isinstance(labels, Tensor):
        raise ValueError(f"{name} and its labels must be torch tensors")
    if x.dim() != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"{name} labels must be ({x.shape[0]},), got shape {tuple(labels.shape)}")
    check_finite(name, x)
