"""Runs one job end to end: lock → checkpoint → scan → checks before paying → worker pool → report.

The only ``asyncio.run`` of a job is here; everything inside it (S3 listings, probes, requests,
uploads) shares one event loop and one AWS session. Signals (batch_upscaler.signals, installed by
the command line before anything else): the first SIGINT/SIGTERM stops new work wherever the run
is (between files of the scan, before the pool, or in the pool, where requests in flight finish
and are recorded); the second cancels the pool at once (unfinished items go back to pending).
Either way the report is written and the exit code is 75 while work remains.

Before the first request, what can be known is checked: the output root belongs to this job and
can be written, the state directory can be written, and images an earlier run paid for but could
not store are written first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiobotocore.session import AioSession

from batch_upscaler.bedrock import BedrockInvoker, ClientSettings, open_client
from batch_upscaler.budget import Budget
from batch_upscaler.checkpoint import Checkpoint, ItemState
from batch_upscaler.clock import Clock, SystemClock
from batch_upscaler.discovery import printable
from batch_upscaler.emulator import EmulatorConfig, serve
from batch_upscaler.ending import exit_code_for, log_summary
from batch_upscaler.errors import ExitCode, FatalBackendError, Interrupted, StateUnavailable, UpscalerError
from batch_upscaler.fairshare import ShareKeeper
from batch_upscaler.joblock import JobLock
from batch_upscaler.merge import write_done
from batch_upscaler.metrics import write_metrics
from batch_upscaler.pool import PoolStats, WorkerPool
from batch_upscaler.progress import Progress
from batch_upscaler.quotas import applied_quota
from batch_upscaler.ratelimit import AdaptiveRateLimiter, RateLimiter, make_limiter
from batch_upscaler.ratememory import StartChoice, decide_start, leave_rate, memory_key, unshared_warning
from batch_upscaler.report import ReportWriter
from batch_upscaler.retry import SERVICE_STATE_CODES
from batch_upscaler.scan import Scanner, ScanSummary
from batch_upscaler.settings import Backend, JobSettings, RunOptions, request_fingerprint
from batch_upscaler.signals import StopSignals
from batch_upscaler.storage.edge import Storage, open_storage
from batch_upscaler.storage.local import LocalOutputStore
from batch_upscaler.storage.shareboard import share_board
from batch_upscaler.thumbnails import THUMB_PX, PictureKeeper, ThumbnailCache
from batch_upscaler.unsent import UnsentOutputs, deliver

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    stats: PoolStats = field(default_factory=PoolStats)
    stopped_by: str | None = None  # "SIGINT", "max-duration", "service unreachable since 02:13", ...: stopped early
    fatal: FatalBackendError | None = None
    limiter: RateLimiter | None = None
    start: StartChoice | None = None  # where ``auto`` started
    budget: Budget | None = None
    scanned: bool = False  # the scan went through every file (a stop before that leaves work unknown)


@dataclass(frozen=True)
class RunResult:
    exit_code: ExitCode
    counts: Mapping[ItemState, int]
    requests: int
    throttles: int
    report: str
    new_failures: int = 0


async def prepare_items(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint, storage: Storage,
                        signals: StopSignals, *, quiet: bool = False) -> ScanSummary:
    """The first half of a run, shared with ``plan``: scan, and the failures to retry."""
    storage.sources.check()
    scanner = Scanner(settings, checkpoint, storage, quiet=quiet, verify_outputs=options.verify_outputs,
                      stopped=lambda: signals.requested)
    summary = await scanner.run()
    # Failures that were the service's state (an outage), not facts about the image, are retried
    # by any run; the rest only with --retry-failed.
    retried = checkpoint.retry_failed(None if options.retry_failed else SERVICE_STATE_CODES)
    if retried and not quiet:
        log.info("%d failed item(s) will be retried%s", retried,
                 "" if options.retry_failed else " (they failed because the service was down)")
    return summary


def run_job(settings: JobSettings, options: RunOptions, clock: Clock | None = None,
            rng: random.Random | None = None, signals: StopSignals | None = None) -> RunResult:
    signals = signals or StopSignals()
    with JobLock(settings.lock_path, settings.name):
        checkpoint = Checkpoint.open(settings.checkpoint_path, settings.name)
        try:
            return asyncio.run(_run(settings, options, checkpoint, clock or SystemClock(), rng or random.Random(),
                                    signals))
        finally:
            checkpoint.close()


async def _run(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint, clock: Clock,
               rng: random.Random, signals: StopSignals) -> RunResult:
    run_id = checkpoint.begin_run()
    outcome = RunOutcome()
    session = AioSession(profile=settings.profile)
    async with open_storage(settings, session) as storage:
        try:
            outcome.scanned = await _before_the_pool(settings, options, checkpoint, storage, signals)
            only = _only_keys(settings, checkpoint, storage, options.only) if options.only is not None else None
            if signals.requested:
                outcome.stopped_by = signals.first
            elif _work_left(checkpoint, only):
                await _check_writable(settings, storage)
                await _execute(settings, options, checkpoint, storage, session, outcome, clock, rng, only, signals)
        except Interrupted as exc:  # stopped in the scan, a full disk, a checkpoint that cannot be written
            outcome.stopped_by = signals.first if signals.requested else str(exc)
        except FatalBackendError as exc:  # S3 AccessDenied / NoSuchBucket before any request: exit 3
            outcome.fatal = exc
        except UpscalerError:  # a set-up problem found on the way (exit 2): record the run, then report it
            with contextlib.suppress(StateUnavailable):
                checkpoint.finish_run(run_id, ExitCode.USAGE, outcome.stats.requests, outcome.stats.throttles)
            raise
        finally:
            await storage.outputs.close()  # nothing temporary outlives the run (a crash's leftovers go next time)
        result = await _finish(settings, options, checkpoint, storage, run_id, outcome)
    if outcome.fatal is not None:
        raise outcome.fatal
    return result


async def _before_the_pool(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint, storage: Storage,
                           signals: StopSignals) -> bool:
    """Recover, scan, claim the output root, deliver kept images; False if stopped before the scan."""
    recovered = checkpoint.recover()
    if recovered:
        log.info("%d item(s) left in progress by an earlier run are pending again", recovered)
    if signals.requested:
        return False
    summary = await prepare_items(settings, options, checkpoint, storage, signals)
    log.info("scan: %d file(s): %d new, %d changed, %d unchanged%s%s", summary.discovered, summary.new,
             summary.changed, summary.unchanged,
             f"; {summary.proven} already done (proof of work in their outputs)" if summary.proven else "",
             "".join(f"; {n} {code}" for code, n in sorted(summary.refused.items()) if n),
             extra={"event": "scan"})
    # Only a job that passed its checks claims the output root (a refused one leaves no marker).
    await storage.outputs.claim(settings.name, settings.output_shared)
    removed = await storage.outputs.clean_stale_staging()
    if removed:
        log.info("removed %d half-written output(s) left by a run that died", removed)
    kept = UnsentOutputs(settings.state_dir)
    if any(True for _ in kept.notes()):  # paid for by an earlier run: written before anything is sent
        await _check_writable(settings, storage)
        await deliver(kept, checkpoint, storage.outputs, request_fingerprint(settings))
    return True


def shard_rate(settings: JobSettings) -> float | None:
    """This shard's ceiling: limits.shard_rpm, else its share of requests_per_minute among the shards
    running at once (one quota, many shards); None (``auto``): each shard is held to its share of
    the applied quota when Service Quotas tells it (ratememory.choose_start), else finds its rate."""
    limits = settings.limits
    if limits.shard_rpm is not None:
        return limits.shard_rpm
    if limits.requests_per_minute is None:
        return None
    return limits.requests_per_minute / settings.shard.sharing


def _pictures(settings: JobSettings, checkpoint: Checkpoint, storage: Storage) -> PictureKeeper | None:
    """Report pictures of items the report cannot read locally (S3 sources or outputs), kept by the pool."""
    names = storage.sources.names
    remote_output = not names.local_outputs
    if not remote_output and not names.s3:
        return None  # all local: the report pictures the files themselves
    population = sum(checkpoint.counts().values())
    return PictureKeeper(ThumbnailCache(settings.state_dir / "thumbnails", THUMB_PX), population,
                         lambda source, relpath: names.local_source(source, relpath) is None, remote_output)


async def _start_rate(settings: JobSettings, checkpoint: Checkpoint, client: ClientSettings,
                      session: AioSession) -> StartChoice | None:
    """Where ``auto`` starts (ratememory.py); None for a fixed rate."""
    if shard_rate(settings) is not None:
        return None
    choice = await decide_start(
        settings, checkpoint.last_rate(memory_key(settings)),
        lambda: applied_quota(settings, session, client.quotas_endpoint_url, client.static_credentials), time.time())
    log.info("rate: auto starts %s: %s", f"at {choice.rpm:.0f}/min" if choice.rpm else "cold", choice.why,
             extra={"event": "start_rate"})
    if (warning := unshared_warning(choice, settings.shard)) is not None:
        log.warning(warning, extra={"event": "start_rate"})
    return choice


@asynccontextmanager
async def _sharing_fairly(settings: JobSettings, limiter: RateLimiter, start: StartChoice | None, storage: Storage,
                          clock: Clock, rng: random.Random) -> AsyncIterator[None]:
    """A shard on ``auto`` with no quota known job-wide keeps near a fair share through the share
    board while its pool runs (fairshare.py); anything else runs as it is."""
    if (not isinstance(limiter, AdaptiveRateLimiter) or not settings.shard.sharded
            or (start is not None and start.ceiling is not None) or settings.shard.share_every_s <= 0):
        yield
        return
    keeper = ShareKeeper(limiter, share_board(settings.report_root, storage.s3), settings.shard.label, clock,
                         settings.shard.share_every_s, rng=rng, where=str(settings.report_root))
    task = asyncio.create_task(keeper.run())
    try:
        yield
    finally:
        task.cancel()
        failed = (await asyncio.gather(task, return_exceptions=True))[0]
        if isinstance(failed, Exception):  # the board is advice: a bug in it never fails a run
            log.warning("rate: the share board stopped: %r", failed, extra={"event": "fair_share"})
        await keeper.leave()
        log.info("rate: shared the quota through the share board in %s: %d posts, %d moved the rate",
                 settings.report_root, keeper.rounds, keeper.steered, extra={"event": "fair_share"})


def _work_left(checkpoint: Checkpoint, only: frozenset[str] | None) -> bool:
    return bool(only) if only is not None else checkpoint.counts()[ItemState.PENDING] > 0


async def _check_writable(settings: JobSettings, storage: Storage) -> None:
    """A real write and delete in the output root and the state directory, before paying."""
    await storage.outputs.probe_writable()
    await LocalOutputStore(settings.state_dir).probe_writable()


async def _finish(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint, storage: Storage,
                  run_id: int, outcome: RunOutcome) -> RunResult:
    counts = checkpoint.counts()
    new_failures = checkpoint.new_failures(run_id)
    exit_code = exit_code_for(outcome.fatal is not None, outcome.stopped_by, counts, new_failures,
                              options.strict_exit, outcome.scanned)
    limiter = outcome.limiter
    rate = leave_rate(settings, limiter, outcome.start, outcome.stats.requests, time.time())
    try:
        checkpoint.finish_run(run_id, exit_code, outcome.stats.requests, outcome.stats.throttles,
                              rate_mode=limiter.mode if limiter else None, final_rpm=limiter.rpm if limiter else None,
                              spent_usd=outcome.budget.spent_usd if outcome.budget else 0.0,
                              stop_reason=outcome.stopped_by if exit_code is ExitCode.INTERRUPTED else None,
                              s3_requests=storage.s3.calls if storage.s3 else None,
                              s3_retries=storage.s3.retries if storage.s3 else None, rate=rate)
    except StateUnavailable as exc:  # the state disk is full: the stop line below says why
        log.error("%s", exc)
    report = await _write_report(settings, options, checkpoint, storage, exit_code)
    if storage.s3 is not None:
        log.info("S3: %d request(s), %d retried after a throttle, 5xx or connection error", storage.s3.calls,
                 storage.s3.retries, extra={"event": "s3"})
    if outcome.fatal is None:
        log_summary(storage.sources.names, checkpoint, run_id, outcome.stopped_by, counts, new_failures, report,
                    outcome.scanned)
    return RunResult(exit_code, counts, outcome.stats.requests, outcome.stats.throttles, report, new_failures)


async def _write_report(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint, storage: Storage,
                        exit_code: ExitCode) -> str:
    """The report from the checkpoint, published where report_dir says (a shard's ends with its
    done.json); a report that cannot be written never changes what the run did."""
    try:
        ReportWriter(settings, checkpoint).write(storage.reports.local_dir)
        write_metrics(_metrics_path(options, storage), settings.name, checkpoint, settings.model.price_usd)
        if settings.shard.sharded:
            write_done(storage.reports.local_dir, settings, checkpoint, exit_code)
        return await storage.reports.publish()
    except (OSError, UpscalerError) as exc:
        log.error("the report could not be written: %s", exc)
        return storage.reports.shown


def _only_keys(settings: JobSettings, checkpoint: Checkpoint, storage: Storage,
               wanted: frozenset[str]) -> frozenset[str]:
    """Keys of the items ``--only`` names; named failed items become pending, unknown names are reported."""
    keys, found = set(), set()
    for row in checkpoint.items():
        name = printable(storage.sources.display(row["source"], row["relpath"], row["key"]))
        if name in wanted:
            keys.add(row["key"])
            found.add(name)
    for name in sorted(wanted - found):
        log.warning("--only: %s is not an item of job %s", name, settings.name)
    retried = checkpoint.retry_keys(keys)
    log.info("--only: %d item(s) selected, %d failed one(s) made pending", len(keys), retried)
    # Listed items already done stay done: --only redoes what is pending or failed, nothing paid twice.
    return frozenset(key for key in keys if checkpoint.state_of(key) is ItemState.PENDING)


async def _execute(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint, storage: Storage,
                   session: AioSession, outcome: RunOutcome, clock: Clock, rng: random.Random,
                   only: frozenset[str] | None, signals: StopSignals) -> None:
    stop = asyncio.Event()
    pending = checkpoint.counts()[ItemState.PENDING] if only is None else len(only)
    total = pending if options.limit is None else min(pending, options.limit)
    async with _client_settings(settings) as client_settings, open_client(client_settings, session) as client:
        outcome.start = await _start_rate(settings, checkpoint, client_settings, session)
        limiter = make_limiter(shard_rate(settings), clock, outcome.start.start if outcome.start else None)
        outcome.limiter = limiter
        with Progress(total, options.show_progress, lambda: limiter.rpm) as progress:
            pool = WorkerPool(settings=settings, checkpoint=checkpoint,
                              invoker=BedrockInvoker(client, settings.model_id), outputs=storage.outputs,
                              sources=storage.sources, limiter=limiter, clock=clock, rng=rng, stop=stop,
                              on_done=progress.item_done, limit=options.limit, only=only,
                              name_of=lambda item: storage.sources.display(item.source, item.relpath, item.key),
                              buffered=options.buffered_responses, pictures=_pictures(settings, checkpoint, storage))
            outcome.stats = pool.stats
            outcome.budget = pool.budget
            async with _sharing_fairly(settings, limiter, outcome.start, storage, clock, rng):
                await _supervise(pool, options, checkpoint, storage, outcome, signals, progress, stop, settings)
    if options.limit is not None and pool.stats.started >= options.limit and outcome.stopped_by is None:
        outcome.stopped_by = "max-images"


async def _supervise(pool: WorkerPool, options: RunOptions, checkpoint: Checkpoint, storage: Storage,
                     outcome: RunOutcome, signals: StopSignals, progress: Progress, stop: asyncio.Event,
                     settings: JobSettings) -> None:
    """Run the pool with its stopper (signals, deadline), heartbeat and metrics around it."""
    task = asyncio.create_task(pool.run())
    stopper = _Stopper(stop, task, outcome, options.grace_s)
    pool.request_stop = stopper.stop
    heartbeat = asyncio.create_task(progress.heartbeat(options.heartbeat_s))
    metrics = asyncio.create_task(_metrics_loop(settings, options, checkpoint, storage))
    deadline = (asyncio.get_running_loop().call_later(options.max_duration_s, stopper.stop, "max-duration")
                if options.max_duration_s is not None else None)
    signals.attach(asyncio.get_running_loop(), stopper.stop, stopper.cancel)
    try:
        await _wait_pool(task, outcome)
    finally:
        signals.detach()
        heartbeat.cancel()
        metrics.cancel()
        stopper.close()
        if deadline is not None:
            deadline.cancel()


def _metrics_path(options: RunOptions, storage: Storage) -> Path:
    return options.metrics_path or storage.reports.local_dir / "metrics.prom"


async def _metrics_loop(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint, storage: Storage) -> None:
    """Keep metrics.prom fresh while the run goes on (the final write happens after the report)."""
    while True:
        with contextlib.suppress(OSError):  # a metrics file is never worth a run
            write_metrics(_metrics_path(options, storage), settings.name, checkpoint, settings.model.price_usd)
        await asyncio.sleep(options.metrics_interval_s)


async def _wait_pool(task: asyncio.Task[PoolStats], outcome: RunOutcome) -> None:
    try:
        await task
    except* FatalBackendError as group:
        outcome.fatal = next(e for e in group.exceptions if isinstance(e, FatalBackendError))
    except* StateUnavailable as group:  # nothing can be recorded: stop (exit 75), the next run resumes
        outcome.stopped_by = str(group.exceptions[0])
    except* asyncio.CancelledError:
        if not task.cancelled():
            raise


class _Stopper:
    """Stops the pool: first a drain (a signal, a cap, a full disk, an outage), then, on a second
    signal or after the grace period, a cancel (unfinished items go back to pending)."""

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

    def cancel(self, name: str) -> None:
        """A second signal: stop now."""
        self.stop(name)
        self._cancel(f"{name} again")

    def _cancel(self, why: str) -> None:
        if not self.task.done():
            log.warning("%s: stopping now; unfinished items stay pending", why)
            self.task.cancel()

    def close(self) -> None:
        if self._grace is not None:
            self._grace.cancel()


@asynccontextmanager
async def _client_settings(settings: JobSettings) -> AsyncIterator[ClientSettings]:
    """Where requests go: the configured Bedrock endpoint, or an emulator started in-process."""
    limits = settings.limits
    common = ClientSettings(region=settings.region, endpoint_url=settings.endpoint_url, profile=settings.profile,
                            concurrency=limits.concurrency, read_timeout_s=limits.read_timeout_s,
                            connect_timeout_s=limits.connect_timeout_s,
                            quotas_endpoint_url=settings.quotas_endpoint_url)
    if settings.backend is Backend.BEDROCK:
        aws = settings.aws
        log.info("backend: bedrock in %s (%s), endpoint %s", settings.region,
                 "the built-in default" if aws.region == "default" else f"from {aws.region}",
                 f"{aws.endpoint_url} (from {aws.endpoint})" if aws.endpoint_url else "the AWS default for the region")
        yield common
        return
    emulator = EmulatorConfig(output_max_pixels=settings.emulator.output_max_pixels,
                              latency_s=settings.emulator.latency_s, quota_rpm=settings.emulator.quota_rpm)
    async with serve(emulator) as running:
        log.info("backend: embedded emulator at %s", running.endpoint_url)
        yield dataclasses.replace(common, endpoint_url=running.endpoint_url, profile=None,
                                  static_credentials=("EMULATOR", "emulator"), quotas_endpoint_url=running.endpoint_url)
