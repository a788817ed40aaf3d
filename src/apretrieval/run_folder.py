"""A training run's folder: whose it is, and its log as a resumed run continues it.

``output_dir`` holds ``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt``, ``model.pt`` (and
``best.pt`` with validation). A new run never writes over an earlier one unless told to:
resuming continues it, overwriting removes it first.
"""

from __future__ import annotations

import json
from pathlib import Path

from apretrieval.atomic import atomic_open
from apretrieval.jsonl import read_jsonl

__all__ = ["RUN_FILES", "RunFolderInUse", "claim_run_folder", "top_level_files", "truncate_log"]


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


def truncate_log(path: Path, last_step: int) -> None:
    """Drop records of steps after ``last_step`` (done after the checkpoint, lost on resume),
    and a last line torn by a crash or a full disk."""
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in keep))


def top_level_files(data: str) -> int:
    """Files directly in an image folder's top (not in a class folder: not used)."""
    root = Path(data)
    if not root.is_dir():
        return 0
    return sum(1 for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
