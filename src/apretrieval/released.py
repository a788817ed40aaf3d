"""The networks dirtorch and cirtorch publish, by name: where each is, fetched and verified.

``apretrieval convert --from cirtorch gl18-tl-resnet101-gem-w`` fetches the file the project
publishes under that name (its own evaluation script uses the same names), through the
transfer every dataset uses (:func:`apretrieval.data.fetch.download_file`: resumable with HTTP
``Range``, moved into place only once complete), from the project's host or from a ``--mirror``
holding the same relative paths (``cirtorch/<file>.pth``, ``dirtorch/<name>.zip``).

What "verified" means for each, from what the projects publish:

* cirtorch names its files ``<name>-<hash>.pth`` where ``<hash>`` starts the file's SHA-256
  (the ``torch.hub`` convention): a file whose digest does not start with it is removed.
* dirtorch publishes Google Drive links to zip archives holding one ``.pt`` and no digest: the
  archive's CRC-32 of every member is checked, and it must hold exactly one checkpoint. Drive
  answers an HTML page instead of the file when a quota is hit; that is said as such.

Only the networks :mod:`apretrieval.convert` can convert are listed (ResNet trunks with GeM):
dirtorch's Resnet101-TL-MAC and cirtorch's VGG16 network are not.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from apretrieval.atomic import atomic_open
from apretrieval.data.download import mirror_url
from apretrieval.data.fetch import ChecksumError, DownloadError, download_file

__all__ = [
    "RELEASED",
    "ReleasedNetwork",
    "default_download_dir",
    "fetch_released",
    "released_network",
]

_CIRTORCH = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks"
# Drive's direct-download endpoint (its "confirm" skips the large-file warning page).
_DRIVE = "https://drive.usercontent.google.com/download?export=download&confirm=t&id="


@dataclass(frozen=True)
class ReleasedNetwork:
    """One published network: ``source`` project, download ``url``, the ``path`` it has under
    a mirror, and what verifies it (``sha256_prefix`` of the file, or a zip ``archive``)."""

    name: str
    source: str  # "dirtorch" or "cirtorch"
    url: str
    path: str
    sha256_prefix: str | None = None
    archive: bool = False  # a zip holding the one .pt checkpoint

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def _cirtorch(name: str, folder: str, digest: str) -> ReleasedNetwork:
    file = f"{name}-{digest}.pth"
    return ReleasedNetwork(
        name, "cirtorch", f"{_CIRTORCH}/{folder}/{file}", f"cirtorch/{file}", sha256_prefix=digest
    )


def _dirtorch(name: str, drive_id: str) -> ReleasedNetwork:
    return ReleasedNetwork(
        name, "dirtorch", _DRIVE + drive_id, f"dirtorch/{name}.zip", archive=True
    )


# Names and files as the projects publish them: the "Pre-trained models" table of
# naver/deep-image-retrieval's README (Drive file ids) and the PRETRAINED table of
# cnnimageretrieval-pytorch's cirtorch/examples/test.py.
RELEASED: dict[str, ReleasedNetwork] = {
    n.name: n
    for n in (
        _dirtorch("Resnet101-TL-GeM", "1vhm1GYvn8T3-1C4SPjPNJOuTU9UxKAG6"),
        _dirtorch("Resnet50-AP-GeM", "1oPtE_go9tnsiDLkWjN4NMpKjh-_md1G5"),
        _dirtorch("Resnet101-AP-GeM", "1UWJGDuHtzaQdFhSMojoYVQjmCXhIwVvy"),
        _dirtorch("Resnet101-AP-GeM-LM18", "1r76NLHtJsH-Ybfda4aLkUIoW3EEsi25I"),
        _cirtorch("retrievalSfM120k-resnet101-gem", "retrieval-SfM-120k", "b80fb85"),
        _cirtorch("rSfM120k-tl-resnet50-gem-w", "retrieval-SfM-120k", "97bf910"),
        _cirtorch("rSfM120k-tl-resnet101-gem-w", "retrieval-SfM-120k", "a155e54"),
        _cirtorch("rSfM120k-tl-resnet152-gem-w", "retrieval-SfM-120k", "f39cada"),
        _cirtorch("gl18-tl-resnet50-gem-w", "gl18", "83fdc30"),
        _cirtorch("gl18-tl-resnet101-gem-w", "gl18", "a4d43db"),
        _cirtorch("gl18-tl-resnet152-gem-w", "gl18", "21278d5"),
    )
}


def released_network(name: str, source: str | None = None) -> ReleasedNetwork:
    """The published network ``name`` (of ``source`` when given); ValueError listing them."""
    network = RELEASED.get(name)
    if network is None or (source is not None and network.source != source):
        names = [n for n, r in RELEASED.items() if source is None or r.source == source]
        kind = f"released {source} network" if source else "released network"
        raise ValueError(
            f"{name!r} is neither a file nor the name of a {kind}; released: {', '.join(names)}"
        )
    return network


def default_download_dir() -> Path:
    """``$XDG_CACHE_HOME/apretrieval/released`` (``~/.cache/...`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "apretrieval" / "released"


def _check_prefix(path: Path, network: ReleasedNetwork) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if network.sha256_prefix and not h.hexdigest().startswith(network.sha256_prefix):
        path.unlink()
        raise ChecksumError(
            f"{network.url}: SHA-256 {h.hexdigest()[:12]}... does not start with the "
            f"{network.sha256_prefix} its name publishes (file removed; try again)"
        )


def _unpack_checkpoint(archive: Path, dest: Path, network: ReleasedNetwork) -> None:
    """The one ``.pt`` of a dirtorch zip, CRC-checked, written to ``dest`` atomically."""
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DownloadError(f"{archive}: member {bad} fails its CRC check (try again)")
            members = [m for m in zf.namelist() if m.endswith((".pt", ".pth"))]
            if len(members) != 1:
                raise DownloadError(
                    f"{archive}: expected one .pt checkpoint inside, found {members or 'none'}"
                )
            with zf.open(members[0]) as src, atomic_open(dest, "wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    out.write(block)
    except zipfile.BadZipFile:
        head = archive.read_bytes()[:200].lower()
        archive.unlink()
        if b"<html" in head or b"<!doctype" in head:
            raise DownloadError(
                f"{network.url} sent a web page, not the archive (Google Drive does when a "
                "download quota is hit or its page changes): fetch it in a browser and pass "
                "the .pt file, or serve it with --mirror"
            ) from None
        raise DownloadError(f"{archive}: not a zip archive (removed; try again)") from None


def fetch_released(
    network: ReleasedNetwork,
    download_dir: str | os.PathLike[str] | None = None,
    *,
    mirror: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> Path:
    """The local checkpoint of ``network``, downloaded (resumably) and verified if needed.

    Kept in ``download_dir`` (default :func:`default_download_dir`) as ``<source>/<file>``:
    a second call reuses it. ``mirror``: a base URL holding ``network.path``.
    """
    root = Path(download_dir) if download_dir is not None else default_download_dir()
    url = network.url if mirror is None else mirror_url(mirror, network.path)
    target = root / network.path
    if network.archive:
        checkpoint = target.with_suffix(".pt")
        if checkpoint.is_file():  # unpacked earlier (atomically: whole or absent)
            return checkpoint
    elif target.is_file():
        _check_prefix(target, network)
        return target
    if log is not None:
        log(f"downloading {network.source} {network.name}: {url}")
    download_file(url, target, retries=retries, timeout=timeout, progress=progress)
    if not network.archive:
        _check_prefix(target, network)
        return target
    _unpack_checkpoint(target, checkpoint, network)
    target.unlink()
    return checkpoint
