"""The worker pool stage: pending items → rate-limited InvokeModel attempts → atomic outputs → checkpoint.

Structured concurrency: one TaskGroup holds a producer (pages pending items out of the
checkpoint into a bounded queue) and ``concurrency`` workers. The concurrency cap (number of
workers) and the rate limiter are separate dials. Each item moves through the checkpoint's
state machine; a worker that is cancelled or stopped mid-item puts it back to pending, so the
checkpoint is consistent at any instant. A fatal backend error (credentials, model access) ends
the group at once, leaving every unfinished item pending.

Stopping: when ``stop`` is set (first Ctrl-C/SIGTERM, or a cap), no new item starts and items in
back-off are released; requests already in flight finish and are recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from batch_upscaler.budget import Budget
from batch_upscaler.checkpoint import Checkpoint, ItemState, WorkItem
from batch_upscaler.clock import Clock
from batch_upscaler.discovery import SourceRoot, printable
from batch_upscaler.errors import FatalBackendError
from batch_upscaler.finishing import Finished, finish, image_size
from batch_upscaler.outputs import OutputPathError, OutputStore
from batch_upscaler.payload import Payload, PayloadError, build_payload
from batch_upscaler.ratelimit import RateLimiter
from batch_upscaler.retry import Action, AttemptError, Backoff, decide, possibly_billed
from batch_upscaler.settings import JobSettings, request_fingerprint

log = logging.getLogger(__name__)
_PAGE = 256


class Invoker(Protocol):
    async def invoke(self, body: bytes) -> bytes | AttemptError: ...


@dataclass
class PoolStats:
    requests: int = 0
    throttles: int = 0
    started: int = 0
    deduplicated: int = 0  # requests saved: outputs copied from identical content


class WorkerPool:
    def __init__(self, *, settings: JobSettings, checkpoint: Checkpoint, invoker: Invoker,
                 outputs: OutputStore, sources: Mapping[str, SourceRoot], limiter: RateLimiter,
                 clock: Clock, rng: random.Random, stop: asyncio.Event,
                 on_done: Callable[[ItemState], None] = lambda state: None, limit: int | None = None,
                 budget: Budget | None = None, request_stop: Callable[[str], None] | None = None,
                 only: frozenset[str] | None = None) -> None:
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
        self.backoff = Backoff(settings.limits.backoff_base_s, settings.limits.backoff_max_s)
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
            except (FatalBackendError, asyncio.CancelledError):
                raise
            except Exception as exc:  # a bug or an unforeseen input must cost one item, not the run
                log.exception("unexpected error on %s", printable(item.key))
                state = self._fail(item, "internal_error", f"internal_error: {type(exc).__name__}: {exc}")
            finished = state is not None
            if state is not None:
                self.on_done(state)
        finally:
            if not finished:  # cancelled, stopped in back-off, or a fatal error elsewhere
                self.checkpoint.release(item.key)

    async def _run_item(self, item: WorkItem) -> ItemState | None:
        """Drive one item to succeeded/failed; None means it was released unfinished."""
        path = self.sources[item.source].path_of(item.fs_relpath)
        try:
            payload = await asyncio.to_thread(build_payload, path, item.size, self.settings)
        except PayloadError as exc:
            return self._fail(item, exc.code, str(exc))
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
        """Identical content and parameters already succeeded: copy its output, pay nothing."""
        found = self.checkpoint.find_succeeded_copy(digest, self.params_hash, item.key)
        if found is None:
            return None
        original_key, original_output = found
        try:
            data = await asyncio.to_thread(self.outputs.read, original_output)
        except OSError:
            return None  # the earlier output is gone: upscale again
        state = await self._write(item, Finished((data,), image_size(data)), payload, dedup_of=original_key)
        self.stats.deduplicated += 1
        return state

    async def _attempts(self, item: WorkItem, payload: Payload) -> bytes | AttemptError | None:
        billed_failures = 0
        for attempt in itertools.count(1):
            if not self.budget.reserve():
                self.request_stop("max-cost")
                return None
            await self.limiter.acquire()
            self.checkpoint.count_attempt(item.key)
            self.stats.requests += 1
            result = await self.invoker.invoke(payload.body)
            if isinstance(result, bytes):
                self.limiter.on_success()
                return result
            billed_failures += possibly_billed(result)
            decision = decide(result, attempt, self.settings.limits.max_attempts, self.backoff, self.rng,
                              billed_failures)
            if decision.throttling:
                self.budget.refund()
                self.stats.throttles += 1
                self.checkpoint.count_throttle(item.key)
                self.limiter.on_throttle(result.retry_after_s)
            if decision.action is Action.FATAL:
                raise FatalBackendError(f"{result.code}: {result.message} (model {self.settings.model_id})")
            if decision.action is Action.FAIL:
                return result
            log.debug("retrying %s after %s (attempt %d)", printable(item.key), result.code, attempt,
                      extra={"event": "retry", "file": printable(item.key), "attempt": attempt,
                             "error_code": result.code})
            if self.stop.is_set():
                return None
            await self.clock.sleep(decision.delay_s)
        raise AssertionError("unreachable")

    async def _store(self, item: WorkItem, payload: Payload, returned: bytes) -> ItemState:
        try:
            final = await asyncio.to_thread(finish, returned, payload.plan, payload.metadata)
        except (OSError, ValueError, SyntaxError) as exc:
            return self._fail(item, "bad_response", f"bad_response: returned image unusable: {exc}")
        return await self._write(item, final, payload)

    async def _write(self, item: WorkItem, output: Finished, payload: Payload,
                     dedup_of: str | None = None) -> ItemState:
        mtime = item.mtime_ns if self.settings.metadata.mtime else None
        try:
            written = await asyncio.to_thread(self.outputs.write_atomic, item.output_path, output.parts, mtime)
        except (OSError, OutputPathError) as exc:
            return self._fail(item, "output_write_failed", f"output_write_failed: {item.output_path}: {exc}")
        self.checkpoint.succeed(item.key, written, output.size, payload.sent.size, dedup_of)
        log.debug("succeeded %s", printable(item.key), extra={"event": "item_succeeded", "file": printable(item.key)})
        return ItemState.SUCCEEDED

    def _fail(self, item: WorkItem, code: str, message: str) -> ItemState:
        self.checkpoint.fail(item.key, code, message)
        log.warning("failed %s: %s", printable(item.key), message,
                    extra={"event": "item_failed", "file": printable(item.key), "error_code": code})
        return ItemState.FAILED

