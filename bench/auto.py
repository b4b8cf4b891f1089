"""Scenario ``auto``: the runner on ``requests_per_minute: auto`` finds an unknown 600 RPM quota.

Target (issue 4, raised by issue 13): goodput >= 0.95 of the ceiling over a run of at least 2
minutes (1,300 images; the ramp-up from the controller's cold start is inside the measured
window), throttled <= 5%.
"""

from __future__ import annotations

from bench.table import Check, ScenarioResult
from bench.throughput import COLUMNS, CONCURRENCY, measure_runner
from bench.workspace import Workspace

IMAGES, SMOKE_IMAGES = 1300, 6
MIN_RUN_S = 120.0


def run(workspace: Workspace) -> ScenarioResult:
    images = SMOKE_IMAGES if workspace.smoke else IMAGES
    row = measure_runner(workspace, f"runner rpm=auto c={CONCURRENCY}", "auto", images, time_cap_s=900)
    result = ScenarioResult("auto", workspace.smoke, COLUMNS, [row])
    result.checks = [
        Check("goodput/ceiling", row["ratio"], ">= 0.95", row["ratio"] >= 0.95),
        Check("throttled %", row["throttled_pct"], "<= 5", row["throttled_pct"] <= 5.0),
        Check("failed images", row["failed"], "0", row["failed"] == 0),
    ]
    if not workspace.smoke:
        result.checks.append(Check("run length s", row["elapsed_s"], f">= {MIN_RUN_S:g}",
                                   row["elapsed_s"] >= MIN_RUN_S))
    return result
