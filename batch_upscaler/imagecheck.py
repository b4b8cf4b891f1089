"""Check the structure of encoded PNG, JPEG and WebP bytes, and read their pixel size, without decoding pixels.

Two strengths of one check:

* ``check_encoded`` is strict, for the image a model returned: every PNG chunk's length and CRC,
  IHDR first, an IDAT, IEND last and nothing after it; every JPEG segment and scan up to the
  end-of-image marker at the end of the file; every WebP chunk and the RIFF length. A 200 answer
  whose image fails it must not be recorded as a success.
* ``check_file`` (a file on disk) and ``check_input`` (the same bytes in memory) are lenient, for
  the source images a user has: they only ask whether the file is complete, with bounded I/O, and
  accept what real cameras and phones write (trailers after a JPEG's end, a second MPO image).
  Both run the same code over a different reader, so the scan and the upload refuse the same files.

Neither decodes pixels: the cost is a walk over the file's structure plus, for PNG, a CRC-32 of
its bytes and, for JPEG, one search through the entropy-coded data for the markers that end it.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

try:  # ISA-L's CRC-32 is 4-12x zlib's (0.03-0.05 vs 0.19-0.43 ms/MB, bench/structure_cost.py)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same result, slower
    from zlib import crc32

__all__ = ["JPEG_NO_EOI", "PNG_NO_IEND", "Structure", "StructureError", "check_encoded", "check_file", "check_input"]


@dataclass(frozen=True)
class Structure:
    """An encoded image whose structure checked out, and the pixel size its header gives."""

    format: str  # "PNG" | "JPEG" | "WEBP"
    width: int
    height: int


class StructureError(ValueError):
    """The bytes are not a complete, well-formed PNG, JPEG or WebP; the message says where and why."""


# The lenient check's messages are the ones probe.truncation has always recorded (tests and reports match them).
PNG_NO_IEND = "PNG has no IEND chunk at its end"
JPEG_NO_EOI = "JPEG data ends before its end-of-image marker"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_PNG_CHUNK_HEAD = struct.Struct(">I4s")
_PNG_MAX_LENGTH = 2**31 - 1  # the PNG spec's limit for a chunk length

# JPEG markers. Standalone ones carry no length field; every other marker starts a segment.
_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), _SOI, _EOI})  # TEM, RST0-7, SOI, EOI
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers; C4 DHT, C8 JPG and CC DAC are not
# The first marker after entropy-coded data: a 0xFF there is always followed by 0x00 (stuffing) or
# RST0-7 inside the scan, so any other byte (fill bytes 0xFF aside) ends it. Searched in C by re.
_MARKER_AFTER_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_EOI = re.compile(rb"\xff\xd9")  # re finds this ~2.8x faster than bytes.find (0.27 vs 0.75 ms/MB)
# Model outputs: a few NUL/whitespace bytes after EOI are padding some pipelines add; anything more is an error.
_JPEG_SLACK = 16

_WEBP_IMAGE_CHUNKS = (b"VP8 ", b"VP8L")
_TAIL_WINDOW = 1 << 20  # check_file looks for a JPEG's end-of-image marker in this much of the file's end
_HEAD_BYTES = 1 << 16  # check_file reads this much of the start once: the headers of most files fit


class _Source(Protocol):
    """Bytes to check, in memory or in a file: the lenient checks read through this only."""

    size: int

    def read(self, offset: int, length: int) -> bytes | memoryview:
        """Up to ``length`` bytes from ``offset`` (fewer at the end of the data)."""
        ...

    def has_eoi(self, start: int) -> bool:
        """Whether a JPEG end-of-image marker (FF D9) occurs at or after ``start``."""
        ...


class _Buffer:
    """Bytes already in memory; reads are views, never copies."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.view = memoryview(data).cast("B")
        self.size = len(self.view)

    def read(self, offset: int, length: int) -> memoryview:
        return self.view[offset:offset + length]

    def has_eoi(self, start: int) -> bool:
        return _JPEG_EOI.search(self.view, start) is not None


class _File:
    """A file read with positioned reads: its first 64 KiB once, then only the bytes a check asks for."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.head = os.pread(fd, min(size, _HEAD_BYTES), 0)

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if offset + length <= len(self.head):
            return self.head[offset:offset + length]
        return os.pread(self.fd, length, offset)

    def has_eoi(self, start: int) -> bool:
        """The last 1 MiB first (where the marker is unless a long trailer follows), then the rest.

        The answer is always the one a full read gives: only where the tail has no marker is the
        file read from ``start`` (a truncated file, or a trailer longer than the window).
        """
        tail = max(start, self.size - _TAIL_WINDOW)
        if _JPEG_EOI.search(self.read(tail, self.size - tail)) is not None:
            return True
        # A marker straddling the window's first byte starts at tail - 1: read one byte past it.
        for offset in range(start, tail, _TAIL_WINDOW):
            if _JPEG_EOI.search(self.read(offset, min(_TAIL_WINDOW, tail - offset) + 1)) is not None:
                return True
        return False


def check_encoded(data: bytes | bytearray | memoryview) -> Structure:
    """The strict check for an image a model returned: raises StructureError unless it is whole and well formed."""
    view = memoryview(data).cast("B")
    fmt = _sniff(view, strict=True)
    if fmt == "PNG":
        found = _check_png(view)
    elif fmt == "JPEG":
        found = _check_jpeg(view)
    else:
        found = _check_webp(view)
    if found.width <= 0 or found.height <= 0:
        raise StructureError(f"{fmt} header gives a zero size ({found.width}x{found.height})")
    return found


def check_file(path: Path, size: int) -> Structure | None:
    """The lenient check for a source file of ``size`` bytes, with bounded I/O.

    Raises StructureError for a truncated or broken PNG, JPEG or WebP; returns None for formats it
    does not check (TIFF, BMP, GIF, HEIC ... and files that are no image at all: the header probe
    reports those). OSError propagates; O_NONBLOCK makes a FIFO fail (ESPIPE) instead of waiting.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return _check_leniently(_File(fd, size))
    finally:
        os.close(fd)


def check_input(data: bytes | bytearray | memoryview) -> Structure | None:
    """``check_file`` for a source file's bytes already in memory (the same checks, the same answers)."""
    return _check_leniently(_Buffer(data))


def _check_leniently(source: _Source) -> Structure | None:
    fmt = _sniff(source.read(0, 12), strict=False)
    if fmt == "PNG":
        return _png_leniently(source)
    if fmt == "JPEG":
        return _jpeg_leniently(source)
    if fmt == "WEBP":
        return _webp_leniently(source)
    return None


def _sniff(head: bytes | memoryview, *, strict: bool) -> str | None:
    """The format from the first bytes (the signatures Pillow accepts); strict: an error instead of None."""
    head = bytes(head[:12])
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head.startswith(_JPEG_SIGNATURE):
        return "JPEG"
    if len(head) >= 12 and head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if not strict:
        return None
    if not head:
        raise StructureError("no image data (0 bytes)")
    if len(head) < 12 and any(sig.startswith(head) for sig in (_PNG_SIGNATURE, _JPEG_SIGNATURE, b"RIFF")):
        raise StructureError(f"image data ends after {len(head)} bytes, inside its file signature")
    raise StructureError("not a PNG, JPEG or WebP file")


# PNG ------------------------------------------------------------------------------------------


def _png_chunks(read: Callable[[int, int], bytes | memoryview], size: int) -> Iterator[tuple[int, bytes, int]]:
    """(offset, type, data length) of each chunk whose 8-byte header is in the data, in file order."""
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= size:
        length, kind = _PNG_CHUNK_HEAD.unpack(read(pos, 8))
        if not kind.isalpha():  # four ASCII letters; anything else means the walk left the chunk structure
            raise StructureError(f"PNG chunk at offset {pos} has an invalid type {kind!r}")
        if length > _PNG_MAX_LENGTH:
            raise StructureError(f"PNG chunk {kind.decode()} at offset {pos} declares {length} bytes")
        yield pos, kind, length
        pos += 12 + length  # length, type, data, CRC


def _ihdr_size(kind: bytes, length: int, data: bytes | memoryview) -> tuple[int, int]:
    """Width and height from the first chunk, which must be a 13-byte IHDR."""
    if kind != b"IHDR":
        raise StructureError(f"PNG starts with a {kind.decode()} chunk, not IHDR")
    if length != 13:
        raise StructureError(f"PNG IHDR chunk has {length} bytes, not 13")
    width, height = struct.unpack(">II", data[:8])
    return width, height


def _check_png(view: memoryview) -> Structure:
    size, dims, seen_idat = len(view), None, False
    for pos, kind, length in _png_chunks(_Buffer(view).read, size):
        end = pos + 12 + length
        if end > size:
            raise StructureError(f"PNG data ends inside chunk {kind.decode()} at offset {pos}")
        if dims is None:
            dims = _ihdr_size(kind, length, view[pos + 8:end - 4])
        # The CRC covers the type and the data; a view slice, so a 64 KiB IDAT is not copied.
        if crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            raise StructureError(f"PNG chunk {kind.decode()} at offset {pos}: CRC mismatch")
        seen_idat = seen_idat or kind == b"IDAT"
        if kind == b"IEND":
            if not seen_idat:
                raise StructureError("PNG has no IDAT chunk")
            if end != size:
                raise StructureError(f"PNG has {size - end} bytes after its IEND chunk")
            return Structure("PNG", *dims)
    raise StructureError(PNG_NO_IEND)


def _png_leniently(source: _Source) -> Structure:
    """Chunk headers only, by their lengths (no CRC: that would read every byte); IEND must be reached."""
    dims = None
    for pos, kind, length in _png_chunks(source.read, source.size):
        if pos + 12 + length > source.size:
            break  # cut inside this chunk
        if dims is None:
            dims = _ihdr_size(kind, length, source.read(pos + 8, 8))
        if kind == b"IEND":  # bytes after it are a trailer some tools append; decoders stop here
            return Structure("PNG", *dims)
    raise StructureError(PNG_NO_IEND)


# JPEG -----------------------------------------------------------------------------------------


def _jpeg_marker(source: _Source, pos: int) -> tuple[int, int, int]:
    """(marker, its offset, offset after its segment) for the marker at ``pos``, after any fill bytes."""
    while True:
        head = source.read(pos, 2)
        if len(head) < 2:
            raise StructureError(JPEG_NO_EOI)
        if head[0] != 0xFF or head[1] == 0x00:
            raise StructureError(f"JPEG has no marker at offset {pos}")
        if head[1] != 0xFF:
            break
        pos += 1  # 0xFF fill byte before a marker
    marker = head[1]
    if marker in _STANDALONE:
        return marker, pos, pos + 2
    field = source.read(pos + 2, 2)
    if len(field) < 2:
        raise StructureError(JPEG_NO_EOI)
    length = int.from_bytes(field, "big")
    if length < 2:
        raise StructureError(f"JPEG segment at offset {pos} declares a length of {length}")
    if pos + 2 + length > source.size:
        raise StructureError(JPEG_NO_EOI)
    return marker, pos, pos + 2 + length


def _jpeg_header(source: _Source) -> tuple[tuple[int, int], int]:
    """Walk the segments from SOI by their lengths: (width, height) from the frame header, offset of the first SOS."""
    pos, dims = 2, None
    while True:
        marker, at, pos = _jpeg_marker(source, pos)
        if marker == _SOS:
            if dims is None:
                raise StructureError(f"JPEG has no frame header before its first scan (offset {at})")
            return dims, at
        if marker in _SOF and dims is None:
            if pos - at < 10:  # marker, length, precision, height, width, component count
                raise StructureError(f"JPEG frame header at offset {at} is too short")
            height, width = struct.unpack(">HH", source.read(at + 5, 4))
            dims = width, height
        elif marker in (_SOI, _EOI):
            raise StructureError(f"JPEG has a misplaced {'start' if marker == _SOI else 'end'}-of-image "
                                 f"marker at offset {at}")


def _jpeg_end(buffer: _Buffer, pos: int) -> int:
    """Offset just after the EOI, walking from the first SOS: each scan's entropy-coded data, then segments.

    A progressive JPEG has several scans with tables (DHT) between them; a baseline one has one.
    """
    in_scan = False
    while True:
        if in_scan:
            found = _MARKER_AFTER_SCAN.search(buffer.view, pos)
            if found is None:
                raise StructureError(JPEG_NO_EOI)
            pos = found.start()
        marker, at, pos = _jpeg_marker(buffer, pos)
        if marker == _EOI:
            return pos
        if marker == _SOI:
            raise StructureError(f"JPEG has a second start-of-image marker at offset {at}")
        in_scan = marker == _SOS


def _check_jpeg(view: memoryview) -> Structure:
    buffer = _Buffer(view)
    (width, height), sos = _jpeg_header(buffer)
    end = _jpeg_end(buffer, sos)
    trailer = bytes(view[end:end + _JPEG_SLACK + 1])
    if len(trailer) > _JPEG_SLACK or trailer.strip(b"\0 \t\r\n"):
        raise StructureError(f"JPEG has {len(view) - end} bytes after its end-of-image marker")
    return Structure("JPEG", width, height)


def _jpeg_leniently(source: _Source) -> Structure:
    """Complete if an EOI follows the first SOS. EOI cannot occur inside entropy-coded data (0xFF
    is stuffed), so a cut file has none there; searching from the end instead would trip on phone
    trailers, and accepting any EOI lets an MPO's second image or a trailer follow."""
    (width, height), sos = _jpeg_header(source)
    if not source.has_eoi(sos):
        raise StructureError(JPEG_NO_EOI)
    return Structure("JPEG", width, height)


# WebP -----------------------------------------------------------------------------------------


def _webp_declared(source: _Source) -> int:
    """The file length the RIFF header declares (its size field counts everything after the first 8 bytes)."""
    return int.from_bytes(source.read(4, 4), "little") + 8


def _webp_chunks(source: _Source) -> Iterator[tuple[int, bytes, int]]:
    """(offset, FourCC, payload length) of each chunk; each must fit in the file."""
    pos = 12
    while pos < source.size:
        head = source.read(pos, 8)
        if len(head) < 8:
            raise StructureError(f"WebP data ends inside a chunk header at offset {pos}")
        kind, length = bytes(head[:4]), int.from_bytes(head[4:8], "little")
        end = pos + 8 + length
        if end > source.size:
            raise StructureError(f"WebP chunk {kind.decode('latin-1')!r} at offset {pos} declares {length} bytes, "
                                 f"past the end of the file")
        yield pos, kind, length
        # Odd payloads are padded to even; a writer that left out the last chunk's pad byte is
        # tolerated (the RIFF length already matched the file, and decoders accept it).
        pos = end + (length & 1)


def _webp_frame_size(kind: bytes, payload: bytes | memoryview, length: int, at: int) -> tuple[int, int]:
    """Width and height from the start of a VP8 (keyframe header), VP8L or VP8X chunk's payload of ``length`` bytes."""
    name = kind.decode("latin-1").strip()
    if kind == b"VP8 " and len(payload) >= 10:
        tag = int.from_bytes(payload[:3], "little")
        if tag & 1 or bytes(payload[3:6]) != b"\x9d\x01\x2a":  # bit 0 clear: a keyframe; then its start code
            raise StructureError(f"WebP VP8 chunk at offset {at} does not start with a keyframe")
        if tag >> 5 > length - 10:  # the first partition's size must fit in the chunk
            raise StructureError(f"WebP VP8 chunk at offset {at} declares a first partition longer than itself")
        width, height = struct.unpack("<HH", payload[6:10])
        return width & 0x3FFF, height & 0x3FFF  # the top two bits are the upscaling hint
    if kind == b"VP8L" and len(payload) >= 5:
        bits = int.from_bytes(payload[1:5], "little")
        if payload[0] != 0x2F or bits >> 29:  # signature byte; 3-bit version must be 0
            raise StructureError(f"WebP VP8L chunk at offset {at} has a bad signature or version")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X" and len(payload) >= 10:
        return int.from_bytes(payload[4:7], "little") + 1, int.from_bytes(payload[7:10], "little") + 1
    if kind in (b"VP8 ", b"VP8L", b"VP8X"):
        raise StructureError(f"WebP {name} chunk at offset {at} is too short")
    raise StructureError(f"WebP starts with a {kind!r} chunk, not VP8, VP8L or VP8X")


def _check_webp(view: memoryview) -> Structure:
    source = _Buffer(view)
    declared = _webp_declared(source)
    if declared != source.size:
        raise StructureError(f"WebP declares {declared} bytes but has {source.size}")
    chunks = list(_webp_chunks(source))
    if not chunks:
        raise StructureError("WebP has no chunks")
    at, kind, length = chunks[0]
    canvas = _webp_frame_size(kind, view[at + 8:at + 8 + length], length, at)
    if kind == b"VP8X":
        _check_extended(view, chunks, canvas)
    return Structure("WEBP", *canvas)


def _check_extended(view: memoryview, chunks: list[tuple[int, bytes, int]], canvas: tuple[int, int]) -> None:
    """A VP8X file holds animation frames, or one image whose size is the canvas (as libwebp's demuxer requires)."""
    kinds = [kind for _, kind, _ in chunks]
    if view[12 + 8] & 0x02:  # the animation flag
        if b"ANMF" not in kinds:
            raise StructureError("WebP is marked animated but has no ANMF frame")
        return
    images = [(at, kind, length) for at, kind, length in chunks if kind in _WEBP_IMAGE_CHUNKS]
    if len(images) != 1:
        raise StructureError(f"WebP extended file has {len(images)} image chunks, not 1")
    at, kind, length = images[0]
    size = _webp_frame_size(kind, view[at + 8:at + 8 + length], length, at)
    if size != canvas:
        raise StructureError(f"WebP canvas is {canvas[0]}x{canvas[1]} but its image is {size[0]}x{size[1]}")


def _webp_leniently(source: _Source) -> Structure:
    """Complete if the file holds the bytes its RIFF length declares (more is a tolerated trailer)."""
    declared = _webp_declared(source)
    if declared > source.size:
        raise StructureError(f"WebP declares {declared} bytes but has {source.size}")
    head = source.read(12, 8)
    if len(head) < 8:
        raise StructureError("WebP data ends inside its first chunk header")
    kind, length = bytes(head[:4]), int.from_bytes(head[4:8], "little")
    width, height = _webp_frame_size(kind, source.read(20, min(length, 16)), length, 12)
    return Structure("WEBP", width, height)


class NeedsWholeFile(Exception):
    """The first and last bytes do not settle it (a header larger than the head, say): read it all."""


_PNG_IEND = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last 8 bytes of a complete PNG


def check_ends(head: bytes, tail: bytes, size: int) -> Structure | None:
    """The lenient check from an object's first and last bytes only (two ranged GETs on S3).

    ``head`` is the first bytes (up to 64 KiB), ``tail`` the last (up to 1 MiB; the whole object
    when small). PNG: the header is whole and an IEND chunk lies in the tail (a trailer after it is
    tolerated, as in check_file). JPEG: the frame header and the first scan start within the head,
    and an end-of-image marker lies in the tail. WebP: the RIFF length fits the object. Raises
    StructureError for a cut file, NeedsWholeFile when these bytes cannot tell; None for formats it
    does not check.
    """
    head_source = _Buffer(head)
    fmt = _sniff(head[:12], strict=False)
    if fmt is None:
        return None
    if fmt == "WEBP":
        return _webp_leniently(_Sized(head_source, size))
    try:
        if fmt == "PNG":
            pos, kind, length = next(iter(_png_chunks(head_source.read, len(head))))
            dims = _ihdr_size(kind, length, head_source.read(pos + 8, 8))
        else:
            dims, _ = _jpeg_header(head_source)
    except (StructureError, StopIteration):
        if len(head) >= size:
            raise StructureError(PNG_NO_IEND if fmt == "PNG" else JPEG_NO_EOI) from None
        raise NeedsWholeFile(f"{fmt} header reaches beyond the first {len(head)} bytes") from None
    end_marker = _PNG_IEND if fmt == "PNG" else b"\xff\xd9"
    if end_marker not in tail:
        if len(tail) < size and fmt == "JPEG":
            raise NeedsWholeFile("no end-of-image marker in the last MiB (a long trailer?)")
        raise StructureError(PNG_NO_IEND if fmt == "PNG" else JPEG_NO_EOI)
    return Structure(fmt, *dims)


class _Sized:
    """A head buffer that knows the whole object's size (for the WebP length check)."""

    def __init__(self, head: _Buffer, size: int) -> None:
        self._head, self.size = head, size

    def read(self, offset: int, length: int) -> memoryview:
        return self._head.read(offset, length)

    def has_eoi(self, start: int) -> bool:
        return self._head.has_eoi(start)
