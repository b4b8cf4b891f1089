"""Paid-for images that could not be written yet: kept beside the checkpoint, written first next run.

When the output storage refuses writes (disk full, read-only, over quota) after the model has
returned an image, that image is paid for. Failing the item would make ``--retry-failed`` pay
again, so instead the finished output bytes are kept in ``<state_dir>/unsent-outputs/`` with a
small JSON note naming the item and the source and parameters they were made from; the item
stays pending and the run stops (exit 75). An upload that still fails after its retries (S3)
keeps the image the same way, the item failed ``output_write_failed``. The next run writes every
kept image whose item still waits for it, with the same source and parameters, before it sends
anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from batch_upscaler import __version__
from batch_upscaler.checkpoint import Checkpoint, ItemState
from batch_upscaler.storage.base import FileParts, OutputNote, OutputStore

log = logging.getLogger(__name__)
UNSENT_DIR = "unsent-outputs"


@dataclass(frozen=True)
class UnsentNote:
    """Which item a kept image belongs to, and the source state and parameters it was made from."""

    key: str
    params_hash: str
    size: int  # the source's size and mtime when it was sent: a changed source makes the image stale
    mtime_ns: int
    content_sha256: str
    output_size: tuple[int, int] | None
    sent_size: tuple[int, int] | None
    output_mtime_ns: int | None  # the mtime the output file gets
    etag: str | None = None  # S3 sources: the ETag the image was made from


class UnsentOutputs:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / UNSENT_DIR

    def keep(self, note: UnsentNote, parts: FileParts) -> bool:
        """Keep a returned image; False if it could not be kept either (the state disk is full too)."""
        stem = self.directory / hashlib.sha256(note.key.encode()).hexdigest()[:32]
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_durably(stem.with_suffix(".img"), parts)
            _write_durably(stem.with_suffix(".json"), (json.dumps(asdict(note)).encode(),))  # last: marks it whole
        except OSError as exc:
            log.error("could not keep the returned image of %s either (%s): it will be sent again", note.key, exc)
            return False
        return True

    def notes(self) -> Iterator[tuple[UnsentNote, Path]]:
        """Every kept image's note and the path of its bytes."""
        for path in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else ():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                for field in ("output_size", "sent_size"):
                    raw[field] = tuple(raw[field]) if raw[field] else None
                yield UnsentNote(**raw), path.with_suffix(".img")
            except (OSError, ValueError, TypeError) as exc:
                log.warning("ignoring an unreadable kept output %s: %s", path, exc)

    def discard(self, image: Path) -> None:
        image.with_suffix(".json").unlink(missing_ok=True)
        image.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.directory.rmdir()


async def deliver(unsent: UnsentOutputs, checkpoint: Checkpoint, outputs: OutputStore, params_hash: str) -> int:
    """Write every kept image whose item still waits for it; returns how many were delivered.

    Runs before anything is sent. A full output storage raises OutputUnavailable again (exit 75,
    the images stay kept); a kept image whose source or parameters changed since is dropped.
    """
    delivered = 0
    for note, image in unsent.notes():
        known = checkpoint.lookup(note.key)
        waiting = known is not None and (known.state is ItemState.PENDING or (
            known.state is ItemState.FAILED and known.error_code == "output_write_failed"))
        if (known is None or not waiting or known.output_path is None
                or (known.params_hash, known.size, known.mtime_ns) != (note.params_hash, note.size, note.mtime_ns)):
            log.info("dropping a kept output of %s: its item changed since", note.key)
            unsent.discard(image)
            continue
        data = image.read_bytes()
        record = OutputNote(note.key, note.etag, note.content_sha256, params_hash, "", note.output_size,
                            note.sent_size, __version__)
        try:
            written = await outputs.write(known.output_path, (data,), note.output_mtime_ns, record)
        except OSError as exc:  # still not writable there (a full disk raises OutputUnavailable: a stop)
            log.warning("a kept output of %s still cannot be written: %s (kept for the next run)", note.key, exc)
            continue
        if known.state is ItemState.FAILED:
            checkpoint.retry_keys([note.key])
        checkpoint.start(note.key)
        checkpoint.record_content_hash(note.key, note.content_sha256)
        checkpoint.succeed(note.key, written.size, note.output_size, note.sent_size, output_digest=written.digest)
        unsent.discard(image)
        delivered += 1
    if delivered:
        log.info("%d image(s) paid for by an earlier run were written now", delivered,
                 extra={"event": "unsent_delivered"})
    return delivered


def _write_durably(path: Path, parts: FileParts) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.writelines(parts)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
