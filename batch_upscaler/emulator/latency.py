"""How long the fake model takes to answer: a fixed delay, or a seeded lognormal draw per request."""

from __future__ import annotations

import math
import random

from batch_upscaler.emulator.settings import EmulatorConfig


class LatencyModel:
    """Draws each answer's extra latency in seconds.

    Fixed: ``fixed_s`` every time. Lognormal (when ``median_s`` is set): ``median_s * exp(sigma * z)``
    with ``z ~ N(0, 1)`` from ``random.Random(f"latency-{seed}")``, so equal configs give equal
    sequences (in request-arrival order), independent of the fault and seed draws. The mean of the
    lognormal is ``median_s * exp(sigma**2 / 2)``, a little above the median.
    Not thread-safe: the server draws from its event loop only.
    """

    def __init__(self, fixed_s: float = 0.0, median_s: float | None = None, sigma: float = 0.0,
                 seed: int = 0) -> None:
        self.fixed_s = fixed_s
        self.median_s = median_s
        self.sigma = sigma
        self._rng = random.Random(f"latency-{seed}")

    @classmethod
    def from_config(cls, config: EmulatorConfig) -> LatencyModel:
        return cls(config.latency_s, config.latency_median_s, config.latency_sigma, config.seed)

    def draw(self) -> float:
        """The next request's latency in seconds (always >= 0)."""
        if self.median_s is None:
            return self.fixed_s
        return self.median_s * math.exp(self.sigma * self._rng.gauss(0.0, 1.0))
