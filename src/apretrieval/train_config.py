"""``TrainConfig``: every training setting, one flat dataclass <-> YAML recipe <-> CLI flags.

One name per idea: the field ``num_bins`` is ``num_bins:`` in YAML and ``--num-bins`` on the
command line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from difflib import get_close_matches
from typing import Any

from apretrieval.augment_config import AugmentConfig
from apretrieval.backbone_names import BACKBONES, is_timm_name
from apretrieval.binning import DEFAULT_NUM_BINS, SHARP_MIN_BINS, check_num_bins
from apretrieval.configs import recipe_path
from apretrieval.recipe_values import coerce_value, read_yaml_mapping

__all__ = [
    "GROUPS",
    "LISTWISE_LOSSES",
    "LOSSES",
    "SCHEDULES",
    "TrainConfig",
]

AP_LOSSES = ("ap", "tie_aware_ap", "sharp_ap")  # the histogram AP losses (bins)
RANK_LOSSES = ("smooth_ap", "sup_ap", "roadmap", "recall_at_k")  # ranks of the positives
LISTWISE_LOSSES = AP_LOSSES + RANK_LOSSES  # the listwise family (memory bank)
LOSSES = (*LISTWISE_LOSSES, "contrastive", "triplet")
SCHEDULES = ("constant", "cosine", "exponential")
# Sections of `apretrieval train --help`, in order; each field names its group.
GROUPS = ("data", "model", "loss", "optimisation", "validation", "run")


def _opt(
    group: str,
    default: Any,
    doc: str,
    *,
    unit: str = "",
    choices: tuple[Any, ...] | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A TrainConfig field with its documentation (``--help`` and validation read it)."""
    meta = {"group": group, "doc": doc, "unit": unit, "choices": choices, "aliases": aliases}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Training recipe. Paths are strings so the config round-trips through YAML.

    Each field documents itself (``dataclasses.fields(TrainConfig)[i].metadata``: group, doc,
    unit, allowed values, extra command-line spellings); ``apretrieval train --help`` lists them.
    The defaults are the paper's setting (a GPU recipe).
    """

    # Data.
    data: str = _opt(
        "data",
        "",
        "training images: an image folder (one sub-folder per class), a GLDv2 CSV "
        "(train_clean.csv, or id,url/path,landmark_id), a Landmarks-clean list or "
        "retrieval-SfM-120k.pkl (its train part, 3D models as classes)",
    )
    data_format: str = _opt(
        "data",
        "auto",
        "format of --data (auto: guessed from it; .pkl is SfM-120k)",
        choices=("auto", "folder", "csv", "list", "sfm120k"),  # data.lists.DATA_FORMATS
    )
    image_root: str | None = _opt(
        "data",
        None,
        "root of the relative image paths of a CSV or list (none: the list's folder; a GLDv2 "
        "CSV's train/ beside it; SfM-120k's ims/ beside the pickle)",
    )
    exclude_landmarks: str | None = _opt(
        "data",
        None,
        "file of landmark ids (class names), one per line, whose images are left out "
        "(e.g. the landmarks GLDv2-clean shares with ROxford/RParis)",
    )
    check_images: str = _opt(
        "data",
        "exists",
        "drop bad image files before training: none, "
        "missing ones, or ones whose header does not decode",
        choices=("none", "exists", "header"),
    )
    # Model.
    backbone: str = _opt(
        "model",
        "resnet101",
        "trunk: " + ", ".join(BACKBONES) + ", or timm/<model> (any timm model, optional extra)",
    )
    pretrained: str | None = _opt(
        "model",
        "imagenet",
        "start from ImageNet weights, or none (random init)",
        choices=("imagenet", None),
    )
    weights: str | None = _opt(
        "model",
        None,
        "local weights file (torchvision classifier "
        "weights or an apretrieval checkpoint); overrides --pretrained",
    )
    out_dim: int | None = _opt(
        "model", None, "descriptor dimension after the whitening FC (none: the backbone width)"
    )
    gem_p: float = _opt("model", 3.0, "initial GeM power (learned)")
    whiten: bool = _opt("model", True, "add the learned whitening FC after GeM")
    whiten_init: str = _opt(
        "model",
        "identity",
        "initialisation of the whitening FC (pca: PCA whitening of training descriptors)",
        choices=("identity", "pca"),
    )
    pca_images: int = _opt(
        "model", 2000, "training images for the PCA initialisation", unit="images"
    )
    # Loss.
    loss: str = _opt(
        "loss",
        "ap",
        "training loss (ap: the paper's AP_Q; tie_aware_ap / sharp_ap: other AP_Q estimators; "
        "smooth_ap: Smooth-AP; sup_ap: SupAP; roadmap: SupAP + calibration; recall_at_k: "
        "the Recall@k surrogate)",
        choices=LOSSES,
    )
    num_bins: int = _opt(
        "loss",
        DEFAULT_NUM_BINS,
        f"histogram bins of the AP losses (the paper: {DEFAULT_NUM_BINS}; sharp_ap: at least "
        f"{SHARP_MIN_BINS})",
        unit="bins",
    )
    margin: float | None = _opt("loss", None, "contrastive / triplet margin (none: 0.7 / 0.1)")
    num_hard: int = _opt("loss", 5, "contrastive: hardest in-batch negatives per anchor")
    tau: float = _opt(
        "loss",
        0.01,
        "smooth_ap / sup_ap / roadmap / recall_at_k: temperature of the sigmoid that smooths "
        "the rank (the papers: 0.01)",
    )
    sup_rho: float = _opt(
        "loss", 100.0, "sup_ap / roadmap: slope of a negative's rank beyond sup_delta"
    )
    sup_delta: float = _opt(
        "loss", 0.05, "sup_ap / roadmap: score margin where the negative's rank turns linear"
    )
    sup_start: float = _opt(
        "loss", 0.5, "sup_ap / roadmap: jump of a negative's rank once it scores above the positive"
    )
    sup_offset: float | None = _opt(
        "loss",
        None,
        "sup_ap / roadmap: rank of a negative at sup_delta (none: continuous, "
        "sup_start + sigmoid(sup_delta / tau))",
    )
    calibration_weight: float = _opt(
        "loss", 1.0, "roadmap: weight of the calibration term (the recipe: 1)"
    )
    calibration_margins: tuple[float, float] = _opt(
        "loss",
        (0.9, 0.6),
        "roadmap: calibration margins POS,NEG: positive pairs below POS and negative pairs "
        "above NEG are penalised",
    )
    recall_k: tuple[int, ...] = _opt(
        "loss", (1, 2, 4, 8, 16), "recall_at_k: the k averaged over, K,K,..."
    )
    recall_tau: float = _opt(
        "loss", 1.0, "recall_at_k: temperature of the sigmoid of (k - rank) (the paper: 1)"
    )
    memory_batches: int = _opt(
        "loss",
        0,
        "listwise losses: each query also ranks the descriptors of the last K batches (0: off)",
        unit="batches",
    )
    # Batches (B = classes per batch x images_per_class).
    batch_size: int = _opt(
        "optimisation",
        4096,
        "images per step (classes per batch x images_per_class)",
        unit="images",
    )
    images_per_class: int = _opt(
        "optimisation", 8, "images of each class in a batch", unit="images"
    )
    chunk_size: int = _opt(
        "optimisation",
        32,
        "images per forward/backward pass of multistaged "
        "backpropagation (memory, not the result, depends on it)",
        unit="images",
    )
    # Augmentation (see augment_config.AugmentConfig).
    max_side: int = _opt("data", 800, "longer side of a training image", unit="pixels")
    crop_scale: tuple[float, float] = _opt(
        "data",
        (0.25, 1.0),
        "random resized crop: the crop's area as a fraction of the image, a range MIN,MAX "
        "within (0, 1], e.g. 0.25,1.0",
    )
    crop_ratio: tuple[float, float] = _opt(
        "data", (3 / 4, 4 / 3), "random resized crop: aspect ratio (w/h) range MIN,MAX"
    )
    square: bool = _opt(
        "data",
        False,
        "resize every crop to max_side x max_side (one tensor per chunk: faster on CPU)",
    )
    tilt: float = _opt(
        "data", 0.25, "perspective tilt: corners move up to tilt x half the side, in [0, 1)"
    )
    tilt_prob: float = _opt("data", 0.5, "probability of the tilt", unit="probability")
    brightness: float = _opt("data", 0.2, "colour jitter: brightness factor in [1-b, 1+b]")
    contrast: float = _opt("data", 0.2, "colour jitter: contrast factor in [1-c, 1+c]")
    saturation: float = _opt("data", 0.2, "colour jitter: saturation factor in [1-s, 1+s]")
    hue: float = _opt("data", 0.0, "colour jitter: hue shift in [-h, h], h <= 0.5")
    hflip: float = _opt(
        "data",
        0.0,
        "probability of a horizontal flip (landmarks are not mirror-symmetric)",
        unit="probability",
    )
    # Adam and its schedule.
    lr: float = _opt("optimisation", 1e-5, "Adam learning rate")
    weight_decay: float = _opt("optimisation", 1e-6, "Adam weight decay")
    schedule: str = _opt("optimisation", "exponential", "learning-rate schedule", choices=SCHEDULES)
    lr_decay: float = _opt("optimisation", 0.99, "exponential schedule: factor per step, in (0, 1]")
    warmup_steps: int = _opt("optimisation", 0, "linear warm-up", unit="steps")
    steps: int = _opt("optimisation", 1000, "training length", unit="steps")
    # Validation during training.
    val_dataset: str | None = _opt(
        "validation",
        None,
        "benchmark in the revisited layout to validate on: NAME (in val_root or "
        "val_root/NAME) or the path of its gnd_NAME.pkl (none: no validation)",
    )
    val_root: str | None = _opt(
        "validation",
        None,
        "folder holding the validation benchmark (its jpg/ and gnd_NAME.pkl, or a NAME/ "
        "sub-folder with them); none: found from --val-dataset",
    )
    val_every: int = _opt(
        "validation", 0, "validate every N steps, and at the end (0: at the end only)", unit="steps"
    )
    val_max_side: int | None = _opt(
        "validation",
        None,
        "longest image side for validation (none: max_side)",
        unit="pixels",
    )
    # Run.
    output_dir: str = _opt(
        "run",
        "runs/train",
        "run folder (config.yaml, metrics.jsonl, checkpoint.pt, model.pt)",
        aliases=("--out",),
    )
    seed: int = _opt("run", 0, "seed of initialisation, batches and augmentation")
    device: str = _opt("run", "auto", "auto, cpu, cuda or cuda:N (auto: a GPU when there is one)")
    num_workers: int = _opt(
        "run",
        2,
        "data loading processes (threads when batches are streamed)",
        unit="processes",
        aliases=("--workers",),
    )
    cpu_threads: int | None = _opt(
        "run",
        None,
        "torch intra-op CPU threads while training (none: OMP_NUM_THREADS if set, else the "
        "cores less the loader workers and less the cores other programs keep busy, "
        "re-checked at each checkpoint)",
        unit="threads",
        aliases=("--threads",),
    )
    amp: str = _opt(
        "run",
        "off",
        "mixed precision of the network's forward passes (the loss stays float32; fp16 adds "
        "a dynamic loss scale)",
        choices=("off", "bf16", "fp16"),
    )
    channels_last: bool = _opt("run", False, "channels-last memory layout (faster convolutions)")
    compile: bool = _opt("run", False, "torch.compile the network (slow first steps)")
    image_cache_mb: int = _opt(
        "run", 2048, "decode a batch once if it fits, else stream it chunk by chunk", unit="MB"
    )
    checkpoint_every: int = _opt("run", 50, "write checkpoint.pt every N steps", unit="steps")
    progress: bool = _opt("run", True, "show a progress bar")
    dist_backend: str = _opt(
        "run",
        "auto",
        "torchrun process group backend (auto: nccl on GPU, gloo on CPU)",
        choices=("auto", "gloo", "nccl"),
    )
    dist_timeout: float = _opt("run", 600.0, "collective timeout", unit="seconds")
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept with the run

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, require_data: bool = True) -> TrainConfig:
        """From plain values (YAML), rejecting unknown keys and coercing types.

        Values may also be typed as on a command line: ``"0.5,1.0"`` for a pair, ``"none"``
        for null. ``require_data=False`` accepts a recipe without ``data`` (to print it).
        """
        if not isinstance(d, dict):
            raise ValueError(f"a training config must be a mapping, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            hints = [
                f"{k} (did you mean {m[0]}?)" if (m := get_close_matches(k, known, 1)) else k
                for k in unknown
            ]
            raise ValueError(
                f"unknown config keys {unknown}: {', '.join(hints)}; known keys: {sorted(known)}"
            )
        types = typing.get_type_hints(cls)
        cfg = cls(**{k: coerce_value(k, v, types[k]) for k, v in d.items()})
        cfg.validate(require_data=require_data)
        return cfg

    @classmethod
    def from_yaml(
        cls,
        path: str | os.PathLike[str],
        overrides: dict[str, Any] | None = None,
        *,
        require_data: bool = True,
    ) -> TrainConfig:
        """A recipe file, or the name of a bundled one (``cpu-small``), plus ``overrides``."""
        p = recipe_path(path)
        data = read_yaml_mapping(p)
        data.update(overrides or {})
        return cls.from_dict(data, require_data=require_data)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-safe values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def augment_config(self) -> AugmentConfig:
        names = {f.name for f in fields(AugmentConfig)}
        return AugmentConfig(**{k: getattr(self, k) for k in names})

    def validate(self, *, require_data: bool = True) -> None:
        """ValueError naming the first bad setting."""
        if require_data and not self.data:
            raise ValueError("data is required: an image folder, a GLDv2 CSV or an image list")
        if self.backbone not in BACKBONES and not is_timm_name(self.backbone):
            raise ValueError(
                f"backbone must be one of {list(BACKBONES)} or timm/<model>, got {self.backbone!r}"
            )
        for f in fields(self):
            if f.metadata.get("choices") is not None:
                _choice(f.name, getattr(self, f.name), f.metadata["choices"])
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        for name in (
            "batch_size",
            "images_per_class",
            "chunk_size",
            "steps",
            "checkpoint_every",
            "max_side",
            "pca_images",
            "num_hard",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "num_workers",
            "image_cache_mb",
            "memory_batches",
            "val_every",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.images_per_class:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of images_per_class "
                f"({self.images_per_class})"
            )
        if self.val_max_side is not None and self.val_max_side < 1:
            raise ValueError(f"val_max_side must be >= 1 or none, got {self.val_max_side}")
        if (self.val_every or self.val_root) and not self.val_dataset:
            raise ValueError("val_every / val_root need val_dataset (the benchmark to validate on)")
        if self.loss in AP_LOSSES:  # the losses' own check, at config time
            check_num_bins(self.num_bins, "sharp" if self.loss == "sharp_ap" else "plain")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, 0 < lr_decay <= 1; got lr={self.lr}, "
                f"weight_decay={self.weight_decay}, lr_decay={self.lr_decay}"
            )
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.memory_batches and self.loss not in LISTWISE_LOSSES:
            raise ValueError(
                "memory_batches needs an AP loss or another listwise loss "
                f"({', '.join(LISTWISE_LOSSES)}), got loss={self.loss!r}"
            )
        self._check_rank_settings()
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 or null, got {self.cpu_threads}")
        if self.margin is not None and self.margin <= 0:
            raise ValueError(f"margin must be > 0, got {self.margin}")
        self.augment_config()  # validates the augmentation settings

    def _check_rank_settings(self) -> None:
        """The settings of the rank losses (the loss classes check them again)."""
        for name in ("tau", "recall_tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.sup_rho < 0 or self.sup_delta < 0 or self.calibration_weight < 0:
            raise ValueError(
                f"sup_rho, sup_delta and calibration_weight must be >= 0, got {self.sup_rho}, "
                f"{self.sup_delta}, {self.calibration_weight}"
            )
        if not self.recall_k or min(self.recall_k) < 1:
            raise ValueError(f"recall_k must be integers >= 1, got {self.recall_k}")


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        shown = ["null" if a is None else a for a in allowed]
        raise ValueError(f"{name} must be one of {shown}, got {value!r}")
