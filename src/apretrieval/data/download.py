"""Download the Revisited Oxford/Paris benchmarks and the R1M distractors from their hosts.

Resulting layouts (what :class:`apretrieval.data.revisited.RevisitedDataset` reads)::

    roxford5k, rparis6k:  <root>/gnd_<name>.pkl, <root>/jpg/<image>.jpg (archives flattened)
    revisitop1m:          <root>/revisitop1m.txt, <root>/jpg/<path from the list>

Files are fetched by :func:`apretrieval.data.fetch.download_file` (resumable, verified).
Archives are extracted member by member with path checks (no absolute paths, no ``..``,
regular files only, so no link can point outside) and a marker file records each finished
archive. The training sets (:mod:`apretrieval.data.sfm120k`, :mod:`apretrieval.data.gldv2`)
are fetched with the same functions.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import shutil
import tarfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from apretrieval.atomic import atomic_open, atomic_write_text
from apretrieval.data.fetch import DownloadError, download_file

__all__ = [
    "DATASETS",
    "RemoteFile",
    "dataset_files",
    "download_dataset",
    "download_files",
    "extract_archive",
    "mirror_url",
    "mirrored",
    "unpack_archive",
]

_OXFORD = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings"
_PARIS = "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings"
_GND = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
_R1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"
_R1M_ARCHIVES = 100


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: where it comes from and what it must be.

    ``path`` is where it lives under the mirror root (a mirror reproduces these paths);
    ``extract``: None (keep as is), "flatten" (archive of images, all into ``<into>/``) or
    "tree" (archive whose member paths are kept under ``<into>/``).
    """

    url: str
    path: str
    size: int | None = None
    sha256: str | None = None
    extract: str | None = None
    into: str = "jpg"

    @property
    def filename(self) -> str:
        return posixpath.basename(self.path)

    def marker(self, root: Path) -> Path:
        """The file that records this archive extracted under ``root``: ``.<archive>.done``."""
        return root / f".{self.filename}.done"


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
    return mirrored(DATASETS[name], mirror)


def mirrored(files: tuple[RemoteFile, ...], mirror: str | None) -> tuple[RemoteFile, ...]:
    """``files`` fetched from ``mirror/<path>`` instead (unchanged when ``mirror`` is None)."""
    if mirror is None:
        return files
    return tuple(dataclasses.replace(f, url=mirror_url(mirror, f.path)) for f in files)


def mirror_url(mirror: str, path: str) -> str:
    """``path`` under the base URL ``mirror``."""
    return urllib.parse.urljoin(mirror.rstrip("/") + "/", path)


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


def unpack_archive(
    archive: Path,
    dest: Path,
    marker: Path,
    *,
    name: str | None = None,
    flatten: bool = False,
    keep_archive: bool = False,
    progress: bool = True,
) -> int:
    """Extract a fetched ``archive`` under ``dest`` (:func:`extract_archive`), then record it
    finished: ``marker`` written (the number of files in it), the archive removed unless
    ``keep_archive``. Returns that number; DownloadError naming ``name`` (default: the
    archive's path) when it holds no file."""
    n = extract_archive(archive, dest, flatten=flatten, progress=progress)
    if n == 0:
        raise DownloadError(f"{name or archive}: no files inside")
    atomic_write_text(marker, f"{n}\n")
    if not keep_archive:
        archive.unlink()
    return n


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
    return download_files(
        dataset_files(name, mirror),
        root,
        keep_archives=keep_archives,
        progress=progress,
        retries=retries,
        timeout=timeout,
        log=log,
    )


def download_files(
    files: tuple[RemoteFile, ...],
    root: str | os.PathLike[str],
    *,
    keep_archives: bool = False,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Fetch ``files`` one after the other into ``root``: plain files kept there, archives
    extracted into ``root/<into>/`` (then removed unless ``keep_archives``). Resumable and
    idempotent: a finished archive is recorded by a marker ``.<archive>.done`` and skipped.
    """
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
        marker = rf.marker(root)
        if marker.exists():
            continue
        archive = root / rf.filename
        say(f"[{i}/{len(files)}] {rf.url}")
        fetch(rf, archive)
        unpack_archive(
            archive,
            root / rf.into,
            marker,
            flatten=rf.extract == "flatten",
            keep_archive=keep_archives,
            progress=progress,
        )
    return root
