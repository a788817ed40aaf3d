"""GLDv2 retrieval: a checkpoint (or descriptor files) -> typed results, mAP@100 per split.

The test queries of the solution's Public and Private rows (:mod:`apretrieval.data.gldv2_retrieval`)
are ranked against the 761,757 index images by inner product; the top 100 of each query give
its AP@100 (:mod:`apretrieval.map_at_k`), averaged over the Public and the Private queries
separately. The results are the same typed results (and file, tables, report) as ROxford /
RParis, with the splits in place of the protocols: ``metrics["public"]`` / ``["private"]``
hold mAP@100 as ``mAP`` and precision at 1, 5, 10 as ``mP@k``; each query's ``ap`` is keyed
by its own split.

Scale: descriptors are extracted through the resumable, sharded descriptor files
(``cache_prefix``) and the index descriptors are read memory-mapped. The ranking goes through
a faiss flat (exact inner-product) index when faiss is installed, else through the exact
chunked :func:`apretrieval.search.knn` (the two agree element for element, ties by index).

Example:
    >>> res = evaluate_gldv2_checkpoint("model.pt", Gldv2Retrieval("data/gldv2"),
    ...                                 cache_prefix="feats/gldv2")        # doctest: +SKIP
    >>> res.metrics["private"].mAP                                          # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from apretrieval.benchmark_results import (
    PostProcessing,
    read_descriptor_files,
    saved,
    start_evaluation,
)
from apretrieval.data.gldv2_retrieval import GLDV2_RETRIEVAL, USAGES, Gldv2Retrieval
from apretrieval.faiss_index import IndexConfig, SearchIndex, build_index, require_faiss
from apretrieval.map_at_k import average_precision_at_k, precision_at_k
from apretrieval.pipeline import ExtractionSettings, extract_images, model_to_evaluate
from apretrieval.postprocess import Whitening
from apretrieval.results import EvaluationSettings, ProtocolMetrics, QueryResult, RetrievalResults
from apretrieval.search import knn

__all__ = [
    "SEARCHES",
    "check_gldv2_images",
    "evaluate_gldv2_checkpoint",
    "evaluate_gldv2_descriptor_files",
    "gldv2_results",
    "rank_top_k",
]

SEARCHES = ("auto", "faiss", "exact")
MAP_AT = 100  # the benchmark's k: mAP@100


def rank_top_k(
    q: np.ndarray, db: np.ndarray, k: int, search: str = "auto"
) -> tuple[np.ndarray, np.ndarray, str]:
    """Top-``k`` database rows of each query by inner product: ``(scores (Q, k), indices
    (Q, k), how)``; ``search``: ``faiss`` (flat index), ``exact`` (chunked knn over the
    possibly memory-mapped ``db``) or ``auto`` (faiss when installed)."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    k = min(int(k), db.shape[0])
    if search == "faiss" or (search == "auto" and _has_faiss()):
        index = build_index(db, IndexConfig(type="flat"))  # ImportError naming the install
        ids = [str(i) for i in range(db.shape[0])]
        scores, indices = SearchIndex(index, ids).search(q, k)
        return scores, indices, "faiss flat (exact inner product)"
    scores, indices = knn(np.ascontiguousarray(q, dtype=np.float32), db, k)
    return scores, indices, "exact knn"


def _has_faiss() -> bool:
    try:
        require_faiss()
    except ImportError:
        return False
    return True


def _mean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def gldv2_results(
    q: np.ndarray,
    db: np.ndarray,
    dataset: Gldv2Retrieval,
    *,
    model: str,
    made_by: EvaluationSettings,
    post: PostProcessing | None = None,
    whitening: Whitening | None = None,
    kappas: Sequence[int] = (1, 5, 10),
    search: str = "auto",
) -> RetrievalResults:
    """Results of query ``(Q, D)`` and index ``(N, D)`` descriptors in ``dataset``'s order:
    post-processed (``post`` with the loaded ``whitening``), ranked, scored per split."""
    if q.shape != (dataset.num_queries, q.shape[1]) or db.shape[0] != dataset.num_db:
        raise ValueError(
            f"descriptors {q.shape} / {db.shape} do not match the benchmark's "
            f"{dataset.num_queries} queries / {dataset.num_db} index images"
        )
    post = post or PostProcessing()
    q, db = post.apply(q, db, whitening)
    scores, indices, how = rank_top_k(q, db, MAP_AT, search)
    ap = average_precision_at_k(indices, dataset.relevant, MAP_AT)
    prec = precision_at_k(indices, dataset.relevant, kappas)
    usage = np.array(dataset.usage)
    metrics = {
        u: ProtocolMetrics(
            _mean(ap[usage == u]),
            {int(c): _mean(prec[usage == u, j]) for j, c in enumerate(kappas)},
        )
        for u in USAGES
        if (usage == u).any()
    }
    queries = tuple(
        QueryResult(
            image=name,
            topk=tuple(int(j) for j in row[row >= 0]),
            topk_scores=tuple(float(s) for s, j in zip(srow, row, strict=True) if j >= 0),
            ap={u: float(a)},
        )
        for name, row, srow, u, a in zip(
            dataset.query_names, indices, scores, dataset.usage, ap, strict=True
        )
    )
    recorded = post.record(
        made_by,
        whitening,
        num_db=dataset.num_db,
        other={"metric": f"mAP@{MAP_AT}", "search": how},
    )
    return RetrievalResults(
        dataset=GLDV2_RETRIEVAL,
        model=model,
        metrics=metrics,
        queries=queries,
        database=tuple(dataset.db_names),
        root=str(dataset.root.resolve()),
        gnd_file=dataset.gnd_path.name,
        settings=recorded,
    )


def check_gldv2_images(dataset: Gldv2Retrieval) -> None:
    """ValueError naming the first missing image (and the download command) if any is."""
    missing = dataset.missing_images()
    if missing:
        split = missing[0].relative_to(dataset.root).parts[0]  # test/... or index/...
        raise ValueError(
            f"{len(missing)} image(s) missing, e.g. {missing[0]} (run `apretrieval download "
            f"gldv2 --split {split} --root {dataset.root}`)"
        )


def evaluate_gldv2_checkpoint(
    checkpoint: str | os.PathLike[str] | nn.Module,
    dataset: Gldv2Retrieval,
    settings: ExtractionSettings | None = None,
    *,
    post: PostProcessing | None = None,
    cache_prefix: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    model_name: str | None = None,
    search: str = "auto",
) -> RetrievalResults:
    """Evaluate a checkpoint (or a model in memory) on GLDv2 retrieval.

    With ``cache_prefix`` the descriptors go through ``PREFIX.queries.npy`` / ``PREFIX.db.npy``
    (resumable, reused; the index read memory-mapped). Inputs are checked in the order that
    fails fastest: output location, whitening, images, then the model.
    """
    settings = settings or ExtractionSettings()
    post, whitening = start_evaluation(post, out)
    check_gldv2_images(dataset)
    model = model_to_evaluate(checkpoint, settings, model_name)
    parts = (
        ("queries", dataset.query_paths(), dataset.query_names),
        ("db", dataset.db_paths(), dataset.db_names),
    )
    q, db = (
        extract_images(
            model.module,
            paths,
            names,
            settings,
            out=None if cache_prefix is None else Path(f"{cache_prefix}.{part}"),
            checkpoint=model.checkpoint,
            desc="queries" if part == "queries" else "index",
            meta={"dataset": GLDV2_RETRIEVAL, "part": part},
        )
        for part, paths, names in parts
    )
    results = gldv2_results(
        q,
        db,
        dataset,
        model=model.name,
        made_by=model.made_by,
        post=post,
        whitening=whitening,
        search=search,
    )
    return saved(results, out)


def evaluate_gldv2_descriptor_files(
    query_features: str | os.PathLike[str],
    database_features: str | os.PathLike[str],
    dataset: Gldv2Retrieval,
    *,
    post: PostProcessing | None = None,
    out: str | os.PathLike[str] | None = None,
    model_name: str | None = None,
    search: str = "auto",
) -> RetrievalResults:
    """Evaluate query and index descriptor files on GLDv2 retrieval (no checkpoint, no
    images): rows matched to the benchmark's images by id or file name (the image id)."""
    post, whitening = start_evaluation(post, out)
    q, db, model, made_by = read_descriptor_files(
        query_features, database_features, dataset.query_names, dataset.db_names, model_name
    )
    results = gldv2_results(
        q,
        db,
        dataset,
        model=model,
        made_by=made_by,
        post=post,
        whitening=whitening,
        search=search,
    )
    return saved(results, out)
