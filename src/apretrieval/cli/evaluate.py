"""`apretrieval evaluate`: ROxford5k / RParis6k (+R1M) mAP and mP@k of a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from apretrieval.cli import extract as cli_extract
from apretrieval.cli.extract import add_extraction_args, check_extraction_args, resolve_device


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
        "--dataset", required=True,
        help="roxford5k, rparis6k, or NAME of any benchmark in that layout (ROOT/gnd_NAME.pkl)",
    )
    p.add_argument("--root", required=True, type=Path, metavar="DIR", help="benchmark folder")
    p.add_argument("--r1m", type=Path, metavar="DIR", help="add the R1M distractors from DIR")
    p.add_argument("--out", required=True, type=Path, help="results JSON to write")
    p.add_argument("--features", type=Path, metavar="PREFIX",
                   help="keep (and reuse, resume) descriptors in PREFIX.queries/.db.npy")
    g = p.add_argument_group("post-processing")
    g.add_argument("--whiten", type=Path, metavar="FILE",
                   help="whitening .npz (see postprocess.save_whitening), or descriptors .npy of "
                        "a separate image set to learn a PCA whitening from")
    g.add_argument("--whiten-dim", type=int, default=None, help="whitening output dimension")
    g.add_argument("--whiten-power", type=float, default=0.5,
                   help="eigenvalue power when learning the whitening (0.5 = full, 0 = PCA)")
    g.add_argument("--dba", type=int, default=0, metavar="K",
                   help="database-side augmentation with K neighbours (0 = off)")
    g.add_argument("--dba-alpha", type=float, default=3.0, help="DBA weight power (default 3)")
    g.add_argument("--qe", type=int, default=0, metavar="K",
                   help="alpha query expansion with K neighbours (0 = off)")
    g.add_argument("--qe-alpha", type=float, default=3.0, help="QE weight power (default 3)")
    add_extraction_args(p)
    p.set_defaults(func=run)


def _whitening(path: Path, dim: int | None, power: float):
    from apretrieval.postprocess import learn_whitening, load_whitening

    if not path.is_file():
        raise ValueError(f"--whiten: file not found: {path}")
    if path.suffix == ".npz":
        return load_whitening(path)
    if path.suffix == ".npy":
        return learn_whitening(np.load(path, mmap_mode="r"), dim=dim, power=power)
    raise ValueError(f"--whiten expects a .npz whitening or a .npy of descriptors, got {path}")


def _descriptors(args: argparse.Namespace, model: Any, ds: Any) -> tuple[np.ndarray, np.ndarray]:
    from apretrieval.extraction import ImageFiles, extract_descriptors

    if args.features is not None:
        from apretrieval.cli.extract import extract_benchmark

        q_path, d_path = extract_benchmark(args, model, args.features)
        return np.load(q_path), np.load(d_path, mmap_mode="r")
    missing = ds.missing_images()
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) missing, e.g. {missing[0]} "
            f"(run `apretrieval download {args.dataset} --root {args.root}`)"
        )
    kw = {
        "scales": args.scales, "batch_size": args.batch_size, "num_workers": args.workers,
        "device": args.device_obj, "max_side": args.max_side, "progress": not args.no_progress,
    }
    q = extract_descriptors(
        model, ImageFiles(ds.query_paths(), ds.query_boxes(), args.max_side), desc="queries", **kw
    )
    d = extract_descriptors(
        model, ImageFiles(ds.db_paths(), None, args.max_side), desc="database", **kw
    )
    return q, d


def _scores(q: np.ndarray, db: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """(Q, N) inner products, the database read in chunks (it may be a memory map)."""
    out = np.empty((q.shape[0], db.shape[0]), dtype=np.float32)
    q32 = np.ascontiguousarray(q, dtype=np.float32)
    for s in range(0, db.shape[0], chunk):
        out[:, s : s + chunk] = q32 @ np.asarray(db[s : s + chunk], dtype=np.float32).T
    return out


def run(args: argparse.Namespace) -> int:
    from apretrieval.data.revisited import RevisitedDataset
    from apretrieval.evaluation import evaluate_revisited, format_results_table, write_results
    from apretrieval.postprocess import (
        alpha_query_expansion,
        apply_whitening,
        database_augmentation,
    )

    check_extraction_args(args)
    for name in ("dba", "qe"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    args.device_obj = resolve_device(args.device)
    ds = RevisitedDataset(args.dataset, args.root, r1m_root=args.r1m)
    whitening = _whitening(args.whiten, args.whiten_dim, args.whiten_power) if args.whiten else None
    model = cli_extract.load_checkpoint_model(args.checkpoint, args.device_obj)
    q, db = _descriptors(args, model, ds)
    if whitening is not None:
        q, db = apply_whitening(q, whitening), apply_whitening(db, whitening)
    if args.dba:
        db = database_augmentation(db, args.dba, args.dba_alpha)
    if args.qe:
        q = alpha_query_expansion(q, db, args.qe, args.qe_alpha)
    scores = _scores(q, db)
    metrics = evaluate_revisited(scores, ds.gnd)
    settings = {
        "scales": args.scales, "max_side": args.max_side, "gem_p": float(model.gem_p),
        "whiten": str(args.whiten) if args.whiten else None,
        "whiten_dim": whitening.dim if whitening is not None else None,
        "dba": args.dba, "dba_alpha": args.dba_alpha, "qe": args.qe, "qe_alpha": args.qe_alpha,
        "r1m": str(args.r1m) if args.r1m else None, "num_db": ds.num_db,
    }
    write_results(
        args.out, scores=scores, gnd=ds.gnd, dataset=args.dataset, root=args.root,
        gnd_file=ds.gnd_path.name, database=[ds.relative(p) for p in ds.db_paths()],
        queries=[ds.relative(p) for p in ds.query_paths()], model=str(args.checkpoint),
        extra={"settings": settings},
    )
    name = args.dataset + ("+R1M" if args.r1m else "")
    print(format_results_table(metrics, title=f"{name}: {ds.num_queries} queries, "
                                              f"{ds.num_db} database images"))
    short = ", ".join(f"{p[0].upper()}: {100 * metrics[p]['mAP']:.2f}" for p in metrics)
    print(f"{name}: mAP {short}")
    print(f"results: {args.out}")
    return 0
