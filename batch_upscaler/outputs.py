"""Where outputs go: path mapping inside the output root and atomic, durable writes.

This is the file-access edge for outputs (a future S3 store implements the same
:class:`OutputStore` protocol). Writes go to a staging directory inside the output root (same
filesystem, so the final ``os.replace`` is atomic), are fsynced, then renamed into place: a
reader, or a run resumed after ``kill -9``, sees either no file or the whole file. The staging
directory is hidden, so discovery never mistakes its contents for inputs, and it is emptied at the
start of every run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

STAGING_DIR = ".batch-upscaler-tmp"
# mkstemp creates 0600 files; outputs get the usual 0666 & ~umask. Read once, at import, while
# the process is single-threaded (os.umask can only be read by setting it).
_UMASK = os.umask(0)
os.umask(_UMASK)


def new_file_mode() -> int:
    """The mode a plainly created file would get (mkstemp's 0600 is for secrets, not reports)."""
    return 0o666 & ~_UMASK


# An output file as consecutive parts (the returned image's bytes around spliced metadata chunks),
# written one after another so the file is never first assembled into a second ~10 MB buffer.
FileParts = Sequence[bytes | memoryview]


class OutputPathError(ValueError):
    """A rendered output path would leave the output root."""


class OutputStore(Protocol):
    def exists(self, relpath: str, size: int | None) -> bool: ...
    def read(self, relpath: str) -> bytes: ...
    def write_atomic(self, relpath: str, parts: FileParts, mtime_ns: int | None = None) -> int: ...
    def clean_staging(self) -> int: ...


class LocalOutputStore:
    """Outputs in a local directory tree."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, relpath: str) -> Path:
        target = self.root / relpath
        # A symlinked directory inside the output tree must not carry a write elsewhere.
        real_root = os.path.realpath(self.root)
        real_parent = os.path.realpath(target.parent)
        if os.path.commonpath([real_root, real_parent]) != real_root:
            raise OutputPathError(f"{relpath}: resolves outside the output root {self.root}")
        return target

    def exists(self, relpath: str, size: int | None) -> bool:
        try:
            st = (self.root / relpath).stat()
        except OSError:
            return False
        return size is None or st.st_size == size

    def read(self, relpath: str) -> bytes:
        return self.path_of(relpath).read_bytes()

    def write_atomic(self, relpath: str, parts: FileParts, mtime_ns: int | None = None) -> int:
        """Write ``parts``, in order, to ``relpath`` so it appears complete or not at all; returns its size.

        ``mtime_ns`` (the source's modification time) is set before the rename, so the file never
        appears with another one.
        """
        staging = self.root / STAGING_DIR
        staging.mkdir(parents=True, exist_ok=True)
        target = self.path_of(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=staging, suffix=".part")
        try:
            os.fchmod(fd, new_file_mode())
            with os.fdopen(fd, "wb") as fh:
                fh.writelines(parts)  # parts above the buffer size go straight to write(2), uncopied
                fh.flush()
                os.fsync(fh.fileno())
            if mtime_ns is not None:
                os.utime(tmp, ns=(mtime_ns, mtime_ns))
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(target.parent)  # the rename itself must survive power loss
        return sum(len(part) for part in parts)

    def clean_staging(self) -> int:
        """Remove leftovers of writes a crash interrupted; returns how many were removed."""
        staging = self.root / STAGING_DIR
        if not staging.is_dir():
            return 0
        count = sum(1 for _ in staging.iterdir())
        shutil.rmtree(staging, ignore_errors=True)
        return count


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

