"""Ways to run the emulator: inside a running event loop, in a background thread, or as a CLI process."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from aiohttp import web

from batch_upscaler.emulator.requestlog import RequestLog, RequestRecord
from batch_upscaler.emulator.server import create_app
from batch_upscaler.emulator.settings import EmulatorConfig

# In-flight requests (a SLOW fault stalls 30 s) get this long to finish when the server stops.
SHUTDOWN_TIMEOUT_S = 1.0
_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RunningEmulator:
    """A listening emulator: where to send requests and what it has recorded."""

    endpoint_url: str
    port: int
    log: RequestLog
    config: EmulatorConfig


@asynccontextmanager
async def serve(config: EmulatorConfig | None = None, log: RequestLog | None = None,
                clock: Callable[[], float] = time.monotonic) -> AsyncIterator[RunningEmulator]:
    """Serve on the current event loop until the ``async with`` block ends (see create_app for clock)."""
    config = config or EmulatorConfig()
    log = log or RequestLog(config.request_log_path)
    # handler_cancellation: a client that gives up (read timeout on a SLOW fault) cancels its
    # handler, which is then recorded as 499, instead of leaving it running past shutdown.
    runner = web.AppRunner(create_app(config, log, clock), access_log=None, handle_signals=False,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        # port 0 means "any free port": the real one is only known from the bound socket.
        host, port = runner.addresses[0][:2]
        yield RunningEmulator(f"http://{host}:{port}", port, log, config)
    finally:
        await runner.cleanup()


class EmulatorThread:
    """Runs :func:`serve` on its own event loop in a daemon thread, for synchronous callers::

        with EmulatorThread(EmulatorConfig()) as emulator:
            boto3.client("bedrock-runtime", endpoint_url=emulator.endpoint_url, ...)
    """

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self._config = config or EmulatorConfig()
        self._log = RequestLog(self._config.request_log_path)
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._running: RunningEmulator | None = None
        self._error: Exception | None = None

    @property
    def endpoint_url(self) -> str:
        if self._running is None:
            raise RuntimeError("the emulator is not running")
        return self._running.endpoint_url

    @property
    def log(self) -> RequestLog:
        return self._log

    def records(self) -> list[RequestRecord]:
        return self._log.records()

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="bedrock-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise RuntimeError("the emulator thread did not start in time")
        if self._running is None:
            raise RuntimeError("the emulator failed to start") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except (OSError, RuntimeError, ValueError) as exc:  # e.g. port in use: start() re-raises it
            self._error = exc
        finally:
            # Also on unexpected errors (which the thread's excepthook prints): start() must not hang.
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._config, self._log) as running:
            self._running = running
            self._ready.set()
            await self._stop.wait()


def run_forever(config: EmulatorConfig | None = None) -> None:
    """Serve until SIGINT or SIGTERM; announce the URL as one flushed stdout line first."""
    asyncio.run(_serve_until_signalled(config or EmulatorConfig()))


async def _serve_until_signalled(config: EmulatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with serve(config) as running:
            print(f"emulator listening on {running.endpoint_url}", flush=True)
            await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    sys.stdout.flush()
