"""Multi-scale descriptor extraction, batched, with overlapped decoding and resumable output.

For an image ``x`` and scales ``s_1..s_S`` (default 1, 1/sqrt(2), 1/2), the model gives one
L2-normalised descriptor ``d_s`` per rescaled copy; they are combined by the generalized mean
of power ``p = model.gem_p`` (the power the model pools with) and L2-normalised again:

    v = normalize( sgn(m) |m|^(1/p) ),   m = mean_s sgn(d_s) |d_s|^p

The signed powers make this well defined for descriptors with negative components (after a
whitening layer); for non-negative descriptors it is the plain power mean.

Images are decoded by DataLoader workers while the model runs. Images of the same size share
a forward pass: with ``sort_by_size`` the loading order groups equal sizes (read from the file
headers, which is cheap), and each loaded batch is split by size.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from apretrieval.data.decode import decode_rgb, oriented_size
from apretrieval.descriptors import features_paths
from apretrieval.precision import fast_net
from apretrieval.threads import pin_worker

__all__ = [
    "DEFAULT_MAX_SIDE",
    "DEFAULT_SCALES",
    "IMAGE_EXTENSIONS",
    "ImageFiles",
    "combine_scales",
    "eval_mode",
    "extract_descriptors",
    "extract_to_file",  # noqa: F822 (from apretrieval.resumable, see __getattr__)
    "features_paths",
    "list_images",
    "multiscale_descriptors",
]

DEFAULT_SCALES: tuple[float, ...] = (1.0, 2**-0.5, 0.5)
# Longer image side before scaling, pixels (the size multi-scale test images start from).
DEFAULT_MAX_SIDE = 1024
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, back in the mode it had after (even on error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def __getattr__(name: str) -> Any:
    # Resumable extraction to files lives in its own module (which imports this one).
    if name == "extract_to_file":
        return importlib.import_module("apretrieval.resumable").extract_to_file
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Images


def _fit_size(w: int, h: int, max_side: int | None) -> tuple[int, int]:
    """(w, h) shrunk so the longer side is at most ``max_side`` (never enlarged)."""
    if max_side is None or max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


class ImageFiles(Dataset[Tensor]):
    """Image files -> (3, H, W) float32 RGB in [0, 1].

    ``boxes`` (optional, one per image or None): crop ``[x1, y1, x2, y2]`` in pixels, applied
    before resizing (queries of the revisited benchmarks). ``max_side``: the longer side is
    shrunk to at most this many pixels (None keeps the size).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        boxes: Sequence[Sequence[float] | None] | None = None,
        max_side: int | None = DEFAULT_MAX_SIDE,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        if boxes is not None and len(boxes) != len(self.paths):
            raise ValueError(f"{len(boxes)} boxes for {len(self.paths)} images")
        if max_side is not None and max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}")
        self.boxes = list(boxes) if boxes is not None else None
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.paths)

    def _box(self, i: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
        from apretrieval.data.revisited import crop_box

        box = self.boxes[i] if self.boxes is not None else None
        return (0, 0, *size) if box is None else crop_box(box, size)

    def output_size(self, i: int) -> tuple[int, int]:
        """(H, W) of item ``i`` from the file header, without decoding the pixels."""
        with Image.open(self.paths[i]) as img:
            x1, y1, x2, y2 = self._box(i, oriented_size(img))
        w, h = _fit_size(x2 - x1, y2 - y1, self.max_side)
        return h, w

    def __getitem__(self, i: int) -> Tensor:
        try:
            with Image.open(self.paths[i]) as img:
                box = self._box(i, oriented_size(img))
                size = _fit_size(box[2] - box[0], box[3] - box[1], self.max_side)
                rgb = decode_rgb(img, box, size)
        except OSError as err:
            raise ValueError(f"cannot read image {self.paths[i]}: {err}") from None
        return TF.to_dtype(TF.pil_to_tensor(rgb), torch.float32, scale=True)


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder not found: {folder}")
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


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


# --------------------------------------------------------------------------------------------
# Multi-scale descriptors


def combine_scales(descs: Tensor, p: float) -> Tensor:
    """Signed generalized mean over scales, then L2: (S, B, D) -> (B, D)."""
    if descs.dim() != 3:
        raise ValueError(f"expected (scales, B, D) descriptors, got shape {tuple(descs.shape)}")
    if not p > 0:
        raise ValueError(f"power p must be > 0, got {p}")
    if descs.shape[0] == 1:
        return F.normalize(descs[0], dim=-1)
    d = descs.double()
    m = (d.sign() * d.abs().pow(p)).mean(dim=0)
    v = m.sign() * m.abs().pow(1.0 / p)
    return F.normalize(v, dim=-1).to(descs.dtype)


def scaled_size(n: int, s: float) -> int:
    """``n`` pixels at scale ``s``, rounded half up (not Python's half-to-even ``round``): one
    rule that the exported ONNX / TorchScript graphs compute the same way (int() truncates)."""
    return max(1, int(n * s + 0.5))


def _rescale(x: Tensor, s: float) -> Tensor:
    if s == 1.0:
        return x
    h, w = x.shape[-2:]
    size = (scaled_size(h, s), scaled_size(w, s))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def multiscale_descriptors(
    model: nn.Module,
    images: Tensor,
    scales: Sequence[float] = DEFAULT_SCALES,
    p: float | None = None,
) -> Tensor:
    """Descriptors of a batch of same-size images: (B, 3, H, W) in [0, 1] -> (B, D).

    ``p`` defaults to ``model.gem_p`` (3 for a model without one).
    """
    if p is None:
        p = float(getattr(model, "gem_p", 3.0))
    descs = torch.stack([F.normalize(model(_rescale(images, s)), dim=-1) for s in scales])
    return combine_scales(descs, p)


def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(s) for s in scales)
    if not out or any(not (math.isfinite(s) and s > 0) for s in out):
        raise ValueError(f"scales must be positive numbers, got {scales!r}")
    return out


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
    try:
        sizes = {i: sizer(i) for i in indices}
    except (OSError, ValueError):  # unreadable header: fall back, the loader will report it
        return list(indices)
    return sorted(indices, key=lambda i: (sizes[i], i))


def _extract_into(
    out: np.ndarray,
    model: nn.Module,
    images: Any,
    indices: Sequence[int],
    *,
    scales: tuple[float, ...],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    max_side: int | None,
    sort_by_size: bool,
    bar: tqdm[Any],
    skipped: dict[int, str] | None = None,
) -> None:
    """Fill ``out[j]`` with the descriptor of ``images[indices[j]]``.

    ``skipped`` (a dict to fill): unreadable images are recorded there (image index -> error)
    and their rows left zero, instead of raising.
    """
    row_of = {i: j for j, i in enumerate(indices)}
    order = _size_order(images, indices) if sort_by_size else list(indices)
    loader = DataLoader(
        _AsTensor(images, indices, max_side, skip_bad=skipped is not None),
        batch_size=batch_size,
        sampler=_Ordered([row_of[i] for i in order]),
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=pin_worker,  # decoding workers: one intra-op thread each
    )
    p = float(getattr(model, "gem_p", 3.0))
    dtype = _model_dtype(model)  # images arrive as float32; follow the model's precision
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
            x = torch.stack([m[1] for m in members]).to(device, dtype, non_blocking=True)
            v = multiscale_descriptors(model, x, scales, p).float().cpu().numpy()
            out[[row_of[m[0]] for m in members]] = v
            bar.update(len(members))


def _prepare(model: nn.Module, images: Any, batch_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if not hasattr(images, "__getitem__") or not hasattr(images, "__len__"):
        raise ValueError("images must be a sequence/Dataset of tensors or paths")


def _descriptor_dim(model: nn.Module, device: torch.device) -> int:
    dim = getattr(model, "out_dim", None)
    if isinstance(dim, int):
        return dim
    with torch.no_grad():
        x = torch.zeros(1, 3, 64, 64, device=device, dtype=_model_dtype(model))
        return int(model(x).shape[-1])


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
    scales = _check_scales(scales)
    model = fast_net(model, amp)
    _prepare(model, images, batch_size, num_workers)
    dev = torch.device(device) if device is not None else _model_device(model)
    n = len(images)
    with eval_mode(model), tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        out = np.zeros((n, _descriptor_dim(model, dev) if n else 0), dtype=np.float32)
        _extract_into(
            out,
            model,
            images,
            range(n),
            scales=scales,
            batch_size=batch_size,
            num_workers=num_workers,
            device=dev,
            max_side=max_side,
            sort_by_size=sort_by_size,
            bar=bar,
        )
    return out
