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

__version__ = "0.1.0"

__all__ = [
    "APLoss",
    "ContrastiveLoss",
    "TieAwareAPLoss",
    "TripletLoss",
    "__version__",
    "average_precision",
    "evaluate_revisited",
    "load_results",
    "quantized_ap",
    "write_results",
]
