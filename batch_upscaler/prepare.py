"""Preparation: turn a source file's bytes into the image bytes sent, following its Fit.

A file that fits as it is goes byte-for-byte (faithful and free), less the metadata that
``output.metadata`` keeps from the service (batch_upscaler.scrub; pixel data untouched; a file whose
structure cannot be walked for that is re-encoded instead). Anything else is decoded once:
first frame, 16-bit scaled to 8-bit, CMYK/palette/grayscale-alpha converted, EXIF rotation
applied, alpha flattened on the background colour (or kept), padded, resized with Lanczos, then
encoded losslessly (PNG) unless the source was already lossy (JPEG/WebP → JPEG quality 95). If
the request body would pass the 25,000,000-byte cap the image is re-encoded as JPEG, then at lower
quality, then downscaled, until it fits. A re-encoded image carries no EXIF, XMP or comment: at
most an ICC profile that describes its pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps

from batch_upscaler.catalogue import InputLimits, check_image, max_image_bytes
from batch_upscaler.fitting import Fit
from batch_upscaler.probe import ImageHeader
from batch_upscaler.scrub import Scrub, scrub_metadata
from batch_upscaler.settings import AlphaPolicy, PrepareSettings

_LOSSY_SOURCES = frozenset({"JPEG", "MPO", "WEBP"})
_JPEG_QUALITIES = (95, 90, 85)


class PrepareError(Exception):
    """The image cannot be made into a request within the limits."""


@dataclass(frozen=True)
class Prepared:
    image: bytes
    format: str  # jpeg | png | webp as sent
    size: tuple[int, int]
    converted: bool


def prepare_image(data: bytes, header: ImageHeader, plan: Fit, limits: InputLimits,
                  settings: PrepareSettings, scrub: Scrub = Scrub.NOTHING) -> Prepared:
    """The image to send for ``data``; byte-for-byte (less ``scrub``) when the plan allows and the body fits."""
    cap = max_image_bytes(limits)
    if plan.as_is and len(data) <= cap:
        try:
            sent = scrub_metadata(data, scrub)
        except ValueError:  # MalformedError: metadata cannot be told from pixel data without a decode,
            pass  # so the file is re-encoded below, which writes none
        else:
            return Prepared(sent, _sent_format(header.pil_format), (header.width, header.height), False)
    with Image.open(io.BytesIO(data)) as im:
        im.seek(0)
        im.load()  # decode now: the file behind ``im`` closes with this block
        pixels = _normalise(im, header, plan, settings)
    lossy = header.pil_format in _LOSSY_SOURCES and pixels.mode != "RGBA"
    return _encode_within(pixels, "jpeg" if lossy else "png", cap, limits)


def _sent_format(pil_format: str) -> str:
    return {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}[pil_format]


def _normalise(im: Image.Image, header: ImageHeader, plan: Fit, settings: PrepareSettings) -> Image.Image:
    frame = _to_8bit(im)
    if plan.rotate:
        frame = ImageOps.exif_transpose(frame) or frame
    frame = _colour(frame, header, settings)
    if plan.content_box is not None:
        inner = (plan.content_box[2] - plan.content_box[0], plan.content_box[3] - plan.content_box[1])
        if frame.size != inner:
            frame = frame.resize(inner, Image.Resampling.LANCZOS)
        canvas = Image.new(frame.mode, plan.sent_size, _fill(frame.mode, settings.background))
        canvas.paste(frame, plan.content_box[:2])
        return canvas
    if frame.size != plan.sent_size:
        frame = frame.resize(plan.sent_size, Image.Resampling.LANCZOS)
    return frame


def _fill(mode: str, background: tuple[int, int, int]) -> int | tuple[int, ...]:
    """The padding colour in ``mode``: the background, opaque; grey level for grayscale."""
    if mode == "L":
        return round(0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2])
    return (*background, 255) if mode == "RGBA" else background


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale scaled (not clipped) to 8 bits; everything else as is."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return im.convert("I").point(lambda v: v / 257).convert("L")
    if im.mode == "I":
        peak = im.getextrema()[1]
        scale = 1 / 257 if isinstance(peak, int) and peak > 255 else 1
        return im.point(lambda v: v * scale).convert("L")
    if im.mode == "F":
        return im.convert("L")
    return im


def _colour(im: Image.Image, header: ImageHeader, settings: PrepareSettings) -> Image.Image:
    if header.has_alpha or (im.mode in ("RGBA", "LA", "PA", "P") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        if settings.alpha is AlphaPolicy.KEEP:
            return rgba
        background = Image.new("RGBA", rgba.size, (*settings.background, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode in ("L", "RGB"):
        return im
    if im.mode == "1":
        return im.convert("L")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, P without transparency, ...


def _encode_within(im: Image.Image, preferred: str, cap: int, limits: InputLimits) -> Prepared:
    """Encode ``im``; fall back to JPEG, lower quality, then smaller sizes until under ``cap``."""
    current = _without_metadata(im)
    while True:
        for fmt, quality in _attempts(preferred, current.mode):
            data = _encode(current, fmt, quality)
            if len(data) <= cap:
                return Prepared(data, fmt, current.size, True)
        smaller = (int(current.width * 0.85), int(current.height * 0.85))
        if check_image(limits, *smaller) is not None:
            raise PrepareError(f"cannot encode {im.width}x{im.height} under the {limits.max_body_bytes}-byte body cap")
        current = current.resize(smaller, Image.Resampling.LANCZOS)


def _without_metadata(im: Image.Image) -> Image.Image:
    """``im`` with nothing left in ``info`` but an ICC profile that describes its pixels.

    Pillow's writers copy parts of ``info``, which still holds the decoded source's metadata, into the
    file (JPEG its comment, PNG its ICC profile, depending on the version also EXIF). A profile for
    another colour space (CMYK, after conversion to RGB) would make the sent colours wrong.
    """
    icc = im.info.get("icc_profile")
    space = b"GRAY" if im.mode == "L" else b"RGB "
    im.info = {"icc_profile": icc} if isinstance(icc, bytes) and icc[16:20] == space else {}
    return im


def _attempts(preferred: str, mode: str) -> list[tuple[str, int]]:
    jpeg = [("jpeg", q) for q in _JPEG_QUALITIES] if mode != "RGBA" else []
    return [("png", 0), *jpeg] if preferred == "png" else jpeg or [("png", 0)]


def _encode(im: Image.Image, fmt: str, quality: int) -> bytes:
    out = io.BytesIO()
    if fmt == "png":
        im.save(out, format="PNG", compress_level=6)
    else:
        im.save(out, format="JPEG", quality=quality, subsampling=0 if quality >= 95 else 2)
    return out.getvalue()
