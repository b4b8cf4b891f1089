"""Scenario ``cost``: client CPU per image and peak RSS at realistic sizes, next to a floor.

Inputs are ~1 MP photo-like JPEGs; the emulator (another process) answers Conservative's ~9.7 MP
PNG with a canned image, small latency and no quota, so the client is the busy side. Two canned
outputs: the upscale of a photo (~8.5 MB; 11.3 MB of JSON) and per-pixel noise (``--canned-noise``,
~29 MB; 39 MB of JSON), the largest a real output gets. Each variant (output, concurrency, and the
answer read streamed or, as before streaming, held whole: ``RunOptions.buffered_responses``) runs
in a fresh child process (``python -m bench cost --concurrency N [--buffered] [--noise]``) because
peak RSS is a high-water mark; the buffered and streamed children of one output alternate, so
both see the same machine state. The child measures the runner's CPU (getrusage user+sys of its
own process, all threads; the end-of-run report, a per-run cost, is measured on its own and taken
out), then the floor on the same files: read the input, base64-encode it, base64-decode the
canned output, write the output file (no fsync); it runs three times and the median counts,
because its system time (page-cache writes) varies from run to run.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pybase64

from batch_upscaler.checkpoint import Checkpoint
from batch_upscaler.manifest import load_settings
from batch_upscaler.report import ReportWriter
from bench import job
from bench.corpus import photo_jpegs
from bench.emulator_process import EmulatorProcess, EmulatorSpec
from bench.resources import cpu_times, emit, in_fresh_process, peak_rss_mb
from bench.table import Check, Column, Row, ScenarioResult
from bench.workspace import Workspace


@dataclass(frozen=True)
class Variant:
    """One measured configuration."""

    output: str  # "photo": the upscale of a photo (~8.5 MB PNG); "noise": per-pixel noise (~29 MB)
    concurrency: int
    buffered: bool  # the answer held whole, as before streaming (the "before" of issue 13)

    @property
    def name(self) -> str:
        return f"{'buffered' if self.buffered else 'streamed'} c={self.concurrency} {self.output}"

    def flags(self) -> list[str]:
        return (["--concurrency", str(self.concurrency)] + (["--buffered"] if self.buffered else [])
                + (["--noise"] if self.output == "noise" else []))


VARIANTS = tuple(Variant(output, concurrency, buffered)
                 for output, concurrency in (("photo", 8), ("photo", 32), ("noise", 32))
                 for buffered in (True, False))
IMAGES, SMOKE_IMAGES = 96, 4
REPEATS = 3  # fresh child processes per variant; the median counts
EMULATORS = {  # no quota, no output cap: ~9.7 MP PNGs
    "photo": EmulatorSpec(latency_s=0.05, canned_output=True),
    "noise": EmulatorSpec(latency_s=0.05, canned_output=True, canned_noise=True),
}
RATIO_TARGET = 1.3
RSS_TARGETS_MB = {"photo": 150.0, "noise": 200.0}  # streamed, at the highest concurrency (issue 13)
UNLIMITED_RPM = 100_000
FLOOR_REPEATS = 3  # the floor's system time (page-cache writes) varies run to run
MIN_FLOOR_USER_S, MAX_FLOOR_PASSES = 0.05, 200  # see measure_floor: tick-granular CPU clocks

COLUMNS = (
    Column("variant", "variant"), Column("images", "images"), Column("failed", "failed"),
    Column("output_mb", "output MB/image", "{:.1f}"), Column("runner_cpu_ms", "runner CPU ms/image", "{:.1f}"),
    Column("report_cpu_s", "report CPU s/run", "{:.2f}"),
    Column("floor_cpu_ms", "floor CPU ms/image", "{:.1f}"), Column("ratio", "runner/floor", "{:.2f}"),
    Column("runner_user_ms", "runner user ms", "{:.1f}"), Column("floor_user_ms", "floor user ms", "{:.1f}"),
    Column("user_ratio", "user runner/floor", "{:.2f}"),
    Column("peak_rss_mb", "peak RSS MB", "{:.0f}"), Column("elapsed_s", "wall s", "{:.1f}"),
)


def run(workspace: Workspace) -> ScenarioResult:
    images = SMOKE_IMAGES if workspace.smoke else IMAGES
    repeats = 1 if workspace.smoke else REPEATS
    inputs = photo_jpegs(workspace.corpus_dir(f"cost-{images}"), images)
    result = ScenarioResult("cost", workspace.smoke, COLUMNS)
    work = workspace.fresh("cost")
    for output, spec in EMULATORS.items():
        variants = [variant for variant in VARIANTS if variant.output == output]
        runs: dict[Variant, list[Row]] = {variant: [] for variant in variants}
        with EmulatorProcess(spec, work / f"requests-{output}.jsonl") as emulator:
            for i in range(repeats):
                for variant in variants:
                    runs[variant].append(_child(variant, emulator.endpoint_url, inputs, work / f"run-{i}"))
        result.rows += [_combine(variant, runs[variant]) for variant in variants]
    shutil.rmtree(work, ignore_errors=True)
    result.checks = [check for row in result.rows for check in _checks(row)]
    result.notes.append(f"median of {repeats} fresh processes per variant (by runner/floor); peak RSS is the "
                        "highest of them; 'user' columns leave out system time, which varies a lot on this VM")
    return result


def _child(variant: Variant, endpoint_url: str, inputs: Path, work: Path) -> Row:
    """One fresh process for ``variant``; its files are deleted after it (a noise child writes ~11 GB
    with the floor), so every child writes into the same kind of freed memory."""
    try:
        return in_fresh_process(["cost", *variant.flags(), "--endpoint", endpoint_url, "--inputs", str(inputs),
                                 "--work", str(work)], timeout_s=1800)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _combine(variant: Variant, runs: list[Row]) -> Row:
    """The median run (by total-CPU ratio), with every run's ratios and the highest peak RSS."""
    ordered = sorted(runs, key=lambda row: float(row["ratio"]))
    row = dict(ordered[len(ordered) // 2])
    row["variant"] = variant.name
    row["output"], row["buffered"] = variant.output, variant.buffered
    row["ratios"] = [round(float(r["ratio"]), 2) for r in runs]
    row["user_ratios"] = [round(float(r["user_ratio"]), 2) for r in runs]
    row["peak_rss_mb"] = max(float(r["peak_rss_mb"]) for r in runs)
    row["peak_rss_runs_mb"] = [round(float(r["peak_rss_mb"])) for r in runs]
    row["failed"] = sum(int(r["failed"]) for r in runs)
    return row


def _checks(row: Row) -> list[Check]:
    """The targets apply to the streamed runner; the buffered rows are the "before" figures."""
    name = row["variant"]
    checks = [Check(f"failed images {name}", row["failed"], "0", row["failed"] == 0)]
    if row["buffered"]:
        return checks
    checks.append(Check(f"runner/floor CPU {name}", row["ratio"], f"<= {RATIO_TARGET}", row["ratio"] <= RATIO_TARGET))
    if row["concurrency"] == max(variant.concurrency for variant in VARIANTS):
        target = RSS_TARGETS_MB[row["output"]]
        checks.append(Check(f"peak RSS MB {name}", row["peak_rss_mb"], f"<= {target:g}", row["peak_rss_mb"] <= target))
    return checks


def add_child_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, help="cost: measure one concurrency in this process")
    parser.add_argument("--buffered", action="store_true", help="cost: hold each answer whole (before streaming)")
    parser.add_argument("--noise", action="store_true", help="cost: per-pixel noise outputs (~29 MB PNGs)")
    parser.add_argument("--endpoint", help="cost: an emulator already running (else one is started)")
    parser.add_argument("--inputs", type=Path, help="cost: folder of input JPEGs")
    parser.add_argument("--work", type=Path, help="cost: work folder (outputs, checkpoint)")
    parser.add_argument("--profile", type=Path, help="cost: write a cProfile summary of the runner here")


def child(args: argparse.Namespace, workspace: Workspace) -> None:
    """One variant, measured in this (fresh) process; emits its table row."""
    variant = Variant("noise" if args.noise else "photo", args.concurrency, args.buffered)
    inputs = args.inputs or photo_jpegs(workspace.corpus_dir(f"cost-{IMAGES}"), IMAGES)
    work = args.work or workspace.fresh(f"cost-c{args.concurrency}")
    if args.endpoint:
        emit(measure(variant, args.endpoint, inputs, work, args.profile))
        return
    with EmulatorProcess(EMULATORS[variant.output], work / "requests.jsonl") as emulator:
        emit(measure(variant, emulator.endpoint_url, inputs, work, args.profile))


def measure(variant: Variant, endpoint_url: str, inputs: Path, work: Path, profile: Path | None) -> Row:
    spec = job.JobSpec(name=f"cost-c{variant.concurrency}", sources=inputs, work_dir=work, endpoint_url=endpoint_url,
                       concurrency=variant.concurrency, requests_per_minute=UNLIMITED_RPM, buffered=variant.buffered)
    profiler = cProfile.Profile() if profile else None
    before = cpu_times()
    if profiler is not None:
        profiler.enable()
    run = job.run(spec)
    if profiler is not None:
        profiler.disable()
    after = cpu_times()
    rss = peak_rss_mb()
    report_cpu = report_cpu_seconds(job.write_manifest(spec))
    if profiler is not None and profile is not None:
        _write_profile(profiler, profile)
    outputs = sorted((work / "out").rglob("*.png"))
    if not outputs:
        raise RuntimeError(f"the runner wrote no output (exit {run.exit_code}, {run.failed} failed)")
    floors = [measure_floor(sorted(inputs.glob("*.jpg")), outputs[0], work / f"floor{i}") for i in range(FLOOR_REPEATS)]
    floor_user, floor_sys = sorted(floors, key=sum)[len(floors) // 2]  # the median repetition
    n = max(1, run.succeeded)
    # The report is a per-run cost (report.html decodes up to 24 outputs for thumbnails), not a
    # per-image one: it is measured on its own and taken out of the per-image figures.
    user = after[0] - before[0] - report_cpu[0]
    system = after[1] - before[1] - report_cpu[1]
    return {"variant": variant.name, "concurrency": variant.concurrency,
            "images": run.succeeded + run.failed + run.pending, "failed": run.failed,
            "succeeded": run.succeeded, "requests": run.requests, "elapsed_s": run.elapsed_s,
            "output_mb": sum(p.stat().st_size for p in outputs) / len(outputs) / 1e6,
            "runner_cpu_ms": 1000 * (user + system) / n, "runner_user_ms": 1000 * user / n,
            "runner_sys_ms": 1000 * system / n, "floor_cpu_ms": 1000 * (floor_user + floor_sys) / n,
            "floor_user_ms": 1000 * floor_user / n, "floor_sys_ms": 1000 * floor_sys / n,
            "floor_runs_ms": [round(1000 * sum(f) / n, 2) for f in floors],
            "ratio": (user + system) / (floor_user + floor_sys), "user_ratio": user / floor_user,
            "report_cpu_s": sum(report_cpu), "peak_rss_mb": rss}


def report_cpu_seconds(manifest: Path) -> tuple[float, float]:
    """(user, system) CPU seconds to write the job's report again, as the run's first report did.

    The run filled the thumbnail cache; emptying it makes this the same (cold) work that is taken
    out of the run's figure.
    """
    settings = load_settings(manifest)
    shutil.rmtree(settings.state_dir / "thumbnails", ignore_errors=True)
    checkpoint = Checkpoint.open(settings.checkpoint_path, settings.name)
    try:
        before = cpu_times()
        ReportWriter(settings, checkpoint).write()
        after = cpu_times()
    finally:
        checkpoint.close()
    return after[0] - before[0], after[1] - before[1]


def measure_floor(inputs: list[Path], canned_output: Path, out_dir: Path) -> tuple[float, float]:
    """(user, system) CPU seconds for the work any client must do per image, on the same files.

    getrusage counts in scheduler ticks on some kernels, so a small corpus (the smoke run's four
    images) can finish inside one tick and read as zero. The pass is repeated until it has used
    ``MIN_FLOOR_USER_S`` of user time and the mean pass is returned; a full-size corpus needs one.
    """
    canned_b64 = pybase64.b64encode(canned_output.read_bytes())  # what the answer carries, made untimed
    user = system = 0.0
    passes = 0
    while user < MIN_FLOOR_USER_S and passes < MAX_FLOOR_PASSES:
        if passes:
            shutil.rmtree(out_dir)  # untimed: only the last pass's files are kept
        out_dir.mkdir(parents=True)  # new files, as the runner's: no page recycled from a deleted one
        pass_user, pass_system = _floor_pass(inputs, canned_b64, out_dir)
        user, system, passes = user + pass_user, system + pass_system, passes + 1
    if user <= 0.0:
        raise RuntimeError(f"the floor used no measurable user CPU in {passes} passes over {len(inputs)} images")
    return user / passes, system / passes


def _floor_pass(inputs: list[Path], canned_b64: bytes, out_dir: Path) -> tuple[float, float]:
    before = cpu_times()
    for path in inputs:
        pybase64.b64encode(path.read_bytes())
        (out_dir / f"{path.stem}.png").write_bytes(pybase64.b64decode(canned_b64))
    after = cpu_times()
    return after[0] - before[0], after[1] - before[1]


def _write_profile(profiler: cProfile.Profile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        stats: Any = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(40)
