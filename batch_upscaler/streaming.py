"""Stream an InvokeModel answer's image into a sink as the body arrives, never holding the body.

:func:`receive` reads the body piece by piece, lets ``jsonscan.ResponseScanner`` find and decode
the image, and writes the decoded pieces to an :class:`ImageSink`. Only once the whole body has
been read and judged (a ``finish_reasons`` after the image can still filter it) is the sink
committed; on any failure it is aborted, so nothing of a bad answer is kept. Memory per answer is
one piece of the body and one decoded piece, whatever the image's size.

Sinks compose: :class:`CheckedSink` runs the returned-image check (``streamcheck``) on the pieces
as they pass, :class:`SplicingSink` splices the source's metadata in (``splicestream``), and the
innermost sink stores the bytes: :class:`MemorySink` here, ``staging.StagingFileSink`` for a file
in the output store's staging directory.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from batch_upscaler.imagecheck import Structure, StructureError
from batch_upscaler.jsonscan import ResponseScanner
from batch_upscaler.metadata import SourceMetadata
from batch_upscaler.retry import AttemptError
from batch_upscaler.splicestream import StreamSplicer
from batch_upscaler.streamcheck import StreamCheck

log = logging.getLogger(__name__)
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
# Bytes asked of the body per read: aiohttp hands out what it has buffered, up to this. Larger
# reads join several socket reads into one copy and make the decoded pieces bigger; at 1 MiB the
# pool's peak RSS at concurrency 32 was ~25 MB higher for the same CPU (docs/benchmarks.md).
READ_SIZE = 1 << 18


class ImageSink(Protocol[T_co]):
    """Where decoded image bytes go: ``write`` pieces in order, then ``commit`` or ``abort`` once."""

    async def write(self, piece: bytes | memoryview) -> None: ...

    async def commit(self) -> T_co:
        """Everything was written and the answer is good: make it the result (raises ImageRejected
        if the image itself turns out to be unusable; the sink is then already aborted)."""
        ...

    async def abort(self) -> None:
        """The answer is not used: drop whatever was written. Safe to call more than once."""
        ...


class ImageRejected(Exception):
    """The returned image is not usable (damaged, wrong format or aspect): a ``bad_response``."""


@dataclass(frozen=True)
class Received(Generic[T]):
    """A checked image: its structure (format, pixel size) and what the inner sink made of it."""

    image: Structure
    stored: T


async def receive(read: Callable[[int], Awaitable[bytes]], sink: ImageSink[T]) -> T | AttemptError:
    """Read a 200 body through ``read(n)`` (b"" at its end) into ``sink``.

    Exceptions from ``read`` (time-outs, lost connections) propagate after the sink is aborted;
    the caller turns them into attempt errors.
    """
    scanner = ResponseScanner()
    try:
        while scanner.verdict is None and (data := await read(READ_SIZE)):
            for piece in scanner.feed(data):
                await sink.write(piece)
        problem = scanner.finish()
    except BaseException:
        await sink.abort()
        raise
    if problem is not None:
        await sink.abort()
        return problem
    try:
        return await sink.commit()
    except ImageRejected as exc:
        return AttemptError("bad_response", str(exc))


async def feed_bytes(image: bytes, sink: ImageSink[T]) -> T | AttemptError:
    """An image already in memory (a transport that returns bytes) through the same sink."""
    try:
        await sink.write(image)
    except BaseException:
        await sink.abort()
        raise
    try:
        return await sink.commit()
    except ImageRejected as exc:
        return AttemptError("bad_response", str(exc))


class MemorySink:
    """Collects the bytes in memory (the padded path, which decodes the image to crop it; tests)."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []

    async def write(self, piece: bytes | memoryview) -> None:
        self._pieces.append(bytes(piece) if isinstance(piece, memoryview) else piece)

    async def commit(self) -> bytes:
        data = b"".join(self._pieces)
        self._pieces = []
        return data

    async def abort(self) -> None:
        self._pieces = []


Judge = Callable[[Structure | StructureError], str | None]


class CheckedSink(Generic[T]):
    """Checks the image's structure as it passes (``check_encoded``'s rules and messages), then asks
    ``judge`` about it (format, aspect ratio): a problem rejects the image at commit.

    Once the structure is known to be broken nothing more reaches ``inner``: it is aborted at once.
    """

    def __init__(self, inner: ImageSink[T], judge: Judge) -> None:
        self._inner = inner
        self._judge = judge
        self._check = StreamCheck()
        self._broken: StructureError | None = None

    async def write(self, piece: bytes | memoryview) -> None:
        if self._broken is not None:
            return
        try:
            self._check.feed(piece)
        except StructureError as exc:
            self._broken = exc
            await self._inner.abort()
            return
        await self._inner.write(piece)

    async def commit(self) -> Received[T]:
        found: Structure | StructureError
        try:
            found = self._broken or self._check.finish()
        except StructureError as exc:
            found = exc
        problem = self._judge(found)
        if problem is not None or isinstance(found, StructureError):
            await self._inner.abort()
            raise ImageRejected(problem or str(found))
        return Received(found, await self._inner.commit())

    async def abort(self) -> None:
        await self._inner.abort()


class SplicingSink(Generic[T]):
    """Splices the source's EXIF and ICC profile into the image on its way to ``inner``."""

    def __init__(self, inner: ImageSink[T], meta: SourceMetadata) -> None:
        self._inner = inner
        self._splicer = StreamSplicer(meta)

    async def write(self, piece: bytes | memoryview) -> None:
        for part in self._splicer.feed(piece):
            await self._inner.write(part)

    async def commit(self) -> T:
        for part in self._splicer.finish():
            await self._inner.write(part)
        for reason in self._splicer.skipped:
            log.info("metadata not carried: %s", reason)
        return await self._inner.commit()

    async def abort(self) -> None:
        await self._inner.abort()
