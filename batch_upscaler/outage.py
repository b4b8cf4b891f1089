"""The outage circuit breaker: a down service pauses the pool instead of failing every image it touches.

Errors where nothing ran (connection refused or reset before an answer, 503, other 5xx: see
:func:`batch_upscaler.retry.is_service_state`) are the service's state, not the image's. After
``threshold`` of them in a row across the pool, with no healthy answer in between, the breaker
*opens*: workers stop sending and wait. One request at a time then probes the service, at
growing intervals; the first healthy answer closes the breaker and every worker goes on. If the
service stays down for ``max_wait_s``, :meth:`admit` answers ``GIVE_UP`` and the run stops
(exit 75) with every unfinished item still pending.

A healthy answer is any answer that shows the service working: a success, but also a throttle
or a 4xx about one request. Answers are dated by when their request was *sent*: an answer to a
request sent before the errors began (a slow request finishing as the service goes down) proves
nothing about now, so it neither ends a run of errors nor closes the breaker. The latest such
date lets a worker tell "this image alone keeps failing while requests sent after its last
failure are answered" (the image may fail) from "everything is failing" (it may not).

Time comes from the injected clock, so tests drive outages without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from enum import StrEnum

from batch_upscaler.clock import Clock, sleep_unless

log = logging.getLogger(__name__)


class Admission(StrEnum):
    GO = "go"  # send as usual
    PROBE = "probe"  # send: this attempt probes a service that was down (report its outcome)
    STOP = "stop"  # the run is stopping: do not send
    GIVE_UP = "give_up"  # the service has been down longer than the run waits: stop the run


class Breaker:
    def __init__(self, clock: Clock, *, threshold: int = 8, max_wait_s: float = 900.0,
                 first_probe_s: float = 2.0, max_probe_s: float = 60.0,
                 wall: Callable[[], float] = time.time) -> None:
        self._clock, self._wall = clock, wall
        self.threshold, self.max_wait_s = threshold, max_wait_s
        self._first_probe_s, self._max_probe_s = first_probe_s, max_probe_s
        self.healthy = 0  # healthy answers so far (successes, throttles, 4xx): proof the service works
        self.last_healthy_sent_at = -math.inf  # when the newest request that was answered healthily was sent
        self.outages = 0  # times the breaker opened
        self._streak = 0  # service-state errors in a row, pool-wide
        self._streak_began = math.inf  # when the first request of that run of errors was sent
        self._opened_at: float | None = None  # clock time; None while closed
        self.down_since_wall: float | None = None  # wall time, for people ("unreachable since 02:13")
        self._probe_at = 0.0
        self._probe_interval = first_probe_s
        self._probing = False
        self._changed = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def on_healthy(self, sent_at: float) -> None:
        """An answer that shows the service working, to a request sent at ``sent_at`` (clock time)."""
        self.healthy += 1
        self.last_healthy_sent_at = max(self.last_healthy_sent_at, sent_at)
        if sent_at < self._streak_began:
            return  # sent before the errors began: it says nothing about the service now
        self._streak, self._streak_began = 0, math.inf
        self._probing = False
        if self._opened_at is not None:
            log.warning("the service answers again after %.0f s; resuming", self._clock.now() - self._opened_at,
                        extra={"event": "outage_over"})
            self._opened_at = self.down_since_wall = None
            self._notify()

    def on_service_error(self, sent_at: float, probe: bool = False) -> None:
        """An attempt sent at ``sent_at`` ended with an error where nothing ran."""
        self._streak += 1
        self._streak_began = min(self._streak_began, sent_at)
        now = self._clock.now()
        if self._opened_at is None and self._streak >= self.threshold:
            self._open(now)
        elif probe:  # the service is still down: probe again later, less often
            self._probing = False
            self._probe_interval = min(self._max_probe_s, self._probe_interval * 2)
            self._probe_at = now + self._probe_interval
            self._notify()

    def works_since(self, moment: float) -> bool:
        """A request sent after ``moment`` was answered healthily, and no outage is going on: the
        service works for others (an image failing now fails alone)."""
        return self._opened_at is None and self.last_healthy_sent_at > moment

    def abandon_probe(self) -> None:
        """The worker that was to probe did not send (the run is stopping)."""
        self._probing = False
        self._notify()

    def _open(self, now: float) -> None:
        self.outages += 1
        self._opened_at = now
        self.down_since_wall = self._wall()
        self._probe_interval = self._first_probe_s
        self._probe_at = now + self._probe_interval
        log.warning("%d errors in a row where nothing ran: the service looks down; pausing all requests "
                    "and probing it (for up to %.0f s)", self._streak, self.max_wait_s,
                    extra={"event": "outage_started"})
        self._notify()

    async def admit(self, stop: asyncio.Event) -> Admission:
        """Wait until this worker may send: at once while the service works; during an outage,
        only as the one probe, when the probe is due."""
        while True:
            if stop.is_set():
                return Admission.STOP
            if self._opened_at is None:
                return Admission.GO
            now = self._clock.now()
            if now - self._opened_at >= self.max_wait_s:
                return Admission.GIVE_UP
            if not self._probing and now >= self._probe_at:
                self._probing = True
                return Admission.PROBE
            deadline = self._opened_at + self.max_wait_s
            wait = deadline - now if self._probing else min(self._probe_at, deadline) - now
            changed = self._changed
            await sleep_unless(self._clock, max(0.0, wait), stop, changed)

    def _notify(self) -> None:
        """Wake every waiting worker to look at the new state (a fresh event for the next change)."""
        self._changed.set()
        self._changed = asyncio.Event()
