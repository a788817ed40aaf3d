"""``TrainConfig``: every training setting, one flat dataclass <-> YAML recipe <-> CLI flags.

One name per idea: the field ``num_bins`` is ``num_bins:`` in YAML and ``--num-bins`` on the
command line.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from apretrieval.atomic import atomic_open
from apretrieval.data.transforms import AugmentConfig
from apretrieval.models import BACKBONES

__all__ = ["LOSSES", "SCHEDULES", "TrainConfig", "write_yaml_atomic"]

LOSSES = ("ap", "tie_aware_ap", "contrastive", "triplet")
SCHEDULES = ("constant", "cosine", "exponential")


@dataclass
class TrainConfig:
    """Training recipe. Paths are strings so the config round-trips through YAML."""

    # Data: an image folder (one sub-folder per class), a GLDv2 CSV or a Landmarks-clean list.
    data: str = ""
    data_format: str = "auto"  # auto | folder | csv | list
    image_root: str | None = None  # root of the relative paths of a CSV/list (default: its folder)
    check_images: str = "exists"  # none | exists | header: drop bad files before training
    # Model.
    backbone: str = "resnet101"
    pretrained: str | None = "imagenet"  # "imagenet" or null (random init)
    weights: str | None = None  # local weights file (torchvision classifier or apretrieval)
    out_dim: int | None = None  # whitening output dimension (null: backbone width)
    gem_p: float = 3.0
    whiten: bool = True
    whiten_init: str = "identity"  # identity | pca (PCA whitening of training descriptors)
    pca_images: int = 2000  # training images used for the PCA initialisation
    # Loss.
    loss: str = "ap"  # ap | tie_aware_ap | contrastive | triplet
    num_bins: int = 20
    margin: float | None = None  # contrastive/triplet margin (null: 0.7 / 0.1)
    num_hard: int = 5  # contrastive: hardest in-batch negatives per anchor
    # Memory bank (AP losses): each query also ranks the descriptors of the last K batches.
    memory_batches: int = 0
    # Batches (B = classes per batch x images_per_class).
    batch_size: int = 4096
    images_per_class: int = 8
    chunk_size: int = 32  # images per forward/backward pass of multistaged backpropagation
    # Augmentation (see data.transforms.AugmentConfig).
    max_side: int = 800
    crop_scale: tuple[float, float] = (0.25, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    square: bool = False
    tilt: float = 0.25
    tilt_prob: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0
    hflip: float = 0.0
    # Optimisation (Adam).
    lr: float = 1e-5
    weight_decay: float = 1e-6
    schedule: str = "exponential"  # constant | cosine | exponential
    lr_decay: float = 0.99  # exponential schedule: factor per step
    warmup_steps: int = 0
    steps: int = 1000
    # Run.
    output_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 2  # data loading processes (threads when batches are streamed)
    cpu_threads: int | None = None  # torch intra-op threads while training (null: unchanged)
    image_cache_mb: int = 2048  # decode a batch once if it fits, else stream it per chunk
    checkpoint_every: int = 50
    progress: bool = True
    # Several processes (torchrun): auto = nccl on GPU, gloo on CPU; collective timeout (s).
    dist_backend: str = "auto"  # auto | gloo | nccl
    dist_timeout: float = 600.0
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept with the run

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From plain values (YAML), rejecting unknown keys and coercing types."""
        if not isinstance(d, dict):
            raise ValueError(f"a training config must be a mapping, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        cfg = cls(**{k: _coerce(k, v, hints[k]) for k, v in d.items()})
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None
    ) -> TrainConfig:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file not found: {p}")
        with open(p, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping of settings, got {type(data).__name__}")
        data.update(overrides or {})
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-safe values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def augment_config(self) -> AugmentConfig:
        names = {f.name for f in fields(AugmentConfig)}
        return AugmentConfig(**{k: getattr(self, k) for k in names})

    def validate(self) -> None:
        """ValueError naming the first bad setting."""
        if not self.data:
            raise ValueError("data is required: an image folder, a GLDv2 CSV or an image list")
        _choice("data_format", self.data_format, ("auto", "folder", "csv", "list"))
        _choice("check_images", self.check_images, ("none", "exists", "header"))
        _choice("backbone", self.backbone, tuple(BACKBONES))
        _choice("pretrained", self.pretrained, (None, "imagenet"))
        _choice("whiten_init", self.whiten_init, ("identity", "pca"))
        _choice("loss", self.loss, LOSSES)
        _choice("schedule", self.schedule, SCHEDULES)
        for name in ("batch_size", "images_per_class", "chunk_size", "steps", "num_bins",
                     "checkpoint_every", "max_side", "pca_images", "num_hard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_workers", "image_cache_mb", "memory_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.images_per_class:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of images_per_class "
                f"({self.images_per_class})"
            )
        if self.loss in ("ap", "tie_aware_ap") and self.num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {self.num_bins}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, 0 < lr_decay <= 1; got lr={self.lr}, "
                f"weight_decay={self.weight_decay}, lr_decay={self.lr_decay}"
            )
        _choice("dist_backend", self.dist_backend, ("auto", "gloo", "nccl"))
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.memory_batches and self.loss not in ("ap", "tie_aware_ap"):
            raise ValueError(
                f"memory_batches needs an AP loss (ap, tie_aware_ap), got loss={self.loss!r}"
            )
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 or null, got {self.cpu_threads}")
        if self.margin is not None and self.margin <= 0:
            raise ValueError(f"margin must be > 0, got {self.margin}")
        self.augment_config()  # validates the augmentation settings


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check/convert one YAML value to the field's declared type."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} cannot be null")
    base = next(a for a in args if a is not type(None)) if optional else hint
    origin = typing.get_origin(base)
    try:
        if origin is tuple:
            items = list(value) if isinstance(value, list | tuple) else None
            if items is None or len(items) != len(typing.get_args(base)):
                raise TypeError
            return tuple(float(v) for v in items)
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if base is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {_type_name(hint)}, got {value!r}") from None
    return value


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def write_yaml_atomic(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write ``data`` as YAML through a temporary file + os.replace."""
    path = Path(path)
    with atomic_open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path
