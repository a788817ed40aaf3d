"""From a checkpoint and images to descriptors: the library route behind the commands.

``apretrieval extract``, ``evaluate`` and ``search`` (and the demo) are thin shells over these
functions; they take typed settings (:class:`ExtractionSettings`), never parsed command lines.

- :func:`load_checkpoint_model`: a checkpoint's model on a device.
- :func:`extract_benchmark`: the query (cropped) and database descriptors of a revisited
  benchmark, ``(Q, D)`` and ``(N, D)``, in memory or through the resumable descriptor files.
- :func:`extract_folder`: an image folder to a descriptor file.
- :func:`extract_images`: a list of image files to descriptors (in memory, or a descriptor file).
- :func:`extract_index_queries`: query images for an index, extracted as its database was.
- :func:`evaluate_checkpoint`: a checkpoint (or model) on a benchmark -> typed results
  (:class:`~apretrieval.results.RetrievalResults`), scored a block of queries at a time.

Example:
    >>> settings = ExtractionSettings(scales=(1.0,), num_workers=0)        # doctest: +SKIP
    >>> model = load_checkpoint_model("model.pt", settings.device)          # doctest: +SKIP
    >>> q, db = extract_benchmark(model, RevisitedDataset("roxford5k", "data/roxford5k"),
    ...                           settings)                                  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from apretrieval.apq_analysis import APQSettings
from apretrieval.benchmark_results import (
    PostProcessing,
    benchmark_results,
    saved,
    start_evaluation,
)
from apretrieval.data.revisited import RevisitedDataset
from apretrieval.descriptors import load_features
from apretrieval.extraction.images import ImageFiles, image_ids, list_images
from apretrieval.extraction.loop import extract_descriptors
from apretrieval.extraction.resumable import extract_to_file
from apretrieval.extraction.settings import DEFAULT_MAX_SIDE, DEFAULT_SCALES, check_scales

if TYPE_CHECKING:
    from apretrieval.faiss_index import SearchIndex
from apretrieval.precision import amp_dtype
from apretrieval.results import EvaluationSettings, RetrievalResults

__all__ = [
    "ExtractionSettings",
    "ModelToEvaluate",
    "check_benchmark_images",
    "evaluate_checkpoint",
    "extract_benchmark",
    "extract_benchmark_files",
    "extract_folder",
    "extract_images",
    "extract_index_queries",
    "extract_query_images",
    "load_checkpoint_model",
    "model_to_evaluate",
    "resolve_device",
]


@dataclass(frozen=True)
class ExtractionSettings:
    """How descriptors are extracted (see :mod:`apretrieval.extraction`).

    ``device`` None: CUDA when available, else the CPU (:func:`resolve_device`).
    ``shard_size`` only matters for extraction to files (the unit of resuming).
    """

    scales: tuple[float, ...] = DEFAULT_SCALES
    max_side: int | None = DEFAULT_MAX_SIDE
    batch_size: int = 8
    num_workers: int = 2
    device: str | torch.device | None = None
    shard_size: int = 1024
    progress: bool = True
    skip_bad: bool = False  # extraction to files: leave unreadable images out, listed
    amp: str = "off"  # off, bf16, fp16: autocast of the network (see precision)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", check_scales(self.scales))
        for name in ("batch_size", "shard_size", "max_side"):
            value = getattr(self, name)
            if value is None and name == "max_side":
                continue  # keep the images' own size
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        amp_dtype(self.amp)  # ValueError naming the modes
        if isinstance(self.num_workers, bool) or self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers!r}")

    def _kwargs(self, device: torch.device) -> dict[str, Any]:
        return {
            "scales": self.scales,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "device": device,
            "max_side": self.max_side,
            "progress": self.progress,
            "amp": self.amp,
        }


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch device; None or ``"auto"``: CUDA when available, else the CPU.
    A CUDA device on a machine without one is a RuntimeError saying so, before any file is
    read (loading onto it would fail later, and less clearly)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(dev)!r} asked for, but CUDA is not available")
    return dev


def load_checkpoint_model(
    checkpoint: str | os.PathLike[str], device: str | torch.device | None = None
) -> nn.Module:
    """The model of a checkpoint written by :func:`apretrieval.models.save_checkpoint`, on
    ``device`` (see :func:`resolve_device`)."""
    from apretrieval.models import load_model

    if not Path(checkpoint).is_file():
        raise ValueError(f"checkpoint not found: {checkpoint}")
    return load_model(checkpoint, map_location=resolve_device(device))


def check_benchmark_images(dataset: RevisitedDataset) -> None:
    """ValueError naming the first missing image (and the download command) if any is missing."""
    missing = dataset.missing_images()
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) missing, e.g. {missing[0]} "
            f"(run `apretrieval download {dataset.name} --root {dataset.root}`)"
        )


def _model_meta(model: nn.Module, checkpoint: str | os.PathLike[str] | None) -> dict[str, Any]:
    # Recorded in the descriptor manifests: what made the descriptors, for `index` / `search`.
    return {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "gem_p": float(getattr(model, "gem_p", 3.0)),
    }


def extract_benchmark_files(
    model: nn.Module,
    dataset: RevisitedDataset,
    prefix: str | os.PathLike[str],
    settings: ExtractionSettings,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """Query and database descriptors of ``dataset`` to the descriptor files
    ``PREFIX.queries.npy`` / ``PREFIX.db.npy`` (with their ``.json`` manifests); resumable,
    and reused as they are when complete with the same inputs. Returns the two ``.npy`` paths.
    """
    check_benchmark_images(dataset)
    if settings.skip_bad:
        raise ValueError("skip_bad does not apply to a benchmark: its gnd needs every image")
    device = resolve_device(settings.device)
    meta = _model_meta(model, checkpoint)
    common = {
        **settings._kwargs(device),
        "shard_size": settings.shard_size,
        "checkpoint": checkpoint,
    }
    q = extract_to_file(
        model,
        ImageFiles(dataset.query_paths(), dataset.query_boxes(), settings.max_side),
        dataset.query_names,
        Path(f"{prefix}.queries"),
        desc="queries",
        meta={**meta, "dataset": dataset.name, "part": "queries"},
        **common,
    )
    r1m = None if dataset.r1m_root is None else str(dataset.r1m_root)
    d = extract_to_file(
        model,
        ImageFiles(dataset.db_paths(), None, settings.max_side),
        [dataset.relative(p) for p in dataset.db_paths()],
        Path(f"{prefix}.db"),
        desc="database",
        meta={**meta, "dataset": dataset.name, "part": "database", "r1m": r1m},
        **common,
    )
    return q, d


def extract_benchmark(
    model: nn.Module,
    dataset: RevisitedDataset,
    settings: ExtractionSettings,
    cache_prefix: str | os.PathLike[str] | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors of ``dataset``'s queries (cropped to their boxes) ``(Q, D)`` and database
    ``(N, D)``, float32, L2-normalised, in the ground truth's order.

    With ``cache_prefix`` they go through the descriptor files of
    :func:`extract_benchmark_files` (kept, resumed, reused); the database then comes back
    memory-mapped, so R1M need not fit in memory. ``checkpoint`` is recorded with them.
    """
    if settings.skip_bad:
        raise ValueError("skip_bad does not apply to a benchmark: its gnd needs every image")
    if cache_prefix is not None:
        q_path, d_path = extract_benchmark_files(
            model, dataset, cache_prefix, settings, checkpoint=checkpoint
        )
        # the queries in memory, the database memory-mapped
        return np.array(load_features(q_path).descriptors), load_features(d_path).descriptors
    check_benchmark_images(dataset)
    kw = settings._kwargs(resolve_device(settings.device))
    queries = ImageFiles(dataset.query_paths(), dataset.query_boxes(), settings.max_side)
    q = extract_descriptors(model, queries, desc="queries", **kw)
    database = ImageFiles(dataset.db_paths(), None, settings.max_side)
    d = extract_descriptors(model, database, desc="database", **kw)
    return q, d


def extract_folder(
    model: nn.Module,
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    settings: ExtractionSettings,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
) -> Path:
    """Descriptors of every image under ``folder`` (recursive) to the descriptor file ``OUT``;
    ids are the paths relative to ``folder``. Resumable like the benchmark files."""
    folder = Path(folder)
    paths = list_images(folder)
    ids = image_ids(paths, folder)
    return extract_to_file(
        model,
        ImageFiles(paths, None, settings.max_side),
        ids,
        out,
        desc="images",
        meta={**_model_meta(model, checkpoint), "images": str(folder.resolve())},
        shard_size=settings.shard_size,
        checkpoint=checkpoint,
        skip_bad=settings.skip_bad,
        **settings._kwargs(resolve_device(settings.device)),
    )


def extract_images(
    model: nn.Module,
    paths: Sequence[str | os.PathLike[str]],
    ids: Sequence[str],
    settings: ExtractionSettings,
    *,
    out: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    desc: str = "images",
    meta: dict[str, Any] | None = None,
) -> np.ndarray:
    """Descriptors ``(N, D)`` of the image files ``paths`` (whole images), in their order.

    With ``out`` they go through the descriptor file ``OUT.npy`` + ``OUT.json`` (``ids``
    recorded; resumable, reused when complete) and come back memory-mapped, so a large set
    (GLDv2's 762k index images) need not fit in memory; without it they are computed in memory.
    """
    if len(paths) != len(ids):
        raise ValueError(f"{len(paths)} image paths but {len(ids)} ids")
    files = ImageFiles([Path(p) for p in paths], None, settings.max_side)
    kw = settings._kwargs(resolve_device(settings.device))
    if out is None:
        return extract_descriptors(model, files, desc=desc, **kw)
    path = extract_to_file(
        model,
        files,
        list(ids),
        out,
        desc=desc,
        meta={**_model_meta(model, checkpoint), **(meta or {})},
        shard_size=settings.shard_size,
        checkpoint=checkpoint,
        **kw,
    )
    return load_features(path).descriptors


def extract_query_images(
    images: Sequence[str | os.PathLike[str]],
    checkpoint: str | os.PathLike[str] | None,
    *,
    scales: Sequence[float] | None = None,
    max_side: int | None = DEFAULT_MAX_SIDE,
    device: str | torch.device | None = None,
    boxes: Sequence[Sequence[float] | None] | None = None,
    batch_size: int = 8,
    num_workers: int = 2,
    progress: bool = False,
) -> np.ndarray:
    """Descriptors ``(Q, D)`` of query image files with the model of ``checkpoint``, for
    searching an index: pass the index's recorded scales and ``max_side`` so the queries are
    extracted as its database was. ``device`` None: the CPU.

    The route of ``apretrieval extract``: batches of images of similar sizes, decoded by
    ``num_workers`` processes (none for a single batch: starting them would cost more).
    """
    if checkpoint is None:
        raise ValueError("no checkpoint to extract the queries with: pass one")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise ValueError(f"query image not found: {missing[0]}")
    dev = resolve_device(device if device is not None else "cpu")
    model = load_checkpoint_model(checkpoint, dev)
    files = ImageFiles([Path(p) for p in images], boxes, max_side)
    return extract_descriptors(
        model,
        files,
        scales=tuple(scales) if scales else DEFAULT_SCALES,
        batch_size=batch_size,
        num_workers=num_workers if len(files) > batch_size else 0,
        device=dev,
        max_side=max_side,
        progress=progress,
        desc="queries",
    )


# --------------------------------------------------------------------------------------------
# Evaluation: a checkpoint on a benchmark -> typed results


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str] | nn.Module,
    dataset: RevisitedDataset,
    settings: ExtractionSettings | None = None,
    *,
    post: PostProcessing | None = None,
    apq: APQSettings | None = None,
    kappas: Sequence[int] = (1, 5, 10),
    topk: int = 100,
    cache_prefix: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    model_name: str | None = None,
    block_size: int | None = None,
) -> RetrievalResults:
    """Evaluate a checkpoint (or a model in memory) on a revisited benchmark.

    Extracts the query and database descriptors (:func:`extract_benchmark`, through the
    descriptor files at ``cache_prefix`` when given), post-processes them (``post``), ranks
    the database for a block of ``block_size`` queries at a time (default: what fits in 256 MiB
    of scores; see :mod:`apretrieval.scoring`) and returns the metrics, the ``topk`` results and
    AP / AP_Q (``apq``) of every query. With ``out`` the results file is written there; its
    folder is checked before any work starts. Inputs are checked in the order that fails
    fastest: output location, whitening, images, then the model.
    """
    settings = settings or ExtractionSettings()
    post, whitening = start_evaluation(post, out)
    check_benchmark_images(dataset)
    model = model_to_evaluate(checkpoint, settings, model_name)
    q, db = extract_benchmark(
        model.module, dataset, settings, cache_prefix, checkpoint=model.checkpoint
    )
    results = benchmark_results(
        q,
        db,
        dataset,
        model=model.name,
        made_by=model.made_by,
        post=post,
        whitening=whitening,
        apq=apq,
        kappas=kappas,
        topk=topk,
        block_size=block_size,
    )
    return saved(results, out)


@dataclass(frozen=True)
class ModelToEvaluate:
    """A model on its device, the checkpoint it came from (None: given in memory), its name
    in the results and how its descriptors are made (scales, max side, GeM p)."""

    module: nn.Module
    checkpoint: str | os.PathLike[str] | None
    name: str
    made_by: EvaluationSettings


def model_to_evaluate(
    checkpoint: str | os.PathLike[str] | nn.Module,
    settings: ExtractionSettings,
    model_name: str | None = None,
) -> ModelToEvaluate:
    """The model of ``checkpoint`` (loaded on ``settings.device``) or the model given, named
    ``model_name``, else by its checkpoint, else by its class."""
    if isinstance(checkpoint, nn.Module):
        model, path = checkpoint, None
    else:
        model, path = load_checkpoint_model(checkpoint, settings.device), checkpoint
    made_by = EvaluationSettings(
        scales=settings.scales,
        max_side=settings.max_side,
        gem_p=_model_meta(model, path)["gem_p"],
    )
    name = model_name or (str(path) if path is not None else type(model).__name__)
    return ModelToEvaluate(model, path, name, made_by)


def extract_index_queries(
    index: SearchIndex,
    images: Sequence[str | os.PathLike[str]],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    boxes: Sequence[Sequence[float] | None] | None = None,
    batch_size: int = 8,
    num_workers: int = 2,
    progress: bool = False,
) -> np.ndarray:
    """Descriptors ``(Q, D)`` of query images for ``index``, extracted as its database was:
    with its recorded checkpoint (or ``checkpoint``), scales and maximum image side, through
    the batched route of :func:`extract_query_images`."""
    ckpt = checkpoint if checkpoint is not None else index.checkpoint
    if ckpt is None:
        raise ValueError("the index records no checkpoint: pass one to extract queries")
    return extract_query_images(
        images,
        ckpt,
        scales=index.scales,
        max_side=index.extra.get("max_side", DEFAULT_MAX_SIDE),
        device=device,
        boxes=boxes,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )
