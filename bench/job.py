"""Runs batch_upscaler's job runner in this process on a manifest written for a benchmark.

The runner is the real thing (``load_settings`` + ``run_job``) with ``backend: bedrock`` pointed
at an emulator's ``endpoint_url`` and dummy AWS keys, so signing, HTTP and parsing all run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from batch_upscaler import runner
from batch_upscaler.checkpoint import ItemState
from batch_upscaler.clock import Clock
from batch_upscaler.manifest import load_settings
from batch_upscaler.ratelimit import RateLimiter, StartRate, make_limiter
from batch_upscaler.runner import run_job
from batch_upscaler.settings import RunOptions

PROMPT = "High-quality upscaled version with enhanced details"  # the seed document's prompt
_SCAN_MESSAGE = "scan:"


@dataclass(frozen=True)
class JobSpec:
    """One benchmark job: where its inputs are, where it keeps its state, and its limits."""

    name: str
    sources: Path
    work_dir: Path  # outputs and checkpoint go below it
    endpoint_url: str
    model: str = "conservative"
    concurrency: int = 16
    requests_per_minute: float | str = 600
    output_format: str = "png"
    limits: tuple[tuple[str, Any], ...] = ()  # more limits.* keys (e.g. quota_lookup)
    state_dir: Path | None = None  # default: <work_dir>/state
    buffered: bool = False  # hold each answer whole, as before streaming (RunOptions.buffered_responses)


@dataclass(frozen=True)
class JobRun:
    """How a run went, from the runner's own result; times are time.time() values."""

    started_at: float
    scanned_at: float | None  # when the runner logged its scan summary: it knows what is left to do
    finished_at: float
    exit_code: int
    succeeded: int
    failed: int
    pending: int
    requests: int
    throttles: int

    @property
    def elapsed_s(self) -> float:
        return self.finished_at - self.started_at


def use_dummy_credentials() -> None:
    """Dummy keys for the emulator (it checks only the signature's shape); no profile is consulted."""
    os.environ["AWS_ACCESS_KEY_ID"] = "AKIDBENCHMARK"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "benchmark-secret"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        os.environ.pop(name, None)


def manifest_doc(spec: JobSpec) -> dict[str, Any]:
    model: dict[str, Any] = {"name": spec.model}
    if spec.model != "fast":
        model |= {"prompt": PROMPT, "creativity": 0.30}
    return {
        "version": 1, "name": spec.name, "sources": [str(spec.sources.resolve())],
        "output": {"dir": str(spec.work_dir.resolve() / "out"), "format": spec.output_format},
        "model": model, "backend": "bedrock",
        # The emulator answers Service Quotas too: ``auto`` may read the quota it enforces.
        "bedrock": {"region": "us-east-1", "endpoint_url": spec.endpoint_url, "quotas_endpoint_url": spec.endpoint_url},
        "limits": {"concurrency": spec.concurrency, "requests_per_minute": spec.requests_per_minute,
                   **dict(spec.limits)},
        "state_dir": str((spec.state_dir or spec.work_dir / "state").resolve()),
    }


def write_manifest(spec: JobSpec) -> Path:
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    path = spec.work_dir / f"{spec.name}.yaml"
    path.write_text(yaml.safe_dump(manifest_doc(spec), sort_keys=False), encoding="utf-8")
    return path


def run(spec: JobSpec, max_duration_s: float | None = None) -> JobRun:
    """Run the job to the end (or until ``max_duration_s``, then drain) and return its figures."""
    return run_manifest(write_manifest(spec), max_duration_s, spec.buffered)


def run_manifest(manifest: Path, max_duration_s: float | None = None, buffered: bool = False) -> JobRun:
    """``run`` for a manifest already written (``started_at`` is taken after loading it)."""
    use_dummy_credentials()
    settings = load_settings(manifest)
    watcher = _ScanWatcher()
    runner_log = logging.getLogger("batch_upscaler.runner")
    runner_log.addHandler(watcher)
    old_level = runner_log.level
    runner_log.setLevel(logging.INFO)
    started = time.time()
    try:
        result = run_job(settings, RunOptions(show_progress=False, max_duration_s=max_duration_s, grace_s=30.0,
                                              buffered_responses=buffered))
    finally:
        runner_log.removeHandler(watcher)
        runner_log.setLevel(old_level)
    counts = result.counts
    return JobRun(started_at=started, scanned_at=watcher.scanned_at, finished_at=time.time(),
                  exit_code=int(result.exit_code), succeeded=counts[ItemState.SUCCEEDED],
                  failed=counts[ItemState.FAILED], pending=counts[ItemState.PENDING],
                  requests=result.requests, throttles=result.throttles)


@contextlib.contextmanager
def limiters() -> Iterator[list[tuple[RateLimiter, StartRate | None]]]:
    """Runs inside list the rate limiter they built and the start rate the runner chose for it."""
    made: list[tuple[RateLimiter, StartRate | None]] = []

    def make(requests_per_minute: float | None, clock: Clock, start: StartRate | None = None) -> RateLimiter:
        limiter = make_limiter(requests_per_minute, clock, start)
        made.append((limiter, start))
        return limiter

    with mock.patch.object(runner, "make_limiter", make):
        yield made


class _ScanWatcher(logging.Handler):
    """Notes when the runner logs its scan summary; prints nothing (INFO stays off the console)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.scanned_at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.scanned_at is None and str(record.msg).startswith(_SCAN_MESSAGE):
            self.scanned_at = record.created
