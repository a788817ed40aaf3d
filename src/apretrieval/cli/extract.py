"""`apretrieval extract`: multi-scale descriptors of a benchmark or an image folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apretrieval.extraction.settings import DEFAULT_MAX_SIDE, DEFAULT_SCALES

if TYPE_CHECKING:  # the pipeline imports torch: only when a command runs
    from apretrieval.pipeline import ExtractionSettings

# Imported by `apretrieval evaluate` from here.
__all__ = [
    "add_extraction_args",
    "check_extraction_args",
    "extraction_settings",
    "register",
]


def add_extraction_args(p: argparse.ArgumentParser) -> None:
    """Options shared with `apretrieval evaluate`."""
    g = p.add_argument_group("extraction")
    g.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=list(DEFAULT_SCALES),
        metavar="S",
        help="image scales, combined by GeM (default 1 0.7071 0.5)",
    )
    g.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        help=f"longer image side before scaling, pixels (default {DEFAULT_MAX_SIDE})",
    )
    g.add_argument("--batch-size", type=int, default=8, help="images per forward (default 8)")
    g.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    g.add_argument(
        "--device", default=None, help="torch device, e.g. cuda or cpu (default: cuda if available)"
    )
    g.add_argument(
        "--shard-size", type=int, default=1024, help="images per resumable shard (default 1024)"
    )
    g.add_argument(
        "--amp",
        choices=("off", "bf16", "fp16"),
        default="off",
        help="run the network under autocast in half precision (default off: float32)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "extract",
        help="extract descriptors of a benchmark or an image folder",
        description=(
            "Multi-scale descriptors with a trained checkpoint, saved as OUT.npy (N, D) float32 "
            "+ OUT.json (image ids and settings); with --dataset, OUT.queries.* and OUT.db.*. "
            "Interrupted runs resume where they stopped when run again."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="model checkpoint (.pt)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="roxford5k, rparis6k, or NAME of a benchmark in that layout")
    src.add_argument("--images", type=Path, metavar="DIR", help="an image folder (recursive)")
    p.add_argument("--root", type=Path, metavar="DIR", help="benchmark folder (with --dataset)")
    p.add_argument("--r1m", type=Path, metavar="DIR", help="R1M distractors to append")
    p.add_argument("--out", required=True, type=Path, help="output prefix")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave unreadable images out (with --images; listed in OUT.json) instead of stopping",
    )
    add_extraction_args(p)
    p.set_defaults(func=run)


def check_extraction_args(args: argparse.Namespace) -> None:
    if any(s <= 0 for s in args.scales):
        raise ValueError(f"--scales must be positive, got {args.scales}")
    for name in ("max_side", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")


def extraction_settings(args: argparse.Namespace) -> ExtractionSettings:
    """The extraction options as typed settings (the device resolved: CUDA when available)."""
    from apretrieval.pipeline import ExtractionSettings, resolve_device

    check_extraction_args(args)
    return ExtractionSettings(
        scales=tuple(args.scales),
        max_side=args.max_side,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=resolve_device(args.device),
        shard_size=args.shard_size,
        progress=not args.no_progress,
        skip_bad=getattr(args, "skip_bad", False),
        amp=args.amp,
    )


def run(args: argparse.Namespace) -> int:
    from apretrieval import pipeline
    from apretrieval.atomic import check_writable

    settings = extraction_settings(args)
    if args.images is not None and (args.root is not None or args.r1m is not None):
        raise ValueError("--root/--r1m go with --dataset, not --images")
    if args.dataset and args.root is None:
        raise ValueError("--dataset needs --root DIR (the benchmark folder)")
    if args.dataset and args.skip_bad:
        raise ValueError("--skip-bad goes with --images: a benchmark needs every image")
    check_writable(Path(f"{args.out}.npy"), "the descriptors")  # before hours of work
    if args.dataset:
        from apretrieval.data.revisited import RevisitedDataset

        ds = RevisitedDataset(args.dataset, args.root, r1m_root=args.r1m)
        pipeline.check_benchmark_images(ds)
        model = pipeline.load_checkpoint_model(args.checkpoint, settings.device)
        q, d = pipeline.extract_benchmark_files(
            model, ds, args.out, settings, checkpoint=args.checkpoint
        )
        print(f"queries: {q}\ndatabase: {d}")
        return 0
    model = pipeline.load_checkpoint_model(args.checkpoint, settings.device)
    npy = pipeline.extract_folder(
        model, args.images, args.out, settings, checkpoint=args.checkpoint
    )
    print(f"descriptors: {npy}")
    return 0
