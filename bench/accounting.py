"""Turns an emulator request log into throughput figures: requests, throttles, goodput, first request."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from batch_upscaler.emulator import RequestRecord

THROTTLED_STATUS = 429


@dataclass(frozen=True)
class Traffic:
    """What the emulator saw. ``goodput_rpm`` counts successful answers per minute between the first
    and the last successful answer (the steady state: start-up and the tail are outside it)."""

    requests: int
    successes: int
    throttled: int
    other_errors: int
    goodput_rpm: float
    window_s: float
    first_received_at: float | None

    @property
    def throttled_pct(self) -> float:
        return 100.0 * self.throttled / self.requests if self.requests else 0.0


def summarize(records: Iterable[RequestRecord], since: float | None = None) -> Traffic:
    """Figures over ``records`` (those received at or after ``since``, a time.time(), when given)."""
    chosen = [r for r in records if since is None or _received(r) >= since]
    ok_times = sorted(r.at for r in chosen if r.status == 200)
    throttled = sum(1 for r in chosen if r.status == THROTTLED_STATUS)
    window = ok_times[-1] - ok_times[0] if len(ok_times) >= 2 else 0.0
    goodput = (len(ok_times) - 1) / window * 60.0 if window > 0 else 0.0
    first = min((_received(r) for r in chosen), default=None)
    return Traffic(requests=len(chosen), successes=len(ok_times), throttled=throttled,
                   other_errors=len(chosen) - len(ok_times) - throttled, goodput_rpm=goodput,
                   window_s=window, first_received_at=first)


def _received(record: RequestRecord) -> float:
    # Older logs have no received_at: the answer time minus the time spent answering.
    return record.received_at if record.received_at is not None else record.at - record.duration_s


def ceiling_rpm(quota_rpm: float | None, concurrency: int, median_latency_s: float) -> float:
    """The best possible goodput: min(quota, concurrency / latency), in requests per minute."""
    by_concurrency = concurrency / median_latency_s * 60.0
    return by_concurrency if quota_rpm is None else min(quota_rpm, by_concurrency)
