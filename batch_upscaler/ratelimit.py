"""The request-rate dial: spaces request starts evenly and adjusts the rate to what the service allows.

Kept separate from the concurrency cap on purpose: concurrency bounds requests *in flight*, this
bounds requests *started per minute*. A start is allowed one interval (at the *current* rate) after
the previous start; waiters re-check when they wake, so a rate change applies at once to everyone
waiting (booking future slots at the old rate would hide a change for concurrency × interval).
Two controllers set the rate:

* :class:`FixedRateLimiter` (a number in the manifest): the number is a ceiling. A throttle cuts
  the rate in half and pauses one interval; each success adds back 5% of the ceiling (AIMD).
* :class:`AdaptiveRateLimiter` (``auto``): the quota is unknown. It measures it from the quota's
  own behaviour: a token bucket that throttles is empty, so the requests it accepted between two
  throttles are exactly what it refilled, quota × time. Cold, it slow-starts (doubling per half
  second while the rate is what holds starts back) up to the first throttle, halves, and moves to
  just under the measured quota as soon as a few requests measure it. Then it probes gently
  upward, in steps counted in successes, so a low quota is not probed more often per request than
  a high one. A :class:`StartRate` (a rate remembered from the last run, or a quota looked up)
  skips the climb to it: trusted, the run starts there and only probes; untrusted, it slow-starts
  on from there.

Time comes from an injected :class:`~batch_upscaler.clock.Clock`, so tests run without sleeping.
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass

from batch_upscaler.clock import Clock, sleep_unless


class RateLimiter(ABC):
    """Paces request starts at ``rpm``; subclasses decide how the rate moves."""

    mode = "fixed"

    def __init__(self, requests_per_minute: float, clock: Clock) -> None:
        if requests_per_minute <= 0:
            raise ValueError("requests_per_minute must be > 0")
        self._rpm = requests_per_minute
        self._clock = clock
        self._last_start = -math.inf
        self._hold_until = -math.inf
        self.throttles = 0
        self.waits = 0  # times a start had to wait for the rate

    @property
    def rpm(self) -> float:
        """The rate currently allowed, in requests per minute."""
        return self._rpm

    @property
    def interval(self) -> float:
        return 60.0 / self._rpm

    def wait_needed(self) -> float:
        """How long a start would have to wait now (0: it may start)."""
        allowed = max(self._last_start + self.interval, self._hold_until)
        return max(0.0, allowed - self._clock.now())

    def try_start(self) -> bool:
        """Take a start now if one is allowed."""
        now = self._clock.now()
        allowed = max(self._last_start + self.interval, self._hold_until)
        if now < allowed:
            return False
        # Count from the slot's own time when a wake-up was merely late (timer overshoot would
        # otherwise add up to a slower rate); after idling, from now (no banked burst).
        self._last_start = allowed if now - allowed < self.interval else now
        return True

    async def acquire(self, stop: asyncio.Event | None = None) -> bool:
        """Wait until a start is allowed, then take it; False (nothing taken) if ``stop`` is set first."""
        events = () if stop is None else (stop,)
        while not self.try_start():
            self._on_wait()
            if not await sleep_unless(self._clock, self._nap(), *events):
                return False
        return stop is None or not stop.is_set()

    def _nap(self) -> float:
        """How long a waiting start sleeps before it looks again (a subclass may look sooner)."""
        return self.wait_needed()

    def _on_wait(self) -> None:
        """A start had to wait: the rate, not the workers, is what limits throughput now."""
        self.waits += 1

    def _hold(self, pause_s: float) -> None:
        """No start before ``pause_s`` from now (after a throttle, or as Retry-After asks)."""
        self._hold_until = max(self._hold_until, self._clock.now() + pause_s)

    @abstractmethod
    def on_success(self) -> None:
        """A request was answered: the rate may grow."""

    @abstractmethod
    def on_throttle(self, retry_after_s: float | None = None) -> None:
        """The service said slow down."""


class FixedRateLimiter(RateLimiter):
    """A configured rate, treated as a ceiling: halve on throttle, recover additively."""

    def __init__(self, requests_per_minute: float, clock: Clock, *, floor_rpm: float = 1.0,
                 decrease: float = 0.5, increase_fraction: float = 0.05) -> None:
        super().__init__(requests_per_minute, clock)
        self.ceiling_rpm = requests_per_minute
        self.floor_rpm = min(floor_rpm, requests_per_minute)
        self._decrease = decrease
        self._step = requests_per_minute * increase_fraction

    def on_throttle(self, retry_after_s: float | None = None) -> None:
        self.throttles += 1
        self._rpm = max(self.floor_rpm, self._rpm * self._decrease)
        self._hold(max(self.interval, retry_after_s or 0.0))

    def on_success(self) -> None:
        self._rpm = min(self.ceiling_rpm, self._rpm + self._step)


@dataclass(frozen=True)
class StartRate:
    """A rate for ``auto`` to start at instead of finding the quota from scratch.

    ``trusted``: the last run of the same job (same region and model) ended at this rate, recently
    (pass that run's :attr:`AdaptiveRateLimiter.rate_to_remember`). The run starts there and probes
    gently; its first throttle is a probe that went too far (a 5% cut; throttles that keep coming
    halve the rate until they measure the quota). Untrusted (a rate remembered more than a week
    ago, or Service Quotas' applied quota): the run starts there too but treats it as a guess,
    checked both ways: it slow-starts on from it (no climb from 60/min), so the first throttle
    halves the rate and the next ones measure the quota.
    """

    rpm: float
    trusted: bool = False
    # A shard's share of a quota known job-wide (Service Quotas' applied quota ÷ shards at once): the
    # shard never goes above it. A known quota is split as a fixed rate would be; without one, the
    # shards steer towards a fair share through their share board (fairshare.py).
    ceiling: float | None = None


class AdaptiveRateLimiter(RateLimiter):
    """Finds the highest rate the account's quota allows and stays just under it.

    The quota is measured, not guessed: each throttle is a moment the quota's token bucket was
    empty, so between two of them it accepted exactly the tokens it refilled. From the most recent
    earlier throttle with at least ``min_accepted`` accepted starts since, the estimate is
    ``(starts - throttles) / elapsed``. A burst the bucket held at the start is not counted, as it
    would be in a success rate.
    """

    mode = "auto"
    slow_start_step_s = 0.5  # cold: the rate doubles per step while it is what holds starts back
    margin = 0.98  # settle this far under the measured quota
    min_accepted = 4  # starts accepted since an earlier throttle before that interval measures the quota
    window_s = 30.0  # throttles older than this are forgotten (the quota may have changed)
    episode_s = 2.0  # throttles closer than this, or with fewer than episode_successes successes
    episode_successes = 10  # between them, are one episode (one overshoot, however many 429s it has)
    cooldown_s = 0.25  # blind cuts (no measurement yet) at most this often: requests already sent count once
    probe_successes = 30  # a probe step: this many successes since the last one, and at least probe_s
    probe_s = 2.0
    recover_successes = 5  # a recovery step (well under the rate that was throttled): this many
    share_step = 0.02  # a shard's probe step: this fraction of its ceiling, every probe_s

    def __init__(self, clock: Clock, *, start: StartRate | None = None, start_rpm: float = 60.0,
                 floor_rpm: float = 1.0, max_rpm: float = 60_000.0) -> None:
        rpm = start_rpm if start is None else start.rpm
        # A shard held to its share probes additively, by the same step as every other shard (a
        # step in proportion to its own rate would keep whatever split the shards fell into).
        self._share_step: float | None = None
        if start is not None and start.ceiling is not None:
            max_rpm = min(max_rpm, start.ceiling)
            self._share_step = self.share_step * start.ceiling
        super().__init__(min(max_rpm, max(floor_rpm, rpm)), clock)
        self.floor_rpm, self.max_rpm = floor_rpm, max_rpm
        trusted = start is not None and start.trusted
        self._slow_start = not trusted  # a guessed start rate only skips the climb up to it
        # The rate throttles showed to be too high; recovery climbs fast back towards it.
        self._ceiling = self._rpm * 1.05 if trusted else math.inf
        self._last_step = clock.now()
        self._binding = False  # a start had to wait since the last step: the rate is the limit
        self._quiet = 0  # probe steps since the last throttle
        self._step_successes = 0
        self._step_starts = 0
        self._since_throttle = self.episode_successes
        self._last_throttle = -math.inf
        self._last_cut = -math.inf
        self._starts = 0
        self._marks: deque[tuple[float, int, int]] = deque()  # (time, starts, throttles) at each throttle
        self.estimate_rpm: float | None = None  # the quota as last measured
        self.adjustments = 0  # rate cuts, for tests and the report
        self.successes = 0

    @property
    def rate_to_remember(self) -> float:
        """The rate a later run of the same job should start at (:class:`StartRate`, trusted)."""
        if self.estimate_rpm is None:
            return self._rpm
        return min(self._rpm, self.estimate_rpm * self.margin)

    @property
    def starts(self) -> int:
        return self._starts

    def try_start(self) -> bool:
        if not super().try_start():
            return False
        self._starts += 1
        return True

    def _on_wait(self) -> None:
        super()._on_wait()
        self._binding = True
        if self._slow_start:
            self._grow(self._clock.now())

    def _nap(self) -> float:
        wait = self.wait_needed()
        if not self._slow_start:
            return wait
        # A slow start doubles every step: look again at the next one, not a whole old interval later.
        return min(wait, max(0.001, self._last_step + self.slow_start_step_s - self._clock.now()))

    def on_success(self) -> None:
        self.successes += 1
        self._step_successes += 1
        self._since_throttle += 1
        self._grow(self._clock.now())

    def on_throttle(self, retry_after_s: float | None = None) -> None:
        self.throttles += 1
        now = self._clock.now()
        if self._marks and self._marks[-1][1] == self._starts:
            self._marks.pop()  # no start since the last throttle: an echo of the same empty bucket
        self._marks.append((now, self._starts, self.throttles))
        while self._marks[0][0] < now - self.window_s:
            self._marks.popleft()
        new_episode = now - self._last_throttle >= self.episode_s and self._since_throttle >= self.episode_successes
        self._last_throttle, self._since_throttle = now, 0
        self._ceiling = self._rpm if new_episode else min(self._ceiling, self._rpm)
        measured, at_most = self._measure(now)
        if measured is not None:
            self.estimate_rpm = measured
            self._ceiling = min(self._ceiling, at_most)
        target = self._target(now, new_episode, measured)
        if target < self._rpm:
            self._rpm = max(self.floor_rpm, target)
            self._last_cut = now
            self.adjustments += 1
        self._slow_start = False
        self._last_step, self._step_starts, self._quiet, self._step_successes = now, self._starts, 0, 0
        self._binding = False
        self._hold(max(self.interval, retry_after_s or 0.0))

    def steer(self, fair_rpm: float, slack: float) -> bool:
        """Keep within ``slack`` of a fair share of a quota shared with other shards (fairshare.py); True
        if the rate moved. Above it: down to it (a measurement here only saw what this shard got).
        Below it: up to it, a guess that throttles check as any other. From the first fair share on,
        probes are additive, a step of the fair share every ``probe_s``, as for a shard held to a known
        share: steps in proportion to its own rate, or a fast recovery towards a rate it once had,
        would take back from the others what steering gave them."""
        self._share_step = self.share_step * fair_rpm
        high, low = fair_rpm * slack, fair_rpm / slack
        if self._rpm > high:
            self._rpm = max(self.floor_rpm, high)
            self.adjustments += 1
            return True
        if self._rpm < low <= self.max_rpm:
            self._rpm = low
            return True
        return False

    def _measure(self, now: float) -> tuple[float | None, float]:
        """The quota, and the most it can be, from the most recent earlier throttle that enough accepted
        starts separate from now (the bucket held less than one token at each end: ±1 token)."""
        _, starts, throttles = self._marks[-1]
        for at, starts_then, throttles_then in reversed(self._marks):
            accepted = (starts - starts_then) - (throttles - throttles_then)
            if accepted >= self.min_accepted and now > at:
                return accepted / (now - at) * 60.0, (accepted + 1) / (now - at) * 60.0
        return None, math.inf

    def _target(self, now: float, new_episode: bool, measured: float | None) -> float:
        ready = now - self._last_cut >= self.cooldown_s
        if new_episode and not self._slow_start:
            # A probe went a step too far (or the quota moved): back under the measured quota, and
            # never by more than 5% at once, because a measurement after quiet time can be low.
            return self._rpm * 0.95 if measured is None else max(measured * self.margin, self._rpm * 0.95)
        if not ready:
            return self._rpm  # 429s of requests sent before the last cut
        if measured is None:
            return self._rpm * 0.5  # nothing measured yet: halve
        target = measured * self.margin
        return target if target < self._rpm else self._rpm * 0.9  # throttled under the measurement: stale

    def _grow(self, now: float) -> None:
        """A growth step, if one is due: only while starts wait for the rate, and never past twice
        what was sent in the step (when the workers are the limit, waits still happen when several
        free up together, and the rate must not run away from them)."""
        if self._slow_start:
            if now - self._last_step < self.slow_start_step_s:
                return
            growth = 2.0
        else:
            recovering = math.isfinite(self._ceiling) and self._rpm < 0.9 * self._ceiling
            needed = self.recover_successes if recovering else self.probe_successes
            if self._share_step is not None:
                needed = 0  # steps in time, not in successes: a starved shard grows as often as the others
            if self._step_successes < needed or now - self._last_step < self.probe_s:
                return
            self._quiet += 1
            if self._share_step is not None:
                growth = (self._rpm + self._share_step) / self._rpm
            elif recovering:  # halfway back towards just under the rate that was throttled
                growth = (self._rpm + 0.95 * self._ceiling) / 2 / self._rpm
            else:  # 1% per step, doubling every 4 quiet steps, at most 25%
                growth = 1 + min(0.25, 0.01 * 2 ** (self._quiet / 4))
        sent = (self._starts - self._step_starts) / (now - self._last_step) * 60.0
        if self._binding:
            self._rpm = min(self.max_rpm, self._rpm * growth, max(self._rpm, 2 * sent))
        self._last_step, self._step_starts, self._step_successes, self._binding = now, self._starts, 0, False


def make_limiter(requests_per_minute: float | None, clock: Clock, start: StartRate | None = None) -> RateLimiter:
    """A fixed-ceiling limiter for a number, the adaptive one for ``None`` (``auto``), from ``start`` if given.

    ``start`` is ignored for a number: the manifest's rate is the ceiling the user asked for.
    """
    if requests_per_minute is None:
        return AdaptiveRateLimiter(clock, start=start)
    return FixedRateLimiter(requests_per_minute, clock)
