"""A local server a benchmark runs as a child process, which announces its URL on its first stdout line.

The emulator (:mod:`bench.emulator_process`) and moto's S3 (:mod:`bench.s3_process`) both work this
way: the child binds 127.0.0.1 on an ephemeral port, prints ``<announce><url>`` and serves until
SIGTERM, logging each request to a JSON-lines file (the benchmark's bill). This class owns the
child's life: start, read the announcement within a bounded wait, stop (terminate, then kill).
Running servers in their own process keeps their CPU and memory out of the measured runner's.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
REPO = Path(__file__).resolve().parents[1]


class ChildServer:
    """``with Subclass(...) as server:`` -- ``server.endpoint_url`` is live inside.

    Subclasses say what to run (:meth:`arguments`), how the child announces itself (``announce``),
    and whether an earlier log is kept (``keep_log``: a restart on a fixed port appends to one bill).
    """

    announce = ""
    label = "server"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path.resolve()  # the child runs in the repository folder
        self.endpoint_url = ""
        self._process: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None

    def arguments(self) -> list[str]:
        """The child's command line after the Python interpreter."""
        raise NotImplementedError

    def keep_log(self) -> bool:
        return False

    def __enter__(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.keep_log():
            self.log_path.unlink(missing_ok=True)
        self._stderr = self.log_path.with_suffix(".stderr").open("w", encoding="utf-8")
        self._process = subprocess.Popen([sys.executable, *self.arguments()], stdout=subprocess.PIPE,
                                         stderr=self._stderr, text=True, cwd=REPO,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            self.endpoint_url = self._read_announcement(self._process)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        if process is not None and process.stdout is not None:
            process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _read_announcement(self, process: subprocess.Popen[str]) -> str:
        """The URL from the child's first stdout line, within a bounded wait; only 127.0.0.1 is accepted."""
        assert process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.2)
            if ready:
                line = process.stdout.readline()
                if not line.startswith(self.announce):
                    raise RuntimeError(f"{self.label} did not announce its port (exit {process.poll()}): {line!r}")
                url = line[len(self.announce):].strip()
                if not url.startswith("http://127.0.0.1:"):
                    raise RuntimeError(f"{self.label} listens on {url}, not on 127.0.0.1")
                return url
            if process.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {process.returncode} before announcing its port")
        raise RuntimeError(f"{self.label} did not announce its port within {START_TIMEOUT_S:.0f} s")
