"""What a training run tells a person: a start summary, warnings about settings that cannot
work as meant, and one plain line every few steps where no progress bar can be drawn.

Pure functions build the text (tested on their own); :class:`StepLog` decides when to print.
A progress bar only makes sense on a terminal: in a cluster log its carriage returns become
one endless line, so when stderr is not a terminal the bar is replaced by plain lines.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from apretrieval.extraction.settings import DEFAULT_MAX_SIDE, DEFAULT_SCALES
from apretrieval.train_config import AP_LOSSES, TrainConfig

_EVALUATE_DEFAULT = (
    f"scales {', '.join(f'{s:.3g}' for s in DEFAULT_SCALES)}, images at most {DEFAULT_MAX_SIDE} px"
)

__all__ = [
    "RunFacts",
    "StepLog",
    "setting_warnings",
    "start_summary",
    "step_line",
    "weights_source",
]


@dataclass(frozen=True)
class RunFacts:
    """What a run found before its first step (counts from the data, the machine's choices)."""

    images: int
    classes: int
    drawable_classes: int
    dropped_files: int
    top_level_files: int
    device: str
    threads: str  # the thread plan in words: "threads: 1 (2 cores - 1 loader worker(s))"
    world_size: int
    weights: str
    start_step: int
    streamed: bool
    out_dim: int  # the network's descriptor dimension (``out_dim: null`` resolved: the width)
    validation: str = ""  # how validation scores (Validator.protocol); "" without validation
    excluded_classes: int = 0  # classes left out by --exclude-landmarks


def setting_warnings(cfg: TrainConfig, facts: RunFacts) -> list[str]:
    """Settings that run but not as a person would expect; one sentence each."""
    out = []
    if cfg.warmup_steps >= cfg.steps:
        out.append(
            f"warm-up ({cfg.warmup_steps} steps) is as long as the run ({cfg.steps} steps): "
            "the learning rate never reaches --lr"
        )
    if cfg.amp == "fp16" and facts.device.startswith("cpu"):
        # CPU autocast has few float16 kernels: a MobileNetV2 step ran 29x slower than float32
        # (benchmarks/bench_amp.py); bfloat16 runs at float32's speed or faster.
        out.append(
            "--amp fp16 on CPU is many times slower than float32 (few float16 CPU kernels): "
            "use --amp bf16 or off on CPU; fp16 is for GPUs"
        )
    return out


def _batch_note(cfg: TrainConfig, facts: RunFacts) -> str | None:
    """How batches are drawn when they ask for more classes than the data has (small sets).

    The sampler then puts every drawable class in each batch, with more images of each: a
    sound batch (every image has positives and negatives), worth knowing, not an error.
    """
    per_batch = cfg.batch_size // cfg.images_per_class
    if per_batch <= facts.drawable_classes:
        return None
    each = cfg.batch_size / max(facts.drawable_classes, 1)
    return (
        f"batches: {cfg.batch_size} / {cfg.images_per_class} images per class would be "
        f"{per_batch} classes; the data has {facts.drawable_classes}, so each batch holds all "
        f"of them with about {each:.3g} images each"
    )


def _pca_note(cfg: TrainConfig, facts: RunFacts) -> str | None:
    """What the PCA initialisation of the whitening FC can learn from the images it uses."""
    if not (cfg.whiten and cfg.whiten_init == "pca" and facts.start_step == 0):
        return None
    n = min(cfg.pca_images, facts.images)
    if n > facts.out_dim:
        return f"whitening: PCA initialisation from {n} training images"
    spanned = max(n - 1, 0)
    return (
        f"whitening: PCA initialisation from {n} training images, which span {spanned} of the "
        f"{facts.out_dim} dimensions; the other {facts.out_dim - spanned} start at the scale of "
        "the weakest spanned one (more images: --pca-images, fewer dimensions: --out-dim)"
    )


def start_summary(cfg: TrainConfig, facts: RunFacts) -> list[str]:
    """The lines printed before the first step: data, machine, model, run."""
    ignored = []
    if facts.classes > facts.drawable_classes:
        ignored.append(f"{facts.classes - facts.drawable_classes} classes with a single image")
    if facts.dropped_files:
        ignored.append(f"{facts.dropped_files} missing or unreadable files")
    if facts.excluded_classes:
        ignored.append(f"{facts.excluded_classes} classes excluded by --exclude-landmarks")
    if facts.top_level_files:
        ignored.append(f"{facts.top_level_files} files at the folder top (not in a class folder)")
    ranks = f" x {facts.world_size} processes" if facts.world_size > 1 else ""
    start = f"resuming at step {facts.start_step}" if facts.start_step else "from step 0"
    lines = [
        f"data: {cfg.data}: {facts.images} images, {facts.classes} classes "
        f"({facts.drawable_classes} drawable: with 2 or more images, the only ones a batch "
        "draws)" + (f"; ignored: {', '.join(ignored)}" if ignored else ""),
        f"machine: {facts.device}{ranks}, {facts.threads}, "
        + ("float32" if cfg.amp == "off" else f"{cfg.amp} autocast (loss in float32)")
        + (", channels-last" if cfg.channels_last else "")
        + (", compiled" if cfg.compile else ""),
        f"model: {cfg.backbone} (weights: {facts.weights}), GeM p={cfg.gem_p:g}, "
        f"out_dim {facts.out_dim}, loss {cfg.loss}"
        + (f" ({cfg.num_bins} bins)" if cfg.loss in AP_LOSSES else ""),
        f"run: {cfg.steps} steps of {cfg.batch_size} images ({cfg.chunk_size} at a time, "
        f"max side {cfg.max_side} px, "
        f"{'streamed' if facts.streamed else 'decoded once'} per step), {start}; "
        f"writing to {cfg.output_dir}",
    ]
    if facts.validation:
        lines.append(
            f"validation: every {cfg.val_every} steps and at the end, Medium/Hard mAP on "
            f"{facts.validation} (apretrieval evaluate's default: {_EVALUATE_DEFAULT}, so its "
            "figure differs); the best Medium mAP is kept as best.pt"
            if cfg.val_every
            else f"validation: at the end, Medium/Hard mAP on {facts.validation}"
        )
    return lines + [n for n in (_batch_note(cfg, facts), _pca_note(cfg, facts)) if n]


def step_line(record: Mapping[str, Any], steps: int) -> str:
    """One plain progress line from a metrics record (what metrics.jsonl receives)."""
    parts = [f"step {record['step']}/{steps}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
        parts.append(f"lr {record['lr']:.2e}")
        parts.append(f"{record['images_per_s']:.1f} img/s")
    if "batch_ap" in record and "batch_ap_q" in record:
        parts.append(f"batch AP {record['batch_ap']:.3f} (AP_Q {record['batch_ap_q']:.3f})")
    for key, value in record.get("val", {}).items():
        parts.append(f"val {key} {value:.3f}")
    return "  ".join(parts)


class StepLog:
    """Prints ``step_line`` every ``every`` steps (and the last) when no bar is drawn."""

    def __init__(self, steps: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.steps = steps
        self.every = max(1, steps // 20)
        self.enabled = enabled

    def __call__(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        due = step % self.every == 0 or step == self.steps or step == 1 or "val" in record
        if self.enabled and due:
            print(step_line(record, self.steps), file=self.stream, flush=True)


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether a progress bar can be drawn on ``stream`` (stderr by default)."""
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def weights_source(cfg: TrainConfig, start: int) -> str:
    """Where the run's starting weights come from, in words."""
    if start:
        return f"checkpoint of step {start}"
    if cfg.weights:
        return str(cfg.weights)
    return f"{cfg.pretrained} pretrained" if cfg.pretrained else "random init"
