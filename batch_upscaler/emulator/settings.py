"""The emulator's configuration: one frozen value that says how it listens, fails and answers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from batch_upscaler.catalogue import BUILTIN, ModelName, ModelSpec
from batch_upscaler.emulator.faults import FaultKind

_MAX_SIGMA = 5.0  # exp(5 * 4) ~ 5e8: beyond this a "latency distribution" is only outliers


def _builtin_catalogue() -> Mapping[ModelName, ModelSpec]:
    return BUILTIN


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulator behaves. Every field has a default that gives a well-behaved fake Bedrock.

    ``faults_by_image`` keys are sha256 hex of the decoded image bytes (see ``faults.image_key``);
    the n-th request carrying that image gets the n-th fault. ``fault_rates`` are independent
    per-request probabilities drawn from ``random.Random(seed)``. Fault names may be given as
    strings (e.g. from a JSON file); they are turned into :class:`FaultKind` here.

    Latency is either fixed (``latency_s``) or lognormal (``latency_median_s`` with spread
    ``latency_sigma``: ``median * exp(sigma * N(0, 1))``, drawn from a stream seeded by ``seed``);
    the two are exclusive. ``canned_output`` is for benchmarks only: the upscaled image is computed
    once per (output size, output format) and reused for every request asking for that size and
    format, so its content does not depend on the input (see ``upscale.CannedOutputs``).
    """

    host: str = "127.0.0.1"
    port: int = 0  # 0 = ephemeral; read the real one back from the running server
    latency_s: float = 0.0  # added to every answer the "model" produces
    latency_median_s: float | None = None  # set: lognormal latency with this median instead
    latency_sigma: float = 0.0  # spread of the lognormal (sigma of the underlying normal)
    canned_output: bool = False  # benchmarks: one output per (size, format), whatever the input
    canned_noise: bool = False  # benchmarks: the canned output is per-pixel noise (~29 MB as a 9.7 MP PNG)
    quota_rpm: float | None = None  # None = unlimited
    quota_burst: int = 1
    output_max_pixels: int | None = None  # cap keeping aspect; None = the catalogue's size
    png_compress_level: int = 1
    faults_by_image: Mapping[str, tuple[FaultKind, ...]] = field(default_factory=dict)
    fault_rates: Mapping[FaultKind, float] = field(default_factory=dict)
    fault_window: tuple[float, float] | None = None  # fault_rates apply only this many seconds after start
    retry_after_s: float | None = None  # throttling answers carry a Retry-After header of this many seconds
    seed: int = 0
    slow_s: float = 30.0
    request_log_path: Path | None = None
    deny_access: bool = False
    quotas_denied: bool = False  # Service Quotas calls answer AccessDeniedException (servicequotas.py)
    catalogue: Mapping[ModelName, ModelSpec] = field(default_factory=_builtin_catalogue)

    def __post_init__(self) -> None:
        scripts = {str(key).lower(): tuple(FaultKind(k) for k in kinds)
                   for key, kinds in self.faults_by_image.items()}
        rates = {FaultKind(kind): float(rate) for kind, rate in self.fault_rates.items()}
        # Read-only views: the config is shared between threads and must not change under them.
        object.__setattr__(self, "faults_by_image", MappingProxyType(scripts))
        object.__setattr__(self, "fault_rates", MappingProxyType(rates))
        if self.request_log_path is not None:
            object.__setattr__(self, "request_log_path", Path(self.request_log_path))
        problems = _problems(self)
        if problems:
            raise ValueError("invalid EmulatorConfig: " + "; ".join(problems))


def _problems(config: EmulatorConfig) -> list[str]:
    checks = [
        (0 <= config.port <= 65535, f"port {config.port} not in 0..65535"),
        (math.isfinite(config.latency_s) and config.latency_s >= 0,
         f"latency_s {config.latency_s} must be finite and >= 0"),
        (config.latency_median_s is None or (math.isfinite(config.latency_median_s) and config.latency_median_s > 0),
         f"latency_median_s {config.latency_median_s} must be > 0"),
        (math.isfinite(config.latency_sigma) and 0 <= config.latency_sigma <= _MAX_SIGMA,
         f"latency_sigma {config.latency_sigma} not in 0..{_MAX_SIGMA}"),
        (config.latency_sigma == 0 or config.latency_median_s is not None,
         "latency_sigma needs latency_median_s"),
        (config.latency_median_s is None or config.latency_s == 0,
         "latency_s and latency_median_s are exclusive"),
        (config.slow_s >= 0, f"slow_s {config.slow_s} < 0"),
        (config.quota_rpm is None or config.quota_rpm > 0, f"quota_rpm {config.quota_rpm} must be > 0"),
        (config.quota_burst >= 1, f"quota_burst {config.quota_burst} < 1"),
        (config.output_max_pixels is None or config.output_max_pixels >= 1,
         f"output_max_pixels {config.output_max_pixels} < 1"),
        (0 <= config.png_compress_level <= 9, f"png_compress_level {config.png_compress_level} not in 0..9"),
        (FaultKind.NONE not in config.fault_rates, "fault_rates cannot give a rate for NONE"),
        (config.canned_output or not config.canned_noise, "canned_noise needs canned_output"),
        (config.fault_window is None or 0 <= config.fault_window[0] <= config.fault_window[1],
         f"fault_window {config.fault_window} must be 0 <= start <= end"),
        (config.retry_after_s is None or config.retry_after_s >= 0, f"retry_after_s {config.retry_after_s} < 0"),
    ]
    problems = [message for ok, message in checks if not ok]
    problems += [f"fault_rates[{kind}] = {rate} not in 0..1"
                 for kind, rate in config.fault_rates.items() if not 0.0 <= rate <= 1.0]
    return problems
