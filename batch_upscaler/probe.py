"""Read an image's format and size from its header only (no pixel decode) and decide if it may be sent.

Pillow's ``Image.open`` is lazy: it parses the header and stops, so probing a 20 MB scan costs a
few kilobytes of I/O. A file whose header already breaks the model's documented limits is never
sent; :func:`admit` says why, with a stable reason code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from batch_upscaler.catalogue import ModelSpec, Rejection, check_image, max_image_bytes

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


def read_header(path: Path) -> ImageHeader:
    """Format, size and mode from the header; raises ProbeError for unreadable files."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return ImageHeader(im.format or "unknown", im.width, im.height, im.mode)
    except Image.DecompressionBombError as exc:
        raise ProbeError(Refusal(Disposition.SKIP, Rejection("decompression_bomb", str(exc)))) from None
    except UnidentifiedImageError:
        raise ProbeError(_fail("unreadable", "not an image Pillow can identify")) from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow raises SyntaxError for some bad headers
        raise ProbeError(_fail("unreadable", str(exc) or type(exc).__name__)) from None


def admit(header: ImageHeader, file_size: int, spec: ModelSpec) -> Refusal | None:
    """Why this image must not be sent to ``spec``'s model, or None when it may be."""
    rejection = check_image(spec.limits, header.width, header.height)
    if rejection is not None:
        return Refusal(Disposition.SKIP, rejection)
    if header.sendable_as_is and file_size > max_image_bytes(spec.limits):
        detail = f"{file_size} bytes encode to more than the {spec.limits.max_body_bytes}-byte request cap"
        return Refusal(Disposition.SKIP, Rejection("body_too_large", detail))
    return None


def _fail(code: str, detail: str) -> Refusal:
    return Refusal(Disposition.FAIL, Rejection(code, detail))
