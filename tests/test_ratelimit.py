"""The request-rate limiter with a fake clock: exact spacing, cut on throttle, recovery, ceiling.

The adaptive controller is also simulated against a token-bucket quota: workers that hold a
request for a latency, 429s answered at once and retried after the pool's back-off, all on the
fake clock (no sleeping), and its convergence time and throttled share are asserted.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from batch_upscaler.fairshare import ShareKeeper
from batch_upscaler.ratelimit import AdaptiveRateLimiter, FixedRateLimiter, StartRate, make_limiter
from batch_upscaler.retry import Backoff
from batch_upscaler.shards import Shard
from batch_upscaler.storage.shareboard import LocalShareBoard
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


# ---- the quota measured from throttles, and the cold start ---------------------------------------

def test_two_throttles_measure_the_quota_from_the_starts_between_them(clock: FakeClock) -> None:
    limiter = AdaptiveRateLimiter(clock, start=StartRate(6000, trusted=True))
    assert limiter.try_start()
    limiter.on_throttle()  # the bucket is empty now
    for _ in range(15):
        limiter.on_throttle()  # 429s of requests already on the wire: no start since, the same empty bucket
    for _ in range(10):  # the bucket refills 10 tokens in 1.1 s, and these 10 starts take them
        clock.advance(0.1)
        assert limiter.try_start()
    clock.advance(0.1)
    assert limiter.try_start()
    limiter.on_throttle()  # empty again: 10 accepted in 1.1 s
    assert limiter.estimate_rpm == pytest.approx(10 / 1.1 * 60)
    assert limiter.rpm == pytest.approx(10 / 1.1 * 60 * limiter.margin)  # just under it
    assert limiter.rate_to_remember == limiter.rpm


def test_a_cold_start_doubles_every_half_second_while_the_rate_holds_starts_back(clock: FakeClock) -> None:
    limiter = AdaptiveRateLimiter(clock)
    starts: list[float] = []

    async def go() -> None:
        while clock.now() < 1002.0:
            await limiter.acquire()
            starts.append(round(clock.now() - 1000, 4))

    asyncio.run(go())
    # 60, 120, 240, 480 RPM over four half seconds: a waiting start looks again at every doubling
    # instead of sleeping a whole interval of the old rate (2 s at the first one).
    assert starts == [0.0, 0.5, 1.0, 1.25, 1.5, 1.625, 1.75, 1.875, 2.0]
    assert limiter.rpm == 480


def test_the_first_throttle_of_a_cold_start_halves_then_the_measurement_takes_over(clock: FakeClock) -> None:
    limiter = AdaptiveRateLimiter(clock, start_rpm=1200)
    assert limiter.try_start()
    limiter.on_throttle()
    assert limiter.rpm == 600 and limiter.estimate_rpm is None


def test_a_throttle_after_quiet_probing_cuts_at_most_five_percent(clock: FakeClock) -> None:
    limiter = AdaptiveRateLimiter(clock, start=StartRate(600, trusted=True))
    assert limiter.try_start()
    limiter.on_throttle()
    assert limiter.rpm == pytest.approx(570)  # one probe too far, not a collapse


def test_make_limiter_starts_auto_from_a_remembered_rate(clock: FakeClock) -> None:
    assert make_limiter(None, clock).rpm == 60
    assert make_limiter(None, clock, StartRate(500, trusted=True)).rpm == 500
    assert make_limiter(None, clock, StartRate(500)).rpm == 500
    fixed = make_limiter(30, clock, StartRate(500, trusted=True))
    assert isinstance(fixed, FixedRateLimiter) and fixed.rpm == 30  # a number is the user's ceiling


# ---- simulation: workers, latency and a token-bucket quota on the fake clock -------------------

@dataclass
class Simulated:
    """What a simulated run saw: the limiter's rate after every answer, and the answers."""

    rates: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, rpm)
    successes: list[float] = field(default_factory=list)  # seconds since start of each success
    throttles: int = 0

    @property
    def throttled_share(self) -> float:
        return self.throttles / (len(self.successes) + self.throttles)

    def settled_by(self, quota_rpm: float, within: float = 0.10) -> float:
        """When the rate last left quota ± ``within`` (0.0: it never did)."""
        return max((at for at, rpm in self.rates if abs(rpm - quota_rpm) > within * quota_rpm), default=0.0)

    def goodput_rpm(self, since: float, until: float) -> float:
        return sum(since <= at < until for at in self.successes) / (until - since) * 60


def simulate(limiter: AdaptiveRateLimiter, clock: FakeClock, quota: Quota, workers: int, latency_s: float,
             seconds: float, seed: int = 0) -> Simulated:
    """``workers`` workers as pool.py runs them, sending for ``seconds``: each takes a start, then the
    quota answers a 429 at once (after 5 ms) or the image after a lognormal latency (median
    ``latency_s``, sigma 0.3); a throttled request is retried after the pool's back-off, holding its
    worker meanwhile."""
    return simulate_shards([limiter], clock, quota, workers, latency_s, seconds, seed=seed)[0]


@pytest.mark.parametrize(("quota_rpm", "workers", "latency_s"), [
    (60, 1, 0.2), (60, 4, 1.0), (60, 16, 3.0),
    (600, 4, 0.2), (600, 16, 0.2), (600, 16, 0.5), (600, 64, 3.0),
    (3000, 16, 0.2), (3000, 64, 1.0),
])
def test_auto_converges_to_a_token_bucket_quota(clock: FakeClock, quota_rpm: float, workers: int,
                                                latency_s: float) -> None:
    """Cold, against a bucket holding one second of quota: within 10% of the quota after 15 s and
    there for the rest of 5 minutes, 97% of the quota used meanwhile, at most 3% of the requests
    throttled (the slow start's overshoot included), and a rate to remember just under the quota."""
    quota = Quota(clock, quota_rpm, burst=max(2, quota_rpm / 60))
    limiter = AdaptiveRateLimiter(clock)
    seen = simulate(limiter, clock, quota, workers, latency_s, seconds=300)
    assert seen.settled_by(quota_rpm) <= 15
    assert seen.goodput_rpm(15, 300) >= 0.97 * quota_rpm
    assert seen.throttled_share <= 0.03
    assert 0.95 * quota_rpm <= limiter.rate_to_remember <= quota_rpm


def test_a_short_cold_run_reaches_the_quota_in_a_few_seconds(clock: FakeClock) -> None:
    """The nightly top-up of issue 13, simulated: 30 s of sending at 600 RPM, 16 workers, 0.2 s latency,
    a 10-request burst."""
    quota = Quota(clock, 600, burst=10)
    seen = simulate(AdaptiveRateLimiter(clock), clock, quota, workers=16, latency_s=0.2, seconds=30)
    assert seen.settled_by(600) <= 8
    assert seen.goodput_rpm(0, 30) >= 0.95 * 600
    assert seen.throttles <= 9  # 3% of 300


def test_auto_does_not_run_away_from_what_the_workers_can_send(clock: FakeClock) -> None:
    """4 workers at 1 s latency send about 240 RPM: the rate grows only while starts wait for it, and
    never past twice what was sent in a step, so it neither probes a 600 RPM quota nor runs off to
    60,000 (starts still wait now and then, when several workers free up together)."""
    quota = Quota(clock, 600, burst=10)
    limiter = AdaptiveRateLimiter(clock)
    seen = simulate(limiter, clock, quota, workers=4, latency_s=1.0, seconds=120)
    assert seen.throttles == 0 and limiter.rpm <= 4 * 240


def lowest_rate(seen: Simulated, after: float) -> float:
    return min(rpm for at, rpm in seen.rates if at >= after)


def two_minutes_from(clock: FakeClock, start: StartRate) -> Simulated:
    """A limiter that starts at ``start``, 2 minutes against a 600 RPM quota (burst 10), 16 workers, 0.2 s."""
    limiter = AdaptiveRateLimiter(clock, start=start)
    assert limiter.rpm == start.rpm
    return simulate(limiter, clock, Quota(clock, 600, burst=10), workers=16, latency_s=0.2, seconds=120)


@pytest.mark.parametrize("remembered", [588.0, 600.0])
def test_a_trusted_start_begins_at_the_remembered_rate(clock: FakeClock, remembered: float) -> None:
    """No slow start and no deep cut: 2 minutes at 600 RPM, never under 95% of it, at most 1% throttled."""
    seen = two_minutes_from(clock, StartRate(remembered, trusted=True))
    assert lowest_rate(seen, after=0) >= 0.95 * 600
    assert seen.goodput_rpm(0, 120) >= 0.99 * 600
    assert seen.throttled_share <= 0.01


@pytest.mark.parametrize("guess", [150.0, 600.0, 2400.0])
def test_an_untrusted_start_is_a_guess_that_is_checked(clock: FakeClock, guess: float) -> None:
    """From a week-old memory or Service Quotas: starts there and slow-starts on from it (no climb
    from 60 RPM), the first throttle halves as at the end of a cold slow start, and the quota is
    measured within a few seconds, too low a guess or too high."""
    seen = two_minutes_from(clock, StartRate(guess, trusted=False))
    assert lowest_rate(seen, after=5) >= 0.9 * 600
    assert seen.goodput_rpm(0, 120) >= 0.98 * 600
    assert seen.throttled_share <= 0.02


# ---- shards sharing one quota --------------------------------------------------------------------

def simulate_shards(limiters: list[AdaptiveRateLimiter], clock: FakeClock, quota: Quota, workers: int | list[int],
                    latency_s: float, seconds: float, stagger_s: float = 0.4, seed: int = 0,
                    keepers: Sequence[ShareKeeper] = ()) -> list[Simulated]:
    """One limiter per shard, each with ``workers`` workers (or ``workers[i]`` for shard i) as
    :func:`simulate` describes, all against one quota; shard i starts ``i × stagger_s`` late
    (processes never start at the same instant). ``keepers`` (fairshare.py) run beside, as the
    runner runs them, until the workers are done."""
    rng, backoff, began = random.Random(seed), Backoff(2.0, 60.0), clock.now()
    seen = [Simulated() for _ in limiters]

    async def worker(index: int) -> None:
        await clock.sleep(stagger_s * index)
        limiter, mine, attempt = limiters[index], seen[index], 0
        while clock.now() - began < seconds:
            await limiter.acquire()
            if quota.take():
                await clock.sleep(latency_s * math.exp(0.3 * rng.gauss(0.0, 1.0)))
                limiter.on_success()
                mine.successes.append(clock.now() - began)
                attempt = 0
            else:
                await clock.sleep(0.005)
                limiter.on_throttle()
                mine.throttles += 1
                attempt += 1
                await clock.sleep(backoff.delay(attempt, rng))
            mine.rates.append((clock.now() - began, limiter.rpm))

    async def keep(index: int, keeper: ShareKeeper) -> None:
        await clock.sleep(stagger_s * index)
        await keeper.run()

    async def main() -> None:
        beside = [asyncio.create_task(keep(index, keeper)) for index, keeper in enumerate(keepers)]
        async with asyncio.TaskGroup() as group:
            for index in range(len(limiters)):
                for _ in range(workers if isinstance(workers, int) else workers[index]):
                    group.create_task(worker(index))
        for task in beside:
            task.cancel()
        await asyncio.gather(*beside, return_exceptions=True)

    asyncio.run(main())
    return seen


def shares(seen: list[Simulated], since: float, until: float) -> list[float]:
    """Each shard's successes in the window as a multiple of a fair share (1.0: exactly fair)."""
    counts = [sum(since <= at < until for at in shard.successes) for shard in seen]
    return [count * len(counts) / sum(counts) for count in counts]


def throttled_share(seen: list[Simulated]) -> float:
    throttled = sum(shard.throttles for shard in seen)
    return throttled / (throttled + sum(len(shard.successes) for shard in seen))


def goodput(seen: list[Simulated], since: float, until: float) -> float:
    return sum(sum(since <= at < until for at in shard.successes) for shard in seen) / (until - since) * 60


@pytest.mark.parametrize(("effective_rpm", "seed"), [(600, 0), (600, 1), (480, 0), (480, 1)])
def test_shards_held_to_their_share_of_a_known_quota_share_it_fairly(clock: FakeClock, effective_rpm: float,
                                                                     seed: int) -> None:
    """4 shards, 8 workers each, 0.2 s latency, the applied quota 600 known (each shard's ceiling 150).
    When the account really gets 600 they run at 150 each and are never throttled; when something
    else takes a fifth of it (480 left) no shard starves: within ±25% of a fair share over 2 minutes."""
    quota = Quota(clock, effective_rpm, burst=10)
    limiters = [AdaptiveRateLimiter(clock, start=StartRate(150.0, ceiling=150.0)) for _ in range(4)]
    seen = simulate_shards(limiters, clock, quota, workers=8, latency_s=0.2, seconds=150, seed=seed)
    assert all(max(rpm for _, rpm in shard.rates) <= 150.0 for shard in seen)
    assert all(abs(share - 1.0) <= 0.25 for share in shares(seen, 30, 150)), shares(seen, 30, 150)
    assert throttled_share(seen) <= (0.0 if effective_rpm == 600 else 0.03)
    assert goodput(seen, 30, 150) >= 0.95 * effective_rpm


def cold_shards(clock: FakeClock, board_dir: Path | None, quota_rpm: float, workers: int | list[int] = 8,
                seed: int = 0) -> tuple[list[Simulated], list[ShareKeeper]]:
    """4 cold ``auto`` shards, 0.2 s latency, 2.5 minutes against one quota (burst 10), with a share
    board in ``board_dir`` (posting every 10 s, as by default) or without one."""
    limiters = [AdaptiveRateLimiter(clock) for _ in range(4)]
    keepers = [] if board_dir is None else [
        ShareKeeper(limiter, LocalShareBoard(board_dir), Shard(index, 4).label, clock, 10.0, wall=clock.now,
                    rng=random.Random(seed * 10 + index))
        for index, limiter in enumerate(limiters)]
    quota = Quota(clock, quota_rpm, burst=10)
    return simulate_shards(limiters, clock, quota, workers, latency_s=0.2, seconds=150, seed=seed,
                           keepers=keepers), keepers


def test_cold_shards_without_a_board_do_not_share_a_quota_fairly(clock: FakeClock) -> None:
    """Why the board exists: each shard measures only what it gets, and one starves."""
    seen, _ = cold_shards(clock, None, 600)
    assert min(shares(seen, 30, 150)) < 0.5, shares(seen, 30, 150)


@pytest.mark.parametrize(("quota_rpm", "seed"), [(120, 0), (600, 0), (600, 1), (3000, 0)])
def test_cold_shards_with_a_share_board_share_a_quota_fairly(clock: FakeClock, tmp_path: Path, quota_rpm: float,
                                                             seed: int) -> None:
    """The same 4 cold shards posting on one board: each within ±25% of a fair share from 30 s to the
    end, the quota used, and no more throttled than a lone run at that quota per shard."""
    seen, keepers = cold_shards(clock, tmp_path / "reports", quota_rpm, seed=seed)
    assert all(abs(share - 1.0) <= 0.25 for share in shares(seen, 30, 150)), shares(seen, 30, 150)
    assert goodput(seen, 30, 150) >= 0.95 * quota_rpm
    assert throttled_share(seen) <= (0.10 if quota_rpm < 600 else 0.05)
    assert all(keeper.rounds >= 12 for keeper in keepers)
    posted = sorted(p.name for p in (tmp_path / "reports" / "shards" / "rates").iterdir())
    assert posted == [f"{Shard(i, 4).label}.json" for i in range(4)]


def test_a_shard_that_wants_less_leaves_its_share_to_the_others(clock: FakeClock, tmp_path: Path) -> None:
    """Shard 3 has one worker: at 0.2 s a request it sends under 300/min, far less than its share of
    3000. It posts ``limited: false`` and does not count, so the other three are not held down to its
    rate: they share the rest (about 900/min each) and the quota is still used."""
    seen, _ = cold_shards(clock, tmp_path / "reports", 3000, workers=[8, 8, 8, 1])
    assert goodput(seen, 30, 150) >= 0.95 * 3000
    assert goodput(seen[3:], 30, 150) <= 300
    busy = shares(seen[:3], 30, 150)
    assert all(abs(share - 1.0) <= 0.25 for share in busy), busy
