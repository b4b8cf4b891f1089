"""The request-rate dial: spaces request starts evenly and adjusts the rate to what the service allows.

Kept separate from the concurrency cap on purpose: concurrency bounds requests *in flight*, this
bounds requests *started per minute*. A start is allowed one interval (at the *current* rate) after
the previous start; waiters re-check when they wake, so a rate change applies at once to everyone
waiting (booking future slots at the old rate would hide a change for concurrency × interval).
Two controllers set the rate:

* :class:`FixedRateLimiter` (a number in the manifest): the number is a ceiling. A throttle cuts
  the rate in half and pauses one interval; each success adds back 5% of the ceiling (AIMD).
* :class:`AdaptiveRateLimiter` (``auto``): the quota is unknown. It starts low and grows while the
  rate is what holds requests back (doubling per probe interval until the first throttle, then a
  growth step that doubles every 4 quiet intervals, 1% to 25%). On a throttle it drops to just
  under the success rate measured over the last window (what the quota let through), at most once
  per cool-down, so a burst of 429s from requests already in flight counts as one signal.

Time comes from an injected :class:`~batch_upscaler.clock.Clock`, so tests run without sleeping.
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from collections import deque

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
            if not await sleep_unless(self._clock, self.wait_needed(), *events):
                return False
        return stop is None or not stop.is_set()

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


class AdaptiveRateLimiter(RateLimiter):
    """Finds the highest rate the account's quota allows and stays just under it."""

    mode = "auto"

    def __init__(self, clock: Clock, *, start_rpm: float = 30.0, floor_rpm: float = 1.0,
                 max_rpm: float = 60_000.0, window_s: float = 5.0, probe_interval_s: float = 2.0,
                 margin: float = 0.97, cooldown_s: float = 4.0) -> None:
        super().__init__(start_rpm, clock)
        self.floor_rpm, self.max_rpm = floor_rpm, max_rpm
        self._window_s, self._probe_s = window_s, probe_interval_s
        self._margin, self._cooldown_s = margin, cooldown_s
        now = clock.now()
        self._started = now
        self._last_probe = now
        self._last_cut = -math.inf
        self._quiet = 0  # probe intervals since the last cut
        self._slow_start = True
        self._binding = False  # a start had to wait since the last probe: the rate is the limit
        self._successes: deque[float] = deque()
        self.adjustments = 0  # rate cuts, for tests and the report

    def _on_wait(self) -> None:
        super()._on_wait()
        self._binding = True

    def on_success(self) -> None:
        now = self._clock.now()
        self._successes.append(now)
        while self._successes and self._successes[0] < now - self._window_s:
            self._successes.popleft()
        self._probe(now)

    def on_throttle(self, retry_after_s: float | None = None) -> None:
        self.throttles += 1
        now = self._clock.now()
        if now - self._last_cut >= self._cooldown_s:
            self._cut(now)
        self._hold(max(self.interval, retry_after_s or 0.0))

    def _cut(self, now: float) -> None:
        measured = self._success_rpm(now)
        target = self._rpm * 0.8 if measured is None else measured * self._margin
        # Always a real decrease, never a collapse from one odd measurement.
        self._rpm = max(self.floor_rpm, self._rpm * 0.5, min(self._rpm * 0.95, target))
        self._last_cut = now
        self._last_probe = now
        self._quiet = 0
        self._slow_start = False
        self.adjustments += 1

    def _success_rpm(self, now: float) -> float | None:
        span = min(self._window_s, now - self._started)
        if len(self._successes) < 5 or span <= 0:
            return None
        return len(self._successes) / span * 60.0

    def _probe(self, now: float) -> None:
        while now - self._last_probe >= self._probe_s:
            self._last_probe += self._probe_s
            self._quiet += 1
            if self._binding:
                growth = 1.0 if self._slow_start else min(0.25, 0.01 * 2 ** (self._quiet / 4))
                self._rpm = min(self.max_rpm, self._rpm * (1 + growth))
            self._binding = False


def make_limiter(requests_per_minute: float | None, clock: Clock) -> RateLimiter:
    """A fixed-ceiling limiter for a number, the adaptive one for ``None`` (``auto``)."""
    if requests_per_minute is None:
        return AdaptiveRateLimiter(clock)
    return FixedRateLimiter(requests_per_minute, clock)
