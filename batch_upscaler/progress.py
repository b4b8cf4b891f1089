"""What a person watching the run sees: a tqdm bar (done/total, rate, ETA, failures, current rate).

Without a terminal (cron, systemd) there is no bar, so mail and journals stay clean; instead one
summary line goes to the log at an interval. Log lines are routed through tqdm while the bar is
shown so they do not tear it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType

from tqdm import tqdm

from batch_upscaler.checkpoint import ItemState

log = logging.getLogger(__name__)


def human_duration(seconds: float) -> str:
    """A duration people read at a glance: seconds under a minute, minutes under two hours, hours
    under two days, then days."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.1f} min"
    return f"{minutes / 60:.1f} h" if minutes < 2880 else f"{minutes / 1440:.1f} d"


class Progress:
    def __init__(self, total: int, enabled: bool | None, current_rpm: Callable[[], float]) -> None:
        show = sys.stderr.isatty() if enabled is None else enabled
        self.shown = show
        self.total = total
        self._started = time.monotonic()
        self._bar = tqdm(total=total, unit="img", disable=not show, file=sys.stderr,
                         dynamic_ncols=True, smoothing=0.1, desc="upscaling")
        self._current_rpm = current_rpm
        self.failed = 0
        self.succeeded = 0

    def item_done(self, state: ItemState) -> None:
        if state is ItemState.FAILED:
            self.failed += 1
        elif state is ItemState.SUCCEEDED:
            self.succeeded += 1
        self._bar.set_postfix(failed=self.failed, rpm=f"{self._current_rpm():.0f}", refresh=False)
        self._bar.update(1)

    def summary(self) -> str:
        """One line: done/total, outcome counts, throughput, ETA and the current request rate."""
        done = self.succeeded + self.failed
        minutes = max(1e-9, (time.monotonic() - self._started) / 60)
        per_min = done / minutes
        eta = human_duration((self.total - done) / per_min * 60) if per_min > 0 and done < self.total else "-"
        return (f"progress: {done}/{self.total} done ({self.succeeded} succeeded, {self.failed} failed), "
                f"{per_min:.1f} img/min, ETA {eta}, rate {self._current_rpm():.0f}/min")

    async def heartbeat(self, interval_s: float) -> None:
        """Log :meth:`summary` every ``interval_s`` while no bar is shown (runs until cancelled)."""
        if self.shown or interval_s <= 0:
            return
        while True:
            await asyncio.sleep(interval_s)
            log.info("%s", self.summary(), extra={"event": "progress"})

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._bar.close()
