"""Class-balanced batch sampler with an exactly restorable random state.

A batch of B images holds C = B / K classes with K images each, so every image of the batch has
K - 1 positives (a query without positive contributes nothing to the AP loss) and the rest of
the batch as negatives. No batch holds a class twice: with n drawable classes, an epoch is
floor(n / C) batches cut from one random order of the classes, and the n mod C classes left at
the end of that order sit out the epoch (a different random few each epoch). A window running
into the next epoch's order could repeat a class, and a batch of one class has no negative
(loss 0). When C >= n, every batch holds all n classes, the C groups of K images spread over
them as evenly as possible. The images of a class are drawn at random (without replacement
when the class has enough images).

The random state is a counter: the batch of step t is drawn from generators seeded by
(seed, t), so ``state_dict() == {"seed", "step", ...}`` restores the exact same stream, and
any process can produce batch t (prefetching workers, a shard of a distributed batch).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["ClassBalancedBatchSampler", "has_positive"]

log = logging.getLogger("apretrieval.data")

# Stream tags, so the class order and the image draws use independent generators.
_CLASS_ORDER, _IMAGE_DRAW = 0, 1


class ClassBalancedBatchSampler:
    """Index batches of ``batch_size`` = C x ``images_per_class`` for a labelled image list.

    ``labels`` (N,) ints. Classes with fewer than ``min_images_per_class`` images are never
    drawn (they would give queries without positives); fewer than 2 drawable classes is a
    ValueError (no negatives, nothing to learn). Iterating yields lists of indices from the
    current ``step`` up to ``steps`` (forever when None), advancing ``step``.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        images_per_class: int = 4,
        seed: int = 0,
        steps: int | None = None,
        min_images_per_class: int = 2,
    ) -> None:
        if images_per_class < 1:
            raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
        if batch_size < images_per_class or batch_size % images_per_class:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of "
                f"images_per_class ({images_per_class})"
            )
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        order = np.argsort(labels, kind="stable")
        classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        keep = counts >= min_images_per_class
        if not keep.any():
            raise ValueError(
                f"no class has at least {min_images_per_class} images "
                f"({labels.size} images, {classes.size} classes)"
            )
        if keep.sum() < 2:
            raise ValueError(
                f"training needs at least 2 classes with {min_images_per_class} or more images, "
                f"got {int(keep.sum())} ({labels.size} images, {classes.size} classes): "
                "a batch of one class has no negative and its loss is 0"
            )
        if images_per_class < 2:
            log.warning(
                "images_per_class=%d: no image of a batch has a positive (the AP and triplet "
                "losses need at least 2 images per class)",
                images_per_class,
            )
        # members[c] = dataset indices of the c-th eligible class, ascending.
        self.members = [order[s : s + n] for s, n in zip(starts[keep], counts[keep], strict=True)]
        self.class_ids = classes[keep]
        self.batch_size = int(batch_size)
        self.images_per_class = int(images_per_class)
        self.classes_per_batch = self.batch_size // self.images_per_class
        self.seed = int(seed)
        self.steps = steps
        self.step = 0

    @property
    def num_classes(self) -> int:
        """Classes that can be drawn (at least ``min_images_per_class`` images)."""
        return len(self.members)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _CLASS_ORDER, epoch])
        return rng.permutation(self.num_classes)

    def batch_classes(self, step: int) -> np.ndarray:
        """(min(C, n),) distinct positions into ``members``: the classes of batch ``step``."""
        n, c = self.num_classes, self.classes_per_batch
        if c >= n:  # every class in every batch, in a fresh order
            return self._epoch_order(step)
        epoch, j = divmod(step, n // c)
        return self._epoch_order(epoch)[j * c : (j + 1) * c]

    def images_per_batch_class(self, step: int) -> np.ndarray:
        """(len(batch_classes(step)),) images of each class in batch ``step``: K when C <= n,
        else the C groups of K spread over the n classes (the first C mod n get one more)."""
        n, c, k = self.num_classes, self.classes_per_batch, self.images_per_class
        if c <= n:
            return np.full(c, k, dtype=np.int64)
        return k * (c // n + (np.arange(n) < c % n)).astype(np.int64)

    def batch(self, step: int) -> np.ndarray:
        """(B,) dataset indices of batch ``step``, grouped by class (consecutive, distinct
        classes; K images each when the batch holds at most as many classes as there are)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rng = np.random.default_rng([self.seed, _IMAGE_DRAW, step])
        out = np.empty(self.batch_size, dtype=np.int64)
        start = 0
        counts = self.images_per_batch_class(step)
        for cls, k in zip(self.batch_classes(step), counts, strict=True):
            members = self.members[cls]
            pick = rng.choice(members.size, size=k, replace=members.size < k)
            out[start : start + k] = members[pick]
            start += k
        assert start == self.batch_size
        return out

    def __iter__(self) -> Iterator[list[int]]:
        while self.steps is None or self.step < self.steps:
            batch = self.batch(self.step)
            self.step += 1
            yield batch.tolist()

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless sampler (steps=None) has no length")
        return max(0, self.steps - self.step)

    def state_dict(self) -> dict[str, Any]:
        """Plain ints (checkpoint-safe); with the data it restores the stream exactly."""
        return {
            "seed": self.seed,
            "step": self.step,
            "batch_size": self.batch_size,
            "images_per_class": self.images_per_class,
            "num_classes": self.num_classes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("batch_size", "images_per_class", "num_classes"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this sampler has "
                    f"{getattr(self, key)}: resuming on different data or batch settings"
                )
        self.seed = int(state["seed"])
        self.step = int(state["step"])


def has_positive(labels: Sequence[int] | np.ndarray) -> bool:
    """Whether some item of a batch shares its label with another (a query with a positive)."""
    labels = np.asarray(labels).reshape(-1)
    return np.unique(labels).size < labels.size
