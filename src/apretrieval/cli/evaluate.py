"""`apretrieval evaluate`: ROxford5k / RParis6k (+R1M) mAP and mP@k of a checkpoint, or the
GLDv2 retrieval benchmark's mAP@100 (Public and Private)."""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from apretrieval.cli.extract import add_extraction_args, extraction_settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint on ROxford5k / RParis6k (Easy, Medium, Hard)",
        description=(
            "Extract descriptors (or read them: --query-descriptors and --database-descriptors), "
            "optionally whiten / DBA / alpha-QE them, rank the database by inner product and "
            "report mAP and mP@1/5/10 (in %) under the Easy, Medium and Hard protocols of the "
            "revisited benchmarks, or mAP@100 and precision@1/5/10 on the Public and Private "
            "queries of GLDv2 retrieval (--dataset gldv2-retrieval); writes the per-query "
            "results JSON."
        ),
    )
    p.add_argument("--checkpoint", help="model checkpoint (.pt) to extract the descriptors with")
    p.add_argument(
        "--query-descriptors",
        type=Path,
        metavar="Q.npy",
        help="instead of --checkpoint: the queries' descriptors, Q.npy (Q, D) with its manifest "
        "Q.json listing the image ids (as apretrieval extract writes them, or from another "
        "tool); rows are matched to the benchmark by id or file name; no images needed",
    )
    p.add_argument(
        "--database-descriptors",
        type=Path,
        metavar="DB.npy",
        help="with --query-descriptors: the database images' descriptors, DB.npy + DB.json",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--dataset",
        help="roxford5k, rparis6k, NAME of any benchmark in that layout (ROOT/gnd_NAME.pkl), "
        "the path of its gnd_NAME.pkl, or gldv2-retrieval (ROOT: index.csv, "
        "retrieval_solution_v2.1.csv, index/ and test/ as `download gldv2` writes them)",
    )
    which.add_argument(
        "--datasets",
        metavar="A,B",
        help="several benchmarks in one run (e.g. roxford5k,rparis6k): each in ROOT or "
        "ROOT/NAME; one table with a column group per benchmark",
    )
    p.add_argument(
        "--root",
        type=Path,
        metavar="DIR",
        help="benchmark folder (or the folder holding one folder per benchmark)",
    )
    p.add_argument("--r1m", type=Path, metavar="DIR", help="add the R1M distractors from DIR")
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="results JSON to write (with several benchmarks: a folder, one NAME.json each)",
    )
    p.add_argument(
        "--features",
        type=Path,
        metavar="PREFIX",
        help="keep (and reuse, resume) descriptors in PREFIX.queries/.db.npy "
        "(PREFIX_NAME with several benchmarks)",
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


def _locate(entry: str, root: Path | None) -> tuple[str, Path]:
    from apretrieval.data.gldv2_retrieval import GLDV2_RETRIEVAL
    from apretrieval.data.revisited import locate_benchmark

    if entry != GLDV2_RETRIEVAL:
        return locate_benchmark(entry, root)
    if root is None:
        raise ValueError(f"{entry} needs --root DIR (the folder of `apretrieval download gldv2`)")
    nested = root / entry
    return entry, nested if not (root / "index.csv").is_file() and nested.is_dir() else root


def requested_benchmarks(args: argparse.Namespace) -> list[tuple[str, Path]]:
    entries = [args.dataset] if args.dataset else [e for e in args.datasets.split(",") if e]
    if not entries:
        raise ValueError("--datasets: expected names separated by commas, e.g. roxford5k,rparis6k")
    located = [_locate(e, args.root) for e in entries]
    names = [name for name, _ in located]
    if len(set(names)) != len(names):
        raise ValueError(f"--datasets names a benchmark twice: {args.datasets}")
    return located


def _descriptor_route(args: argparse.Namespace) -> bool:
    """Whether the descriptors are read from files (else extracted with --checkpoint)."""
    files = (args.query_descriptors, args.database_descriptors)
    if args.checkpoint is not None and any(f is not None for f in files):
        raise ValueError(
            "give either --checkpoint (extract the descriptors) or --query-descriptors and "
            "--database-descriptors (read them), not both"
        )
    if args.checkpoint is None and not all(f is not None for f in files):
        raise ValueError(
            "what to evaluate: --checkpoint MODEL.pt, or both --query-descriptors Q.npy and "
            "--database-descriptors DB.npy"
        )
    if args.checkpoint is None and (args.datasets or args.features):
        raise ValueError(
            "--query-descriptors / --database-descriptors evaluate one benchmark (--dataset) "
            "and need no --features"
        )
    return args.checkpoint is None


def _open(name: str, root: Path, r1m: Path | None) -> Any:
    """The benchmark ``name`` in ``root``: a Revisited-layout one or GLDv2 retrieval."""
    from apretrieval.data.gldv2_retrieval import GLDV2_RETRIEVAL, Gldv2Retrieval
    from apretrieval.data.revisited import RevisitedDataset

    if name != GLDV2_RETRIEVAL:
        return RevisitedDataset(name, root, r1m_root=r1m)
    if r1m is not None:
        raise ValueError(f"--r1m adds distractors to ROxford / RParis, not to {name}")
    return Gldv2Retrieval(root)


def _evaluate(
    ds: Any, out: Path, features: Path | None, args: argparse.Namespace, **kw: Any
) -> Any:
    """One benchmark's results, through the route its kind and the arguments call for."""
    from apretrieval import benchmark_results, gldv2_evaluation, pipeline
    from apretrieval.data.gldv2_retrieval import Gldv2Retrieval

    gldv2 = isinstance(ds, Gldv2Retrieval)
    post, apq, settings = kw["post"], kw["apq"], kw["settings"]
    if args.checkpoint is None:
        files = (args.query_descriptors, args.database_descriptors, ds)
        if gldv2:
            return gldv2_evaluation.evaluate_gldv2_descriptor_files(*files, post=post, out=out)
        return benchmark_results.evaluate_descriptor_files(*files, post=post, apq=apq, out=out)
    if gldv2:
        return gldv2_evaluation.evaluate_gldv2_checkpoint(
            str(args.checkpoint), ds, settings, post=post, cache_prefix=features, out=out
        )
    return pipeline.evaluate_checkpoint(
        str(args.checkpoint), ds, settings, post=post, apq=apq, cache_prefix=features, out=out
    )


def _summary(name: str, metrics: dict[str, Any]) -> str:
    """``NAME: mAP E: .., M: .., H: ..`` (GLDv2: ``mAP@100 Public: .., Private: ..``)."""
    from apretrieval.evaluation import PROTOCOLS

    revisited = set(metrics) <= set(PROTOCOLS)
    label = "mAP" if revisited else "mAP@100"
    values = ", ".join(
        f"{p[0].upper() if revisited else p.capitalize()}: {100 * v.mAP:.2f}"
        for p, v in metrics.items()
    )
    return f"{name}: {label} {values}"


def run(args: argparse.Namespace) -> int:
    from apretrieval.apq_analysis import APQSettings
    from apretrieval.atomic import check_writable, remove_stale_temporaries
    from apretrieval.benchmark_results import PostProcessing
    from apretrieval.locking import output_lock
    from apretrieval.tables import benchmarks_table, protocol_table, render_table

    # Everything a person typed is checked before the extraction (minutes to hours) starts.
    _descriptor_route(args)
    settings = extraction_settings(args)
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
    located = requested_benchmarks(args)
    several = len(located) > 1
    outs = [args.out / f"{name}.json" if several else args.out for name, _ in located]
    for out in outs:
        check_writable(out, "the results")
    datasets = [_open(name, root, args.r1m) for name, root in located]
    suffix = "+R1M" if args.r1m else ""
    metrics = {}
    with ExitStack() as held:
        # One writer per results file (and per folder of several), from before any work.
        for target in [args.out, *outs] if several else outs:
            held.enter_context(output_lock(target))
        for out in outs:  # what an evaluation killed while writing it left
            remove_stale_temporaries(out)
        for ds, out in zip(datasets, outs, strict=True):
            features = args.features
            if features is not None and several:
                features = features.with_name(f"{features.name}_{ds.name}")
            res = _evaluate(ds, out, features, args, post=post, apq=apq, settings=settings)
            name = ds.name + suffix
            metrics[name] = res.metrics
            if not several:
                title = f"{name}: {ds.num_queries} queries, {ds.num_db} database images"
                print(render_table(protocol_table(res.metrics, title=title), "text"))
    if several:
        sizes = ", ".join(f"{d.name} {d.num_queries} q / {d.num_db} db" for d in datasets)
        print(render_table(benchmarks_table(metrics, title=f"mAP and mP@10 in % ({sizes})")))
    for name, m in metrics.items():
        print(_summary(name, m))
    print(f"results: {', '.join(str(o) for o in outs)}")
    return 0
