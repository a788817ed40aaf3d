"""Extraction throughput (JPEG files -> multi-scale descriptors, decoding in DataLoader workers)
vs the bare model on the same images already decoded in memory, same batches, same run.

    python benchmarks/bench_extract.py [--model resnet18] [--images 16] [--max-side 512]
                                       [--workers 2] [--batch-size 4] [--repeats 3]

The bare number is the floor any pipeline can reach: the multi-scale forward passes alone
(``multiscale_descriptors`` on pre-loaded, same-size batches). Runs alternate (bare, pipeline,
bare, ...) and the best of each is kept, so load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apretrieval.extraction.images import ImageFiles
from apretrieval.extraction.loop import extract_descriptors
from apretrieval.extraction.multiscale import multiscale_descriptors
from apretrieval.extraction.settings import DEFAULT_SCALES


def make_jpegs(folder: Path, count: int, rng: np.random.Generator) -> list[Path]:
    """Photo-like JPEGs (smooth structure + fine noise), 1024x768 landscape / portrait."""
    paths = []
    for i in range(count):
        w, h = (1024, 768) if i % 3 else (768, 1024)
        coarse = rng.random((h // 32, w // 32, 3)) * 255
        img = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
        p = folder / f"img_{i:04d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def build(name: str) -> torch.nn.Module:
    from apretrieval.models import build_model

    return build_model(name).eval()  # random init: the cost, not the weights, matters here


def bare_batches(ds: ImageFiles, batch_size: int) -> tuple[list[torch.Tensor], list[int]]:
    """The pipeline's batches (sorted by size, split by size), decoded once, kept in memory."""
    imgs = [ds[i] for i in range(len(ds))]
    order = sorted(range(len(imgs)), key=lambda i: (tuple(imgs[i].shape), i))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) == batch_size or imgs[cur[0]].shape != imgs[i].shape):
            batches.append(torch.stack([imgs[j] for j in cur]))
            cur = []
        cur.append(i)
    batches.append(torch.stack([imgs[j] for j in cur]))
    return batches, order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = build(args.model)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images, rng)
        ds = ImageFiles(paths, max_side=args.max_side)
        batches, order = bare_batches(ds, args.batch_size)
        p = float(model.gem_p)

        def bare() -> np.ndarray:
            with torch.no_grad():
                return torch.cat(
                    [multiscale_descriptors(model, b, DEFAULT_SCALES, p) for b in batches]
                ).numpy()

        def pipeline() -> np.ndarray:
            return extract_descriptors(
                model, ds, batch_size=args.batch_size, num_workers=args.workers, progress=False
            )

        bare()  # warm-up (allocator, kernels)
        t_bare, t_pipe = [], []
        for _ in range(args.repeats):
            for fn, acc in ((bare, t_bare), (pipeline, t_pipe)):
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
        check = pipeline()
        ref = bare()
    # Same descriptors (the bare rows follow the size-sorted order).
    same = np.allclose(check[order], ref, atol=1e-5)
    tb, tp = min(t_bare), min(t_pipe)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} (2 threads); model {args.model} (random init), "
        f"{args.images} JPEGs 1024x768 -> max side {args.max_side}, scales 1, 0.707, 0.5, "
        f"batch {args.batch_size}, {args.workers} workers; best of {args.repeats}\n"
    )
    print("| method | time (s) | images/s | vs bare |")
    print("|---|---:|---:|---:|")
    print(
        f"| bare multi-scale forward (decoded in memory) | {tb:.2f} | {args.images / tb:.2f} "
        f"| 1.00 |"
    )
    print(
        f"| extract_descriptors (files, workers) | {tp:.2f} | {args.images / tp:.2f} "
        f"| {tp / tb:.2f} |"
    )
    print(f"\nsame descriptors: {same}; overhead {100 * (tp / tb - 1):+.1f}%")


if __name__ == "__main__":
    main()
