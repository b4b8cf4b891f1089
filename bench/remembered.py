"""Scenario ``remembered``: the second run of the same job starts at the rate the first one found.

The cold-start job of scenario ``cold`` (600 RPM quota, burst 10, 0.2 s median latency,
concurrency 16) runs three times as one job, as nightly top-ups do: each night 300 new images
are added to its source folder, and each night's emulator is a fresh process (a full bucket).

1. cold, nothing remembered;
2. started from the first run's :attr:`~batch_upscaler.ratelimit.AdaptiveRateLimiter.rate_to_remember`,
   trusted (``StartRate(rpm, trusted=True)``: same job, same region and model, recent);
3. started, untrusted, from the quota itself (600), as if read from Service Quotas' applied quota.

The runner does not pass a start rate yet (where it comes from is wired separately), so the
benchmark patches ``runner.make_limiter`` (``bench.job.limiters``).

Targets for run 2: goodput >= 0.97 of the ceiling, throttled <= 1%, no failed image.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from batch_upscaler.ratelimit import AdaptiveRateLimiter, StartRate
from bench import job
from bench.cold import COLD_EMULATOR
from bench.table import Check, Column, Row, ScenarioResult
from bench.throughput import COLUMNS, CONCURRENCY, QUOTA_RPM, corpus, measure_runner
from bench.workspace import Workspace

IMAGES, SMOKE_IMAGES = 300, 6  # per run
TIME_CAP_S, SMOKE_TIME_CAP_S = 120.0, 15.0
NAME = "remembered"
START = Column("start_rpm", "start RPM", "{:.1f}")
REMEMBERED = Column("remember_rpm", "remembered RPM", "{:.1f}")


def _add_images(pool: Path, sources: Path, first: int, count: int) -> None:
    sources.mkdir(exist_ok=True)
    for path in sorted(pool.glob("*.png"))[first:first + count]:
        shutil.copy2(path, sources / path.name)


def _night(workspace: Workspace, label: str, start: StartRate | None, images: int, cap: float,
           sources: Path, work: Path) -> Row:
    with job.limiters(start) as made:
        row = measure_runner(workspace, label, "auto", images, time_cap_s=cap, emulator_spec=COLD_EMULATOR,
                             inputs=sources, work=work, name=NAME)
    limiter = made[-1]
    assert isinstance(limiter, AdaptiveRateLimiter)
    return row | {"start_rpm": start.rpm if start else None, "remember_rpm": limiter.rate_to_remember,
                  "final_rpm": limiter.rpm, "estimate_rpm": limiter.estimate_rpm}


def run(workspace: Workspace) -> ScenarioResult:
    job.use_dummy_credentials()
    images = SMOKE_IMAGES if workspace.smoke else IMAGES
    cap = SMOKE_TIME_CAP_S if workspace.smoke else TIME_CAP_S
    pool = corpus(workspace, 3 * images)
    work = workspace.fresh(NAME)
    sources = work / "photos"
    rows: list[Row] = []
    _add_images(pool, sources, 0, images)
    rows.append(_night(workspace, f"1. cold, rpm=auto c={CONCURRENCY}", None, images, cap, sources, work))
    _add_images(pool, sources, images, images)
    remembered = StartRate(rows[0]["remember_rpm"], trusted=True)
    rows.append(_night(workspace, "2. remembered rate, trusted", remembered, images, cap, sources, work))
    _add_images(pool, sources, 2 * images, images)
    rows.append(_night(workspace, f"3. applied quota {QUOTA_RPM:g}, untrusted", StartRate(QUOTA_RPM), images, cap,
                       sources, work))
    result = ScenarioResult(NAME, workspace.smoke, (*COLUMNS, START, REMEMBERED), rows)
    result.notes.append("one job, three nights of 300 new images each, a fresh emulator (full bucket) each night")
    second = rows[1]
    result.checks = [
        Check("run 2 goodput/ceiling", second["ratio"], ">= 0.97", second["ratio"] >= 0.97),
        Check("run 2 throttled %", second["throttled_pct"], "<= 1", second["throttled_pct"] <= 1.0),
        Check("failed images", sum(row["failed"] for row in rows), "0", all(row["failed"] == 0 for row in rows)),
    ]
    return result
