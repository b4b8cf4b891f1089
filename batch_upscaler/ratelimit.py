"""The request-rate dial: spaces request starts evenly and slows down when the service throttles.

Kept separate from the concurrency cap on purpose: concurrency bounds requests *in flight*, this
bounds requests *started per minute*. The limiter hands out start times one interval apart
(a reservation scheme, exact under asyncio because reserving never awaits). On a throttle the
rate is cut multiplicatively and the next start is pushed back one full (new) interval; each
success adds back a small fixed step, never above the configured ceiling (AIMD, as TCP does).
"""

from __future__ import annotations

from batch_upscaler.clock import Clock


class RateLimiter:
    def __init__(self, requests_per_minute: float, clock: Clock, *, floor_rpm: float = 1.0,
                 decrease: float = 0.5, increase_fraction: float = 0.05) -> None:
        if requests_per_minute <= 0:
            raise ValueError("requests_per_minute must be > 0")
        self.ceiling_rpm = requests_per_minute
        self.floor_rpm = min(floor_rpm, requests_per_minute)
        self._rpm = requests_per_minute
        self._decrease = decrease
        self._step = requests_per_minute * increase_fraction
        self._clock = clock
        self._next_start = clock.now()
        self.throttles = 0

    @property
    def rpm(self) -> float:
        """The rate currently allowed, in requests per minute."""
        return self._rpm

    @property
    def interval(self) -> float:
        return 60.0 / self._rpm

    def reserve(self) -> float:
        """Reserve the next start slot; returns how long the caller must wait for it."""
        now = self._clock.now()
        start = max(now, self._next_start)
        self._next_start = start + self.interval
        return start - now

    async def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await self._clock.sleep(delay)

    def on_throttle(self, retry_after_s: float | None = None) -> None:
        """The service said slow down: cut the rate and leave a gap before the next start."""
        self.throttles += 1
        self._rpm = max(self.floor_rpm, self._rpm * self._decrease)
        pause = max(self.interval, retry_after_s or 0.0)
        self._next_start = max(self._next_start, self._clock.now() + pause)

    def on_success(self) -> None:
        self._rpm = min(self.ceiling_rpm, self._rpm + self._step)
