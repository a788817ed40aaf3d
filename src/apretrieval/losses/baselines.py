"""Baselines the paper compares against."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from apretrieval.losses._checks import check_descriptors

__all__ = ["ContrastiveLoss", "TripletLoss"]


def _pairwise_labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


class ContrastiveLoss(nn.Module):
    """Contrastive loss on all positive pairs and the hardest negatives of the batch.

    For each anchor: ``0.5 * ||a - p||^2`` for every positive, and
    ``0.5 * max(0, margin - ||a - n||)^2`` for its ``num_hard`` most similar negatives
    (hard-negative mining inside the batch, the batch acting as the mining pool).
    (B, D), (B,) -> scalar mean over the selected pairs.
    """

    def __init__(self, margin: float = 0.7, num_hard: int = 5) -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        if num_hard < 1:
            raise ValueError(f"num_hard must be >= 1, got {num_hard}")
        self.margin, self.num_hard = float(margin), int(num_hard)

    def forward(self, descriptors: Tensor, labels: Tensor) -> Tensor:
        check_descriptors("descriptors", descriptors, labels)
        dist = torch.cdist(descriptors, descriptors).clamp(min=0)
        pos, neg = _pairwise_labels(labels)
        terms = [0.5 * dist[pos].pow(2)]
        k = min(self.num_hard, int(neg.sum(1).max()))
        if k > 0:
            masked = dist.masked_fill(~neg, float("inf"))
            hard, _ = masked.topk(k, dim=1, largest=False)
            hard = hard[torch.isfinite(hard)]
            terms.append(0.5 * (self.margin - hard).clamp(min=0).pow(2))
        all_terms = torch.cat(terms)
        if all_terms.numel() == 0:
            raise ValueError("batch has no positive nor negative pair")
        return all_terms.mean()


class TripletLoss(nn.Module):
    """Triplet loss with batch-hard mining: ``max(0, margin + d(a, p_hard) - d(a, n_hard))``.

    Anchors without a positive or a negative are skipped. (B, D), (B,) -> scalar.
    """

    def __init__(self, margin: float = 0.1) -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        self.margin = float(margin)

    def forward(self, descriptors: Tensor, labels: Tensor) -> Tensor:
        check_descriptors("descriptors", descriptors, labels)
        dist = torch.cdist(descriptors, descriptors).clamp(min=0)
        pos, neg = _pairwise_labels(labels)
        ok = pos.any(1) & neg.any(1)
        if not ok.any():
            raise ValueError("no anchor has both a positive and a negative in the batch")
        d_pos = dist.masked_fill(~pos, float("-inf")).amax(1)
        d_neg = dist.masked_fill(~neg, float("inf")).amin(1)
        return (self.margin + d_pos[ok] - d_neg[ok]).clamp(min=0).mean()
