"""The spend cap: an estimate of what this run has spent, and whether one more request fits the cap.

Each attempt that may reach the model reserves one image's price *before* it is sent, so
concurrent workers can never overshoot the cap together; a throttled attempt (429: it never
reached the model) gives its reservation back. Prices are the catalogue's estimates (config/).
"""

from __future__ import annotations


class Budget:
    def __init__(self, price_usd: float, cap_usd: float | None) -> None:
        self.price_usd = price_usd
        self.cap_usd = cap_usd
        self.spent_usd = 0.0

    def reserve(self) -> bool:
        """Reserve one request's price; False when it would pass the cap (nothing is reserved)."""
        # Round to cents: $0.40 x 5 must fit a $2.00 cap despite binary floating point.
        if self.cap_usd is not None and round(self.spent_usd + self.price_usd, 6) > round(self.cap_usd, 6):
            return False
        self.spent_usd += self.price_usd
        return True

    def refund(self) -> None:
        """The reserved request was throttled, so it was not billed."""
        self.spent_usd = max(0.0, self.spent_usd - self.price_usd)
