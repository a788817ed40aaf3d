"""Typed evaluation results, their file (JSON) and the metrics table.

A results file holds one model evaluated on one benchmark. ``apretrieval evaluate --out`` and
the demo (``results_<model>.json``) write it, ``apretrieval report`` reads it::

    {"dataset": "roxford5k", "root": "/abs/dataset/folder", "gnd_file": "gnd_roxford5k.pkl",
     "model": "model.pt",
     "metrics": {"easy": {"mAP": 0.85, "mP@k": {"1": 1.0, "5": 0.9, "10": 0.8}}, ...},
     "database": ["jpg/<name>.jpg", ...],                    # N paths, relative to root
     "queries": [{"image": "jpg/<name>.jpg", "bbx": [x1, y1, x2, y2] | null,
                  "topk": [database indices, best first], "topk_scores": [...],
                  "ap": {"easy": float | null, "medium": ..., "hard": ...},
                  "ap_q": float | null,                      # null: no positive
                  "ap_q_sharp": float | null,
                  "ap_exact": float | null}, ...],           # Q entries
     "settings": {"scales": [...], "max_side": ..., ...},     # what produced the scores
     "apq_analysis": {"protocol": "medium", "num_bins": 20, "score_range": [-1.0, 1.0]}}

GLDv2 retrieval results (:mod:`apretrieval.gldv2_evaluation`) have the same form with the
splits ``public`` / ``private`` in place of the protocols: ``mAP`` is there mAP@100, ``mP@k``
the plain precision at k, and each query's ``ap`` holds its own split only.

Metrics are fractions in [0, 1]. In memory the ``mP@k`` keys are ints (as
:func:`apretrieval.evaluation.evaluate_revisited` returns them); JSON turns them into strings;
:meth:`ProtocolMetrics.from_dict` is the one place that reads either. Files written before
``apq_analysis`` was recorded used the defaults of :class:`~apretrieval.apq_analysis.APQSettings`;
``ap_q`` is the paper's estimator, ``ap_q_sharp`` (absent from older files) the sharp one, both
with the bins of ``apq_analysis``; ``ap_exact`` (absent from older files) is the non-interpolated
AP of the same ranking, the quantity they estimate (``ap`` holds the official, trapezoid AP).

The tables people read are :mod:`apretrieval.tables` (re-exported here).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from apretrieval.apq_analysis import APQSettings, pearson
from apretrieval.atomic import atomic_open
from apretrieval.data.gldv2_retrieval import USAGES
from apretrieval.evaluation import PROTOCOLS, ProtocolResult

__all__ = [
    "METRIC_GROUPS",
    "EvaluationSettings",
    "ListedResults",
    "ProtocolMetrics",
    "QueryResult",
    "RetrievalResults",
    "list_results",
    "load_results",
    "load_results_files",
    "metrics_from_dict",
    "metrics_to_dict",
    "model_label",
]


# --------------------------------------------------------------------------------------------
# Metrics

# What a results file reports metrics for: the Revisited protocols, or the GLDv2 retrieval
# splits (there ``mAP`` is mAP@100 and ``mP@k`` plain precision at k).
METRIC_GROUPS: tuple[str, ...] = (*PROTOCOLS, *USAGES)


@dataclass(frozen=True)
class ProtocolMetrics:
    """One protocol's means over the queries with a positive: mAP and mP@k (k -> value)."""

    mAP: float
    mP: dict[int, float]

    @classmethod
    def from_result(cls, result: ProtocolResult) -> ProtocolMetrics:
        return cls(result.mAP, result.mP)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "metrics") -> ProtocolMetrics:
        """From ``{"mAP": float, "mP@k": {k: float}}``; ``k`` may be an int or its string."""
        try:
            return cls(float(d["mAP"]), {int(k): float(v) for k, v in d["mP@k"].items()})
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(
                f"{where}: expected {{'mAP': float, 'mP@k': {{k: float}}}}, got {d!r}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """``{"mAP": float, "mP@k": {k: float}}`` with int ``k``, as ``evaluate_revisited``."""
        return {"mAP": self.mAP, "mP@k": dict(self.mP)}


def metrics_from_dict(metrics: Mapping[str, Any]) -> dict[str, ProtocolMetrics]:
    """Per-protocol (or per-split) metrics from plain dicts (or ProtocolMetrics), in the order
    of :data:`METRIC_GROUPS`."""
    unknown = sorted(set(metrics) - set(METRIC_GROUPS))
    if unknown:
        raise ValueError(f"metrics: unknown protocol(s) {unknown}, expected {METRIC_GROUPS}")
    out = {}
    for p in METRIC_GROUPS:
        if p in metrics:
            m = metrics[p]
            out[p] = m if isinstance(m, ProtocolMetrics) else ProtocolMetrics.from_dict(m, p)
    return out


def metrics_to_dict(metrics: Mapping[str, ProtocolMetrics]) -> dict[str, dict[str, Any]]:
    """The ``evaluate_revisited`` form: ``{protocol: {"mAP": float, "mP@k": {k: float}}}``."""
    return {p: m.to_dict() for p, m in metrics.items()}


# --------------------------------------------------------------------------------------------
# Per query and per run


def _opt_float(x: Any) -> float | None:
    return None if x is None or math.isnan(float(x)) else float(x)


@dataclass(frozen=True)
class QueryResult:
    """One query: its image (and crop), top-k database indices and scores, AP and AP_Q.

    ``ap[protocol]`` and ``ap_q`` are None when the query has no positive under the protocol;
    ``ap_q`` is the plain (paper's) AP_Q, ``ap_q_sharp`` the sharp estimator's, ``ap_exact``
    the non-interpolated AP they estimate (analysis protocol, junk removed);
    ``first_positive[protocol]``: the rank of its best-ranked positive (1-based, junk removed;
    empty in files written before it was recorded).
    """

    image: str
    topk: tuple[int, ...]
    topk_scores: tuple[float, ...]
    ap: dict[str, float | None]
    ap_q: float | None = None
    bbx: tuple[float, ...] | None = None
    ap_q_sharp: float | None = None
    ap_exact: float | None = None
    first_positive: dict[str, int | None] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "query") -> QueryResult:
        try:
            bbx = d.get("bbx")
            return cls(
                image=str(d["image"]),
                topk=tuple(int(j) for j in d["topk"]),
                topk_scores=tuple(float(v) for v in d.get("topk_scores") or ()),
                ap={str(p): _opt_float(v) for p, v in (d.get("ap") or {}).items()},
                ap_q=_opt_float(d.get("ap_q")),
                bbx=None if bbx is None else tuple(float(v) for v in bbx),
                ap_q_sharp=_opt_float(d.get("ap_q_sharp")),
                ap_exact=_opt_float(d.get("ap_exact")),
                first_positive={
                    str(p): None if v is None else int(v)
                    for p, v in (d.get("first_positive") or {}).items()
                },
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{where}: not a results query entry ({err!r})") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "bbx": None if self.bbx is None else list(self.bbx),
            "topk": list(self.topk),
            "topk_scores": list(self.topk_scores),
            "ap": dict(self.ap),
            "ap_q": self.ap_q,
            "ap_q_sharp": self.ap_q_sharp,
            "ap_exact": self.ap_exact,
            "first_positive": dict(self.first_positive),
        }


@dataclass(frozen=True)
class EvaluationSettings:
    """What produced the scores, as recorded in a results file (None: not recorded).

    ``other``: further values a producer recorded, kept as they are (the demo's ``method``).
    """

    scales: tuple[float, ...] | None = None
    max_side: int | None = None
    gem_p: float | None = None
    whiten: str | None = None
    whiten_dim: int | None = None
    whiten_power: float | None = None
    dba: int = 0
    dba_alpha: float | None = None
    qe: int = 0
    qe_alpha: float | None = None
    r1m: str | None = None
    num_db: int | None = None
    other: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvaluationSettings:
        names = {f.name for f in fields(cls)} - {"other"}
        known = {k: v for k, v in d.items() if k in names}
        if known.get("scales") is not None:
            known["scales"] = tuple(float(s) for s in known["scales"])
        return cls(**known, other={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "other"}
        if self.scales is not None:
            out["scales"] = list(self.scales)
        return {**out, **self.other}


_FIELDS_IN_FILE = ("dataset", "root", "gnd_file", "metrics", "database", "queries", "model")


@dataclass(frozen=True)
class RetrievalResults:
    """One model on one benchmark: metrics, per-query results and how they were produced.

    ``database``: N image paths relative to ``root`` (or absolute), the indices of
    ``QueryResult.topk``; ``apq``: the AP_Q of the per-query ``ap_q``; ``extra``: further
    top-level values of the file, kept as they are.
    """

    dataset: str
    model: str
    metrics: dict[str, ProtocolMetrics]
    queries: tuple[QueryResult, ...]
    database: tuple[str, ...]
    root: str = "."
    gnd_file: str = ""
    settings: EvaluationSettings = field(default_factory=EvaluationSettings)
    apq: APQSettings = field(default_factory=APQSettings)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.gnd_file:
            object.__setattr__(self, "gnd_file", f"gnd_{self.dataset}.pkl")
        n = len(self.database)
        for i, q in enumerate(self.queries):
            bad = [j for j in q.topk if not 0 <= j < n]
            if bad:
                raise ValueError(f"query {i}: top-k index {bad[0]} outside the database [0, {n})")

    def ap(self, protocol: str) -> np.ndarray:
        """Per-query AP under ``protocol`` (or GLDv2 split) -> (Q,), NaN where the query has
        no positive (or belongs to the other split)."""
        if protocol not in METRIC_GROUPS:
            raise ValueError(f"protocol must be one of {METRIC_GROUPS}, got {protocol!r}")
        values = [q.ap.get(protocol) for q in self.queries]
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

    def query_ap(self) -> tuple[str, np.ndarray]:
        """The per-query AP that ranks the queries, and its name: Medium AP on the Revisited
        benchmarks, each query's AP@100 on its own split for GLDv2 retrieval -> (name, (Q,))."""
        if self.queries and all(set(q.ap) <= set(USAGES) for q in self.queries):
            values = [next((v for v in q.ap.values() if v is not None), None) for q in self.queries]
            return "AP@100", np.array(
                [np.nan if v is None else v for v in values], dtype=np.float64
            )
        return "Medium AP", self.ap("medium")

    @property
    def apq_reference(self) -> str:
        """The exact AP that :meth:`apq_pairs` sets against AP_Q: ``"non-interpolated"`` (what
        AP_Q estimates) when recorded, else ``"official"`` (files written before it was)."""
        recorded = [q.ap_exact is not None for q in self.queries if q.ap_q is not None]
        return "non-interpolated" if recorded and all(recorded) else "official"

    def apq_pairs(self, estimator: str = "plain") -> tuple[np.ndarray, np.ndarray]:
        """(AP, AP_Q) of the queries that have both, under the analysis' protocol -> (n,), (n,).

        ``estimator``: ``"plain"`` (``ap_q``) or ``"sharp"`` (``ap_q_sharp``; none in older
        files). AP: see :attr:`apq_reference`.
        """
        if estimator not in ("plain", "sharp"):
            raise ValueError(f"estimator must be 'plain' or 'sharp', got {estimator!r}")
        values = [q.ap_q if estimator == "plain" else q.ap_q_sharp for q in self.queries]
        if self.apq_reference == "non-interpolated":
            exact = [q.ap_exact for q in self.queries]
            ap = np.array([np.nan if v is None else v for v in exact], dtype=np.float64)
        else:
            ap = self.ap(self.apq.protocol)
        ap_q = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        ok = ~(np.isnan(ap) | np.isnan(ap_q))
        return ap[ok], ap_q[ok]

    def apq_pearson(self) -> float:
        """Pearson correlation of AP and AP_Q over :meth:`apq_pairs` (NaN when undefined)."""
        return pearson(*self.apq_pairs())

    # ---------------------------------------------------------------------------- the file

    def to_dict(self) -> dict[str, Any]:
        """The file's content as plain values (``mP@k`` keys as ints)."""
        out = {
            "dataset": self.dataset,
            "root": self.root,
            "gnd_file": self.gnd_file,
            "metrics": metrics_to_dict(self.metrics),
            "database": list(self.database),
            "queries": [q.to_dict() for q in self.queries],
            "model": self.model,
            "settings": self.settings.to_dict(),
            "apq_analysis": {
                "protocol": self.apq.protocol,
                "num_bins": self.apq.num_bins,
                "score_range": list(self.apq.score_range),
            },
        }
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "results") -> RetrievalResults:
        if not isinstance(d, Mapping) or "metrics" not in d:
            raise ValueError(f"{source} is not an apretrieval results file (no 'metrics')")
        for key in ("queries", "database"):
            if key not in d:
                raise ValueError(
                    f"{source} lacks {key!r} (write results with `apretrieval evaluate --out`)"
                )
        apq = d.get("apq_analysis") or {}
        try:
            apq_settings = APQSettings(
                **{**apq, "score_range": tuple(apq.get("score_range", (-1, 1)))}
            )
        except TypeError as err:
            raise ValueError(f"{source}: bad 'apq_analysis' {apq!r} ({err})") from None
        known = {*_FIELDS_IN_FILE, "settings", "apq_analysis"}
        return cls(
            dataset=str(d.get("dataset", "")),
            model=str(d.get("model", "")),
            metrics=metrics_from_dict(d["metrics"]),
            queries=tuple(
                QueryResult.from_dict(q, f"{source}: query {i}") for i, q in enumerate(d["queries"])
            ),
            database=tuple(str(p) for p in d["database"]),
            root=str(d.get("root", ".")),
            gnd_file=str(d.get("gnd_file") or ""),
            settings=EvaluationSettings.from_dict(d.get("settings") or {}),
            apq=apq_settings,
            extra={k: v for k, v in d.items() if k not in known},
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON file atomically (never half-written); returns its path."""
        path = Path(path)
        with atomic_open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, allow_nan=False)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RetrievalResults:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"results file not found: {path}")
        try:
            with path.open(encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not JSON ({err})") from None
        return cls.from_dict(data, str(path))


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A results file as plain values, ``metrics[protocol]["mP@k"]`` keys as ints.

    The typed form is :meth:`RetrievalResults.load`.
    """
    return RetrievalResults.load(path).to_dict()


RESULTS_FILES_KEY = "results_files"  # a summary's map: label -> results file (the demo's)
LABELS_KEY = "labels"  # a summary's map: label -> the name its pages show
TRAIN_LOGS_KEY = "train_logs"  # a summary's map: label -> training log (metrics.jsonl)
# A checkpoint with one of these names is named by its run folder: runs/first/model.pt is
# "first/model" (two runs' model.pt would otherwise both be "model").
_RUN_FILES = ("model", "best", "checkpoint")


@dataclass(frozen=True)
class ListedResults:
    """One entry of what a results path holds: its label, results and training log if known."""

    label: str
    results: RetrievalResults
    train_log: Path | None = None
    source: Path | None = None  # the results file


def model_label(model: str, fallback: str) -> str:
    """How a results file's model is named: its checkpoint's file stem, with the run folder
    for a run's ``model`` / ``best`` / ``checkpoint`` (``first/model``); ``fallback`` without
    a model."""
    if not model:
        return fallback
    p = Path(model)
    return f"{p.parent.name}/{p.stem}" if p.stem in _RUN_FILES and p.parent.name else p.stem


def list_results(path: str | os.PathLike[str]) -> list[ListedResults]:
    """What ``path`` holds: one results file, or a summary that lists results files under
    ``results_files`` (the demo's ``results.json``; paths relative to it), labelled by its
    ``labels`` map when it has one, with its ``train_logs``. A results file's training log is
    the ``metrics.jsonl`` beside its checkpoint, when there is one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"results file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON results file ({err})") from None
    files = raw.get(RESULTS_FILES_KEY) if isinstance(raw, dict) else None
    if isinstance(files, dict):
        names = raw.get(LABELS_KEY) if isinstance(raw.get(LABELS_KEY), dict) else {}
        logs = raw.get(TRAIN_LOGS_KEY) if isinstance(raw.get(TRAIN_LOGS_KEY), dict) else {}
        out = []
        for key, file in files.items():
            log = logs.get(key)
            log_path = None if log is None else path.parent / Path(log)
            source = path.parent / Path(file)
            res = RetrievalResults.load(source)
            label = str(names.get(key, key))
            out.append(ListedResults(label, res, _existing(log_path), source))
        return out
    res = RetrievalResults.from_dict(raw, str(path))
    log_path = Path(res.model).with_name("metrics.jsonl") if res.model else None
    return [ListedResults(model_label(res.model, path.stem), res, _existing(log_path), path)]


def _existing(path: Path | None) -> Path | None:
    return path if path is not None and path.is_file() else None


def load_results_files(path: str | os.PathLike[str]) -> list[tuple[str, RetrievalResults]]:
    """(label, results) of what ``path`` holds (see :func:`list_results`)."""
    return [(entry.label, entry.results) for entry in list_results(path)]
