"""Prometheus metrics for node_exporter's textfile collector, written from the checkpoint.

The file is produced by the official ``prometheus_client`` (its exposition format and float
formatting, so timestamps and large counters keep every digit) and rewritten atomically with its
``write_to_textfile`` (temporary file + rename, as the collector requires) during the run and at
its end. All values are job totals from the checkpoint, so they survive restarts and never go
backwards between runs of the same job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batch_upscaler.checkpoint import Checkpoint

FILE_MODE = 0o644  # the collector runs as another user
# counter exposed as -> (HELP text, the checkpoint total it reports)
_COUNTERS = {
    "batch_upscaler_requests_total": ("InvokeModel attempts sent, all runs of the job.", "attempts"),
    "batch_upscaler_throttles_total": ("Attempts answered with a throttling error.", "throttles"),
    "batch_upscaler_retries_total": ("Attempts after an image's first one.", "retries"),
    "batch_upscaler_requests_saved_total": ("Outputs copied from identical content instead of a request.",
                                            "deduplicated"),
}
_COST = ("batch_upscaler_estimated_cost_usd", "Estimated spend (attempts that may be billed x price).")
_LAST_SUCCESS = ("batch_upscaler_last_success_timestamp_seconds", "Unix time of the last image that succeeded.")


class JobCollector(Collector):
    """One job's metrics, read from its checkpoint each time they are collected."""

    def __init__(self, job: str, checkpoint: Checkpoint, price_usd: float) -> None:
        self.job = job
        self.checkpoint = checkpoint
        self.price_usd = price_usd

    def collect(self) -> Iterator[Metric]:
        totals = self.checkpoint.totals()
        images = GaugeMetricFamily("batch_upscaler_images", "Images of the job by state.", labels=["job", "state"])
        for state, n in self.checkpoint.counts().items():
            images.add_metric([self.job, state.value], n)
        yield images
        for name, (text, total) in _COUNTERS.items():
            # CounterMetricFamily drops a trailing _total from the family name and adds it back on the sample
            counter = CounterMetricFamily(name, text, labels=["job"])
            counter.add_metric([self.job], totals[total])
            yield counter
        cost = round((totals["attempts"] - totals["throttles"]) * self.price_usd, 4)
        for (name, text), value in ((_COST, cost), (_LAST_SUCCESS, totals["last_success"])):
            gauge = GaugeMetricFamily(name, text, labels=["job"])
            gauge.add_metric([self.job], value)
            yield gauge


def _registry(job: str, checkpoint: Checkpoint, price_usd: float) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(job, checkpoint, price_usd))
    return registry


def render_metrics(job: str, checkpoint: Checkpoint, price_usd: float) -> str:
    """The text exposition format of the job's metrics."""
    return generate_latest(_registry(job, checkpoint, price_usd)).decode("utf-8")


def write_metrics(path: Path, job: str, checkpoint: Checkpoint, price_usd: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), _registry(job, checkpoint, price_usd))
    # write_to_textfile creates its temporary file with the process umask; the collector needs to read it
    if path.stat().st_mode & 0o777 != FILE_MODE:
        os.chmod(path, FILE_MODE)
