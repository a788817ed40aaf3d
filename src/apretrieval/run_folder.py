"""A training run's folder and how a run stops without losing it.

``output_dir`` holds ``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt``, ``model.pt`` (and
``best.pt`` with validation). One process writes it at a time: a run holds the folder's lock
(``OUTPUT_DIR.lock``, see :mod:`apretrieval.locking`) from before it looks at the folder until
it ends, so a second run into the same folder is refused with the holder's pid and host. A new
run never writes over an earlier one unless told to: resuming continues it, overwriting
removes it first. SIGINT/SIGTERM end a run after its step
with a checkpoint; weights that turn NaN/inf are never written (the last finite checkpoint
stays), and the run fails with TrainingDiverged.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from apretrieval.checkpoints import NonFiniteWeights
from apretrieval.jsonl import keep_jsonl
from apretrieval.locking import output_lock
from apretrieval.models import RetrievalNet, save_checkpoint
from apretrieval.train_config import TrainConfig

__all__ = [
    "RUN_FILES",
    "RunFolderInUse",
    "SignalStop",
    "TrainingDiverged",
    "TrainingInterrupted",
    "claim_run_folder",
    "finite_parameters",
    "own_run_folder",
    "save_finite",
    "top_level_files",
    "truncate_log",
    "warn_config_changes",
]

log = logging.getLogger("apretrieval.training")


class RunFolderInUse(ValueError):
    """The output folder holds an earlier run, and neither resume nor overwrite was asked."""


# What a run writes; a folder holding any of them belongs to an earlier run.
RUN_FILES = ("checkpoint.pt", "model.pt", "best.pt", "metrics.jsonl")


def claim_run_folder(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over an earlier one unless told how (resume or overwrite).

    ``overwrite`` removes the earlier run's files first, so that a new run that fails early
    never leaves a folder mixing two runs.
    """
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise RunFolderInUse(
            f"{run_dir} holds an earlier run ({', '.join(found)}): pass --resume to continue "
            "it, --overwrite to replace it, or choose another --output-dir"
        )
    for name in found:
        (run_dir / name).unlink(missing_ok=True)


@contextmanager
def own_run_folder(run_dir: Path, *, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold ``run_dir``'s lock and claim it (:func:`claim_run_folder`) for the block.

    Of the ranks of a distributed run only rank 0 writes the folder, hence takes the lock; the
    rank is read from the launcher's environment (the process group does not exist yet).
    """
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    with output_lock(run_dir):
        claim_run_folder(run_dir, resume=resume, overwrite=overwrite)
        yield


def truncate_log(path: Path, last_step: int) -> None:
    """Drop records of steps after ``last_step`` (done after the checkpoint, lost on resume),
    and a last line torn by a crash or a full disk."""
    keep_jsonl(path, lambda record: record.get("step", 0) <= last_step)


def top_level_files(data: str) -> int:
    """Files directly in an image folder's top (not in a class folder: not used)."""
    root = Path(data)
    if not root.is_dir():
        return 0
    return sum(1 for p in root.iterdir() if p.is_file() and not p.name.startswith("."))


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after a checkpoint was written (``.checkpoint``)."""

    def __init__(self, checkpoint: Path, signum: int) -> None:
        super().__init__(f"training stopped by signal {signum}; resume from {checkpoint}")
        self.checkpoint, self.signum = checkpoint, signum


class TrainingDiverged(ValueError):
    """The loss or the weights became NaN/inf; the last finite checkpoint is left as it was."""

    exit_code = 1


class SignalStop:
    """First SIGINT/SIGTERM: finish the step, checkpoint, stop. A second SIGINT: stop now.

    ``second_sigint_stops=False`` (several ranks): a launcher forwards the signal it got to
    every rank, which a job-wide signal has reached already (torchrun after Ctrl-C, srun), so
    one request arrives twice; there the launcher escalates (torchrun: SIGKILL after 30 s).
    """

    def __init__(self, *, second_sigint_stops: bool = True) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._second_stops = second_sigint_stops

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT and self._second_stops:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def finite_parameters(model: torch.nn.Module) -> bool:
    """Every parameter finite (checked after each update: a few ms, against silent NaNs)."""
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def save_finite(path: Path, model: RetrievalNet, *, step: int, **extra: Any) -> Path:
    """save_checkpoint, turning non-finite weights into TrainingDiverged (nothing written)."""
    try:
        return save_checkpoint(path, model, step=step, **extra)
    except NonFiniteWeights as err:
        raise TrainingDiverged(
            f"training diverged by step {step}: {err}; the earlier files are kept as they "
            "were: resume from the last checkpoint with a lower --lr"
        ) from None


def warn_config_changes(old: dict[str, Any], cfg: TrainConfig) -> None:
    """A warning naming the settings a resumed run changed (it is no longer reproducible)."""
    new = cfg.to_dict()
    changed = sorted(k for k in new if k in old and old[k] != new[k] and k != "steps")
    if changed:
        log.warning(
            "resuming with a changed config (%s): the run is no longer reproducible",
            ", ".join(changed),
        )
