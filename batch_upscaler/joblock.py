"""One run per job at a time: an advisory ``flock`` on ``<state_dir>/<job>.lock``.

The kernel drops the lock when its holder exits, however it exits (kill -9 included), so a lock
left by a dead process never blocks the next run. The holder's PID is written into the file only
to name it in the error message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from batch_upscaler.errors import JobLockedError


class JobLock:
    def __init__(self, path: Path, job: str) -> None:
        self.path = path
        self.job = job
        self._fd: int | None = None

    def __enter__(self) -> JobLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise JobLockedError(f"job {self.job!r} is already running (PID {holder}); lock file {self.path}") from None
        try:  # only to name the holder in another run's message: a full disk must not stop the run here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None
