"""Stop requests from SIGINT/SIGTERM: the first drains, the second cancels, at any instant of a run.

The handlers are installed by the command line before it does anything else (parsing the
manifest, opening the checkpoint, scanning), so no stage of a run can be killed outright by
SIGTERM or broken by a KeyboardInterrupt in the middle of a state move. A signal only records
the request; each stage looks at it where stopping is safe (between files while scanning, after
every wait in the pool), and while the pool runs the request is handed to its event loop.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # this module is imported before anything else: keep it light
    import asyncio

Handler = Callable[[str], None]
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    def __init__(self) -> None:
        self.count = 0
        self.first: str | None = None  # the name of the signal that asked for the stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: Handler | None = None
        self._cancel: Handler | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.count > 0

    def install(self) -> StopSignals:
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install` (commands other than run)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def request(self, name: str) -> None:
        """Record a stop request as a signal would (also how tests and signal handlers call in)."""
        self.count += 1
        if self.count == 1:
            self.first = name
            self._dispatch(self._drain, name)
        else:
            self._dispatch(self._cancel, name)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request(signal.Signals(signum).name)

    def _dispatch(self, handler: Handler | None, name: str) -> None:
        loop = self._loop
        if handler is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(handler, name)  # wakes the loop even while it waits in select()

    def attach(self, loop: asyncio.AbstractEventLoop, drain: Handler, cancel: Handler) -> None:
        """While the pool runs: requests go to ``drain`` (first) and ``cancel`` (later) on ``loop``.
        A request that came before is handed over at once."""
        self._loop, self._drain, self._cancel = loop, drain, cancel
        if self.first is not None:
            loop.call_soon(drain, self.first)
            if self.count > 1:
                loop.call_soon(cancel, self.first)

    def detach(self) -> None:
        self._loop = self._drain = self._cancel = None
