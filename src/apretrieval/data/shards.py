"""Many archive shards in parallel: fetched, MD5-verified, extracted, each resumable.

A data set published as numbered tar shards with one MD5 file each (Google Landmarks v2) is
fetched by :func:`fetch_shards`:

1. For every shard without a ``.done`` marker: its MD5 file (first field: the hex digest) and,
   with a HEAD request, its size.
2. Where sizes are known, the free disk space is checked before any shard starts: the shards'
   extracted images (about the archives' size: tar stores JPEGs as they are) plus the archives
   that can be on disk at once (``jobs`` of them, or all with ``keep_archives``).
3. ``jobs`` shards at a time: download (resumable, :func:`~apretrieval.data.fetch.download_file`),
   MD5 check, extraction (:func:`~apretrieval.data.download.extract_archive`: regular files
   only, no path leaving the folder), marker, archive removed. One progress bar counts the
   bytes of all shards and, in its label, the shards done.

A shard whose MD5 differs is removed and reported, the others carry on; the run then fails
with one line naming every such shard. Any other failure (offline, disk full) stops the
shards not yet started and is raised as it is. A rerun fetches only what is missing or
unverified: finished shards have their marker, a partial one its ``.part``.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from apretrieval.data.download import unpack_archive
from apretrieval.data.fetch import (
    ChecksumError,
    DownloadError,
    bytes_on_disk,
    download_file,
    remote_size,
)

__all__ = [
    "Shard",
    "check_free_space",
    "disk_space_needed",
    "fetch_shards",
    "parse_shard_range",
    "read_md5_file",
]

_T = TypeVar("_T")
_R = TypeVar("_R")
_MD5 = re.compile(r"[0-9a-fA-F]{32}")


@dataclass(frozen=True)
class Shard:
    """One archive shard: ``name`` (how messages call it, e.g. ``train/images_007.tar``), its
    ``url`` and the ``md5_url`` of its MD5 file; ``work`` is the folder of its download, MD5
    file and marker; members are extracted under ``dest``, keeping their paths."""

    name: str
    url: str
    md5_url: str
    work: Path
    dest: Path

    @property
    def archive(self) -> Path:
        return self.work / Path(self.name).name

    @property
    def md5_file(self) -> Path:
        return self.work / f"md5.{Path(self.name).stem}.txt"

    @property
    def marker(self) -> Path:
        return self.work / f"{Path(self.name).name}.done"


def parse_shard_range(text: str | None, count: int) -> range:
    """Shard numbers from ``"A-B"`` (inclusive) or ``"A"``; None: all ``count`` of them."""
    if text is None:
        return range(count)
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if m is None:
        raise ValueError(f"shards must be A-B or A (numbers), got {text!r}")
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 0 <= first <= last < count:
        raise ValueError(f"shards {text!r}: expected 0 <= A <= B <= {count - 1}")
    return range(first, last + 1)


def read_md5_file(path: Path) -> str:
    """The digest of an ``md5sum``-style file (``<hex digest>  <file name>``)."""
    fields = path.read_text(encoding="utf-8", errors="replace").split()
    if not fields or _MD5.fullmatch(fields[0]) is None:
        path.unlink(missing_ok=True)  # not an MD5 file (an error page?): fetch it again next time
        raise DownloadError(f"{path}: not an MD5 file (expected '<32 hex digits>  <name>')")
    return fields[0].lower()


def disk_space_needed(
    sizes: Sequence[int], partial: Sequence[int], jobs: int, keep_archives: bool
) -> int:
    """Bytes the shards of ``sizes`` (with ``partial`` bytes already on disk each) will add at
    the peak: their extracted images (about their size) plus the archives on disk at once."""
    remaining = [max(s - p, 0) for s, p in zip(sizes, partial, strict=True)]
    archives = sum(remaining) if keep_archives else sum(sorted(remaining)[-jobs:])
    return sum(sizes) + archives


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_free_space(folder: Path, need: int, what: str, hint: str = "free some space") -> None:
    """DownloadError (before any transfer) unless ``folder``'s disk has ``need`` bytes free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DownloadError(
            f"not enough free disk space in {folder}: {what} need about {_size(need)}, "
            f"{_size(free)} free ({hint})"
        )


class _Stopped(Exception):
    """Raised inside a shard's transfer once another shard failed or the run was interrupted."""


class _Bar:
    """One bar over all shards: bytes, and 'shards k/n' in its label (thread-safe). Setting
    ``stop`` makes the transfers still running end at their next block (a ``.part`` kept)."""

    def __init__(self, total: int | None, done: int, count: int, label: str, show: bool):
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._done, self._count, self._label = done, count, label
        self._bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=self._desc(),
            disable=not show,
        )

    def _desc(self) -> str:
        return f"{self._label}: shards {self._done}/{self._count}"

    def add(self, n: int) -> None:
        if self.stop.is_set():
            raise _Stopped
        with self._lock:
            self._bar.update(n)

    def shard_done(self) -> None:
        with self._lock:
            self._done += 1
            self._bar.set_description(self._desc())

    def close(self) -> None:
        self._bar.close()


def _prepare(shard: Shard, retries: int, timeout: float) -> tuple[str, int | None]:
    """(MD5 digest, size or None) of a shard; the MD5 file is kept beside its download."""
    shard.work.mkdir(parents=True, exist_ok=True)
    # Fetched anew for every unfinished shard (a few bytes): a digest fixed at the source
    # since the last run is the one a rerun checks against.
    shard.md5_file.unlink(missing_ok=True)
    download_file(shard.md5_url, shard.md5_file, retries=retries, timeout=timeout, progress=False)
    return read_md5_file(shard.md5_file), remote_size(shard.url, timeout)


def _run_shard(
    shard: Shard,
    md5: str,
    size: int | None,
    bar: _Bar,
    keep_archives: bool,
    retries: int,
    timeout: float,
) -> None:
    download_file(
        shard.url,
        shard.archive,
        size=size,
        md5=md5,
        retries=retries,
        timeout=timeout,
        progress=False,
        on_bytes=bar.add,
    )
    unpack_archive(
        shard.archive,
        shard.dest,
        shard.marker,
        name=shard.name,
        keep_archive=keep_archives,
        progress=False,
    )
    bar.shard_done()


def _map(
    jobs: int,
    fn: Callable[[_T], _R],
    items: Sequence[_T],
    stop: threading.Event | None = None,
) -> list[_R]:
    """``fn`` over ``items`` on ``jobs`` threads. On the first exception (or an interrupt of
    the caller) the work not yet started is cancelled, ``stop`` is set for the work running,
    and that exception is raised once every thread has ended."""
    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(fn, item) for item in items]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
    except BaseException:  # Ctrl-C: let the running transfers end at their next block
        if stop is not None:
            stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    failed = [f for f in futures if f.done() and not f.cancelled() and f.exception()]
    if failed and stop is not None:
        stop.set()
    pool.shutdown(wait=True, cancel_futures=True)
    errors = [
        err
        for f in futures
        if f.done() and not f.cancelled()
        for err in [f.exception()]
        if err is not None and not isinstance(err, _Stopped)
    ]
    if errors:
        raise errors[0]
    return [f.result() for f in futures]


def fetch_shards(
    shards: Sequence[Shard],
    *,
    jobs: int = 4,
    keep_archives: bool = False,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
    label: str = "download",
    log: Callable[[str], None] | None = print,
) -> int:
    """Fetch, verify and extract ``shards`` (see the module docstring); returns how many were
    fetched in this call. Raises :class:`DownloadError` naming the shards whose MD5 differed
    (removed; the others kept), or the first other error."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    say = log or (lambda _msg: None)
    todo = [s for s in shards if not s.marker.exists()]
    if len(todo) < len(shards):
        say(f"{label}: {len(shards) - len(todo)} of {len(shards)} shards already in place")
    if not todo:
        return 0
    prepared = _map(min(jobs * 4, 32), lambda s: _prepare(s, retries, timeout), todo)
    sizes = [size for _, size in prepared]
    partial = [bytes_on_disk(s.archive) for s in todo]
    known = {i: size for i, size in enumerate(sizes) if size is not None}
    if known:
        need = disk_space_needed(
            list(known.values()), [partial[i] for i in known], jobs, keep_archives
        )
        check_free_space(
            todo[0].dest.parent,
            need,
            f"{len(todo)} shards",
            "free some space, or fetch fewer with --shards",
        )
    total = sum(known.values()) if len(known) == len(todo) else None
    bar = _Bar(total, len(shards) - len(todo), len(shards), label, progress)
    bar.add(sum(partial))
    bad: list[str] = []

    def one(i: int) -> None:
        md5, size = prepared[i]
        try:
            _run_shard(todo[i], md5, size, bar, keep_archives, retries, timeout)
        except ChecksumError:
            bad.append(todo[i].name)  # removed by the check; the others carry on

    try:
        _map(jobs, one, range(len(todo)), bar.stop)
    finally:
        bar.close()
    if bad:
        names = ", ".join(sorted(bad))
        raise DownloadError(
            f"MD5 mismatch: {names} (removed; the other shards are kept, run again to refetch)"
        )
    return len(todo)
