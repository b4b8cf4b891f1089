"""Runs the Bedrock emulator in a separate process (``python -m batch_upscaler.emulator``) for a benchmark.

The emulator binds 127.0.0.1 on an ephemeral port and announces it on its first stdout line;
its request log (JSON lines) is the benchmark's ground truth for requests, throttles and goodput.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from batch_upscaler.emulator import RequestLog, RequestRecord
from bench.child_server import ChildServer


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


class EmulatorProcess(ChildServer):
    """``with EmulatorProcess(spec, log_path) as emulator:`` -- ``emulator.endpoint_url`` is live inside."""

    announce = "emulator listening on "
    label = "emulator"

    def __init__(self, spec: EmulatorSpec, log_path: Path) -> None:
        super().__init__(log_path)
        self.spec = spec

    def arguments(self) -> list[str]:
        return ["-m", "batch_upscaler.emulator", "--port", str(self.spec.port), "--log", str(self.log_path),
                *self.spec.argv()]

    def keep_log(self) -> bool:
        return bool(self.spec.port)  # a restart on a fixed port keeps appending to the same bill

    def records(self) -> list[RequestRecord]:
        """Every request the emulator has logged so far (it flushes each line as it answers)."""
        return RequestLog.read_file(self.log_path) if self.log_path.exists() else []

