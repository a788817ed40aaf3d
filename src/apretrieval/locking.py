"""One writer per output: a lock file, created exclusively, held while an output is written.

``output_lock(target)`` creates ``TARGET.lock`` with ``O_CREAT | O_EXCL`` (atomic on local file
systems: of two processes exactly one creates it) and writes the holder's pid and host into it;
the file is removed when the block ends, however it ends. A second writer of the same target is
refused with :class:`OutputLockedError`, one line naming the holder.

A holder killed with SIGKILL cannot remove its lock. A lock whose pid no longer runs on this
host is stale: it is renamed away (only one of several contenders wins the rename) and taken
over. Creating the lock is also the first write into the output's folder, so an unwritable
output is reported before any work starts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from apretrieval.atomic import check_writable

__all__ = ["OutputLockedError", "lock_path", "output_lock"]


class OutputLockedError(ValueError):
    """The output is being written by another process (exit status 1 on the command line)."""

    exit_code = 1


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of an output ``target`` (a file prefix or a folder): ``TARGET.lock``."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


def _holder(path: Path) -> tuple[int | None, str]:
    """(pid, host) written in a lock file; pid None when unreadable (being written, or junk)."""
    if path.exists() and not path.is_file():  # a FIFO would block the read: not a lock of ours
        return None, ""
    try:
        pid_text, _, host = path.read_text(encoding="utf-8").partition("\n")
        return int(pid_text), host.strip()
    except (OSError, ValueError):
        return None, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _try_create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n{socket.gethostname()}\n")
    return True


def _take_over_if_stale(path: Path, target: Path) -> None:
    """Remove ``path`` if its holder is dead; else raise OutputLockedError."""
    pid, host = _holder(path)
    here = socket.gethostname()
    if pid is None:
        # Between O_EXCL creation and the pid write of another process, or not a lock we wrote.
        raise OutputLockedError(
            f"{target} is being written by another process (lock {path}); "
            "if none is running, remove the lock file"
        )
    if host != here:  # whether it still runs cannot be told from here
        raise OutputLockedError(
            f"{target} is being written by process {pid} on {host} (lock {path}): wait for it "
            "to finish or choose another output; if it no longer runs there, remove the lock"
        )
    if _alive(pid):
        raise OutputLockedError(
            f"{target} is being written by process {pid} on {host} (lock {path}): wait for it "
            "to finish or choose another output"
        )
    stale = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, stale)  # of several contenders exactly one renames it
    except FileNotFoundError:
        return
    stale.unlink(missing_ok=True)


@contextmanager
def output_lock(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``TARGET.lock`` for the duration of the block (see the module docstring)."""
    target = Path(target)
    path = lock_path(target)
    check_writable(path, f"the lock of {target}")
    for _ in range(3):
        if _try_create(path):
            break
        _take_over_if_stale(path, target)
    else:
        raise OutputLockedError(f"{target}: could not take the lock {path}; try again")
    try:
        yield path
    finally:
        # Only our own lock: a later holder's file (after ours was judged stale) stays.
        if _holder(path)[0] == os.getpid():
            path.unlink(missing_ok=True)
