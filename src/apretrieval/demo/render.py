"""Render one photograph of a landmark: camera footprint, perspective, photometry, occluders.

Geometry lives in *canonical* coordinates: pixels of the landmark's source photograph (for the
stereo pair, the left image). A view is fully described by the homography ``H`` mapping
canonical points to output pixels, the output rectangle the landmark occupies (``placement``;
smaller than the image for far-away views) and an occlusion mask, which is all that is
needed to say how much of a query region a view shows.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Rendering happens at this multiple of the output size, then a Lanczos downsample: the
# perspective warp itself does no prefiltering, so this keeps views free of aliasing.
_SUPERSAMPLE = 2


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(3, 3) projective map taking the 4 points ``src`` (4, 2) onto ``dst`` (4, 2)."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for i, ((x, y), (u, v)) in enumerate(zip(src, dst, strict=True)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * i], b[2 * i + 1] = u, v
    h = np.linalg.solve(a, b)
    return np.append(h, 1.0).reshape(3, 3)


def apply_h(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points (N, 2) through homography ``h``; points behind the camera map to inf."""
    p = np.c_[points, np.ones(len(points))] @ h.T
    w = p[:, 2:3]
    with np.errstate(divide="ignore", invalid="ignore"):
        out: np.ndarray = p[:, :2] / w
    out[(w[:, 0] <= 1e-9)] = np.inf
    return out


def rect_corners(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """(4, 2) corners TL, TR, BR, BL of an axis-aligned rectangle."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def fit_quad(quad: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Shrink (about its centre) then shift ``quad`` (4, 2) so it lies inside ``box``."""
    x0, y0, x1, y1 = box
    lo, hi = quad.min(0), quad.max(0)
    centre = (lo + hi) / 2
    scale = min(1.0, (x1 - x0) / max(hi[0] - lo[0], 1e-9), (y1 - y0) / max(hi[1] - lo[1], 1e-9))
    quad = centre + (quad - centre) * scale
    lo, hi = quad.min(0), quad.max(0)
    shift = np.maximum(0.0, [x0, y0] - lo) - np.maximum(0.0, hi - [x1, y1])
    fitted: np.ndarray = quad + shift
    return fitted


@dataclass(frozen=True)
class Camera:
    """Where a view looks: the canonical footprint quad of the landmark area it shows."""

    quad: np.ndarray  # (4, 2) canonical points seen at the placement's TL, TR, BR, BL
    out_size: tuple[int, int]  # (width, height) of the output image
    placement: tuple[int, int, int, int]  # output rectangle holding the landmark (x0, y0, x1, y1)

    @property
    def h(self) -> np.ndarray:
        """Canonical -> output homography."""
        return homography(self.quad, rect_corners(*self.placement))


def sample_camera(
    rng: np.random.Generator,
    core: tuple[float, float, float, float],
    cell: tuple[float, float, float, float],
    out_size: tuple[int, int],
    difficulty: float,
    *,
    scale_range: tuple[float, float] | None = None,
    far_prob: float = 0.4,
) -> Camera:
    """A random viewpoint on the landmark whose extent is ``core``, never leaving ``cell``.

    Harder views (``difficulty`` in [0, 1]) crop tighter or zoom out, shift off-centre, roll
    and tilt more. The footprint always stays inside ``cell`` so views of different landmarks
    never share pixels.
    """
    cx0, cy0, cx1, cy1 = core
    cw, ch = cx1 - cx0, cy1 - cy0
    w, h = out_size
    d = float(np.clip(difficulty, 0.0, 1.0))
    # Scale: fraction of the core's size the footprint covers (< 1 partial crop, > 1 context).
    lo, hi = scale_range if scale_range is not None else (1.0 - 0.65 * d, 1.0 + 0.35)
    s = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    area = s * s * cw * ch
    fw, fh = np.sqrt(area * w / h), np.sqrt(area * h / w)
    centre = np.array([(cx0 + cx1) / 2, (cy0 + cy1) / 2])
    centre = centre + rng.uniform(-1, 1, 2) * (0.08 + 0.25 * d) * np.array([cw, ch])
    quad = rect_corners(-fw / 2, -fh / 2, fw / 2, fh / 2)
    # Perspective tilt: one side of the footprint seen from further away looks shorter, i.e.
    # the output's side maps onto a longer source segment; narrowing the opposite side of the
    # footprint gives the same keystone effect while staying inside the cell.
    tilt = rng.uniform(0.0, 0.5 * d)
    side = int(rng.integers(4))
    pairs = ((0, 1), (1, 2), (2, 3), (3, 0))  # top, right, bottom, left
    i, j = pairs[side]
    mid = (quad[i] + quad[j]) / 2
    quad[i] += (mid - quad[i]) * tilt
    quad[j] += (mid - quad[j]) * tilt
    quad += rng.uniform(-1, 1, (4, 2)) * 0.04 * d * np.array([fw, fh])
    # In-plane roll.
    angle = np.deg2rad(np.clip(rng.normal(0.0, 1.0), -2.0, 2.0) * 25.0 * d)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    quad = quad @ rot.T + centre
    quad = fit_quad(quad, cell)
    placement = (0, 0, w, h)
    if rng.uniform() < far_prob * d:
        # Far-away view: the landmark fills only part of the frame, clutter around it.
        f = rng.uniform(0.45, 0.8)
        pw, ph = round(w * f), round(h * f)
        px, py = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))
        placement = (px, py, px + pw, py + ph)
    return Camera(quad=quad, out_size=(w, h), placement=placement)


def warp(
    photo: Image.Image,
    quad: np.ndarray,
    size: tuple[int, int],
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> Image.Image:
    """Resample the area of ``photo`` under ``quad`` (4, 2) into an image of ``size``.

    Bilinear is enough: views are rendered supersampled and then Lanczos-downsampled.
    """
    w, h = size
    inv = homography(rect_corners(0, 0, w, h), quad)  # output -> photo, as PIL expects
    inv = inv / inv[2, 2]
    return photo.transform((w, h), Image.Transform.PERSPECTIVE, tuple(inv.ravel()[:8]), resample)


def _clutter_patch(
    rng: np.random.Generator, clutter: list[Image.Image], size: tuple[int, int]
) -> Image.Image:
    """A random patch of a clutter photo (textures) of ``size``, rotated and tinted."""
    photo = clutter[int(rng.integers(len(clutter)))]
    pw, ph = photo.size
    s = rng.uniform(0.3, 0.9) * min(pw, ph)
    x0, y0 = rng.uniform(0, pw - s), rng.uniform(0, ph - s)
    quad = rect_corners(x0, y0, x0 + s, y0 + s)
    centre = quad.mean(0)
    a = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    quad = fit_quad((quad - centre) @ rot.T + centre, (0, 0, pw, ph))
    # Rendered at half size: backgrounds and occluders need no fine detail.
    half = (max(1, size[0] // 2), max(1, size[1] // 2))
    patch = np.asarray(warp(photo, quad, half), dtype=np.float32)
    tint = rng.uniform(0.4, 1.2, 3).astype(np.float32)
    patch_img = Image.fromarray(np.clip(patch * tint, 0, 255).astype(np.uint8))
    return patch_img.resize(size, Image.Resampling.BILINEAR)


def render(
    rng: np.random.Generator,
    photo: Image.Image,
    quad_in_photo: np.ndarray,
    camera: Camera,
    clutter: list[Image.Image],
    difficulty: float,
    *,
    occlusion: bool = True,
) -> tuple[Image.Image, np.ndarray]:
    """Render a view; returns the RGB image and its (H, W) bool occlusion mask.

    ``quad_in_photo`` is the camera footprint in the pixels of ``photo`` (equal to
    ``camera.quad`` except for the second stereo view).
    """
    d = float(np.clip(difficulty, 0.0, 1.0))
    w, h = camera.out_size
    sw, sh = w * _SUPERSAMPLE, h * _SUPERSAMPLE
    x0, y0, x1, y1 = (v * _SUPERSAMPLE for v in camera.placement)
    landmark = warp(photo, quad_in_photo, (x1 - x0, y1 - y0))
    if (x1 - x0, y1 - y0) != (sw, sh):
        canvas = _clutter_patch(rng, clutter, (sw, sh))
        canvas.paste(landmark, (x0, y0))
    else:
        canvas = landmark
    mask = Image.new("L", (sw, sh), 0)
    if occlusion and rng.uniform() < 0.85 * d:
        target = rng.uniform(0.05, 0.45) * d * sw * sh  # occluded area, in pixels
        draw = ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(1, 4))):
            a = target / 2
            aspect = float(np.exp(rng.uniform(-1.2, 1.2)))  # poles, people, trees, cars
            ow = int(np.clip(np.sqrt(a * aspect), 4, sw))
            oh = int(np.clip(np.sqrt(a / aspect), 4, sh))
            ox, oy = int(rng.integers(-ow // 3, sw - ow // 2)), int(rng.integers(0, sh - oh // 2))
            shape = draw.ellipse if rng.uniform() < 0.5 else draw.rectangle
            shape([ox, oy, ox + ow, oy + oh], fill=255)
        canvas = Image.composite(_clutter_patch(rng, clutter, (sw, sh)), canvas, mask)
    small = canvas.resize((w, h), Image.Resampling.LANCZOS)
    out = Image.fromarray(_photometric(rng, np.asarray(small, dtype=np.float32) / 255.0, d))
    blur = rng.uniform(0.0, 1.6 * d) if rng.uniform() < 0.6 else 0.0
    if blur > 0.15:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    occluded = np.asarray(mask.resize((w, h), Image.Resampling.BILINEAR)) >= 128
    return out, occluded


def _photometric(rng: np.random.Generator, img: np.ndarray, d: float) -> np.ndarray:
    """Illumination and colour changes on a float (H, W, 3) image in [0, 1] -> uint8."""
    img = img ** float(np.exp(rng.uniform(-0.5, 0.5) * d))  # gamma
    img = img * np.exp(rng.normal(0.0, 0.15 * d, 3)).astype(np.float32)  # white balance
    grey = img.mean(axis=2, keepdims=True)
    if rng.uniform() < 0.15 * d:
        img = np.repeat(grey, 3, axis=2)  # black-and-white photograph
    else:
        img = grey + (img - grey) * float(np.exp(rng.uniform(-0.8, 0.4) * d))  # saturation
    mean = float(img.mean())
    img = mean + (img - mean) * float(np.exp(rng.uniform(-0.5, 0.3) * d))  # contrast
    img = img * float(np.exp(rng.uniform(-0.8, 0.35) * d))  # exposure, mostly darker
    if rng.uniform() < 0.15 * d:  # dusk: dark and blue
        img = img * np.array([0.35, 0.4, 0.6], dtype=np.float32)
    img = img + rng.normal(0.0, 0.015 * d, img.shape).astype(np.float32)  # sensor noise
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    """Encode as baseline JPEG (deterministic for a given libjpeg)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def visible_fraction(
    points: np.ndarray, h: np.ndarray, placement: tuple[int, int, int, int], occluded: np.ndarray
) -> float:
    """Fraction of canonical ``points`` (N, 2) the view shows (inside its placement, unoccluded)."""
    uv = apply_h(h, points)
    x0, y0, x1, y1 = placement
    inside = (uv[:, 0] >= x0) & (uv[:, 0] < x1) & (uv[:, 1] >= y0) & (uv[:, 1] < y1)
    if not inside.any():
        return 0.0
    rows, cols = occluded.shape
    iu = np.clip(uv[inside, 0].astype(int), 0, cols - 1)
    iv = np.clip(uv[inside, 1].astype(int), 0, rows - 1)
    inside[np.flatnonzero(inside)] = ~occluded[iv, iu]
    return float(inside.mean())
