"""Runs one job end to end and decides its exit code: lock → checkpoint → scan → worker pool → report.

The only ``asyncio.run`` of a job is here. Signals: the first SIGINT/SIGTERM sets the stop event
(no new item starts, in-flight requests finish and are recorded); the second cancels the pool at
once (unfinished items go back to pending). Either way the report is written and the exit code is
75 while work remains, so the next run resumes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from batch_upscaler.bedrock import BedrockInvoker, ClientSettings, open_client
from batch_upscaler.budget import Budget
from batch_upscaler.checkpoint import Checkpoint, ItemState
from batch_upscaler.clock import Clock, SystemClock
from batch_upscaler.discovery import Discovery, SourceRoot, display_path, parse_source, printable
from batch_upscaler.emulator import EmulatorConfig, serve
from batch_upscaler.errors import ExitCode, FatalBackendError, UsageError
from batch_upscaler.joblock import JobLock
from batch_upscaler.metrics import write_metrics
from batch_upscaler.outputs import LocalOutputStore
from batch_upscaler.pool import PoolStats, WorkerPool
from batch_upscaler.progress import Progress
from batch_upscaler.ratelimit import RateLimiter, make_limiter
from batch_upscaler.report import ReportWriter
from batch_upscaler.scan import Scanner
from batch_upscaler.settings import Backend, JobSettings, RunOptions

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    stats: PoolStats = field(default_factory=PoolStats)
    stopped_by: str | None = None  # "SIGINT", "SIGTERM", "max-duration", "max-images": stopped early
    fatal: FatalBackendError | None = None
    limiter: RateLimiter | None = None
    budget: Budget | None = None


@dataclass(frozen=True)
class RunResult:
    exit_code: ExitCode
    counts: Mapping[ItemState, int]
    requests: int
    throttles: int
    report_dir: Path


def resolve_sources(settings: JobSettings) -> dict[str, SourceRoot]:
    """Each source's walk root; a missing one is a usage error naming its manifest key."""
    roots = {}
    for i, spec in enumerate(settings.sources):
        root = parse_source(spec, settings.base_dir)
        if not root.root.exists():
            raise UsageError(f"{settings.manifest_path}: sources[{i}]: {root.root} does not exist")
        roots[spec] = root
    return roots


def run_job(settings: JobSettings, options: RunOptions, clock: Clock | None = None,
            rng: random.Random | None = None) -> RunResult:
    with JobLock(settings.lock_path, settings.name):
        checkpoint = Checkpoint.open(settings.checkpoint_path, settings.name)
        try:
            return _run_locked(settings, options, checkpoint, clock or SystemClock(), rng or random.Random())
        finally:
            checkpoint.close()


def _run_locked(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint, clock: Clock,
                rng: random.Random) -> RunResult:
    recovered = checkpoint.recover()
    if recovered:
        log.info("%d item(s) left in progress by an earlier run are pending again", recovered)
    outputs = LocalOutputStore(settings.output_dir)
    outputs.clean_staging()
    roots = resolve_sources(settings)
    discovery = Discovery(roots.values(), settings.exclude, prune=(settings.output_dir, settings.state_dir),
                          on_error=lambda path, msg: log.warning("cannot read %s: %s", path, msg),
                          base_dir=settings.base_dir)
    summary = Scanner(settings, checkpoint, outputs).run(discovery)
    log.info("scan: %d file(s): %d new, %d changed, %d unchanged%s", summary.discovered, summary.new,
             summary.changed, summary.unchanged,
             "".join(f"; {n} {code}" for code, n in sorted(summary.refused.items())), extra={"event": "scan"})
    if options.retry_failed:
        log.info("%d failed item(s) will be retried", checkpoint.retry_failed())
    only = _only_keys(settings, checkpoint, roots, options.only) if options.only is not None else None
    run_id = checkpoint.begin_run()
    outcome = RunOutcome()
    try:
        asyncio.run(_execute(settings, options, checkpoint, outputs, roots, outcome, clock, rng, only))
    finally:
        outputs.clean_staging()  # nothing temporary outlives the run (a crash's leftovers go next time)
        counts = checkpoint.counts()
        exit_code = exit_code_for(outcome, counts)
        limiter = outcome.limiter
        checkpoint.finish_run(run_id, exit_code, outcome.stats.requests, outcome.stats.throttles,
                              rate_mode=limiter.mode if limiter else None, final_rpm=limiter.rpm if limiter else None,
                              spent_usd=outcome.budget.spent_usd if outcome.budget else 0.0)
        report_dir = ReportWriter(settings, checkpoint).write()
        write_metrics(_metrics_path(settings, options), settings.name, checkpoint, settings.model.price_usd)
    if outcome.fatal is not None:
        raise outcome.fatal
    log.info("done: %d succeeded, %d failed, %d skipped, %d pending; report in %s",
             counts[ItemState.SUCCEEDED], counts[ItemState.FAILED], counts[ItemState.SKIPPED],
             counts[ItemState.PENDING], report_dir, extra={"event": "run_finished"})
    return RunResult(exit_code, counts, outcome.stats.requests, outcome.stats.throttles, report_dir)


def _only_keys(settings: JobSettings, checkpoint: Checkpoint, roots: Mapping[str, SourceRoot],
               wanted: frozenset[str]) -> frozenset[str]:
    """Keys of the items ``--only`` names; named failed items become pending, unknown names are reported."""
    keys, found = set(), set()
    for row in checkpoint.items():
        name = printable(display_path(roots, row["source"], row["relpath"], settings.base_dir))
        if name in wanted:
            keys.add(row["key"])
            found.add(name)
    for name in sorted(wanted - found):
        log.warning("--only: %s is not an item of job %s", name, settings.name)
    retried = checkpoint.retry_keys(keys)
    log.info("--only: %d item(s) selected, %d failed one(s) made pending", len(keys), retried)
    # Listed items already done stay done: --only redoes what is pending or failed, nothing paid twice.
    return frozenset(key for key in keys if checkpoint.state_of(key) is ItemState.PENDING)


def exit_code_for(outcome: RunOutcome, counts: Mapping[ItemState, int]) -> ExitCode:
    if outcome.fatal is not None:
        return ExitCode.FATAL_BACKEND
    if outcome.stopped_by and counts[ItemState.PENDING] + counts[ItemState.IN_PROGRESS] > 0:
        return ExitCode.INTERRUPTED
    return ExitCode.ITEMS_FAILED if counts[ItemState.FAILED] else ExitCode.OK


async def _execute(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint,
                   outputs: LocalOutputStore, roots: Mapping[str, SourceRoot], outcome: RunOutcome,
                   clock: Clock, rng: random.Random, only: frozenset[str] | None) -> None:
    stop = asyncio.Event()
    limiter = make_limiter(settings.limits.requests_per_minute, clock)
    outcome.limiter = limiter
    pending = checkpoint.counts()[ItemState.PENDING] if only is None else len(only)
    total = pending if options.limit is None else min(pending, options.limit)
    async with _client_settings(settings) as client_settings, open_client(client_settings) as client:
        with Progress(total, options.show_progress, lambda: limiter.rpm) as progress:
            pool = WorkerPool(settings=settings, checkpoint=checkpoint,
                              invoker=BedrockInvoker(client, settings.model_id), outputs=outputs,
                              sources=roots, limiter=limiter, clock=clock, rng=rng, stop=stop,
                              on_done=progress.item_done, limit=options.limit, only=only)
            outcome.stats = pool.stats
            outcome.budget = pool.budget
            task = asyncio.create_task(pool.run())
            stopper = _Stopper(stop, task, outcome, options.grace_s)
            pool.request_stop = stopper.stop
            heartbeat = asyncio.create_task(progress.heartbeat(options.heartbeat_s))
            metrics = asyncio.create_task(_metrics_loop(settings, options, checkpoint))
            deadline = (asyncio.get_running_loop().call_later(options.max_duration_s, stopper.stop, "max-duration")
                        if options.max_duration_s is not None else None)
            try:
                with stopper:
                    await _wait_pool(task, outcome)
            finally:
                heartbeat.cancel()
                metrics.cancel()
                if deadline is not None:
                    deadline.cancel()
    if options.limit is not None and pool.stats.started >= options.limit and outcome.stopped_by is None:
        outcome.stopped_by = "max-images"


def _metrics_path(settings: JobSettings, options: RunOptions) -> Path:
    return options.metrics_path or settings.report_dir / "metrics.prom"


async def _metrics_loop(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint) -> None:
    """Keep metrics.prom fresh while the run goes on (the final write happens after the report)."""
    while True:
        write_metrics(_metrics_path(settings, options), settings.name, checkpoint, settings.model.price_usd)
        await asyncio.sleep(options.metrics_interval_s)


async def _wait_pool(task: asyncio.Task[PoolStats], outcome: RunOutcome) -> None:
    try:
        await task
    except* FatalBackendError as group:
        outcome.fatal = next(e for e in group.exceptions if isinstance(e, FatalBackendError))
    except* asyncio.CancelledError:
        if not task.cancelled():
            raise


class _Stopper:
    """Stops the pool: first a drain (signal or cap), then, on a second signal or after the grace
    period, a cancel (unfinished items go back to pending)."""

    def __init__(self, stop: asyncio.Event, task: asyncio.Task[PoolStats], outcome: RunOutcome,
                 grace_s: float) -> None:
        self.event, self.task, self.outcome, self.grace_s = stop, task, outcome, grace_s
        self.loop = asyncio.get_running_loop()
        self._grace: asyncio.TimerHandle | None = None

    def stop(self, reason: str) -> None:
        if self.event.is_set():
            return
        self.outcome.stopped_by = reason
        self.event.set()
        hint = "; send it again to stop at once" if reason.startswith("SIG") else ""
        log.warning("%s: no new image starts; finishing requests in flight (up to %gs)%s", reason, self.grace_s, hint,
                    extra={"event": "stop_requested"})
        self._grace = self.loop.call_later(self.grace_s, self._cancel, f"grace period of {self.grace_s:g}s over")

    def _cancel(self, why: str) -> None:
        log.warning("%s: stopping now; unfinished items stay pending", why)
        self.task.cancel()

    def _handle(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self.event.is_set():
            self.stop(name)
        else:
            self.outcome.stopped_by = self.outcome.stopped_by or name
            self._cancel(f"{name} again")

    def __enter__(self) -> _Stopper:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(signum, self._handle, signum)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.loop.remove_signal_handler(signum)
        if self._grace is not None:
            self._grace.cancel()


@asynccontextmanager
async def _client_settings(settings: JobSettings) -> AsyncIterator[ClientSettings]:
    """Where requests go: the configured Bedrock endpoint, or an emulator started in-process."""
    limits = settings.limits
    common = dict(region=settings.region, concurrency=limits.concurrency,
                  read_timeout_s=limits.read_timeout_s, connect_timeout_s=limits.connect_timeout_s)
    if settings.backend is Backend.BEDROCK:
        yield ClientSettings(endpoint_url=settings.endpoint_url, profile=settings.profile, **common)  # type: ignore[arg-type]
        return
    emulator = EmulatorConfig(output_max_pixels=settings.emulator.output_max_pixels,
                              latency_s=settings.emulator.latency_s, quota_rpm=settings.emulator.quota_rpm)
    async with serve(emulator) as running:
        log.info("backend: embedded emulator at %s", running.endpoint_url)
        yield ClientSettings(endpoint_url=running.endpoint_url, profile=None,
                             static_credentials=("EMULATOR", "emulator"), **common)  # type: ignore[arg-type]
