"""The request quota: a token bucket refilled at ``rpm / 60`` tokens per second."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Starts full (``capacity`` tokens); each request takes one or is throttled.

    The clock is injectable so tests can move time without sleeping. Used from the server's
    event loop only, so there is no lock.
    """

    def __init__(self, rate_per_s: float, capacity: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or capacity < 1:
            raise ValueError(f"need rate_per_s > 0 and capacity >= 1, got {rate_per_s}, {capacity}")
        self._rate = rate_per_s
        self._capacity = float(capacity)
        self._clock = clock
        self._tokens = float(capacity)
        self._last = clock()

    @classmethod
    def per_minute(cls, rpm: float, burst: int, clock: Callable[[], float] = time.monotonic) -> TokenBucket:
        return cls(rpm / 60.0, burst, clock)

    @property
    def tokens(self) -> float:
        """Tokens available now (refills first)."""
        self._refill()
        return self._tokens

    def try_take(self) -> bool:
        """Take one token if there is one; False means the request is throttled."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _refill(self) -> None:
        now = self._clock()
        # max(): a clock that steps backwards must not drain the bucket.
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(self._capacity, self._tokens + elapsed * self._rate)
