"""Scenario ``scale``: 100,000 files -- discovery + scan, resume with nothing to do, resume with 1,000 left.

(i) discovery + scan of every file into a fresh checkpoint (files/s, peak RSS), in a fresh child;
(ii) every item is then marked succeeded directly in SQLite, each with a 1-byte output file (the
runner stats each output at scan, and a size match is all it checks), and ``run_job`` measures
the seconds until the runner's scan summary (it then knows nothing is left) and to its return
(the report over 100,000 items included); (iii) 1,000 items are set back to pending and the
seconds from ``run_job`` start to the emulator's first received request are measured.
Inputs are 64x64 PNGs (the Conservative minimum, so every file is a valid pending item).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import time
from pathlib import Path

from batch_upscaler.checkpoint import Checkpoint, ItemState
from batch_upscaler.discovery import Discovery, parse_source
from batch_upscaler.manifest import load_settings
from batch_upscaler.scan import Scanner, ScanSummary
from batch_upscaler.settings import JobSettings
from batch_upscaler.storage.edge import open_storage
from bench import job
from bench.accounting import summarize
from bench.corpus import tiny_tree
from bench.emulator_process import EmulatorProcess, EmulatorSpec
from bench.resources import emit, in_fresh_process, peak_rss_mb
from bench.table import Check, Column, Row, ScenarioResult
from bench.workspace import Workspace

FILES, SMOKE_FILES = 100_000, 500
PENDING, SMOKE_PENDING = 1_000, 50
RESUME_TARGET_S = 10.0
EMULATOR = EmulatorSpec(latency_s=0.05, canned_output=True, output_max_pixels=256 * 256)
CHILD_TIMEOUT_S = 1800.0

COLUMNS = (
    Column("phase", "phase"), Column("items", "items"), Column("pending", "pending"),
    Column("files_per_s", "files/s", "{:.0f}"), Column("knows_s", "s to know what is left", "{:.2f}"),
    Column("first_request_s", "s to first request", "{:.2f}"), Column("elapsed_s", "total s", "{:.1f}"),
    Column("requests", "requests"), Column("peak_rss_mb", "peak RSS MB", "{:.0f}"),
)


def run(workspace: Workspace) -> ScenarioResult:
    files, pending = (SMOKE_FILES, SMOKE_PENDING) if workspace.smoke else (FILES, PENDING)
    corpus = tiny_tree(workspace.corpus_dir(f"scale-{files}"), files)
    work = workspace.fresh("scale")
    result = ScenarioResult("scale", workspace.smoke, COLUMNS)
    with EmulatorProcess(EMULATOR, work / "requests.jsonl") as emulator:
        manifest = job.write_manifest(job.JobSpec(name="scale", sources=corpus, work_dir=work,
                                                  endpoint_url=emulator.endpoint_url, requests_per_minute=60_000))
        result.rows.append(_child("scan", manifest))
        settings = load_settings(manifest)
        mark_all_succeeded(settings)
        result.rows.append(_child("resume", manifest) | {"phase": "(ii) resume, all succeeded"})
        set_pending(settings, pending)
        since = time.time()
        row = _child("resume", manifest) | {"phase": f"(iii) resume, {pending} pending"}
        traffic = summarize(emulator.records(), since=since)
        if traffic.first_received_at is not None:
            row["first_request_s"] = traffic.first_received_at - row["started_at"]
        result.rows.append(row)
    shutil.rmtree(work, ignore_errors=True)  # 100,000 outputs and a checkpoint: not worth keeping
    result.checks = _checks(result.rows)
    return result


def _child(phase: str, manifest: Path) -> Row:
    return in_fresh_process(["scale", "--phase", phase, "--manifest", str(manifest)], CHILD_TIMEOUT_S)


def _checks(rows: list[Row]) -> list[Check]:
    scan, resume, some = rows
    return [
        Check("resume, nothing to do: s to know", resume["knows_s"], f"<= {RESUME_TARGET_S:g}",
              resume["knows_s"] <= RESUME_TARGET_S),
        Check("resume, nothing to do: requests", resume["requests"], "0", resume["requests"] == 0),
        Check("scan: items recorded", scan["pending"], f"= {scan['items']}", scan["pending"] == scan["items"]),
        Check("resume with pending: all done", some["pending"], "0 left", some["pending"] == 0),
    ]


def mark_all_succeeded(settings: JobSettings) -> int:
    """Every item succeeded, each with a 1-byte output file (what the runner's scan checks)."""
    outputs = settings.output_dir
    with sqlite3.connect(settings.checkpoint_path) as conn:
        paths = [row[0] for row in conn.execute("SELECT output_path FROM items WHERE state = 'pending'")]
        for relpath in paths:
            target = outputs / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"x")
        conn.execute("UPDATE items SET state = 'succeeded', output_bytes = 1, attempts = 1, finished_at = ? "
                     "WHERE state = 'pending'", (time.time(),))
    return len(paths)


def set_pending(settings: JobSettings, count: int) -> None:
    """The first ``count`` items (in discovery order) are to be done again."""
    with sqlite3.connect(settings.checkpoint_path) as conn:
        conn.execute("UPDATE items SET state = 'pending', output_bytes = NULL WHERE seq <= ?", (count,))


def add_child_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--phase", choices=("scan", "resume"), help="scale: measure one phase in this process")
    parser.add_argument("--manifest", type=Path, help="scale, s3: the job's manifest")


def child(args: argparse.Namespace) -> None:
    emit(measure_scan(args.manifest) if args.phase == "scan" else measure_resume(args.manifest))


def measure_scan(manifest: Path) -> Row:
    """(i) Discovery alone, then discovery + scan into the (fresh) checkpoint."""
    settings = load_settings(manifest)
    started = time.perf_counter()
    walked = sum(1 for _ in _discovery(settings))
    walk_s = time.perf_counter() - started
    checkpoint = Checkpoint.open(settings.checkpoint_path, settings.name)
    try:
        started = time.perf_counter()
        summary = asyncio.run(_scan(settings, checkpoint))
        scan_s = time.perf_counter() - started
        pending = checkpoint.counts()[ItemState.PENDING]
    finally:
        checkpoint.close()
    return {"phase": "(i) discovery + scan", "items": summary.discovered, "pending": pending,
            "files_per_s": summary.discovered / scan_s, "walk_files_per_s": walked / walk_s,
            "knows_s": scan_s, "elapsed_s": scan_s, "requests": 0, "peak_rss_mb": peak_rss_mb()}


async def _scan(settings: JobSettings, checkpoint: Checkpoint) -> ScanSummary:
    async with open_storage(settings) as storage:
        return await Scanner(settings, checkpoint, storage).run()


def _discovery(settings: JobSettings) -> Discovery:
    """A fresh walk (a Discovery remembers what it yielded, so each pass needs its own)."""
    prune = [p for p in (settings.output_dir, settings.state_dir) if isinstance(p, Path)]
    return Discovery([parse_source(s, settings.base_dir) for s in settings.sources], settings.exclude,
                     prune=prune, base_dir=settings.base_dir)


def measure_resume(manifest: Path) -> Row:
    """(ii)/(iii) The real ``run_job``: time to its scan summary, to the end, and its figures."""
    run = job.run_manifest(manifest)
    knows = None if run.scanned_at is None else run.scanned_at - run.started_at
    items = run.succeeded + run.failed + run.pending
    return {"items": items, "pending": run.pending, "knows_s": knows, "elapsed_s": run.elapsed_s,
            "files_per_s": items / knows if knows else None, "requests": run.requests,
            "failed": run.failed, "started_at": run.started_at, "peak_rss_mb": peak_rss_mb()}
