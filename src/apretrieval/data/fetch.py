"""One file over HTTP, resumable and verified: the transfer under every download.

Bytes go to ``<file>.part``; an interrupted transfer continues with an HTTP ``Range`` request
(within one call, up to ``retries`` times, and on the next call; a server that ignores
``Range`` makes it start over). The file is moved into place (``os.replace``) only once its
size and, where known, its SHA-256 or MD5 match; a complete file with a wrong digest is
removed (:class:`ChecksumError`). A failed local write (a full disk) is not retried: it is
raised as the ``OSError`` it is, the partial file kept for the next call.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = [
    "ChecksumError",
    "DownloadError",
    "bytes_on_disk",
    "download_file",
    "partial_path",
    "remote_size",
]


class DownloadError(OSError):
    """A file could not be fetched or failed validation (message says which and why)."""


class ChecksumError(DownloadError):
    """A complete file whose SHA-256 / MD5 differs from the published one (it was removed)."""


class _WriteFailed(Exception):
    """A local write failed (e.g. no space left): not a network fault, so never retried."""

    def __init__(self, err: OSError) -> None:
        super().__init__(str(err))
        self.err = err


def partial_path(dest: Path) -> Path:
    """Where the bytes of ``dest`` gather until they are complete: ``<dest>.part``."""
    return dest.with_name(dest.name + ".part")


def bytes_on_disk(dest: Path) -> int:
    """Bytes of ``dest`` already fetched: its size when complete, else its ``.part``'s, else 0."""
    for path in (dest, partial_path(dest)):
        if path.exists():
            return path.stat().st_size
    return 0


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_complete(
    path: Path, size: int | None, sha256: str | None, url: str, md5: str | None = None
) -> None:
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DownloadError(f"{url}: got {actual} bytes, expected {size}")
    for name, algorithm, want in (("SHA-256", "sha256", sha256), ("MD5", "md5", md5)):
        if want is not None and _digest(path, algorithm) != want.lower():
            path.unlink()  # a complete but wrong file cannot be resumed: start over next time
            raise ChecksumError(
                f"{url}: {name} mismatch (file removed; try again or check the URL)"
            )


def _total_from_headers(resp: http.client.HTTPResponse, offset: int) -> int | None:
    if resp.status == 206:
        rng = resp.headers.get("Content-Range", "")  # "bytes a-b/total"
        total = rng.rsplit("/", 1)[-1]
        return int(total) if total.isdigit() else None
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _fetch_once(
    url: str,
    part: Path,
    expected: int | None,
    timeout: float,
    bar: tqdm[Any],
    chunk: int,
    on_bytes: Callable[[int], None] | None = None,
) -> int | None:
    """Append the missing bytes of ``url`` to ``part``; returns the total size if known."""
    offset = part.stat().st_size if part.exists() else 0
    if expected is not None and offset == expected:
        return expected
    headers = {"User-Agent": "apretrieval-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left past offset: the part is complete
            return offset
        raise
    with resp:
        if offset and resp.status != 206:  # server ignored Range: start from scratch
            offset = 0
            part.unlink(missing_ok=True)
        total = _total_from_headers(resp, offset)
        if expected is not None and total is not None and total != expected:
            raise DownloadError(f"{url}: server reports {total} bytes, expected {expected}")
        bar.reset(total=total or expected)
        bar.update(offset)
        with _append(part) as f:
            while True:
                block = resp.read1(chunk)  # what has arrived: the .part keeps up
                if not block:
                    break
                try:
                    f.write(block)
                except OSError as err:  # name the file: a write error carries no path
                    raise _WriteFailed(OSError(err.errno, err.strerror, str(part))) from None
                bar.update(len(block))
                if on_bytes is not None:
                    on_bytes(len(block))
    got = part.stat().st_size
    want = total if total is not None else expected
    if want is not None and got < want:
        raise ConnectionError(f"connection closed after {got} of {want} bytes")
    return want


def _append(part: Path) -> io.BufferedWriter:
    """The partial file, opened for appending (its own function: tests fill the disk here)."""
    try:
        return open(part, "ab")
    except OSError as err:
        raise _WriteFailed(err) from None


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    chunk_size: int = 1 << 20,
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Fetch ``url`` to ``dest`` resumably and atomically; returns ``dest``.

    An existing ``dest`` that passes the size/SHA-256/MD5 checks is kept. Raises DownloadError
    (an OSError) when the host cannot be reached or the bytes fail validation (ChecksumError
    for a wrong digest: the file is removed); the partial ``dest.part`` stays for the next
    attempt. A failed local write (no space left) raises its OSError at once. ``on_bytes(n)``
    is called for every ``n`` bytes written (a caller's own progress bar over many files).
    """
    dest = Path(dest)
    if dest.exists():
        try:
            _check_complete(dest, size, sha256, url, md5)
            return dest
        except DownloadError:  # a stale or foreign file: fetch it again
            dest.unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(dest)
    bar = tqdm(
        desc=dest.name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
        leave=False,
    )
    try:
        for attempt in range(retries + 1):
            try:
                total = _fetch_once(url, part, size, timeout, bar, chunk_size, on_bytes)
                break
            except _WriteFailed as failed:  # disk full, read-only, ...: retrying cannot help
                raise failed.err from None
            except DownloadError:
                raise
            except urllib.error.HTTPError as err:
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
            except (OSError, http.client.HTTPException) as err:  # unreachable, reset, cut short
                reason = getattr(err, "reason", None) or err
                if attempt == retries:
                    have = part.stat().st_size if part.exists() else 0
                    hint = (
                        f"; {have} bytes kept in {part}, run again to resume"
                        if have
                        else " (offline? a local copy can be served with --mirror)"
                    )
                    raise DownloadError(f"cannot download {url}: {reason}{hint}") from None
                time.sleep(min(2.0**attempt, 10.0) * 0.1)
    finally:
        bar.close()
    if total is not None and size is None:
        size = total
    _check_complete(part, size, sha256, url, md5)
    os.replace(part, dest)
    return dest


def remote_size(url: str, timeout: float = 30.0) -> int | None:
    """The size a server announces for ``url`` (a HEAD request); None when it says nothing
    or cannot be asked (the caller then does without, e.g. without a disk-space check)."""
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "apretrieval"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
    except (OSError, http.client.HTTPException, ValueError):
        return None
    return int(length) if length and length.isdigit() else None
