"""Listwise Average-Precision losses, their baselines and the exact AP metric.

- ``histogram``: AP_Q of a score matrix (histogram-binned, triangular kernel) and its analytic
  gradient; ``quantized_ap``.
- ``ap``: ``ListwiseLoss``, the machinery of every listwise loss (scores formed block by
  block, or whole), and ``APLoss`` / ``TieAwareAPLoss``.
- ``smooth_ap``, ``supap``, ``recall_at_k``: ``SmoothAPLoss``, ``SupAPLoss`` / ``RoadmapLoss``
  and ``RecallAtKLoss``, from the ranks of the positives (``_pairs``), O(B^2 P).
- ``baselines``: contrastive and triplet losses with in-batch mining.
- ``memory_bank``: ``MemoryBank`` of past batches and ``ap_loss_with_memory``.
- ``exact``: ``average_precision``, the exact (non-binned) metric.
"""
