"""The worker pool stage: pending items → rate-limited InvokeModel attempts → atomic outputs → checkpoint.

Structured concurrency: one TaskGroup holds a producer (pages pending items out of the
checkpoint into a bounded queue) and ``concurrency`` workers. The concurrency cap (number of
workers) and the rate limiter are separate dials; the outage breaker pauses them all while the
service is down. Each item moves through the checkpoint's state machine; a worker that is
cancelled or stopped mid-item puts it back to pending, so the checkpoint is consistent at any
instant. A fatal backend error (credentials, model access) or a checkpoint that cannot be written
ends the group at once, leaving every unfinished item pending.

Stopping: when ``stop`` is set (first Ctrl-C/SIGTERM, a cap, a full output disk, an outage that
lasted too long), no new request starts — the event is checked after every wait (the rate
limiter, a back-off, a Retry-After, the outage breaker) — and items in back-off are released;
requests already in flight finish and are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from batch_upscaler import __version__
from batch_upscaler.budget import Budget
from batch_upscaler.checkpoint import Checkpoint, ItemState, WorkItem
from batch_upscaler.clock import Clock, sleep_unless
from batch_upscaler.discovery import printable
from batch_upscaler.errors import FatalBackendError, OutputUnavailable, StateUnavailable
from batch_upscaler.finishing import Finished, finish, image_size
from batch_upscaler.imagecheck import Structure, StructureError, check_encoded
from batch_upscaler.outage import Admission, Breaker
from batch_upscaler.payload import Payload, PayloadError, build_payload
from batch_upscaler.ratelimit import RateLimiter
from batch_upscaler.retry import Action, AttemptError, Backoff, decide, is_service_state, possibly_billed
from batch_upscaler.settings import JobSettings, request_fingerprint
from batch_upscaler.storage.base import OutputNote, OutputPathError, OutputStore, SourceError, StagingStore
from batch_upscaler.storage.edge import Sources
from batch_upscaler.storage.staging import Spilled, StagedFile, storage_refuses
from batch_upscaler.streaming import CheckedSink, ImageSink, MemorySink, Received, SplicingSink, feed_bytes
from batch_upscaler.thumbnails import Picturable, PictureKeeper
from batch_upscaler.unsent import UnsentNote, UnsentOutputs

log = logging.getLogger(__name__)
_PAGE = 256
# Outcomes that are no answer at all: they say nothing about whether the service works.
_NO_ANSWER = frozenset({"read_timeout", "response_interrupted", "no_credentials"})
# Run-level stops that must end the group at once rather than cost one item.
_RUN_LEVEL = (FatalBackendError, StateUnavailable, asyncio.CancelledError)


T = TypeVar("T")


class Offload(Protocol):
    """Runs blocking work (file reads, hashing, writes) off the event loop: ``asyncio.to_thread``,
    or inline in tests that run on a fake clock (a thread's work takes no virtual time there)."""

    def __call__(self, func: Callable[..., T], /, *args: Any) -> Awaitable[T]: ...


class Invoker(Protocol):
    async def invoke(self, body: bytes) -> bytes | AttemptError: ...

    async def probe(self) -> AttemptError | None:
        """A free request that tells whether the service is up (see BedrockInvoker.probe)."""
        ...


@runtime_checkable
class StreamingInvoker(Invoker, Protocol):
    """A transport that decodes the image into a sink while the answer arrives (BedrockInvoker)."""

    async def invoke_into(self, body: bytes, sink: ImageSink[T]) -> T | AttemptError: ...


# An image that came back: whole in memory (the buffered path), or streamed through a sink.
Returned = bytes | Received[Any]


@dataclass
class PoolStats:
    requests: int = 0
    throttles: int = 0
    started: int = 0
    deduplicated: int = 0  # requests saved: outputs copied from identical content
    probes: int = 0  # free requests asking whether the service is up (rejected as invalid, never billed)


class WorkerPool:
    def __init__(self, *, settings: JobSettings, checkpoint: Checkpoint, invoker: Invoker,
                 outputs: OutputStore, sources: Sources, limiter: RateLimiter,
                 clock: Clock, rng: random.Random, stop: asyncio.Event,
                 on_done: Callable[[ItemState], None] = lambda state: None, limit: int | None = None,
                 budget: Budget | None = None, request_stop: Callable[[str], None] | None = None,
                 only: frozenset[str] | None = None, breaker: Breaker | None = None,
                 unsent: UnsentOutputs | None = None, name_of: Callable[[WorkItem], str] | None = None,
                 offload: Offload = asyncio.to_thread, buffered: bool = False,
                 pictures: PictureKeeper | None = None) -> None:
        self.settings = settings
        self.checkpoint = checkpoint
        self.invoker = invoker
        self.outputs = outputs
        self.sources = sources
        self.limiter = limiter
        self.clock = clock
        self.rng = rng
        self.stop = stop
        self.on_done = on_done
        self.limit = limit
        self.only = only  # item keys; None means every pending item
        self.budget = budget or Budget(settings.model.price_usd, settings.limits.max_cost_usd)
        self.request_stop = request_stop or (lambda reason: stop.set())
        limits = settings.limits
        self.breaker = breaker or Breaker(clock, threshold=limits.outage_errors, max_wait_s=limits.outage_wait_s,
                                          first_probe_s=max(limits.backoff_base_s, 0.01),
                                          max_probe_s=max(limits.backoff_max_s, 0.01))
        self.unsent = unsent or UnsentOutputs(settings.state_dir)
        self.name_of = name_of or (lambda item: f"{item.source}:{item.relpath}")
        self.offload = offload
        # Benchmarks only (RunOptions.buffered_responses): each answer held whole, as before streaming.
        self.buffered = buffered
        self.pictures = pictures  # report pictures of S3 items, from bytes the run already has
        self.backoff = Backoff(limits.backoff_base_s, limits.backoff_max_s)
        self.stats = PoolStats()
        self.params_hash = request_fingerprint(settings)
        self._in_flight: dict[str, asyncio.Future[None]] = {}  # content sha256 -> its upscale

    async def run(self) -> PoolStats:
        """Process pending items until none is left, the limit is reached, or ``stop`` is set."""
        workers = self.settings.limits.concurrency
        queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(maxsize=2 * workers)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._produce(queue, workers))
            for _ in range(workers):
                group.create_task(self._work(queue))
        return self.stats

    async def _produce(self, queue: asyncio.Queue[WorkItem | None], workers: int) -> None:
        for item in self._pending():
            if self.stop.is_set() or (self.limit is not None and self.stats.started >= self.limit):
                break
            await queue.put(item)
            self.stats.started += 1
        for _ in range(workers):
            await queue.put(None)

    def _pending(self) -> Iterator[WorkItem]:
        """Pending items in discovery order, a page at a time (100k items never sit in memory)."""
        after = 0
        while page := self.checkpoint.pending(after, _PAGE):
            for item in page:
                after = item.seq
                if self.only is None or item.key in self.only:
                    yield item

    async def _work(self, queue: asyncio.Queue[WorkItem | None]) -> None:
        while (item := await queue.get()) is not None:
            if not self.stop.is_set():  # when draining, queued items simply stay pending
                await self._process(item)

    async def _process(self, item: WorkItem) -> None:
        self.checkpoint.start(item.key)
        finished = False
        try:
            try:
                state = await self._run_item(item)
            except _RUN_LEVEL:
                raise
            except Exception as exc:  # a bug or an unforeseen input must cost one item, not the run
                log.exception("unexpected error on %s", printable(self.name_of(item)))
                state = self._fail(item, "internal_error", f"internal_error: {type(exc).__name__}: {exc}")
            finished = state is not None
            if state is not None:
                self.on_done(state)
        finally:
            if not finished:  # cancelled, stopped in back-off, or a run-level stop elsewhere
                with contextlib.suppress(StateUnavailable):  # then recover() does it at the next start
                    self.checkpoint.release(item.key)

    async def _run_item(self, item: WorkItem) -> ItemState | None:
        """Drive one item to succeeded/failed; None means it was released unfinished."""
        try:
            data = await self.sources.read(item)
            payload = await self.offload(build_payload, data, self.settings)
        except (SourceError, PayloadError) as exc:
            return self._fail(item, exc.code, str(exc))
        await self._keep_picture(item, "before", f"{item.size}|{item.etag or item.mtime_ns}", data)
        del data  # the request body holds what is needed: the source's bytes can go
        self.checkpoint.record_content_hash(item.key, payload.content_sha256)
        digest = payload.content_sha256
        while (leader := self._in_flight.get(digest)) is not None:
            await asyncio.shield(leader)  # the same picture is being upscaled right now: reuse it
        copied = await self._copy_duplicate(item, digest, payload)
        if copied is not None:
            return copied
        self._in_flight[digest] = leader = asyncio.get_running_loop().create_future()
        try:
            result = await self._attempts(item, payload)
            if result is None:
                return None
            if isinstance(result, AttemptError):
                return self._fail(item, result.code, f"{result.code}: {result.message}")
            return await self._store(item, payload, result)
        finally:
            del self._in_flight[digest]
            leader.set_result(None)

    async def _copy_duplicate(self, item: WorkItem, digest: str, payload: Payload) -> ItemState | None:
        """Identical content and parameters already succeeded: copy its output, pay nothing.

        Only an output proven to be what was recorded for that content and those parameters is
        copied (its size and digest checked against the file now on disk): a stale file left at a
        path that a later run rewrote is never handed out as another image's upscale.
        """
        for candidate in self.checkpoint.succeeded_copies(digest, self.params_hash, item.key):
            data = await self.outputs.read_verified(candidate.output_path, candidate.output_bytes,
                                                    candidate.output_digest)
            if data is None:
                continue  # changed, gone, or not provable: upscale again rather than copy a stranger
            state = await self._write(item, Finished((data,), image_size(data)), payload, dedup_of=candidate.key)
            if state is ItemState.SUCCEEDED:
                self.stats.deduplicated += 1
            return state
        return None

    async def _attempts(self, item: WorkItem, payload: Payload) -> Returned | AttemptError | None:
        """Attempts until an image comes back, the item fails, or the run stops (None)."""
        limits = self.settings.limits
        billed_cap = limits.possibly_billed_resends + 1
        billed = item.possibly_billed  # earlier runs' attempts that were sent and never answered
        if billed >= billed_cap:
            return AttemptError("possibly_billed_cap", f"{billed} earlier attempt(s) may have been billed without "
                                "an answer; not sent again (run with --retry-failed to try once more)")
        charged = 0  # attempts that count against max_attempts: not service errors during an outage
        last_failure = self.clock.now()  # when this image's previous failed attempt was sent
        for attempt in itertools.count(1):
            admission = await self.breaker.admit(self.stop)
            if admission is Admission.GIVE_UP:
                self.request_stop(f"service unreachable since {_clock_time(self.breaker.down_since_wall)}")
            if admission in (Admission.GIVE_UP, Admission.STOP):
                return None
            if admission is Admission.PROBE and not await self._service_works(breaker_probe=True):
                continue  # still down (or stopping): wait for the next probe
            sent_at = self.clock.now()
            result = await self._send(item, payload)
            if result is None:
                return None
            if not isinstance(result, AttemptError):
                self.breaker.on_healthy(sent_at)
                self.limiter.on_success()
                return result
            service_down = self._observe(result, sent_at)
            billed += possibly_billed(result)
            # A service error counts against the image only when the image alone keeps failing: a
            # request sent after its previous failure was answered, or a free probe says the service
            # is up (never during an outage).
            counts = not service_down or (not self.breaker.is_open and (
                self.breaker.works_since(last_failure) or await self._service_works()))
            charged += counts
            last_failure = sent_at
            decision = decide(result, max(1, charged), limits.max_attempts, self.backoff, self.rng, billed,
                              billed_cap=billed_cap, retry_after_max_s=limits.retry_after_max_s, may_fail=counts)
            self.checkpoint.record_answer(item.key, throttled=decision.throttling,
                                          possibly_billed=possibly_billed(result))
            if decision.throttling:
                self._throttled(result)
            if decision.action is Action.FATAL:
                raise FatalBackendError(f"{result.code}: {result.message} (model {self.settings.model_id})")
            if decision.action is Action.FAIL:
                return result
            log.debug("retrying %s after %s (attempt %d)", printable(self.name_of(item)), result.code, attempt,
                      extra={"event": "retry", "file": printable(self.name_of(item)), "attempt": attempt,
                             "error_code": result.code})
            if not await sleep_unless(self.clock, decision.delay_s, self.stop):
                return None
        raise AssertionError("unreachable")

    def _observe(self, error: AttemptError, sent_at: float, probe: bool = False) -> bool:
        """Tell the breaker what an error says about the service; True for an error where nothing ran."""
        if is_service_state(error):
            self.breaker.on_service_error(sent_at, probe)
            return True
        if error.code not in _NO_ANSWER:
            self.breaker.on_healthy(sent_at)  # the service answered (a throttle, a 4xx): it works
        elif probe:
            self.breaker.abandon_probe()
        return False

    async def _service_works(self, breaker_probe: bool = False) -> bool:
        """Ask the service, with a free request (rejected as invalid, never run, never billed), whether
        it is up: the breaker's probe during an outage, or a worker's question before it blames an image."""
        if not await self.limiter.acquire(self.stop):
            if breaker_probe:
                self.breaker.abandon_probe()
            return False
        sent_at = self.clock.now()
        self.stats.probes += 1
        error = await self.invoker.probe()
        if error is None:
            self.breaker.on_healthy(sent_at)
            return True
        return not self._observe(error, sent_at, breaker_probe) and error.code not in _NO_ANSWER

    def _throttled(self, error: AttemptError) -> None:
        self.budget.refund()
        self.stats.throttles += 1
        retry_after = error.retry_after_s
        if retry_after is not None:
            retry_after = min(retry_after, self.settings.limits.retry_after_max_s)
        self.limiter.on_throttle(retry_after)

    async def _send(self, item: WorkItem, payload: Payload) -> Returned | AttemptError | None:
        """One attempt, once the rate and the budget allow it; None when the run stops first.

        The rate comes first: a price reserved is then spent at once, so every request that fits the
        cost cap is sent, and a stop that comes while waiting for the rate costs nothing.
        """
        if not await self.limiter.acquire(self.stop):
            return None
        if not self.budget.reserve():
            self.request_stop("max-cost")
            return None
        self.checkpoint.count_attempt(item.key)
        self.stats.requests += 1
        if not self.buffered:
            return await self._receive(payload)
        result = await self.invoker.invoke(payload.body)
        if isinstance(result, bytes):
            problem = _check_returned(result, payload)
            if problem is not None:
                return AttemptError("bad_response", problem)
        return result

    # ---- streamed answers (see streaming.py): the image goes to its sink while it arrives ----------
    async def _receive(self, payload: Payload) -> Received[Any] | AttemptError:
        """One attempt, its image checked on the way (as _check_returned does) into its sink."""
        sink = CheckedSink(self._sink_for(payload), functools.partial(_judge, payload=payload))
        if isinstance(self.invoker, StreamingInvoker):
            return await self.invoker.invoke_into(payload.body, sink)
        result = await self.invoker.invoke(payload.body)  # a transport that only returns bytes
        return result if isinstance(result, AttemptError) else await feed_bytes(result, sink)

    def _sink_for(self, payload: Payload) -> ImageSink[Any]:
        """The usual output: metadata spliced in, straight into a staging file. A padded one is held in
        memory: cropping the padding off decodes it anyway (finishing.finish)."""
        if payload.plan.content_box is None and isinstance(self.outputs, StagingStore):
            try:
                return SplicingSink(self.outputs.open_sink(self.offload), payload.metadata)
            except OSError:  # no staging directory: held in memory, write_atomic will say why it cannot write
                pass
        return MemorySink()

    async def _store_received(self, item: WorkItem, payload: Payload, received: Received[Any]) -> ItemState | None:
        size = (received.image.width, received.image.height)
        stored = received.stored
        if isinstance(stored, StagedFile):
            return await self._adopt(item, payload, stored, size)
        if isinstance(stored, Spilled):  # the staging file could not be written: the output is in memory
            if stored.parts is not None:
                return await self._write(item, Finished(stored.parts, size), payload)
            if storage_refuses(stored.error):
                self.request_stop(f"the output storage refuses writes: {stored.error}")
                return None
            return self._fail(item, "output_write_failed", f"output_write_failed: {item.output_path}: {stored.error}")
        return await self._store(item, payload, stored)

    async def _adopt(self, item: WorkItem, payload: Payload, staged: StagedFile,
                     size: tuple[int, int]) -> ItemState | None:
        """Put the staged output in place. If that fails, its bytes take the path of any output held in
        memory (write_atomic and its handling: a full disk keeps the image for the next run)."""
        assert isinstance(self.outputs, StagingStore)
        mtime = item.mtime_ns if self.settings.metadata.mtime and item.mtime_ns else None
        await self._keep_picture(item, "after", staged.digest, staged.path)  # an S3 upload removes the file
        try:
            written = await self.outputs.adopt(staged, item.output_path, mtime, self._note(item, payload, size))
        except (OSError, OutputPathError, OutputUnavailable) as exc:
            log.debug("could not put %s in place (%s): writing it again", staged.path, exc)
            data = await self.offload(_take_back, self.outputs, staged)
            if data is None:
                return self._fail(item, "output_write_failed", f"output_write_failed: {item.output_path}: {exc}")
            return await self._write(item, Finished((data,), size), payload)
        self._succeeded(item, written.size, written.digest, size, payload)
        return ItemState.SUCCEEDED

    async def _store(self, item: WorkItem, payload: Payload, returned: Returned) -> ItemState | None:
        if isinstance(returned, Received):
            return await self._store_received(item, payload, returned)
        try:
            final = await self.offload(finish, returned, payload.plan, payload.metadata)
        except (OSError, ValueError, SyntaxError) as exc:
            return self._fail(item, "bad_response", f"bad_response: returned image unusable: {exc}")
        return await self._write(item, final, payload)

    async def _write(self, item: WorkItem, output: Finished, payload: Payload,
                     dedup_of: str | None = None) -> ItemState | None:
        mtime = item.mtime_ns if self.settings.metadata.mtime and item.mtime_ns else None
        note = self._note(item, payload, output.size)
        try:
            written = await self.outputs.write(item.output_path, output.parts, mtime, note)
        except OutputUnavailable as exc:
            self.request_stop(str(exc))
            note_of_kept = self._unsent_note(item, payload, output, mtime)
            # A paid image is kept for the next run instead of paid again (answered and kept: not "possibly billed").
            if dedup_of is None and await self.offload(self.unsent.keep, note_of_kept, output.parts):
                self.checkpoint.record_answer(item.key)
            return None
        except (OSError, OutputPathError) as exc:
            if dedup_of is None:  # paid for: kept, and written (uploaded) by the next run before anything is sent
                await self.offload(self.unsent.keep, self._unsent_note(item, payload, output, mtime), output.parts)
            return self._fail(item, "output_write_failed", f"output_write_failed: {item.output_path}: {exc}")
        await self._keep_picture(item, "after", written.digest, output.parts)
        self._succeeded(item, written.size, written.digest, output.size, payload, dedup_of)
        return ItemState.SUCCEEDED

    def _succeeded(self, item: WorkItem, size: int, digest: str, image_size: tuple[int, int] | None,
                   payload: Payload, dedup_of: str | None = None) -> None:
        self.checkpoint.succeed(item.key, size, image_size, payload.sent.size, dedup_of, digest)
        log.debug("succeeded %s", printable(self.name_of(item)),
                  extra={"event": "item_succeeded", "file": printable(self.name_of(item))})

    async def _keep_picture(self, item: WorkItem, side: str, version: str, image: Picturable) -> None:
        """The report's picture of one side of an item it cannot read locally (thumbnails.py)."""
        if self.pictures is not None and self.pictures.wanted(item.key, item.source, item.relpath, side):
            await self.offload(self.pictures.keep, item.key, side, version, image)

    def _note(self, item: WorkItem, payload: Payload, size: tuple[int, int] | None) -> OutputNote:
        """How the output was made, for stores whose outputs carry it (S3 metadata: proof of work)."""
        return OutputNote(item.key, item.etag, payload.content_sha256, self.params_hash, "", size,
                          payload.sent.size, __version__)

    def _unsent_note(self, item: WorkItem, payload: Payload, output: Finished, mtime: int | None) -> UnsentNote:
        return UnsentNote(item.key, self.params_hash, item.size, item.mtime_ns, payload.content_sha256, output.size,
                          payload.sent.size, mtime, item.etag)

    def _fail(self, item: WorkItem, code: str, message: str) -> ItemState:
        self.checkpoint.fail(item.key, code, message)
        name = printable(self.name_of(item))
        log.warning("failed %s: %s", name, message, extra={"event": "item_failed", "file": name, "error_code": code})
        return ItemState.FAILED


_FORMAT_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def _check_returned(data: bytes, payload: Payload) -> str | None:
    """Why the returned bytes are not the image this request must produce, or None (buffered path)."""
    found: Structure | StructureError
    try:
        found = check_encoded(data)
    except StructureError as exc:
        found = exc
    return _judge(found, payload)


def _judge(found: Structure | StructureError, payload: Payload) -> str | None:
    """Why a returned image with this structure check result is not the one this request must produce.

    Structure only (chunk CRCs, markers, RIFF length) and the header's size: no pixel decode on
    the hot path. The model keeps the sent image's aspect ratio, so a returned size that does not
    is a broken answer, as is an image in another format than the one asked for.
    """
    if isinstance(found, StructureError):
        return f"returned image is damaged: {found}"
    wanted = _FORMAT_NAMES[payload.output_format]
    if found.format != wanted:
        return f"returned a {found.format} image, {wanted} was asked for"
    sent_w, sent_h = payload.sent.size
    expected_h = found.width * sent_h / sent_w
    if abs(found.height - expected_h) > max(2.0, 0.01 * expected_h):
        return f"returned {found.width}x{found.height} for a {sent_w}x{sent_h} request (aspect ratio not kept)"
    return None


def _take_back(outputs: StagingStore, staged: StagedFile) -> bytes | None:
    """A staged output's bytes, and the staged file removed (None: it cannot be read)."""
    try:
        return staged.path.read_bytes()
    except OSError:
        return None
    finally:
        outputs.discard(staged)


def _clock_time(wall: float | None) -> str:
    if wall is None:
        return "unknown"
    return dt.datetime.fromtimestamp(wall).astimezone().strftime("%H:%M")
