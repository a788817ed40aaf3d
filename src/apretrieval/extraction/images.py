"""Image files as extraction input: ``ImageFiles`` (crop, cap the longer side) and the image
files of a folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from apretrieval.data.decode import DECODE_ERRORS, crop_box, decode_rgb, oriented_size
from apretrieval.data.lists import IMAGE_EXTENSIONS
from apretrieval.extraction.settings import DEFAULT_MAX_SIDE, scaled_size

__all__ = ["ImageFiles", "image_ids", "list_images"]


def _fit_size(w: int, h: int, max_side: int | None) -> tuple[int, int]:
    """(w, h) shrunk so the longer side is at most ``max_side`` (never enlarged); sizes are
    rounded half up, the rule the exported networks compute (:mod:`apretrieval.export`)."""
    if max_side is None or max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return scaled_size(w, scale), scaled_size(h, scale)


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
        box = self.boxes[i] if self.boxes is not None else None
        return (0, 0, *size) if box is None else crop_box(box, size)

    def output_size(self, i: int) -> tuple[int, int]:
        """(H, W) of item ``i`` from the file header, without decoding the pixels; ValueError
        naming the file when the header cannot be used."""
        try:
            with Image.open(self.paths[i]) as img:
                x1, y1, x2, y2 = self._box(i, oriented_size(img))
        except DECODE_ERRORS as err:
            raise ValueError(f"cannot read image {self.paths[i]}: {err}") from None
        w, h = _fit_size(x2 - x1, y2 - y1, self.max_side)
        return h, w

    def __getitem__(self, i: int) -> Tensor:
        try:
            with Image.open(self.paths[i]) as img:
                box = self._box(i, oriented_size(img))
                size = _fit_size(box[2] - box[0], box[3] - box[1], self.max_side)
                rgb = decode_rgb(img, box, size)
        except DECODE_ERRORS as err:  # a bomb too: refused at open, named with its file
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


def image_ids(paths: Sequence[Path], folder: str | os.PathLike[str]) -> list[str]:
    """Ids of image files: their paths relative to ``folder``, with ``/`` separators.

    An id is text (it is written in the descriptor file's JSON manifest and printed): the
    bytes of a file name that are not valid UTF-8 (a Latin-1 name from an old archive) are
    written ``\\xNN``, so ``caf\\xe9.jpg`` names the file whose name holds byte 0xE9.
    """
    return [
        p.relative_to(folder)
        .as_posix()
        .encode("utf-8", "surrogateescape")
        .decode("utf-8", "backslashreplace")
        for p in paths
    ]
