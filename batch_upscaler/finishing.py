"""Finishing: make the returned image into the output file's bytes.

Normally that is the returned bytes with the source's metadata spliced in (EXIF with GPS optionally
removed, ICC profile), with no decode and no re-encode. The EXIF Orientation follows the pixels: reset
to 1 when they were rotated upright before sending, the source's own when they were sent as stored
(``prepare.orientation: keep``), so viewers show the output the way they show the source. Only a
padded request costs a decode: the padding is cropped off so the output keeps the source's aspect ratio.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, replace

from PIL import Image

from batch_upscaler.fitting import Fit
from batch_upscaler.metadata import (
    SourceMetadata,
    exif_orientation,
    inject_with_report,
    orientation_exif,
    prepare_exif,
)
from batch_upscaler.settings import MetadataSettings
from batch_upscaler.storage.base import FileParts

log = logging.getLogger(__name__)


def carried_metadata(meta: SourceMetadata, settings: MetadataSettings, *, colour_converted: bool,
                     keep_orientation: bool = False) -> SourceMetadata:
    """The part of the source's metadata the output gets.

    ``keep_orientation``: the pixels were sent as stored, not rotated (``prepare.orientation: keep``),
    so the output keeps the source's Orientation tag. Without it such an output shows sideways, so even
    with ``exif: false`` it gets a minimal EXIF that holds only that tag (when it is not 1).
    """
    # A CMYK profile does not describe the RGB pixels we sent, so it is not carried over.
    icc = meta.icc_profile if settings.icc and not colour_converted else None
    return replace(meta, exif=_carried_exif(meta.exif, settings, keep_orientation), icc_profile=icc)


def _carried_exif(source: bytes | None, settings: MetadataSettings, keep_orientation: bool) -> bytes | None:
    if not source:
        return None
    if settings.exif:
        try:
            return prepare_exif(source, strip_gps=not settings.gps, keep_orientation=keep_orientation)
        except ValueError:  # a broken EXIF directory costs the EXIF, not the picture (nor its orientation)
            pass
    orientation = exif_orientation(source) if keep_orientation else None
    return orientation_exif(orientation) if orientation is not None and 2 <= orientation <= 8 else None


@dataclass(frozen=True)
class Finished:
    """One output file, ready to write: its parts in order and its pixel size (None: unreadable header)."""

    parts: FileParts
    size: tuple[int, int] | None


def finish(returned: bytes, plan: Fit, meta: SourceMetadata) -> Finished:
    """The output file for one returned image."""
    image = _crop_padding(returned, plan) if plan.content_box is not None else returned
    injected = inject_with_report(image, meta)
    for reason in injected.skipped:
        log.info("metadata not carried: %s", reason)
    return Finished(injected.parts, image_size(image))


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from an encoded image's header (no decode)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.width, im.height
    except (OSError, ValueError, SyntaxError):
        return None


def _crop_padding(returned: bytes, plan: Fit) -> bytes:
    assert plan.content_box is not None
    with Image.open(io.BytesIO(returned)) as im:
        fmt = im.format or "PNG"
        sx, sy = im.width / plan.sent_size[0], im.height / plan.sent_size[1]
        left, top, right, bottom = plan.content_box
        cropped = im.crop((round(left * sx), round(top * sy), round(right * sx), round(bottom * sy)))
        out = io.BytesIO()
        options = {"PNG": {"compress_level": 1}, "JPEG": {"quality": 95}, "WEBP": {"quality": 90}}.get(fmt, {})
        cropped.save(out, format=fmt, **options)
        return out.getvalue()
