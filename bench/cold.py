"""Scenario ``cold``: a nightly top-up on ``auto`` with no rate remembered (issue 13).

300 images against an unknown 600 RPM quota (token bucket, burst 10), lognormal latency with a
0.2 s median (sigma 0.3), concurrency 16: the ceiling is min(600, 16 / 0.2 s × 60) = 600 RPM, and
a run this short is mostly the controller finding the quota. The baseline is botocore's own
``adaptive`` retry mode on the same job (``asyncio.gather`` under ``Semaphore(16)``, scenario
``baselines`` (c)), measured in the same run against its own fresh emulator, so the ratio between
the two does not depend on the machine's state that day. The runner told the quota (600) is shown
for reference.

Targets: goodput >= 0.93 of the ceiling, throttled <= 3%, no failed image.
"""

from __future__ import annotations

from dataclasses import replace

from bench import job
from bench.baselines import gather_loop, measure_baseline
from bench.table import Check, Column, Row, ScenarioResult
from bench.throughput import COLUMNS, CONCURRENCY, EMULATOR, QUOTA_RPM, measure_runner
from bench.workspace import Workspace

IMAGES, SMOKE_IMAGES = 300, 6
LATENCY_MEDIAN_S = 0.2
TIME_CAP_S, SMOKE_TIME_CAP_S = 120.0, 15.0
COLD_EMULATOR = replace(EMULATOR, latency_median_s=LATENCY_MEDIAN_S)
BASELINE = f"(c) gather+Semaphore({CONCURRENCY}), botocore adaptive"
VS_BASELINE = Column("vs_baseline", "× baseline", "{:.3f}")


def with_baseline(rows: list[Row], baseline: Row) -> list[Row]:
    """Each row's goodput as a multiple of the baseline's (measured in the same run)."""
    for row in rows:
        row["vs_baseline"] = row["goodput_rpm"] / baseline["goodput_rpm"] if baseline["goodput_rpm"] else None
    return rows


def run(workspace: Workspace) -> ScenarioResult:
    job.use_dummy_credentials()
    images = SMOKE_IMAGES if workspace.smoke else IMAGES
    cap = SMOKE_TIME_CAP_S if workspace.smoke else TIME_CAP_S
    runner = measure_runner(workspace, f"runner rpm=auto c={CONCURRENCY}, cold", "auto", images, time_cap_s=cap,
                            emulator_spec=COLD_EMULATOR)
    baseline = measure_baseline(workspace, BASELINE, images, cap, gather_loop("adaptive"), COLD_EMULATOR)
    known = measure_runner(workspace, f"runner rpm={QUOTA_RPM:g} c={CONCURRENCY} (quota known)", QUOTA_RPM, images,
                           time_cap_s=cap, emulator_spec=COLD_EMULATOR)
    rows = with_baseline([runner, baseline, known], baseline)
    result = ScenarioResult("cold", workspace.smoke, (*COLUMNS, VS_BASELINE), rows)
    result.notes.append(f"emulator: quota {QUOTA_RPM:g} RPM (burst {COLD_EMULATOR.quota_burst}), latency median "
                        f"{LATENCY_MEDIAN_S:g} s; '× baseline' = goodput / botocore adaptive's goodput in this run")
    result.checks = [
        Check("goodput/ceiling", runner["ratio"], ">= 0.93", runner["ratio"] >= 0.93),
        Check("throttled %", runner["throttled_pct"], "<= 3", runner["throttled_pct"] <= 3.0),
        Check("failed images", runner["failed"], "0", runner["failed"] == 0),
        Check("goodput × botocore adaptive", runner["vs_baseline"] or 0.0, "> 1",
              (runner["vs_baseline"] or 0.0) > 1.0),
    ]
    return result
