"""Injectable time: the rate limiter and retry back-off ask a Clock, so tests use a fake one.

Tests advance a fake clock instead of sleeping; production uses :class:`SystemClock`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
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
    seen the moment it happens, not after a back-off or a Retry-After of minutes. The sleep runs in
    the calling task (a clock computes its deadline when the sleep starts); an event interrupts it
    by cancelling that task while, and only while, it is asleep here.
    """
    if any(event.is_set() for event in events):
        return False
    task = asyncio.current_task()
    assert task is not None
    state = {"asleep": True, "interrupted": False}

    def interrupt() -> None:
        if state["asleep"] and not state["interrupted"]:
            state["interrupted"] = True
            task.cancel()

    watchers = [asyncio.ensure_future(_when_set(event, interrupt)) for event in events]
    try:
        await clock.sleep(seconds)
    except asyncio.CancelledError:
        if not state["interrupted"] or task.cancelling() > 1:
            raise  # a real cancellation (the run is being cancelled), not our interruption
        task.uncancel()
        return False
    finally:
        state["asleep"] = False
        for watcher in watchers:
            watcher.cancel()
    return not state["interrupted"]


async def _when_set(event: asyncio.Event, then: Callable[[], None]) -> None:
    await event.wait()
    then()
