"""The fake model: decode and check an input image, resize it to the upscaled size, encode it.

Pure, synchronous Pillow work; the server runs it in a worker thread. The pixels are only
resized (BILINEAR, for speed) -- what matters to a client is the size, format and timing.
:class:`CannedOutputs` goes further for benchmarks: one output per (size, format), reused.
"""

from __future__ import annotations

import io
import math
import random
import threading
from dataclasses import dataclass

from PIL import Image

from batch_upscaler.catalogue import ModelSpec, check_image
from batch_upscaler.emulator.protocol import b64encode

# Pillow format name -> catalogue format name. MPO is how Pillow labels many camera JPEGs.
_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}
_PIL_WRITER = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


class ImageRejected(Exception):
    """The input image cannot be upscaled; ``message`` is the ValidationException text."""

    def __init__(self, message: str, input_size: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.input_size = input_size


@dataclass(frozen=True)
class UpscaleResult:
    """The encoded output image and the sizes involved."""

    data: bytes
    output_format: str
    input_size: tuple[int, int]
    output_size: tuple[int, int]


def upscale(image: bytes, spec: ModelSpec, output_format: str, *,
            max_pixels: int | None = None, png_compress_level: int = 1) -> UpscaleResult:
    """Upscale ``image`` the way ``spec`` documents, capped at ``max_pixels`` output pixels."""
    picture = open_checked(image, spec)
    input_size = (picture.width, picture.height)
    size = capped(spec.output_size(*input_size), max_pixels)
    resized = _normalise_mode(picture, output_format).resize(size, Image.Resampling.BILINEAR)
    data = encode(resized, output_format, png_compress_level)
    return UpscaleResult(data, output_format, input_size, size)


def sniff_format(image: bytes) -> str:
    """The container format from the first bytes (no decode), for the request log."""
    if image.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if image.startswith(b"\xff\xd8"):
        return "jpeg"
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "webp"
    return "unknown"


def open_checked(image: bytes, spec: ModelSpec) -> Image.Image:
    """The decoded image, or ImageRejected when it is undecodable or outside the model's limits."""
    picture = open_header_checked(image, spec)
    try:
        picture.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected("Invalid input image: undecodable: the image data is damaged",
                            (picture.width, picture.height)) from exc
    return picture


def open_header_checked(image: bytes, spec: ModelSpec) -> Image.Image:
    """The opened (header-only, not yet decoded) image, or ImageRejected when outside the limits."""
    try:
        picture = Image.open(io.BytesIO(image))
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"Invalid input image: too_many_pixels: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected("Invalid input image: undecodable: the image could not be decoded") from exc
    size = (picture.width, picture.height)
    fmt = _FORMATS.get(picture.format or "", (picture.format or "unknown").lower())
    # Check before load(): Image.open only reads the header, so oversized images cost nothing.
    rejection = check_image(spec.limits, picture.width, picture.height, fmt)
    if rejection is not None:
        raise ImageRejected(f"Invalid input image: {rejection}", size)
    return picture


def capped(size: tuple[int, int], max_pixels: int | None) -> tuple[int, int]:
    """``size`` shrunk (keeping aspect, rounding down) so it has at most ``max_pixels`` pixels."""
    width, height = size
    if max_pixels is None or width * height <= max_pixels:
        return size
    scale = math.sqrt(max_pixels / (width * height))
    new_w, new_h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    # Raising a side to 1 px (extreme aspect) or float rounding can overshoot: trim the long side.
    if new_w * new_h > max_pixels:
        if new_w >= new_h:
            new_w = max(1, max_pixels // new_h)
        else:
            new_h = max(1, max_pixels // new_w)
    return new_w, new_h


def encode(picture: Image.Image, output_format: str, png_compress_level: int = 1) -> bytes:
    """Encode in the requested format with speed-leaning settings."""
    out = io.BytesIO()
    writer = _PIL_WRITER[output_format]
    if output_format == "png":
        picture.save(out, writer, compress_level=png_compress_level)
    elif output_format == "jpeg":
        picture.save(out, writer, quality=95)
    else:
        picture.save(out, writer, quality=90, method=0)
    return out.getvalue()


def _normalise_mode(picture: Image.Image, output_format: str) -> Image.Image:
    # Palette/16-bit/CMYK images cannot be resized bilinearly or saved everywhere; JPEG has no alpha.
    has_alpha = picture.mode in ("RGBA", "LA", "PA") or (
        picture.mode == "P" and "transparency" in picture.info)
    mode = "RGBA" if has_alpha and output_format != "jpeg" else "RGB"
    return picture if picture.mode == mode else picture.convert(mode)


@dataclass(frozen=True)
class CannedImage:
    """An encoded output and its base64 text, shared by every request of one (size, format)."""

    data: bytes
    b64: str


class CannedOutputs:
    """For benchmarks only: upscale once per (output size, output format), then reuse the bytes.

    The first request of each (size, format) is upscaled for real; later ones only have their
    header checked against the limits (no decode, so damage past the header goes unnoticed) and
    get the same image back -- its content does not depend on their input. This keeps the
    emulator's CPU out of a benchmark that measures the client. Thread-safe (renders run in
    worker threads).

    ``noise``: the image is per-pixel noise of the output size instead of the upscaled input, the
    worst case for size (a 9.7 MP PNG of ~29 MB, like a real output of a detailed photo at the
    top of its range, where the upscale of a photo compresses to ~8.5 MB).
    """

    def __init__(self, max_pixels: int | None = None, png_compress_level: int = 1, noise: bool = False) -> None:
        self._max_pixels = max_pixels
        self._level = png_compress_level
        self._noise = noise
        self._lock = threading.Lock()
        self._images: dict[tuple[tuple[int, int], str], CannedImage] = {}

    def upscale(self, image: bytes, spec: ModelSpec, output_format: str) -> tuple[UpscaleResult, str]:
        """The result for this input's size (data shared) and the output's base64 text."""
        picture = open_header_checked(image, spec)
        input_size = (picture.width, picture.height)
        size = capped(spec.output_size(*input_size), self._max_pixels)
        with self._lock:  # one render per key, even when its first requests arrive together
            canned = self._images.get((size, output_format))
            if canned is None:
                data = (encode(noise_image(size), output_format, self._level) if self._noise else
                        upscale(image, spec, output_format, max_pixels=self._max_pixels,
                                png_compress_level=self._level).data)
                canned = self._images[(size, output_format)] = CannedImage(data, b64encode(data))
        return UpscaleResult(canned.data, output_format, input_size, size), canned.b64


def noise_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Seeded per-pixel RGB noise: it does not compress, so its PNG is as large as a PNG gets."""
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))
