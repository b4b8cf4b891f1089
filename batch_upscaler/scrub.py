"""Strip metadata from the image bytes sent to the service, without re-encoding (or even decoding) pixels.

A valid JPEG, PNG or WebP is sent as it is stored. ``output.metadata`` decides which of the source's
metadata may go with it (:meth:`Scrub.for_settings`). Outputs take their metadata from the source
file, never from what was sent, so none of this changes what an output carries.

* ``send_metadata: false`` (:attr:`Scrub.ALL`): no EXIF, XMP, IPTC/Photoshop or comment blocks. JPEG
  loses its APP1, APP13 and COM segments; PNG its eXIf, tEXt, zTXt and iTXt chunks; WebP its EXIF
  and XMP chunks (the VP8X flags and the RIFF size follow). What describes the pixels stays: JFIF
  (APP0), the ICC profile (APP2, iCCP, ICCP), Adobe (APP14), gAMA, cHRM, sRGB, pHYs and the rest.
* ``gps: false`` alone (:attr:`Scrub.GPS`): each EXIF block is rewritten in place with its GPS IFD
  unlinked and zeroed (:func:`~batch_upscaler.metadata.without_gps`); one that cannot be read is
  dropped whole. XMP is dropped, as it often repeats the coordinates (``exif:GPSLatitude``) and is
  not rewritten; so are JPEG's Photoshop APP13 (its resources can hold copies of the EXIF and XMP)
  and PNG's "Raw profile type ..." text chunks (hex copies of EXIF, IPTC or XMP). Comments stay.

Either way, whatever follows the first image goes too: JPEG trailers and an MPO's further frames,
each with its own EXIF (the MPF APP2 index that points at them goes with them), bytes after PNG's
IEND or past the RIFF size. The compressed pixel data is copied unchanged, so the service decodes
exactly the source's pixels.
"""

from __future__ import annotations

import struct
from enum import StrEnum
from typing import Final

from batch_upscaler.metadata import (
    EXIF_HEADER,
    MalformedError,
    Span,
    jpeg_segment,
    png_chunk,
    png_chunks,
    riff_chunk,
    riff_chunks,
    without_gps,
)
from batch_upscaler.settings import MetadataSettings

_JPEG_APP1, _JPEG_APP2, _JPEG_APP13, _JPEG_COM, _JPEG_SOS, _JPEG_EOI = 0xE1, 0xE2, 0xED, 0xFE, 0xDA, 0xD9
_JPEG_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD8)})
_MPF_SIGNATURE: Final = b"MPF\x00"
_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT: Final = frozenset({b"tEXt", b"zTXt", b"iTXt"})
_WEBP_XMP, _WEBP_EXIF = 0x04, 0x08

Part = bytes | memoryview


class Scrub(StrEnum):
    """How much of the metadata in a source's bytes stays out of the request."""

    NOTHING = "nothing"  # byte-for-byte
    GPS = "gps"  # location only
    ALL = "all"  # every EXIF, XMP, IPTC/Photoshop and comment block

    @classmethod
    def for_settings(cls, settings: MetadataSettings) -> Scrub:
        if not settings.send_metadata:
            return cls.ALL
        # Keeping GPS out of the output but sending it to a third party would defeat the point of gps: false.
        return cls.NOTHING if settings.gps else cls.GPS


def scrub_metadata(data: bytes, scrub: Scrub) -> bytes:
    """``data`` without what ``scrub`` names; MalformedError (a ValueError) if its structure cannot be walked."""
    if scrub is Scrub.NOTHING:
        return data
    if data.startswith(_PNG_SIGNATURE):
        return _scrub_png(data, scrub)
    if data.startswith(b"\xff\xd8\xff"):
        return _scrub_jpeg(data, scrub)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _scrub_webp(data, scrub)
    raise MalformedError("not a JPEG, PNG or WebP file")


# ---------------------------------------------------------------------------------------------- JPEG


def _scrub_jpeg(data: bytes, scrub: Scrub) -> bytes:
    segments, image_end = _jpeg_segments(data)
    view = memoryview(data)
    parts: list[Part] = []
    pos = 0
    for marker, start, end in segments:
        replacement = _jpeg_replacement(marker[0], data[start + 4:end], scrub)
        if replacement is not None:
            parts += [view[pos:start], replacement]
            pos = end
    parts.append(view[pos:image_end])  # anything after the first image's EOI is left off
    return b"".join(parts)


def _jpeg_replacement(marker: int, payload: bytes, scrub: Scrub) -> bytes | None:
    """What replaces one segment: None keeps it, b"" drops it, else the rewritten segment."""
    if marker == _JPEG_APP2 and payload.startswith(_MPF_SIGNATURE):
        return b""  # the index of the further frames, which are cut off
    if marker == _JPEG_APP13 or (marker == _JPEG_APP1 and not payload.startswith(EXIF_HEADER)):
        return b""  # Photoshop/IPTC, XMP
    if marker == _JPEG_APP1:
        if scrub is Scrub.ALL:
            return b""
        try:
            return jpeg_segment(_JPEG_APP1, EXIF_HEADER + without_gps(payload))
        except ValueError:  # unreadable, so it may still hold a location: it goes
            return b""
    if marker == _JPEG_COM and scrub is Scrub.ALL:
        return b""
    return None


def _jpeg_segments(data: bytes) -> tuple[list[Span], int]:
    """Every marker segment of the first image (between scans too) and the offset just past its EOI."""
    segments: list[Span] = []
    pos = 2  # after SOI
    while True:
        if pos + 2 > len(data) or data[pos] != 0xFF:
            raise MalformedError(f"no JPEG marker at offset {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in _JPEG_STANDALONE:
            pos += 2
        elif marker == _JPEG_EOI:
            return segments, pos + 2
        else:
            end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
            if end > len(data) or end < pos + 4:
                raise MalformedError(f"JPEG segment 0x{marker:02X} at {pos} has a bad length")
            segments.append((bytes((marker,)), pos, end))
            pos = _entropy_end(data, end) if marker == _JPEG_SOS else end


def _entropy_end(data: bytes, pos: int) -> int:
    """The offset of the marker that ends the entropy-coded data starting at ``pos``.

    Inside it a 0xFF data byte is followed by a stuffed 0x00, and RSTn markers are part of the scan.
    """
    while (pos := data.find(b"\xff", pos)) >= 0 and pos + 1 < len(data):
        following = data[pos + 1]
        if following == 0xFF:  # fill bytes: the marker is at the last 0xFF
            pos += 1
        elif following == 0x00 or 0xD0 <= following <= 0xD7:
            pos += 2
        else:
            return pos
    raise MalformedError("JPEG scan data runs to the end of the file")


# ---------------------------------------------------------------------------------------------- PNG


def _scrub_png(data: bytes, scrub: Scrub) -> bytes:
    view = memoryview(data)
    parts: list[Part] = [view[:len(_PNG_SIGNATURE)]]
    for ctype, start, end in png_chunks(data):  # up to IEND: trailing bytes are left off
        if ctype == b"eXIf":
            parts.append(b"" if scrub is Scrub.ALL else _png_exif_without_gps(data[start + 8:end - 4]))
        elif ctype not in _PNG_TEXT or (scrub is Scrub.GPS and not _copies_metadata(data[start + 8:end - 4])):
            parts.append(view[start:end])
    return b"".join(parts)


def _png_exif_without_gps(exif: bytes) -> bytes:
    try:
        return png_chunk(b"eXIf", without_gps(exif))
    except ValueError:  # unreadable, so it may still hold a location: it goes
        return b""


def _copies_metadata(text_payload: bytes) -> bool:
    """A text chunk holding XMP or ImageMagick's hex copy of a metadata block (its keyword says which)."""
    keyword = text_payload.split(b"\x00", 1)[0]
    return keyword == b"XML:com.adobe.xmp" or keyword.startswith(b"Raw profile type")


# ---------------------------------------------------------------------------------------------- WebP


def _scrub_webp(data: bytes, scrub: Scrub) -> bytes:
    view = memoryview(data)
    chunks: list[tuple[bytes, Part]] = []
    for fourcc, start, end in riff_chunks(data):  # up to the RIFF size: trailing bytes are left off
        if fourcc == b"EXIF" and scrub is Scrub.GPS:
            (size,) = struct.unpack_from("<I", data, start + 4)
            if (exif := _webp_exif_without_gps(data[start + 8:start + 8 + size])) is not None:
                chunks.append((fourcc, exif))
        elif fourcc not in (b"EXIF", b"XMP "):
            chunks.append((fourcc, view[start:end]))
    if chunks and chunks[0][0] == b"VP8X":
        vp8x = bytearray(chunks[0][1])
        if len(vp8x) < 18:
            raise MalformedError("VP8X chunk is shorter than 10 bytes")
        vp8x[8] &= ~(_WEBP_EXIF | _WEBP_XMP) & 0xFF
        vp8x[8] |= _WEBP_EXIF if any(fourcc == b"EXIF" for fourcc, _ in chunks) else 0
        chunks[0] = (b"VP8X", bytes(vp8x))
    riff_size = 4 + sum(len(chunk) for _, chunk in chunks)
    return b"".join([b"RIFF", struct.pack("<I", riff_size), b"WEBP", *(chunk for _, chunk in chunks)])


def _webp_exif_without_gps(exif: bytes) -> bytes | None:
    try:
        return riff_chunk(b"EXIF", without_gps(exif))
    except ValueError:  # unreadable, so it may still hold a location: it goes
        return None
