"""CPU thread budget: how many intra-op threads the main process uses, and one per worker.

On a small machine, torch's default (one intra-op thread per core) plus DataLoader worker
processes (each also one thread per core) oversubscribes the cores: on 2 shared cores,
extraction ran 7x slower with the defaults than with one thread. The same happens when other
programs keep cores busy: OpenMP threads that outnumber the free cores spin against each other
(a demo took 29 minutes at load 4-5 on 2 cores, 5 minutes with one thread). The rule here:

- an explicit ``--threads N`` wins;
- else ``OMP_NUM_THREADS`` when the user set it (the standard knob, respected as such);
- else the cores this process may run on (its affinity mask), minus the loader workers (they
  decode images on their own cores), minus the cores other processes keep busy, and at least 1.

"Busy" is read from the kernel's load: the number of runnable tasks right now
(``/proc/loadavg``'s fourth field), less this process's own running threads, as the median of a
few samples. The one-minute load average is the fallback where that count does not exist (not
Linux): it lags a minute behind and counts this process's own recent work, so it is the second
choice. A long run re-checks at each phase (:func:`recheck`): the load of a shared machine
changes within minutes.

Loader workers run one intra-op thread each (:func:`pin_worker`): their work is decoding and
resizing, which does not parallelise inside one image. They also ignore SIGINT and SIGTERM: a
scheduler (SLURM, ``timeout``) or a terminal's Ctrl-C signals every process of the job, and a
worker killed first would make the main process fail before it could write its checkpoint.
The main process owns shutdown; its workers end with it.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "ThreadPlan",
    "apply_threads",
    "available_cores",
    "busy_cores",
    "pin_worker",
    "plan_threads",
    "recheck",
]


@dataclass(frozen=True)
class ThreadPlan:
    """The chosen intra-op thread count and why (printed at start).

    ``busy``: cores other processes kept busy when the plan was made (source ``"cores"`` only).
    """

    threads: int
    source: str  # "--threads", "OMP_NUM_THREADS" or "cores"
    cores: int
    workers: int
    busy: int = 0

    def describe(self) -> str:
        """One line for the start summary, e.g. ``threads: 1 (2 cores - 1 loader worker)``."""
        if self.source == "cores":
            why = f"{self.cores} cores - {self.workers} loader worker(s)"
            if self.busy:
                why += f" - {self.busy} busy with other work"
            if self.threads == 1 and self.cores - self.workers - self.busy < 1:
                why += ", at least 1"
        else:
            why = f"from {self.source}"
        return f"threads: {self.threads} ({why})"


def available_cores() -> int:
    """Cores this process may run on (affinity mask, e.g. under taskset or a cgroup cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _runnable_now() -> int | None:
    """Runnable tasks of the whole machine now (``/proc/loadavg``), None where unknown."""
    try:
        field = Path("/proc/loadavg").read_text().split()[3]  # "running/total"
        return int(field.split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


def _is_running(stat_path: Path) -> bool:
    try:
        stat = stat_path.read_text()
    except OSError:  # the task ended meanwhile
        return False
    # "pid (comm) S ...": the state follows the last ')' (comm may hold spaces and parens).
    end = stat.rfind(")")
    return stat[end + 2 : end + 3] == "R"


def _own_running() -> int:
    """Running threads of this process and of its children (loader workers), at least 1."""
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return 1
    running = sum(_is_running(task / "stat") for task in tasks)
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        running += sum(_is_running(Path("/proc", pid, "stat")) for pid in children)
    return max(1, running)


def _sample_others() -> float | None:
    runnable = _runnable_now()
    if runnable is None:
        return None
    return max(0, runnable - _own_running())


def busy_cores(
    sample: Callable[[], float | None] = _sample_others,
    samples: int = 5,
    interval: float = 0.01,
    loadavg: Callable[[], float] | None = None,
) -> int:
    """Cores kept busy by other processes: the median of ``samples`` counts, rounded.

    ``sample()`` returns the other processes' runnable tasks now (None where the system does not
    say: then ``loadavg()``, the one-minute load average, is used). Both injectable for tests.
    """
    counts = []
    for i in range(samples):
        value = sample()
        if value is None:
            break
        counts.append(value)
        if i + 1 < samples:
            time.sleep(interval)
    if counts:
        return max(0, round(statistics.median(counts)))
    try:
        load = (loadavg or (lambda: os.getloadavg()[0]))()
    except OSError:
        return 0
    return max(0, round(load))


def _env_threads(env: Mapping[str, str]) -> int | None:
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
    env: Mapping[str, str] | None = None,
    busy: int | None = None,
) -> ThreadPlan:
    """Choose the intra-op thread count (see the module docstring for the rule).

    ``requested``: ``--threads`` (None: not given); ``workers``: DataLoader worker processes;
    ``cores``, ``env``, ``busy``: the machine's (affinity cores, ``os.environ``,
    :func:`busy_cores`) unless given.
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
    free = max(1, cores - workers)
    busy = busy_cores() if busy is None else busy
    if busy < 0:
        raise ValueError(f"busy must be >= 0, got {busy}")
    return ThreadPlan(max(1, free - busy), "cores", cores, workers, busy)


def recheck(plan: ThreadPlan, busy: int | None = None) -> ThreadPlan:
    """The plan for the next phase of a run: re-read the load when the plan came from it.

    A plan fixed by ``--threads`` or ``OMP_NUM_THREADS`` is returned as it is. Applies the new
    plan when its thread count differs.
    """
    if plan.source != "cores":
        return plan
    new = plan_threads(None, plan.workers, plan.cores, env={}, busy=busy)
    if new.threads != torch.get_num_threads():
        apply_threads(new)
    return new


def apply_threads(plan: ThreadPlan) -> None:
    """Set torch's intra-op thread count for this process."""
    torch.set_num_threads(plan.threads)


def pin_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one intra-op thread per loader worker process, and
    SIGINT/SIGTERM ignored (the main process decides when to stop; see the module docstring).

    A worker whose main process is gone exits by itself (torch's loader watches its parent).
    """
    del worker_id  # same budget for every worker
    torch.set_num_threads(1)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
