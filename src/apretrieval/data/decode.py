"""One way to turn any image file Pillow opens into 8-bit RGB pixels, used everywhere.

Training, extraction and search all decode through ``decode_rgb``, so one file gives the same
pixels wherever it is read. Pillow's ``convert("RGB")`` is right for the 8-bit modes but not
for the others, which are handled here:

* 16/32-bit integer greyscale (``I;16``, ``I;16B``, ``I``; e.g. 16-bit PNG and TIFF):
  Pillow clips at 255, so a 16-bit photo becomes white. The full range 0..65535 is mapped to
  0..255 (``round(v * 255 / 65535)``, exact for 8-bit values stored as ``v * 257``).
* float greyscale (``F``): read as [0, 1] when no value exceeds 1, else as [0, 255].
* transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``La`` / ``RGBa``, and ``L`` / ``RGB``
  / ``P`` with a ``transparency`` entry): composited over white, instead of exposing whatever
  colour happens to sit under transparent pixels (often black).
* ``CMYK``: ``R = (255 - C)(255 - K) / 255`` per channel, explicitly (not every Pillow
  version converts this way).
* EXIF orientation: applied, so the image is seen upright, as a viewer shows it; crop boxes
  are in these displayed coordinates.

Large JPEGs are decoded at 1/2, 1/4 or 1/8 size by the decoder itself (``draft``) when the
requested output is that much smaller; the final bilinear resize then only shrinks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "DECODE_ERRORS",
    "crop_box",
    "decode_rgb",
    "jpeg_draft",
    "orientation",
    "oriented_size",
    "to_rgb",
]

# What Pillow raises for an unreadable, truncated or hostile file (a decompression bomb: a
# header declaring billions of pixels, refused at open before any pixel is decoded).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the stored pixels upright.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_HIGH_BIT_INT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_BACKGROUND = (255, 255, 255, 255)  # what transparent pixels show


def orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8 of ``img`` (1, upright, when absent or invalid)."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError):  # a damaged EXIF block does not hide the pixels
        return 1
    return value if value in _TRANSPOSE else 1


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation; header only."""
    w, h = img.size
    return (h, w) if orientation(img) in (5, 6, 7, 8) else (w, h)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB pixels of ``img`` in any mode (decodes it); no orientation, no resize."""
    mode = img.mode
    if mode in _HIGH_BIT_INT:
        v = np.asarray(img).astype(np.float64)
        return _grey_to_rgb(np.clip(v, 0, 65535) * (255 / 65535))
    if mode == "F":
        v = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if v.size == 0 or v.max() <= 1.0 else 1.0
        return _grey_to_rgb(np.clip(v * scale, 0, 255))
    if mode == "CMYK":
        c = np.asarray(img).astype(np.float64)
        rgb = (255 - c[..., :3]) * (255 - c[..., 3:]) / 255
        return Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _BACKGROUND), rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as err:  # a mode Pillow opens but cannot convert (e.g. LAB)
        raise OSError(f"cannot convert image mode {mode!r} to RGB: {err}") from None


def _grey_to_rgb(v: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(v).astype(np.uint8), "L").convert("RGB")


def jpeg_draft(img: Image.Image, scale: float) -> None:
    """Let the JPEG decoder shrink ``img`` (not yet decoded) by 2/4/8 when ``scale`` < 0.5.

    ``draft`` keeps the decoded image at least ``scale`` times the stored size, so a resize
    afterwards still only shrinks. Other formats are left as they are.
    """
    if getattr(img, "format", None) == "JPEG" and scale < 0.5:
        w, h = img.size
        img.draft(img.mode, (math.ceil(w * scale), math.ceil(h * scale)))


def decode_rgb(
    img: Image.Image,
    box: tuple[float, float, float, float] | None = None,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """Upright 8-bit RGB image from a (lazily) opened file, cropped and resized.

    ``box`` (left, top, right, bottom) in displayed pixels (default: the whole image);
    ``size`` (width, height) of the output (default: the box's size). The crop and the
    bilinear resize are one resampling step.
    """
    shown = oriented_size(img)
    if box is None:
        box = (0, 0, *shown)
    bw, bh = box[2] - box[0], box[3] - box[1]
    if bw <= 0 or bh <= 0:
        raise ValueError(f"empty crop box {box} for an image of size {shown}")
    if size is None:
        size = (max(1, round(bw)), max(1, round(bh)))
    jpeg_draft(img, max(size[0] / bw, size[1] / bh))
    transpose = _TRANSPOSE.get(orientation(img))
    rgb = to_rgb(img)
    if transpose is not None:
        rgb = rgb.transpose(transpose)
    # The decoder may have shrunk the image (draft): the box scales with it.
    fx, fy = rgb.size[0] / shown[0], rgb.size[1] / shown[1]
    scaled = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    if tuple(size) == rgb.size and scaled == (0, 0, *rgb.size):
        return rgb
    return rgb.resize((size[0], size[1]), Image.Resampling.BILINEAR, box=scaled)


def crop_box(bbx: Any, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer crop box from a ``bbx`` ``[x1, y1, x2, y2]`` (pixels, floats allowed).

    Coordinates are rounded (as PIL's ``crop`` does with float boxes) and clipped to the image
    ``size`` (width, height); an empty box is a ValueError.
    """
    x1, y1, x2, y2 = (float(v) for v in np.asarray(bbx, dtype=float).ravel())
    w, h = size
    box = (
        min(max(round(x1), 0), w),
        min(max(round(y1), 0), h),
        min(max(round(x2), 0), w),
        min(max(round(y2), 0), h),
    )
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"bbx {list(bbx)} is empty inside an image of size {size}")
    return box
