"""What a person watching the run sees: a tqdm bar (done/total, rate, ETA, failures, current rate).

Disabled when stderr is not a terminal so cron mail stays clean; log lines are routed through
tqdm while the bar is shown so they do not tear it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType

from tqdm import tqdm

from batch_upscaler.checkpoint import ItemState


class Progress:
    def __init__(self, total: int, enabled: bool | None, current_rpm: Callable[[], float]) -> None:
        show = sys.stderr.isatty() if enabled is None else enabled
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

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._bar.close()
