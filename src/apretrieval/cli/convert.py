"""`apretrieval convert`: a released dirtorch / cirtorch model as an apretrieval checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a released dirtorch or cirtorch model into an apretrieval checkpoint",
        description=(
            "Read a released checkpoint of dirtorch (naver/deep-image-retrieval) or cirtorch "
            "(cnnimageretrieval-pytorch) without executing code from it, and write an "
            "apretrieval checkpoint giving the same descriptors (input normalisation, GeM p, "
            "FC), plus each post-processing whitening it carries as OUT_STEM.whiten-NAME.npz "
            "for `apretrieval evaluate --whiten`."
        ),
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=("dirtorch", "cirtorch"),
        help="the project the checkpoint comes from",
    )
    p.add_argument("input", type=Path, metavar="IN.pt", help="released checkpoint")
    p.add_argument(
        "--out", required=True, type=Path, metavar="OUT.pt", help="apretrieval checkpoint to write"
    )
    p.add_argument(
        "--whiten-power",
        "--whitenp",
        type=float,
        default=0.25,
        help="dirtorch: eigenvalue power of its PCA whitening (default 0.25, as its "
        "evaluation script)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apretrieval.convert import convert, save_converted

    if not 0 <= args.whiten_power <= 1:
        raise ValueError(f"--whiten-power must lie in [0, 1], got {args.whiten_power}")
    converted = convert(args.source, args.input, whiten_power=args.whiten_power)
    paths = save_converted(args.out, converted)
    model = converted.model
    cfg = model.config
    print(
        f"{args.source} {converted.source.get('arch')}: {cfg.name}, GeM p={model.gem_p:.4f}, "
        f"dim {model.out_dim}, mean {list(cfg.mean or ())}, std {list(cfg.std or ())}"
    )
    print(f"checkpoint: {paths.pop('model')}")
    for name, path in paths.items():
        print(f"whitening {name}: {path}")
    if paths:
        print(
            f"e.g. apretrieval evaluate --checkpoint {args.out} --whiten "
            f"{next(iter(paths.values()))} ..."
        )
    return 0
