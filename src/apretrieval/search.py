"""Nearest-neighbour search over descriptors: exact chunked k-NN in torch and faiss indexes.

Conventions (the same as faiss, so the two are interchangeable): similarity is the inner product
of L2-normalised descriptors (cosine), results are ``scores (Q, k)`` sorted descending and
``indices (Q, k)`` int64 into the database rows. When ``k`` exceeds the database size the missing
places hold score ``-inf`` and index ``-1``.

faiss is an optional dependency (``pip install apretrieval[search]``); it is imported only when an
index is built or loaded, so :func:`knn` works without it.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from apretrieval.atomic import atomic_open, atomic_path

__all__ = [
    "INDEX_TYPES",
    "FeatureSet",
    "IndexConfig",
    "SearchIndex",
    "build_index",
    "knn",
    "load_features",
    "load_index",
    "ranked_ids",
    "require_faiss",
    "rerank_candidates",
]

INDEX_TYPES = ("flat", "ivfpq")
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "apretrieval-index/1"

# Budget for one block of the score matrix in knn (elements, i.e. 4 bytes each): 32M floats =
# 128 MiB keeps the matrix-product blocks large enough to run at BLAS speed while the whole
# search, even of 1M x 2048 descriptors, stays far below the memory of the database itself.
_BLOCK_ELEMENTS = 32 * 2**20


# --------------------------------------------------------------------------------------------
# Exact search in torch
# --------------------------------------------------------------------------------------------


def _as_2d(name: str, x: np.ndarray | Tensor) -> np.ndarray | Tensor:
    if not isinstance(x, np.ndarray | Tensor):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {tuple(x.shape)}")
    return x


def _chunk_to_torch(x: np.ndarray | Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rows of a numpy array (possibly a memmap) or tensor as a tensor on ``device``/``dtype``."""
    if isinstance(x, np.ndarray):
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        if x.dtype != np_dtype or not x.flags.c_contiguous:
            x = np.array(x, dtype=np_dtype, order="C")  # one copy, straight to the compute dtype
        # Checked in numpy: single-threaded and cheap next to the product it feeds.
        finite = bool(np.isfinite(x).all())
        with warnings.catch_warnings():
            # A read-only memmap is wrapped without a copy; nothing here writes to it.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(x)
    else:
        finite = bool(torch.isfinite(x).all())
    if not finite:
        raise ValueError("descriptors contain NaN/inf values")
    return x.to(device=device, dtype=dtype)


def _topk_first(s: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` per row of ``s (q, c)``; among ties the leftmost columns win, and the kept
    columns come back in column order. ``torch.topk`` picks ties arbitrarily, which would make
    results depend on the chunking."""
    if k >= s.shape[1]:
        cols = torch.arange(s.shape[1], device=s.device).expand(s.shape[0], -1)
        return s, cols
    vals, cols = s.topk(k + 1, dim=1, sorted=True)
    # Rows whose k-th and (k+1)-th values differ have no tie across the cut: topk's set is the
    # answer. Only rows with such a tie (rare for real descriptors) take the exact pass below.
    tie = vals[:, k - 1] == vals[:, k]
    cols = cols[:, :k].sort(dim=1).values
    if tie.any():
        rows = tie.nonzero()[:, 0]
        cols[rows] = _tie_cols(s[rows], vals[rows, k - 1 : k], k)
    return s.gather(1, cols), cols


def _tie_cols(s: Tensor, kth: Tensor, k: int) -> Tensor:
    """Columns of the top-``k`` of ``s`` given its k-th value ``kth (q, 1)``: all greater
    values, then the leftmost of those equal to it; in column order."""
    greater = s > kth
    tied = s == kth
    need = k - greater.sum(dim=1, keepdim=True)
    keep = greater | (tied & (tied.cumsum(dim=1) <= need))
    return keep.nonzero()[:, 1].view(s.shape[0], k)  # row-major: exactly k per row, in order


def knn(
    queries: np.ndarray | Tensor,
    database: np.ndarray | Tensor,
    k: int,
    *,
    block_elements: int = _BLOCK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray] | tuple[Tensor, Tensor]:
    """Exact top-``k`` inner-product search, chunked so no full ``(Q, N)`` matrix is built.

    queries (Q, D), database (N, D): numpy arrays (a ``np.memmap`` is read block by block) or
    tensors. Returns ``(scores, indices)``, each ``(Q, k)``, scores descending; numpy in, numpy
    out (float32 scores, int64 indices); tensors in, tensors out on the queries' device. The
    score blocks hold at most ``block_elements`` values: the database is scanned in chunks and
    each chunk's top-k is merged into the running top-k, so memory is ``O(block + Q k)``.
    """
    _as_2d("queries", queries)
    _as_2d("database", database)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"queries and database dimensions differ: {queries.shape[1]} vs {database.shape[1]}"
        )
    if block_elements < 1:
        raise ValueError(f"block_elements must be >= 1, got {block_elements!r}")
    as_numpy = isinstance(queries, np.ndarray)
    device = queries.device if isinstance(queries, Tensor) else torch.device("cpu")
    # float64 only when both sides are float64; everything else (float16 on CPU included) is
    # computed in float32, the precision faiss uses.
    both_double = all(
        (x.dtype == torch.float64) if isinstance(x, Tensor) else (x.dtype == np.float64)
        for x in (queries, database)
    )
    dtype = torch.float64 if both_double else torch.float32

    nq, n = queries.shape[0], database.shape[0]
    out_scores = torch.full((nq, k), -math.inf, dtype=dtype, device=device)
    out_indices = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    if nq and n:
        # Query blocks leave room for database chunks of >= 4096 rows (or 4k), so the merges
        # stay cheap next to the products; database chunks bound the score block.
        q_block = max(1, min(nq, block_elements // max(4096, 4 * k)))
        for q0 in range(0, nq, q_block):
            q = _chunk_to_torch(queries[q0 : q0 + q_block], device, dtype)
            # The chunk of database rows is bounded like the score block: a (c, D) float32
            # copy (or mapped pages) of at most block_elements values.
            n_chunk = max(k, min(block_elements // q.shape[0], block_elements // queries.shape[1]))
            best_s, best_i = _scan(q, database, k, n_chunk, device, dtype)
            out_scores[q0 : q0 + q.shape[0], : best_s.shape[1]] = best_s
            out_indices[q0 : q0 + q.shape[0], : best_i.shape[1]] = best_i
    if as_numpy:
        return out_scores.cpu().numpy(), out_indices.cpu().numpy()
    return out_scores, out_indices


def _scan(
    q: Tensor,
    database: np.ndarray | Tensor,
    k: int,
    n_chunk: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Running top-k of one query block over the database, chunk by chunk (scores descending,
    ties by database index)."""
    best_s = best_i = None
    n = database.shape[0]
    for start in range(0, n, n_chunk):
        chunk = _chunk_to_torch(database[start : start + n_chunk], device, dtype)
        s = q @ chunk.T  # (q, c): the only score matrix, bounded by the block budget
        s, i = _topk_first(s, k)
        i = i + start
        if best_s is not None:
            # Kept entries stay in index order, and every earlier chunk precedes this one, so
            # "leftmost wins ties" in the merge is "lowest index wins ties".
            s, cols = _topk_first(torch.cat([best_s, s], dim=1), k)
            i = torch.cat([best_i, i], dim=1).gather(1, cols)
        best_s, best_i = s, i
    order = best_s.argsort(dim=1, descending=True, stable=True)
    return best_s.gather(1, order), best_i.gather(1, order)


# --------------------------------------------------------------------------------------------
# Descriptor files (as written by `apretrieval extract`)
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureSet:
    """Descriptors ``(N, D)`` with their ordered image ids and extraction metadata."""

    descriptors: np.ndarray
    ids: list[str]
    checkpoint: str | None = None
    scales: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: str | None = None  # the .npy file, when read from disk


def _manifest_candidates(features: Path) -> list[Path]:
    return [
        features.with_suffix(".json"),
        features.with_name(features.name + ".json"),
        features.with_name(features.stem + ".manifest.json"),
        features.with_name(features.stem + "_manifest.json"),
        features.parent / MANIFEST_FILE,
    ]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


_ID_KEYS = ("ids", "images", "paths", "imlist")


def _ids_key(manifest: Any, source: Path) -> str | None:
    """Which key of a manifest holds the id list (None: the manifest is a bare list)."""
    if isinstance(manifest, list):
        return None
    if not isinstance(manifest, dict):
        raise ValueError(f"{source}: manifest must be a JSON object or list, got {manifest!r:.80}")
    for key in _ID_KEYS:
        if isinstance(manifest.get(key), list):
            return key
    raise ValueError(f"{source}: manifest has no 'ids' list (keys: {sorted(manifest)})")


def _ids_from_manifest(manifest: Any, source: Path) -> list[str]:
    key = _ids_key(manifest, source)
    return [str(v) for v in (manifest if key is None else manifest[key])]


def load_features(
    features: str | os.PathLike[str], manifest: str | os.PathLike[str] | None = None
) -> FeatureSet:
    """Read extracted descriptors (``.npy``, memory-mapped) and their JSON manifest.

    The manifest is ``{"ids": [...], "checkpoint": ..., "scales": [...], ...}`` (only ``ids`` is
    required; ``images``/``paths`` are accepted for it too). Without an explicit ``manifest`` it
    is looked for beside the features: ``X.json``, ``X.npy.json``, ``X.manifest.json``,
    ``X_manifest.json``, ``manifest.json``. With none found, ids are the row numbers.
    """
    path = Path(features)
    if not path.is_file():
        raise ValueError(f"features file not found: {path}")
    try:
        desc = np.load(path, mmap_mode="r")  # memory-mapped: 1M x 2048 need not fit in RAM
    except ValueError as err:
        raise ValueError(f"{path} is not a .npy array: {err}") from None
    if desc.ndim != 2:
        raise ValueError(f"{path}: descriptors must be (N, D), got shape {desc.shape}")
    if manifest is None:
        found = [p for p in _manifest_candidates(path) if p.is_file()]
        manifest_path = found[0] if found else None
    else:
        manifest_path = Path(manifest)
        if not manifest_path.is_file():
            raise ValueError(f"manifest file not found: {manifest_path}")
    if manifest_path is None:
        return FeatureSet(desc, [str(i) for i in range(desc.shape[0])], path=str(path.resolve()))
    data = _read_json(manifest_path)
    ids = _ids_from_manifest(data, manifest_path)
    if len(ids) != desc.shape[0]:
        raise ValueError(
            f"{manifest_path} lists {len(ids)} ids but {path} holds {desc.shape[0]} descriptors"
        )
    meta = data if isinstance(data, dict) else {}
    checkpoint = meta.get("checkpoint")
    scales = meta.get("scales")
    # Everything else (max_side, gem_p, dataset, ...) travels along, e.g. into an index.
    used = {_ids_key(data, manifest_path), "checkpoint", "scales"}
    extra = {key: value for key, value in meta.items() if key not in used}
    return FeatureSet(
        desc,
        ids,
        checkpoint=None if checkpoint is None else str(checkpoint),
        scales=None if scales is None else [float(s) for s in scales],
        extra=extra,
        path=str(path.resolve()),
    )


def rerank_candidates(
    queries: np.ndarray | Tensor,
    database: np.ndarray | Tensor,
    candidates: np.ndarray,
    k: int,
    *,
    block_elements: int = _BLOCK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` among ``candidates (Q, C)`` (database rows; -1 = none), e.g. the
    shortlist of an approximate index: each is re-scored as ``queries[q] . database[c]``.

    ``database`` may be a memmap: only candidate rows are read. Returns numpy ``scores``,
    ``indices`` ``(Q, k)``, scores descending, ties by index, padding ``-inf`` / ``-1``.
    """
    if isinstance(queries, Tensor):
        queries = queries.detach().cpu().numpy()
    if isinstance(database, Tensor):
        database = database.detach().cpu().numpy()
    _as_2d("queries", queries)
    _as_2d("database", database)
    cand = np.asarray(candidates, dtype=np.int64)
    if cand.ndim != 2 or cand.shape[0] != queries.shape[0]:
        raise ValueError(f"candidates must be (Q={queries.shape[0]}, C), got {cand.shape}")
    if cand.size and cand.max() >= database.shape[0]:
        raise ValueError(f"candidate {cand.max()} outside the database of {database.shape[0]}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    nq, c = cand.shape
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    q_block = max(1, block_elements // max(1, c * database.shape[1]))
    for q0 in range(0, nq, q_block):
        cb = np.sort(cand[q0 : q0 + q_block], axis=1)
        cb[:, 1:][cb[:, 1:] == cb[:, :-1]] = -1  # a candidate listed twice counts once
        rows = np.unique(cb[cb >= 0])  # sorted: a memmap is read in file order
        vecs = np.asarray(database[rows], dtype=np.float32)
        if not np.isfinite(vecs).all():
            raise ValueError("descriptors contain NaN/inf values")
        qb = np.asarray(queries[q0 : q0 + q_block], dtype=np.float32)
        sc = qb @ vecs.T  # (q, unique candidates of the block)
        pos = np.searchsorted(rows, np.maximum(cb, 0))
        s = np.where(cb >= 0, np.take_along_axis(sc, pos, axis=1), -np.inf).astype(np.float32)
        # Sort by score descending, then index ascending (padding, -1 at -inf, goes last).
        order = np.lexsort((np.where(cb >= 0, cb, np.iinfo(np.int64).max), -s), axis=1)[:, :k]
        out_s[q0 : q0 + q_block, : order.shape[1]] = np.take_along_axis(s, order, axis=1)
        out_i[q0 : q0 + q_block, : order.shape[1]] = np.take_along_axis(cb, order, axis=1)
    out_i[np.isneginf(out_s)] = -1
    return out_s, out_i


# --------------------------------------------------------------------------------------------
# faiss indexes
# --------------------------------------------------------------------------------------------


def require_faiss() -> Any:
    """The faiss module; ImportError with the install command when it is missing."""
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "faiss is needed for search indexes: pip install 'apretrieval[search]' "
            "(or pip install faiss-cpu)"
        ) from None
    return faiss


_faiss = require_faiss


@dataclass(frozen=True)
class IndexConfig:
    """How to build a faiss index over inner-product similarity.

    ``type="flat"``: exact (every database vector is compared). ``type="ivfpq"``: an inverted
    file of ``nlist`` k-means cells, each vector stored as a product-quantised code of ``m``
    sub-vectors x ``nbits`` bits (``m * nbits / 8`` bytes); a search visits ``nprobe`` cells.
    IVF-PQ is trained on ``train_size`` vectors drawn at random (``None``: all of them).
    """

    type: str = "flat"
    nlist: int = 1024
    m: int = 64
    nbits: int = 8
    nprobe: int = 16
    train_size: int | None = 131072
    seed: int = 0

    def __post_init__(self) -> None:
        if self.type not in INDEX_TYPES:
            raise ValueError(f"index type must be one of {INDEX_TYPES}, got {self.type!r}")
        for name in ("nlist", "m", "nbits", "nprobe"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 1 <= self.nbits <= 16:
            raise ValueError(f"nbits must be in [1, 16], got {self.nbits!r}")
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(
                f"train_size must be a positive integer or None, got {self.train_size!r}"
            )

    def factory_string(self) -> str:
        return "Flat" if self.type == "flat" else f"IVF{self.nlist},PQ{self.m}x{self.nbits}"


def _check_ivfpq(config: IndexConfig, n: int, dim: int) -> None:
    if dim % config.m:
        raise ValueError(f"m={config.m} must divide the descriptor dimension {dim}")
    n_train = n if config.train_size is None else min(n, config.train_size)
    # k-means needs at least one point per centroid (faiss refuses fewer).
    need = max(config.nlist, 2**config.nbits)
    if n_train < need:
        raise ValueError(
            f"IVF-PQ with nlist={config.nlist}, nbits={config.nbits} needs at least {need} "
            f"training vectors, got {n_train}: lower --nlist/--nbits or use --type flat"
        )


def _add(index: Any, x: np.ndarray, flat: bool, progress: bool = False) -> None:
    """Add rows of ``x`` in order: in one call when ``x`` is already float32 and C-contiguous
    for a flat index (faiss then allocates its N x D storage once, where growing it chunk by
    chunk transiently needs up to twice that), otherwise in chunks of ~128 MiB (IVF encoding
    makes several copies of what it is given; other dtypes need a float32 copy)."""
    from tqdm import tqdm

    if flat and x.dtype == np.float32 and x.flags.c_contiguous:
        index.add(x)
        return
    chunk = max(1024, _BLOCK_ELEMENTS // max(1, x.shape[1]))
    starts = range(0, x.shape[0], chunk)
    for start in tqdm(starts, desc="adding", unit="chunk", disable=not progress):
        index.add(np.ascontiguousarray(x[start : start + chunk], dtype=np.float32))


def build_index(
    descriptors: np.ndarray | Tensor, config: IndexConfig | None = None, *, progress: bool = False
) -> Any:
    """A trained faiss index (inner product) holding ``descriptors (N, D)``, in row order."""
    faiss = _faiss()
    config = config or IndexConfig()
    if isinstance(descriptors, Tensor):
        descriptors = descriptors.detach().cpu().numpy()
    _as_2d("descriptors", descriptors)
    n, dim = descriptors.shape
    if config.type == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        _check_ivfpq(config, n, dim)
        index = faiss.index_factory(dim, config.factory_string(), faiss.METRIC_INNER_PRODUCT)
        # The factory turns on polysemous training (a code reordering for Hamming-distance
        # filtering, which plain IVF-PQ search never uses): it costs O(2^(2 nbits)) per
        # sub-quantizer and dominated training time.
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
        if config.train_size is None or config.train_size >= n:
            train = np.ascontiguousarray(descriptors, dtype=np.float32)
        else:
            rng = np.random.default_rng(config.seed)
            # Sorted rows read a memmap sequentially.
            rows = np.sort(rng.choice(n, size=config.train_size, replace=False))
            train = np.ascontiguousarray(descriptors[rows], dtype=np.float32)
        index.train(train)
        del train
        faiss.extract_index_ivf(index).nprobe = config.nprobe
    _add(index, descriptors, config.type == "flat", progress=progress)
    return index


def _faiss_search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, indices = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    # faiss marks missing results with label -1 and score -FLT_MAX; knn uses -inf.
    scores[indices < 0] = -np.inf
    indices = indices.astype(np.int64, copy=False)
    # faiss lists tied scores in reverse id order; order ties by id, as knn does, so the two
    # agree element for element (padding, id -1 at -inf, stays last).
    by_id = np.argsort(np.where(indices < 0, np.iinfo(np.int64).max, indices), axis=1)
    scores = np.take_along_axis(scores, by_id, axis=1)
    indices = np.take_along_axis(indices, by_id, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


@dataclass
class SearchIndex:
    """A faiss index with the ordered ids of its vectors and how they were extracted."""

    index: Any
    ids: list[str]
    config: IndexConfig = field(default_factory=IndexConfig)
    checkpoint: str | None = None
    scales: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    features: str | None = None  # the descriptors file it was built from (for re-ranking)

    def __post_init__(self) -> None:
        if self.index.ntotal != len(self.ids):
            raise ValueError(f"index holds {self.index.ntotal} vectors but {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @classmethod
    def from_features(
        cls, features: FeatureSet, config: IndexConfig | None = None, *, progress: bool = False
    ) -> SearchIndex:
        config = config or IndexConfig()
        index = build_index(features.descriptors, config, progress=progress)
        return cls(
            index,
            list(features.ids),
            config,
            features.checkpoint,
            features.scales,
            dict(features.extra),
            features.path,
        )

    def search(
        self,
        queries: np.ndarray | Tensor,
        k: int,
        *,
        nprobe: int | None = None,
        rerank: int = 0,
        descriptors: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of ``queries (Q, D)``: ``scores (Q, k)`` descending, ``indices (Q, k)``.

        ``rerank=R`` (> 0): take the index's top ``max(R, k)`` and re-score them exactly
        against ``descriptors`` (default: the features file the index was built from, memory-
        mapped), which recovers most of the ranking quality that PQ codes lose.
        """
        if isinstance(queries, Tensor):
            queries = queries.detach().cpu().numpy()
        _as_2d("queries", queries)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}, index has {self.dim}")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if nprobe is not None and self.config.type == "ivfpq":
            if nprobe < 1:
                raise ValueError(f"nprobe must be a positive integer, got {nprobe!r}")
            _faiss().extract_index_ivf(self.index).nprobe = int(nprobe)
        if rerank < 0:
            raise ValueError(f"rerank must be >= 0, got {rerank!r}")
        if not rerank:
            return _faiss_search(self.index, queries, int(k))
        if descriptors is None:
            if self.features is None:
                raise ValueError("no descriptors to re-rank with: the index records no features")
            if not Path(self.features).is_file():
                raise ValueError(f"features file of the index not found: {self.features}")
            descriptors = np.load(self.features, mmap_mode="r")
        if descriptors.shape != (len(self), self.dim):
            raise ValueError(
                f"re-ranking descriptors have shape {descriptors.shape}, "
                f"the index holds {(len(self), self.dim)}"
            )
        _, cand = _faiss_search(self.index, queries, max(int(rerank), int(k)))
        return rerank_candidates(queries, descriptors, cand, int(k))

    def extract_queries(
        self,
        images: Sequence[str | os.PathLike[str]],
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        boxes: Sequence[Sequence[float] | None] | None = None,
    ) -> np.ndarray:
        """Descriptors ``(Q, D)`` of query image files, extracted as the database was: with
        the recorded checkpoint (or ``checkpoint``), scales and maximum image side."""
        from apretrieval.extraction import DEFAULT_SCALES, ImageFiles, extract_descriptors
        from apretrieval.models import load_model

        ckpt = checkpoint if checkpoint is not None else self.checkpoint
        if ckpt is None:
            raise ValueError("the index records no checkpoint: pass one to extract queries")
        if not Path(ckpt).is_file():
            raise ValueError(f"checkpoint not found: {ckpt}")
        missing = [str(p) for p in images if not Path(p).is_file()]
        if missing:
            raise ValueError(f"query image not found: {missing[0]}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        model = load_model(ckpt, map_location=dev)
        max_side = self.extra.get("max_side", 1024)
        scales = self.scales if self.scales else DEFAULT_SCALES
        files = ImageFiles([Path(p) for p in images], boxes, max_side)
        return extract_descriptors(
            model,
            files,
            scales=scales,
            num_workers=0,
            device=dev,
            max_side=max_side,
            progress=False,
            desc="queries",
        )

    def manifest(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "ids": self.ids,
            "dim": self.dim,
            "count": len(self),
            "index": asdict(self.config),
            "checkpoint": self.checkpoint,
            "scales": self.scales,
            "features": self.features,
            **({"extra": self.extra} if self.extra else {}),
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``index.faiss`` and ``manifest.json`` into ``directory`` (atomically each)."""
        faiss = _faiss()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / INDEX_FILE) as tmp:
            faiss.write_index(self.index, str(tmp))
        _write_json_atomic(out / MANIFEST_FILE, self.manifest())
        return out


def _write_json_atomic(path: Path, data: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def load_index(directory: str | os.PathLike[str]) -> SearchIndex:
    """Read an index written by :meth:`SearchIndex.save` (or ``apretrieval index build``)."""
    faiss = _faiss()
    d = Path(directory)
    index_path, manifest_path = d / INDEX_FILE, d / MANIFEST_FILE
    for p in (index_path, manifest_path):
        if not p.is_file():
            raise ValueError(f"not an index directory (missing {p.name}): {d}")
    manifest = _read_json(manifest_path)
    ids = _ids_from_manifest(manifest, manifest_path)
    known = {f.name for f in IndexConfig.__dataclass_fields__.values()}
    cfg = manifest.get("index") or {}
    config = IndexConfig(**{key: v for key, v in cfg.items() if key in known})
    index = faiss.read_index(str(index_path))
    if config.type == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = config.nprobe
    scales = manifest.get("scales")
    return SearchIndex(
        index,
        ids,
        config,
        checkpoint=manifest.get("checkpoint"),
        scales=None if scales is None else [float(s) for s in scales],
        extra=dict(manifest.get("extra") or {}),
        features=manifest.get("features"),
    )


def ranked_ids(
    ids: Sequence[str], scores: np.ndarray, indices: np.ndarray
) -> list[list[tuple[str, float]]]:
    """Per query, ``(id, score)`` best first, dropping padding (index -1)."""
    return [
        [(ids[int(i)], float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
        for row_s, row_i in zip(scores, indices, strict=True)
    ]
