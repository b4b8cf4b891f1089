"""Carry a source photo's EXIF and ICC profile over to an upscaled output by splicing encoded bytes.

The remote model returns PNG, JPEG or WebP bytes without metadata. Decoding and re-encoding a ~10 MP output
just to attach metadata would cost seconds per image, so this module never touches pixels: it reads the
source's metadata from headers only and inserts PNG chunks, JPEG APP segments or WebP RIFF chunks into the
output's existing byte stream.

Typical use::

    meta = read_metadata(source_path)
    if meta.exif is not None:
        meta = replace(meta, exif=prepare_exif(meta.exif, strip_gps=True))
    result = inject_with_report(output_bytes, meta)  # or inject() for just the bytes
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from PIL import Image, TiffImagePlugin

EXIF_HEADER: Final = b"Exif\x00\x00"
ORIENTATION: Final = 0x0112
GPS_IFD: Final = 0x8825

# TIFF field type -> bytes per value (BYTE, ASCII, SHORT, LONG, RATIONAL, SBYTE, UNDEFINED, SSHORT, SLONG,
# SRATIONAL, FLOAT, DOUBLE, IFD); EXIF never uses the BigTIFF types.
_TIFF_TYPE_SIZES: Final = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_SHORT: Final = 3

# IFD0 tags that describe the photo rather than a TIFF file's own pixel layout. TIFF sources mix both in IFD0,
# and copying StripOffsets, BitsPerSample etc. into the output's EXIF would describe pixels that are not there.
_DESCRIPTIVE_IFD0_TAGS: Final = frozenset({
    0x010D, 0x010E, 0x010F, 0x0110, 0x0112, 0x011A, 0x011B, 0x0128, 0x0131, 0x0132, 0x013B, 0x013C,
    0x0213, 0x4746, 0x4749, 0x8298, 0x8769, 0x8825, 0x9C9B, 0x9C9C, 0x9C9D, 0x9C9E, 0x9C9F,
})

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
# iCCP overrides gAMA/cHRM and must not coexist with sRGB; cICP would take precedence over our profile.
_PNG_COLOUR_CHUNKS: Final = frozenset({b"iCCP", b"sRGB", b"gAMA", b"cHRM", b"cICP"})
_PNG_GREY_TYPES: Final = frozenset({0, 4})

_JPEG_SOI: Final = b"\xff\xd8"
_JPEG_APP0, _JPEG_APP1, _JPEG_APP2, _JPEG_SOS, _JPEG_EOI = 0xE0, 0xE1, 0xE2, 0xDA, 0xD9
# SOFn markers carry the component count; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_JPEG_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE_MARKERS: Final = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_MAX_PAYLOAD: Final = 0xFFFF - 2  # the 16-bit segment length counts its own two bytes
_JPEG_MAX_EXIF: Final = _JPEG_MAX_PAYLOAD - len(EXIF_HEADER)
_ICC_SIGNATURE: Final = b"ICC_PROFILE\x00"
_ICC_CHUNK: Final = _JPEG_MAX_PAYLOAD - len(_ICC_SIGNATURE) - 2  # 65519: room for sequence number and count
_JPEG_COLOUR_SPACES: Final = {1: b"GRAY", 3: b"RGB ", 4: b"CMYK"}

_WEBP_ICC, _WEBP_ALPHA, _WEBP_EXIF = 0x20, 0x10, 0x08
_WEBP_IMAGE_CHUNKS: Final = frozenset({b"VP8 ", b"VP8L", b"ALPH", b"ANIM", b"ANMF"})

Span = tuple[bytes, int, int]  # (chunk type, start offset, end offset) of one chunk/segment in a file


@dataclass(frozen=True)
class SourceMetadata:
    """Metadata worth carrying over: raw TIFF-structured EXIF (no ``Exif\\0\\0`` prefix) and an ICC profile."""

    exif: bytes | None
    icc_profile: bytes | None


@dataclass(frozen=True)
class Injected:
    """The output file as consecutive parts, plus a reason for every metadata part not carried over.

    The parts are views of the returned image around the new chunks: the file is written part by
    part (the large ones straight to write(2)) instead of first being copied into a joined buffer.
    """

    parts: tuple[bytes | memoryview, ...]
    skipped: tuple[str, ...] = ()

    @property
    def data(self) -> bytes:
        """The whole file as one ``bytes`` (a copy)."""
        return self.parts[0] if len(self.parts) == 1 and isinstance(self.parts[0], bytes) else b"".join(self.parts)


class MalformedError(ValueError):
    """The output image's container structure is not what its signature promises."""


# ---------------------------------------------------------------------------------------------- reading


def read_metadata(path_or_bytes: str | os.PathLike[str] | bytes) -> SourceMetadata:
    """Read EXIF and ICC from any Pillow-readable image, parsing headers only (pixels are never decoded)."""
    with Image.open(io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes) as im:
        icc = im.info.get("icc_profile") or None
        exif = _exif_from_info(im.info.get("exif"), im.info.get("Raw profile type exif"))
        if exif is None and isinstance(im, TiffImagePlugin.TiffImageFile):
            exif = _tiff_exif(im)
        image_format = im.format
    if exif is None and image_format == "PNG":
        # Pillow only sees chunks before IDAT until the pixels are loaded; eXIf may legally follow IDAT.
        exif = _png_late_exif(path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes())
    return SourceMetadata(exif=exif, icc_profile=icc if isinstance(icc, bytes) else None)


def as_tiff(payload: bytes) -> bytes | None:
    """The TIFF structure inside an EXIF payload, or None if there is none (some writers double the prefix)."""
    while payload.startswith(EXIF_HEADER):
        payload = payload[len(EXIF_HEADER):]
    return payload if payload[:4] in (b"II*\x00", b"MM\x00*") else None


def _exif_from_info(raw: object, legacy: object) -> bytes | None:
    """EXIF from Pillow's ``info``: the usual bytes, else ImageMagick's hex-encoded PNG text chunk."""
    if not isinstance(raw, bytes) and isinstance(legacy, str):
        try:
            raw = bytes.fromhex("".join(legacy.split("\n")[3:]))
        except ValueError:
            return None
    return as_tiff(raw) if isinstance(raw, bytes) else None


def _tiff_exif(im: TiffImagePlugin.TiffImageFile) -> bytes | None:
    # For TIFF, getexif() parses IFD0 from the open file without decoding strips (PNG's getexif would load pixels).
    exif = im.getexif()
    for tag in [tag for tag in exif if tag not in _DESCRIPTIVE_IFD0_TAGS]:
        del exif[tag]
    return as_tiff(exif.tobytes()) if len(exif) else None


def _png_late_exif(data: bytes) -> bytes | None:
    try:
        chunks = png_chunks(data)
    except MalformedError:
        return None
    for ctype, start, end in chunks:
        if ctype == b"eXIf":
            return as_tiff(data[start + 8:end - 4])
    return None


# ---------------------------------------------------------------------------------------------- EXIF editing


def prepare_exif(exif: bytes, *, strip_gps: bool, keep_orientation: bool = False) -> bytes:
    """EXIF for an output: Orientation = 1 (unless kept), thumbnail IFD dropped and, if asked, GPS removed.

    ``keep_orientation`` is for pixels sent as stored (``prepare.orientation: keep``): they still need
    the source's Orientation tag to be shown upright, so it is left exactly as the source has it.
    Edits the TIFF structure in place instead of using ``PIL.Image.Exif.tobytes()``, which rewrites every
    sub-IFD (UNDEFINED tags become BYTE, SRATIONAL may become RATIONAL) and moves data, breaking the absolute
    offsets inside maker notes. Raises ValueError if ``exif`` is not a readable TIFF structure.
    """
    tiff = bytearray(as_tiff(exif) or b"")
    order = _tiff_byte_order(tiff)
    (ifd0,) = struct.unpack_from(order + "I", tiff, 4)
    raw_entries = _ifd_entries(tiff, order, ifd0)
    entries = {_entry_tag(entry, order): entry for entry in raw_entries}
    if not keep_orientation:
        # The pixels sent for upscaling were already rotated upright, so viewers must not rotate them again.
        entries[ORIENTATION] = struct.pack(order + "HHIH2x", ORIENTATION, _SHORT, 1, 1)
    if strip_gps:
        _drop_gps(tiff, order, entries)
    # Next-IFD offset 0 drops IFD1: its thumbnail previews the small source, not the output (and after a
    # rotation it would even show sideways).
    table = struct.pack(order + "H", len(entries)) + b"".join(entries[t] for t in sorted(entries)) + bytes(4)
    _store_ifd0(tiff, order, ifd0, 2 + 12 * len(raw_entries) + 4, table)
    return bytes(tiff)


def without_gps(exif: bytes) -> bytes:
    """``exif`` as TIFF (an ``Exif\\0\\0`` prefix is dropped) with its GPS IFD unlinked and zeroed, nothing moved.

    Unlike :func:`prepare_exif` it keeps everything else as it was: the length, the thumbnail IFD and
    every offset, so an EXIF block can be swapped for this one in a file that is otherwise sent as is.
    Raises ValueError if ``exif`` is not a readable TIFF structure.
    """
    tiff = bytearray(as_tiff(exif) or b"")
    order = _tiff_byte_order(tiff)
    (ifd0,) = struct.unpack_from(order + "I", tiff, 4)
    raw_entries = _ifd_entries(tiff, order, ifd0)
    entries = {_entry_tag(entry, order): entry for entry in raw_entries}
    if GPS_IFD not in entries:
        return bytes(tiff)
    _drop_gps(tiff, order, entries)
    old_size = 2 + 12 * len(raw_entries) + 4
    next_ifd = bytes(tiff[ifd0 + old_size - 4:ifd0 + old_size])  # IFD1 (the thumbnail) stays linked
    kept = [entry for entry in raw_entries if _entry_tag(entry, order) != GPS_IFD]  # in their original order
    _store_ifd0(tiff, order, ifd0, old_size, struct.pack(order + "H", len(kept)) + b"".join(kept) + next_ifd)
    return bytes(tiff)


def exif_orientation(exif: bytes) -> int | None:
    """The Orientation value in IFD0 (None if absent, not a SHORT, or the EXIF is unreadable)."""
    try:
        tiff = as_tiff(exif) or b""
        order = _tiff_byte_order(tiff)
        entries = _ifd_entries(tiff, order, struct.unpack_from(order + "I", tiff, 4)[0])
    except (ValueError, struct.error):
        return None
    for entry in entries:
        tag, field_type, count, value = struct.unpack(order + "HHIH2x", entry)
        if tag == ORIENTATION and field_type == _SHORT and count == 1:
            return int(value)
    return None


def orientation_exif(orientation: int) -> bytes:
    """A minimal EXIF (TIFF structure) holding only ``orientation``, for outputs that carry no other EXIF."""
    # header, IFD0 at offset 8 with one entry, the entry, next-IFD offset 0
    entry = struct.pack("<HHIH2x", ORIENTATION, _SHORT, 1, orientation)
    return b"II*\x00" + struct.pack("<IH", 8, 1) + entry + bytes(4)


def _drop_gps(tiff: bytearray, order: str, entries: dict[int, bytes]) -> None:
    """Unlink the GPS IFD from ``entries`` (IFD0's, by tag) and zero its contents in ``tiff``."""
    gps = entries.pop(GPS_IFD, None)
    if gps is not None:
        # Unlinking alone would leave the coordinates in the file for anyone who scans the bytes.
        _scrub_ifd(tiff, order, struct.unpack_from(order + "I", gps, 8)[0])


def _tiff_byte_order(tiff: bytes | bytearray) -> str:
    if len(tiff) < 8:
        raise ValueError("EXIF is shorter than a TIFF header")
    if tiff[:4] == b"II*\x00":
        return "<"
    if tiff[:4] == b"MM\x00*":
        return ">"
    raise ValueError("EXIF is not TIFF-structured (no II*/MM* header)")


def _ifd_entries(tiff: bytes | bytearray, order: str, offset: int) -> list[bytes]:
    """The raw 12-byte entries of the IFD at ``offset``; ValueError if it does not fit in the payload."""
    if offset < 8 or offset + 2 > len(tiff):
        raise ValueError(f"EXIF IFD offset {offset} is outside the {len(tiff)}-byte payload")
    (count,) = struct.unpack_from(order + "H", tiff, offset)
    if offset + 2 + 12 * count + 4 > len(tiff):
        raise ValueError(f"EXIF IFD at {offset} with {count} entries runs past the end of the payload")
    return [bytes(tiff[offset + 2 + 12 * i:offset + 14 + 12 * i]) for i in range(count)]


def _entry_tag(entry: bytes, order: str) -> int:
    tag: int = struct.unpack_from(order + "H", entry)[0]
    return tag


def _value_span(entry: bytes, order: str, limit: int) -> tuple[int, int] | None:
    """Where an entry's value lives when it is too big to sit inside the entry (None if inline or bogus)."""
    _, field_type, count, start = struct.unpack(order + "HHII", entry)
    size = _TIFF_TYPE_SIZES.get(field_type, 0) * count
    if size <= 4 or start < 8 or start + size > limit:  # never touch the 8-byte header
        return None
    return start, start + size


def _scrub_ifd(tiff: bytearray, order: str, offset: int) -> None:
    """Zero an IFD's table and out-of-line values; a dangling pointer simply has nothing to scrub."""
    try:
        entries = _ifd_entries(tiff, order, offset)
    except ValueError:
        return
    for entry in entries:
        if span := _value_span(entry, order, len(tiff)):
            tiff[span[0]:span[1]] = bytes(span[1] - span[0])
    end = offset + 2 + 12 * len(entries) + 4
    tiff[offset:end] = bytes(end - offset)  # reads back as an empty IFD if anything still points here


def _store_ifd0(tiff: bytearray, order: str, offset: int, old_size: int, table: bytes) -> None:
    if len(table) <= old_size:
        tiff[offset:offset + old_size] = table.ljust(old_size, b"\x00")
        return
    # A grown table would overwrite whatever follows it, so append it (IFDs start on a word boundary) and
    # repoint the header; values stay where they are because TIFF offsets are absolute.
    if len(tiff) % 2:
        tiff.append(0)
    struct.pack_into(order + "I", tiff, 4, len(tiff))
    tiff += table


# ---------------------------------------------------------------------------------------------- injection


def inject(image: bytes, meta: SourceMetadata) -> bytes:
    """``image`` with ``meta`` spliced in; unchanged for unknown formats, malformed files or empty metadata."""
    return inject_with_report(image, meta).data


def inject_with_report(image: bytes, meta: SourceMetadata) -> Injected:
    """Like :func:`inject`, also saying which metadata parts were left out and why."""
    if meta.exif is None and meta.icc_profile is None:
        return Injected((image,))
    container = container_of(image)
    if container is None:
        return Injected((image,), (UNKNOWN_FORMAT,))
    carried = carried_parts(meta)
    try:
        result = _SPLICERS[container](image, carried.exif, carried.icc)
    except MalformedError as exc:
        return Injected((image,), (malformed_note(exc),))
    return Injected(result.parts, carried.skipped + result.skipped)


UNKNOWN_FORMAT: Final = "output format not recognised: metadata not injected"
SNIFF_BYTES: Final = 12  # container_of decides from this many bytes (fewer only at the end of the data)


def malformed_note(exc: MalformedError) -> str:
    return f"output image malformed, metadata not injected: {exc}"


@dataclass(frozen=True)
class Carried:
    """What is to be spliced in: EXIF as TIFF (None: none, or unusable) and the ICC profile."""

    exif: bytes | None
    icc: bytes | None
    skipped: tuple[str, ...] = ()


def carried_parts(meta: SourceMetadata) -> Carried:
    """The metadata in the form the splicers take, and a note if the EXIF cannot be used."""
    exif = None if meta.exif is None else as_tiff(meta.exif)
    skipped = ("exif: not TIFF-structured",) if meta.exif is not None and exif is None else ()
    return Carried(exif, meta.icc_profile, skipped)


def container_of(head: bytes | bytearray | memoryview) -> str | None:
    """"PNG", "JPEG", "WEBP" or None, from the first :data:`SNIFF_BYTES` bytes of an image."""
    head = bytes(head[:SNIFF_BYTES])
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head.startswith(_JPEG_SOI + b"\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _icc_problem(profile: bytes, colour_space: bytes) -> str | None:
    """Why ``profile`` cannot describe an image in ``colour_space`` (ICC signature like b"RGB "), else None."""
    if len(profile) < 128 or profile[36:40] != b"acsp":
        return "icc: not an ICC profile (no 'acsp' signature)"
    if profile[16:20] != colour_space:
        # e.g. a CMYK print profile on an RGB output would make colour-managed viewers render garbage
        return f"icc: profile colour space {profile[16:20]!r} does not match the image's {colour_space!r}"
    return None


def _nonempty(parts: Sequence[bytes | memoryview]) -> tuple[bytes | memoryview, ...]:
    return tuple(part for part in parts if len(part))


# ---------------------------------------------------------------------------------------------- PNG


def png_chunks(data: bytes) -> list[Span]:
    """Every chunk up to and including IEND; trailing bytes after IEND are not chunks."""
    if not data.startswith(_PNG_SIGNATURE):
        raise MalformedError("no PNG signature")
    chunks: list[Span] = []
    pos = len(_PNG_SIGNATURE)
    while not chunks or chunks[-1][0] != b"IEND":
        if pos + 12 > len(data):
            raise MalformedError("PNG ends before IEND")
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 12 + length
        if end > len(data):
            raise MalformedError(f"PNG chunk {data[pos + 4:pos + 8]!r} runs past the end of the file")
        chunks.append((data[pos + 4:pos + 8], pos, end))
        pos = end
    if chunks[0][0] != b"IHDR" or chunks[0][2] - chunks[0][1] != 25:
        raise MalformedError("PNG does not start with a 13-byte IHDR")
    return chunks


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


PNG_HEAD: Final = len(_PNG_SIGNATURE) + 25  # signature + IHDR (length, type, 13 bytes, CRC)


@dataclass(frozen=True)
class PngSplice:
    """What splicing does to a PNG: ``insert`` goes right after IHDR (the first :data:`PNG_HEAD`
    bytes), every chunk whose type is in ``drop`` is left out wherever it is. Nothing to insert
    means the file stays exactly as it is."""

    insert: tuple[bytes, ...]
    drop: frozenset[bytes]
    skipped: tuple[str, ...]


def png_splice(head: bytes | bytearray | memoryview, exif: bytes | None, icc: bytes | None) -> PngSplice:
    """The splice for a PNG, decided from its first :data:`PNG_HEAD` bytes (only IHDR is read)."""
    if len(head) < PNG_HEAD or bytes(head[8:16]) != b"\x00\x00\x00\x0dIHDR":
        raise MalformedError("PNG does not start with a 13-byte IHDR")
    colour_type = head[25]  # IHDR: width(4) height(4) depth(1) colour type(1)
    problem = None if icc is None else _icc_problem(icc, b"GRAY" if colour_type in _PNG_GREY_TYPES else b"RGB ")
    new: list[bytes] = []
    drop: set[bytes] = set()
    if icc is not None and problem is None:
        # name, NUL, compression method 0 (zlib); iCCP must precede PLTE and IDAT, so it goes right after IHDR
        new.append(png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc)))
        drop |= _PNG_COLOUR_CHUNKS
    if exif is not None:
        new.append(png_chunk(b"eXIf", exif))  # eXIf must precede IDAT; only one is allowed
        drop.add(b"eXIf")
    return PngSplice(tuple(new), frozenset(drop), (problem,) if problem else ())


def _splice_png(image: bytes, exif: bytes | None, icc: bytes | None) -> Injected:
    chunks = png_chunks(image)
    plan = png_splice(image[:PNG_HEAD], exif, icc)
    if not plan.insert:
        return Injected((image,), plan.skipped)
    view = memoryview(image)
    kept = _merged_views(view, [(start, end) for ctype, start, end in chunks[1:] if ctype not in plan.drop])
    return Injected(_nonempty([view[:PNG_HEAD], *plan.insert, *kept, view[chunks[-1][2]:]]), plan.skipped)


def _merged_views(view: memoryview, spans: list[tuple[int, int]]) -> list[memoryview]:
    """Slices of ``view`` for ``spans``, neighbours as one: fewer parts to write (a PNG has a chunk per 64 kB)."""
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return [view[start:end] for start, end in merged]


# ---------------------------------------------------------------------------------------------- JPEG


def _jpeg_header_segments(data: bytes) -> tuple[list[Span], int]:
    """The marker segments between SOI and the first SOS, and the offset of that SOS."""
    segments: list[Span] = []
    pos = len(_JPEG_SOI)
    while True:
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise MalformedError(f"no JPEG marker at offset {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            pos += 2
            continue
        if marker == _JPEG_EOI:
            raise MalformedError("JPEG has no scan (EOI before SOS)")
        end = pos + 2 + struct.unpack_from(">H", data, pos + 2)[0]
        if end > len(data) or end < pos + 4:
            raise MalformedError(f"JPEG segment 0x{marker:02X} at {pos} has a bad length")
        if marker == _JPEG_SOS:
            return segments, pos
        segments.append((bytes((marker,)), pos, end))
        pos = end


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def _jpeg_colour_space(data: bytes, segments: list[Span]) -> bytes:
    for marker, start, end in segments:
        if marker[0] in _JPEG_SOF_MARKERS and end - start >= 10:
            # SOF: length(2) precision(1) height(2) width(2) component count(1)
            return _JPEG_COLOUR_SPACES.get(data[start + 9], b"????")
    raise MalformedError("JPEG has no SOF segment before its first scan")


def _icc_app2_segments(profile: bytes) -> list[bytes]:
    """The ICC spec's APP2 chain: 'ICC_PROFILE\\0', 1-based sequence number, total count, then the chunk."""
    parts = [profile[i:i + _ICC_CHUNK] for i in range(0, len(profile), _ICC_CHUNK)]
    return [jpeg_segment(_JPEG_APP2, _ICC_SIGNATURE + bytes((n, len(parts))) + part)
            for n, part in enumerate(parts, start=1)]


def _is_app(data: bytes, span: Span, marker: int, signature: bytes) -> bool:
    return span[0][0] == marker and data[span[1] + 4:span[1] + 4 + len(signature)] == signature


def splice_jpeg_head(head: bytes, exif: bytes | None, icc: bytes | None) -> Injected:
    """The splice of a JPEG, applied to its first bytes: ``head`` must reach past the first scan's
    header (else MalformedError); the parts end with ``head``'s bytes from that scan on, so the
    rest of the file simply follows them. Everything it changes (APP segments) comes before it."""
    segments, sos = _jpeg_header_segments(head)
    skipped: list[str] = []
    if exif is not None and len(exif) > _JPEG_MAX_EXIF:
        # One APP1 segment cannot hold it, and multi-segment EXIF is not a standard anyone reads.
        skipped.append(f"exif: {len(exif)} bytes exceed the {_JPEG_MAX_EXIF}-byte JPEG APP1 limit")
        exif = None
    if icc is not None:
        problem = _icc_problem(icc, _jpeg_colour_space(head, segments))
        if problem is None and len(icc) > 255 * _ICC_CHUNK:  # the sequence number is one byte
            problem = f"icc: {len(icc)} bytes need more than 255 APP2 segments"
        if problem is not None:
            skipped.append(problem)
            icc = None
    if exif is None and icc is None:
        return Injected((head,), tuple(skipped))
    new = [jpeg_segment(_JPEG_APP1, EXIF_HEADER + exif)] if exif is not None else []
    new += _icc_app2_segments(icc) if icc is not None else []
    kept = [span for span in segments
            if not (exif is not None and _is_app(head, span, _JPEG_APP1, EXIF_HEADER))
            and not (icc is not None and _is_app(head, span, _JPEG_APP2, _ICC_SIGNATURE))]
    # JFIF (and its JFXX extension) must stay directly after SOI; EXIF and ICC follow it.
    lead = next((i for i, span in enumerate(kept) if span[0][0] != _JPEG_APP0), len(kept))
    view = memoryview(head)
    spans = [(start, end) for _, start, end in kept]
    after = _merged_views(view, [*spans[lead:], (sos, len(head))])
    return Injected(_nonempty([_JPEG_SOI, *_merged_views(view, spans[:lead]), *new, *after]), tuple(skipped))


_splice_jpeg = splice_jpeg_head  # the whole file is a head that reaches past the first scan's header


# ---------------------------------------------------------------------------------------------- WebP


def riff_chunks(data: bytes) -> list[Span]:
    """The chunks of a RIFF/WEBP file; each span includes the pad byte that keeps chunks at even offsets."""
    file_end = 8 + struct.unpack_from("<I", data, 4)[0]
    if file_end > len(data) or file_end % 2:
        raise MalformedError("RIFF size does not match the file")
    chunks: list[Span] = []
    pos = 12
    while pos < file_end:
        if pos + 8 > file_end:
            raise MalformedError("truncated RIFF chunk header")
        size = struct.unpack_from("<I", data, pos + 4)[0]
        end = pos + 8 + size + (size & 1)
        if end > file_end:
            raise MalformedError(f"WebP chunk {data[pos:pos + 4]!r} runs past the RIFF end")
        chunks.append((data[pos:pos + 4], pos, end))
        pos = end
    if not chunks:
        raise MalformedError("WebP has no chunks")
    return chunks


def riff_chunk(fourcc: bytes, payload: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) & 1)


def _simple_webp_header(data: bytes, chunk: Span) -> tuple[int, bytes]:
    """VP8X alpha flag and 24-bit canvas (width-1, height-1) read from a simple file's bitstream header."""
    fourcc, start, end = chunk
    head = data[start + 8:min(end, start + 18)]
    if fourcc == b"VP8 " and len(head) == 10 and head[3:6] == b"\x9d\x01\x2a":
        # frame tag(3) start code(3) then 14-bit width and height, each topped by 2 scaling bits
        width, height = (struct.unpack_from("<H", head, i)[0] & 0x3FFF for i in (6, 8))
        alpha = False
    elif fourcc == b"VP8L" and len(head) >= 5 and head[0] == 0x2F:
        bits = struct.unpack_from("<I", head, 1)[0]  # width-1 (14) height-1 (14) alpha_is_used (1) version (3)
        width, height, alpha = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool(bits >> 28 & 1)
    else:
        raise MalformedError(f"WebP does not start with a VP8X, VP8 or VP8L header (found {fourcc!r})")
    if not width or not height:
        raise MalformedError("WebP bitstream declares an empty canvas")
    canvas = struct.pack("<I", width - 1)[:3] + struct.pack("<I", height - 1)[:3]
    return (_WEBP_ALPHA if alpha else 0), canvas


def _splice_webp(image: bytes, exif: bytes | None, icc: bytes | None) -> Injected:
    chunks = riff_chunks(image)
    if chunks[0][0] == b"VP8X":
        start = chunks[0][1]
        if chunks[0][2] - start < 18:
            raise MalformedError("VP8X chunk is shorter than 10 bytes")
        flags, canvas, body = image[start + 8], image[start + 12:start + 18], chunks[1:]
    else:
        (flags, canvas), body = _simple_webp_header(image, chunks[0]), chunks
    problem = None if icc is None else _icc_problem(icc, b"RGB ")  # WebP always decodes to RGB(A)
    icc = None if problem else icc
    skipped = (problem,) if problem else ()
    if icc is None and exif is None:
        return Injected((image,), skipped)
    drop = {fourcc for fourcc, value in ((b"ICCP", icc), (b"EXIF", exif)) if value is not None}
    view = memoryview(image)
    parts: list[tuple[bytes, bytes | memoryview]] = [(fourcc, view[s:e]) for fourcc, s, e in body if fourcc not in drop]
    # Extended layout: VP8X, ICCP, image data (ALPH/VP8/VP8L or ANIM/ANMF), EXIF, then XMP and unknown chunks.
    if exif is not None:
        after_image = max((i + 1 for i, (fourcc, _) in enumerate(parts) if fourcc in _WEBP_IMAGE_CHUNKS), default=0)
        parts.insert(after_image, (b"EXIF", riff_chunk(b"EXIF", exif)))
    if icc is not None:
        parts.insert(0, (b"ICCP", riff_chunk(b"ICCP", icc)))
    present = {fourcc for fourcc, _ in parts}
    flags = flags & ~(_WEBP_ICC | _WEBP_EXIF)
    flags |= (_WEBP_ICC if b"ICCP" in present else 0) | (_WEBP_EXIF if b"EXIF" in present else 0)
    chunk_data = [riff_chunk(b"VP8X", bytes((flags, 0, 0, 0)) + canvas), *(data for _, data in parts)]
    riff_size = 4 + sum(len(data) for data in chunk_data)
    return Injected(_nonempty([b"RIFF", struct.pack("<I", riff_size), b"WEBP", *chunk_data]), skipped)


_SPLICERS: Final[dict[str, Callable[[bytes, bytes | None, bytes | None], Injected]]] = {
    "PNG": _splice_png, "JPEG": _splice_jpeg, "WEBP": _splice_webp}
