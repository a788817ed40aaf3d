"""apretrieval: image retrieval trained with a listwise Average-Precision loss."""

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
    "quantized_ap",
]
