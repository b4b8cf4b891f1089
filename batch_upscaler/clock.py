"""Injectable time: the rate limiter and retry back-off ask a Clock, so tests use a fake one.

Tests advance a fake clock instead of sleeping; production uses :class:`SystemClock`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real monotonic clock and asyncio's sleep."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


async def sleep_unless(clock: Clock, seconds: float, *events: asyncio.Event) -> bool:
    """Sleep ``seconds`` on ``clock`` unless one of ``events`` is set first; True if the sleep ran out.

    Every wait of a worker goes through here with the stop event, so a stop (the first Ctrl-C) is
    seen the moment it happens, not after a back-off or a Retry-After of minutes.
    """
    if any(event.is_set() for event in events):
        return False
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait([sleeper, *waiters], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeper, *waiters):
            task.cancel()
    return not any(event.is_set() for event in events)
