"""Read an image's format and size from its header only (no pixel decode) and decide if it may be sent.

Pillow's ``Image.open`` is lazy: it parses the header and stops, so probing a 20 MB scan costs a
few kilobytes of I/O. A file whose header already breaks the model's documented limits is never
sent; batch_upscaler.fitting decides that from the header read here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from batch_upscaler.catalogue import Rejection
from batch_upscaler.imagecheck import StructureError, check_input

try:  # HEIC/HEIF phone photos, when the optional plugin is installed (pip install 'batch-upscaler[heif]')
    import pillow_heif  # type: ignore[import-not-found,unused-ignore]

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - depends on the environment
    pass

# Pillow format name -> the request format it can be sent as byte-for-byte.
SENDABLE_AS_IS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}


class Disposition(StrEnum):
    """What a rejected file becomes: a model limit is a skip, a broken file is a failure."""

    SKIP = "skipped"
    FAIL = "failed"


@dataclass(frozen=True)
class ImageHeader:
    pil_format: str
    width: int
    height: int
    mode: str
    orientation: int = 1  # EXIF Orientation, 1..8
    has_alpha: bool = False
    is_animated: bool = False

    @property
    def sendable_as_is(self) -> bool:
        return self.pil_format in SENDABLE_AS_IS


@dataclass(frozen=True)
class Refusal:
    disposition: Disposition
    rejection: Rejection


class ProbeError(Exception):
    """The file cannot be read as an image; carries the refusal to record."""

    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal
        super().__init__(str(refusal.rejection))


def read_header(path: Path | BinaryIO) -> ImageHeader:
    """Format, size and mode from the header; raises ProbeError for unreadable files."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return _header(im)
    except Image.DecompressionBombError as exc:
        raise ProbeError(Refusal(Disposition.SKIP, Rejection("decompression_bomb", str(exc)))) from None
    except UnidentifiedImageError:
        raise ProbeError(_fail("unreadable", "not an image Pillow can identify")) from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow raises SyntaxError for some bad headers
        raise ProbeError(_fail("unreadable", str(exc) or type(exc).__name__)) from None


def _header(im: Image.Image) -> ImageHeader:
    """Fields read from the parsed header only (EXIF is in the header for JPEG, PNG, WebP, TIFF)."""
    try:
        orientation = int(im.getexif().get(0x0112, 1))
    except (OSError, ValueError, SyntaxError, TypeError):
        orientation = 1  # unreadable EXIF is not a reason to refuse the picture
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    return ImageHeader(im.format or "unknown", im.width, im.height, im.mode,
                       orientation if 1 <= orientation <= 8 else 1, has_alpha,
                       bool(getattr(im, "is_animated", False)))


def truncation(data: bytes, pil_format: str) -> str | None:
    """Why an encoded file is incomplete, from its structure alone (no decode), or None.

    A byte-for-byte upload of a cut-off file would be paid for and fail (or come back damaged);
    converted formats are caught by the decode instead. The check is imagecheck's lenient one, the
    same that ``imagecheck.check_file`` runs on a file with bounded I/O, so both refuse the same files.
    """
    if pil_format not in SENDABLE_AS_IS:
        return None
    try:
        check_input(data)
    except StructureError as exc:
        return str(exc)
    return None


def _fail(code: str, detail: str) -> Refusal:
    return Refusal(Disposition.FAIL, Rejection(code, detail))
