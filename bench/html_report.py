"""``python -m bench.html_report``: a 10,000-item report.html: its size, its load time in Chromium, a screenshot.

A job's checkpoint is built directly through the Checkpoint API (no requests): two runs of a
``requests_per_minute: auto`` job with throttles, de-duplicated copies, a few hundred failures
and skips under several reasons (some with awkward names), and items still pending. Every
item gets a real source and output file: six source images (640x480 to 1600x1200 JPEGs) and
their ~9.7 MP PNG outputs, hard-linked under every item's name, so the sampled thumbnails decode
what a real job would. Then report.json/items.csv/report.md are written (ReportWriter), and
report.html is rendered (timed) and loaded in headless Chromium: the time of ``--dump-dom`` on
the report minus the time on an empty page, each the median of ``--repeat`` alternating runs.
Results go to ``bench/out/html-report.json``; screenshots to ``bench/out/report.png`` (1280x2000,
the top of the page) and ``bench/out/report-full.png`` (1280x6000, the whole page).

Then the report's CPU (``time.process_time``, every thread) for ``ReportWriter.write`` (all report
files) three ways: cold (thumbnail cache emptied: what a report paid whenever its sample moved),
warm (nothing changed), and after a top-up run that adds ``--top-up`` new succeeded images.

Targets: under 5 MB, under 2 s to open in the browser (issue 6); a top-up report of 5 new images
in a 10,000-item job under 0.5 s of CPU (issue 13).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageOps

from batch_upscaler.checkpoint import Checkpoint, ItemState, Scanned
from batch_upscaler.htmlreport import render_html
from batch_upscaler.manifest import load_settings
from batch_upscaler.report import ReportWriter
from batch_upscaler.settings import JobSettings, request_fingerprint
from bench.workspace import DEFAULT_OUT, Workspace
from tests.conftest import local_dir

ITEMS = 10_000
SIZE_TARGET_MB, LOAD_TARGET_S, TOP_UP_TARGET_S = 5.0, 2.0, 0.5
FULL_HEIGHT = 6000  # px: the whole page at 1280 px wide (no script measures it)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
SOURCE_SIZES = ((640, 480), (800, 600), (1024, 768), (1200, 800), (512, 512), (1600, 1200))
OUTPUT_PIXELS = 9_437_184  # Conservative's output is about this many pixels, aspect kept
# (state, code, message, how many): refusals at scan time and failures during the run
SCAN_REFUSALS = (
    (ItemState.SKIPPED, "too_small", "too_small: {w}x{h} < 64 px", 180),
    (ItemState.SKIPPED, "aspect_ratio", "aspect_ratio: 1:3.1 is outside 1:2.5–2.5:1", 45),
    (ItemState.SKIPPED, "decompression_bomb", "decompression_bomb: 2500000000 pixels", 4),
    (ItemState.FAILED, "empty_file", "empty_file: 0 bytes", 12),
    (ItemState.FAILED, "unreadable", "unreadable: not an image Pillow can identify", 20),
    (ItemState.FAILED, "truncated", "truncated: JPEG data ends before its end-of-image marker", 30),
)
RUN_FAILURES = (
    ("content_filtered", "content_filtered: CONTENT_FILTERED", 150),
    ("ValidationException", "ValidationException: image dimensions are not supported", 60),
    ("possibly_billed_cap", "possibly_billed_cap: read_timeout twice (the request may have been billed)", 40),
    ("output_write_failed", "output_write_failed: [Errno 28] No space left on device: '{out}'", 25),
)
PENDING = 150


@dataclass
class FakeNow:
    t: float

    def __call__(self) -> float:
        return self.t


@dataclass(frozen=True)
class Plan:
    """What happens to one item."""

    relpath: str
    size: tuple[int, int]
    state: ItemState  # the final state
    code: str | None = None
    message: str | None = None
    at_scan: bool = False  # refused before sending


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.html_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=ITEMS)
    parser.add_argument("--repeat", type=int, default=3, help="browser loads of each page (median is kept)")
    parser.add_argument("--top-up", type=int, default=5, help="new images added by the top-up run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing: apt-get install -y chromium", file=sys.stderr)
        return 1
    work = Workspace(args.out).fresh("html-report")
    result = run(work, args.out, args.items, args.repeat)
    result.update(report_cpu(load_settings(work / "html-bench.yaml"), args.top_up))
    (args.out / "html-report.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def run(work: Path, out: Path, items: int, repeat: int) -> dict[str, Any]:
    settings = write_job(work)
    started = time.perf_counter()
    plans = plan_items(items)
    build_files(settings, plans)
    files_s = time.perf_counter() - started
    started = time.perf_counter()
    build_checkpoint(settings, plans)
    checkpoint_s = time.perf_counter() - started
    report_s, render_s, page = write_reports(settings)
    empty = work / "empty.html"
    empty.write_text("<!DOCTYPE html><html><head><title>empty</title></head><body></body></html>\n")
    loads = time_loads(work / "chromium-profile", page, empty, repeat)
    screenshot(work / "chromium-profile", page, out / "report.png", (1280, 2000))
    screenshot(work / "chromium-profile", page, out / "report-full.png", (1280, FULL_HEIGHT))
    size_mb = page.stat().st_size / 1e6
    return {
        "items": items, "report_html": str(page), "size_mb": round(size_mb, 3),
        "size_target_mb": SIZE_TARGET_MB, "size_ok": size_mb < SIZE_TARGET_MB,
        "render_s": round(render_s, 2), "json_csv_md_report_s": round(report_s, 2),
        "chromium_report_s": round(loads["report"], 3), "chromium_empty_s": round(loads["empty"], 3),
        "chromium_load_s": round(loads["report"] - loads["empty"], 3), "load_target_s": LOAD_TARGET_S,
        "load_ok": loads["report"] - loads["empty"] < LOAD_TARGET_S,
        "setup_files_s": round(files_s, 1), "setup_checkpoint_s": round(checkpoint_s, 1),
        "screenshots": [str(out / "report.png"), str(out / "report-full.png")],
    }


# ---- the job -----------------------------------------------------------------------------------
def write_job(work: Path) -> JobSettings:
    (work / "photos").mkdir()
    manifest = work / "html-bench.yaml"
    manifest.write_text(yaml.safe_dump({
        "version": 1, "name": "html-bench", "sources": ["photos"], "output": {"dir": "out", "format": "png"},
        "model": {"name": "conservative", "prompt": "a sharp, detailed photograph"}, "backend": "emulator",
        "limits": {"concurrency": 4, "requests_per_minute": "auto"},
    }))
    return load_settings(manifest)


def plan_items(count: int) -> list[Plan]:
    """Deterministic: which items are refused, fail, stay pending; the rest succeed."""
    rng = random.Random(6)
    outcomes: list[tuple[ItemState, str | None, str | None, bool]] = []
    for state, code, message, n in SCAN_REFUSALS:
        outcomes += [(state, code, message, True)] * n
    for code, message, n in RUN_FAILURES:
        outcomes += [(ItemState.FAILED, code, message, False)] * n
    outcomes += [(ItemState.SUCCEEDED, None, None, False)] * (count - PENDING - len(outcomes))
    rng.shuffle(outcomes)
    outcomes += [(ItemState.PENDING, None, None, False)] * PENDING  # the end of the queue was not reached
    return [Plan(_name(i, rng), rng.choice(SOURCE_SIZES), *outcome) for i, outcome in enumerate(outcomes)]


def _name(i: int, rng: random.Random) -> str:
    album = f"{1998 + i // 1000}/album {i // 250 % 4:02d}"
    if rng.random() < 0.01:  # awkward names: markup, quotes, Unicode, a newline
        return f"{album}/Été <b>&\"{i}\"\nscan.jpg"
    return f"{album}/IMG_{i:05d}.jpg"


def output_of(relpath: str) -> str:
    return relpath.rsplit(".", 1)[0] + ".png"


def output_size(size: tuple[int, int]) -> tuple[int, int]:
    w, h = size
    scale = math.sqrt(OUTPUT_PIXELS / (w * h))
    return round(w * scale), round(h * scale)


# ---- files -------------------------------------------------------------------------------------
def build_files(settings: JobSettings, plans: list[Plan]) -> None:
    """Six distinct source/output pairs, hard-linked under every item's name."""
    variants = settings.base_dir / "variants"
    variants.mkdir()
    originals = {size: _variant(variants, n, size) for n, size in enumerate(SOURCE_SIZES)}
    source_root = settings.base_dir / "photos"
    for plan in plans:
        src, out = originals[plan.size]
        _link(src, source_root / plan.relpath)
        if plan.state == ItemState.SUCCEEDED:
            _link(out, local_dir(settings.output_dir) / output_of(plan.relpath))


def _variant(folder: Path, n: int, size: tuple[int, int]) -> tuple[Path, Path]:
    w, h = size
    fractal = Image.effect_mandelbrot((w, h), (-2.2 + 0.1 * n, -1.2, 0.8 - 0.05 * n, 1.2), 100)
    palette = [("#0b1d51", "#f5b700"), ("#1b4332", "#b7e4c7"), ("#5a189a", "#ffb3c1"),
               ("#003049", "#fcbf49"), ("#370617", "#e85d04"), ("#10002b", "#48cae4")][n]
    source = ImageOps.colorize(fractal, *palette)
    src, out = folder / f"source-{n}.jpg", folder / f"output-{n}.png"
    source.save(src, "JPEG", quality=90)
    source.resize(output_size(size), Image.Resampling.BICUBIC).save(out, "PNG", compress_level=1)
    return src, out


def _link(target: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.link(target, path)


# ---- the checkpoint ----------------------------------------------------------------------------
def build_checkpoint(settings: JobSettings, plans: list[Plan]) -> None:
    now = FakeNow(1_767_225_600.0)  # 2026-01-01 00:00 UTC
    checkpoint = Checkpoint.open(settings.checkpoint_path, settings.name, now=now)
    params = request_fingerprint(settings)
    with checkpoint.scan():
        for seq, plan in enumerate(plans):
            checkpoint.record_scanned(_scanned(seq, plan, params))
    half = len(plans) // 2
    rng = random.Random(7)
    _run(checkpoint, now, plans[:half], rng, exit_code=75)
    now.t += 2 * 3600  # stopped by --max-duration, started again two hours later
    _run(checkpoint, now, plans[half:], rng, exit_code=75)
    checkpoint.close()


def _scanned(seq: int, plan: Plan, params: str) -> Scanned:
    w, h = (48, 40) if plan.code == "too_small" else plan.size
    refused = plan.at_scan
    return Scanned(key=f"photos:{plan.relpath}", seq=seq, source="photos", relpath=plan.relpath, size=123_456,
                   mtime_ns=seq, params_hash=params,
                   state=plan.state if refused else ItemState.PENDING,
                   output_path=None if refused else output_of(plan.relpath), format="JPEG", width=w, height=h,
                   error_code=plan.code if refused else None,
                   error_message=plan.message.format(w=w, h=h) if refused and plan.message else None)


def _run(checkpoint: Checkpoint, now: FakeNow, plans: list[Plan], rng: random.Random, exit_code: int) -> None:
    """Items finish one after another at a rate that ``auto`` raises, halves on throttles, raises again."""
    run_id = checkpoint.begin_run()
    rpm, requests, throttles = 30.0, 0, 0
    first_of: dict[tuple[int, int], str] = {}  # a succeeded item per source variant: dedup copies point at it
    for plan in plans:
        if plan.at_scan or plan.state == ItemState.PENDING:
            continue
        key = f"photos:{plan.relpath}"
        checkpoint.start(key)
        throttled = rng.random() < 0.015
        if throttled:
            checkpoint.count_attempt(key)
            checkpoint.record_answer(key, throttled=True)
            rpm = max(12.0, rpm * 0.6)
        copy_of = first_of.get(plan.size) if rng.random() < 0.02 else None
        if copy_of is None:
            checkpoint.count_attempt(key)
        requests += throttled + (copy_of is None)
        throttles += throttled
        now.t += rng.uniform(0.6, 1.4) * 60 / rpm
        rpm = min(48.0, rpm + 0.05)
        if plan.state == ItemState.FAILED:
            checkpoint.fail(key, plan.code or "unknown", (plan.message or "").format(out=output_of(plan.relpath)))
        else:
            checkpoint.succeed(key, 9_000_000, output_size(plan.size), plan.size, dedup_of=copy_of)
            first_of.setdefault(plan.size, key)
    checkpoint.finish_run(run_id, exit_code, requests, throttles, rate_mode="auto", final_rpm=rpm)


# ---- report CPU: cold, warm, after a top-up run ----------------------------------------------------
def report_cpu(settings: JobSettings, top_up: int) -> dict[str, Any]:
    shutil.rmtree(settings.state_dir / "thumbnails", ignore_errors=True)
    cold = _timed_report(settings)
    warm = _timed_report(settings)
    add_items(settings, top_up)
    topped = _timed_report(settings)
    return {"report_cpu_cold_s": round(cold, 3), "report_cpu_warm_s": round(warm, 3),
            "top_up_images": top_up, "report_cpu_top_up_s": round(topped, 3),
            "top_up_vs_cold": round(topped / cold, 3), "top_up_target_s": TOP_UP_TARGET_S,
            "top_up_ok": topped <= TOP_UP_TARGET_S}


def _timed_report(settings: JobSettings) -> float:
    checkpoint = Checkpoint.open(settings.checkpoint_path, settings.name)
    try:
        started = time.process_time()
        ReportWriter(settings, checkpoint).write()
        return time.process_time() - started
    finally:
        checkpoint.close()


def add_items(settings: JobSettings, count: int) -> None:
    """A nightly top-up: a scan that sees every item again plus ``count`` new ones, which succeed."""
    now = FakeNow(1_767_225_600.0 + 86_400)
    checkpoint = Checkpoint.open(settings.checkpoint_path, settings.name, now=now)
    params = request_fingerprint(settings)
    old = [(row["key"], row["seq"]) for row in checkpoint.items()]
    size = SOURCE_SIZES[0]
    new = [Plan(f"2026/top-up/IMG_{n:05d}.jpg", size, ItemState.SUCCEEDED) for n in range(count)]
    src = settings.base_dir / "variants" / "source-0.jpg"
    with checkpoint.scan():
        for key, seq in old:
            checkpoint.mark_seen(key, seq)
        for n, plan in enumerate(new):
            checkpoint.record_scanned(_scanned(len(old) + n, plan, params))
    run_id = checkpoint.begin_run()
    for plan in new:
        _link(src, settings.base_dir / "photos" / plan.relpath)
        out = local_dir(settings.output_dir) / output_of(plan.relpath)
        out.parent.mkdir(parents=True, exist_ok=True)
        # a fresh output (not a link): a new file the report has never seen
        Image.open(settings.base_dir / "variants" / "output-0.png").save(out, "PNG", compress_level=1)
        key = f"photos:{plan.relpath}"
        checkpoint.start(key)
        checkpoint.count_attempt(key)
        now.t += 1.5
        checkpoint.succeed(key, out.stat().st_size, output_size(size), size)
    checkpoint.finish_run(run_id, 0, count, 0, rate_mode="auto", final_rpm=48.0)
    checkpoint.close()


# ---- reports and the browser -------------------------------------------------------------------
def write_reports(settings: JobSettings) -> tuple[float, float, Path]:
    checkpoint = Checkpoint.open(settings.checkpoint_path, settings.name)
    try:
        started = time.perf_counter()
        directory = ReportWriter(settings, checkpoint).write()
        report_s = time.perf_counter() - started
        with (directory / "report.json").open(encoding="utf-8") as fh:
            header = {k: v for k, v in json.load(fh).items() if k != "items"}
        started = time.perf_counter()
        page = render_html(settings, checkpoint, header)
        render_s = time.perf_counter() - started
    finally:
        checkpoint.close()
    path = directory / "report.html"
    path.write_text(page, encoding="utf-8")
    return report_s, render_s, path


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def time_loads(profile: Path, page: Path, empty: Path, repeat: int) -> dict[str, float]:
    chromium(profile, "--dump-dom", empty.as_uri())  # warm-up: profile creation, disk cache
    times: dict[str, list[float]] = {"empty": [], "report": []}
    for _ in range(repeat):
        for name, target in (("empty", empty), ("report", page)):
            started = time.perf_counter()
            result = chromium(profile, "--dump-dom", target.as_uri())
            times[name].append(time.perf_counter() - started)
            errors = [line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
            if errors:
                raise RuntimeError(f"{target}: the page logged errors: {errors}")
    return {name: statistics.median(values) for name, values in times.items()}


def screenshot(profile: Path, page: Path, png: Path, size: tuple[int, int]) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    chromium(profile, f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", "--hide-scrollbars",
             page.as_uri())


if __name__ == "__main__":
    sys.exit(main())
