"""Validation during training: Medium and Hard mAP on a benchmark in the revisited layout
every ``val_every`` steps and at the end, the best model (by Medium mAP) kept as ``best.pt``.

The benchmark is any folder with ``jpg/`` and ``gnd_NAME.pkl`` (the demo writes one); the
route is the one of ``apretrieval evaluate`` with the model in memory, single scale, at the
training resolution unless ``val_max_side`` says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from apretrieval.data.revisited import RevisitedDataset, locate_benchmark
from apretrieval.models import eval_mode
from apretrieval.pipeline import ExtractionSettings, check_benchmark_images, evaluate_checkpoint
from apretrieval.train_config import TrainConfig

__all__ = ["Validator", "make_validator"]


@dataclass
class Validator:
    """Evaluates a model on ``dataset``; remembers the best Medium mAP seen (``best``)."""

    dataset: RevisitedDataset
    settings: ExtractionSettings
    best: float = -math.inf

    def __call__(self, model: torch.nn.Module) -> tuple[dict[str, float], bool]:
        """({"<name>/medium/mAP": x, "<name>/hard/mAP": y}, whether x is the best so far)."""
        with eval_mode(model):
            res = evaluate_checkpoint(model, self.dataset, self.settings, topk=1)
        name = self.dataset.name
        medium, hard = res.metrics["medium"].mAP, res.metrics["hard"].mAP
        improved = medium > self.best
        if improved:
            self.best = medium
        return {f"{name}/medium/mAP": medium, f"{name}/hard/mAP": hard}, improved

    @property
    def protocol(self) -> str:
        """How the validation scores, in words (logged beside each score, shown in reports).

        Validation is cheaper than ``apretrieval evaluate`` (one scale, training-size images),
        so its mAP is lower than the evaluation of the same model: this says why.
        """
        scales = ", ".join(f"{s:.3g}" for s in self.settings.scales)
        single = len(self.settings.scales) == 1
        return (
            f"{self.dataset.name}, Revisited protocol, {'single scale' if single else 'scales'} "
            f"({scales}), images at most {self.settings.max_side} px"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state.get("best", -math.inf))


def make_validator(cfg: TrainConfig, device: torch.device) -> Validator | None:
    """The validator ``cfg`` asks for (None without ``val_dataset``); its benchmark is read and
    its images checked now, so that a mistyped path fails before the first step."""
    if not cfg.val_dataset:
        return None
    name, root = locate_benchmark(cfg.val_dataset, cfg.val_root)
    dataset = RevisitedDataset(name, root)
    check_benchmark_images(dataset)
    settings = ExtractionSettings(
        scales=(1.0,),
        max_side=cfg.val_max_side or cfg.max_side,
        num_workers=0,
        device=device,
        progress=False,
    )
    return Validator(dataset, settings)
