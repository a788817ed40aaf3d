"""Listwise Average-Precision losses, their baselines and the exact AP metric.

- ``histogram``: AP_Q of a score matrix (histogram-binned, triangular kernel) and its analytic
  gradient; ``quantized_ap``.
- ``ap``: ``APLoss`` / ``TieAwareAPLoss`` on descriptors (scores formed block by block).
- ``baselines``: contrastive and triplet losses with in-batch mining.
- ``memory_bank``: ``MemoryBank`` of past batches and ``ap_loss_with_memory``.
- ``exact``: ``average_precision``, the exact (non-binned) metric.
"""

from apretrieval.losses.ap import APLoss, TieAwareAPLoss
from apretrieval.losses.baselines import ContrastiveLoss, TripletLoss
from apretrieval.losses.exact import average_precision
from apretrieval.losses.histogram import quantized_ap
from apretrieval.losses.memory_bank import MemoryBank, ap_loss_with_memory

__all__ = [
    "APLoss",
    "ContrastiveLoss",
    "MemoryBank",
    "TieAwareAPLoss",
    "TripletLoss",
    "ap_loss_with_memory",
    "average_precision",
    "quantized_ap",
]
