"""`apretrieval search`: the most similar database images of query images, from an index."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "search",
        help="search an index with query images",
        description=(
            "Extract each query image with the checkpoint, scales and image size recorded in "
            "the index (see `apretrieval index build`) and print its K most similar database "
            "images, best first, with their cosine similarity."
        ),
    )
    p.add_argument("--index", required=True, type=Path, metavar="DIR", help="index folder")
    p.add_argument(
        "--query",
        required=True,
        action="append",
        type=Path,
        metavar="IMAGE",
        help="query image, or a folder of them (repeat for several); one result block each",
    )
    p.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="model checkpoint (default: the one recorded in the index)",
    )
    p.add_argument("--nprobe", type=int, help="IVF cells to visit (ivfpq; default: recorded)")
    p.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="R",
        help="re-score the index's top R exactly with the descriptors it was built from "
        "(for ivfpq; default 0: off)",
    )
    p.add_argument("--device", default=None, help="torch device for extraction (default cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="query images per forward (default 8)")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="decoding processes, as extract (default 2; none for a single batch)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def query_images(paths: list[Path]) -> list[Path]:
    """The query images: files as given, folders replaced by their images (sorted, recursive)."""
    from apretrieval.data.lists import IMAGE_EXTENSIONS

    out: list[Path] = []
    for path in paths:
        if not path.is_dir():
            out.append(path)
            continue
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not found:
            raise ValueError(f"--query {path}: no image in this folder")
        out += found
    return out


def run(args: argparse.Namespace) -> int:
    from apretrieval.cli.index import faiss_or_error
    from apretrieval.faiss_index import load_index
    from apretrieval.pipeline import extract_index_queries
    from apretrieval.search import ranked_ids

    if not faiss_or_error("search"):
        return 1

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    queries = query_images(args.query)
    index = load_index(args.index)
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(
            f"need --batch-size >= 1 and --workers >= 0, got {args.batch_size}, {args.workers}"
        )
    desc = extract_index_queries(
        index,
        queries,
        checkpoint=args.checkpoint,
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=not args.no_progress and len(queries) > args.batch_size,
    )
    scores, indices = index.search(desc, args.k, nprobe=args.nprobe, rerank=args.rerank)
    ranked = ranked_ids(index.ids, scores, indices)
    if args.json:
        out = {
            "index": str(args.index),
            "k": args.k,
            "results": [
                {
                    "query": str(q),
                    "results": [
                        {"rank": r, "id": i, "score": s} for r, (i, s) in enumerate(rows, 1)
                    ],
                }
                for q, rows in zip(queries, ranked, strict=True)
            ],
        }
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    for n, (q, rows) in enumerate(zip(queries, ranked, strict=True)):
        if n:
            print()
        print(f"query: {q}")
        for r, (i, s) in enumerate(rows, 1):
            print(f"{r:>5}  {s:8.4f}  {i}")
    return 0
