"""The report's images: thumbnails of queries (cropped to their box) and results, written
once each under ``thumbs/`` or inlined in the page as data URIs."""

from __future__ import annotations

import base64
import io
import os
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from apretrieval.atomic import atomic_open
from apretrieval.data.decode import crop_box, decode_rgb

__all__ = ["THUMBS_DIR", "Thumbnails", "file_src"]

THUMBS_DIR = "thumbs"


def _placeholder(text: str, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size * 3 // 4), "#eeeeee")
    ImageDraw.Draw(img).text((8, 8), text, fill="#555555")
    return img


def _thumbnail(path: Path, bbx: Sequence[float] | None, size: int) -> tuple[bytes, bool]:
    """JPEG bytes of the image (cropped to ``bbx``), longest side ``size``; ``False`` when the
    file could not be read (a placeholder is returned instead, the page still renders)."""
    ok = True
    try:
        with Image.open(path) as im:
            img = decode_rgb(im)
        if bbx is not None:
            img = img.crop(crop_box(bbx, img.size))
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
    except (OSError, ValueError):
        img, ok = _placeholder(f"missing:\n{path.name}", size), False
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), ok


class Thumbnails:
    """Writes each thumbnail once (``out_dir/thumbs/``) or inlines it; :meth:`src` returns the
    ``src`` for the page. ``missing`` lists the images that could not be read."""

    def __init__(self, out_dir: Path, size: int, embed: bool) -> None:
        self.out_dir, self.size, self.embed = out_dir, size, embed
        self.cache: dict[tuple[str, str], str] = {}
        self.missing: list[str] = []

    def src(self, key: str, path: Path, bbx: Sequence[float] | None = None) -> str:
        cache_key = (key, str(path))
        if cache_key not in self.cache:
            data, ok = _thumbnail(path, bbx, self.size)
            if not ok:
                self.missing.append(str(path))
            if self.embed:
                src = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
            else:
                name = f"{THUMBS_DIR}/{key}.jpg"
                with atomic_open(self.out_dir / name, "wb") as f:
                    f.write(data)
                src = name
            self.cache[cache_key] = src
        return self.cache[cache_key]

    def href(self, path: Path) -> str:
        """Link to the full image behind a thumbnail: relative to the page, so the report
        folder and the images can move together; an absolute ``file:`` URI for a self-contained
        (embedded) page, which is often moved alone."""
        full = Path(os.path.abspath(path))
        if self.embed:
            return full.as_uri()
        try:
            rel = os.path.relpath(full, os.path.abspath(self.out_dir))
        except ValueError:  # another drive (Windows)
            return full.as_uri()
        return urllib.parse.quote(Path(rel).as_posix())


def file_src(path: Path, embed: bool) -> str:
    """``src`` of a PNG written beside the page: its name, or a data URI with ``embed``."""
    if embed:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return path.name
