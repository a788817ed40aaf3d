"""CPU thread budget: how many intra-op threads the main process uses, and one per worker.

On a small machine, torch's default (one intra-op thread per core) plus DataLoader worker
processes (each also one thread per core) oversubscribes the cores: on 2 shared cores,
extraction ran 7x slower with the defaults than with one thread. The rule here:

- an explicit ``--threads N`` wins;
- else ``OMP_NUM_THREADS`` when the user set it (the standard knob, respected as such);
- else the cores this process may run on, minus the loader workers (they decode images on
  their own cores), and at least 1.

Loader workers run one intra-op thread each (:func:`pin_worker`): their work is decoding and
resizing, which does not parallelise inside one image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ThreadPlan:
    """The chosen intra-op thread count and why (printed at start)."""

    threads: int
    source: str  # "--threads", "OMP_NUM_THREADS" or "cores"
    cores: int
    workers: int

    def describe(self) -> str:
        """One line for the start summary, e.g. ``threads: 1 (2 cores - 1 loader worker)``."""
        if self.source == "cores":
            why = f"{self.cores} cores - {self.workers} loader worker(s)"
        else:
            why = f"from {self.source}"
        return f"threads: {self.threads} ({why})"


def available_cores() -> int:
    """Cores this process may run on (affinity mask, e.g. under taskset or a cgroup cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _env_threads(env: dict[str, str] | os._Environ[str]) -> int | None:
    value = env.get("OMP_NUM_THREADS", "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {value!r}")
    return n


def plan_threads(
    requested: int | None = None,
    workers: int = 0,
    cores: int | None = None,
    env: dict[str, str] | os._Environ[str] | None = None,
) -> ThreadPlan:
    """Choose the intra-op thread count (see the module docstring for the rule).

    ``requested``: ``--threads`` (None: not given); ``workers``: DataLoader worker processes.
    """
    cores = available_cores() if cores is None else cores
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if requested is not None:
        if isinstance(requested, bool) or int(requested) != requested or requested < 1:
            raise ValueError(f"--threads must be a positive integer, got {requested!r}")
        return ThreadPlan(int(requested), "--threads", cores, workers)
    from_env = _env_threads(os.environ if env is None else env)
    if from_env is not None:
        return ThreadPlan(from_env, "OMP_NUM_THREADS", cores, workers)
    return ThreadPlan(max(1, cores - workers), "cores", cores, workers)


def apply_threads(plan: ThreadPlan) -> None:
    """Set torch's intra-op thread count for this process."""
    torch.set_num_threads(plan.threads)


def pin_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one intra-op thread per loader worker process."""
    del worker_id  # same budget for every worker
    torch.set_num_threads(1)
