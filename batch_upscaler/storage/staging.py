"""A sink that writes an output file into the output store's staging directory as its bytes arrive.

The bytes are written in batches of :data:`FLUSH_BYTES` (256 KiB) in a worker thread (the event loop never
waits for the disk), the file's digest (``outputs.digest_parts``'s xxh3-128) and size are
computed on the way, and :meth:`StagingFileSink.commit` fsyncs and closes the file: it is then
whole and durable under its staging name, and ``LocalOutputStore.adopt`` renames it into place.

A paid image must not be lost to a full disk: if a write fails (ENOSPC, EROFS, EIO, ...), what
reached the file is read back and everything from then on is kept in memory, and commit returns
:class:`Spilled` with the whole output. The caller writes that the way it writes any output held
in memory, whose failure handling (stop the run, keep the image in ``unsent-outputs/``) applies.

Abort is safe at any moment, also while a batch is being written in a thread after the waiting
task was cancelled: the thread then closes and removes the file itself when it is done with it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import xxhash

# What one answer holds before it is written: 32 answers at 1 MiB held ~32 MB more at the peak
# than at 256 KiB, for no CPU saved; much smaller batches cost a thread hand-off per piece.
FLUSH_BYTES: Final = 1 << 18
_IOV_MAX: Final = 1024  # Linux's limit on the buffers of one writev
T = TypeVar("T")
STORAGE_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})


def storage_refuses(exc: OSError) -> bool:
    """A full, read-only or over-quota disk: the run stops (exit 75), the paid image is kept."""
    return exc.errno in STORAGE_FULL_ERRNOS


class Offload(Protocol):
    """Runs blocking work off the event loop: ``pool.Offload`` (``asyncio.to_thread``, or inline in tests)."""

    def __call__(self, func: Callable[..., T], /, *args: Any) -> Awaitable[T]: ...


@dataclass(frozen=True)
class StagedFile:
    """An output written whole and fsynced under its staging name."""

    path: Path
    size: int
    digest: str  # xxh3-128 hex, as outputs.digest_parts computes it


@dataclass(frozen=True)
class Spilled:
    """The staging file could not be written: the output is here in memory instead.

    ``parts`` is None only if what had reached the file could not even be read back.
    """

    parts: tuple[bytes, ...] | None
    error: OSError


class StagingFileSink:
    """Writes one output into ``directory`` (same filesystem as the output, for an atomic rename)."""

    def __init__(self, directory: Path, offload: Offload, mode: int, flush_bytes: int = FLUSH_BYTES) -> None:
        self._directory = directory
        self._mode = mode  # mkstemp makes 0600 files; an output gets what a plainly created file would
        self._offload = offload
        self._flush_bytes = flush_bytes
        self._hasher = xxhash.xxh3_128()
        self._size = 0
        self._pending: list[bytes | memoryview] = []
        self._pending_bytes = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._spilled: Spilled | None = None
        self._memory: list[bytes] = []  # after a spill: what the file does not hold
        self._flushed = 0  # bytes in the file so far
        self._state = threading.Lock()  # guards _busy and _aborted between the loop and a writer thread
        self._busy = self._aborted = False

    async def write(self, piece: bytes | memoryview) -> None:
        if not len(piece):
            return
        self._hasher.update(piece)
        self._size += len(piece)
        if self._spilled is not None:
            self._memory.append(bytes(piece))
            return
        self._pending.append(piece)
        self._pending_bytes += len(piece)
        if self._pending_bytes >= self._flush_bytes:
            await self._flush(sync=False)

    async def commit(self) -> StagedFile | Spilled:
        if self._spilled is None:
            await self._flush(sync=True)
        if self._spilled is not None:
            parts = None if self._spilled.parts is None else (*self._spilled.parts, *self._memory)
            return Spilled(parts, self._spilled.error)
        assert self._path is not None  # the final flush opened it
        return StagedFile(self._path, self._size, self._hasher.hexdigest())

    async def abort(self) -> None:
        # No await: this runs from except/finally blocks of cancelled tasks too.
        self._pending, self._memory = [], []
        with self._state:
            self._aborted = True
            if not self._busy:
                self._discard()

    async def _flush(self, sync: bool) -> None:
        parts, size = self._pending, self._pending_bytes
        self._pending, self._pending_bytes = [], 0
        try:
            await self._offload(self._in_thread, self._write_parts, parts, sync)
        except OSError as exc:
            await self._spill(exc, parts)
        else:
            self._flushed += size

    def _in_thread(self, work: Callable[..., None], *args: Any) -> None:
        """Run ``work`` unless aborted; an abort that came meanwhile is completed here."""
        with self._state:
            if self._aborted:
                return
            self._busy = True
        try:
            work(*args)
        finally:
            with self._state:
                self._busy = False
                if self._aborted:
                    self._discard()

    def _write_parts(self, parts: list[bytes | memoryview], sync: bool) -> None:
        if self._fd is None:
            self._fd, name = tempfile.mkstemp(dir=self._directory, suffix=".part")
            self._path = Path(name)
            os.fchmod(self._fd, self._mode)
        for start in range(0, len(parts), _IOV_MAX):
            _write_all(self._fd, parts[start:start + _IOV_MAX])
        if sync:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    async def _spill(self, error: OSError, batch: list[bytes | memoryview]) -> None:
        """Keep the output in memory from now on: what reached the file, then the rest of ``batch``
        (a failed write may have written part of it)."""
        written = await self._offload(self._in_thread_read_back)
        self._spilled = Spilled(None if written is None else (written,), error)
        rest = b"".join(batch)
        self._memory = [rest[len(written) - self._flushed:]] if written is not None else []

    def _in_thread_read_back(self) -> bytes | None:
        with self._state:
            self._busy = True
        try:
            return self._read_back()
        finally:
            with self._state:
                self._busy = False
                self._discard()

    def _read_back(self) -> bytes | None:
        if self._path is None:
            return b""
        try:
            return self._path.read_bytes()
        except OSError:
            return None

    def _discard(self) -> None:
        """Close and remove the staging file (called with ``_state`` held, never while writing)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            self._path = None


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    """writev until every byte is written (a regular file may take fewer bytes than asked)."""
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
