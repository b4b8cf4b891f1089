"""Discovery: turn the manifest's sources (directories, files, globs) into a stream of image files.

Properties a photo archive needs:
* deterministic order (sources in manifest order, names sorted inside each directory);
* a file is yielded once even when sources overlap or links point at it (dedup by device+inode);
* hidden entries (``.*``, which includes AppleDouble ``._*`` files) are skipped;
* symlinks are followed, including ones pointing outside the source root (the item keeps the
  link's path, so its output still lands inside the output root); directory loops are survived;
* directories to prune (the output and state directories) are never entered, so outputs are
  never rediscovered as inputs;
* it streams: only the current directory listing and two sets of integers are held in memory.

Item identity is ``<source as written>:<path relative to the source root>`` so it does not
depend on the machine the job runs on.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from wcmatch import glob as wcglob

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp",  # sent as they are
    ".tif", ".tiff", ".bmp", ".gif", ".heic", ".heif", ".avif",  # converted before sending
})
_GLOB_FLAGS = wcglob.GLOBSTAR | wcglob.IGNORECASE | wcglob.BRACE


class EntryKind(StrEnum):
    FILE = "file"
    NOT_REGULAR = "not_regular"  # a FIFO, socket or device named like an image
    DIRECTORY = "directory"  # a directory named like an image (its contents are walked as usual)


@dataclass(frozen=True)
class SourceRoot:
    """One manifest source: the directory walked and, for a glob, the pattern under it."""

    spec: str  # as written in the manifest: part of every item key
    root: Path
    pattern: str | None = None  # relative glob; None means every image below root
    single_file: bool = False

    def path_of(self, relpath: str) -> Path:
        """Where an item of this source lives on this machine."""
        return self.root if self.single_file else self.root / relpath


@dataclass(frozen=True)
class Found:
    """One discovered file or object, with its cheap fingerprint: size and mtime from a local stat,
    or size and ETag from an S3 listing (mtime 0: a re-upload of equal bytes is not a change)."""

    source: str
    relpath: str  # POSIX, relative to the source root
    path: Path | None  # the local file; None for an S3 object
    size: int
    mtime_ns: int
    kind: EntryKind = EntryKind.FILE
    # The name's raw bytes when it is not valid UTF-8; ``relpath`` then holds a printable stand-in.
    raw_relpath: bytes | None = None
    etag: str | None = None  # S3: the object's ETag
    url: str | None = None  # S3: ``s3://bucket/key``, the item's machine-independent identity

    @property
    def key(self) -> str:
        return self.url or f"{self.source}:{self.relpath}"

    @property
    def fs_relpath(self) -> str:
        """The relative path as the filesystem names it (``relpath`` may be a printable stand-in)."""
        return os.fsdecode(self.raw_relpath) if self.raw_relpath is not None else self.relpath


def printable(name: str) -> str:
    """``name`` safe for one log line or a Markdown list: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def storable(relpath: str) -> tuple[str, bytes | None]:
    """A UTF-8 text form of a path for keys and reports, plus its raw bytes when they differ.

    Linux names are bytes; one that is not UTF-8 arrives with surrogate escapes, which SQLite and
    JSON cannot hold. The text form shows the bad bytes as ``\\xNN``; the bytes keep the real path.
    """
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(relpath)
        return raw.decode("utf-8", "backslashreplace"), raw
    return relpath, None


def display_path(roots: Mapping[str, SourceRoot], source: str, relpath: str, base_dir: Path) -> str:
    """How an item is named to people (reports, failed.txt, --only): its path relative to the
    manifest's directory when it lies below it, else absolute."""
    root = roots.get(source)
    if root is None:
        return f"{source}:{relpath}"
    path = root.path_of(relpath)
    try:
        return path.relative_to(base_dir).as_posix()
    except ValueError:
        return str(path)


def parse_source(spec: str, base_dir: Path) -> SourceRoot:
    """Split a source into its walk root and glob pattern; relative paths use ``base_dir``."""
    path = Path(os.path.expanduser(spec))
    path = Path(os.path.normpath(path if path.is_absolute() else base_dir / path))
    parts = path.parts
    magic_at = next((i for i, part in enumerate(parts) if wcglob.is_magic(part, flags=_GLOB_FLAGS)), None)
    if magic_at is None:
        return SourceRoot(spec, path, None, single_file=path.is_file())
    return SourceRoot(spec, Path(*parts[:magic_at]), "/".join(parts[magic_at:]))


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def accepts(relpath: str, pattern: str | None, exclude: tuple[str, ...], also: tuple[str, ...] = ()) -> bool:
    """The rules every source applies to a path below its root (local walks and S3 listings alike):
    an image extension, no hidden component (``.*``, AppleDouble ``._*``), the source's glob, and no
    exclude matching the path below the root or any of the ``also`` forms of it."""
    if not is_image_name(relpath) or any(part.startswith(".") for part in relpath.split("/")):
        return False
    if pattern is not None and not wcglob.globmatch(relpath, pattern, flags=_GLOB_FLAGS):
        return False
    return not exclude or not any(wcglob.globmatch(c, list(exclude), flags=_GLOB_FLAGS) for c in (relpath, *also))


class Discovery:
    """Walks the sources; ``errors`` collects (path, message) for directories it could not read."""

    def __init__(self, roots: Iterable[SourceRoot], exclude: Iterable[str] = (),
                 prune: Iterable[Path] = (), on_error: Callable[[str, str], None] | None = None,
                 base_dir: Path | None = None) -> None:
        self.roots = tuple(roots)
        self.base_dir = base_dir
        self.exclude = tuple(exclude)
        self._prune = {_identity(p) for p in prune if p.exists()}
        self._prune_real = {Path(os.path.realpath(p)) for p in prune}  # also the ones not created yet
        self._on_error = on_error or (lambda path, msg: None)
        self._seen_files: set[tuple[int, int]] = set()

    def __iter__(self) -> Iterator[Found]:
        for root in self.roots:
            yield from self.walk_root(root)

    def walk_root(self, root: SourceRoot) -> Iterator[Found]:
        """The files of one source (a file already yielded by an earlier source is not yielded again)."""
        if root.single_file:
            found = self._consider(root, root.root, root.root.name)
            if found:
                yield found
            return
        yield from self._walk(root)

    def _walk(self, root: SourceRoot) -> Iterator[Found]:
        # Iterative DFS over sorted names; visited directories are tracked per source so a
        # symlink loop ends, while a second source may still walk a shared directory.
        visited: set[tuple[int, int]] = set()
        stack: list[tuple[Path, str]] = [(root.root, "")]
        while stack:
            directory, rel = stack.pop()
            try:
                ident = _identity(directory)
            except OSError as exc:
                self._on_error(str(directory), exc.strerror or str(exc))
                continue
            if ident in visited or ident in self._prune:
                continue
            visited.add(ident)
            subdirs, files = self._list(directory)
            for name in files:
                found = self._consider(root, directory / name, f"{rel}{name}")
                if found:
                    yield found
            stack.extend((directory / name, f"{rel}{name}/") for name in reversed(subdirs))

    def _list(self, directory: Path) -> tuple[list[str], list[str]]:
        subdirs: list[str] = []
        files: list[str] = []
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        is_dir = entry.is_dir()  # follows symlinks
                    except OSError:
                        is_dir = False
                    (subdirs if is_dir else files).append(entry.name)
                    if is_dir and is_image_name(entry.name):
                        files.append(entry.name)  # reported as "not a file", and walked too
        except OSError as exc:
            self._on_error(str(directory), exc.strerror or str(exc))
        return sorted(subdirs), sorted(files)

    def _consider(self, root: SourceRoot, path: Path, relpath: str) -> Found | None:
        also = (os.path.relpath(path, self.base_dir).replace(os.sep, "/"),) if self.base_dir is not None else ()
        if not accepts(relpath, root.pattern, self.exclude, also):
            return None
        try:
            st = path.stat()
        except OSError as exc:  # a dangling link, or a file deleted while we walk
            self._on_error(str(path), exc.strerror or str(exc))
            return None
        ident = (st.st_dev, st.st_ino)
        if ident in self._seen_files:
            return None
        self._seen_files.add(ident)
        kind = (EntryKind.FILE if stat.S_ISREG(st.st_mode) else
                EntryKind.DIRECTORY if stat.S_ISDIR(st.st_mode) else EntryKind.NOT_REGULAR)
        text, raw = storable(relpath)
        return Found(root.spec, text, path, st.st_size, st.st_mtime_ns, kind, raw)

    def claims(self, path: Path) -> SourceRoot | None:
        """The source that would read ``path`` (a file that may not exist yet) as an input, or None.

        The scan asks this of every output path: an output that a source would discover is an
        original overwritten in place, or an upscale that the next run would upscale (and pay for)
        again. Links in existing parents are resolved, as the walk would follow them.
        """
        real = Path(os.path.realpath(path.parent)) / path.name
        for root in self.roots:
            root_real = Path(os.path.realpath(root.root))
            if root.single_file:
                if real == root_real:
                    return root
                continue
            if real == root_real or not real.is_relative_to(root_real) or self._pruned(root_real, real):
                continue
            relpath = real.relative_to(root_real).as_posix()
            also = (os.path.relpath(real, self.base_dir).replace(os.sep, "/"),) if self.base_dir is not None else ()
            if accepts(relpath, root.pattern, self.exclude, also):
                return root
        return None

    def _pruned(self, top: Path, path: Path) -> bool:
        """The walk from ``top`` never reaches ``path``: it lies in a pruned directory (the output or
        state directory) inside ``top``, existing or still to be created."""
        return any(path.is_relative_to(pruned) and pruned.is_relative_to(top) for pruned in self._prune_real)


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino
