"""`apretrieval download`: fetch ROxford5k, RParis6k or the R1M distractors."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from apretrieval.data.download import DATASETS

    p = subparsers.add_parser(
        "download",
        help="download a Revisited Oxford/Paris benchmark or the R1M distractors",
        description=(
            "Download the official files of a benchmark into DIR (images in DIR/jpg, ground "
            "truth or image list in DIR). Resumable: run the same command again after an "
            "interruption. Sizes and, where published, SHA-256 are checked."
        ),
    )
    p.add_argument("dataset", choices=sorted(DATASETS), help="which files to fetch")
    p.add_argument("--root", required=True, type=Path, metavar="DIR", help="target folder")
    p.add_argument(
        "--mirror",
        metavar="URL",
        help="base URL of a mirror holding the same relative paths (e.g. a local copy)",
    )
    p.add_argument(
        "--keep-archives", action="store_true", help="keep the .tgz files after extraction"
    )
    p.add_argument("--retries", type=int, default=3, help="resume attempts per file (default 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apretrieval.data.download import download_dataset

    if args.retries < 0:
        raise ValueError(f"--retries must be >= 0, got {args.retries}")
    # A DownloadError is an OSError: the CLI's error layer prints it as one line, exit 1.
    root = download_dataset(
        args.dataset,
        args.root,
        mirror=args.mirror,
        keep_archives=args.keep_archives,
        progress=not args.no_progress,
        retries=args.retries,
    )
    print(f"{args.dataset}: ready in {root}")
    return 0
