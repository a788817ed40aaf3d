"""apretrieval: image retrieval trained with a listwise Average-Precision loss."""

from apretrieval.distributed import MemoryBank, distributed_multistage_backward, init_distributed
from apretrieval.evaluation import evaluate_revisited, load_results, write_results
from apretrieval.losses import (
    APLoss,
    ContrastiveLoss,
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

__version__ = "0.1.0"

__all__ = [
    "APLoss",
    "ContrastiveLoss",
    "GeM",
    "IndexConfig",
    "MemoryBank",
    "RetrievalNet",
    "SearchIndex",
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
