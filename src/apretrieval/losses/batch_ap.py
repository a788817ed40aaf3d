"""AP_Q against exact AP on a training batch, for the training log.

Each image of the batch queries the other B - 1 (itself left out, as in the batch form of
the AP loss); the positives are the images of its class. Over the images that have a positive:
``batch_ap`` is the mean exact AP (``average_precision``) and ``batch_ap_q`` the mean AP_Q of
the training loss's own estimator and bins, i.e. what the loss optimises, on the same
rankings. The gap between the two is the estimator's error on the network's current scores.
With a memory bank the loss also ranks the bank; both values here rank the batch only.
Cost: one (B, B) score matrix and a row sort, O(B^2 log B), no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from apretrieval.losses.ap import APLoss
from apretrieval.losses.exact import average_precision
from apretrieval.losses.histogram import quantized_ap

__all__ = ["batch_ap_metrics"]


@torch.no_grad()
def batch_ap_metrics(descriptors: Tensor, labels: Tensor, loss_fn: nn.Module) -> dict[str, float]:
    """Mean exact AP and mean AP_Q of the batch: descriptors (B, D), labels (B,).

    Returns ``{"batch_ap": ..., "batch_ap_q": ...}``; ``batch_ap_q`` only when ``loss_fn`` is
    an :class:`APLoss` (its estimator, ``num_bins`` and ``score_range``); ``{}`` when no image
    has a positive in the batch.
    """
    b = descriptors.shape[0]
    if b < 2:
        return {}
    d = descriptors.detach().float()
    others = ~torch.eye(b, dtype=torch.bool, device=d.device)
    scores = (d @ d.T)[others].view(b, b - 1)
    rel = (labels[:, None] == labels[None, :])[others].view(b, b - 1)
    has_pos = rel.any(1)
    if not has_pos.any():
        return {}
    scores, rel = scores[has_pos], rel[has_pos]
    out = {"batch_ap": float(average_precision(scores, rel).mean())}
    if isinstance(loss_fn, APLoss):
        ap_q = quantized_ap(
            scores, rel, loss_fn.num_bins, loss_fn.score_range, estimator=loss_fn.estimator
        )
        out["batch_ap_q"] = float(ap_q.mean())
    return out
