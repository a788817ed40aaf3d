"""Real photographs shipped inside installed packages (scikit-image, matplotlib), with credits.

Every loader reads a file that is part of the package's own distribution, so nothing is ever
downloaded. Photographs are returned as ``(H, W, 3)`` uint8 RGB arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Roles: "landmark" photos are cut into landmark regions; "clutter" photos (textures, scanned
# text) are never landmarks, they provide distractor images, backgrounds and occluders.
LANDMARK = "landmark"
CLUTTER = "clutter"
# The right image of the stereo pair: a real second viewpoint of the left image's landmarks.
SECOND_VIEW = "second view"


@dataclass(frozen=True)
class SourcePhoto:
    """One bundled photograph: where it comes from and how it may be used."""

    key: str
    package: str
    title: str
    credit: str
    licence: str
    role: str


def _rgb(image: np.ndarray) -> np.ndarray:
    """Grey or RGBA -> (H, W, 3) uint8 RGB."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return _rgb(getattr(skimage.data, name)())

    return load


def _motorcycle(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return _rgb(skimage.data.stereo_motorcycle()[index])

    return load


def _grace_hopper() -> np.ndarray:
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        return _rgb(np.asarray(im.convert("RGB")))


_CC0 = "CC0 1.0 (public domain dedication)"
_PD = "public domain / no known copyright restrictions"
_MIDDLEBURY = "redistributed by scikit-image; cite Scharstein et al., GCPR 2014"

CATALOGUE: tuple[SourcePhoto, ...] = (
    SourcePhoto(
        "astronaut",
        "scikit-image",
        "Astronaut Eileen Collins",
        "NASA Great Images database",
        _PD,
        LANDMARK,
    ),
    SourcePhoto(
        "coffee",
        "scikit-image",
        "Coffee cup",
        "Rachel Michetti, courtesy of Pikolo Espresso Bar",
        _CC0,
        LANDMARK,
    ),
    SourcePhoto(
        "chelsea", "scikit-image", "Chelsea the cat", "Stefan van der Walt", _CC0, LANDMARK
    ),
    SourcePhoto(
        "rocket",
        "scikit-image",
        "Launch of DSCOVR on Falcon 9",
        "SpaceX",
        "public domain (released by SpaceX)",
        LANDMARK,
    ),
    SourcePhoto(
        "hubble_deep_field",
        "scikit-image",
        "Hubble eXtreme Deep Field",
        "NASA / HubbleSite",
        "public domain (NASA media guidelines)",
        LANDMARK,
    ),
    SourcePhoto(
        "retina",
        "scikit-image",
        "Fundus photograph of a normal left eye",
        "Mikael Häggström, via Wikimedia Commons",
        _CC0,
        LANDMARK,
    ),
    SourcePhoto(
        "motorcycle_left",
        "scikit-image",
        "Motorcycle, left view (stereo pair)",
        "Middlebury 2014 stereo benchmark (Scharstein et al.)",
        _MIDDLEBURY,
        LANDMARK,
    ),
    SourcePhoto("camera", "scikit-image", "Cameraman", "Lav Varshney", _CC0, LANDMARK),
    SourcePhoto(
        "coins",
        "scikit-image",
        "Greek coins from Pompeii",
        "Brooklyn Museum Collection",
        _PD,
        LANDMARK,
    ),
    SourcePhoto(
        "immunohistochemistry",
        "scikit-image",
        "Immunohistochemical staining",
        "Center for Microscopy And Molecular Imaging (CMMI)",
        _PD,
        LANDMARK,
    ),
    SourcePhoto(
        "clock",
        "scikit-image",
        "Motion-blurred wall clock",
        "Stefan van der Walt",
        "public domain (released by the photographer)",
        LANDMARK,
    ),
    SourcePhoto(
        "grace_hopper",
        "matplotlib",
        "Grace Hopper",
        "U.S. Navy official photograph",
        "public domain (work of the U.S. federal government)",
        LANDMARK,
    ),
    SourcePhoto(
        "motorcycle_right",
        "scikit-image",
        "Motorcycle, right view (stereo pair)",
        "Middlebury 2014 stereo benchmark (Scharstein et al.)",
        _MIDDLEBURY,
        SECOND_VIEW,
    ),
    SourcePhoto("brick", "scikit-image", "Brick wall", "CC0Textures (Bricks25)", _CC0, CLUTTER),
    SourcePhoto("grass", "scikit-image", "Grass", "linolafett on DeviantArt", _CC0, CLUTTER),
    SourcePhoto("gravel", "scikit-image", "Gravel", "CC0Textures (Gravel04)", _CC0, CLUTTER),
    SourcePhoto(
        "text", "scikit-image", "Corner test text", "Wikipedia (File:Corner.png)", _PD, CLUTTER
    ),
)

_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "motorcycle_left": _motorcycle(0),
    "motorcycle_right": _motorcycle(1),
    "grace_hopper": _grace_hopper,
}


def load_photo(key: str) -> np.ndarray:
    """Load one catalogue photograph as (H, W, 3) uint8 RGB."""
    if key not in {p.key for p in CATALOGUE}:
        raise ValueError(f"unknown source photo {key!r}")
    return _LOADERS.get(key, _skimage(key))()


def motorcycle_disparity() -> np.ndarray:
    """(H, W) float32 disparity of the stereo pair: x_right = x_left - d (inf where unknown)."""
    import skimage.data

    return np.asarray(skimage.data.stereo_motorcycle()[2], dtype=np.float32)


def available_photos(keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Load every catalogue photo that loads offline here; skip (never download) the others."""
    photos: dict[str, np.ndarray] = {}
    for photo in CATALOGUE:
        if keys is not None and photo.key not in keys:
            continue
        try:
            photos[photo.key] = load_photo(photo.key)
        except (ImportError, OSError, ValueError):  # package or file missing: skip, never fetch
            continue
    return photos


def credits_markdown(keys: set[str] | None = None) -> str:
    """Markdown table crediting the photographs (all, or only ``keys``)."""
    lines = [
        "| photo | package | title | credit | licence | used as |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in CATALOGUE:
        if keys is None or p.key in keys:
            lines.append(
                f"| `{p.key}` | {p.package} | {p.title} | {p.credit} | {p.licence} | {p.role} |"
            )
    return "\n".join(lines) + "\n"
