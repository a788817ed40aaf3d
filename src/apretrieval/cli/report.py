"""`apretrieval report`: the HTML page of a results file (top-k grids, AP vs AP_Q, curves)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _query_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated query indices, got {text!r}")
    return items


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "report",
        help="write an HTML report of a results file, or a comparison page of several",
        description=(
            "Write DIR/index.html (with thumbnails in DIR/thumbs and PNG plots beside it; "
            "nothing is loaded from the network): the Easy/Medium/Hard table and evaluation "
            "settings, the top results of chosen queries, of the worst, the median and the best "
            "query by Medium AP, with borders positive (green, solid), negative (red, dashed) "
            "and junk (grey, dotted) under the Medium and Hard protocols, the AP vs AP_Q "
            "scatter and, with --train-log, the training curves. With several results files "
            "of one benchmark (or the demo's results.json): one comparison page instead."
        ),
    )
    p.add_argument(
        "--results",
        required=True,
        type=Path,
        nargs="+",
        metavar="JSON",
        help="results file written by `apretrieval evaluate --out`; several files (or the "
        "demo's results.json) give one comparison page of the models",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument(
        "--train-log",
        type=Path,
        metavar="JSONL",
        help="training log (metrics.jsonl of a training run) for the curves (default: the "
        "metrics.jsonl beside the evaluated checkpoint, when there is one)",
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
    from apretrieval.report.compare import comparison_runs, write_comparison
    from apretrieval.report.page import write_report

    runs = comparison_runs(args.results)  # checks that each file exists and is readable
    if len(args.results) > 1 or len(runs) > 1:
        if args.train_log is not None or args.queries:
            raise ValueError("--train-log and --queries apply to the report of one results file")
        path = write_comparison(
            [(r.label, r.results) for r in runs],
            args.out,
            root=args.root,
            top=args.top,
            embed=args.embed,
            train_logs={r.label: r.train_log for r in runs if r.train_log is not None},
        )
        print(f"comparison of {', '.join(r.label for r in runs)}: {path}")
        return 0
    if args.train_log is not None and not args.train_log.is_file():
        raise ValueError(f"training log not found: {args.train_log}")
    path = write_report(
        runs[0].results,
        args.out,
        train_log=args.train_log or runs[0].train_log,  # default: the log beside its checkpoint
        queries=args.queries,
        num_worst=args.num_worst,
        top=args.top,
        root=args.root,
        embed=args.embed,
    )
    print(f"report: {path}")
    return 0
