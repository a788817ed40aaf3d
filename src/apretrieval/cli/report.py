"""`apretrieval report`: the HTML page of a results file (top-k grids, AP vs AP_Q, curves)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _query_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated query indices, got {text!r}")
    return items


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="write an HTML report of a results file (what the model retrieves)",
        description=(
            "Write DIR/index.html (with thumbnails in DIR/thumbs and PNG plots beside it; "
            "nothing is loaded from the network): the Easy/Medium/Hard table, the top results "
            "of chosen queries and of the worst queries by Medium AP with borders positive "
            "(green), negative (red) and junk (grey) under the Medium and Hard protocols, the "
            "AP vs AP_Q scatter and, with --train-log, the training curves."
        ),
    )
    p.add_argument(
        "--results",
        required=True,
        type=Path,
        metavar="JSON",
        help="results file written by `apretrieval evaluate --out`",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument(
        "--train-log",
        type=Path,
        metavar="JSONL",
        help="training log (metrics.jsonl of a training run) for the curves",
    )
    p.add_argument(
        "--queries",
        type=_query_list,
        default=[],
        metavar="I,J,...",
        help="queries to show (indices or image names) besides the worst ones",
    )
    p.add_argument(
        "--num-worst",
        type=int,
        default=3,
        metavar="N",
        help="also show the N worst queries by Medium AP (default 3)",
    )
    p.add_argument("--top", type=int, default=10, metavar="K", help="results per query (10)")
    p.add_argument(
        "--root",
        type=Path,
        metavar="DIR",
        help="dataset root, if it moved since the results were written",
    )
    p.add_argument(
        "--embed",
        action="store_true",
        help="inline the images in index.html (a single file to share)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apretrieval.report import write_report

    if not args.results.is_file():
        raise ValueError(f"results file not found: {args.results}")
    if args.train_log is not None and not args.train_log.is_file():
        raise ValueError(f"training log not found: {args.train_log}")
    path = write_report(
        args.results,
        args.out,
        train_log=args.train_log,
        queries=args.queries,
        num_worst=args.num_worst,
        top=args.top,
        root=args.root,
        embed=args.embed,
    )
    print(f"report: {path}")
    return 0
