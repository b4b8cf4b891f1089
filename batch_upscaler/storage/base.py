"""The storage edge's contract: what the pipeline asks of a place that holds sources or outputs.

Two small interfaces, each with a local and an S3 implementation:

* :class:`SourceReader` — the bytes of a discovered item: its header (for the checks before
  paying), its whole content (to send), its content hash (a touched file keeps its result);
* :class:`OutputStore` — where outputs go: what can be known about a path before paying, an
  atomic write that carries its own proof of work, reads proven against what was recorded, the
  root's owner, and a writability probe.

The scan, pool, report and unsent-output code use only these; they never learn which
implementation they were given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from batch_upscaler.probe import ImageHeader, Refusal

if TYPE_CHECKING:
    from batch_upscaler.storage.staging import Offload, Spilled, StagedFile
    from batch_upscaler.streaming import ImageSink

# An output file as consecutive parts (the returned image's bytes around spliced metadata chunks),
# written one after another so the file is never first assembled into a second ~10 MB buffer.
FileParts = Sequence[bytes | memoryview]


class OutputPathError(ValueError):
    """A rendered output path that cannot be used (it would leave the root, or cannot be created)."""


class SourceError(Exception):
    """An item's bytes cannot be read as scanned; ``code`` is the recorded reason."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"{code}: {message}")


@dataclass(frozen=True)
class Written:
    size: int
    digest: str  # xxh3-128 of the bytes written (storage.digest)


@dataclass(frozen=True)
class OutputNote:
    """What an output records about how it was made: its own proof of work (S3 user metadata).

    A run that does not know an item (an empty or lost state folder) accepts an existing output
    only when the source and the parameters it names are the item's.
    """

    source: str  # the item's key (``s3://bucket/key`` or ``<source>:<relpath>``)
    source_etag: str | None  # S3 sources: the ETag the bytes were read at
    source_sha256: str  # of the source's bytes
    params_hash: str  # settings.request_fingerprint
    digest: str  # xxh3-128 of the output bytes
    output_size: tuple[int, int] | None
    sent_size: tuple[int, int] | None
    tool_version: str


@dataclass(frozen=True)
class Proof:
    """An existing output's proof of work, as read back (HEAD) from the store."""

    note: OutputNote
    size: int


@dataclass(frozen=True)
class Probed:
    """A new or changed item's header, or why it is refused (read with bounded I/O)."""

    header: ImageHeader | None
    refusal: Refusal | None = None


class ItemRef(Protocol):
    """What locates an item's bytes in its store (a discovered ``Found`` or a pending ``WorkItem``)."""

    @property
    def key(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def fs_relpath(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def etag(self) -> str | None: ...


class SourceReader(Protocol):
    async def probe(self, item: ItemRef) -> Probed: ...
    async def read(self, item: ItemRef) -> bytes: ...
    async def sha256(self, item: ItemRef) -> str | None: ...


class OutputStore(Protocol):
    carries_proof: bool  # its outputs record how they were made (S3 metadata): a lost checkpoint costs nothing

    def check_path(self, relpath: str) -> None: ...
    def exists(self, relpath: str) -> bool: ...
    def shown(self, relpath: str) -> str: ...
    async def prepare(self) -> None: ...
    async def proof(self, relpath: str) -> Proof | None: ...
    async def read_verified(self, relpath: str, size: int | None, digest: str | None) -> bytes | None: ...
    async def write(self, relpath: str, parts: FileParts, mtime_ns: int | None, note: OutputNote) -> Written: ...
    async def claim(self, job: str, shared: bool) -> None: ...
    async def check_claim(self, job: str, shared: bool) -> None: ...
    async def probe_writable(self) -> None: ...
    async def clean_stale_staging(self) -> int: ...
    async def close(self) -> None: ...


@runtime_checkable
class StagingStore(Protocol):
    """An :class:`OutputStore` that takes an output while it arrives: a sink writes it to a local
    staging file (metadata spliced, checked, digested on the way), ``adopt`` puts it in place
    (local: a rename; S3: an upload from the file), ``discard`` drops it. The whole image is never
    held in memory."""

    def open_sink(self, offload: Offload) -> ImageSink[StagedFile | Spilled]: ...
    async def adopt(self, staged: StagedFile, relpath: str, mtime_ns: int | None, note: OutputNote) -> Written: ...
    def discard(self, staged: StagedFile) -> None: ...


def owner_problem(root: str, marker: str, jobs: dict[str, dict[str, bool]], job: str, shared: bool) -> str | None:
    """Why ``job`` may not write into an output root whose marker lists ``jobs``, or None.

    Two jobs writing into one root overwrite each other's outputs unless both say
    ``output.shared: true`` (and then each refuses to overwrite a file it did not write).
    """
    others = {name: info for name, info in jobs.items() if name != job}
    unshared = sorted(name for name, info in others.items() if not info.get("shared"))
    if not others or (shared and not unshared):
        return None
    holder = (unshared or sorted(others))[0]
    return (f"output.dir {root} belongs to job {holder!r} ({marker}); give this job its own output directory, "
            "or set output.shared: true in both manifests with naming that keeps their files apart. "
            f"If job {holder!r} no longer exists, delete its entry in that file.")
