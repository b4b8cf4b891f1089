"""The request-rate limiter with a fake clock: exact spacing, cut on throttle, recovery, ceiling."""

from __future__ import annotations

import asyncio

import pytest

from batch_upscaler.ratelimit import AdaptiveRateLimiter, FixedRateLimiter
from tests.conftest import FakeClock


def test_starts_are_spaced_one_interval_apart(clock: FakeClock) -> None:
    limiter = FixedRateLimiter(60, clock)  # one per second
    assert limiter.try_start()
    assert limiter.wait_needed() == 1.0 and not limiter.try_start()
    clock.advance(1)
    assert limiter.try_start()
    clock.advance(10)
    assert limiter.try_start() and not limiter.try_start()  # idle time does not bank a burst


def test_acquire_sleeps_on_the_clock(clock: FakeClock) -> None:
    limiter = FixedRateLimiter(120, clock)

    async def three() -> None:
        for _ in range(3):
            await limiter.acquire()

    asyncio.run(three())
    assert clock.sleeps == [0.5, 0.5]
    assert clock.t == 1001.0


def test_throttle_halves_the_rate_and_pauses(clock: FakeClock) -> None:
    limiter = FixedRateLimiter(60, clock)
    assert limiter.try_start()
    limiter.on_throttle()
    assert limiter.rpm == 30
    assert limiter.wait_needed() == 2.0  # a full new interval from now
    limiter.on_throttle(retry_after_s=7)
    assert limiter.rpm == 15
    assert limiter.wait_needed() == 7


def test_a_rate_change_applies_to_starts_already_waiting(clock: FakeClock) -> None:
    fast = FixedRateLimiter(60, clock)
    assert fast.try_start()
    fast.on_throttle()
    fast.on_throttle()  # 15/min: the next start waits 4 s, not the 1 s booked at 60/min
    assert fast.wait_needed() == 4


def test_rate_recovers_additively_and_never_exceeds_the_ceiling(clock: FakeClock) -> None:
    limiter = FixedRateLimiter(100, clock)
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
    limiter = FixedRateLimiter(4, clock, floor_rpm=1)
    for _ in range(10):
        limiter.on_throttle()
    assert limiter.rpm == 1


def test_concurrent_waiters_get_distinct_slots(clock: FakeClock) -> None:
    limiter = FixedRateLimiter(600, clock)  # 0.1 s apart
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


# ---- adaptive (``auto``) -------------------------------------------------------------------------

class Quota:
    """A per-minute quota as a token bucket on the fake clock (what Bedrock-like services enforce)."""

    def __init__(self, clock: FakeClock, rpm: float, burst: float) -> None:
        self.clock, self.rpm, self.burst = clock, rpm, burst
        self.tokens, self.at = burst, clock.now()

    def take(self) -> bool:
        now = self.clock.now()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rpm / 60)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def drive(limiter: AdaptiveRateLimiter, quota: Quota, clock: FakeClock, seconds: float) -> tuple[int, int]:
    """Send requests as fast as the limiter allows for ``seconds``; (successes, throttles)."""
    async def go() -> tuple[int, int]:
        ok = throttled = 0
        end = clock.now() + seconds
        while clock.now() < end:
            await limiter.acquire()
            if quota.take():
                ok += 1
                limiter.on_success()
            else:
                throttled += 1
                limiter.on_throttle()
        return ok, throttled
    return asyncio.run(go())


def test_auto_converges_under_a_step_change_of_quota(clock: FakeClock) -> None:
    limiter = AdaptiveRateLimiter(clock)
    quota = Quota(clock, 600, burst=10)
    for rpm in (600, 300, 900):
        quota.rpm = rpm
        cuts_before = limiter.adjustments
        drive(limiter, quota, clock, 60)  # settle
        assert limiter.adjustments - cuts_before <= 12, f"no convergence at {rpm} rpm"
        ok, throttled = drive(limiter, quota, clock, 120)  # measure
        goodput = ok / 2
        assert goodput >= 0.9 * rpm, (rpm, goodput)
        assert throttled <= 0.05 * (ok + throttled), (rpm, throttled, ok)
        assert limiter.rpm < 1.3 * rpm


def test_auto_starts_low_and_only_grows_when_the_rate_is_the_limit(clock: FakeClock) -> None:
    limiter = AdaptiveRateLimiter(clock, start_rpm=30)
    assert limiter.rpm == 30
    # Requests come slower than the limiter allows (the workers are the bottleneck): no growth.
    for _ in range(30):
        clock.advance(5)
        assert limiter.try_start()
        limiter.on_success()
    assert limiter.rpm == 30


def test_auto_recovers_after_a_burst_of_throttles(clock: FakeClock) -> None:
    limiter = AdaptiveRateLimiter(clock)
    quota = Quota(clock, 600, burst=10)
    drive(limiter, quota, clock, 90)
    settled = limiter.rpm
    for _ in range(50):  # a burst of 429s, e.g. another client sharing the quota for a moment
        limiter.on_throttle()
    assert limiter.rpm >= 0.45 * settled  # counted as one signal, not fifty halvings
    drive(limiter, quota, clock, 60)
    ok, throttled = drive(limiter, quota, clock, 60)
    assert ok >= 0.9 * 600 and throttled <= 0.05 * ok


def test_retry_after_holds_the_next_start(clock: FakeClock) -> None:
    limiter = AdaptiveRateLimiter(clock, start_rpm=600)
    assert limiter.try_start()
    limiter.on_throttle(retry_after_s=12)
    assert limiter.wait_needed() == 12


def test_late_wakeups_do_not_slow_the_rate(clock: FakeClock) -> None:
    limiter = FixedRateLimiter(60, clock)
    assert limiter.try_start()
    clock.advance(1.05)  # the timer fired 50 ms late
    assert limiter.try_start()
    assert limiter.wait_needed() == pytest.approx(0.95)  # the next slot is still at 2.0 s
