"""apretrieval: image retrieval trained with a listwise Average-Precision loss."""

from apretrieval.evaluation import evaluate_revisited, load_results, write_results
from apretrieval.losses import (
    APLoss,
    ContrastiveLoss,
    TieAwareAPLoss,
    TripletLoss,
    average_precision,
    quantized_ap,
)
from apretrieval.search import IndexConfig, SearchIndex, build_index, knn, load_index

__version__ = "0.1.0"

__all__ = [
    "APLoss",
    "ContrastiveLoss",
    "IndexConfig",
    "SearchIndex",
    "TieAwareAPLoss",
    "TripletLoss",
    "__version__",
    "average_precision",
    "build_index",
    "evaluate_revisited",
    "knn",
    "load_index",
    "load_results",
    "quantized_ap",
    "write_results",
]
