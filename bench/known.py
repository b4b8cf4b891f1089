"""Scenario ``known``: the runner told the real quota (600 RPM) reaches it without wasting requests.

Target (issue 4): goodput >= 0.97 of the ceiling, throttled answers <= 1% of requests, no failed
image. 700 images at 600 RPM give about 70 s of steady state.
"""

from __future__ import annotations

from bench.table import Check, ScenarioResult
from bench.throughput import COLUMNS, CONCURRENCY, QUOTA_RPM, measure_runner
from bench.workspace import Workspace

IMAGES, SMOKE_IMAGES = 700, 20


def run(workspace: Workspace) -> ScenarioResult:
    images = SMOKE_IMAGES if workspace.smoke else IMAGES
    row = measure_runner(workspace, f"runner rpm={QUOTA_RPM:g} c={CONCURRENCY}", QUOTA_RPM, images,
                         time_cap_s=600)
    result = ScenarioResult("known", workspace.smoke, COLUMNS, [row])
    result.checks = [
        Check("goodput/ceiling", row["ratio"], ">= 0.97", row["ratio"] >= 0.97),
        Check("throttled %", row["throttled_pct"], "<= 1", row["throttled_pct"] <= 1.0),
        Check("failed images", row["failed"], "0", row["failed"] == 0),
    ]
    return result
