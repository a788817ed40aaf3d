"""faiss indexes over inner-product similarity, and the index folder (``index.faiss`` +
``manifest.json``) that ``apretrieval index build`` writes and ``apretrieval search`` reads.

Results follow :func:`apretrieval.search.knn`'s conventions (scores descending, ties by index,
padding ``-inf`` / ``-1``), so a flat index and exact k-NN agree element for element.

The two files of a folder are one unit: the manifest records the content key of its
``index.faiss`` (:mod:`apretrieval.filekey`) and :func:`load_index` refuses a folder whose
index was replaced without its manifest (a rebuild that died between the two writes), which
would otherwise pair new vectors with old ids. The manifest also keys the descriptor file the
index was built from, so re-ranking refuses a features file that changed since. A folder is
written under a lock (:mod:`apretrieval.locking`): one writer at a time.

faiss is an optional dependency (``pip install apretrieval[search]``), imported only when an
index is built or loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from apretrieval.atomic import atomic_open, atomic_path, remove_stale_temporaries
from apretrieval.descriptors import FeatureSet, load_features, read_manifest
from apretrieval.filekey import file_key, matches
from apretrieval.locking import output_lock
from apretrieval.search import _BLOCK_ELEMENTS, _as_2d, rerank_candidates

__all__ = [
    "INDEX_FILE",
    "INDEX_TYPES",
    "MANIFEST_FILE",
    "IndexConfig",
    "SearchIndex",
    "build_index",
    "build_index_folder",
    "load_index",
    "require_faiss",
]

INDEX_TYPES = ("flat", "ivfpq")
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "apretrieval-index/1"


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


def _check_finite(x: np.ndarray, ids: Sequence[str] | None) -> None:
    """ValueError naming the first non-finite row: faiss would index it, and a NaN row then
    silently drops out of every result list. Scanned in blocks (``x`` may be a memmap)."""
    chunk = max(1, _BLOCK_ELEMENTS // max(1, x.shape[1]))
    for start in range(0, x.shape[0], chunk):
        bad = ~np.isfinite(x[start : start + chunk]).all(axis=1)
        if bad.any():
            row = start + int(np.flatnonzero(bad)[0])
            name = f"row {row}" + (f" (image {ids[row]!r})" if ids is not None else "")
            raise ValueError(
                f"descriptors are not finite (NaN/inf) at {name}: refusing to index them"
            )


def build_index(
    descriptors: np.ndarray | Tensor,
    config: IndexConfig | None = None,
    *,
    progress: bool = False,
    ids: Sequence[str] | None = None,
) -> Any:
    """A trained faiss index (inner product) holding ``descriptors (N, D)``, in row order.

    Non-finite descriptors are refused (``ids``, when given, name the offending row).
    """
    faiss = _faiss()
    config = config or IndexConfig()
    if isinstance(descriptors, Tensor):
        descriptors = descriptors.detach().cpu().numpy()
    _as_2d("descriptors", descriptors)
    _check_finite(descriptors, ids)
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
    features_key: dict[str, Any] | None = None  # its content key when the index was built

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
        index = build_index(features.descriptors, config, progress=progress, ids=features.ids)
        return cls(
            index,
            list(features.ids),
            config,
            features.checkpoint,
            features.scales,
            dict(features.extra),
            features.path,
            None if features.path is None else file_key(features.path),
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

        ``k`` (and ``rerank``) larger than the index are clamped to its size: a query cannot
        have more results than there are items, and the result arrays are allocated for ``k``.

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
        k, rerank = min(int(k), max(len(self), 1)), min(int(rerank), len(self))
        if not rerank:
            return _faiss_search(self.index, queries, int(k))
        if descriptors is None:
            if self.features is None:
                raise ValueError("no descriptors to re-rank with: the index records no features")
            if not Path(self.features).is_file():
                raise ValueError(f"features file of the index not found: {self.features}")
            if self.features_key is not None and not matches(self.features_key, self.features):
                raise ValueError(
                    f"{self.features} changed since the index was built: rebuild the index "
                    "or re-rank with the descriptors it was built from"
                )
            descriptors = load_features(self.features).descriptors
        if descriptors.shape != (len(self), self.dim):
            raise ValueError(
                f"re-ranking descriptors have shape {descriptors.shape}, "
                f"the index holds {(len(self), self.dim)}"
            )
        _, cand = _faiss_search(self.index, queries, max(int(rerank), int(k)))
        return rerank_candidates(queries, descriptors, cand, int(k))

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
            **({"features_key": self.features_key} if self.features_key else {}),
            **({"extra": self.extra} if self.extra else {}),
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``index.faiss`` and then ``manifest.json``, which records the index file's
        content key, into ``directory``; each atomically, the folder locked meanwhile."""
        out = Path(directory)
        with output_lock(out):
            _write_folder(self, out)
        return out


def _write_folder(index: SearchIndex, out: Path) -> None:
    faiss = _faiss()
    out.mkdir(parents=True, exist_ok=True)
    for name in (INDEX_FILE, MANIFEST_FILE):  # what a killed writer left (we hold the lock)
        remove_stale_temporaries(out / name)
    with atomic_path(out / INDEX_FILE) as tmp:
        faiss.write_index(index.index, str(tmp))
    manifest = {**index.manifest(), "index_file": file_key(out / INDEX_FILE)}
    with atomic_open(out / MANIFEST_FILE, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)


def build_index_folder(
    features: FeatureSet,
    directory: str | os.PathLike[str],
    config: IndexConfig | None = None,
    *,
    progress: bool = False,
) -> SearchIndex:
    """Build an index of ``features`` and write it to ``directory``, holding the folder's lock
    from start to end (a second builder of the same folder is refused before it starts)."""
    out = Path(directory)
    with output_lock(out):
        index = SearchIndex.from_features(features, config, progress=progress)
        _write_folder(index, out)
    return index


def load_index(directory: str | os.PathLike[str]) -> SearchIndex:
    """Read an index written by :meth:`SearchIndex.save` (or ``apretrieval index build``)."""
    faiss = _faiss()
    d = Path(directory)
    index_path, manifest_path = d / INDEX_FILE, d / MANIFEST_FILE
    for p in (index_path, manifest_path):
        if not p.is_file():
            raise ValueError(f"not an index directory (missing {p.name}): {d}")
    manifest = read_manifest(manifest_path)
    # Folders written before manifests keyed their index are read without the check.
    if "index_file" in manifest and not matches(manifest["index_file"], index_path):
        raise ValueError(
            f"{manifest_path} does not describe {index_path} (its size or content differ): the "
            "folder was not written together, e.g. an interrupted build; build the index again"
        )
    ids = [str(v) for v in manifest["ids"]]
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
        features_key=manifest.get("features_key"),
    )
