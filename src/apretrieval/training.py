"""Training loop: class-balanced batches, multistaged backpropagation, Adam, exact resume.

A run directory (``output_dir``) holds ``config.yaml`` (the resolved config), ``metrics.jsonl``
(one JSON line per step), ``checkpoint.pt`` (everything needed to resume: model, optimizer,
scheduler, sampler state, step; rewritten atomically every ``checkpoint_every`` steps, on
SIGINT/SIGTERM and at the end) and ``model.pt`` (the final model, for ``load_model``).

Batch t is fully determined by (seed, t): the sampler draws its indices from generators seeded
by (seed, t) and augmentation by (seed, t, position). Resuming therefore replays exactly the
batches an uninterrupted run would have seen, so both reach the same weights.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from apretrieval.atomic import remove_stale_temporaries
from apretrieval.batches import fits_in_memory, step_batches
from apretrieval.checkpoints import load_weights
from apretrieval.data.lists import ImageList, open_image_list
from apretrieval.data.sampler import ClassBalancedBatchSampler, has_positive
from apretrieval.data.transforms import resize_max_side
from apretrieval.distributed import (
    DistContext,
    barrier,
    broadcast_model,
    distributed_multistage_backward,
    init_distributed,
    shard_bounds,
    sync_stop,
)
from apretrieval.jsonl import append_jsonl
from apretrieval.losses.ap import APLoss, TieAwareAPLoss
from apretrieval.losses.baselines import ContrastiveLoss, TripletLoss
from apretrieval.losses.batch_ap import batch_ap_metrics
from apretrieval.losses.memory_bank import MemoryBank
from apretrieval.losses.recall_at_k import RecallAtKLoss
from apretrieval.losses.smooth_ap import SmoothAPLoss
from apretrieval.losses.supap import RoadmapLoss, SupAPLoss
from apretrieval.models import RetrievalNet, build_model, eval_mode, load_checkpoint
from apretrieval.multistage import StepResult
from apretrieval.precision import LossScale, fast_net
from apretrieval.run_folder import (
    RUN_FILES,
    SignalStop,
    TrainingDiverged,
    TrainingInterrupted,
    finite_parameters,
    own_run_folder,
    save_finite,
    top_level_files,
    truncate_log,
    warn_config_changes,
)
from apretrieval.run_log import (
    RunFacts,
    StepLog,
    is_terminal,
    setting_warnings,
    start_summary,
    weights_source,
)
from apretrieval.threads import ThreadPlan, apply_threads, plan_threads, recheck
from apretrieval.train_config import TrainConfig, write_yaml_atomic
from apretrieval.validation import make_validator

__all__ = [
    "make_loss",
    "train",
    "train_step",
]

log = logging.getLogger("apretrieval.training")
Callback = Callable[[int, RetrievalNet], "dict[str, Any] | None"]


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


def train_step(
    model: RetrievalNet,
    optimizer: torch.optim.Optimizer,
    inputs: Any,
    labels: Tensor,
    loss_fn: torch.nn.Module,
    chunk_size: int,
    num_workers: int = 0,
    *,
    ctx: DistContext | None = None,
    memory: MemoryBank | None = None,
    net: torch.nn.Module | None = None,
    loss_scale: LossScale | None = None,
) -> StepResult:
    """One multistage step + optimizer update; returns the step: loss, number of images used,
    and the batch's stage-1 descriptors and labels.

    With a ``ctx`` of several ranks, ``inputs``/``labels`` are this rank's shard and the step
    is that of the whole batch (see ``distributed``); ``memory``: rank against a memory bank.
    ``net``: ``model`` as the forward passes run it (mixed precision, see ``precision``);
    ``loss_scale``: float16 loss scaling, a step whose gradients overflow is skipped.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    scale = loss_scale.scale if loss_scale is not None else 1.0
    step = distributed_multistage_backward(
        net if net is not None else model,
        inputs,
        labels,
        loss_fn,
        chunk_size,
        ctx=ctx,
        memory=memory,
        num_workers=num_workers,
        grad_scale=scale,
    )
    if loss_scale is not None:
        finite = loss_scale.unscale(model.parameters())
        loss_scale.update(finite)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            log.warning(
                "float16 gradients overflowed: step skipped, loss scale now %g", loss_scale.scale
            )
            return step
    optimizer.step()
    return step


# --------------------------------------------------------------------------------------------
# The loop.


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


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callback | None = None,
    callback_every: int = 0,
) -> Path:
    """Train per ``cfg``; returns the final model checkpoint (``<output_dir>/model.pt``).

    ``resume``: continue from ``<output_dir>/checkpoint.pt`` if it exists; a folder holding an
    earlier run is refused (RunFolderInUse) unless ``resume`` or ``overwrite``, one that another
    live run holds always (OutputLockedError). ``callback(step,
    model)`` runs every ``callback_every`` steps and at the end (model in eval mode); a dict it
    returns is added to that step's metrics line. SIGINT/SIGTERM write a checkpoint after the
    current step and raise TrainingInterrupted. A non-finite loss or weights raise
    TrainingDiverged before anything is written over the last finite checkpoint.
    """
    cfg.validate()
    threads = torch.get_num_threads()
    # cpu_threads, else OMP_NUM_THREADS, else the free cores (re-checked at each checkpoint).
    plan = plan_threads(cfg.cpu_threads, workers=cfg.num_workers)
    apply_threads(plan)
    try:
        with own_run_folder(Path(cfg.output_dir), resume=resume, overwrite=overwrite):
            return _train(cfg, resume, callback, callback_every, plan)
    finally:
        torch.set_num_threads(threads)


def _train(
    cfg: TrainConfig,
    resume: bool,
    callback: Callback | None,
    callback_every: int,
    plan: ThreadPlan,
) -> Path:
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, final_path, log_path = (
        run_dir / "checkpoint.pt",
        run_dir / "model.pt",
        run_dir / "metrics.jsonl",
    )
    # Under torchrun: join the process group; every rank takes its shard of each batch.
    ctx = init_distributed(cfg.dist_backend, cfg.dist_timeout, cfg.device)
    device = ctx.device
    if ctx.is_main:  # temporary files of writes killed mid-way (SIGKILL) in an earlier run
        for name in (*RUN_FILES, "config.yaml"):
            remove_stale_temporaries(run_dir / name)
    shard = slice(*shard_bounds(cfg.batch_size, ctx.rank, ctx.world_size))
    images = open_image_list(
        cfg.data, cfg.data_format, cfg.image_root, cfg.check_images, cfg.exclude_landmarks
    )
    sampler = ClassBalancedBatchSampler(
        images.labels, cfg.batch_size, cfg.images_per_class, cfg.seed, steps=cfg.steps
    )
    state = load_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None
    with torch.random.fork_rng(devices=[]):  # deterministic init, global RNG left untouched
        torch.manual_seed(cfg.seed)
        model = build_model(
            cfg.backbone,
            pretrained=None if state is not None else cfg.pretrained,
            weights=None if state is not None else cfg.weights,
            out_dim=cfg.out_dim,
            gem_p=cfg.gem_p,
            whiten=cfg.whiten,
        ).to(device)
    net = fast_net(model, cfg.amp, cfg.channels_last, cfg.compile)
    loss_scale = LossScale() if cfg.amp == "fp16" else None
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    start = 0
    if state is not None:
        load_weights(model, state["state_dict"], f"{ckpt_path} (--resume)")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        if loss_scale is not None and "loss_scale" in state:
            loss_scale.load_state_dict(state["loss_scale"])
        start = int(state["step"])
        warn_config_changes(state.get("train_config", {}), cfg)
        if ctx.is_main:
            truncate_log(log_path, start)
    else:
        if ctx.is_main:
            log_path.unlink(missing_ok=True)
        if cfg.whiten and cfg.whiten_init == "pca":
            init_whitening_from_data(model, images, cfg, device)
    broadcast_model(ctx, model)  # one starting point for all ranks, whatever happened above
    memory = MemoryBank(cfg.memory_batches) if cfg.memory_batches else None
    validator = make_validator(cfg, device)
    if validator is not None and state is not None:
        validator.load_state_dict(state.get("validation", {}))
    if memory is not None and state is not None and "memory" in state:
        memory.load_state_dict(state["memory"], device)
    if ctx.is_main:
        write_yaml_atomic(run_dir / "config.yaml", cfg.to_dict())
    loss_fn = make_loss(cfg)
    in_memory = fits_in_memory(cfg)
    facts = RunFacts(
        images=len(images),
        classes=images.num_classes,
        drawable_classes=sampler.num_classes,
        dropped_files=images.dropped,
        excluded_classes=images.excluded_classes,
        top_level_files=top_level_files(cfg.data),
        device=str(device),
        threads=plan.describe(),
        world_size=ctx.world_size,
        weights=weights_source(cfg, start),
        start_step=start,
        streamed=not in_memory,
        out_dim=model.out_dim,
        validation="" if validator is None else validator.protocol,
    )
    if ctx.is_main and cfg.progress:
        for line in start_summary(cfg, facts):
            print(f"apretrieval train: {line}", file=sys.stderr, flush=True)
    if ctx.is_main:
        for warning in setting_warnings(cfg, facts):
            log.warning(warning)
    # On a terminal a progress bar; in a log file (cluster jobs) a plain line every few steps.
    on_terminal = is_terminal()
    step_log = StepLog(cfg.steps, enabled=cfg.progress and ctx.is_main and not on_terminal)

    def checkpoint(step: int) -> Path:
        sampler.step = step
        if not ctx.is_main:  # rank 0 writes; the state is the same on every rank
            return ckpt_path
        return save_finite(
            ckpt_path,
            model,
            step=step,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            sampler=sampler.state_dict(),
            train_config=cfg.to_dict(),
            **({"memory": memory.state_dict()} if memory is not None else {}),
            **({"validation": validator.state_dict()} if validator is not None else {}),
            **({"loss_scale": loss_scale.state_dict()} if loss_scale is not None else {}),
        )

    def validate(step: int) -> dict[str, float]:
        """Validation metrics of the model now; a new best Medium mAP is saved as best.pt."""
        assert validator is not None  # called only when validation is on
        metrics, improved = validator(model)
        if improved and ctx.is_main:
            save_finite(run_dir / "best.pt", model, step=step, train_config=cfg.to_dict())
        return metrics

    done = start
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc="train",
        unit="step",
        disable=not cfg.progress or not ctx.is_main or not on_terminal,
    )
    with SignalStop(second_sigint_stops=ctx.world_size == 1) as stop:
        batches = step_batches(cfg, images, sampler, start, in_memory, shard)
        tic = time.perf_counter()
        while done < cfg.steps and stop.signum is None:
            try:
                inputs, labels = next(batches)
            except Exception:
                if stop.signum is not None:  # a data worker died of the same signal
                    break
                raise
            if ctx.world_size == 1 and not has_positive(labels.tolist()):
                log.warning(
                    "step %d: no image of the batch has a positive (%d images, all of "
                    "different classes)",
                    done + 1,
                    len(labels),
                )
            step = train_step(
                model,
                optimizer,
                inputs,
                labels,
                loss_fn,
                cfg.chunk_size,
                num_workers=0 if in_memory else cfg.num_workers,
                ctx=ctx,
                memory=memory,
                net=net,
                loss_scale=loss_scale,
            )
            loss, used = step.loss, step.images
            if not math.isfinite(loss) or not finite_parameters(model):
                what = f"the loss is {loss}" if not math.isfinite(loss) else "weights are NaN/inf"
                raise TrainingDiverged(
                    f"training diverged at step {done + 1}: {what}; the last checkpoint "
                    f"({ckpt_path}) is kept: resume from it with a lower --lr"
                )
            lr = optimizer.param_groups[0]["lr"]  # the lr this step used (before the schedule)
            scheduler.step()
            done += 1
            toc = time.perf_counter()
            record = {
                "step": done,
                "loss": loss,
                "lr": lr,
                "images": used,
                "skipped": cfg.batch_size - used,
                "images_per_s": used / (toc - tic),
                "gem_p": model.gem_p,
                **({"loss_scale": loss_scale.scale} if loss_scale is not None else {}),
                # exact AP of the batch and the loss's AP_Q of it (same rankings)
                **batch_ap_metrics(step.descriptors, step.labels, loss_fn),
            }
            tic = toc
            if validator is not None and cfg.val_every and done % cfg.val_every == 0:
                if done < cfg.steps:  # the last step is validated after the loop
                    record["val"] = validate(done)
                    record["val_protocol"] = validator.protocol
            shown = {"loss": f"{loss:.4f}", "img_s": f"{record['images_per_s']:.1f}"}
            if validator is not None and validator.best > -math.inf:
                shown["val_best"] = f"{validator.best:.3f}"  # best Medium mAP so far
            bar.set_postfix(shown)
            bar.update(1)
            if (
                callback is not None
                and callback_every > 0
                and done % callback_every == 0
                and done < cfg.steps
            ):
                record.update(_run_callback(callback, done, model))
            if ctx.is_main:
                append_jsonl(log_path, record)
                step_log(record)
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                checkpoint(done)
                plan = recheck(plan)  # the machine's load may have changed
            stop.signum = sync_stop(ctx, stop.signum)  # all ranks stop after the same step
        bar.close()
        if stop.signum is not None:
            path = checkpoint(done)
            raise TrainingInterrupted(path, stop.signum)
        # Still under SignalStop: a signal from here on gets the run's last files written
        # (what a stop would write anyway) and the run ends as finished.
        if validator is not None:
            val = validate(done)
            if ctx.is_main:
                append_jsonl(
                    log_path, {"step": done, "val": val, "val_protocol": validator.protocol}
                )
                step_log({"step": done, "val": val})
        checkpoint(done)
        if callback is not None:
            extra = _run_callback(callback, done, model)
            if extra and ctx.is_main:
                append_jsonl(log_path, {"step": done, **extra})
        if ctx.is_main:
            save_finite(final_path, model, step=done, train_config=cfg.to_dict())
        barrier(ctx)  # the other ranks return once the model file exists
    return final_path


def _run_callback(callback: Callback, step: int, model: RetrievalNet) -> dict[str, Any]:
    model.eval()
    try:
        return dict(callback(step, model) or {})
    finally:
        model.train()
