"""`apretrieval extract`: multi-scale descriptors of a benchmark or an image folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from apretrieval.extraction import DEFAULT_SCALES


def add_extraction_args(p: argparse.ArgumentParser) -> None:
    """Options shared with `apretrieval evaluate`."""
    g = p.add_argument_group("extraction")
    g.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES),
                   metavar="S", help="image scales, combined by GeM (default 1 0.7071 0.5)")
    g.add_argument("--max-side", type=int, default=1024,
                   help="longer image side before scaling, pixels (default 1024)")
    g.add_argument("--batch-size", type=int, default=8, help="images per forward (default 8)")
    g.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    g.add_argument("--device", default=None,
                   help="torch device, e.g. cuda or cpu (default: cuda if available)")
    g.add_argument("--shard-size", type=int, default=1024,
                   help="images per resumable shard (default 1024)")
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
    src.add_argument(
        "--dataset", help="roxford5k, rparis6k, or NAME of a benchmark in that layout"
    )
    src.add_argument("--images", type=Path, metavar="DIR", help="an image folder (recursive)")
    p.add_argument("--root", type=Path, metavar="DIR", help="benchmark folder (with --dataset)")
    p.add_argument("--r1m", type=Path, metavar="DIR", help="R1M distractors to append")
    p.add_argument("--out", required=True, type=Path, help="output prefix")
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


def resolve_device(name: str | None) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r}") from None


def load_checkpoint_model(path: str, device: Any) -> Any:
    from apretrieval.models import load_model

    return load_model(path, map_location=device)


def extract_benchmark(args: argparse.Namespace, model: Any, out: Path) -> tuple[Path, Path]:
    """Queries (cropped) and database of --dataset to ``out.queries`` / ``out.db``."""
    from apretrieval.data.revisited import RevisitedDataset
    from apretrieval.extraction import ImageFiles

    if args.root is None:
        raise ValueError("--dataset needs --root DIR (the benchmark folder)")
    ds = RevisitedDataset(args.dataset, args.root, r1m_root=args.r1m)
    missing = ds.missing_images()
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) missing, e.g. {missing[0]} "
            f"(run `apretrieval download {args.dataset} --root {args.root}`)"
        )
    common = _common(args, model)
    q = _extract(model, ImageFiles(ds.query_paths(), ds.query_boxes(), args.max_side),
                 ds.query_names, Path(f"{out}.queries"), "queries", common,
                 {"dataset": args.dataset, "part": "queries"})
    db_ids = [ds.relative(p) for p in ds.db_paths()]
    d = _extract(model, ImageFiles(ds.db_paths(), None, args.max_side), db_ids,
                 Path(f"{out}.db"), "database", common,
                 {"dataset": args.dataset, "part": "database",
                  "r1m": str(args.r1m) if args.r1m else None})
    return q, d


def _common(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    return {
        "scales": args.scales,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "device": args.device_obj,
        "max_side": args.max_side,
        "shard_size": args.shard_size,
        "progress": not args.no_progress,
        "meta": {"checkpoint": str(args.checkpoint), "gem_p": float(model.gem_p)},
    }


def _extract(model, images, ids, out, desc, common, meta) -> Path:
    from apretrieval.extraction import extract_to_file

    kw = dict(common)
    kw["meta"] = {**common["meta"], **meta}
    return extract_to_file(model, images, ids, out, desc=desc, **kw)


def run(args: argparse.Namespace) -> int:
    check_extraction_args(args)
    args.device_obj = resolve_device(args.device)
    if args.images is not None and (args.root is not None or args.r1m is not None):
        raise ValueError("--root/--r1m go with --dataset, not --images")
    model = load_checkpoint_model(args.checkpoint, args.device_obj)
    if args.dataset:
        q, d = extract_benchmark(args, model, args.out)
        print(f"queries: {q}\ndatabase: {d}")
        return 0
    from apretrieval.extraction import ImageFiles, list_images

    paths = list_images(args.images)
    ids = [p.relative_to(args.images).as_posix() for p in paths]
    npy = _extract(model, ImageFiles(paths, None, args.max_side), ids, args.out, "images",
                   _common(args, model), {"images": str(Path(args.images).resolve())})
    print(f"descriptors: {npy}")
    return 0
