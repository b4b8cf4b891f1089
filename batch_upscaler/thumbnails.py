"""Report thumbnails: which succeeded items report.html shows, and their small JPEGs, cached.

Its one job is making the before/after pictures cheap run after run. The sample is *stable*: the
items with the smallest hash of their key, so a nightly run that adds a few images to a job of
thousands almost never changes it (a new item enters a 24-item sample of 10,000 with odds of
~0.24%), and every picture already made is read from ``<state_dir>/thumbnails/``. Pictures of
local files are keyed by (path, size, mtime); pictures of S3 objects are made by the pool from the
bytes it already has (the source it read, the image the model returned) and keyed by item, since
the report never downloads a 10 MB output again just to shrink it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import heapq
import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

THUMB_QUALITY = 70
THUMB_PX = 160  # the report's pictures fit this square
SAMPLE_SIZE = 24
# The pool keeps pictures of S3 items whose rank falls in the lowest 8 × SAMPLE_SIZE / population:
# enough that the report's sample is covered even when a quarter of the job has succeeded so far.
KEEP_FACTOR = 8
_RANK_SPACE = 1 << 64
# What a picture is made from: bytes, an output's parts (joined only for a kept picture), or a file.
Picturable = bytes | Sequence[bytes | memoryview] | Path
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def sample_rank(key: str) -> int:
    """A 64-bit rank for an item key, the same on every run and machine (not Python's hash())."""
    raw = key.encode("utf-8", "surrogateescape")  # keys of non-UTF-8 names carry surrogate escapes
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


def worth_keeping(key: str, population: int, size: int = SAMPLE_SIZE) -> bool:
    """Whether an item is likely to be in the sample of a job of ``population`` items."""
    if population <= 0 or KEEP_FACTOR * size >= population:
        return True
    return sample_rank(key) < _RANK_SPACE * KEEP_FACTOR * size // population


class StableSample:
    """The ``size`` offered rows of smallest rank (bottom-k), in discovery (seq) order."""

    def __init__(self, size: int = SAMPLE_SIZE) -> None:
        self.size = max(size, 0)
        self._heap: list[tuple[int, int, dict[str, Any]]] = []  # (-rank, -seq, row): the largest on top

    def offer(self, row: dict[str, Any]) -> None:
        if not self.size:
            return
        entry = (-sample_rank(row["key"]), -row["seq"], row)
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, entry)
        elif entry[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, entry)

    def rows(self) -> list[dict[str, Any]]:
        return sorted((row for _, _, row in self._heap), key=lambda row: row["seq"])


class ThumbnailCache:
    """Small JPEG data URIs on disk; a cache that cannot be written only costs time."""

    def __init__(self, folder: Path, px: int) -> None:
        self.folder = folder
        self.px = px

    def of_file(self, path: Path) -> str | None:
        """The picture of a local file, made once per (path, size, mtime): a ~10 MP PNG output
        costs ~120 ms to decode, and the report is rewritten after every run."""
        try:
            st = path.stat()
        except OSError:
            return None
        # fsencode: a name that is not UTF-8 (surrogate escapes) must hash too
        entry = self._entry(os.fsencode(path) + f"|{st.st_size}|{st.st_mtime_ns}".encode())
        cached = self._read(entry)
        if cached is not None:
            return cached
        with contextlib.suppress(OSError), path.open("rb") as fh:
            return self._store(entry, make_thumbnail(fh, self.px))
        return None

    def of_item(self, key: str, side: str, version: str) -> str | None:
        """The picture :meth:`keep` stored for one side ("before"/"after") of an item."""
        return self._read(self._item_entry(key, side, version))

    def keep(self, key: str, side: str, version: str, image: Picturable) -> None:
        """Make and store the picture of bytes already at hand (``version``: an etag or digest), or
        of a local file about to go (an S3 output's staging file before its upload)."""
        if isinstance(image, Path):
            with contextlib.suppress(OSError), image.open("rb") as fh:
                self._store(self._item_entry(key, side, version), make_thumbnail(fh, self.px))
            return
        data = image if isinstance(image, bytes) else b"".join(image)
        self._store(self._item_entry(key, side, version), make_thumbnail(io.BytesIO(data), self.px))

    def _item_entry(self, key: str, side: str, version: str) -> Path:
        return self._entry(b"item|" + key.encode("utf-8", "surrogateescape") + f"|{side}|{version}".encode())

    def _entry(self, stamp: bytes) -> Path:
        digest = hashlib.sha1(stamp + f"|{self.px}".encode(), usedforsecurity=False).hexdigest()
        return self.folder / f"{digest}.txt"

    @staticmethod
    def _read(entry: Path) -> str | None:
        try:
            return entry.read_text(encoding="ascii")
        except OSError:
            return None

    def _store(self, entry: Path, uri: str | None) -> str | None:
        if uri is not None:
            with contextlib.suppress(OSError):
                self.folder.mkdir(parents=True, exist_ok=True)
                tmp = entry.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(uri, encoding="ascii")
                os.replace(tmp, entry)
        return uri


class PictureKeeper:
    """The pool's part for items the report cannot picture from local files (S3 sources or outputs):
    pictures made from the bytes the run already has, for the items likely to be in the sample."""

    def __init__(self, cache: ThumbnailCache, population: int, remote_source: Callable[[str, str], bool],
                 remote_output: bool) -> None:
        self.cache = cache
        self.population = population
        self._remote_source = remote_source  # (source, relpath) -> the report cannot read it locally
        self._remote_output = remote_output

    def wanted(self, key: str, source: str, relpath: str, side: str) -> bool:
        remote = self._remote_source(source, relpath) if side == "before" else self._remote_output
        return remote and worth_keeping(key, self.population)

    def keep(self, key: str, side: str, version: str, image: Picturable) -> None:
        self.cache.keep(key, side, version, image)


def make_thumbnail(image: BinaryIO, px: int) -> str | None:
    """A JPEG data URI fitting ``px``×``px``, or None when the image cannot be decoded."""
    try:
        with Image.open(image) as im:
            orientation = im.getexif().get(0x0112)
            if im.format == "JPEG":
                im.draft("RGB", (px, px))  # DCT scaling: decode at 1/2..1/8 size
            im.thumbnail((px, px))
            small = _to_rgb(im)
        small = small.transpose(_ORIENTATION[orientation]) if orientation in _ORIENTATION else small
        out = io.BytesIO()
        small.save(out, "JPEG", quality=THUMB_QUALITY, optimize=True)
    except Exception:  # any broken, truncated or exotic file: a placeholder, never an exception
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return im.point(lambda v: v / 256).convert("L").convert("RGB")  # 16-bit: scale, don't clip
    return im.convert("RGB")


def version(row: Mapping[str, Any], side: str) -> str:
    """What identifies one side of an item for :meth:`ThumbnailCache.of_item`: the source's size and
    ETag (or mtime), or the output's digest (or byte count)."""
    if side == "before":
        return f"{row.get('size')}|{row.get('etag') or row.get('mtime_ns')}"
    return str(row.get("output_digest") or row.get("output_bytes"))
