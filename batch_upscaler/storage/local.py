"""Local folders at the storage edge: the output store for a local ``output.dir`` and the source reader
for local files.

Outputs: writes go to a staging directory inside the output root (same
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

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import NoReturn

import xxhash

from batch_upscaler.catalogue import Rejection
from batch_upscaler.discovery import SourceRoot
from batch_upscaler.errors import OutputUnavailable, UsageError
from batch_upscaler.imagecheck import StructureError, check_file
from batch_upscaler.probe import SENDABLE_AS_IS, Disposition, ProbeError, Refusal, read_header
from batch_upscaler.storage.base import (
    FileParts,
    ItemRef,
    OutputNote,
    OutputPathError,
    Probed,
    Proof,
    SourceError,
    Written,
    owner_problem,
)
from batch_upscaler.storage.staging import Offload, StagedFile, StagingFileSink, storage_refuses

STAGING_DIR = ".batch-upscaler-tmp"
OWNER_FILE = ".batch-upscaler-job.json"
# The errors that say "this storage takes no more writes now", as opposed to "this one path is bad".
_OLD_LAYOUT_GRACE_S = 3600.0  # loose staging files from versions before per-run staging
# mkstemp creates 0600 files; outputs get the usual 0666 & ~umask. Read once, at import, while
# the process is single-threaded (os.umask can only be read by setting it).
_UMASK = os.umask(0)
os.umask(_UMASK)


def new_file_mode() -> int:
    """The mode a plainly created file would get (mkstemp's 0600 is for secrets, not reports)."""
    return 0o666 & ~_UMASK


def digest_parts(parts: FileParts) -> str:
    """The digest recorded for an output: proof that a file on disk is still what was written.

    xxh3-128 (≈40 µs per MB here, against ≈800 µs for SHA-256): it guards against edits and
    stale files, not against an adversary, and it is computed on the hot path of every write.
    """
    hasher = xxhash.xxh3_128()
    for part in parts:
        hasher.update(part)
    return hasher.hexdigest()


class LocalOutputStore:
    """Outputs in a local directory tree. The work is synchronous file I/O; the async methods of
    the storage contract run it in a worker thread so the event loop keeps serving requests."""

    carries_proof = False  # the checkpoint is the record of local outputs

    def __init__(self, root: Path, display_base: Path | None = None) -> None:
        self.root = root
        self.display_base = display_base  # outputs are named to people relative to this (the manifest's folder)
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

    def shown(self, relpath: str) -> str:
        """The output's path as a person finds it: relative to the manifest's folder when below it."""
        path = self.root / relpath
        if self.display_base is not None and path.is_relative_to(self.display_base):
            return path.relative_to(self.display_base).as_posix()
        return str(path)

    # ---- the storage contract (async) --------------------------------------------------------
    async def prepare(self) -> None:
        """Nothing to list ahead: a local existence check is one stat."""

    async def proof(self, relpath: str) -> Proof | None:
        """Local outputs carry no proof of work of their own: the checkpoint is the record."""
        return None

    async def read_verified(self, relpath: str, size: int | None, digest: str | None) -> bytes | None:
        return await asyncio.to_thread(self.read_verified_file, relpath, size, digest)

    async def write(self, relpath: str, parts: FileParts, mtime_ns: int | None, note: OutputNote) -> Written:
        return await asyncio.to_thread(self.write_atomic, relpath, parts, mtime_ns)

    async def claim(self, job: str, shared: bool) -> None:
        self.claim_root(job, shared)

    async def check_claim(self, job: str, shared: bool) -> None:
        self.check_root_claim(job, shared)

    async def probe_writable(self) -> None:
        await asyncio.to_thread(self.probe_root)

    async def clean_stale_staging(self) -> int:
        return self.clean_stale()

    async def close(self) -> None:
        self.close_staging()

    def read(self, relpath: str) -> bytes:
        return self.path_of(relpath).read_bytes()

    def verify_file(self, relpath: str, size: int | None, digest: str | None) -> bool:
        """The file at ``relpath`` is still exactly what was recorded (size, then the digest)."""
        return self.read_verified_file(relpath, size, digest) is not None

    def read_verified_file(self, relpath: str, size: int | None, digest: str | None) -> bytes | None:
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

    async def adopt(self, staged: StagedFile, relpath: str, mtime_ns: int | None, note: OutputNote) -> Written:
        return await asyncio.to_thread(self.adopt_file, staged, relpath, mtime_ns)

    def adopt_file(self, staged: StagedFile, relpath: str, mtime_ns: int | None = None) -> Written:
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

    def probe_root(self) -> None:
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

    def clean_stale(self) -> int:
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
    def claim_root(self, job: str, shared: bool) -> None:
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

    def check_root_claim(self, job: str, shared: bool) -> None:
        """What :meth:`claim_root` would refuse, without writing anything (``plan``)."""
        try:
            document = json.loads((self.root / OWNER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        jobs = document.get("jobs") if isinstance(document, dict) else None
        self._refuse_if_taken(jobs if isinstance(jobs, dict) else {}, job, shared)

    def _refuse_if_taken(self, jobs: dict[str, dict[str, bool]], job: str, shared: bool) -> None:
        problem = owner_problem(str(self.root), str(self.root / OWNER_FILE), jobs, job, shared)
        if problem is not None:
            raise UsageError(problem)


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


class LocalSourceReader:
    """Reads local source files: the header and a bounded structure check for the scan, the whole
    file for sending, the content hash for a touched file."""

    def __init__(self, roots: Mapping[str, SourceRoot]) -> None:
        self.roots = roots

    def path_of(self, item: ItemRef) -> Path:
        return self.roots[item.source].path_of(item.fs_relpath)

    async def probe(self, item: ItemRef) -> Probed:
        path = self.path_of(item)
        try:
            header = read_header(path)
            if header.pil_format in SENDABLE_AS_IS:  # converted formats are checked by their decode
                check_file(path, item.size)
        except ProbeError as exc:
            return Probed(None, exc.refusal)
        except StructureError as exc:
            return Probed(None, Refusal(Disposition.FAIL, Rejection("truncated", str(exc))))
        except OSError as exc:
            return Probed(None, Refusal(Disposition.FAIL, Rejection("unreadable", exc.strerror or str(exc))))
        return Probed(header)

    async def read(self, item: ItemRef) -> bytes:
        try:
            data = await asyncio.to_thread(self.path_of(item).read_bytes)
        except OSError as exc:
            raise SourceError("source_unreadable", f"{exc.strerror or exc}") from None
        if len(data) != item.size:
            raise SourceError("source_changed", "the file changed after it was scanned; the next run redoes it")
        return data

    async def sha256(self, item: ItemRef) -> str | None:
        try:
            return await asyncio.to_thread(file_sha256, self.path_of(item))
        except OSError:
            return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
