"""`apretrieval download`: fetch a benchmark (ROxford5k, RParis6k, R1M) or a training set
(SfM-120k, Google Landmarks v2)."""

from __future__ import annotations

import argparse
from pathlib import Path

TRAINING_SETS = ("gldv2", "sfm120k")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from apretrieval.data.download import DATASETS
    from apretrieval.data.gldv2 import SPLITS

    p = subparsers.add_parser(
        "download",
        help="download a benchmark (ROxford5k, RParis6k, R1M) or a training set (SfM-120k, GLDv2)",
        description=(
            "Download the official files of a benchmark or training set into DIR. Benchmarks: "
            "images in DIR/jpg, ground truth or image list in DIR. sfm120k: the two pickles in "
            "DIR, images in DIR/ims. gldv2: the split's CSVs in DIR, images in "
            "DIR/<train|index|test>, shards fetched --jobs at a time and checked against their "
            "published MD5. Resumable: run the same command again after an interruption; only "
            "what is missing or unverified is fetched."
        ),
    )
    p.add_argument(
        "dataset", choices=sorted((*DATASETS, *TRAINING_SETS)), help="which files to fetch"
    )
    p.add_argument("--root", required=True, type=Path, metavar="DIR", help="target folder")
    p.add_argument(
        "--mirror",
        metavar="URL",
        help="base URL of a mirror holding the same relative paths (e.g. a local copy)",
    )
    p.add_argument(
        "--keep-archives", action="store_true", help="keep the archives after extraction"
    )
    p.add_argument("--retries", type=int, default=3, help="resume attempts per file (default 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("gldv2")
    g.add_argument("--split", choices=sorted(SPLITS), help="which part of GLDv2 (required)")
    g.add_argument(
        "--shards",
        metavar="A-B",
        help="image shards to fetch, inclusive (e.g. 0-9; default: all of the split's)",
    )
    g.add_argument(
        "--jobs", type=int, default=4, metavar="N", help="shards fetched at once (default 4)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apretrieval.data.download import download_dataset

    if args.retries < 0:
        raise ValueError(f"--retries must be >= 0, got {args.retries}")
    if args.dataset != "gldv2":
        for flag, value in (("--split", args.split), ("--shards", args.shards)):
            if value is not None:
                raise ValueError(f"{flag} applies to gldv2 only, not {args.dataset}")
    common = {
        "mirror": args.mirror,
        "keep_archives": args.keep_archives,
        "progress": not args.no_progress,
        "retries": args.retries,
    }
    # A DownloadError is an OSError: the CLI's error layer prints it as one line, exit 1.
    if args.dataset == "gldv2":
        from apretrieval.data.gldv2 import download_gldv2

        if args.split is None:
            raise ValueError("gldv2: choose a split with --split (train-clean, train, index, test)")
        root = download_gldv2(args.split, args.root, shards=args.shards, jobs=args.jobs, **common)
        name = f"gldv2 {args.split}"
    elif args.dataset == "sfm120k":
        from apretrieval.data.sfm120k import download_sfm120k

        root = download_sfm120k(args.root, **common)
        name = "sfm120k"
    else:
        root = download_dataset(args.dataset, args.root, **common)
        name = args.dataset
    print(f"{name}: ready in {root}")
    return 0
