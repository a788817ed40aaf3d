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
    "APLoss": "apretrieval.losses",
    "ContrastiveLoss": "apretrieval.losses",
    "ListwiseLoss": "apretrieval.losses",
    "RecallAtKLoss": "apretrieval.losses",
    "RoadmapLoss": "apretrieval.losses",
    "SmoothAPLoss": "apretrieval.losses",
    "SupAPLoss": "apretrieval.losses",
    "TieAwareAPLoss": "apretrieval.losses",
    "TripletLoss": "apretrieval.losses",
    "average_precision": "apretrieval.losses",
    "quantized_ap": "apretrieval.losses",
    "MemoryBank": "apretrieval.distributed",
    "distributed_multistage_backward": "apretrieval.distributed",
    "init_distributed": "apretrieval.distributed",
    "evaluate_revisited": "apretrieval.evaluation",
    "load_results": "apretrieval.evaluation",
    "write_results": "apretrieval.evaluation",
    "RetrievalNet": "apretrieval.models",
    "build_model": "apretrieval.models",
    "load_model": "apretrieval.models",
    "save_checkpoint": "apretrieval.models",
    "multistage_backward": "apretrieval.multistage",
    "GeM": "apretrieval.pooling",
    "gem": "apretrieval.pooling",
    "write_report": "apretrieval.report",
    "IndexConfig": "apretrieval.search",
    "SearchIndex": "apretrieval.search",
    "build_index": "apretrieval.search",
    "knn": "apretrieval.search",
    "load_index": "apretrieval.search",
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
    from apretrieval.distributed import (
        MemoryBank,
        distributed_multistage_backward,
        init_distributed,
    )
    from apretrieval.evaluation import evaluate_revisited, load_results, write_results
    from apretrieval.losses import (
        APLoss,
        ContrastiveLoss,
        ListwiseLoss,
        RecallAtKLoss,
        RoadmapLoss,
        SmoothAPLoss,
        SupAPLoss,
        TieAwareAPLoss,
        TripletLoss,
        average_precision,
        quantized_ap,
    )
    from apretrieval.models import RetrievalNet, build_model, load_model, save_checkpoint
    from apretrieval.multistage import multistage_backward
    from apretrieval.pooling import GeM, gem
    from apretrieval.report import write_report
    from apretrieval.search import IndexConfig, SearchIndex, build_index, knn, load_index
    from apretrieval.train_config import TrainConfig
    from apretrieval.training import train
