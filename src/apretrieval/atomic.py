"""Files that are never half-written: write a temporary file beside the target, then rename.

A crash or Ctrl-C at any point leaves either the previous file or the new one, never a
truncated one (``os.replace`` is atomic within a file system). Every output file of the
library goes through :func:`atomic_path` / :func:`atomic_open` (or the ``atomic_write_*``
helpers built on them).

A full disk is reported as such (:func:`full_disk_error`: OSError ENOSPC naming the file)
however the writer said it (numpy's short write, torch's zip writer).

The temporary file is ``.NAME.<random>.tmp`` in the target's folder. It gets the permissions
``open()`` would give a new file (0666 minus the umask), not ``mkstemp``'s private 0600, so
outputs are as readable as any other file the user writes. A process killed (SIGKILL) while
writing leaves its temporary behind, as large as the file it was writing: the owner of a
file (holding its lock) clears those with :func:`remove_stale_temporaries` (of a path) or
:func:`remove_stale_temporaries_in` (of a folder it owns whole).

An existing path is replaced only if it is a regular file (:func:`check_replaceable`): a
device node, a FIFO or a socket given as an output (``--out /dev/null`` as root) would
otherwise be swapped for a regular file under its name.

Example:
    >>> with atomic_open(tmp / "scores.txt", "w") as f:  # doctest: +SKIP
    ...     f.write("0.93\\n")
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_replaceable",
    "check_writable",
    "full_disk_error",
    "mount_point",
    "remove_stale_temporaries",
    "remove_stale_temporaries_in",
]

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
}


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere reading means setting: restore at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_replaceable(path: str | os.PathLike[str], *, folder: bool = False) -> None:
    """ValueError unless ``path`` is absent or a regular file (``folder``: a folder; a file
    there is a NotADirectoryError, as creating the folder would raise).

    Symbolic links are followed: a link to a device is refused like the device.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return  # absent, or a dangling link (replacing the link harms nothing)
    except NotADirectoryError:
        return  # a part of the path is a file: the write reports it with the path
    if folder and stat.S_ISREG(mode):  # what mkdir would say, before any work
        raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder", str(path))
    wanted = stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)
    if not wanted:
        kind = _KINDS.get(stat.S_IFMT(mode), "of another kind")
        expected = "a folder" if folder else "a regular file"
        raise ValueError(
            f"refusing to write {path}: it is {kind}, not {expected}; choose another path"
        )


def check_writable(path: str | os.PathLike[str], what: str = "the output") -> Path:
    """``path`` when a file can be written there: its folder is created if needed and a probe
    file is written in it and removed. A folder or a device at ``path`` is a ValueError (a path
    the caller should not have given); a folder that cannot be made or written in (a file in
    the way, no permission, a read-only or full file system) is the OSError of that cause,
    naming ``what`` and ``path``.

    Called before long work whose output goes there, so that a read-only or mistyped location
    fails at once rather than after hours of extraction.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {what} to {path}: it is a folder")
    check_replaceable(path)  # a device, a FIFO, a socket: refused
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
    except OSError as err:
        reason = f"cannot write {what} there ({err.strerror})"
        raise type(err)(err.errno, reason, str(path)) from None
    os.close(fd)
    os.unlink(probe)
    return path


# How writers that do not set errno say that a write came up short: numpy ("N requested and
# M written"), torch's zip writer ("unexpected pos", "failed writing").
_SHORT_WRITE = ("requested and", "unexpected pos", "failed writing", "file write failed")
_NO_ROOM = 1 << 20  # bytes: a file system with less than this free is full for any write


def mount_point(path: str | os.PathLike[str]) -> Path:
    """The mount point of the file system that holds (or would hold) ``path``."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


def _no_room(path: Path) -> bool:
    try:
        st = os.statvfs(mount_point(path.parent))
    except OSError:
        return False
    free = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use reserved blocks
    return free * st.f_frsize < _NO_ROOM


def full_disk_error(err: BaseException, path: str | os.PathLike[str]) -> OSError | None:
    """``err``, raised while writing ``path``, as the OSError(ENOSPC or EDQUOT, path) it is
    when the disk (or the quota) is full; None for any other error.

    Writers say it in their own words: the OS's errno (often without the file's name), a
    short write without errno from numpy or torch. Those count as a full disk only when the
    file system has (almost) no room left, so another failure is never mislabelled.
    """
    code = getattr(err, "errno", None)
    if code not in (errno.ENOSPC, errno.EDQUOT):
        short = isinstance(err, OSError | RuntimeError) and any(s in str(err) for s in _SHORT_WRITE)
        if not (short and _no_room(Path(path))):
            return None
        code = errno.ENOSPC
    return OSError(code, os.strerror(code), str(path))


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` if the block succeeds.

    The block may write the temporary file however it likes (even reopen it by name); on any
    exception the temporary is removed and ``path`` is left as it was.
    """
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise (full_disk_error(err, path) or err) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what open() would have created
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        full = full_disk_error(err, path)  # judged before the temporary frees its space
        Path(tmp).unlink(missing_ok=True)
        if full is not None:
            raise full from err
        raise


@contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "wb", *, fsync: bool = True, **kwargs: Any
) -> Iterator[IO[Any]]:
    """``open(path, mode)`` through :func:`atomic_path`.

    ``fsync``: flush the data to disk before the rename, so that a power cut cannot leave an
    empty file under the new name; ``False`` for many small files whose completeness is
    recorded elsewhere afterwards.
    """
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes a whole file: mode must be 'w...', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        f.write(data)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **dump_kwargs: Any) -> Path:
    """``json.dump(obj)`` to ``path`` atomically (UTF-8); ``dump_kwargs`` go to json.dump.

    The text is built before the file is opened, so a value JSON cannot hold raises before
    anything is written.
    """
    return atomic_write_text(path, json.dumps(obj, **dump_kwargs))


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that writes of ``path`` left behind; returns them.

    Only ``.NAME.*.tmp`` siblings of ``path`` are touched: call this where no other process
    is writing ``path`` (e.g. when a run starts in a folder it owns).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = _temporary_prefix(path)
    removed = []
    for p in path.parent.iterdir():
        if p.name.startswith(prefix) and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def remove_stale_temporaries_in(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries of every atomic write in ``folder`` (``.NAME.*.tmp``); returns
    them. For a folder whose every file one owner writes, called while it holds the lock."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
