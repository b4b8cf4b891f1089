"""The worker pool with a fake transport and a fake clock: caps, retries, fatal stops, draining."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batch_upscaler.checkpoint import Checkpoint, ItemState
from batch_upscaler.errors import FatalBackendError
from batch_upscaler.manifest import load_settings
from batch_upscaler.pool import WorkerPool
from batch_upscaler.ratelimit import make_limiter
from batch_upscaler.retry import AttemptError, is_service_state
from batch_upscaler.scan import Scanner
from batch_upscaler.settings import JobSettings
from batch_upscaler.storage.edge import Sources, open_storage
from batch_upscaler.storage.local import LocalOutputStore
from tests.conftest import FakeClock, image_bytes, local_dir, write_image

Script = Callable[[int], bytes | AttemptError]  # call number -> result


class FakeInvoker:
    """Answers from a script, yields to the loop like real I/O, and measures concurrency."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.by_body: Callable[[bytes], bytes | AttemptError] | None = None  # answer by image instead
        self.probes = 0

    async def invoke(self, body: bytes) -> bytes | AttemptError:
        self.calls += 1
        n = self.calls
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        for _ in range(3):
            await asyncio.sleep(0)
        self.in_flight -= 1
        return self.by_body(body) if self.by_body is not None else self.script(n)

    async def probe(self) -> AttemptError | None:
        """The free probe: answered like any call; a service that would answer answers it as invalid."""
        self.probes += 1
        self.calls += 1
        answer = self.script(self.calls)
        if isinstance(answer, bytes) or not is_service_state(answer):
            return AttemptError("ValidationException", "Malformed input request", 400)
        return answer


async def inline(func: Callable[..., Any], *args: Any) -> Any:
    """File work runs inline: on the fake clock, a thread's work would take no virtual time at all."""
    return func(*args)


OK = image_bytes(160, 160)  # a valid upscale of the 80x80 sources (the pool checks what comes back)


def setup(tmp_path: Path, write_manifest: Callable[..., Path], n: int,
          **limits: float | str) -> tuple[JobSettings, Checkpoint]:
    for i in range(n):
        write_image(tmp_path / "photos" / f"{i:03d}.png", 80, 80, color=(i, 1, 2))
    settings = load_settings(write_manifest(limits={"concurrency": 3, "requests_per_minute": 60, **limits}))
    checkpoint = Checkpoint.open(settings.checkpoint_path, settings.name)
    asyncio.run(_scan(settings, checkpoint))
    return settings, checkpoint


async def _scan(settings: JobSettings, checkpoint: Checkpoint) -> None:
    async with open_storage(settings) as storage:
        await Scanner(settings, checkpoint, storage).run()


def run_pool(settings: JobSettings, checkpoint: Checkpoint, invoker: FakeInvoker, clock: FakeClock,
             stop: Callable[[asyncio.Event], None] | None = None, limit: int | None = None,
             request_stop: Callable[[str], None] | None = None) -> WorkerPool:
    async def go() -> WorkerPool:
        event = asyncio.Event()
        limiter = make_limiter(settings.limits.requests_per_minute, clock)
        done: list[ItemState] = []

        def on_done(state: ItemState) -> None:
            done.append(state)
            if stop:
                stop(event)

        pool = WorkerPool(settings=settings, checkpoint=checkpoint, invoker=invoker,
                          outputs=LocalOutputStore(local_dir(settings.output_dir)), sources=Sources(settings, None),
                          limiter=limiter,
                          clock=clock, rng=random.Random(0), stop=event, on_done=on_done, limit=limit,
                          offload=inline)
        if request_stop is not None:
            def stopping(reason: str) -> None:
                request_stop(reason)
                event.set()
            pool.request_stop = stopping
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
    settings, checkpoint = setup(tmp_path, write_manifest, 2, max_attempts=3)
    invoker = FakeInvoker(lambda n: AttemptError("ModelNotReadyException", "warming up", 429))
    run_pool(settings, checkpoint, invoker, clock)
    rows = list(checkpoint.items())
    assert [(r["state"], r["attempts"], r["error_code"]) for r in rows] == [("failed", 3, "ModelNotReadyException")] * 2
    assert invoker.calls == 6


def test_possibly_billed_failures_are_re_sent_once(tmp_path: Path, write_manifest: Callable[..., Path],
                                                   clock: FakeClock) -> None:
    settings, checkpoint = setup(tmp_path, write_manifest, 1, max_attempts=3)
    invoker = FakeInvoker(lambda n: AttemptError("ModelErrorException", "boom", 424))
    run_pool(settings, checkpoint, invoker, clock)
    row = next(checkpoint.items())
    assert (row["state"], row["attempts"], row["error_code"]) == ("failed", 2, "ModelErrorException")
    assert invoker.calls == 2  # possibly billed: one re-send only


def test_an_image_failing_alone_with_5xx_fails_after_max_attempts(
        tmp_path: Path, write_manifest: Callable[..., Path], clock: FakeClock) -> None:
    """5xx for one image while others are answered: the image, not the service, is the problem."""
    settings, checkpoint = setup(tmp_path, write_manifest, 6, max_attempts=3, requests_per_minute=6000)
    bad = image_bytes(80, 80, "PNG", (0, 1, 2))  # photos/000.png
    invoker = FakeInvoker(lambda n: OK)
    invoker.by_body = lambda body: AttemptError("InternalServerException", "boom", 500) if _holds(body, bad) else OK
    run_pool(settings, checkpoint, invoker, clock)
    rows = {r["relpath"]: r for r in checkpoint.items()}
    assert (rows["000.png"]["state"], rows["000.png"]["attempts"]) == ("failed", 3)
    assert rows["000.png"]["error_code"] == "InternalServerException"
    assert all(r["state"] == "succeeded" for name, r in rows.items() if name != "000.png")


def test_an_outage_fails_no_image_and_stops_the_pool_with_items_pending(
        tmp_path: Path, write_manifest: Callable[..., Path], clock: FakeClock) -> None:
    """Every request fails where nothing ran: the breaker pauses, probes at growing intervals, then stops."""
    settings, checkpoint = setup(tmp_path, write_manifest, 5, max_attempts=3, outage_errors=4, outage_wait="10m",
                                 backoff_base_s=1, backoff_max_s=60)
    invoker = FakeInvoker(lambda n: AttemptError("connection_error", "refused"))
    reasons: list[str] = []
    pool = run_pool(settings, checkpoint, invoker, clock, request_stop=reasons.append)
    assert checkpoint.counts()[ItemState.PENDING] == 5 and checkpoint.counts()[ItemState.FAILED] == 0
    assert len(reasons) == 1 and reasons[0].startswith("service unreachable since ")
    probes = invoker.calls - 4
    assert 8 <= probes <= 20  # one request at a time, every 1, 2, 4 … 60 s, for 10 virtual minutes
    assert clock.now() - 1000.0 == pytest.approx(600, abs=70)
    assert pool.breaker.outages == 1


def test_the_pool_resumes_when_the_service_comes_back(
        tmp_path: Path, write_manifest: Callable[..., Path], clock: FakeClock) -> None:
    settings, checkpoint = setup(tmp_path, write_manifest, 5, max_attempts=3, outage_errors=4)
    invoker = FakeInvoker(lambda n: AttemptError("ServiceUnavailableException", "down", 503) if n <= 12 else OK)
    pool = run_pool(settings, checkpoint, invoker, clock)
    assert checkpoint.counts()[ItemState.SUCCEEDED] == 5
    assert pool.breaker.outages == 1 and not pool.breaker.is_open


def _holds(body: bytes, image: bytes) -> bool:
    import base64
    return base64.b64encode(image) in body


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
    settings, checkpoint = setup(tmp_path, write_manifest, 40, requests_per_minute="auto",  # type: ignore[arg-type]
                                 max_attempts=10)
    assert settings.limits.requests_per_minute is None
    throttle = AttemptError("ThrottlingException", "slow down", 429)
    invoker = FakeInvoker(lambda n: throttle if n % 7 == 0 else OK)
    pool = run_pool(settings, checkpoint, invoker, clock)
    assert checkpoint.counts()[ItemState.SUCCEEDED] == 40
    assert invoker.max_in_flight <= settings.limits.concurrency
    assert pool.limiter.mode == "auto" and pool.limiter.throttles == pool.stats.throttles > 0


@pytest.mark.parametrize(("answer", "reason"), [
    (image_bytes(160, 120), "aspect ratio not kept"),
    (image_bytes(160, 160, "JPEG"), "returned a JPEG image, PNG was asked for"),
    (image_bytes(160, 160)[:-30], "returned image is damaged"),
])
def test_a_returned_image_that_is_not_the_upscale_asked_for_is_a_bad_response(
        tmp_path: Path, write_manifest: Callable[..., Path], clock: FakeClock, answer: bytes, reason: str) -> None:
    """Checked before it is stored: re-sent once (it may have been billed), then failed, never stored."""
    settings, checkpoint = setup(tmp_path, write_manifest, 2)
    always_bad = image_bytes(80, 80, "PNG", (0, 1, 2))  # photos/000.png; 001.png is bad once only
    seen: Counter[bool] = Counter()

    def by_body(body: bytes) -> bytes | AttemptError:
        bad = _holds(body, always_bad)
        seen[bad] += 1
        return answer if bad or seen[bad] == 1 else OK

    invoker = FakeInvoker(lambda n: OK)
    invoker.by_body = by_body
    run_pool(settings, checkpoint, invoker, clock)
    rows = {r["relpath"]: r for r in checkpoint.items()}
    assert (rows["001.png"]["state"], rows["001.png"]["attempts"], rows["001.png"]["possibly_billed"]) == \
        ("succeeded", 2, 1)
    bad = rows["000.png"]
    assert (bad["state"], bad["error_code"], bad["attempts"]) == ("failed", "bad_response", 2)
    assert reason in bad["error_message"] and not (local_dir(settings.output_dir) / "000.png").exists()
