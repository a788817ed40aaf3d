"""How a model ranks a labelled image folder: each image queries all the others.

Over a fixed random subset of an image folder (one sub-folder per class): the AP loss
(``1 - mean AP_Q`` of :class:`~apretrieval.losses.ap.APLoss`) and the exact mAP of the
descriptors, every image ranking the rest. Measured before and after fine-tuning on the
training images, it shows what training did to its own objective (the demo reports it). The AP
loss compares only AP-trained models: a contrastive model squeezes the similarities into a few
histogram bins; its exact mAP is the comparable number.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from apretrieval.binning import DEFAULT_NUM_BINS
from apretrieval.data.lists import image_folder
from apretrieval.losses.ap import APLoss
from apretrieval.losses.exact import average_precision
from apretrieval.pipeline import ExtractionSettings, extract_images

__all__ = ["image_set_ap"]


def image_set_ap(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    max_images: int,
    seed: int,
    max_side: int | None,
    num_bins: int = DEFAULT_NUM_BINS,
) -> dict[str, float]:
    """``{"ap_loss", "mAP"}`` of ``max_images`` images of ``folder`` drawn with ``seed``
    (single scale, longer side ``max_side``, on the CPU)."""
    images = image_folder(folder)
    rng = np.random.default_rng([seed, 11])
    n = min(max_images, len(images))
    chosen = np.sort(rng.choice(len(images), size=n, replace=False))
    paths = [images.paths[i] for i in chosen]
    labels = torch.as_tensor(np.asarray(images.labels)[chosen], dtype=torch.int64)
    settings = ExtractionSettings(
        scales=(1.0,), max_side=max_side, batch_size=16, num_workers=0, device="cpu", progress=False
    )
    d = torch.from_numpy(extract_images(model, paths, [str(p) for p in paths], settings))
    with torch.no_grad():
        loss = float(APLoss(num_bins=num_bins)(d, labels))
    off = ~torch.eye(n, dtype=torch.bool)  # leave each query out of its own ranking
    scores = (d @ d.T)[off].view(n, n - 1)
    relevant = (labels[:, None] == labels[None, :])[off].view(n, n - 1)
    ap = average_precision(scores, relevant)
    return {"ap_loss": loss, "mAP": float(ap[~ap.isnan()].mean())}
