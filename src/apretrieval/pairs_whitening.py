"""Checkpoint + matching pairs -> the learned whitening: the route behind ``apretrieval whiten``.

The pairs are SfM-120k's (``retrieval-SfM-120k-whiten.pkl``: ``cids``, ``qidxs``, ``pidxs``;
read by :mod:`apretrieval.data.sfm120k`). The images that take part in a pair are described
with the checkpoint (or their descriptors are read from a descriptor file, matched by id), and
:func:`apretrieval.postprocess.learn_pairs_whitening` learns the whitening from them; it is
written in the PCA whitening's ``.npz`` form, for ``evaluate --whiten FILE``.

Example:
    >>> w = whitening_from_pairs("model.pt", "data/sfm120k/retrieval-SfM-120k-whiten.pkl",
    ...                          ExtractionSettings(), out="whiten.npz")   # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torch import nn

from apretrieval.atomic import check_writable
from apretrieval.benchmark_results import rows_in_order
from apretrieval.data.sfm120k import IMAGES_FOLDER, cid_path, load_whiten_pairs
from apretrieval.descriptors import load_features
from apretrieval.pipeline import ExtractionSettings, extract_images, load_checkpoint_model
from apretrieval.postprocess import Whitening, learn_pairs_whitening, save_whitening

__all__ = ["whitening_from_pairs"]


def whitening_from_pairs(
    checkpoint: str | os.PathLike[str] | nn.Module | None,
    pairs: str | os.PathLike[str],
    settings: ExtractionSettings | None = None,
    *,
    descriptors: str | os.PathLike[str] | None = None,
    image_root: str | os.PathLike[str] | None = None,
    dim: int | None = None,
    features: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Whitening:
    """Learn the whitening of ``pairs`` from the descriptors of its images.

    The descriptors come from ``checkpoint`` (a file or a model; images under ``image_root``,
    default ``ims/`` beside the pairs file; with ``features`` through the resumable descriptor
    file ``FEATURES.npy``), or from the descriptor file ``descriptors`` whose ids name the
    images (matched exactly or by file name). ``dim``: output dimension (default min(P-1, D)).
    With ``out`` the whitening is written there (its folder checked before any work).
    """
    if (checkpoint is None) == (descriptors is None):
        raise ValueError("give either a checkpoint or a descriptor file, not both or neither")
    if out is not None:
        check_writable(out, "the whitening")
    pairs = Path(pairs)
    if not pairs.is_file():
        raise ValueError(f"pairs file not found: {pairs}")
    matching = load_whiten_pairs(pairs)
    used = np.unique(np.concatenate([matching.qidxs, matching.pidxs]))
    names = [matching.cids[i] for i in used]
    if descriptors is not None:
        x = rows_in_order(load_features(descriptors), names, "pair")
    else:
        root = Path(image_root) if image_root is not None else pairs.parent / IMAGES_FOLDER
        paths = [cid_path(root, c) for c in names]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise ValueError(
                f"{len(missing)} of the {len(paths)} pair images are missing, e.g. {missing[0]} "
                f"(run `apretrieval download sfm120k --root {pairs.parent}`)"
            )
        settings = settings or ExtractionSettings()
        if isinstance(checkpoint, nn.Module):
            model, path = checkpoint, None
        else:
            assert checkpoint is not None
            model, path = load_checkpoint_model(checkpoint, settings.device), checkpoint
        x = extract_images(
            model,
            paths,
            names,
            settings,
            out=features,
            checkpoint=path,
            desc="pair images",
            meta={"pairs": str(pairs.resolve())},
        )
    row = np.full(len(matching.cids), -1, dtype=np.int64)
    row[used] = np.arange(used.size)
    whitening = learn_pairs_whitening(
        np.asarray(x, dtype=np.float32), row[matching.qidxs], row[matching.pidxs], dim=dim
    )
    if out is not None:
        save_whitening(out, whitening)
    return whitening
