"""The throughput set-up shared by ``known``, ``auto`` and ``baselines``: one emulator, one row shape.

Emulator: a 600 RPM token-bucket quota (burst 10), lognormal latency (median 0.5 s, sigma 0.3),
canned Conservative outputs capped at 256x256 so the server's CPU stays out of the figures.
Every variant gets a fresh emulator process with these settings, and its figures come from that
emulator's request log: requests, throttled answers (429) and goodput between the first and the
last successful answer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench import job
from bench.accounting import Traffic, ceiling_rpm, summarize
from bench.corpus import distinct_pngs
from bench.emulator_process import EmulatorProcess, EmulatorSpec
from bench.table import Column, Row
from bench.workspace import Workspace

QUOTA_RPM = 600.0
QUOTA_BURST = 10
LATENCY_MEDIAN_S = 0.5
LATENCY_SIGMA = 0.3
CONCURRENCY = 16
OUTPUT_MAX_PIXELS = 256 * 256
INPUT_SIDE = 64  # the Conservative minimum: the smallest valid request

EMULATOR = EmulatorSpec(quota_rpm=QUOTA_RPM, quota_burst=QUOTA_BURST, latency_median_s=LATENCY_MEDIAN_S,
                        latency_sigma=LATENCY_SIGMA, canned_output=True, output_max_pixels=OUTPUT_MAX_PIXELS)
CEILING_RPM = ceiling_rpm(QUOTA_RPM, CONCURRENCY, LATENCY_MEDIAN_S)

COLUMNS = (
    Column("variant", "variant"), Column("images", "images"), Column("succeeded", "ok"),
    Column("failed", "failed"), Column("not_done", "not done"), Column("requests", "requests"),
    Column("throttled", "throttled"), Column("throttled_pct", "throttled %", "{:.2f}"),
    Column("elapsed_s", "elapsed s", "{:.1f}"), Column("goodput_rpm", "goodput RPM", "{:.1f}"),
    Column("ceiling_rpm", "ceiling RPM", "{:.0f}"), Column("ratio", "goodput/ceiling", "{:.3f}"),
)


def slug(variant: str) -> str:
    """A file- and job-name-safe form of a variant's label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", variant).strip("-")[:64]


def corpus(workspace: Workspace, images: int) -> Path:
    return distinct_pngs(workspace.corpus_dir(f"throughput-{images}"), images, INPUT_SIDE)


def emulator_ceiling(emulator: EmulatorSpec, concurrency: int = CONCURRENCY) -> float:
    """min(quota, concurrency / median latency) for an emulator set-up, in requests per minute."""
    latency = emulator.latency_median_s if emulator.latency_median_s is not None else emulator.latency_s
    return ceiling_rpm(emulator.quota_rpm, concurrency, latency)


def traffic_row(variant: str, images: int, traffic: Traffic, elapsed_s: float, failed: int,
                ceiling: float = CEILING_RPM) -> Row:
    return {"variant": variant, "images": images, "succeeded": traffic.successes, "failed": failed,
            "not_done": images - traffic.successes - failed, "requests": traffic.requests,
            "throttled": traffic.throttled, "throttled_pct": traffic.throttled_pct, "elapsed_s": elapsed_s,
            "goodput_rpm": traffic.goodput_rpm, "ceiling_rpm": ceiling,
            "ratio": traffic.goodput_rpm / ceiling, "window_s": traffic.window_s}


COLD: tuple[tuple[str, Any], ...] = (("quota_lookup", False),)


def measure_runner(workspace: Workspace, variant: str, rpm: float | str, images: int,
                   time_cap_s: float | None = None, emulator_spec: EmulatorSpec = EMULATOR,
                   inputs: Path | None = None, work: Path | None = None, name: str | None = None,
                   limits: tuple[tuple[str, Any], ...] = COLD, state_dir: Path | None = None) -> Row:
    """The real runner (in this process) on ``images`` distinct inputs against a fresh emulator.

    ``inputs``, ``work`` and ``name`` default to a cached corpus, a fresh work folder and the
    variant's slug; passing the same ``work`` and ``name`` again runs the same job again (its
    checkpoint, outputs and emulator log in that folder), which is how a nightly top-up looks.
    ``limits`` adds manifest limits; the default keeps ``auto`` cold (no Service Quotas lookup, and a
    fresh work folder remembers no rate).
    """
    inputs = corpus(workspace, images) if inputs is None else inputs
    name = slug(variant) if name is None else name
    work = workspace.fresh(name) if work is None else work
    log = work / f"requests-{slug(variant)}.jsonl"
    with EmulatorProcess(emulator_spec, log) as emulator:
        spec = job.JobSpec(name=name, sources=inputs, work_dir=work,
                           endpoint_url=emulator.endpoint_url, concurrency=CONCURRENCY, requests_per_minute=rpm,
                           limits=limits, state_dir=state_dir)
        run = job.run(spec, max_duration_s=time_cap_s)
        traffic = summarize(emulator.records())
    row = traffic_row(variant, images, traffic, run.elapsed_s, run.failed, emulator_ceiling(emulator_spec))
    row |= {"runner_requests": run.requests, "runner_throttles": run.throttles, "exit_code": run.exit_code}
    return row
