"""apretrieval: image retrieval trained with a listwise Average-Precision loss.

The public names below are loaded on first use (module-level ``__getattr__``, PEP 562): importing
the package, or running ``apretrieval --help``, does not import torch. Each name lives in one
module of the library; ``_PUBLIC`` is the curated map from name to module.

Example:
    >>> from apretrieval import APLoss
    >>> loss_fn = APLoss(num_bins=20, score_range=(-1.0, 1.0))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it.
_PUBLIC: dict[str, str] = {
    "APLoss": "apretrieval.losses.ap",
    "ContrastiveLoss": "apretrieval.losses.baselines",
    "ListwiseLoss": "apretrieval.losses.ap",
    "RecallAtKLoss": "apretrieval.losses.recall_at_k",
    "RoadmapLoss": "apretrieval.losses.supap",
    "SmoothAPLoss": "apretrieval.losses.smooth_ap",
    "SupAPLoss": "apretrieval.losses.supap",
    "TieAwareAPLoss": "apretrieval.losses.ap",
    "TripletLoss": "apretrieval.losses.baselines",
    "average_precision": "apretrieval.losses.exact",
    "quantized_ap": "apretrieval.losses.histogram",
    "MemoryBank": "apretrieval.losses.memory_bank",
    "distributed_multistage_backward": "apretrieval.distributed",
    "init_distributed": "apretrieval.distributed",
    "evaluate_revisited": "apretrieval.evaluation",
    "load_results": "apretrieval.results",
    "write_results": "apretrieval.scoring",
    "RetrievalNet": "apretrieval.models",
    "build_model": "apretrieval.models",
    "load_model": "apretrieval.models",
    "save_checkpoint": "apretrieval.models",
    "multistage_backward": "apretrieval.multistage",
    "GeM": "apretrieval.pooling",
    "gem": "apretrieval.pooling",
    "write_report": "apretrieval.report.page",
    "IndexConfig": "apretrieval.faiss_index",
    "SearchIndex": "apretrieval.faiss_index",
    "build_index": "apretrieval.faiss_index",
    "knn": "apretrieval.search",
    "load_index": "apretrieval.faiss_index",
    "TrainConfig": "apretrieval.train_config",
    "train": "apretrieval.training",
}

__all__ = [
    "APLoss",
    "ContrastiveLoss",
    "GeM",
    "IndexConfig",
    "ListwiseLoss",
    "MemoryBank",
    "RecallAtKLoss",
    "RetrievalNet",
    "RoadmapLoss",
    "SearchIndex",
    "SmoothAPLoss",
    "SupAPLoss",
    "TieAwareAPLoss",
    "TrainConfig",
    "TripletLoss",
    "__version__",
    "average_precision",
    "build_index",
    "build_model",
    "distributed_multistage_backward",
    "evaluate_revisited",
    "gem",
    "init_distributed",
    "knn",
    "load_index",
    "load_model",
    "load_results",
    "multistage_backward",
    "quantized_ap",
    "save_checkpoint",
    "train",
    "write_report",
    "write_results",
]


def __getattr__(name: str) -> Any:
    """Import the module owning ``name`` on first access and cache the value here."""
    module = _PUBLIC.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    # `apretrieval.models` etc. keep working after a bare `import apretrieval`.
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names only (``dir(apretrieval)``, tab completion), not the helpers above."""
    return sorted(__all__)


if TYPE_CHECKING:  # static type checkers and IDEs see the eager imports
    from apretrieval.distributed import distributed_multistage_backward, init_distributed
    from apretrieval.evaluation import evaluate_revisited
    from apretrieval.faiss_index import IndexConfig, SearchIndex, build_index, load_index
    from apretrieval.losses.ap import APLoss, ListwiseLoss, TieAwareAPLoss
    from apretrieval.losses.baselines import ContrastiveLoss, TripletLoss
    from apretrieval.losses.exact import average_precision
    from apretrieval.losses.histogram import quantized_ap
    from apretrieval.losses.memory_bank import MemoryBank
    from apretrieval.losses.recall_at_k import RecallAtKLoss
    from apretrieval.losses.smooth_ap import SmoothAPLoss
    from apretrieval.losses.supap import RoadmapLoss, SupAPLoss
    from apretrieval.models import RetrievalNet, build_model, load_model, save_checkpoint
    from apretrieval.multistage import multistage_backward
    from apretrieval.pooling import GeM, gem
    from apretrieval.report.page import write_report
    from apretrieval.results import load_results
    from apretrieval.scoring import write_results
    from apretrieval.search import knn
    from apretrieval.train_config import TrainConfig
    from apretrieval.training import train
