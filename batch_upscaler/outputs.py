"""Where outputs go: path checks inside the output root, the root's owner, and atomic, durable writes.

This is the file-access edge for outputs (a future S3 store implements the same
:class:`OutputStore` protocol). Writes go to a staging directory inside the output root (same
filesystem, so the final ``os.replace`` is atomic), are fsynced, then renamed into place: a
reader, or a run resumed after ``kill -9``, sees either no file or the whole file.

Staging is per run (``.batch-upscaler-tmp/<run>/``, holding a flock on its own ``.lock`` for the
run's lifetime), so two jobs or two runs sharing an output root never delete each other's
half-written files: a leftover directory is removed only once its owner's lock is free, which the
kernel guarantees after its owner died. The staging directory is hidden, so discovery never
mistakes its contents for inputs.

Everything that can be known about a path before paying is checked by :meth:`check_path` at scan
time: a link that leads outside the root, a file where a directory must go, a name over the
filesystem's limit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, NoReturn, Protocol, runtime_checkable

import xxhash

from batch_upscaler.errors import OutputUnavailable, UsageError
from batch_upscaler.staging import Offload, Spilled, StagedFile, StagingFileSink

if TYPE_CHECKING:
    from batch_upscaler.streaming import ImageSink

STAGING_DIR = ".batch-upscaler-tmp"
OWNER_FILE = ".batch-upscaler-job.json"
# The errors that say "this storage takes no more writes now", as opposed to "this one path is bad".
STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})
_OLD_LAYOUT_GRACE_S = 3600.0  # loose staging files from versions before per-run staging
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


def digest_parts(parts: FileParts) -> str:
    """The digest recorded for an output: proof that a file on disk is still what was written.

    xxh3-128 (≈40 µs per MB here, against ≈800 µs for SHA-256): it guards against edits and
    stale files, not against an adversary, and it is computed on the hot path of every write.
    """
    hasher = xxhash.xxh3_128()
    for part in parts:
        hasher.update(part)
    return hasher.hexdigest()


@dataclass(frozen=True)
class Written:
    size: int
    digest: str


class OutputPathError(ValueError):
    """A rendered output path that cannot be used (it would leave the root, or cannot be created)."""


class OutputStore(Protocol):
    def check_path(self, relpath: str) -> None: ...
    def exists(self, relpath: str) -> bool: ...
    def read(self, relpath: str) -> bytes: ...
    def verify(self, relpath: str, size: int | None, digest: str | None) -> bool: ...
    def read_verified(self, relpath: str, size: int | None, digest: str | None) -> bytes | None: ...
    def write_atomic(self, relpath: str, parts: FileParts, mtime_ns: int | None = None) -> Written: ...


@runtime_checkable
class StagingStore(OutputStore, Protocol):
    """A store that takes an output while it arrives: a sink stages it, ``adopt`` puts it in place."""

    def open_sink(self, offload: Offload) -> ImageSink[StagedFile | Spilled]: ...
    def adopt(self, staged: StagedFile, relpath: str, mtime_ns: int | None = None) -> Written: ...
    def discard(self, staged: StagedFile) -> None: ...


def storage_refuses(exc: OSError) -> bool:
    return exc.errno in STORAGE_FULL_ERRNOS


class LocalOutputStore:
    """Outputs in a local directory tree."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._staging: Path | None = None
        self._staging_lock: int | None = None
        self._creating = threading.Lock()  # writes run in worker threads: one staging directory per run

    # ---- paths -----------------------------------------------------------------------------
    def path_of(self, relpath: str) -> Path:
        target = self.root / relpath
        # A symlinked directory inside the output tree must not carry a write elsewhere.
        real_root = os.path.realpath(self.root)
        real_parent = os.path.realpath(target.parent)
        if os.path.commonpath([real_root, real_parent]) != real_root:
            raise OutputPathError(f"{relpath}: resolves outside the output root {self.root}")
        return target

    def check_path(self, relpath: str) -> None:
        """Raise OutputPathError if ``relpath`` cannot be written, as far as can be known before paying."""
        parts = PurePosixPath(relpath).parts
        limit = self._name_max()
        for part in parts:
            size = len(os.fsencode(part))
            if size > limit:
                raise OutputPathError(f"{relpath}: the name {part[:40]!r}… is {size} bytes, over this "
                                      f"filesystem's limit of {limit} (ENAMETOOLONG)")
        if len(os.fsencode(str(self.root / relpath))) >= os.pathconf("/", "PC_PATH_MAX"):
            raise OutputPathError(f"{relpath}: the path is over this system's length limit (ENAMETOOLONG)")
        real_root = os.path.realpath(self.root)
        current = self.root
        for part in parts[:-1]:
            current = current / part
            try:
                st = os.lstat(current)
            except OSError:
                break  # not there yet: the write creates it
            if stat.S_ISLNK(st.st_mode) and not _inside(os.path.realpath(current), real_root):
                raise OutputPathError(f"{relpath}: {current} is a link leading outside the output root")
            if not stat.S_ISLNK(st.st_mode) and not stat.S_ISDIR(st.st_mode):
                raise OutputPathError(f"{relpath}: {current} is a file where a directory must go")
        if (self.root / relpath).is_dir():
            raise OutputPathError(f"{relpath}: a directory is in the way")

    def _name_max(self) -> int:
        probe = self.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            return int(os.pathconf(probe, "PC_NAME_MAX"))
        except (OSError, ValueError):
            return 255

    # ---- reading ---------------------------------------------------------------------------
    def exists(self, relpath: str) -> bool:
        return (self.root / relpath).is_file()

    def read(self, relpath: str) -> bytes:
        return self.path_of(relpath).read_bytes()

    def verify(self, relpath: str, size: int | None, digest: str | None) -> bool:
        """The file at ``relpath`` is still exactly what was recorded (size, then the digest)."""
        return self.read_verified(relpath, size, digest) is not None

    def read_verified(self, relpath: str, size: int | None, digest: str | None) -> bytes | None:
        """The file's bytes if it is still exactly what was recorded, else None (changed, gone, or
        nothing was recorded to prove it: an older checkpoint)."""
        path = self.root / relpath
        try:
            if digest is None or (size is not None and path.stat().st_size != size):
                return None
            data = self.path_of(relpath).read_bytes()
        except (OSError, OutputPathError):
            return None
        return data if xxhash.xxh3_128(data).hexdigest() == digest else None

    # ---- writing ---------------------------------------------------------------------------
    def write_atomic(self, relpath: str, parts: FileParts, mtime_ns: int | None = None) -> Written:
        """Write ``parts``, in order, to ``relpath`` so it appears complete or not at all.

        ``mtime_ns`` (the source's modification time) is set before the rename, so the file never
        appears with another one. A full, read-only or over-quota disk raises OutputUnavailable (a
        run-level stop); any other problem with this path raises OSError or OutputPathError.
        """
        try:
            return self._write(relpath, parts, mtime_ns)
        except OSError as exc:
            if storage_refuses(exc):
                raise OutputUnavailable(f"the output storage refuses writes: {self.root}: "
                                        f"{exc.strerror or exc}") from exc
            raise

    def _write(self, relpath: str, parts: FileParts, mtime_ns: int | None) -> Written:
        staging = self.staging()
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
        return Written(sum(len(part) for part in parts), digest_parts(parts))

    # ---- outputs that arrive as a stream (staging.StagingFileSink, then adopt) -------------------
    def open_sink(self, offload: Offload) -> StagingFileSink:
        """A sink that writes an output into this run's staging directory while it arrives."""
        return StagingFileSink(self.staging(), offload, new_file_mode())

    def adopt(self, staged: StagedFile, relpath: str, mtime_ns: int | None = None) -> Written:
        """Put a staged output (whole and fsynced: see open_sink) at ``relpath``, atomically.

        What write_atomic does once its file is written: the mtime, the rename, the folder's fsync,
        with the same errors. On an error the staged file stays (``discard`` removes it).
        """
        try:
            target = self.path_of(relpath)
            target.parent.mkdir(parents=True, exist_ok=True)
            if mtime_ns is not None:
                os.utime(staged.path, ns=(mtime_ns, mtime_ns))
            os.replace(staged.path, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            if storage_refuses(exc):
                raise OutputUnavailable(f"the output storage refuses writes: {self.root}: "
                                        f"{exc.strerror or exc}") from exc
            raise
        return Written(staged.size, staged.digest)

    def discard(self, staged: StagedFile) -> None:
        with contextlib.suppress(OSError):
            os.unlink(staged.path)

    def probe_writable(self) -> None:
        """Before the first request: a real create + write + fsync + delete in the output root.

        A full or read-only disk stops the run now (exit 75) instead of after paying for images it
        cannot store; a permission problem is a set-up error (exit 2).
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".batch-upscaler-probe.")
            try:
                os.write(fd, b"\0" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as exc:
            _raise_unwritable(self.root, exc)

    # ---- staging -----------------------------------------------------------------------------
    def staging(self) -> Path:
        """This run's own staging directory (created on first use, locked for the run's lifetime)."""
        with self._creating:
            return self._staging or self._create_staging()

    def _create_staging(self) -> Path:
        base = self.root / STAGING_DIR
        base.mkdir(parents=True, exist_ok=True)
        directory = base / f"{os.getpid()}-{secrets.token_hex(4)}"
        directory.mkdir()
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._staging, self._staging_lock = directory, fd
        return directory

    def close_staging(self) -> None:
        """Remove this run's staging directory (and the shared parent once nobody uses it)."""
        if self._staging is None:
            return
        shutil.rmtree(self._staging, ignore_errors=True)
        if self._staging_lock is not None:
            os.close(self._staging_lock)
        self._staging = self._staging_lock = None
        with contextlib.suppress(OSError):
            (self.root / STAGING_DIR).rmdir()  # only when empty: another run may be staging there

    def clean_stale_staging(self) -> int:
        """Remove staging directories whose run is dead (their lock is free); returns how many."""
        base = self.root / STAGING_DIR
        removed = 0
        for entry in _entries(base):
            if entry == self._staging:
                continue
            if entry.is_dir() and _owner_gone(entry / ".lock"):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
            elif entry.is_file() and time.time() - entry.stat().st_mtime > _OLD_LAYOUT_GRACE_S:
                entry.unlink(missing_ok=True)  # written by an older version without per-run staging
                removed += 1
        with contextlib.suppress(OSError):
            base.rmdir()
        return removed

    # ---- ownership of the root -----------------------------------------------------------------
    def claim(self, job: str, shared: bool) -> None:
        """Record ``job`` as a user of this output root; another job's root is refused (exit 2).

        Two jobs writing into one root overwrite each other's outputs unless both say
        ``output.shared: true`` (and then each refuses to overwrite a file it did not write).
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with _locked_marker(self.root / OWNER_FILE) as (fd, jobs):
                self._refuse_if_taken(jobs, job, shared)
                if jobs.get(job) != {"shared": shared}:
                    jobs[job] = {"shared": shared}
                    _rewrite(fd, {"version": 1, "jobs": jobs})
        except OSError as exc:
            _raise_unwritable(self.root, exc)

    def check_claim(self, job: str, shared: bool) -> None:
        """What :meth:`claim` would refuse, without writing anything (``plan``)."""
        try:
            document = json.loads((self.root / OWNER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        jobs = document.get("jobs") if isinstance(document, dict) else None
        self._refuse_if_taken(jobs if isinstance(jobs, dict) else {}, job, shared)

    def _refuse_if_taken(self, jobs: dict[str, dict[str, bool]], job: str, shared: bool) -> None:
        others = {name: info for name, info in jobs.items() if name != job}
        unshared = sorted(name for name, info in others.items() if not info.get("shared"))
        if others and (not shared or unshared):
            holder = (unshared or sorted(others))[0]
            raise UsageError(
                f"output.dir {self.root} belongs to job {holder!r} ({self.root / OWNER_FILE}); give this job "
                "its own output directory, or set output.shared: true in both manifests with naming that "
                f"keeps their files apart. If job {holder!r} no longer exists, delete its entry in that file.")


def _raise_unwritable(root: Path, exc: OSError) -> NoReturn:
    """A full or read-only storage is a stop (exit 75: it may be fixed by morning); anything else,
    such as a permission problem, is a set-up error (exit 2)."""
    if storage_refuses(exc):
        raise OutputUnavailable(f"output.dir {root} cannot be written: {exc.strerror or exc}") from None
    raise UsageError(f"output.dir {root} cannot be written: {exc.strerror or exc}") from None


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([root, path]) == root


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


def _owner_gone(lock: Path) -> bool:
    """True when nobody holds ``lock`` (its run ended or died); a missing lock means a dead run too."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also drops the lock we may have taken
    return True


@contextlib.contextmanager
def _locked_marker(path: Path) -> Iterator[tuple[int, dict[str, dict[str, bool]]]]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two jobs starting at once must not both think they are alone
        text = os.pread(fd, 1 << 20, 0).decode("utf-8", "replace")
        try:
            document = json.loads(text) if text.strip() else {}
        except ValueError:
            document = {}
        jobs = document.get("jobs") if isinstance(document, dict) else None
        yield fd, dict(jobs) if isinstance(jobs, dict) else {}
    finally:
        os.close(fd)


def _rewrite(fd: int, document: object) -> None:
    data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
