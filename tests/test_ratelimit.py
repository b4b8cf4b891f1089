"""The request-rate limiter with a fake clock: exact spacing, cut on throttle, recovery, ceiling."""

from __future__ import annotations

import asyncio

from batch_upscaler.ratelimit import RateLimiter
from tests.conftest import FakeClock


def test_starts_are_spaced_one_interval_apart(clock: FakeClock) -> None:
    limiter = RateLimiter(60, clock)  # one per second
    assert [limiter.reserve() for _ in range(4)] == [0.0, 1.0, 2.0, 3.0]
    clock.advance(10)
    assert limiter.reserve() == 0.0  # idle time does not bank a burst beyond the next slot


def test_acquire_sleeps_on_the_clock(clock: FakeClock) -> None:
    limiter = RateLimiter(120, clock)

    async def three() -> None:
        for _ in range(3):
            await limiter.acquire()

    asyncio.run(three())
    assert clock.sleeps == [0.5, 0.5]
    assert clock.t == 1001.0


def test_throttle_halves_the_rate_and_pauses(clock: FakeClock) -> None:
    limiter = RateLimiter(60, clock)
    limiter.reserve()
    limiter.on_throttle()
    assert limiter.rpm == 30
    assert limiter.reserve() == 2.0  # a full new interval from now
    limiter.on_throttle(retry_after_s=7)
    assert limiter.rpm == 15
    assert limiter.reserve() >= 7


def test_rate_recovers_additively_and_never_exceeds_the_ceiling(clock: FakeClock) -> None:
    limiter = RateLimiter(100, clock)
    for _ in range(3):
        limiter.on_throttle()
    assert limiter.rpm == 12.5
    steps = 0
    while limiter.rpm < 100:
        limiter.on_success()
        steps += 1
    assert limiter.rpm == 100 and steps == 18  # 5 rpm per success
    limiter.on_success()
    assert limiter.rpm == 100


def test_rate_never_falls_below_the_floor(clock: FakeClock) -> None:
    limiter = RateLimiter(4, clock, floor_rpm=1)
    for _ in range(10):
        limiter.on_throttle()
    assert limiter.rpm == 1


def test_concurrent_waiters_get_distinct_slots(clock: FakeClock) -> None:
    limiter = RateLimiter(600, clock)  # 0.1 s apart
    starts: list[float] = []

    async def worker() -> None:
        await limiter.acquire()
        starts.append(clock.now())

    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            for _ in range(5):
                group.create_task(worker())

    asyncio.run(main())
    gaps = [round(b - a, 6) for a, b in zip(sorted(starts), sorted(starts)[1:], strict=False)]
    assert len(starts) == 5 and all(g >= 0 for g in gaps)
