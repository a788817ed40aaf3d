"""What the demo benchmark generator makes: its settings, named sizes and random streams.

Every field of :class:`BenchmarkConfig` is part of the cache key, and every random draw of the
generator comes from a stream named by the seed and the image's role and position
(:meth:`BenchmarkConfig.rng`), so the same config always gives the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

# Bump when the generator's output changes for a given config, so caches are rebuilt.
GENERATOR_VERSION = 2
DATASET_NAME = "demo"


@dataclass(frozen=True)
class BenchmarkConfig:
    """How the benchmark is generated (every field is part of the cache key)."""

    seed: int = 0
    image_size: int = 128  # long side of test images, px
    train_image_size: int = 128  # side of the (square) training images, px
    cell_size: int = 160  # target landmark cell size in source-photo pixels
    core_fraction: float = 0.7  # landmark core = this central fraction of its cell (per side)
    max_landmarks_per_photo: int = 10
    test_fraction: float = 0.4  # share of each photo's landmarks held out for testing
    query_landmark_fraction: float = 0.75  # test landmarks with queries; the rest distract
    queries_per_landmark: int = 2
    db_views_per_landmark: int = 10  # database views of each test landmark
    clutter_images: int = 30  # database images of clutter photos (no landmark)
    train_views_per_landmark: int = 24
    photos: tuple[str, ...] | None = None  # restrict source photos (None: all that load)

    def __post_init__(self) -> None:
        for name in ("image_size", "train_image_size", "cell_size"):
            if getattr(self, name) < 16:
                raise ValueError(f"{name} must be >= 16, got {getattr(self, name)}")
        for name in ("core_fraction", "test_fraction", "query_landmark_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("queries_per_landmark", "db_views_per_landmark", "train_views_per_landmark"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def preset(cls, size: str = "default", seed: int = 0) -> BenchmarkConfig:
        """A named benchmark size from the same generator (see ``BENCHMARK_SIZES``).

        ``"default"`` is the demo's benchmark (54 queries, 345 database images at seed 0);
        ``"large"`` cuts the same photos into smaller and more landmarks (254 instead of 90 at
        seed 0) with more queries and views each: 228 queries, 2236 database images and 2432
        training images at seed 0, for studies the default one is too small to resolve.
        """
        if size not in BENCHMARK_SIZES:
            raise ValueError(f"benchmark size must be one of {BENCHMARK_SIZES}, got {size!r}")
        return cls(seed=seed, **BENCHMARK_SIZES[size])

    def rng(self, *stream: int) -> np.random.Generator:
        """Independent stream per image, so one image never depends on how many came before."""
        return np.random.default_rng([self.seed, *stream])

    def key(self) -> str:
        """Short hash identifying the generated files."""
        blob = json.dumps([GENERATOR_VERSION, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Named sizes: overrides of the BenchmarkConfig defaults ("default" changes nothing).
BENCHMARK_SIZES: dict[str, dict[str, Any]] = {
    "default": {},
    "large": {
        "cell_size": 112,
        "max_landmarks_per_photo": 40,
        "queries_per_landmark": 3,
        "db_views_per_landmark": 24,
        "clutter_images": 100,
        "train_views_per_landmark": 16,
    },
}
