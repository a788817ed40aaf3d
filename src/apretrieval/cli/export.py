"""`apretrieval export`: a checkpoint's multi-scale descriptor network as TorchScript or ONNX."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from apretrieval.extraction.settings import DEFAULT_MAX_SIDE, DEFAULT_SCALES


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint's descriptor network to TorchScript or ONNX",
        description=(
            "Write the descriptor network of a checkpoint, image resize and multi-scale "
            "combination included, as TorchScript (torch.jit.load) or ONNX (needs "
            "apretrieval[export]). Input: images (B, 3, H, W) RGB float32 in [0, 1] at their "
            "own size, any B, H, W; output: (B, D) L2-normalised descriptors, equal to "
            "`apretrieval extract`'s with the same --scales and --max-side."
        ),
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="model checkpoint (.pt)")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    p.add_argument("--out", required=True, type=Path, help="file to write (.pt / .onnx)")
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=list(DEFAULT_SCALES),
        metavar="S",
        help="image scales, combined by GeM (default 1 0.7071 0.5)",
    )
    p.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        help="the network first shrinks images to this longer side, as extract does; 0: "
        f"never (default {DEFAULT_MAX_SIDE})",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apretrieval.atomic import check_replaceable
    from apretrieval.export import export_onnx, export_torchscript
    from apretrieval.models import load_model

    if not args.scales or any(not s > 0 for s in args.scales):
        raise ValueError(f"--scales must be positive numbers, got {args.scales}")
    check_replaceable(args.out)
    if args.max_side < 0:
        raise ValueError(f"--max-side must be >= 0 (0: no resize), got {args.max_side}")
    model = load_model(args.checkpoint).eval()
    export = export_onnx if args.format == "onnx" else export_torchscript
    max_side = args.max_side or None
    path = export(model, args.out, scales=args.scales, max_side=max_side)
    print(
        f"{args.format}: {path} (max side {max_side or 'as given'}, scales {args.scales}, "
        f"p={model.gem_p:.4f}, dim {model.out_dim})"
    )
    return 0
