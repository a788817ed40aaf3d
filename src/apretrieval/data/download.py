"""Download the Revisited Oxford/Paris benchmarks and the R1M distractors from their hosts.

Resulting layouts (what :class:`apretrieval.data.revisited.RevisitedDataset` reads)::

    roxford5k, rparis6k:  <root>/gnd_<name>.pkl, <root>/jpg/<image>.jpg (archives flattened)
    revisitop1m:          <root>/revisitop1m.txt, <root>/jpg/<path from the list>

Transfers are resumable: bytes go to ``<file>.part`` and an interrupted download continues
with an HTTP ``Range`` request (within one call, up to ``retries`` times, and on the next
call). A file is moved into place (``os.replace``) only once its size and, where known, its
SHA-256 match. Archives are extracted member by member with path checks (no absolute paths,
no ``..``, regular files only) and a marker file records each finished archive.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import posixpath
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from apretrieval.atomic import atomic_open, atomic_write_text

__all__ = [
    "DATASETS",
    "DownloadError",
    "RemoteFile",
    "dataset_files",
    "download_dataset",
    "download_file",
    "extract_archive",
]

_OXFORD = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings"
_PARIS = "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings"
_GND = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
_R1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"
_R1M_ARCHIVES = 100


class DownloadError(OSError):
    """A file could not be fetched or failed validation (message says which and why)."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: where it comes from and what it must be.

    ``path`` is where it lives under the mirror root (a mirror reproduces these paths);
    ``extract``: None (keep as is), "flatten" (archive of images, all into ``jpg/``) or
    "tree" (archive whose member paths are kept under ``jpg/``).
    """

    url: str
    path: str
    size: int | None = None
    sha256: str | None = None
    extract: str | None = None

    @property
    def filename(self) -> str:
        return posixpath.basename(self.path)


def _gnd(name: str, size: int, sha256: str) -> RemoteFile:
    return RemoteFile(f"{_GND}/{name}/gnd_{name}.pkl", f"{name}/gnd_{name}.pkl", size, sha256)


# Sizes and hashes of the ground-truth files are those of the published files (two independent
# byte-identical copies); the image archives are checked against the server's length.
DATASETS: dict[str, tuple[RemoteFile, ...]] = {
    "roxford5k": (
        RemoteFile(
            f"{_OXFORD}/oxbuild_images-v1.tgz",
            "oxbuildings/oxbuild_images-v1.tgz",
            extract="flatten",
        ),
        _gnd(
            "roxford5k", 149871, "ba7967754bd2d7d2210a5799f9c45ad5835e269a80ef9d3eba44caa35816c471"
        ),
    ),
    "rparis6k": (
        RemoteFile(f"{_PARIS}/paris_1-v1.tgz", "parisbuildings/paris_1-v1.tgz", extract="flatten"),
        RemoteFile(f"{_PARIS}/paris_2-v1.tgz", "parisbuildings/paris_2-v1.tgz", extract="flatten"),
        _gnd(
            "rparis6k", 276508, "d2e729a5293dda7dda8a15c8383424a42e4964a2c4cfea2f32fa85d11d2df499"
        ),
    ),
    "revisitop1m": (
        *(
            RemoteFile(
                f"{_R1M}/jpg/revisitop1m.{i}.tar.gz",
                f"revisitop1m/jpg/revisitop1m.{i}.tar.gz",
                extract="tree",
            )
            for i in range(1, _R1M_ARCHIVES + 1)
        ),
        RemoteFile(f"{_R1M}/revisitop1m.txt", "revisitop1m/revisitop1m.txt"),
    ),
}


def dataset_files(name: str, mirror: str | None = None) -> tuple[RemoteFile, ...]:
    """The files of ``name``; with ``mirror`` (a base URL) they come from ``mirror/<path>``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    files = DATASETS[name]
    if mirror is None:
        return files
    base = mirror.rstrip("/") + "/"
    return tuple(
        RemoteFile(urllib.parse.urljoin(base, f.path), f.path, f.size, f.sha256, f.extract)
        for f in files
    )


# --------------------------------------------------------------------------------------------
# One file


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_complete(path: Path, size: int | None, sha256: str | None, url: str) -> None:
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DownloadError(f"{url}: got {actual} bytes, expected {size}")
    if sha256 is not None and _sha256_of(path) != sha256.lower():
        path.unlink()  # a complete but wrong file cannot be resumed: start over next time
        raise DownloadError(f"{url}: SHA-256 mismatch (file removed; try again or check the URL)")


def _total_from_headers(resp: http.client.HTTPResponse, offset: int) -> int | None:
    if resp.status == 206:
        rng = resp.headers.get("Content-Range", "")  # "bytes a-b/total"
        total = rng.rsplit("/", 1)[-1]
        return int(total) if total.isdigit() else None
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _fetch_once(
    url: str, part: Path, expected: int | None, timeout: float, bar: tqdm[Any], chunk: int
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
        with open(part, "ab") as f:
            while True:
                block = resp.read(chunk)
                if not block:
                    break
                f.write(block)
                bar.update(len(block))
    got = part.stat().st_size
    want = total if total is not None else expected
    if want is not None and got < want:
        raise ConnectionError(f"connection closed after {got} of {want} bytes")
    return want


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    size: int | None = None,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    chunk_size: int = 1 << 20,
) -> Path:
    """Fetch ``url`` to ``dest`` resumably and atomically; returns ``dest``.

    An existing ``dest`` that passes the size/SHA-256 checks is kept. Raises DownloadError
    (an OSError) when the host cannot be reached or the bytes fail validation; the partial
    ``dest.part`` stays for the next attempt.
    """
    dest = Path(dest)
    if dest.exists():
        try:
            _check_complete(dest, size, sha256, url)
            return dest
        except DownloadError:  # a stale or foreign file: fetch it again
            dest.unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
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
                total = _fetch_once(url, part, size, timeout, bar, chunk_size)
                break
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
    _check_complete(part, size, sha256, url)
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------------
# Archives


def _safe_member_path(name: str) -> str | None:
    """Normalised relative path of an archive member, or None if it would escape."""
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or norm in ("", "."):
        return None
    return norm


def extract_archive(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    flatten: bool = False,
    progress: bool = True,
) -> int:
    """Extract the regular files of a tar archive (any compression) into ``dest``.

    ``flatten`` keeps only base names (the image archives nest files in folders). Members that
    are links, devices or point outside ``dest`` are skipped. Each file is written to a
    temporary name first, so an interrupted extraction leaves no truncated image. Returns the
    number of files written.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise DownloadError(f"{archive}: not a readable tar archive ({err})") from None
    with (
        tar,
        tqdm(
            desc=f"extract {Path(archive).name}", unit=" files", disable=not progress, leave=False
        ) as bar,
    ):
        for member in tar:
            if not member.isfile():
                continue
            rel = _safe_member_path(member.name)
            if rel is None:
                continue
            target = dest / (posixpath.basename(rel) if flatten else rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                continue
            # No fsync per image (a million files): the .done marker is written after all.
            with src, atomic_open(target, "wb", fsync=False) as out:
                shutil.copyfileobj(src, out, 1 << 20)
            count += 1
            bar.update(1)
    return count


# --------------------------------------------------------------------------------------------
# A dataset


def download_dataset(
    name: str,
    root: str | os.PathLike[str],
    *,
    mirror: str | None = None,
    keep_archives: bool = False,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Download (and extract) dataset ``name`` into ``root``; resumable, idempotent.

    ``name``: roxford5k, rparis6k or revisitop1m. Finished archives are recorded by a marker
    ``.<archive>.done`` and skipped on the next run.
    """
    files = dataset_files(name, mirror)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _msg: None)

    def fetch(rf: RemoteFile, target: Path) -> None:
        download_file(
            rf.url,
            target,
            size=rf.size,
            sha256=rf.sha256,
            retries=retries,
            timeout=timeout,
            progress=progress,
        )

    for i, rf in enumerate(files, 1):
        if rf.extract is None:  # a plain file (ground truth, image list): checked, kept
            target = root / rf.filename
            if not target.exists():
                say(f"[{i}/{len(files)}] {rf.url}")
            fetch(rf, target)
            continue
        marker = root / f".{rf.filename}.done"
        if marker.exists():
            continue
        archive = root / rf.filename
        say(f"[{i}/{len(files)}] {rf.url}")
        fetch(rf, archive)
        n = extract_archive(
            archive, root / "jpg", flatten=rf.extract == "flatten", progress=progress
        )
        if n == 0:
            raise DownloadError(f"{archive}: no files inside")
        atomic_write_text(marker, f"{n}\n")
        if not keep_archives:
            archive.unlink()
    return root
