"""Runs the Bedrock emulator in a separate process (``python -m batch_upscaler.emulator``) for a benchmark.

The emulator binds 127.0.0.1 on an ephemeral port and announces it on its first stdout line;
its request log (JSON lines) is the benchmark's ground truth for requests, throttles and goodput.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from batch_upscaler.emulator import RequestLog, RequestRecord

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
_ANNOUNCE = "emulator listening on "


@dataclass(frozen=True)
class EmulatorSpec:
    """The emulator's knobs a benchmark sets (see ``python -m batch_upscaler.emulator --help``)."""

    quota_rpm: float | None = None
    quota_burst: int = 1
    latency_s: float = 0.0
    latency_median_s: float | None = None
    latency_sigma: float = 0.0
    canned_output: bool = True
    canned_noise: bool = False  # the canned output is per-pixel noise (~29 MB at 9.7 MP)
    output_max_pixels: int | None = None
    seed: int = 0
    port: int = 0  # 0: any free port; a fixed one restarts an emulator where a run expects it
    extra: tuple[str, ...] = ()  # any other flags of ``batch-upscaler emulator`` (faults, windows, ...)

    def argv(self) -> list[str]:
        args = ["--quota-burst", str(self.quota_burst), "--latency-sigma", str(self.latency_sigma),
                "--seed", str(self.seed), "--latency", str(self.latency_s)]
        optional = {"--quota-rpm": self.quota_rpm, "--latency-median": self.latency_median_s,
                    "--output-max-pixels": self.output_max_pixels}
        for flag, value in optional.items():
            if value is not None:
                args += [flag, str(value)]
        canned = (["--canned-output"] if self.canned_output else []) + (["--canned-noise"] if self.canned_noise else [])
        return args + canned + list(self.extra)


class EmulatorProcess:
    """``with EmulatorProcess(spec, log_path) as emulator:`` -- ``emulator.endpoint_url`` is live inside."""

    def __init__(self, spec: EmulatorSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self.endpoint_url = ""
        self._process: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None

    def __enter__(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.spec.port:  # a restart on a fixed port keeps appending to the same bill
            self.log_path.unlink(missing_ok=True)
        self._stderr = self.log_path.with_suffix(".stderr").open("w", encoding="utf-8")
        command = [sys.executable, "-m", "batch_upscaler.emulator", "--port", str(self.spec.port),
                   "--log", str(self.log_path), *self.spec.argv()]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            self.endpoint_url = _read_announcement(self._process)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(_STOP_TIMEOUT_S)
        if process is not None and process.stdout is not None:
            process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def records(self) -> list[RequestRecord]:
        """Every request the emulator has logged so far (it flushes each line as it answers)."""
        return RequestLog.read_file(self.log_path) if self.log_path.exists() else []


def _read_announcement(process: subprocess.Popen[str]) -> str:
    """The endpoint URL from the emulator's first stdout line, within a bounded wait."""
    assert process.stdout is not None
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            line = process.stdout.readline()
            if not line.startswith(_ANNOUNCE):
                raise RuntimeError(f"emulator did not announce its port (exit {process.poll()}): {line!r}")
            url = line[len(_ANNOUNCE):].strip()
            if not url.startswith("http://127.0.0.1:"):
                raise RuntimeError(f"emulator listens on {url}, not on 127.0.0.1")
            return url
        if process.poll() is not None:
            raise RuntimeError(f"emulator exited with {process.returncode} before announcing its port")
    raise RuntimeError(f"emulator did not announce its port within {_START_TIMEOUT_S:.0f} s")
