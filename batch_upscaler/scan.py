"""The scan stage: reconcile discovered files with the checkpoint before any request is made.

For each discovered file the cheap fingerprint (size, mtime) and the parameters hash decide:
* unchanged → the recorded state stands (no byte of the file is read);
* new, changed, or parameters changed → probe the header and check the structure (bounded reads)
  and (re)record it as pending, or as skipped/failed with its reason when it cannot be sent;
* stat changed but the state is succeeded → hash the content: a merely touched file keeps its
  result (so a ``touch`` or a copy does not pay twice); a rewritten one is redone;
* succeeded but its output file is missing → redone. A present output is left alone, edited or
  not (a user's edits are not "damage"), unless ``--verify-outputs`` asks to redo outputs that
  are not byte-for-byte what was written.

Refusals that depend on something outside the file (another item holding the output path, the
output tree, the model's limits) are decided again at every scan, so they clear with their cause.

Output ownership: an output path belongs to exactly one live item across the whole checkpoint,
compared the way the output filesystem compares names (``output.name_compare``). The item that
holds a path keeps it; a newcomer is refused at scan (``output_conflict``), before any request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from batch_upscaler.checkpoint import Checkpoint, ItemState, Known, Scanned
from batch_upscaler.discovery import EntryKind, Found, printable
from batch_upscaler.errors import Interrupted, UsageError
from batch_upscaler.fitting import Fit, fit
from batch_upscaler.naming import NameParts, NamingError, fold, render
from batch_upscaler.probe import ImageHeader
from batch_upscaler.settings import JobSettings, checks_fingerprint, request_fingerprint
from batch_upscaler.storage.base import OutputPathError, Probed, Proof
from batch_upscaler.storage.edge import Storage

log = logging.getLogger(__name__)
# Refusals decided from the item's surroundings, not from its bytes: re-decided at every scan.
CONTEXT_REFUSALS = frozenset({"output_conflict", "output_in_source", "bad_output_path", "output_exists"})
_PROBES_AHEAD = 64  # new items whose header probes (and output proofs) run while earlier items are decided


@dataclass
class ScanSummary:
    discovered: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    proven: int = 0  # new to the checkpoint, but their output is already there with its proof of work
    refused: dict[str, int] = field(default_factory=dict)  # reason code -> count


class Scanner:
    """Runs one scan pass of the job's sources into the checkpoint.

    Items are decided strictly in discovery order (the first claimant of an output path keeps it),
    while the header probes of the next new items (ranged GETs on S3), and the proof of an output already
    there for an item the checkpoint does not hold (a HEAD), run ahead in a bounded window.
    """

    def __init__(self, settings: JobSettings, checkpoint: Checkpoint, storage: Storage, *,
                 quiet: bool = False, verify_outputs: bool = False,
                 stopped: Callable[[], bool] = lambda: False) -> None:
        self.quiet = quiet  # plan: count, don't log each refusal
        self.settings = settings
        self.checkpoint = checkpoint
        self.sources = storage.sources
        self.outputs = storage.outputs
        self.storage = storage
        self.verify_outputs = verify_outputs
        self.stopped = stopped
        self.params_hash = request_fingerprint(settings)
        self.checks_hash = checks_fingerprint(settings)
        self.summary = ScanSummary()
        self._conflicts: list[Scanned] = []  # refused for a path another item holds, as they would be pending
        self._proofs: dict[str, tuple[str, Proof | None]] = {}  # key -> (output path, its proof), read ahead

    async def run(self, found: AsyncIterator[Found] | None = None) -> ScanSummary:
        mode = self.settings.name_compare
        self.checkpoint.renormalise_outputs(mode.value, lambda path: fold(path, mode), CONTEXT_REFUSALS)
        await self.outputs.prepare()
        ahead: deque[tuple[int, Found, Known | None, asyncio.Task[Probed] | None]] = deque()
        try:
            with self.checkpoint.scan():
                seq = 0
                async for item in found if found is not None else self.sources.found():
                    if self.stopped():  # partial: what was recorded stays; nothing is marked gone
                        raise Interrupted("stopped during the scan")
                    seq += 1
                    ahead.append(self._look_ahead(seq, item))
                    if len(ahead) >= _PROBES_AHEAD:
                        await self._reconcile(*ahead.popleft())
                while ahead:
                    await self._reconcile(*ahead.popleft())
        finally:
            for *_, task in ahead:
                if task is not None:
                    task.cancel()
        self._reclaim_freed_outputs()
        self._check_not_in_place()
        return self.summary

    def _look_ahead(self, seq: int, item: Found) -> tuple[int, Found, Known | None, asyncio.Task[Probed] | None]:
        """Start the probe of an item that will need one, so its I/O overlaps the decisions before it."""
        known = self.checkpoint.lookup(item.key)
        needs_probe = item.kind is EntryKind.FILE and item.size > 0 and (
            known is None or (known.size, known.mtime_ns, known.etag) != (item.size, item.mtime_ns, item.etag)
            or known.params_hash != self.params_hash)
        return seq, item, known, asyncio.ensure_future(self._probe(item, known)) if needs_probe else None

    async def _probe(self, item: Found, known: Known | None) -> Probed:
        """The header probe; for an item whose result this checkpoint does not hold and whose output is
        already there, also that output's proof (one HEAD), so it overlaps the decisions before it too."""
        probed = await self.sources.probe(item)
        header = probed.header
        if (header is not None and self.outputs.carries_proof
                and (known is None or known.state is not ItemState.SUCCEEDED)):
            model = self.settings.model
            plan = fit(header, model.limits, self.settings.prepare, model.output_size)
            try:
                relpath = self._output_path(item, header, plan) if isinstance(plan, Fit) else None
            except NamingError:
                relpath = None
            if relpath is not None and self.outputs.exists(relpath):
                self._proofs[item.key] = (relpath, await self.outputs.proof(relpath))
        return probed

    async def _reconcile(self, seq: int, item: Found, known: Known | None, probe: asyncio.Task[Probed] | None) -> None:
        try:
            await self._reconcile_item(seq, item, known, probe)
        finally:
            self._proofs.pop(item.key, None)  # fetched ahead but not needed (refused, unchanged, a conflict)

    async def _reconcile_item(self, seq: int, item: Found, known: Known | None,
                              probe: asyncio.Task[Probed] | None) -> None:
        self.summary.discovered += 1
        if known is not None and await self._still_valid(known, item) and self._still_placeable(known, item.key):
            if probe is not None:
                probe.cancel()
            self.summary.unchanged += 1
            owner = self._other_owner(known.output_norm, item.key) if known.gone else None
            if owner is None:
                self.checkpoint.mark_seen(item.key, seq, size=item.size, mtime_ns=item.mtime_ns, etag=item.etag)
                if known.state is ItemState.PENDING and known.output_path is not None:
                    await self._adopt_if_proven(item, known.output_path)
                return
            # Back after being gone, but its output path was taken meanwhile: the holder keeps it.
            base = self._base(seq, item)
            self.checkpoint.record_scanned(self._conflict(base, known.output_path or "", owner))
            return
        if known is None:
            self.summary.new += 1
        else:
            self.summary.changed += 1
        probed = await probe if probe is not None else await self.sources.probe(item) if item.size else None
        self.checkpoint.record_scanned(await self._decide(seq, item, known, probed))

    async def _still_valid(self, known: Known, item: Found) -> bool:
        if known.params_hash != self.params_hash:
            return False
        if known.state is ItemState.SKIPPED and known.checks_hash != self.checks_hash:
            return False  # skipped under other limits: decide again
        if known.state is ItemState.FAILED and known.error_code in CONTEXT_REFUSALS:
            return False
        if known.state is ItemState.SUCCEEDED and not await self._output_stands(known):
            return False
        if (known.size, known.mtime_ns, known.etag) == (item.size, item.mtime_ns, item.etag):
            return True
        # Touched or copied but identical bytes: keep the paid-for result.
        return (known.state is ItemState.SUCCEEDED and known.content_sha256 is not None
                and await self.sources.sha256(item) == known.content_sha256)

    def _still_placeable(self, known: Known, key: str) -> bool:
        """A pending item's output path may still be written: the output tree may have changed since
        the scan that placed it (a link, a file in the way, another job's file). Otherwise re-probe."""
        if known.state is not ItemState.PENDING or known.output_path is None:
            return True
        return self._placement_problem(known.output_path, key) is None

    async def _output_stands(self, known: Known) -> bool:
        """A finished item's output is there (by default any file: a user may have edited it); with
        --verify-outputs it must be exactly what was written."""
        if known.output_path is None or not self.outputs.exists(known.output_path):
            return False
        if self.verify_outputs and known.output_digest is not None:
            return await self.outputs.read_verified(known.output_path, known.output_bytes,
                                                    known.output_digest) is not None
        return True

    def _base(self, seq: int, item: Found) -> dict[str, Any]:
        return dict(key=item.key, seq=seq, source=item.source, relpath=item.relpath, size=item.size,
                    mtime_ns=item.mtime_ns, params_hash=self.params_hash, output_path=None,
                    raw_relpath=item.raw_relpath, checks_hash=self.checks_hash, etag=item.etag)

    async def _decide(self, seq: int, item: Found, known: Known | None, probed: Probed | None) -> Scanned:
        base = self._base(seq, item)
        if item.kind is EntryKind.DIRECTORY:
            return self._refused(base, ItemState.SKIPPED, "not_a_file",
                                 "a directory named like an image (its contents are scanned as usual)")
        if item.kind is EntryKind.NOT_REGULAR:
            return self._refused(base, ItemState.FAILED, "not_a_file", "not a regular file (FIFO, socket or device)")
        if item.size == 0 or probed is None:
            return self._refused(base, ItemState.FAILED, "empty_file", "0 bytes")
        if probed.refusal is not None or probed.header is None:
            refusal = probed.refusal
            assert refusal is not None
            return self._refused(base, ItemState(refusal.disposition.value), refusal.rejection.code,
                                 refusal.rejection.detail)
        header = probed.header
        model = self.settings.model
        plan = fit(header, model.limits, self.settings.prepare, model.output_size)
        base.update(format=header.pil_format, width=header.width, height=header.height)
        if not isinstance(plan, Fit):
            return self._refused(base, ItemState.SKIPPED, plan.code, plan.detail)
        base.update(width=plan.upright_size[0], height=plan.upright_size[1])  # the report compares with these
        placed = self._place_output(base, item, header, plan)
        if placed.state is ItemState.PENDING and (known is None or known.state is not ItemState.SUCCEEDED):
            return await self._proven(placed, item) or placed
        return placed

    async def _proven(self, placed: Scanned, item: Found) -> Scanned | None:
        """An output this checkpoint does not know, already there with its own proof of work for this
        source and these parameters (an empty or lost state folder): done, nothing to pay."""
        assert placed.output_path is not None
        proof = await self._proof_for(item, placed.output_path)
        if proof is None:
            return None
        self.summary.proven += 1
        note = proof.note
        return replace(placed, state=ItemState.SUCCEEDED, content_sha256=note.source_sha256, output_bytes=proof.size,
                       output_digest=note.digest, output_size=note.output_size, sent_size=note.sent_size)

    async def _adopt_if_proven(self, item: Found, output_path: str) -> None:
        """A pending item whose output was stored but never recorded (killed in between): adopt it."""
        proof = await self._proof_for(item, output_path)
        if proof is not None:
            note = proof.note
            self.summary.proven += 1
            self.checkpoint.adopt_output(item.key, note.source_sha256, proof.size, note.digest, note.output_size,
                                         note.sent_size)

    async def _proof_for(self, item: Found, output_path: str) -> Proof | None:
        """The output's own proof that it is this source's upscale with these parameters, or None."""
        if not self.outputs.carries_proof or not self.outputs.exists(output_path):
            return None
        ahead = self._proofs.pop(item.key, None)
        proof = ahead[1] if ahead is not None and ahead[0] == output_path else await self.outputs.proof(output_path)
        if proof is None or proof.note.params_hash != self.params_hash:
            return None
        note = proof.note
        if item.etag is not None and note.source_etag is not None:
            same = note.source_etag == item.etag
        else:
            same = await self.sources.sha256(item) == note.source_sha256
        return proof if same else None

    def _place_output(self, base: dict[str, Any], item: Found, header: ImageHeader, plan: Fit) -> Scanned:
        """Name the output and check, before paying, that this item may write it."""
        try:
            relpath = self._output_path(item, header, plan)
        except NamingError as exc:
            return self._refused(base, ItemState.FAILED, "bad_output_path", str(exc))
        norm = fold(relpath, self.settings.name_compare)
        owner = self._other_owner(norm, item.key)
        if owner is not None:
            return self._conflict(base, relpath, owner)
        problem = self._placement_problem(relpath, item.key)
        if problem is not None:
            return self._refused(base, ItemState.FAILED, *problem)
        return Scanned(state=ItemState.PENDING, **{**base, "output_path": relpath, "output_norm": norm})

    def _placement_problem(self, relpath: str, key: str) -> tuple[str, str] | None:
        """(code, detail) when the output tree forbids writing ``relpath`` now, else None."""
        try:
            self.outputs.check_path(relpath)
        except OutputPathError as exc:
            return "bad_output_path", str(exc)
        source = self.sources.claims(self.storage.output_target(relpath))
        if source is not None:
            return ("output_in_source", f"{self.outputs.shown(relpath)} is inside source {source!r}: the upscale "
                    "would replace an original or be read back as an input; choose an output.dir outside the sources")
        norm = fold(relpath, self.settings.name_compare)
        if self.settings.output_shared and self.outputs.exists(relpath) and not self.checkpoint.wrote_output(norm):
            return "output_exists", f"{self.outputs.shown(relpath)} exists and was not written by this job " \
                                    "(output.shared)"
        return None

    def _other_owner(self, norm: str | None, key: str) -> str | None:
        return None if norm is None else self.checkpoint.output_owner(norm, key)

    def _conflict(self, base: dict[str, Any], relpath: str, owner: str) -> Scanned:
        """Refuse a newcomer for an output path another item holds; remember it in case the holder
        turns out to be gone when this scan ends."""
        norm = fold(relpath, self.settings.name_compare)
        as_pending = {**base, "output_path": relpath, "output_norm": norm}
        self._conflicts.append(Scanned(state=ItemState.PENDING, **as_pending))
        return self._refused(base, ItemState.FAILED, "output_conflict",
                             f"{self.outputs.shown(relpath)} already belongs to {self._owner_shown(owner)}")

    def _owner_shown(self, owner_key: str) -> str:
        row = self.checkpoint.lookup_names(owner_key)
        return owner_key if row is None else self.sources.display(*row, key=owner_key)

    def _reclaim_freed_outputs(self) -> None:
        """A conflict whose holder this scan found gone is no conflict: the first claimant takes the path."""
        for pending in self._conflicts:
            assert pending.output_norm is not None
            if self._other_owner(pending.output_norm, pending.key) is None:
                self.checkpoint.record_scanned(pending)
                self.summary.refused["output_conflict"] -= 1

    def _check_not_in_place(self) -> None:
        """A job whose every file would be written over itself (or into its sources) is a set-up error."""
        in_place = self.summary.refused.get("output_in_source", 0)
        if in_place and in_place == self.summary.discovered:
            raise UsageError(f"{self.settings.manifest_path}: output.dir {self.settings.output_dir} would write every "
                             "output into the job's own sources (originals replaced, or upscaled again next run); "
                             "choose an output.dir outside the sources")

    def _output_path(self, item: Found, header: ImageHeader, plan: Fit) -> str:
        settings = self.settings
        out_width = settings.model.output_size(*plan.sent_size)[0]
        parts = NameParts(item.relpath, settings.model.name.value, plan.output_scale(out_width))
        return render(settings.naming, parts, settings.output_format.for_source(header.pil_format).extension)

    def _refused(self, base: dict[str, Any], state: ItemState, code: str, detail: str) -> Scanned:
        self.summary.refused[code] = self.summary.refused.get(code, 0) + 1
        if state is ItemState.FAILED and not self.quiet:  # skips are expected in an archive; failures need a look
            name = printable(self.sources.display(base["source"], base["relpath"], base["key"]))
            log.warning("failed %s: %s: %s", name, code, detail,
                        extra={"event": "item_failed", "file": name, "error_code": code})
        fields = {**base, "output_path": None, "output_norm": None}
        return Scanned(state=state, error_code=code, error_message=f"{code}: {detail}", **fields)
