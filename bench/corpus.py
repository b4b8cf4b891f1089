"""Generates (and caches) the input images benchmarks send: distinct small PNGs, photo-like JPEGs, tiny files.

A corpus directory holds a ``.complete`` marker with its recipe; it is reused when the marker
matches and rebuilt from scratch otherwise, so an interrupted generation is never half-reused.
"""

from __future__ import annotations

import io
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageFilter

_MARKER = ".complete"
_PER_DIR = 1000  # files per sub-directory for big corpora


def _cached(directory: Path, recipe: str, build: Callable[[Path], None]) -> Path:
    marker = directory / _MARKER
    if marker.exists() and marker.read_text(encoding="utf-8") == recipe:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    build(directory)
    marker.write_text(recipe, encoding="utf-8")
    return directory


def solid_png(index: int, size: int) -> bytes:
    """A ``size``-square PNG whose colour encodes ``index`` (distinct for index < 2**24)."""
    colour = (index & 0xFF, (index >> 8) & 0xFF, (index >> 16) & 0xFF)
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, "PNG", compress_level=1)
    return out.getvalue()


def distinct_pngs(directory: Path, count: int, size: int = 64) -> Path:
    """``count`` distinct solid-colour PNGs (so the runner's dedup never merges two of them)."""
    def build(root: Path) -> None:
        for i in range(count):
            (root / f"img{i:06d}.png").write_bytes(solid_png(i, size))
    return _cached(directory, f"distinct_pngs {count} {size}", build)


def tiny_tree(directory: Path, count: int, size: int = 64) -> Path:
    """``count`` distinct tiny PNGs in sub-directories of 1,000 (a big archive's shape)."""
    def build(root: Path) -> None:
        for first in range(0, count, _PER_DIR):
            folder = root / f"d{first // _PER_DIR:04d}"
            folder.mkdir()
            for i in range(first, min(count, first + _PER_DIR)):
                (folder / f"f{i:06d}.png").write_bytes(solid_png(i, size))
    return _cached(directory, f"tiny_tree {count} {size}", build)


def photo_jpeg(seed: int, size: int = 1024, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth random colour fields, edges and fine grain (not a solid colour)."""
    rng = random.Random(seed)
    coarse = Image.frombytes("RGB", (12, 12), rng.randbytes(12 * 12 * 3))
    picture = coarse.resize((size, size), Image.Resampling.BICUBIC)
    detail = Image.frombytes("RGB", (size // 8, size // 8), rng.randbytes((size // 8) ** 2 * 3))
    detail = detail.resize((size, size), Image.Resampling.BILINEAR).filter(ImageFilter.EDGE_ENHANCE_MORE)
    picture = Image.blend(picture, detail, 0.25)
    grain = Image.effect_noise((size, size), 12).convert("RGB")
    picture = Image.blend(picture, grain, 0.12)
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=quality)
    return out.getvalue()


def photo_jpegs(directory: Path, count: int, size: int = 1024) -> Path:
    """``count`` distinct photo-like ``size``-square JPEGs (about 1 MP at the default size)."""
    def build(root: Path) -> None:
        for i in range(count):
            (root / f"photo{i:04d}.jpg").write_bytes(photo_jpeg(i, size))
    return _cached(directory, f"photo_jpegs {count} {size}", build)
