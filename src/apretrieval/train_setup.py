"""What a training recipe builds before the first step: the loss, the learning-rate schedule,
and the run's state (model, optimiser, schedule, sampler position, memory bank, validator, loss
scale), fresh or resumed from ``checkpoint.pt``; and the state written back to it.

:mod:`apretrieval.training` runs the loop over this state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from apretrieval.checkpoints import load_weights
from apretrieval.data.lists import ImageList
from apretrieval.data.sampler import ClassBalancedBatchSampler
from apretrieval.data.transforms import resize_max_side
from apretrieval.distributed import DistContext, broadcast_model
from apretrieval.losses.ap import APLoss, TieAwareAPLoss
from apretrieval.losses.baselines import ContrastiveLoss, TripletLoss
from apretrieval.losses.memory_bank import MemoryBank
from apretrieval.losses.recall_at_k import RecallAtKLoss
from apretrieval.losses.smooth_ap import SmoothAPLoss
from apretrieval.losses.supap import RoadmapLoss, SupAPLoss
from apretrieval.models import RetrievalNet, build_model, eval_mode, load_checkpoint
from apretrieval.precision import LossScale, fast_net
from apretrieval.run_folder import truncate_log, warn_config_changes
from apretrieval.train_config import TrainConfig
from apretrieval.validation import Validator, make_validator

__all__ = [
    "RunState",
    "init_whitening_from_data",
    "initial_model",
    "lr_factor",
    "make_loss",
    "start_run",
]


def make_loss(cfg: TrainConfig) -> torch.nn.Module:
    """The loss named by ``cfg.loss`` (one of ``train_config.LOSSES``) with its settings."""
    # Score rows per block: about 256K scores, so the loss's temporaries stay ~10 MB for any B.
    rows = max(1, 2**18 // cfg.batch_size)
    if cfg.loss == "ap":
        return APLoss(num_bins=cfg.num_bins, chunk_size=rows)
    if cfg.loss == "tie_aware_ap":
        return TieAwareAPLoss(num_bins=cfg.num_bins, chunk_size=rows)
    if cfg.loss == "sharp_ap":
        return APLoss(num_bins=cfg.num_bins, chunk_size=rows, estimator="sharp")
    sup: dict[str, Any] = {"rho": cfg.sup_rho, "delta": cfg.sup_delta, "start": cfg.sup_start}
    sup |= {"offset": cfg.sup_offset, "chunk_size": rows}
    if cfg.loss == "smooth_ap":
        return SmoothAPLoss(tau=cfg.tau, chunk_size=rows)
    if cfg.loss == "sup_ap":
        return SupAPLoss(tau=cfg.tau, **sup)
    if cfg.loss == "roadmap":
        pos_margin, neg_margin = cfg.calibration_margins
        return RoadmapLoss(
            tau=cfg.tau,
            **sup,
            calibration_weight=cfg.calibration_weight,
            pos_margin=pos_margin,
            neg_margin=neg_margin,
        )
    if cfg.loss == "recall_at_k":
        return RecallAtKLoss(k=cfg.recall_k, tau=cfg.tau, tau_k=cfg.recall_tau, chunk_size=rows)
    if cfg.loss == "contrastive":
        return ContrastiveLoss(margin=cfg.margin or 0.7, num_hard=cfg.num_hard)
    if cfg.loss == "triplet":
        return TripletLoss(margin=cfg.margin or 0.1)
    raise ValueError(f"unknown loss {cfg.loss!r}")


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at step t: linear warm-up, then constant/cosine/exponential."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = step - cfg.warmup_steps
        if cfg.schedule == "cosine":
            span = max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))
        if cfg.schedule == "exponential":
            return cfg.lr_decay**t
        return 1.0

    return factor


def init_whitening_from_data(
    model: RetrievalNet, images: ImageList, cfg: TrainConfig, device: torch.device
) -> None:
    """PCA-whitening initialisation of the FC from ``cfg.pca_images`` random training images."""
    rng = np.random.default_rng([cfg.seed, 7])
    n = min(cfg.pca_images, len(images))
    chosen = np.sort(rng.choice(len(images), size=n, replace=False))
    pooled = []
    with eval_mode(model), torch.no_grad():
        for i in tqdm(chosen, desc="PCA whitening init", disable=not cfg.progress, leave=False):
            x = images.load(int(i), lambda img: resize_max_side(img, cfg.max_side))
            if x is not None:
                pooled.append(model.pooled(x[None].to(device)).cpu())
    if len(pooled) < 2:
        raise ValueError(f"PCA whitening needs at least 2 readable images, got {len(pooled)}")
    model.init_whitening(torch.cat(pooled).to(torch.float64))


@dataclass
class RunState:
    """Everything a step changes and a checkpoint keeps. ``net``: ``model`` as the forward
    passes run it (see ``precision``); ``start``: the step the run starts after."""

    model: RetrievalNet
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: ClassBalancedBatchSampler
    loss_scale: LossScale | None
    memory: MemoryBank | None
    validator: Validator | None
    start: int

    def checkpoint_extras(self, cfg: TrainConfig) -> dict[str, Any]:
        """What ``checkpoint.pt`` holds beside the weights, for an exact resume (the sampler's
        ``step`` set to the step being saved)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "train_config": cfg.to_dict(),
            **({"memory": self.memory.state_dict()} if self.memory is not None else {}),
            **({"validation": self.validator.state_dict()} if self.validator is not None else {}),
            **({"loss_scale": self.loss_scale.state_dict()} if self.loss_scale is not None else {}),
        }


def initial_model(
    cfg: TrainConfig, device: torch.device | str = "cpu", *, pretrained: bool = True
) -> RetrievalNet:
    """The network a run of ``cfg`` starts from (initialised from ``cfg.seed``), on ``device``;
    ``pretrained=False``: without its pretrained weights (a resumed run loads its own)."""
    with torch.random.fork_rng(devices=[]):  # deterministic init, global RNG left untouched
        torch.manual_seed(cfg.seed)
        return build_model(
            cfg.backbone,
            pretrained=cfg.pretrained if pretrained else None,
            weights=cfg.weights if pretrained else None,
            out_dim=cfg.out_dim,
            gem_p=cfg.gem_p,
            whiten=cfg.whiten,
        ).to(device)


def start_run(
    cfg: TrainConfig,
    ctx: DistContext,
    images: ImageList,
    sampler: ClassBalancedBatchSampler,
    ckpt_path: Path,
    log_path: Path,
    resume: bool,
) -> RunState:
    """The run's state: resumed from ``ckpt_path`` (``resume`` and the file exists; the log is
    cut back to its step) or fresh (the log removed; PCA whitening when the recipe asks)."""
    state = load_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None
    model = initial_model(cfg, ctx.device, pretrained=state is None)
    net = fast_net(model, cfg.amp, cfg.channels_last, cfg.compile)
    loss_scale = LossScale() if cfg.amp == "fp16" else None
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    run = RunState(model, net, optimizer, scheduler, sampler, loss_scale, None, None, start=0)
    if state is not None:
        load_weights(model, state["state_dict"], f"{ckpt_path} (--resume)")
        optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        if run.loss_scale is not None and "loss_scale" in state:
            run.loss_scale.load_state_dict(state["loss_scale"])
        run.start = int(state["step"])
        warn_config_changes(state.get("train_config", {}), cfg)
        if ctx.is_main:
            truncate_log(log_path, run.start)
    else:
        if ctx.is_main:
            log_path.unlink(missing_ok=True)
        if cfg.whiten and cfg.whiten_init == "pca":
            init_whitening_from_data(model, images, cfg, ctx.device)
    broadcast_model(ctx, model)  # one starting point for all ranks, whatever happened above
    run.memory = MemoryBank(cfg.memory_batches) if cfg.memory_batches else None
    run.validator = make_validator(cfg, ctx.device)
    if run.validator is not None and state is not None:
        run.validator.load_state_dict(state.get("validation", {}))
    if run.memory is not None and state is not None and "memory" in state:
        run.memory.load_state_dict(state["memory"], ctx.device)
    return run
