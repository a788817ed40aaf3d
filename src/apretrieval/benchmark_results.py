"""Descriptors of a revisited benchmark -> typed results: the step after extraction.

Two routes end here: :func:`apretrieval.pipeline.evaluate_checkpoint` (descriptors just
extracted by a checkpoint) and :func:`evaluate_descriptor_files` (descriptor files written by
``apretrieval extract`` or by another tool, no checkpoint needed). Both post-process, rank a
block of queries at a time (:mod:`apretrieval.scoring`) and record how the scores were made.

Descriptor files are read through their owner, :mod:`apretrieval.descriptors` (``X.npy`` rows
+ ``X.json`` manifest with the row ``ids``). Their rows are put in the ground truth's order by
id: an id equal to the benchmark's (query name, or database path relative to the benchmark
root, as ``extract`` writes them), else one whose file name without extension is the same
(another tool's ``all_souls_000013.jpg`` or ``/data/jpg/all_souls_000013``). A file without a
manifest is taken in the ground truth's order when its row count matches.

Example:
    >>> res = evaluate_descriptor_files("q.npy", "db.npy",
    ...                                 RevisitedDataset("roxford5k", "data"))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from apretrieval.apq_analysis import APQSettings
from apretrieval.atomic import check_writable
from apretrieval.data.revisited import RevisitedDataset
from apretrieval.descriptors import FeatureSet, check_finite, features_paths, load_features
from apretrieval.postprocess import (
    Whitening,
    alpha_query_expansion,
    apply_whitening,
    database_augmentation,
    learn_whitening,
    load_whitening,
)
from apretrieval.results import EvaluationSettings, RetrievalResults
from apretrieval.scoring import evaluate_descriptors

__all__ = [
    "PostProcessing",
    "benchmark_results",
    "evaluate_descriptor_files",
    "read_descriptor_files",
    "rows_in_order",
    "saved",
    "start_evaluation",
]


@dataclass(frozen=True)
class PostProcessing:
    """Descriptor post-processing before ranking (see :mod:`apretrieval.postprocess`).

    ``whiten``: a whitening ``.npz`` (:func:`~apretrieval.postprocess.save_whitening`) or the
    ``.npy`` descriptors of a separate image set to learn a PCA whitening from, with
    ``whiten_dim`` outputs and eigenvalue power ``whiten_power`` (0.5 whitens, 0 is plain PCA).
    ``dba`` / ``qe``: database-side augmentation / alpha query expansion with that many
    neighbours (0: off), weights raised to ``dba_alpha`` / ``qe_alpha``.
    """

    whiten: str | os.PathLike[str] | None = None
    whiten_dim: int | None = None
    whiten_power: float = 0.5
    dba: int = 0
    dba_alpha: float = 3.0
    qe: int = 0
    qe_alpha: float = 3.0

    def __post_init__(self) -> None:
        for name in ("dba", "qe"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    def load_whitening(self) -> Whitening | None:
        """The whitening to apply (read, or learned from the ``.npy`` set), None without one."""
        if self.whiten is None:
            return None
        path = Path(self.whiten)
        if not path.is_file():
            raise ValueError(f"whitening file not found: {path}")
        if path.suffix == ".npz":
            return load_whitening(path)
        if path.suffix == ".npy":
            x = load_features(path).descriptors
            return learn_whitening(x, dim=self.whiten_dim, power=self.whiten_power)
        raise ValueError(
            f"whitening: expected a .npz whitening or a .npy of descriptors, got {path}"
        )

    def apply(
        self, q: np.ndarray, db: np.ndarray, whitening: Whitening | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Whitening, then DBA on the database, then alpha-QE of the queries against it."""
        if whitening is not None:
            q, db = apply_whitening(q, whitening), apply_whitening(db, whitening)
        if self.dba:
            db = database_augmentation(db, self.dba, self.dba_alpha)
        if self.qe:
            q = alpha_query_expansion(q, db, self.qe, self.qe_alpha)
        return q, db

    def record(
        self,
        made_by: EvaluationSettings,
        whitening: Whitening | None,
        *,
        num_db: int,
        r1m: str | None = None,
        other: Mapping[str, Any] | None = None,
    ) -> EvaluationSettings:
        """``made_by`` (how the descriptors were made: scales, max side, GeM p, ...) completed
        with this post-processing, the loaded ``whitening``, the database size and ``other``."""
        return EvaluationSettings(
            scales=made_by.scales,
            max_side=made_by.max_side,
            gem_p=made_by.gem_p,
            whiten=None if self.whiten is None else str(self.whiten),
            whiten_dim=None if whitening is None else whitening.dim,
            whiten_power=None if whitening is None else whitening.power,
            dba=self.dba,
            dba_alpha=self.dba_alpha,
            qe=self.qe,
            qe_alpha=self.qe_alpha,
            r1m=r1m,
            num_db=num_db,
            other={**made_by.other, **(other or {})},
        )


def start_evaluation(
    post: PostProcessing | None, out: str | os.PathLike[str] | None
) -> tuple[PostProcessing, Whitening | None]:
    """The checks every evaluation route makes first, as they fail fastest: the results'
    folder (``out``) is writable and the whitening reads -> ``(post, whitening)``."""
    post = post or PostProcessing()
    if out is not None:
        check_writable(out, "the results")
    return post, post.load_whitening()


def saved(results: RetrievalResults, out: str | os.PathLike[str] | None) -> RetrievalResults:
    """``results``, written to ``out`` first when given."""
    if out is not None:
        results.save(out)
    return results


def benchmark_results(
    q: np.ndarray,
    db: np.ndarray,
    dataset: RevisitedDataset,
    *,
    model: str,
    made_by: EvaluationSettings,
    post: PostProcessing | None = None,
    whitening: Whitening | None = None,
    apq: APQSettings | None = None,
    kappas: Sequence[int] = (1, 5, 10),
    topk: int = 100,
    block_size: int | None = None,
) -> RetrievalResults:
    """Results of query ``(Q, D)`` and database ``(N, D)`` descriptors in ``dataset``'s order.

    ``post`` (with ``whitening``, already loaded) is applied first; ``made_by`` records how
    the descriptors were made (scales, max side, GeM p, ...), completed here with the
    post-processing and the database size.
    """
    post = post or PostProcessing()
    q, db = post.apply(q, db, whitening)
    metrics, queries = evaluate_descriptors(
        q,
        db,
        dataset.gnd,
        [dataset.relative(p) for p in dataset.query_paths()],
        block_size=block_size,
        kappas=kappas,
        topk=topk,
        apq=apq,
    )
    recorded = post.record(
        made_by,
        whitening,
        num_db=dataset.num_db,
        r1m=None if dataset.r1m_root is None else str(dataset.r1m_root),
    )
    return RetrievalResults(
        dataset=dataset.name,
        model=model,
        metrics=metrics,
        queries=queries,
        database=tuple(dataset.relative(p) for p in dataset.db_paths()),
        root=str(dataset.root.resolve()),
        gnd_file=dataset.gnd_path.name,
        settings=recorded,
        apq=apq or APQSettings(),
    )


def _stem(image_id: str) -> str:
    return PurePosixPath(image_id.replace("\\", "/")).name.rsplit(".", 1)[0]


def rows_in_order(
    features: FeatureSet, wanted: Sequence[str], what: str, *, has_manifest: bool = True
) -> np.ndarray:
    """The rows of ``features`` for the ids ``wanted``, in that order -> (len(wanted), D).

    Matched by exact id, else by file name without extension (module docstring); without a
    manifest the rows are taken as they are when the counts agree. ValueError naming the
    first id not found (``what``: "query" or "database", for the message).
    """
    desc = features.descriptors
    where = features.path or "the descriptor file"
    if not has_manifest:
        if desc.shape[0] != len(wanted):
            raise ValueError(
                f"{where}: {desc.shape[0]} {what} descriptors and no manifest (.json) with their "
                f"ids, but the benchmark has {len(wanted)}: write the ids in its manifest"
            )
        return np.asarray(desc, dtype=np.float32)
    exact = {image_id: i for i, image_id in enumerate(features.ids)}
    by_stem: dict[str, int] = {}
    for i, image_id in enumerate(features.ids):
        stem = _stem(image_id)
        by_stem[stem] = -1 if stem in by_stem else i  # -1: several ids share this name
    rows = []
    for name in wanted:
        row = exact.get(name, by_stem.get(_stem(name)))
        if row is None or row < 0:
            why = "is not among" if row is None else "matches several of"
            raise ValueError(
                f"{where}: the {what} image {name!r} {why} its {len(features.ids)} ids "
                f"(e.g. {features.ids[:2]}); ids are matched exactly or by file name"
            )
        rows.append(row)
    out = np.asarray(desc[np.asarray(rows, dtype=np.int64)], dtype=np.float32)
    check_finite(out, list(wanted))
    return out


def read_descriptor_files(
    query_features: str | os.PathLike[str],
    database_features: str | os.PathLike[str],
    query_ids: Sequence[str],
    db_ids: Sequence[str],
    model_name: str | None = None,
) -> tuple[np.ndarray, np.ndarray, str, EvaluationSettings]:
    """Query and database descriptor files in a benchmark's order (``query_ids`` /
    ``db_ids``) -> ``(q (Q, D), db (N, D), model, made_by)``: ``model`` is ``model_name``,
    else the checkpoint the query manifest records, else the query file; ``made_by`` is what
    the query manifest records of how they were made. ValueError if the dimensions differ."""
    q_set, q = _read(query_features, query_ids, "query")
    _, db = _read(database_features, db_ids, "database")
    if q.shape[1] != db.shape[1]:
        raise ValueError(
            f"query descriptors have {q.shape[1]} dimensions, database ones {db.shape[1]}: "
            f"{query_features} and {database_features} were not made by the same model"
        )
    made_by = EvaluationSettings(
        scales=None if q_set.scales is None else tuple(q_set.scales),
        max_side=q_set.extra.get("max_side"),
        gem_p=q_set.extra.get("gem_p"),
        other={
            "query_descriptors": str(query_features),
            "database_descriptors": str(database_features),
        },
    )
    return q, db, model_name or q_set.checkpoint or str(query_features), made_by


def _read(
    path: str | os.PathLike[str], wanted: Sequence[str], what: str
) -> tuple[FeatureSet, np.ndarray]:
    features = load_features(path)
    has_manifest = features_paths(Path(path))[1].is_file()
    return features, rows_in_order(features, wanted, what, has_manifest=has_manifest)


def evaluate_descriptor_files(
    query_features: str | os.PathLike[str],
    database_features: str | os.PathLike[str],
    dataset: RevisitedDataset,
    *,
    post: PostProcessing | None = None,
    apq: APQSettings | None = None,
    kappas: Sequence[int] = (1, 5, 10),
    topk: int = 100,
    block_size: int | None = None,
    out: str | os.PathLike[str] | None = None,
    model_name: str | None = None,
) -> RetrievalResults:
    """Evaluate query and database descriptor files on ``dataset``: no checkpoint, no images.

    Only the ground truth is read from the benchmark. The rows are ranked by inner product
    (cosine for L2-normalised rows, as ``extract`` writes them). ``model_name`` defaults to
    the checkpoint the query manifest records, else the query file. With ``out`` the results
    file is written there (its folder checked first).
    """
    post, whitening = start_evaluation(post, out)
    db_ids = [dataset.relative(p) for p in dataset.db_paths()]
    q, db, model, made_by = read_descriptor_files(
        query_features, database_features, dataset.query_names, db_ids, model_name
    )
    results = benchmark_results(
        q,
        db,
        dataset,
        model=model,
        made_by=made_by,
        post=post,
        whitening=whitening,
        apq=apq,
        kappas=kappas,
        topk=topk,
        block_size=block_size,
    )
    return saved(results, out)
