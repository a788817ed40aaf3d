"""Training batches: what step t trains on, replayable from (seed, t) alone.

The sampler gives the image indices of step t and ``batch_seeds`` one augmentation seed per
position, so stage 3 of multistaged backpropagation, a resumed run and every rank of a
distributed run all rebuild exactly the same images. Batches that fit in memory are decoded
once per step by DataLoader workers (prefetching the next step); larger ones stream as loaders
that multistage calls in stage 1 and again in stage 3.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from apretrieval.data.lists import ImageList
from apretrieval.data.sampler import ClassBalancedBatchSampler
from apretrieval.data.transforms import TrainTransform, batch_seeds
from apretrieval.threads import pin_worker
from apretrieval.train_config import TrainConfig

__all__ = ["AugmentedImages", "fits_in_memory", "step_batches"]


class AugmentedImages(torch.utils.data.Dataset[Tensor | None]):
    """Item (index, seed) -> augmented (3, H, W) tensor, or None if the file is unreadable."""

    def __init__(self, images: ImageList, transform: TrainTransform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> Tensor | None:
        index, seed = item
        return self.images.load(index, lambda img: self.transform(img, seed))


class _Loader:
    """A deferred ``AugmentedImages`` item: multistage calls it in stage 1 and again in stage 3."""

    def __init__(self, data: AugmentedImages, index: int, seed: int) -> None:
        self.data, self.index, self.seed = data, index, seed

    def __call__(self) -> Tensor | None:
        return self.data[(self.index, self.seed)]


class _StepItems:
    """Lazy batch sampler for the DataLoader: the (index, seed) items of each step."""

    def __init__(
        self,
        sampler: ClassBalancedBatchSampler,
        seed: int,
        steps: range,
        shard: slice = slice(None),
    ) -> None:
        self.sampler, self.seed, self.steps, self.shard = sampler, seed, steps, shard

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in self.steps:
            idx = self.sampler.batch(step)
            seeds = batch_seeds(self.seed, step, len(idx))
            yield [(int(i), s) for i, s in zip(idx, seeds, strict=True)][self.shard]


def _keep_list(batch: list[Any]) -> list[Any]:
    return batch  # variable-size images: no stacking (the collate default would fail)


def step_batches(
    cfg: TrainConfig,
    images: ImageList,
    sampler: ClassBalancedBatchSampler,
    start: int,
    in_memory: bool,
    shard: slice = slice(None),
) -> Iterator[tuple[list[Any], Tensor]]:
    """(inputs, labels) for steps start..steps-1: decoded tensors (prefetched by DataLoader
    workers, each image decoded once per step) or, for batches too large for memory, loaders.
    ``shard``: this rank's positions in the batch (augmentation seeds stay those of the batch)."""
    data = AugmentedImages(images, TrainTransform(cfg.augment_config()))

    steps = range(start, cfg.steps)
    if not in_memory:
        for step in steps:
            idx = sampler.batch(step)
            seeds = batch_seeds(cfg.seed, step, len(idx))
            loaders = [_Loader(data, int(i), s) for i, s in zip(idx, seeds, strict=True)]
            yield loaders[shard], torch.as_tensor(images.labels[idx])[shard]
        return
    loader = torch.utils.data.DataLoader(
        data,
        batch_sampler=_StepItems(sampler, cfg.seed, steps, shard),
        num_workers=cfg.num_workers,
        collate_fn=_keep_list,
        prefetch_factor=1 if cfg.num_workers > 0 else None,
        worker_init_fn=pin_worker,  # one thread each; signals are the main process's to handle
    )
    for step, tensors in zip(steps, loader, strict=True):
        ok = [j for j, t in enumerate(tensors) if t is not None]
        labels = torch.as_tensor(images.labels[sampler.batch(step)[shard][ok]])
        yield [tensors[j] for j in ok], labels


def fits_in_memory(cfg: TrainConfig) -> bool:
    per_image = 3 * cfg.max_side**2 * 4  # float32 upper bound
    batches = 1 + max(cfg.num_workers, 0)  # current batch + those prefetched
    return cfg.batch_size * per_image * batches <= cfg.image_cache_mb * 2**20
