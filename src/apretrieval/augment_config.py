"""``AugmentConfig``: the training augmentation settings, checked (plain data, no torch).

:class:`apretrieval.data.transforms.TrainTransform` applies them; the training settings
(:class:`apretrieval.train_config.TrainConfig`) carry them as flat fields.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AugmentConfig"]


@dataclass
class AugmentConfig:
    """Training augmentation parameters (0 disables a step)."""

    max_side: int = 800  # longer side of the output, pixels
    crop_scale: tuple[float, float] = (0.25, 1.0)  # crop area as a fraction of the image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w / h
    square: bool = False  # output max_side x max_side: one size, so chunks batch together
    tilt: float = 0.25  # perspective distortion: corners move up to tilt * half the side
    tilt_prob: float = 0.5
    brightness: float = 0.2  # factor drawn in [1 - b, 1 + b]
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0  # shift drawn in [-hue, hue], at most 0.5
    hflip: float = 0.0  # probability of a horizontal flip

    def __post_init__(self) -> None:
        if self.max_side < 8:
            raise ValueError(f"max_side must be >= 8 pixels, got {self.max_side}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if not 0 <= self.tilt < 1:
            raise ValueError(f"tilt must lie in [0, 1), got {self.tilt}")
        for name in ("tilt_prob", "hflip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5], got {self.hue}")
