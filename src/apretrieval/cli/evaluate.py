"""`apretrieval evaluate`: ROxford5k / RParis6k (+R1M) mAP and mP@k of a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from apretrieval.cli.extract import add_extraction_args, check_extraction_args


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint on ROxford5k / RParis6k (Easy, Medium, Hard)",
        description=(
            "Extract descriptors, optionally whiten / DBA / alpha-QE them, rank the database "
            "by inner product and report mAP and mP@1/5/10 (in %) under the Easy, Medium and "
            "Hard protocols of the revisited benchmarks; writes the per-query results JSON."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="model checkpoint (.pt)")
    p.add_argument(
        "--dataset",
        required=True,
        help="roxford5k, rparis6k, or NAME of any benchmark in that layout (ROOT/gnd_NAME.pkl)",
    )
    p.add_argument("--root", required=True, type=Path, metavar="DIR", help="benchmark folder")
    p.add_argument("--r1m", type=Path, metavar="DIR", help="add the R1M distractors from DIR")
    p.add_argument("--out", required=True, type=Path, help="results JSON to write")
    p.add_argument(
        "--features",
        type=Path,
        metavar="PREFIX",
        help="keep (and reuse, resume) descriptors in PREFIX.queries/.db.npy",
    )
    g = p.add_argument_group("post-processing")
    g.add_argument(
        "--whiten",
        type=Path,
        metavar="FILE",
        help="whitening .npz (see postprocess.save_whitening), or descriptors .npy of "
        "a separate image set to learn a PCA whitening from",
    )
    g.add_argument("--whiten-dim", type=int, default=None, help="whitening output dimension")
    g.add_argument(
        "--whiten-power",
        type=float,
        default=0.5,
        help="eigenvalue power when learning the whitening (0.5 = full, 0 = PCA)",
    )
    g.add_argument(
        "--dba",
        type=int,
        default=0,
        metavar="K",
        help="database-side augmentation with K neighbours (0 = off)",
    )
    g.add_argument("--dba-alpha", type=float, default=3.0, help="DBA weight power (default 3)")
    g.add_argument(
        "--qe",
        type=int,
        default=0,
        metavar="K",
        help="alpha query expansion with K neighbours (0 = off)",
    )
    g.add_argument("--qe-alpha", type=float, default=3.0, help="QE weight power (default 3)")
    a = p.add_argument_group("AP vs AP_Q analysis (per-query AP_Q in the results)")
    a.add_argument(
        "--num-bins",
        type=int,
        default=20,
        help="bins of the quantized AP (default 20, the paper's)",
    )
    a.add_argument(
        "--apq-protocol",
        choices=("easy", "medium", "hard"),
        default="medium",
        help="protocol whose positives and junk the AP_Q uses (default medium)",
    )
    add_extraction_args(p)
    p.set_defaults(func=run)


def _extraction_settings(args: argparse.Namespace) -> Any:
    from apretrieval.pipeline import ExtractionSettings

    check_extraction_args(args)
    return ExtractionSettings(
        scales=tuple(args.scales),
        max_side=args.max_side,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        shard_size=args.shard_size,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from apretrieval.apq_analysis import APQSettings
    from apretrieval.data.revisited import RevisitedDataset
    from apretrieval.pipeline import PostProcessing, evaluate_checkpoint
    from apretrieval.results import check_writable, protocol_table, render_table

    # Everything a person typed is checked before the extraction (minutes to hours) starts.
    settings = _extraction_settings(args)
    post = PostProcessing(
        whiten=args.whiten,
        whiten_dim=args.whiten_dim,
        whiten_power=args.whiten_power,
        dba=args.dba,
        dba_alpha=args.dba_alpha,
        qe=args.qe,
        qe_alpha=args.qe_alpha,
    )
    apq = APQSettings(protocol=args.apq_protocol, num_bins=args.num_bins)
    check_writable(args.out)
    ds = RevisitedDataset(args.dataset, args.root, r1m_root=args.r1m)
    res = evaluate_checkpoint(
        str(args.checkpoint),
        ds,
        settings,
        post=post,
        apq=apq,
        cache_prefix=args.features,
        out=args.out,
    )
    name = args.dataset + ("+R1M" if args.r1m else "")
    title = f"{name}: {ds.num_queries} queries, {ds.num_db} database images"
    print(render_table(protocol_table(res.metrics, title=title), "text"))
    short = ", ".join(f"{p[0].upper()}: {100 * m.mAP:.2f}" for p, m in res.metrics.items())
    print(f"{name}: mAP {short}")
    print(f"results: {args.out}")
    return 0
