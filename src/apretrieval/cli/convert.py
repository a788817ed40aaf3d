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
    p.add_argument(
        "input",
        metavar="IN.pt|NAME",
        help="released checkpoint: a file, or the name the project publishes it under "
        "(downloaded once, verified), e.g. Resnet101-AP-GeM (dirtorch), "
        "gl18-tl-resnet101-gem-w (cirtorch)",
    )
    p.add_argument(
        "--mirror",
        metavar="URL",
        help="fetch a released NAME from this base URL holding the same relative paths "
        "(cirtorch/<file>.pth, dirtorch/<NAME>.zip) instead of the project's host",
    )
    p.add_argument(
        "--download-dir",
        type=Path,
        metavar="DIR",
        help="where released networks are kept (default: ~/.cache/apretrieval/released)",
    )
    p.add_argument("--no-progress", action="store_true", help="no download progress bar")
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
    source = Path(args.input)
    if not source.is_file():  # a released name: fetched (or found) in the download folder
        from apretrieval.released import fetch_released, released_network

        network = released_network(args.input, args.source)
        source = fetch_released(
            network, args.download_dir, mirror=args.mirror, progress=not args.no_progress
        )
    elif args.mirror is not None:
        raise ValueError(f"--mirror applies to a released name, but {source} is a file")
    converted = convert(args.source, source, whiten_power=args.whiten_power)
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
