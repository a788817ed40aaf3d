"""Offline CPU demo: a landmark benchmark rendered from bundled real photographs, and a
pipeline comparing an ImageNet-pretrained network with its AP-loss and contrastive
fine-tunings (``apretrieval demo``)."""

from apretrieval.demo.dataset import Benchmark, BenchmarkConfig, prepare_benchmark
from apretrieval.demo.run import DemoConfig, DemoTraining, format_table, run_demo

__all__ = [
    "Benchmark",
    "BenchmarkConfig",
    "DemoConfig",
    "DemoTraining",
    "format_table",
    "prepare_benchmark",
    "run_demo",
]
