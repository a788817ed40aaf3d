"""`apretrieval index`: build a faiss search index from extracted descriptors, or describe one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "index",
        help="build a search index from extracted descriptors (faiss)",
        description="Build or describe a faiss index (needs `pip install apretrieval[search]`).",
    )
    sub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    b = sub.add_parser(
        "build",
        help="build an index from X.npy + X.json (as written by `apretrieval extract`)",
        description=(
            "Build DIR/index.faiss and DIR/manifest.json (image ids, the checkpoint and scales "
            "of the extraction, the index settings). --type flat is exact; --type ivfpq is an "
            "inverted file of NLIST cells with product-quantised codes of M x NBITS bits "
            "(M must divide the dimension), for millions of images."
        ),
    )
    b.add_argument(
        "--features",
        required=True,
        type=Path,
        metavar="X.npy",
        help="descriptors (N, D), with the manifest X.json beside them",
    )
    b.add_argument(
        "--manifest",
        type=Path,
        metavar="JSON",
        help="manifest of the image ids, if not X.json beside the features",
    )
    b.add_argument("--out", required=True, type=Path, metavar="DIR", help="index folder")
    b.add_argument(
        "--type",
        choices=("flat", "ivfpq"),
        default="flat",
        help="flat: exact inner product (default); ivfpq: compressed, approximate",
    )
    b.add_argument("--nlist", type=int, default=1024, help="IVF cells (ivfpq; default 1024)")
    b.add_argument("--m", type=int, default=64, help="PQ sub-vectors (ivfpq; default 64)")
    b.add_argument("--nbits", type=int, default=8, help="bits per sub-vector code (default 8)")
    b.add_argument(
        "--nprobe",
        type=int,
        default=16,
        help="cells visited per query, stored as the default (ivfpq; default 16)",
    )
    b.add_argument(
        "--train-size",
        type=int,
        default=131072,
        metavar="N",
        help="random vectors to train IVF-PQ on (0 = all; default 131072)",
    )
    b.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="checkpoint to record for query extraction (default: the manifest's)",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=run_build)

    i = sub.add_parser("info", help="describe an index", description="Describe an index.")
    i.add_argument("index", type=Path, metavar="DIR", help="index folder")
    i.set_defaults(func=run_info)


def _absolute_if_exists(path: str | None) -> str | None:
    # Relative checkpoint paths in a manifest are relative to where extraction ran; keep an
    # absolute one when it resolves from here, so `apretrieval search` works from anywhere.
    if path is None:
        return None
    p = Path(path)
    return str(p.resolve()) if p.exists() else path


def faiss_or_error(command: str) -> bool:
    """True when faiss imports; else prints the one-line install hint (exit code 1 follows)."""
    from apretrieval.faiss_index import require_faiss

    try:
        require_faiss()
    except ImportError as err:
        print(f"apretrieval {command}: error: {err}", file=sys.stderr)
        return False
    return True


def run_build(args: argparse.Namespace) -> int:
    from apretrieval.atomic import check_replaceable, check_writable
    from apretrieval.descriptors import load_features
    from apretrieval.faiss_index import IndexConfig, build_index_folder

    if not faiss_or_error("index"):
        return 1

    if args.train_size < 0:
        raise ValueError(f"--train-size must be >= 0, got {args.train_size}")
    config = IndexConfig(
        type=args.type,
        nlist=args.nlist,
        m=args.m,
        nbits=args.nbits,
        nprobe=args.nprobe,
        train_size=args.train_size or None,
    )
    check_replaceable(args.out, folder=True)
    check_writable(args.out / "index.faiss", "the index")  # before the long build
    features = load_features(args.features, args.manifest)
    if args.checkpoint is not None:
        features.checkpoint = args.checkpoint
    features.checkpoint = _absolute_if_exists(features.checkpoint)
    index = build_index_folder(features, args.out, config, progress=not args.no_progress)
    n, d = features.descriptors.shape
    print(f"{config.type} index of {n} x {d} descriptors: {args.out}")
    if index.checkpoint is None:
        print("note: no checkpoint recorded; `apretrieval search` will need --checkpoint")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from apretrieval.faiss_index import load_index

    if not faiss_or_error("index"):
        return 1

    index = load_index(args.index)
    cfg = index.config
    kind = (
        "flat (exact)"
        if cfg.type == "flat"
        else (f"IVF-PQ nlist={cfg.nlist} m={cfg.m} nbits={cfg.nbits} nprobe={cfg.nprobe}")
    )
    print(f"index:      {args.index}")
    print(f"type:       {kind}")
    print(f"vectors:    {len(index)} x {index.dim}")
    print(f"checkpoint: {index.checkpoint}")
    print(f"scales:     {index.scales}")
    print(f"features:   {index.features}")
    return 0
