"""The scan stage: reconcile discovered files with the checkpoint before any request is made.

For each discovered file the cheap fingerprint (size, mtime) and the parameters hash decide:
* unchanged → the recorded state stands (no byte of the file is read);
* new, changed, or parameters changed → probe the header and (re)record it as pending, or as
  skipped/failed with its reason when it cannot be sent;
* stat changed but the state is succeeded → hash the content: a merely touched file keeps its
  result (so a ``touch`` or a copy does not pay twice); a rewritten one is redone;
* succeeded but its output file is missing or truncated → redone.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch_upscaler.checkpoint import Checkpoint, ItemState, Known, Scanned
from batch_upscaler.discovery import EntryKind, Found, printable
from batch_upscaler.fitting import Fit, fit
from batch_upscaler.naming import NameParts, NamingError, render
from batch_upscaler.outputs import OutputStore
from batch_upscaler.probe import ImageHeader, ProbeError, read_header
from batch_upscaler.settings import JobSettings, request_fingerprint

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ScanSummary:
    discovered: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # reason code -> count


class Scanner:
    """Runs one scan pass of ``found`` files into the checkpoint."""

    def __init__(self, settings: JobSettings, checkpoint: Checkpoint, outputs: OutputStore, *,
                 quiet: bool = False) -> None:
        self.quiet = quiet  # plan: count, don't log each refusal
        self.settings = settings
        self.checkpoint = checkpoint
        self.outputs = outputs
        self.params_hash = request_fingerprint(settings)
        self.summary = ScanSummary()

    def run(self, found: Iterable[Found]) -> ScanSummary:
        with self.checkpoint.scan():
            for seq, item in enumerate(found, start=1):
                self.summary.discovered += 1
                self._reconcile(seq, item)
        return self.summary

    def _reconcile(self, seq: int, item: Found) -> None:
        known = self.checkpoint.lookup(item.key)
        if known is not None and self._still_valid(known, item):
            self.summary.unchanged += 1
            self.checkpoint.mark_seen(item.key, seq, size=item.size, mtime_ns=item.mtime_ns)
            return
        if known is None:
            self.summary.new += 1
        else:
            self.summary.changed += 1
        self.checkpoint.record_scanned(self._probe(seq, item))

    def _still_valid(self, known: Known, item: Found) -> bool:
        if known.params_hash != self.params_hash:
            return False
        if known.state is ItemState.SUCCEEDED and not (
                known.output_path and self.outputs.exists(known.output_path, known.output_bytes)):
            return False
        if (known.size, known.mtime_ns) == (item.size, item.mtime_ns):
            return True
        # Touched or copied but identical bytes: keep the paid-for result.
        return (known.state is ItemState.SUCCEEDED and known.content_sha256 is not None
                and _hash_or_none(item.path) == known.content_sha256)

    def _probe(self, seq: int, item: Found) -> Scanned:
        base: dict[str, Any] = dict(key=item.key, seq=seq, source=item.source, relpath=item.relpath, size=item.size,
                                    mtime_ns=item.mtime_ns, params_hash=self.params_hash, output_path=None,
                                    raw_relpath=item.raw_relpath)
        if item.kind is EntryKind.DIRECTORY:
            return self._refused(base, ItemState.SKIPPED, "not_a_file",
                                 "a directory named like an image (its contents are scanned as usual)")
        if item.kind is EntryKind.NOT_REGULAR:
            return self._refused(base, ItemState.FAILED, "not_a_file", "not a regular file (FIFO, socket or device)")
        if item.size == 0:
            return self._refused(base, ItemState.FAILED, "empty_file", "0 bytes")
        try:
            header = read_header(item.path)
        except ProbeError as exc:
            state = ItemState(exc.refusal.disposition.value)
            return self._refused(base, state, exc.refusal.rejection.code, exc.refusal.rejection.detail)
        plan = fit(header, self.settings.model.limits, self.settings.prepare)
        base.update(format=header.pil_format, width=header.width, height=header.height)
        if isinstance(plan, Fit):  # the report compares outputs with the upright source
            base.update(width=plan.upright_size[0], height=plan.upright_size[1])
        else:
            return self._refused(base, ItemState.SKIPPED, plan.code, plan.detail)
        try:
            base["output_path"] = self._output_path(item, header, plan)
        except NamingError as exc:
            return self._refused(base, ItemState.FAILED, "bad_output_path", str(exc))
        owner = self.checkpoint.output_owner(base["output_path"], item.key)
        if owner is not None:
            return self._refused(base, ItemState.FAILED, "output_conflict",
                                 f"{base['output_path']} is already the output of {owner}")
        return Scanned(state=ItemState.PENDING, **base)

    def _output_path(self, item: Found, header: ImageHeader, plan: Fit) -> str:
        settings = self.settings
        out_width = settings.model.output_size(*plan.sent_size)[0]
        parts = NameParts(item.relpath, settings.model.name.value, plan.output_scale(out_width))
        return render(settings.naming, parts, settings.output_format.for_source(header.pil_format).extension)

    def _refused(self, base: dict[str, Any], state: ItemState, code: str, detail: str) -> Scanned:
        self.summary.refused[code] = self.summary.refused.get(code, 0) + 1
        if state is ItemState.FAILED and not self.quiet:  # skips are expected in an archive; failures need a look
            log.warning("failed %s: %s: %s", printable(base["key"]), code, detail,
                        extra={"event": "item_failed", "file": printable(base["key"]), "error_code": code})
        return Scanned(state=state, error_code=code, error_message=f"{code}: {detail}", **base)


def _hash_or_none(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None
