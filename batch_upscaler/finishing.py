"""Finishing: make the returned image into the output file's bytes.

Normally that is the returned bytes with the source's metadata spliced in (EXIF with Orientation
reset to 1 and GPS optionally removed, ICC profile), with no decode and no re-encode. Only a padded
request costs a decode: the padding is cropped off so the output keeps the source's aspect ratio.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, replace

from PIL import Image

from batch_upscaler.fitting import Fit
from batch_upscaler.metadata import SourceMetadata, inject_with_report, prepare_exif
from batch_upscaler.outputs import FileParts
from batch_upscaler.settings import MetadataSettings

log = logging.getLogger(__name__)


def carried_metadata(meta: SourceMetadata, settings: MetadataSettings, *, colour_converted: bool) -> SourceMetadata:
    """The part of the source's metadata the output gets."""
    exif = None
    if settings.exif and meta.exif:
        try:
            exif = prepare_exif(meta.exif, strip_gps=not settings.gps)
        except ValueError:  # a broken EXIF directory costs the EXIF, not the picture
            exif = None
    # A CMYK profile does not describe the RGB pixels we sent, so it is not carried over.
    icc = meta.icc_profile if settings.icc and not colour_converted else None
    return replace(meta, exif=exif, icc_profile=icc)


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
