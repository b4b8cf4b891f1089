"""Scenario ``remembered``: runs start at the rate earlier runs found (issue 13), through the real
runner: nothing is patched, the start comes from the checkpoint, ``<state>/rates.json`` or the
emulator's Service Quotas answer.

The cold-start job of scenario ``cold`` (600 RPM quota, burst 10, 0.2 s median latency,
concurrency 16), as nightly top-ups: each night 300 new images, and a fresh emulator process (a
full bucket).

1. job A, night 1: cold (nothing remembered, Service Quotas not asked);
2. job A, night 2: starts at the rate night 1 left in its checkpoint (trusted: measured, recent);
3. job B, another folder in the same state folder: starts at job A's rate (rates.json, trusted);
4. job C in a fresh state folder: starts at the applied quota read from Service Quotas (a guess,
   checked by the controller).

Targets for nights 2 and 3: goodput >= 0.97 of the ceiling, throttled <= 1%; no failed image.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from batch_upscaler.ratelimit import AdaptiveRateLimiter
from bench import job
from bench.cold import COLD_EMULATOR
from bench.table import Check, Column, Row, ScenarioResult
from bench.throughput import COLD, COLUMNS, CONCURRENCY, corpus, measure_runner
from bench.workspace import Workspace

IMAGES, SMOKE_IMAGES = 300, 6  # per run
TIME_CAP_S, SMOKE_TIME_CAP_S = 120.0, 15.0
NAME = "remembered"
START = Column("start_rpm", "start RPM", "{:.1f}")
TRUSTED = Column("trusted", "trusted", "{}")
REMEMBERED = Column("remember_rpm", "remembered RPM", "{:.1f}")
QUOTA_LOOKUP = (("quota_lookup", True),)


def _add_images(pool: Path, sources: Path, first: int, count: int) -> None:
    sources.mkdir(exist_ok=True)
    for path in sorted(pool.glob("*.png"))[first:first + count]:
        shutil.copy2(path, sources / path.name)


def _night(workspace: Workspace, label: str, name: str, sources: Path, work: Path, state: Path,
           limits: tuple[tuple[str, object], ...], images: int, cap: float) -> Row:
    with job.limiters() as made:
        row = measure_runner(workspace, label, "auto", images, time_cap_s=cap, emulator_spec=COLD_EMULATOR,
                             inputs=sources, work=work, name=name, limits=limits, state_dir=state)
    limiter, start = made[-1]
    assert isinstance(limiter, AdaptiveRateLimiter)
    return row | {"start_rpm": start.rpm if start else None, "trusted": bool(start and start.trusted),
                  "remember_rpm": limiter.rate_to_remember, "final_rpm": limiter.rpm,
                  "estimate_rpm": limiter.estimate_rpm}


def run(workspace: Workspace) -> ScenarioResult:
    job.use_dummy_credentials()
    images = SMOKE_IMAGES if workspace.smoke else IMAGES
    cap = SMOKE_TIME_CAP_S if workspace.smoke else TIME_CAP_S
    pool = corpus(workspace, 4 * images)
    work = workspace.fresh(NAME)
    state = work / "state"  # jobs A and B share it; each job has its own folder (outputs, log)
    a, b, c = work / "photos-a", work / "photos-b", work / "photos-c"
    work_a, work_b, work_c = work / "job-a", work / "job-b", work / "job-c"
    rows: list[Row] = []
    _add_images(pool, a, 0, images)
    rows.append(_night(workspace, f"1. job A cold, rpm=auto c={CONCURRENCY}", "job-a", a, work_a, state, COLD,
                       images, cap))
    _add_images(pool, a, images, images)
    rows.append(_night(workspace, "2. job A night 2 (its checkpoint)", "job-a", a, work_a, state, COLD, images, cap))
    _add_images(pool, b, 2 * images, images)
    rows.append(_night(workspace, "3. job B, same state folder (rates.json)", "job-b", b, work_b, state, COLD,
                       images, cap))
    _add_images(pool, c, 3 * images, images)
    rows.append(_night(workspace, "4. job C, fresh state (Service Quotas)", "job-c", c, work_c, work_c / "state",
                       QUOTA_LOOKUP, images, cap))
    result = ScenarioResult(NAME, workspace.smoke, (*COLUMNS, START, TRUSTED, REMEMBERED), rows)
    result.notes.append("300 new images per run, a fresh emulator (full bucket) per run; the start rate comes "
                        "from the runner itself (checkpoint, rates.json, Service Quotas)")
    result.checks = [Check("failed images", sum(row["failed"] for row in rows), "0",
                           all(row["failed"] == 0 for row in rows))]
    for n in (1, 2):
        row = rows[n]
        result.checks += [
            Check(f"run {n + 1} started trusted from a remembered rate", row["start_rpm"], "trusted",
                  bool(row["trusted"])),
            Check(f"run {n + 1} goodput/ceiling", row["ratio"], ">= 0.97", row["ratio"] >= 0.97),
            Check(f"run {n + 1} throttled %", row["throttled_pct"], "<= 1", row["throttled_pct"] <= 1.0),
        ]
    return result
