"""Resumable extraction into the descriptor file (:mod:`apretrieval.descriptors`), in shards.

While an extraction to ``X`` runs, finished work is kept under ``X.parts/``:

- ``settings.json``: what every row depends on besides its image (scales, image size, the
  model's checkpoint and its content key, ...);
- per shard ``k``: ``k.npy`` (its rows) and then ``k.json`` (their image ids, each image file's
  stamp, the images skipped as unreadable, and the content key of ``k.npy``). A shard counts
  once its ``k.json`` exists and matches its array, so a shard cut short is redone.

An image file's stamp is its size, modification time, status-change time (ctime) and inode,
read with one ``stat``; its pixels are not hashed (that would read every image of a large
collection on each run). Any write to a file sets its ctime to the time of the write, which no
program can set back, and a file renamed over another has another inode: so a replaced image,
even one of the same size whose mtime was restored, is extracted again. A ``chmod`` or a copy
of the folder elsewhere changes the stamps too and costs a new extraction, never a wrong
reuse.

A rerun with the same settings reuses every row whose image id and file are unchanged, in
whichever shard it is: removing a bad image, adding images or fixing one re-extracts only
those. Finished shards made with other settings are refused (the folder belongs to another
extraction); a folder without a finished shard (a run killed before its first, even while it
replaced ``settings.json``) is simply started over. When all rows
exist, ``X.npy`` + ``X.json`` are written from the shards, in the order of the ids, and
``X.parts/`` is removed. A complete ``X`` whose manifest records the same inputs is returned
as it is: that is the descriptor cache of ``apretrieval evaluate --features``.

The checkpoint is identified by its content, not its path (:mod:`apretrieval.filekey`):
overwriting ``model.pt`` with other weights invalidates the descriptors extracted with it.
The whole run holds the lock of ``X`` (:mod:`apretrieval.locking`): one writer per output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from apretrieval.atomic import (
    atomic_open,
    check_replaceable,
    remove_stale_temporaries,
    remove_stale_temporaries_in,
)
from apretrieval.descriptors import check_finite, features_paths, load_features, write_features
from apretrieval.extraction.loop import Extractor
from apretrieval.extraction.settings import DEFAULT_MAX_SIDE, DEFAULT_SCALES
from apretrieval.filekey import file_key, matches
from apretrieval.locking import output_lock
from apretrieval.models import eval_mode

__all__ = ["extract_to_file"]

_ASSEMBLY_ROWS = 16384  # rows gathered from the shards per write of the final file


def _write_json(path: Path, data: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stamps(images: Any, n: int) -> list[str]:
    """Per image, ``"size:mtime_ns:ctime_ns:inode"`` of its file ("" for in-memory images,
    "missing" when the file is gone; see the module docstring): a file written since it was
    extracted, even with its size and mtime kept, gives another stamp and is extracted again."""
    paths = getattr(images, "paths", None)
    if paths is None and isinstance(images, list | tuple):
        paths = [p if isinstance(p, str | os.PathLike) else None for p in images]
    out = []
    for i in range(n):
        p = paths[i] if paths is not None else None
        if p is None:
            out.append("")
            continue
        try:
            st = os.stat(p)
            out.append(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")
        except OSError:
            out.append("missing")
    return out


def _checkpoint_key(
    checkpoint: str | None, known: Sequence[dict[str, Any] | None]
) -> dict[str, Any] | None:
    """Content key of the checkpoint: a recorded one that still matches (no hashing when size
    and mtime agree), else computed. None without a checkpoint file."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return None
    for key in known:
        if key is not None and matches(key, checkpoint):
            return key
    return file_key(checkpoint)


def _same(old: Any, new: dict[str, Any]) -> bool:
    """Same inputs, comparing the checkpoint by content (its key's sha256), not by mtime."""
    if not isinstance(old, dict) or old.keys() != new.keys():
        return False
    ck_old, ck_new = old.get("checkpoint_key"), new.get("checkpoint_key")
    same_ck = ck_old == ck_new or (
        isinstance(ck_old, dict) and ck_new is not None and ck_old["sha256"] == ck_new["sha256"]
    )
    rest = [k for k in new if k != "checkpoint_key"]
    return same_ck and all(old[k] == new[k] for k in rest)


def _complete(npy: Path, manifest: Path, fp: dict[str, Any]) -> bool:
    """Whether ``X`` holds exactly this extraction (and is a consistent pair)."""
    old = _read_json(manifest) if npy.exists() and manifest.exists() else None
    if not isinstance(old, dict) or not _same(old.get("fingerprint"), fp):
        return False
    try:
        load_features(npy)
    except ValueError:  # e.g. the pair was not written together: extract again
        return False
    return True


def _committed_shards(parts: Path) -> dict[int, dict[str, Any]]:
    """Shard number -> its record, for shards whose array matches their record."""
    out = {}
    for record_path in parts.glob("[0-9]*.json"):
        k = int(record_path.stem)
        record = _read_json(record_path)
        if isinstance(record, dict) and matches(record.get("data"), parts / f"{k:06d}.npy"):
            out[k] = record
    return out


def _shard_contents(
    shards: dict[int, dict[str, Any]],
) -> tuple[dict[tuple[str, str], tuple[int, int]], dict[tuple[str, str], str]]:
    """What the shards hold, keyed by (image id, stamp): (shard, row) of each descriptor, and
    the error of each image skipped as unreadable. A later shard wins over an earlier one."""
    have: dict[tuple[str, str], tuple[int, int]] = {}
    bad: dict[tuple[str, str], str] = {}
    for k, record in sorted(shards.items()):
        for r, key in enumerate(zip(record["ids"], record["stamps"], strict=True)):
            have[key] = (k, r)
        for image_id, (stamp, err) in record["skipped"].items():
            bad[(image_id, stamp)] = err
    return have, bad


def _extract_shards(
    run: Extractor,
    images: Any,
    ids: Sequence[str],
    stamps: Sequence[str],
    todo: Sequence[int],
    parts: Path,
    first: int,
    *,
    dim: int,
    shard_size: int,
    skip_bad: bool,
    bar: tqdm[Any],
) -> None:
    """Extract images ``todo`` into new shards ``first, first + 1, ...`` of ``parts``."""
    for k, s in enumerate(range(0, len(todo), shard_size), start=first):
        rows = list(todo[s : s + shard_size])
        block = np.zeros((len(rows), dim), dtype=np.float32)
        skipped: dict[int, str] | None = {} if skip_bad else None
        run.fill(block, images, rows, bar, skipped)
        keep = [j for j, i in enumerate(rows) if not skipped or i not in skipped]
        good = [rows[j] for j in keep]
        block = block[keep]
        # Refused here, not after hours: NaN weights give NaN for every image.
        check_finite(block, [ids[i] for i in good])
        npy = parts / f"{k:06d}.npy"
        with atomic_open(npy, "wb") as f:
            np.save(f, block)
        record = {
            "ids": [ids[i] for i in good],
            "stamps": [stamps[i] for i in good],
            "skipped": {ids[i]: [stamps[i], err] for i, err in (skipped or {}).items()},
            "data": file_key(npy),
        }
        _write_json(parts / f"{k:06d}.json", record)


def _assembled(parts: Path, sources: Sequence[tuple[int, int]], dim: int) -> Iterator[np.ndarray]:
    """The final rows in order, ``_ASSEMBLY_ROWS`` at a time, gathered from the shards."""
    for s in range(0, len(sources), _ASSEMBLY_ROWS):
        chunk = sources[s : s + _ASSEMBLY_ROWS]
        out = np.empty((len(chunk), dim), dtype=np.float32)
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for j, (k, r) in enumerate(chunk):
            by_shard.setdefault(k, []).append((j, r))
        for k, pairs in by_shard.items():
            shard = np.load(parts / f"{k:06d}.npy", mmap_mode="r")  # read-only: no SIGBUS risk
            dst, src = zip(*pairs, strict=True)
            out[list(dst)] = shard[list(src)]
            del shard
        yield out


def extract_to_file(
    model: nn.Module,
    images: Any,
    ids: Sequence[str],
    out: str | os.PathLike[str],
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    batch_size: int = 8,
    num_workers: int = 2,
    device: str | torch.device | None = None,
    max_side: int | None = DEFAULT_MAX_SIDE,
    shard_size: int = 1024,
    sort_by_size: bool = True,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str = "extract",
    checkpoint: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    amp: str = "off",
) -> Path:
    """Extract to the descriptor file ``X.npy`` (N, D) float32 + ``X.json`` (``ids``, settings);
    resumable (see the module docstring). Returns the ``.npy`` path.

    ``checkpoint``: the file the model was loaded from; recorded, and keyed by content.
    ``skip_bad``: unreadable images are left out (listed with their error in the manifest's
    ``skipped``, counted in ``num_skipped``) instead of stopping the extraction.
    ``amp``: half-precision autocast of the network (recorded: a file made otherwise is not
    reused).
    """
    run = Extractor.prepare(
        model,
        images,
        scales=scales,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        max_side=max_side,
        sort_by_size=sort_by_size,
        amp=amp,
    )
    ids = [str(i) for i in ids]
    if len(ids) != len(images):
        raise ValueError(f"{len(ids)} ids for {len(images)} images")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not ids:
        raise ValueError("no images to extract")
    npy, manifest_path = features_paths(out)
    parts = npy.with_name(npy.stem + ".parts")
    for path in (npy, manifest_path):  # a device or FIFO as output: refused before any work
        check_replaceable(path)
    check_replaceable(parts, folder=True)
    with output_lock(npy.with_suffix("")):
        settings = {"scales": list(run.scales), "max_side": max_side, **(meta or {})}
        if amp != "off":  # float32 files keep the settings (and reuse) they always had
            settings["amp"] = amp
        if checkpoint is not None:
            settings.setdefault("checkpoint", str(checkpoint))
        settings = json.loads(json.dumps(settings))
        old_fp = (_read_json(manifest_path) or {}).get("fingerprint") if npy.exists() else None
        old_settings = _read_json(parts / "settings.json")
        known = [x.get("checkpoint_key") for x in (old_fp, old_settings) if isinstance(x, dict)]
        ck = None if checkpoint is None else str(checkpoint)
        settings["checkpoint_key"] = _checkpoint_key(ck, known)
        settings["skip_bad"] = skip_bad
        stamps = _stamps(images, len(ids))
        fp = {
            "count": len(ids),
            "ids_sha256": hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest(),
            "inputs_sha256": hashlib.sha256("\n".join(stamps).encode("utf-8")).hexdigest(),
            **settings,
        }
        # What a run killed mid-write left: temporaries as large as the files (the lock is ours).
        for path in (npy, manifest_path):
            remove_stale_temporaries(path)
        remove_stale_temporaries_in(parts)
        if _complete(npy, manifest_path, fp):
            return npy
        if _committed_shards(parts) and not _same(old_settings, settings):
            raise ValueError(
                f"{parts} holds a partial extraction with other images or settings; "
                "delete it or choose another output"
            )
        parts.mkdir(parents=True, exist_ok=True)
        _write_json(parts / "settings.json", settings)
        _run(
            run,
            images,
            ids,
            stamps,
            parts,
            npy,
            fp,
            settings,
            shard_size=shard_size,
            skip_bad=skip_bad,
            progress=progress,
            desc=desc,
        )
        shutil.rmtree(parts, ignore_errors=True)
    return npy


def _run(
    run: Extractor,
    images: Any,
    ids: list[str],
    stamps: list[str],
    parts: Path,
    npy: Path,
    fp: dict[str, Any],
    settings: dict[str, Any],
    *,
    shard_size: int,
    skip_bad: bool,
    progress: bool,
    desc: str,
) -> None:
    """Extract what the shards lack, then write the final pair."""
    shards = _committed_shards(parts)
    have, bad = _shard_contents(shards)
    keys = list(zip(ids, stamps, strict=True))
    todo = [i for i, key in enumerate(keys) if key not in have and key not in bad]
    with eval_mode(run.model):  # the dimension may take a forward pass: in eval mode too
        dim = run.dim()
        done = len(ids) - len(todo)
        with tqdm(total=len(ids), initial=done, desc=desc, unit="img", disable=not progress) as bar:
            _extract_shards(
                run,
                images,
                ids,
                stamps,
                todo,
                parts,
                max(shards, default=-1) + 1,
                dim=dim,
                shard_size=shard_size,
                skip_bad=skip_bad,
                bar=bar,
            )
    if todo:
        have, bad = _shard_contents(_committed_shards(parts))
    sources = [have[key] for key in keys if key in have]
    good = [key[0] for key in keys if key in have]
    skipped = [{"id": key[0], "error": bad[key]} for key in keys if key not in have]
    manifest = {k: v for k, v in settings.items() if k not in ("checkpoint_key", "skip_bad")}
    if skip_bad:
        manifest.update(num_skipped=len(skipped), skipped=skipped)
    if not good:
        raise ValueError(f"no image could be read ({len(skipped)} skipped)")
    write_features(
        npy, _assembled(parts, sources, dim), good, {**manifest, "fingerprint": fp}, dim=dim
    )
