"""Runs one job end to end and decides its exit code: lock → checkpoint → scan → worker pool → report.

The only ``asyncio.run`` of a job is here. Signals (batch_upscaler.signals, installed by the
command line before anything else): the first SIGINT/SIGTERM stops new work wherever the run is
(between files of the scan, before the pool, or in the pool, where requests in flight finish and
are recorded); the second cancels the pool at once (unfinished items go back to pending). Either
way the report is written and the exit code is 75 while work remains, so the next run resumes.

Before the first request, what can be known is checked: the output root belongs to this job and
can be written, the state directory can be written, and images an earlier run paid for but could
not store are written first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
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
from batch_upscaler.errors import ExitCode, FatalBackendError, Interrupted, StateUnavailable, UpscalerError, UsageError
from batch_upscaler.joblock import JobLock
from batch_upscaler.metrics import write_metrics
from batch_upscaler.outputs import LocalOutputStore
from batch_upscaler.pool import PoolStats, WorkerPool
from batch_upscaler.progress import Progress
from batch_upscaler.ratelimit import RateLimiter, make_limiter
from batch_upscaler.report import ReportWriter
from batch_upscaler.retry import SERVICE_STATE_CODES
from batch_upscaler.scan import Scanner, ScanSummary
from batch_upscaler.settings import Backend, JobSettings, RunOptions
from batch_upscaler.signals import StopSignals
from batch_upscaler.unsent import UnsentOutputs, deliver

log = logging.getLogger(__name__)
_NAMED_FAILURES = 20  # the stderr summary names this many of the run's failed files


@dataclass
class RunOutcome:
    stats: PoolStats = field(default_factory=PoolStats)
    stopped_by: str | None = None  # "SIGINT", "max-duration", "service unreachable since 02:13", ...: stopped early
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
    new_failures: int = 0


def resolve_sources(settings: JobSettings) -> dict[str, SourceRoot]:
    """Each source's walk root; a missing one, or one that is the output or state directory (every
    file in it would be overwritten by its own upscale, or pruned), is a usage error naming its key."""
    roots = {}
    pruned = {_real(settings.output_dir): "output.dir", _real(settings.state_dir): "state_dir"}
    for i, spec in enumerate(settings.sources):
        root = parse_source(spec, settings.base_dir)
        if not root.root.exists():
            raise UsageError(f"{settings.manifest_path}: sources[{i}]: {root.root} does not exist")
        clash = pruned.get(_real(root.root)) if not root.single_file else None
        if clash is not None:
            raise UsageError(f"{settings.manifest_path}: sources[{i}]: {root.root} is the job's {clash}; its files "
                             f"would be overwritten by their own upscales, so it is never scanned (0 files). "
                             "Choose an output.dir outside the sources")
        roots[spec] = root
    return roots


def _real(path: Path) -> Path:
    return path.resolve()


def prepare_items(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint, outputs: LocalOutputStore,
                  signals: StopSignals, *, quiet: bool = False) -> tuple[dict[str, SourceRoot], ScanSummary]:
    """The first half of a run, shared with ``plan``: scan, and the failures to retry."""
    roots = resolve_sources(settings)
    discovery = Discovery(roots.values(), settings.exclude, prune=(settings.output_dir, settings.state_dir),
                          on_error=None if quiet else lambda path, msg: log.warning("cannot read %s: %s", path, msg),
                          base_dir=settings.base_dir)
    scanner = Scanner(settings, checkpoint, outputs, discovery=discovery, roots=roots, quiet=quiet,
                      verify_outputs=options.verify_outputs, stopped=lambda: signals.requested)
    summary = scanner.run(discovery)
    # Failures that were the service's state (an outage), not facts about the image, are retried
    # by any run; the rest only with --retry-failed.
    retried = checkpoint.retry_failed(None if options.retry_failed else SERVICE_STATE_CODES)
    if retried and not quiet:
        log.info("%d failed item(s) will be retried%s", retried,
                 "" if options.retry_failed else " (they failed because the service was down)")
    return roots, summary


def run_job(settings: JobSettings, options: RunOptions, clock: Clock | None = None,
            rng: random.Random | None = None, signals: StopSignals | None = None) -> RunResult:
    signals = signals or StopSignals()
    with JobLock(settings.lock_path, settings.name):
        checkpoint = Checkpoint.open(settings.checkpoint_path, settings.name)
        try:
            return _run_locked(settings, options, checkpoint, clock or SystemClock(), rng or random.Random(), signals)
        finally:
            checkpoint.close()


def _run_locked(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint, clock: Clock,
                rng: random.Random, signals: StopSignals) -> RunResult:
    run_id = checkpoint.begin_run()
    outputs = LocalOutputStore(settings.output_dir)
    outcome = RunOutcome()
    try:
        _before_the_pool(settings, options, checkpoint, outputs, signals)
        only = _only_keys(settings, checkpoint, options.only) if options.only is not None else None
        if signals.requested:
            outcome.stopped_by = signals.first
        elif _work_left(checkpoint, only):
            _check_writable(settings, outputs)
            asyncio.run(_execute(settings, options, checkpoint, outputs, outcome, clock, rng, only, signals))
    except Interrupted as exc:  # stopped in the scan, a full disk, a checkpoint that cannot be written
        outcome.stopped_by = signals.first if signals.requested else str(exc)
    except UpscalerError:  # a set-up problem found on the way (exit 2): record the run, then report it
        with contextlib.suppress(StateUnavailable):
            checkpoint.finish_run(run_id, ExitCode.USAGE, outcome.stats.requests, outcome.stats.throttles)
        raise
    finally:
        outputs.close_staging()  # nothing temporary outlives the run (a crash's leftovers go next time)
    result = _finish(settings, options, checkpoint, run_id, outcome)
    if outcome.fatal is not None:
        raise outcome.fatal
    return result


def _before_the_pool(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint, outputs: LocalOutputStore,
                     signals: StopSignals) -> None:
    recovered = checkpoint.recover()
    if recovered:
        log.info("%d item(s) left in progress by an earlier run are pending again", recovered)
    if signals.requested:
        return
    _, summary = prepare_items(settings, options, checkpoint, outputs, signals)
    log.info("scan: %d file(s): %d new, %d changed, %d unchanged%s", summary.discovered, summary.new,
             summary.changed, summary.unchanged,
             "".join(f"; {n} {code}" for code, n in sorted(summary.refused.items()) if n),
             extra={"event": "scan"})
    # Only a job that passed its checks claims the output root (a refused one leaves no marker).
    outputs.claim(settings.name, settings.output_shared)
    removed = outputs.clean_stale_staging()
    if removed:
        log.info("removed %d half-written output(s) left by a run that died", removed)
    kept = UnsentOutputs(settings.state_dir)
    if any(True for _ in kept.notes()):  # paid for by an earlier run: written before anything is sent
        _check_writable(settings, outputs)
        deliver(kept, checkpoint, outputs)


def _work_left(checkpoint: Checkpoint, only: frozenset[str] | None) -> bool:
    return bool(only) if only is not None else checkpoint.counts()[ItemState.PENDING] > 0


def _check_writable(settings: JobSettings, outputs: LocalOutputStore) -> None:
    """A real create + fsync + delete in the output root and the state directory, before paying."""
    outputs.probe_writable()
    LocalOutputStore(settings.state_dir).probe_writable()


def _finish(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint, run_id: int,
            outcome: RunOutcome) -> RunResult:
    counts = checkpoint.counts()
    new_failures = checkpoint.new_failures(run_id)
    exit_code = exit_code_for(outcome, counts, new_failures, options.strict_exit)
    limiter = outcome.limiter
    try:
        checkpoint.finish_run(run_id, exit_code, outcome.stats.requests, outcome.stats.throttles,
                              rate_mode=limiter.mode if limiter else None, final_rpm=limiter.rpm if limiter else None,
                              spent_usd=outcome.budget.spent_usd if outcome.budget else 0.0,
                              stop_reason=outcome.stopped_by if _pending(counts) else None)
    except StateUnavailable as exc:  # the state disk is full: the stop line below says why
        log.error("%s", exc)
    report_dir = settings.report_dir
    try:
        report_dir = ReportWriter(settings, checkpoint).write()
        write_metrics(_metrics_path(settings, options), settings.name, checkpoint, settings.model.price_usd)
    except OSError as exc:  # a report that cannot be written never changes what the run did
        log.error("the report could not be written: %s", exc)
    if outcome.fatal is None:
        _log_summary(settings, checkpoint, run_id, outcome, counts, new_failures, report_dir)
    return RunResult(exit_code, counts, outcome.stats.requests, outcome.stats.throttles, report_dir, new_failures)


def _pending(counts: Mapping[ItemState, int]) -> int:
    return counts[ItemState.PENDING] + counts[ItemState.IN_PROGRESS]


def _log_summary(settings: JobSettings, checkpoint: Checkpoint, run_id: int, outcome: RunOutcome,
                 counts: Mapping[ItemState, int], new_failures: int, report_dir: Path) -> None:
    """The run's last lines: the files that failed in this run (bounded), then one line worded by
    how the run ended."""
    roots = {spec: parse_source(spec, settings.base_dir) for spec in settings.sources}
    failed = checkpoint.failed_in_run(run_id, _NAMED_FAILURES)
    for source, relpath, message in failed:
        log.warning("failed this run: %s: %s", printable(display_path(roots, source, relpath, settings.base_dir)),
                    message, extra={"event": "run_failure"})
    if new_failures > len(failed):
        log.warning("… and %d more, see %s", new_failures - len(failed), report_dir / "failed.txt")
    old = counts[ItemState.FAILED] - new_failures
    if old > 0:
        log.info("%d item(s) failed in earlier runs and are unchanged (listed in %s; --retry-failed retries them)",
                 old, report_dir / "failed.txt", extra={"event": "old_failures"})
    tallies = (f"{counts[ItemState.SUCCEEDED]} succeeded, {counts[ItemState.FAILED]} failed "
               f"({new_failures} this run), {counts[ItemState.SKIPPED]} skipped, {_pending(counts)} pending")
    log.info("%s: %s; report in %s", stop_line(outcome.stopped_by, _pending(counts)), tallies, report_dir,
             extra={"event": "run_finished"})


def stop_line(stopped_by: str | None, pending: int) -> str:
    """How the run ended, in words people and cron logs can act on."""
    if stopped_by is None or pending == 0:
        return "done"
    worded = {
        "max-duration": "stopped: --max-duration reached; run again to resume",
        "max-images": "stopped: --max-images reached; run again to continue",
        "max-cost": "stopped: the next request would pass the cost cap (--max-cost); run again to continue",
        "SIGINT": "stopped by SIGINT (Ctrl-C); run again to resume",
        "SIGTERM": "stopped by SIGTERM; run again to resume",
    }
    return worded.get(stopped_by, f"stopped: {stopped_by}; run again to resume")


def _only_keys(settings: JobSettings, checkpoint: Checkpoint, wanted: frozenset[str]) -> frozenset[str]:
    """Keys of the items ``--only`` names; named failed items become pending, unknown names are reported."""
    roots = {spec: parse_source(spec, settings.base_dir) for spec in settings.sources}
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


def exit_code_for(outcome: RunOutcome, counts: Mapping[ItemState, int], new_failures: int,
                  strict: bool = False) -> ExitCode:
    """0 done; 1 this run produced failures (any failed item with ``strict``); 3 fatal; 75 stopped early."""
    if outcome.fatal is not None:
        return ExitCode.FATAL_BACKEND
    if outcome.stopped_by and _pending(counts) > 0:
        return ExitCode.INTERRUPTED
    failures = counts[ItemState.FAILED] if strict else new_failures
    return ExitCode.ITEMS_FAILED if failures else ExitCode.OK


async def _execute(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint, outputs: LocalOutputStore,
                   outcome: RunOutcome, clock: Clock, rng: random.Random, only: frozenset[str] | None,
                   signals: StopSignals) -> None:
    stop = asyncio.Event()
    limiter = make_limiter(settings.limits.requests_per_minute, clock)
    outcome.limiter = limiter
    roots = {spec: parse_source(spec, settings.base_dir) for spec in settings.sources}
    pending = checkpoint.counts()[ItemState.PENDING] if only is None else len(only)
    total = pending if options.limit is None else min(pending, options.limit)
    async with _client_settings(settings) as client_settings, open_client(client_settings) as client:
        with Progress(total, options.show_progress, lambda: limiter.rpm) as progress:
            pool = WorkerPool(settings=settings, checkpoint=checkpoint,
                              invoker=BedrockInvoker(client, settings.model_id), outputs=outputs,
                              sources=roots, limiter=limiter, clock=clock, rng=rng, stop=stop,
                              on_done=progress.item_done, limit=options.limit, only=only,
                              name_of=lambda item: display_path(roots, item.source, item.relpath, settings.base_dir),
                              buffered=options.buffered_responses)
            outcome.stats = pool.stats
            outcome.budget = pool.budget
            task = asyncio.create_task(pool.run())
            stopper = _Stopper(stop, task, outcome, options.grace_s)
            pool.request_stop = stopper.stop
            heartbeat = asyncio.create_task(progress.heartbeat(options.heartbeat_s))
            metrics = asyncio.create_task(_metrics_loop(settings, options, checkpoint))
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
    if options.limit is not None and pool.stats.started >= options.limit and outcome.stopped_by is None:
        outcome.stopped_by = "max-images"


def _metrics_path(settings: JobSettings, options: RunOptions) -> Path:
    return options.metrics_path or settings.report_dir / "metrics.prom"


async def _metrics_loop(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint) -> None:
    """Keep metrics.prom fresh while the run goes on (the final write happens after the report)."""
    while True:
        with contextlib.suppress(OSError):  # a metrics file is never worth a run
            write_metrics(_metrics_path(settings, options), settings.name, checkpoint, settings.model.price_usd)
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
