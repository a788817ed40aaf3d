"""Training augmentation for landmarks with per-sample deterministic replay.

Multistaged backpropagation computes every image twice (stage 1 without autograd, stage 3
with it); both passes must see the same pixels. So augmentation never draws from a global
random state: every random choice comes from ``random.Random(seed)`` with ``seed`` derived
from (run seed, step, position in the batch), and the same seed always gives the same tensor.

Pipeline (PIL image -> (3, H, W) float32 in [0, 1]):
random resized crop (area fraction ``crop_scale``, aspect ``crop_ratio``) resized so its longer
side is ``max_side`` pixels (or to ``max_side`` x ``max_side`` with ``square``) -> random
perspective tilt -> colour jitter (brightness, contrast, saturation, hue in random order) ->
horizontal flip, off by default since landmarks are not mirror-symmetric.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from apretrieval.augment_config import AugmentConfig
from apretrieval.data.decode import decode_rgb, jpeg_draft, oriented_size

__all__ = [
    "TrainTransform",
    "batch_seeds",
    "draft_crop",
    "resize_max_side",
    "sample_seed",
]


def batch_seeds(seed: int, step: int, n: int) -> list[int]:
    """32-bit augmentation seeds of positions 0..n-1 of batch ``step`` of a run seeded ``seed``.

    Position p always gets the same seed whatever ``n`` (the words are a stable stream).
    """
    return [int(v) for v in np.random.SeedSequence([seed, step]).generate_state(n)]


def sample_seed(seed: int, step: int, position: int) -> int:
    """The seed of one position: ``batch_seeds(seed, step, position + 1)[position]``."""
    return batch_seeds(seed, step, position + 1)[position]


class TrainTransform:
    """``transform(image, seed) -> (3, H, W)`` float32 in [0, 1]; deterministic in ``seed``."""

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config or AugmentConfig()

    def __call__(self, img: Image.Image, seed: int) -> Tensor:
        cfg = self.config
        rng = random.Random(seed)
        width, height = oriented_size(img)
        box = self._crop_box(rng, width, height)
        out_size = self._output_size(box[2] - box[0], box[3] - box[1])
        img = decode_rgb(img, box, out_size)
        x = TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)
        # Every draw below happens whether or not its step applies, so one parameter change
        # does not shift the random stream of the others.
        do_tilt = rng.random() < cfg.tilt_prob
        corners = self._tilt_corners(rng, x.shape[-1], x.shape[-2])
        if cfg.tilt > 0 and do_tilt:
            start = [
                [0, 0],
                [x.shape[-1] - 1, 0],
                [x.shape[-1] - 1, x.shape[-2] - 1],
                [0, x.shape[-2] - 1],
            ]
            x = TF.perspective(x, start, corners, interpolation=TF.InterpolationMode.BILINEAR)
        x = self._jitter(rng, x)
        if rng.random() < cfg.hflip:
            x = TF.horizontal_flip(x)
        return x.clamp_(0.0, 1.0)

    def _crop_box(self, rng: random.Random, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a crop of random area and aspect ratio."""
        cfg = self.config
        area = width * height
        log_lo, log_hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*cfg.crop_scale)
            ratio = math.exp(rng.uniform(log_lo, log_hi))
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                left = rng.randint(0, width - w)
                top = rng.randint(0, height - h)
                return left, top, left + w, top + h
        # Fallback for extreme aspect ratios: the largest centred crop within the ratio range.
        ratio = min(max(width / height, cfg.crop_ratio[0]), cfg.crop_ratio[1])
        w, h = min(width, round(height * ratio)), min(height, round(width / ratio))
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def _output_size(self, w: int, h: int) -> tuple[int, int]:
        side = self.config.max_side
        if self.config.square:
            return side, side
        scale = side / max(w, h)
        return max(1, round(w * scale)), max(1, round(h * scale))

    def _tilt_corners(self, rng: random.Random, w: int, h: int) -> list[list[int]]:
        """Corners (tl, tr, br, bl) each moved inwards by up to tilt * half the side."""
        dx, dy = int(self.config.tilt * w / 2), int(self.config.tilt * h / 2)
        r = [rng.randint(0, dx) if dx else 0 for _ in range(4)]
        s = [rng.randint(0, dy) if dy else 0 for _ in range(4)]
        return [
            [r[0], s[0]],
            [w - 1 - r[1], s[1]],
            [w - 1 - r[2], h - 1 - s[2]],
            [r[3], h - 1 - s[3]],
        ]

    def _jitter(self, rng: random.Random, x: Tensor) -> Tensor:
        cfg = self.config
        factors = [
            rng.uniform(1 - cfg.brightness, 1 + cfg.brightness),
            rng.uniform(1 - cfg.contrast, 1 + cfg.contrast),
            rng.uniform(1 - cfg.saturation, 1 + cfg.saturation),
            rng.uniform(-cfg.hue, cfg.hue),
        ]
        order = [0, 1, 2, 3]
        rng.shuffle(order)
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        enabled = (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
        for i in order:
            if enabled[i] > 0:
                x = ops[i](x, factors[i])
        return x


def draft_crop(
    img: Image.Image, box: tuple[int, int, int, int], out_size: tuple[int, int]
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Let the JPEG decoder downscale by 2/4/8 when the output is that much smaller.

    Decoding at reduced size is several times faster for large photos; ``draft`` keeps the
    decoded image at least as large as requested, so the final resize still only shrinks.
    ``box`` is in stored pixels (no EXIF orientation); ``decode_rgb`` does the whole decode.
    """
    w, h = box[2] - box[0], box[3] - box[1]
    full = img.size
    jpeg_draft(img, max(out_size[0] / w, out_size[1] / h))
    fx, fy = img.size[0] / full[0], img.size[1] / full[1]
    return img, (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)


def resize_max_side(img: Image.Image, max_side: int) -> Tensor:
    """Deterministic evaluation resize: longer side to ``max_side`` -> (3, H, W) in [0, 1]."""
    w, h = oriented_size(img)
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = decode_rgb(img, None, size)
    return TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)
