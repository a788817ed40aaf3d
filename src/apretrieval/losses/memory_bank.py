"""A memory bank of past descriptors for the listwise losses (cross-batch negatives).

The detached descriptors of the last K batches are kept, and each query of the current batch
ranks the other B - 1 batch items *and* the (M, D) bank, so its AP sees (K + 1) times more
negatives (and possibly positives) per step at the cost of one (B, B + M) score matrix. The
bank carries no gradient: it holds past, stale descriptors, which the loss treats as constants.

In a distributed run every rank pushes the same all-gathered batch, so all ranks hold the same
bank; it works alike in one process.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from apretrieval.losses.ap import ListwiseLoss

__all__ = ["MemoryBank", "ap_loss_with_memory"]


class MemoryBank:
    """Descriptors (detached) and labels of the last ``num_batches`` batches, FIFO.

    ``num_batches=0`` is an always-empty bank.
    """

    def __init__(self, num_batches: int) -> None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
            raise ValueError(f"memory_batches must be an integer >= 0, got {num_batches!r}")
        self.num_batches = num_batches
        self._items: deque[tuple[Tensor, Tensor]] = deque(maxlen=max(num_batches, 1))

    def __len__(self) -> int:
        """Number of descriptors held."""
        return sum(d.shape[0] for d, _ in self._items) if self.num_batches else 0

    def push(self, descriptors: Tensor, labels: Tensor) -> None:
        """Add one batch (N, D), (N,); the oldest batch leaves when K are held."""
        if self.num_batches:
            self._items.append((descriptors.detach().clone(), labels.detach().clone()))

    def tensors(self) -> tuple[Tensor, Tensor] | None:
        """(M, D) descriptors and (M,) labels, oldest batch first; None when empty."""
        if not self.num_batches or not self._items:
            return None
        return torch.cat([d for d, _ in self._items]), torch.cat([lb for _, lb in self._items])

    def state_dict(self) -> dict[str, Any]:
        """CPU tensors (checkpoint-safe): resuming restores the negatives the bank held."""
        return {
            "num_batches": self.num_batches,
            "descriptors": [d.cpu() for d, _ in self._items] if self.num_batches else [],
            "labels": [lb.cpu() for _, lb in self._items] if self.num_batches else [],
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        """Restore; a smaller ``num_batches`` than saved keeps the newest batches."""
        self._items.clear()
        pairs = list(zip(state.get("descriptors", []), state.get("labels", []), strict=True))
        for d, lb in pairs[-self.num_batches :] if self.num_batches else []:
            self._items.append((d.to(device) if device else d, lb.to(device) if device else lb))


def ap_loss_with_memory(
    loss_fn: Callable[[Tensor, Tensor], Tensor],  # a ListwiseLoss, else ValueError
    descriptors: Tensor,
    labels: Tensor,
    memory: Tensor,
    memory_labels: Tensor,
) -> tuple[float, Tensor]:
    """Loss value and dL/dD (B, D): each query ranks the batch (minus itself) and the (M, D)
    ``memory`` (no gradient: it is detached). An empty memory gives the plain batch loss.

    The database is [batch; memory] and ``query_index`` tells the loss each query's own column,
    which it does not rank; autograd sums a batch item's two roles (query and database item).
    """
    if not isinstance(loss_fn, ListwiseLoss):
        raise ValueError(f"a memory bank needs a listwise loss, got {type(loss_fn).__name__}")
    d = descriptors.detach().requires_grad_(True)
    labels = labels.to(d.device)
    with torch.enable_grad():
        if memory.shape[0] == 0:
            loss = loss_fn(d, labels)
        else:
            db = torch.cat([d, memory.detach().to(device=d.device, dtype=d.dtype)])
            db_labels = torch.cat([labels, memory_labels.to(d.device)])
            query_index = torch.arange(d.shape[0], device=d.device)
            loss = loss_fn(d, labels, db, db_labels, query_index=query_index)
        (grad,) = torch.autograd.grad(loss, d)
    return float(loss.detach()), grad
