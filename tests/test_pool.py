"""The worker pool with a fake transport and a fake clock: caps, retries, fatal stops, draining."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from batch_upscaler.checkpoint import Checkpoint, ItemState
from batch_upscaler.discovery import Discovery, parse_source
from batch_upscaler.errors import FatalBackendError
from batch_upscaler.manifest import load_settings
from batch_upscaler.outputs import LocalOutputStore
from batch_upscaler.pool import WorkerPool
from batch_upscaler.ratelimit import make_limiter
from batch_upscaler.retry import AttemptError
from batch_upscaler.scan import Scanner
from batch_upscaler.settings import JobSettings
from tests.conftest import FakeClock, image_bytes, write_image

Script = Callable[[int], bytes | AttemptError]  # call number -> result


class FakeInvoker:
    """Answers from a script, yields to the loop like real I/O, and measures concurrency."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def invoke(self, body: bytes) -> bytes | AttemptError:
        self.calls += 1
        n = self.calls
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        for _ in range(3):
            await asyncio.sleep(0)
        self.in_flight -= 1
        return self.script(n)


OK = image_bytes(40, 30)


def setup(tmp_path: Path, write_manifest: Callable[..., Path], n: int,
          **limits: float) -> tuple[JobSettings, Checkpoint]:
    for i in range(n):
        write_image(tmp_path / "photos" / f"{i:03d}.png", 80, 80, color=(i, 1, 2))
    settings = load_settings(write_manifest(limits={"concurrency": 3, "requests_per_minute": 60, **limits}))
    checkpoint = Checkpoint.open(settings.checkpoint_path, settings.name)
    roots = [parse_source(s, settings.base_dir) for s in settings.sources]
    Scanner(settings, checkpoint, LocalOutputStore(settings.output_dir)).run(Discovery(roots))
    return settings, checkpoint


def run_pool(settings: JobSettings, checkpoint: Checkpoint, invoker: FakeInvoker, clock: FakeClock,
             stop: Callable[[asyncio.Event], None] | None = None, limit: int | None = None) -> WorkerPool:
    async def go() -> WorkerPool:
        event = asyncio.Event()
        roots = {s: parse_source(s, settings.base_dir) for s in settings.sources}
        limiter = make_limiter(settings.limits.requests_per_minute, clock)
        done: list[ItemState] = []

        def on_done(state: ItemState) -> None:
            done.append(state)
            if stop:
                stop(event)

        pool = WorkerPool(settings=settings, checkpoint=checkpoint, invoker=invoker,
                          outputs=LocalOutputStore(settings.output_dir), sources=roots, limiter=limiter,
                          clock=clock, rng=random.Random(0), stop=event, on_done=on_done, limit=limit)
        await pool.run()
        return pool
    return asyncio.run(go())


def test_all_succeed_under_the_cap_and_paced_by_the_fake_clock(
        tmp_path: Path, write_manifest: Callable[..., Path], clock: FakeClock) -> None:
    settings, checkpoint = setup(tmp_path, write_manifest, 10)
    invoker = FakeInvoker(lambda n: OK)
    start = clock.now()
    run_pool(settings, checkpoint, invoker, clock)
    assert checkpoint.counts()[ItemState.SUCCEEDED] == 10
    assert invoker.max_in_flight <= 3
    assert clock.now() - start == pytest.approx(9.0)  # 10 starts at 60 rpm: 9 intervals, no real waiting


def test_throttles_slow_the_limiter_and_are_retried(
        tmp_path: Path, write_manifest: Callable[..., Path], clock: FakeClock) -> None:
    settings, checkpoint = setup(tmp_path, write_manifest, 4)
    throttle = AttemptError("ThrottlingException", "Too many requests", 429)
    invoker = FakeInvoker(lambda n: throttle if n in (1, 2) else OK)
    pool = run_pool(settings, checkpoint, invoker, clock)
    assert checkpoint.counts()[ItemState.SUCCEEDED] == 4
    assert pool.stats.throttles == 2 and pool.stats.requests == 6
    assert pool.limiter.throttles == 2 and pool.limiter.rpm < 60  # cut twice, partly recovered
    rows = {r["relpath"]: r for r in checkpoint.items()}
    assert sum(r["throttles"] for r in rows.values()) == 2
    assert sum(r["attempts"] for r in rows.values()) == 6


def test_retries_give_up_after_max_attempts(tmp_path: Path, write_manifest: Callable[..., Path],
                                            clock: FakeClock) -> None:
    settings, checkpoint = setup(tmp_path, write_manifest, 1, max_attempts=3)
    invoker = FakeInvoker(lambda n: AttemptError("InternalServerException", "boom", 500))
    run_pool(settings, checkpoint, invoker, clock)
    row = next(checkpoint.items())
    assert (row["state"], row["attempts"], row["error_code"]) == ("failed", 3, "InternalServerException")
    assert invoker.calls == 3


def test_fatal_error_stops_everything_and_leaves_items_pending(
        tmp_path: Path, write_manifest: Callable[..., Path], clock: FakeClock) -> None:
    settings, checkpoint = setup(tmp_path, write_manifest, 8)
    invoker = FakeInvoker(lambda n: AttemptError("AccessDeniedException", "no access", 403))
    with pytest.raises(ExceptionGroup) as info:
        run_pool(settings, checkpoint, invoker, clock)
    assert info.group_contains(FatalBackendError)
    assert invoker.calls <= 3
    assert checkpoint.counts()[ItemState.PENDING] == 8


def test_stop_drains_in_flight_and_starts_nothing_new(
        tmp_path: Path, write_manifest: Callable[..., Path], clock: FakeClock) -> None:
    settings, checkpoint = setup(tmp_path, write_manifest, 20)
    invoker = FakeInvoker(lambda n: OK)
    run_pool(settings, checkpoint, invoker, clock, stop=lambda event: event.set())
    counts = checkpoint.counts()
    assert counts[ItemState.IN_PROGRESS] == 0
    assert 1 <= counts[ItemState.SUCCEEDED] <= 3  # only what was in flight when the first finished
    assert counts[ItemState.SUCCEEDED] == invoker.calls
    assert counts[ItemState.PENDING] == 20 - invoker.calls


def test_limit_bounds_items_started(tmp_path: Path, write_manifest: Callable[..., Path], clock: FakeClock) -> None:
    settings, checkpoint = setup(tmp_path, write_manifest, 6)
    run_pool(settings, checkpoint, FakeInvoker(lambda n: OK), clock, limit=4)
    assert checkpoint.counts()[ItemState.SUCCEEDED] == 4


def test_source_changed_after_scan_fails_with_reason(
        tmp_path: Path, write_manifest: Callable[..., Path], clock: FakeClock) -> None:
    settings, checkpoint = setup(tmp_path, write_manifest, 1)
    write_image(tmp_path / "photos" / "000.png", 200, 100)
    invoker = FakeInvoker(lambda n: OK)
    run_pool(settings, checkpoint, invoker, clock)
    row = next(checkpoint.items())
    assert (row["state"], row["error_code"], invoker.calls) == ("failed", "source_changed", 0)


def test_auto_rate_never_exceeds_the_concurrency_cap(tmp_path: Path, write_manifest: Callable[..., Path],
                                                     clock: FakeClock) -> None:
    settings, checkpoint = setup(tmp_path, write_manifest, 40, requests_per_minute="auto")  # type: ignore[arg-type]
    assert settings.limits.requests_per_minute is None
    throttle = AttemptError("ThrottlingException", "slow down", 429)
    invoker = FakeInvoker(lambda n: throttle if n % 7 == 0 else OK)
    pool = run_pool(settings, checkpoint, invoker, clock)
    assert checkpoint.counts()[ItemState.SUCCEEDED] == 40
    assert invoker.max_in_flight <= settings.limits.concurrency
    assert pool.limiter.mode == "auto" and pool.limiter.throttles == pool.stats.throttles > 0
