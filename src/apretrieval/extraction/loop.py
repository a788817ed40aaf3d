"""The batched extraction loop, with overlapped decoding: ``Extractor`` and
``extract_descriptors``.

Images are decoded by DataLoader workers while the model runs. Images of the same size share
a forward pass: with ``sort_by_size`` the loading order groups equal sizes (read from the file
headers, which is cheap), and each loaded batch is split by size.

``Extractor`` is the writer API: a model made ready once (:meth:`Extractor.prepare`), then
:meth:`Extractor.fill` writes the descriptors of chosen images into rows of an array, as many
times as the caller needs (all rows in memory here, shard by shard in
:mod:`apretrieval.extraction.resumable`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from apretrieval.extraction.images import ImageFiles
from apretrieval.extraction.multiscale import multiscale_descriptors
from apretrieval.extraction.settings import DEFAULT_MAX_SIDE, DEFAULT_SCALES, check_scales
from apretrieval.models import eval_mode
from apretrieval.precision import fast_net
from apretrieval.threads import pin_worker

__all__ = ["Extractor", "extract_descriptors"]


class _AsTensor(Dataset[tuple[int, Tensor | str]]):
    """Items of ``base`` as (index, tensor): tensors pass through, paths are loaded.

    ``skip_bad``: an item that cannot be loaded comes as (index, error message) instead of
    raising, so one unreadable file does not end the extraction.
    """

    def __init__(
        self, base: Any, indices: Sequence[int], max_side: int | None, skip_bad: bool = False
    ) -> None:
        self.base = base
        self.indices = list(indices)
        self.max_side = max_side
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, Tensor | str]:
        i = self.indices[j]
        if not self.skip_bad:
            return i, self._load(i)
        try:
            return i, self._load(i)
        except Exception as err:  # any decoder failure (truncated, bomb, bad header): skip it
            return i, " ".join(str(err).split()) or type(err).__name__

    def _load(self, i: int) -> Tensor:
        item = self.base[i]
        if isinstance(item, str | os.PathLike):
            item = ImageFiles([item], max_side=self.max_side)[0]
        if not isinstance(item, Tensor) or item.dim() != 3 or item.shape[0] != 3:
            shape = tuple(item.shape) if isinstance(item, Tensor) else type(item).__name__
            raise ValueError(f"image {i} must be a (3, H, W) tensor or a path, got {shape}")
        return item


def _collate(items: list[tuple[int, Tensor | str]]) -> list[tuple[int, Tensor | str]]:
    return items


class _Ordered(Sampler[int]):
    def __init__(self, order: Sequence[int]) -> None:
        self.order = list(order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _size_order(images: Any, indices: Sequence[int]) -> list[int]:
    sizer: Callable[[int], tuple[int, int]] | None = getattr(images, "output_size", None)
    if sizer is None:
        return list(indices)
    sizes = {}
    for i in indices:
        try:
            sizes[i] = sizer(i)
        except ValueError:  # unreadable header (a bomb too): the loader reports or skips it
            sizes[i] = (0, 0)
    return sorted(indices, key=lambda i: (sizes[i], i))


@dataclass(frozen=True)
class Extractor:
    """A model ready to extract (fast path, device, checked settings): build it with
    :meth:`prepare`, run :meth:`fill` inside ``models.eval_mode(extractor.model)``."""

    model: nn.Module
    scales: tuple[float, ...]
    batch_size: int
    num_workers: int
    device: torch.device
    max_side: int | None
    sort_by_size: bool

    @classmethod
    def prepare(
        cls,
        model: nn.Module,
        images: Any,
        *,
        scales: Sequence[float] = DEFAULT_SCALES,
        batch_size: int = 8,
        num_workers: int = 2,
        device: str | torch.device | None = None,
        max_side: int | None = DEFAULT_MAX_SIDE,
        sort_by_size: bool = True,
        amp: str = "off",
    ) -> Extractor:
        """Check the settings and ``images`` (a sequence/Dataset of (3, H, W) tensors or
        paths); ``device`` defaults to the model's; ``amp`` as in :mod:`apretrieval.precision`.
        """
        scales = check_scales(scales)
        model = fast_net(model, amp)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not hasattr(images, "__getitem__") or not hasattr(images, "__len__"):
            raise ValueError("images must be a sequence/Dataset of tensors or paths")
        dev = torch.device(device) if device is not None else _model_device(model)
        return cls(model, scales, batch_size, num_workers, dev, max_side, sort_by_size)

    def dim(self) -> int:
        """The descriptor dimension D (``model.out_dim``, else one forward pass)."""
        dim = getattr(self.model, "out_dim", None)
        if isinstance(dim, int):
            return dim
        with torch.no_grad():
            x = torch.zeros(1, 3, 64, 64, device=self.device, dtype=_model_dtype(self.model))
            return int(self.model(x).shape[-1])

    def fill(
        self,
        out: np.ndarray,
        images: Any,
        indices: Sequence[int],
        bar: tqdm[Any],
        skipped: dict[int, str] | None = None,
    ) -> None:
        """Write the descriptor of ``images[indices[j]]`` into ``out[j]`` (``out``: (len, D)).

        ``skipped`` (a dict to fill): unreadable images are recorded there (image index ->
        error) and their rows left as they were, instead of raising.
        """
        row_of = {i: j for j, i in enumerate(indices)}
        order = _size_order(images, indices) if self.sort_by_size else list(indices)
        loader = DataLoader(
            _AsTensor(images, indices, self.max_side, skip_bad=skipped is not None),
            batch_size=self.batch_size,
            sampler=_Ordered([row_of[i] for i in order]),
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.num_workers > 0 else None,
            persistent_workers=False,
            worker_init_fn=pin_worker,  # decoding workers: one intra-op thread each
        )
        p = float(getattr(self.model, "gem_p", 3.0))
        dtype = _model_dtype(self.model)  # images arrive as float32; follow the model's precision
        for batch in loader:
            groups: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
            for i, x in batch:
                if isinstance(x, str):
                    assert skipped is not None  # only a skipping loader yields error messages
                    skipped[i] = x
                    bar.update(1)
                    continue
                groups.setdefault(tuple(x.shape), []).append((i, x))
            for members in groups.values():
                x = torch.stack([m[1] for m in members]).to(self.device, dtype, non_blocking=True)
                v = multiscale_descriptors(self.model, x, self.scales, p).float().cpu().numpy()
                out[[row_of[m[0]] for m in members]] = v
                bar.update(len(members))


def extract_descriptors(
    model: nn.Module,
    images: Any,
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    batch_size: int = 8,
    num_workers: int = 2,
    device: str | torch.device | None = None,
    max_side: int | None = DEFAULT_MAX_SIDE,
    sort_by_size: bool = True,
    progress: bool = True,
    desc: str = "extract",
    amp: str = "off",
) -> np.ndarray:
    """Descriptors of ``images`` -> (N, D) float32, L2-normalised, in the images' order.

    ``images``: a Dataset/sequence yielding (3, H, W) tensors in [0, 1] or image paths
    (loaded with the longer side shrunk to ``max_side``), e.g. :class:`ImageFiles`.
    ``device`` defaults to the model's. The model is put in eval mode for the duration.
    ``amp``: ``"bf16"`` / ``"fp16"`` run the network under autocast (see ``precision``).
    """
    run = Extractor.prepare(
        model,
        images,
        scales=scales,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        max_side=max_side,
        sort_by_size=sort_by_size,
        amp=amp,
    )
    n = len(images)
    with eval_mode(run.model), tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        out = np.zeros((n, run.dim() if n else 0), dtype=np.float32)
        run.fill(out, images, range(n), bar)
    return out
