"""``imagecheck.check_encoded`` for an image that arrives in pieces: the same verdict and message.

A returned image is streamed to disk, so its strict check runs as the pieces pass, holding only a
few bytes: PNG chunk by chunk (each chunk's CRC-32 carried from piece to piece); JPEG by holding
the segments up to the first scan (a few hundred bytes, walked by imagecheck's own header code),
then searching the entropy-coded data piece by piece with imagecheck's regular expression (a 0xFF
that ends a piece is carried over) and walking the markers between scans. WebP is held whole and
checked by ``check_encoded`` at the end: its RIFF length is only meaningful against the whole size,
and a model's WebP is small.

An error is raised as soon as it is certain, that is, as soon as ``check_encoded`` would raise it
whatever bytes followed; an error that depends on where the data ends (cut inside a chunk, bytes
after the end) waits for :meth:`StreamCheck.finish`. Either way it is the error ``check_encoded``
raises for the whole image (tests/test_streaming.py compares them on every sample, cut, damaged
and split at random).
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Final, Protocol

from batch_upscaler.imagecheck import (
    _EOI,
    _JPEG_SLACK,
    _MARKER_AFTER_SCAN,
    _PNG_CHUNK_HEAD,
    _PNG_MAX_LENGTH,
    _SOI,
    _SOS,
    _STANDALONE,
    JPEG_NO_EOI,
    PNG_NO_IEND,
    Structure,
    StructureError,
    _Buffer,
    _ihdr_size,
    _jpeg_header,
    _sniff,
    check_encoded,
)

try:  # the CRC-32 imagecheck uses (ISA-L's, else zlib's)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency
    from zlib import crc32

_SNIFF_BYTES: Final = 12  # imagecheck._sniff decides from this many bytes
# After 0xFF inside entropy-coded data these bytes do not end the scan (stuffing, RST0-7, fill).
_SCAN_GOES_ON: Final = frozenset({0x00, *range(0xD0, 0xD8), 0xFF})


class _Walker(Protocol):
    def feed(self, view: memoryview) -> None: ...
    def finish(self) -> Structure: ...


class StreamCheck:
    """Feed the image's pieces in order, then :meth:`finish`; both raise StructureError."""

    def __init__(self) -> None:
        self._head = bytearray()  # the first bytes, until the format is known
        self._walker: _Walker | None = None

    def feed(self, piece: bytes | memoryview) -> None:
        if self._walker is None:
            if self._head or len(piece) < _SNIFF_BYTES:
                self._head += piece
                if len(self._head) < _SNIFF_BYTES:
                    return
                piece, self._head = bytes(self._head), bytearray()
            fmt = _sniff(memoryview(piece)[:_SNIFF_BYTES], strict=True)
            self._walker = _PngWalker() if fmt == "PNG" else _JpegWalker() if fmt == "JPEG" else _Whole()
        self._walker.feed(memoryview(piece))

    def finish(self) -> Structure:
        """The structure of the whole image (raises StructureError as ``check_encoded`` would)."""
        if self._walker is None:
            return check_encoded(bytes(self._head))  # fewer bytes than a signature needs
        found = self._walker.finish()
        if found.width <= 0 or found.height <= 0:
            raise StructureError(f"{found.format} header gives a zero size ({found.width}x{found.height})")
        return found


class _Whole:
    """Holds everything and checks it at the end (WebP)."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, view: memoryview) -> None:
        self._data += view

    def finish(self) -> Structure:
        return check_encoded(bytes(self._data))


# PNG ------------------------------------------------------------------------------------------


class _P(Enum):
    SIGNATURE = auto()
    HEADER = auto()  # a chunk's length and type
    DATA = auto()
    CRC = auto()
    END = auto()  # after IEND: only counting


class _PngWalker:
    """imagecheck._check_png, one piece at a time: offsets, CRCs and messages as it has them."""

    def __init__(self) -> None:
        self._phase, self._want = _P.SIGNATURE, 8  # the signature was checked by the sniff
        self._field = bytearray()  # a fixed-size field (signature, chunk header, CRC) split between pieces
        self._at = 8  # offset of the current chunk
        self._kind, self._length, self._left, self._crc = b"", 0, 0, 0
        self._ihdr = bytearray()  # the first chunk's first 13 data bytes
        self._dims: tuple[int, int] | None = None
        self._idat = False
        self._trailer = 0  # bytes after IEND

    def feed(self, view: memoryview) -> None:
        i, n = 0, len(view)
        while i < n:
            if self._phase is _P.END:
                self._trailer += n - i
                return
            if self._phase is _P.DATA:
                take = min(self._left, n - i)
                part = view[i:i + take]
                self._crc = crc32(part, self._crc)
                if self._dims is None and len(self._ihdr) < 13:
                    self._ihdr += part[:13 - len(self._ihdr)]
                self._left -= take
                i += take
                if not self._left:
                    self._expect(_P.CRC, 4)
                continue
            take = min(self._want - len(self._field), n - i)
            self._field += view[i:i + take]
            i += take
            if len(self._field) == self._want:
                self._field_done(bytes(self._field))

    def _expect(self, phase: _P, size: int) -> None:
        self._phase, self._want, self._field = phase, size, bytearray()

    def _field_done(self, field: bytes) -> None:
        if self._phase is _P.SIGNATURE:
            self._expect(_P.HEADER, 8)
        elif self._phase is _P.HEADER:
            self._chunk_header(field)
        else:
            self._chunk_done(int.from_bytes(field, "big"))

    def _chunk_header(self, field: bytes) -> None:
        length, kind = _PNG_CHUNK_HEAD.unpack(field)
        if not kind.isalpha():
            raise StructureError(f"PNG chunk at offset {self._at} has an invalid type {kind!r}")
        if length > _PNG_MAX_LENGTH:
            raise StructureError(f"PNG chunk {kind.decode()} at offset {self._at} declares {length} bytes")
        self._kind, self._length, self._left, self._crc = kind, length, length, crc32(kind)
        if length:
            self._phase = _P.DATA
        else:
            self._expect(_P.CRC, 4)

    def _chunk_done(self, stored_crc: int) -> None:
        kind = self._kind
        if self._dims is None:
            self._dims = _ihdr_size(kind, self._length, bytes(self._ihdr))
        if self._crc != stored_crc:
            raise StructureError(f"PNG chunk {kind.decode()} at offset {self._at}: CRC mismatch")
        self._idat = self._idat or kind == b"IDAT"
        self._at += 12 + self._length
        if kind != b"IEND":
            self._expect(_P.HEADER, 8)
        elif not self._idat:
            raise StructureError("PNG has no IDAT chunk")
        else:
            self._phase = _P.END

    def finish(self) -> Structure:
        if self._phase is _P.END:
            if self._trailer:
                raise StructureError(f"PNG has {self._trailer} bytes after its IEND chunk")
            assert self._dims is not None  # set by the first chunk, and IEND came after it
            return Structure("PNG", *self._dims)
        if self._phase in (_P.DATA, _P.CRC):
            raise StructureError(f"PNG data ends inside chunk {self._kind.decode()} at offset {self._at}")
        raise StructureError(PNG_NO_IEND)


# JPEG -----------------------------------------------------------------------------------------


class _J(Enum):
    HEAD = auto()  # holding the bytes up to the first scan's header
    MARKER = auto()  # two bytes: 0xFF and the marker (fill bytes skipped)
    LENGTH = auto()  # a segment's two length bytes
    SKIP = auto()  # a segment's payload
    SCAN = auto()  # entropy-coded data, searched for the marker that ends it
    TRAILER = auto()  # after EOI: only counting


class _JpegWalker:
    """imagecheck._check_jpeg, one piece at a time."""

    def __init__(self) -> None:
        self._phase = _J.HEAD
        self._head = bytearray()
        self._next_try = 0  # the held head is walked again once it has grown to this size
        self._dims = (0, 0)
        self._pos = 0  # offset of the first byte of the next piece to walk
        self._field = bytearray()
        self._marker, self._at, self._left = 0, 0, 0
        self._ff_at: int | None = None  # SCAN: the previous piece ended with a 0xFF at this offset
        self._trailer = bytearray()  # the first bytes after EOI
        self._trailing = 0

    def feed(self, view: memoryview) -> None:
        if self._phase is _J.HEAD:
            self._head += view
            if len(self._head) < self._next_try or not self._header_found(final=False):
                return
            head, self._head = bytes(self._head), bytearray()
            view = memoryview(head)[self._pos:]
        self._walk(view)

    def _header_found(self, final: bool) -> bool:
        """Walk the held head's segments as check_encoded does; False when it needs more bytes."""
        try:  # a copy: an exception's traceback must not pin a view of the growing head
            self._dims, self._pos = _jpeg_header(_Buffer(bytes(self._head)))
        except StructureError as exc:
            if final or str(exc) != JPEG_NO_EOI:
                raise
            self._next_try = 2 * len(self._head)  # doubling: a long header costs linear time
            return False
        self._phase = _J.MARKER
        return True

    def _walk(self, view: memoryview) -> None:
        i, n, base = 0, len(view), self._pos
        while i < n:
            if self._phase is _J.SCAN:
                i = self._scan(view, i, base)
            elif self._phase is _J.SKIP:
                take = min(self._left, n - i)
                self._left -= take
                i += take
                if not self._left:
                    self._segment_done()
            elif self._phase is _J.TRAILER:
                self._trailing += n - i
                self._trailer += view[i:i + _JPEG_SLACK + 1 - len(self._trailer)]
                i = n
            else:
                take = min(2 - len(self._field), n - i)
                self._field += view[i:i + take]
                i += take
                if len(self._field) == 2:
                    self._two_bytes(bytes(self._field), base + i - 2)
        self._pos = base + n

    def _two_bytes(self, field: bytes, at: int) -> None:
        """A marker (``at`` is its offset) or a segment length has been read."""
        self._field = bytearray()
        if self._phase is _J.LENGTH:
            length = int.from_bytes(field, "big")
            if length < 2:
                raise StructureError(f"JPEG segment at offset {self._at} declares a length of {length}")
            self._left = length - 2
            if self._left:
                self._phase = _J.SKIP
            else:
                self._segment_done()
            return
        if field[0] != 0xFF or field[1] == 0x00:
            raise StructureError(f"JPEG has no marker at offset {at}")
        if field[1] == 0xFF:  # a fill byte: the marker starts one byte further
            self._field = bytearray(b"\xff")
            return
        self._marker, self._at = field[1], at
        if field[1] not in _STANDALONE:
            self._phase = _J.LENGTH
        elif field[1] == _EOI:
            self._phase = _J.TRAILER
        elif field[1] == _SOI:
            raise StructureError(f"JPEG has a second start-of-image marker at offset {at}")

    def _segment_done(self) -> None:
        self._phase = _J.SCAN if self._marker == _SOS else _J.MARKER

    def _scan(self, view: memoryview, i: int, base: int) -> int:
        """Find where the entropy-coded data ends: the offset of the marker that ends it."""
        if self._ff_at is not None:
            self._ff_at = None
            if view[i] not in _SCAN_GOES_ON:  # the 0xFF that ended the last piece starts the marker
                self._phase, self._field = _J.MARKER, bytearray(b"\xff")
                return i
        found = _MARKER_AFTER_SCAN.search(view, i)
        if found is None:
            if view[-1] == 0xFF:
                self._ff_at = base + len(view) - 1
            return len(view)
        self._phase = _J.MARKER
        return found.start()

    def finish(self) -> Structure:
        if self._phase is _J.HEAD:
            return check_encoded(bytes(self._head))  # the head is the whole image
        if self._phase is not _J.TRAILER:
            raise StructureError(JPEG_NO_EOI)
        trailer = bytes(self._trailer)
        if len(trailer) > _JPEG_SLACK or trailer.strip(b"\0 \t\r\n"):
            raise StructureError(f"JPEG has {self._trailing} bytes after its end-of-image marker")
        return Structure("JPEG", *self._dims)
