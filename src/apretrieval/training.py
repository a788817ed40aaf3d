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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor
from tqdm.auto import tqdm

from apretrieval.atomic import remove_stale_temporaries
from apretrieval.batches import fits_in_memory, step_batches
from apretrieval.data.lists import ImageList, open_image_list
from apretrieval.data.sampler import ClassBalancedBatchSampler, has_positive
from apretrieval.distributed import (
    DistContext,
    barrier,
    distributed_multistage_backward,
    init_distributed,
    shard_bounds,
    sync_stop,
)
from apretrieval.jsonl import append_jsonl
from apretrieval.losses.batch_ap import batch_ap_metrics
from apretrieval.losses.memory_bank import MemoryBank
from apretrieval.models import RetrievalNet
from apretrieval.multistage import NonFiniteDescriptors, StepResult
from apretrieval.precision import LossScale
from apretrieval.recipe_values import write_yaml_atomic
from apretrieval.run_folder import (
    RUN_FILES,
    SignalStop,
    TrainingDiverged,
    TrainingInterrupted,
    finite_parameters,
    own_run_folder,
    save_finite,
    top_level_files,
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
from apretrieval.train_config import TrainConfig
from apretrieval.train_setup import RunState, make_loss, start_run

__all__ = ["train", "train_step"]

log = logging.getLogger("apretrieval.training")
Callback = Callable[[int, RetrievalNet], "dict[str, Any] | None"]


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
    # Under torchrun: join the process group; every rank takes its shard of each batch.
    ctx = init_distributed(cfg.dist_backend, cfg.dist_timeout, cfg.device)
    loop = _Loop(cfg, ctx, run_dir, plan, callback, callback_every)
    if ctx.is_main:  # temporary files of writes killed mid-way (SIGKILL) in an earlier run
        for name in (*RUN_FILES, "config.yaml"):
            remove_stale_temporaries(run_dir / name)
    images, sampler = _open_data(cfg)
    loop.run = start_run(cfg, ctx, images, sampler, loop.ckpt_path, loop.log_path, resume)
    if ctx.is_main:
        write_yaml_atomic(run_dir / "config.yaml", cfg.to_dict())
    in_memory = fits_in_memory(cfg)
    _announce(cfg, ctx, loop.run, images, plan, in_memory)
    shard = slice(*shard_bounds(cfg.batch_size, ctx.rank, ctx.world_size))
    with SignalStop(second_sigint_stops=ctx.world_size == 1) as stop:
        batches = step_batches(cfg, images, sampler, loop.run.start, in_memory, shard)
        done = loop.steps(batches, stop, in_memory)
        if stop.signum is not None:
            raise TrainingInterrupted(loop.checkpoint(done), stop.signum)
        # Still under SignalStop: a signal from here on gets the run's last files written
        # (what a stop would write anyway) and the run ends as finished.
        loop.finish(done)
    return loop.final_path


def _open_data(cfg: TrainConfig) -> tuple[ImageList, ClassBalancedBatchSampler]:
    """The training images and the sampler drawing each step's batch from them."""
    images = open_image_list(
        cfg.data, cfg.data_format, cfg.image_root, cfg.check_images, cfg.exclude_landmarks
    )
    sampler = ClassBalancedBatchSampler(
        images.labels, cfg.batch_size, cfg.images_per_class, cfg.seed, steps=cfg.steps
    )
    return images, sampler


def _announce(
    cfg: TrainConfig,
    ctx: DistContext,
    run: RunState,
    images: ImageList,
    plan: ThreadPlan,
    in_memory: bool,
) -> None:
    """The start summary (with progress on) and the warnings about the settings, rank 0 only."""
    if not ctx.is_main:
        return
    facts = RunFacts(
        images=len(images),
        classes=images.num_classes,
        drawable_classes=run.sampler.num_classes,
        dropped_files=images.dropped,
        excluded_classes=images.excluded_classes,
        top_level_files=top_level_files(cfg.data),
        device=str(ctx.device),
        threads=plan.describe(),
        world_size=ctx.world_size,
        weights=weights_source(cfg, run.start),
        start_step=run.start,
        streamed=not in_memory,
        out_dim=run.model.out_dim,
        validation="" if run.validator is None else run.validator.protocol,
    )
    if cfg.progress:
        for line in start_summary(cfg, facts):
            print(f"apretrieval train: {line}", file=sys.stderr, flush=True)
    for warning in setting_warnings(cfg, facts):
        log.warning(warning)


class _Loop:
    """The steps of one run and what they write: each phase of the loop is a method."""

    run: RunState

    def __init__(
        self,
        cfg: TrainConfig,
        ctx: DistContext,
        run_dir: Path,
        plan: ThreadPlan,
        callback: Callback | None,
        callback_every: int,
    ) -> None:
        self.cfg, self.ctx, self.run_dir, self.plan = cfg, ctx, run_dir, plan
        self.callback, self.callback_every = callback, callback_every
        self.ckpt_path = run_dir / "checkpoint.pt"
        self.final_path = run_dir / "model.pt"
        self.log_path = run_dir / "metrics.jsonl"
        self.loss_fn = make_loss(cfg)
        # On a terminal a progress bar; in a log file (cluster jobs) a plain line every few steps.
        self.on_terminal = is_terminal()
        shown = cfg.progress and ctx.is_main
        self.step_log = StepLog(cfg.steps, enabled=shown and not self.on_terminal)

    def checkpoint(self, step: int) -> Path:
        """``checkpoint.pt`` after ``step`` (rank 0 writes; the state is the same everywhere)."""
        self.run.sampler.step = step
        if not self.ctx.is_main:
            return self.ckpt_path
        extras = self.run.checkpoint_extras(self.cfg)
        return save_finite(self.ckpt_path, self.run.model, step=step, **extras)

    def validate(self, step: int) -> dict[str, float]:
        """Validation metrics of the model now; a new best Medium mAP is saved as best.pt."""
        assert self.run.validator is not None  # called only when validation is on
        metrics, improved = self.run.validator(self.run.model)
        if improved and self.ctx.is_main:
            best = self.run_dir / "best.pt"
            save_finite(best, self.run.model, step=step, train_config=self.cfg.to_dict())
        return metrics

    def steps(
        self, batches: Iterator[tuple[Any, Tensor]], stop: SignalStop, in_memory: bool
    ) -> int:
        """Train until ``cfg.steps`` or a stop signal; returns the number of steps done."""
        cfg, ctx, run = self.cfg, self.ctx, self.run
        done = run.start
        disable = not cfg.progress or not ctx.is_main or not self.on_terminal
        bar = tqdm(total=cfg.steps, initial=done, desc="train", unit="step", disable=disable)
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
            try:
                step = train_step(
                    run.model,
                    run.optimizer,
                    inputs,
                    labels,
                    self.loss_fn,
                    cfg.chunk_size,
                    num_workers=0 if in_memory else cfg.num_workers,
                    ctx=ctx,
                    memory=run.memory,
                    net=run.net,
                    loss_scale=run.loss_scale,
                )
            except NonFiniteDescriptors as err:  # finite weights, but the network overflows
                self._diverged(done + 1, str(err))
            self._check_finite(step.loss, done + 1)
            lr = run.optimizer.param_groups[0]["lr"]  # the lr this step used (before the schedule)
            run.scheduler.step()
            done += 1
            record = self._record(step, done, lr, time.perf_counter() - tic)
            shown = {"loss": f"{step.loss:.4f}", "img_s": f"{record['images_per_s']:.1f}"}
            if run.validator is not None and run.validator.best > -math.inf:
                shown["val_best"] = f"{run.validator.best:.3f}"  # best Medium mAP so far
            bar.set_postfix(shown)
            bar.update(1)
            if ctx.is_main:
                append_jsonl(self.log_path, record)
                self.step_log(record)
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                self.checkpoint(done)
                self.plan = recheck(self.plan)  # the machine's load may have changed
            stop.signum = sync_stop(ctx, stop.signum)  # all ranks stop after the same step
            # The next step's time starts here: validation, callback, log and checkpoint are
            # not training (images_per_s measures loading and the multistage step).
            tic = time.perf_counter()
        bar.close()
        return done

    def _check_finite(self, loss: float, step: int) -> None:
        if not math.isfinite(loss) or not finite_parameters(self.run.model):
            self._diverged(
                step, f"the loss is {loss}" if not math.isfinite(loss) else "weights are NaN/inf"
            )

    def _diverged(self, step: int, what: str) -> NoReturn:
        if self.ckpt_path.exists():
            then = f"the last checkpoint ({self.ckpt_path}) is kept: resume from it"
        else:
            then = "no checkpoint was written yet: start again"
        raise TrainingDiverged(
            f"training diverged at step {step}: {what}; {then} with a lower --lr"
        )

    def _record(self, step: StepResult, done: int, lr: float, seconds: float) -> dict[str, Any]:
        """The metrics line of step ``done``: loss, speed, batch AP, and the validation and
        callback values due at this step."""
        cfg, run = self.cfg, self.run
        record: dict[str, Any] = {
            "step": done,
            "loss": step.loss,
            "lr": lr,
            "images": step.images,
            "skipped": cfg.batch_size - step.images,
            "images_per_s": step.images / seconds,
            "gem_p": run.model.gem_p,
            **({"loss_scale": run.loss_scale.scale} if run.loss_scale is not None else {}),
            # exact AP of the batch and the loss's AP_Q of it (same rankings)
            **batch_ap_metrics(step.descriptors, step.labels, self.loss_fn),
        }
        if run.validator is not None and cfg.val_every and done % cfg.val_every == 0:
            if done < cfg.steps:  # the last step is validated after the loop
                record["val"] = self.validate(done)
                record["val_protocol"] = run.validator.protocol
        every = self.callback_every
        if self.callback is not None and every > 0 and done % every == 0 and done < cfg.steps:
            record.update(_run_callback(self.callback, done, run.model))
        return record

    def finish(self, done: int) -> None:
        """After the last step: final validation, checkpoint, callback, then ``model.pt``."""
        ctx, run = self.ctx, self.run
        if run.validator is not None:
            val = self.validate(done)
            if ctx.is_main:
                protocol = run.validator.protocol
                append_jsonl(self.log_path, {"step": done, "val": val, "val_protocol": protocol})
                self.step_log({"step": done, "val": val})
        self.checkpoint(done)
        if self.callback is not None:
            extra = _run_callback(self.callback, done, run.model)
            if extra and ctx.is_main:
                append_jsonl(self.log_path, {"step": done, **extra})
        if ctx.is_main:
            save_finite(self.final_path, run.model, step=done, train_config=self.cfg.to_dict())
        barrier(ctx)  # the other ranks return once the model file exists


def _run_callback(callback: Callback, step: int, model: RetrievalNet) -> dict[str, Any]:
    model.eval()
    try:
        return dict(callback(step, model) or {})
    finally:
        model.train()
