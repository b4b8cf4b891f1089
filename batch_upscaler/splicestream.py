"""``metadata.inject_with_report`` for an image that arrives in pieces: the same bytes, piece by piece.

A splice only changes the start of a PNG or a JPEG, so little has to be held:

* PNG: the new chunks go right after IHDR (the first ``metadata.PNG_HEAD`` bytes, from which
  ``metadata.png_splice`` decides everything), and the chunk types it replaces are left out
  wherever they are by a walk over the chunk headers as the pieces pass.
* JPEG: the new APP segments go among the segments before the first scan, so the head up to the
  first scan's header is held (it is a few hundred bytes), spliced by ``metadata.splice_jpeg_head``,
  and everything after it passes through. A header longer than :data:`JPEG_HEAD_LIMIT` (many
  large APP segments) makes the image be held whole instead.
* WebP is held whole and spliced at the end: its RIFF size field and VP8X flags come first in the
  file and depend on what is inserted. A model's WebP is small (~1 MB at 9.7 MP, quality 90).

For every image ``imagecheck.check_encoded`` accepts, the output is byte for byte
``inject_with_report``'s, and so are the notes in :attr:`StreamSplicer.skipped`. (A PNG damaged
past its head would be left unchanged by ``inject_with_report``, while this has already spliced
the head; the returned-image check refuses such an image, so it is never written either way.)
"""

from __future__ import annotations

import struct
from enum import Enum, auto
from typing import Final

from batch_upscaler.metadata import (
    PNG_HEAD,
    SNIFF_BYTES,
    UNKNOWN_FORMAT,
    MalformedError,
    SourceMetadata,
    carried_parts,
    container_of,
    inject_with_report,
    malformed_note,
    png_splice,
    splice_jpeg_head,
)

Part = bytes | memoryview
JPEG_HEAD_LIMIT: Final = 1 << 20
_PNG_CHUNK_HEAD = struct.Struct(">I4s")


class _Mode(Enum):
    SNIFF = auto()  # holding the first bytes until the container is known
    PNG_HEAD = auto()  # holding the signature and IHDR
    PNG_BODY = auto()  # chunks pass, the replaced types are left out
    JPEG_HEAD = auto()  # holding the segments up to the first scan's header
    WHOLE = auto()  # holding everything: spliced at the end (WebP, an overlong JPEG header)
    PASS = auto()  # nothing (more) to change


class StreamSplicer:
    """Feed the returned image's pieces in order; each call returns the output's next parts."""

    def __init__(self, meta: SourceMetadata) -> None:
        self.skipped: tuple[str, ...] = ()  # final once finish() has run
        self._meta = meta
        self._carried = carried_parts(meta)
        active = meta.exif is not None or meta.icc_profile is not None
        self._mode = _Mode.SNIFF if active else _Mode.PASS
        self._held = bytearray()
        self._next_try = 0  # the held JPEG head is tried again once it has grown to this size
        self._chunks: _PngChunkFilter | None = None

    def feed(self, piece: bytes | memoryview) -> list[Part]:
        if self._mode is _Mode.PASS:
            return [piece] if len(piece) else []
        if self._chunks is not None:
            return self._chunks.feed(memoryview(piece))
        self._held += piece
        return self._advance(final=False)

    def finish(self) -> list[Part]:
        """The last parts, once the image has ended."""
        if self._chunks is not None:
            return self._chunks.finish()
        return [] if self._mode is _Mode.PASS else self._advance(final=True)

    def _advance(self, final: bool) -> list[Part]:
        if self._mode is _Mode.SNIFF:
            if len(self._held) < SNIFF_BYTES and not final:
                return []
            container = container_of(self._held)
            if container is None:
                self.skipped = (UNKNOWN_FORMAT,)
                return self._release()
            self._mode = {"PNG": _Mode.PNG_HEAD, "JPEG": _Mode.JPEG_HEAD}.get(container, _Mode.WHOLE)
        if self._mode is _Mode.PNG_HEAD:
            return self._png_head(final)
        if self._mode is _Mode.JPEG_HEAD:
            return self._jpeg_head(final)
        if not final:
            return []
        injected = inject_with_report(bytes(self._held), self._meta)
        self.skipped, self._held = injected.skipped, bytearray()
        return list(injected.parts)

    def _png_head(self, final: bool) -> list[Part]:
        if len(self._held) < PNG_HEAD and not final:
            return []
        carried = self._carried
        try:
            plan = png_splice(self._held, carried.exif, carried.icc)
        except MalformedError as exc:
            self.skipped = (malformed_note(exc),)
            return self._release()
        self.skipped = carried.skipped + plan.skipped
        if not plan.insert:
            return self._release()
        held = memoryview(bytes(self._held))
        self._held, self._mode = bytearray(), _Mode.PNG_BODY
        self._chunks = _PngChunkFilter(plan.drop)
        rest = self._chunks.feed(held[PNG_HEAD:])
        return [held[:PNG_HEAD], *plan.insert, *rest, *(self._chunks.finish() if final else ())]

    def _jpeg_head(self, final: bool) -> list[Part]:
        # Tried again only when the head has doubled: a long header costs linear time, not quadratic.
        if len(self._held) < self._next_try and not final:
            return []
        carried = self._carried
        try:
            injected = splice_jpeg_head(bytes(self._held), carried.exif, carried.icc)
        except MalformedError as exc:  # the head is not complete yet, or the file is broken
            if final:
                self.skipped = (malformed_note(exc),)
                return self._release()
            if len(self._held) > JPEG_HEAD_LIMIT:
                self._mode = _Mode.WHOLE
            self._next_try = 2 * len(self._held)
            return []
        self.skipped = carried.skipped + injected.skipped
        self._held, self._mode = bytearray(), _Mode.PASS
        return list(injected.parts)

    def _release(self) -> list[Part]:
        """Give back what is held unchanged; from now on pieces pass through."""
        held, self._held, self._mode = bytes(self._held), bytearray(), _Mode.PASS
        return [held] if held else []


class _PngChunkFilter:
    """Passes the chunks that follow IHDR, leaving out those whose type is in ``drop``; after IEND,
    whatever follows passes too (as ``metadata._splice_png`` keeps it)."""

    def __init__(self, drop: frozenset[bytes]) -> None:
        self._drop = drop
        self._header = bytearray()  # a chunk header split between pieces
        self._left = 0  # bytes of the current chunk's data and CRC still to come
        self._keep = True
        self._last = False  # the current chunk is IEND
        self._after_end = False

    def feed(self, view: memoryview) -> list[Part]:
        out: list[Part] = []
        i, n = 0, len(view)
        while i < n:
            if self._after_end:
                out.append(view[i:])
                break
            if self._left:
                take = min(self._left, n - i)
                if self._keep:
                    out.append(view[i:i + take])
                self._left -= take
                i += take
                self._after_end = self._last and not self._left
                continue
            take = min(8 - len(self._header), n - i)
            self._header += view[i:i + take]
            i += take
            if len(self._header) == 8:
                self._start_chunk(out)
        return out

    def _start_chunk(self, out: list[Part]) -> None:
        length, kind = _PNG_CHUNK_HEAD.unpack(self._header)
        self._keep = kind not in self._drop
        if self._keep:
            out.append(bytes(self._header))
        self._header = bytearray()
        self._left = length + 4  # data, then the CRC
        self._last = kind == b"IEND"

    def finish(self) -> list[Part]:
        """A chunk header cut off by the end of the data passes as it is (the check refuses the image)."""
        header, self._header = bytes(self._header), bytearray()
        return [header] if header else []
