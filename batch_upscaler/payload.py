"""Turn a source file into the InvokeModel request body (base64 image inside JSON).

JPEG, PNG and WebP files are sent byte-for-byte (no re-encode: faithful and cheap); other formats
Pillow reads (TIFF, BMP, GIF, ...) are converted to PNG. The body is assembled around the base64
text instead of passing a multi-megabyte string through ``json.dumps``, which would scan it for
characters to escape (base64 has none).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pybase64
from PIL import Image, ImageOps

from batch_upscaler.catalogue import MAX_BODY_BYTES


class PayloadError(Exception):
    """The file cannot be turned into a request; ``code`` is the recorded reason."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"{code}: {message}")


@dataclass(frozen=True)
class Payload:
    body: bytes
    content_sha256: str  # of the source file's bytes, as read for sending
    sent_format: str


def build_body(image: bytes, params: Mapping[str, Any]) -> bytes:
    """``{"image": "<base64>", **params}`` as compact JSON bytes."""
    rest = json.dumps(dict(params), separators=(",", ":"))
    tail = b"}" if rest == "{}" else b"," + rest[1:].encode()
    return b'{"image":"' + pybase64.b64encode(image) + b'"' + tail


def to_png(data: bytes) -> bytes:
    """Decode any Pillow-readable image (first frame) and encode it losslessly as PNG."""
    with Image.open(io.BytesIO(data)) as im:
        im.seek(0)
        frame = ImageOps.exif_transpose(im) or im
        has_alpha = frame.mode in ("RGBA", "LA", "PA") or "transparency" in frame.info
        converted = frame.convert("RGBA" if has_alpha else "RGB")
        out = io.BytesIO()
        converted.save(out, format="PNG", compress_level=1)
        return out.getvalue()


def prepare(path: Path, expected_size: int, sendable_as_is: bool, params: Mapping[str, Any]) -> Payload:
    """Read ``path`` and build its request body; raises PayloadError with a reason code."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PayloadError("source_unreadable", f"{exc.strerror or exc}") from None
    if len(data) != expected_size:
        raise PayloadError("source_changed", "the file changed after it was scanned; the next run redoes it")
    digest = hashlib.sha256(data).hexdigest()
    image = data
    if not sendable_as_is:
        try:
            image = to_png(data)
        except (OSError, ValueError, SyntaxError) as exc:
            raise PayloadError("unreadable", f"cannot convert to PNG: {exc}") from None
    body = build_body(image, params)
    if len(body) > MAX_BODY_BYTES:
        raise PayloadError("body_too_large", f"request body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    return Payload(body, digest, "original" if sendable_as_is else "png")
