"""`apretrieval whiten`: learn the whitening of matching pairs (SfM-120k's) for a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from apretrieval.cli.extract import add_extraction_args, extraction_settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "whiten",
        help="learn a whitening from matching pairs (SfM-120k) for evaluate --whiten",
        description=(
            "Learned whitening (Radenovic et al.): the within-pair differences of matching "
            "pairs are whitened, then the whitened descriptors rotated onto their principal "
            "directions. The pairs come from retrieval-SfM-120k-whiten.pkl (apretrieval "
            "download sfm120k); their images are described with --checkpoint, or read from a "
            "descriptor file. Writes a whitening .npz for `apretrieval evaluate --whiten OUT`."
        ),
    )
    p.add_argument(
        "--pairs",
        required=True,
        type=Path,
        metavar="PKL",
        help="matching pairs: retrieval-SfM-120k-whiten.pkl (cids, qidxs, pidxs)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="model checkpoint (.pt) to describe the images with")
    src.add_argument(
        "--descriptors",
        type=Path,
        metavar="NPY",
        help="descriptor file of the images instead (ids: the image names, or paths ending so)",
    )
    p.add_argument("--out", required=True, type=Path, help="whitening .npz to write")
    p.add_argument(
        "--image-root",
        type=Path,
        metavar="DIR",
        help="folder of the image tree (default: ims/ beside the pairs file)",
    )
    p.add_argument(
        "--dim", type=int, default=None, help="output dimension (default: the descriptors')"
    )
    p.add_argument(
        "--features",
        type=Path,
        metavar="PREFIX",
        help="keep (and reuse, resume) the pair images' descriptors in PREFIX.npy",
    )
    add_extraction_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apretrieval.pairs_whitening import whitening_from_pairs

    settings = extraction_settings(args)
    if args.descriptors is not None and (args.features or args.image_root):
        raise ValueError("--features/--image-root go with --checkpoint, not --descriptors")
    w = whitening_from_pairs(
        args.checkpoint,
        args.pairs,
        settings,
        descriptors=args.descriptors,
        image_root=args.image_root,
        dim=args.dim,
        features=args.features,
        out=args.out,
    )
    print(
        f"learned whitening {w.mean.shape[0]} -> {w.dim} dimensions written to {args.out} "
        f"(use: apretrieval evaluate --whiten {args.out})"
    )
    return 0
