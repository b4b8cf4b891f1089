"""Scenario ``s3``: 10,000 objects in S3 -- plan, a full run, a rerun with nothing to do, a rerun without state.

moto's S3 server (bench.s3_process, its own process, with a per-request log that counts every
operation) and the emulator (``--canned-output``) run beside the benchmark. A source bucket gets
10,000 distinct 64x64 PNGs under ``s3://archive/photos/`` in folders of 1,000, plus folder markers
and non-image keys that must be ignored (this setup is not measured). Then, each in a fresh child
process (peak RSS per phase):

(a) listing alone, then ``plan`` on the fresh job, at 1,000 keys (one folder) and at 10,000:
    seconds, keys/s, S3 requests per new object, peak RSS (the ratio says whether memory is flat);
    the emulator must receive nothing;
(b) ``run`` into ``s3://archive-upscaled/photos/`` with the report in S3: wall time, InvokeModel
    requests (the emulator's log: 10,000 minus the de-duplicated), S3 requests, peak RSS;
(c) the same ``run`` again with nothing changed: seconds to the scan summary ("nothing to do"),
    S3 requests per unchanged object (listings only: no GET or HEAD per object), no InvokeModel;
(d) the state folder deleted: ``plan`` (its ``proven_done``) and ``run``: one HEAD per existing
    output the checkpoint does not know, no InvokeModel.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
import yaml
from botocore.config import Config

from batch_upscaler.manifest import load_settings
from batch_upscaler.planner import plan_job
from batch_upscaler.settings import JobSettings, RunOptions
from batch_upscaler.storage.edge import open_storage
from batch_upscaler.storage.s3 import S3Access
from bench import job
from bench.corpus import solid_png
from bench.emulator_process import EmulatorProcess, EmulatorSpec
from bench.resources import cpu_seconds, emit, in_fresh_process, peak_rss_mb
from bench.s3_process import MotoProcess, S3Request, bill, most_in_flight
from bench.table import Check, Column, Row, ScenarioResult
from bench.workspace import Workspace

OBJECTS, SMOKE_OBJECTS = 10_000, 200
FOLDERS = 10  # the small plan lists one folder: a tenth of the keys
SOURCE_BUCKET, OUTPUT_BUCKET = "archive", "archive-upscaled"
SOURCE, OUTPUT, REPORTS = f"s3://{SOURCE_BUCKET}/photos/", f"s3://{OUTPUT_BUCKET}/photos/", f"s3://{OUTPUT_BUCKET}/_reports/"
# Keys below the source prefix that are not items: folder markers and files that are not images.
IGNORED_KEYS = ("photos/", "photos/d0000/", "photos/empty/", "photos/README.txt", "photos/d0000/notes.txt",
                "photos/d0001/.DS_Store", "photos/d0002/Thumbs.db", "photos/d0003/album.json")
EMULATOR = EmulatorSpec(latency_s=0.05, canned_output=True, output_max_pixels=256 * 256)
CONCURRENCY = 16
UPLOAD_THREADS = 16
CHILD_TIMEOUT_S = 1800.0
SCAN_TARGET_S = 30.0  # "in seconds" against a local server
RSS_RATIO_TARGET = 1.2  # plan's peak RSS at 10x the keys
CREDENTIALS = {"aws_access_key_id": "AKIDBENCHMARK", "aws_secret_access_key": "benchmark-secret"}

COLUMNS = (
    Column("phase", "phase"), Column("objects", "objects"), Column("knows_s", "s to know what is left", "{:.2f}"),
    Column("elapsed_s", "total s", "{:.2f}"), Column("keys_per_s", "keys/s", "{:.0f}"),
    Column("s3_total", "S3 requests"), Column("ListObjectsV2", "LIST"), Column("GetObject", "GET"),
    Column("GetObject ranged", "of them ranged"), Column("HeadObject", "HEAD"), Column("PutObject", "PUT"),
    Column("s3_per_object", "S3 req/object", "{:.4f}"), Column("in_flight", "most in flight GET/HEAD"),
    Column("s3_calls", "S3Access.calls"),
    Column("invoke", "InvokeModel"), Column("cpu_s", "runner CPU s", "{:.1f}"),
    Column("moto_cpu_s", "moto CPU s", "{:.1f}"), Column("peak_rss_mb", "peak RSS MB", "{:.0f}"),
)


def run(workspace: Workspace) -> ScenarioResult:
    objects = SMOKE_OBJECTS if workspace.smoke else OBJECTS
    work = workspace.fresh("s3")
    result = ScenarioResult("s3", workspace.smoke, COLUMNS)
    load = os.getloadavg()[0]
    with (MotoProcess(work / "s3-requests.jsonl") as moto,
          EmulatorProcess(EMULATOR, work / "requests.jsonl") as emulator):
        s3 = _client(moto.endpoint_url)
        started = time.monotonic()
        fill(s3, objects)
        result.notes.append(f"setup (not measured): {objects} objects + {len(IGNORED_KEYS)} ignored keys uploaded "
                            f"in {time.monotonic() - started:.1f} s, {UPLOAD_THREADS} threads")
        per_folder = objects // FOLDERS
        small = _manifest(work, "s3-small", f"{SOURCE}d0000/", f"s3://{OUTPUT_BUCKET}/photos-small/",
                          moto.endpoint_url, emulator.endpoint_url)
        big = _manifest(work, "s3-archive", SOURCE, OUTPUT, moto.endpoint_url, emulator.endpoint_url,
                        report_dir=REPORTS)
        phase = _Phases(moto, emulator)
        rows = result.rows
        rows.append(phase("(a) listing only", "list", small, per_folder))
        rows.append(phase("(a) plan, fresh job", "plan", small, per_folder))
        rows.append(phase("(a) listing only", "list", big, objects))
        rows.append(phase("(a) plan, fresh job", "plan", big, objects))
        rows.append(phase("(b) run", "run", big, objects) | _report(s3))
        rows.append(phase("(c) rerun, nothing changed", "run", big, objects) | _report(s3))
        state = work / "s3-archive" / "state"
        shutil.rmtree(state)
        rows.append(phase("(d) plan, state folder deleted", "plan", big, objects))
        shutil.rmtree(state, ignore_errors=True)  # plan changes nothing, but the run must start from nothing
        rows.append(phase("(d) rerun, state folder deleted", "run", big, objects) | _report(s3))
        result.notes.append(f"moto's own log: {sum(1 for _ in moto.records())} requests in all; emulator: "
                            f"{len(emulator.records())} InvokeModel requests in all")
    result.checks = _checks(rows, objects)
    result.notes.append(f"load average (1 min) at the start / end: {load:.1f} / {os.getloadavg()[0]:.1f} "
                        f"on {os.cpu_count()} CPUs (other work on the machine slows every wall time)")
    rss_small, rss_big = rows[1]["peak_rss_mb"], rows[3]["peak_rss_mb"]
    result.notes.append(f"plan peak RSS {rss_big:.0f} MB at {objects} keys / {rss_small:.0f} MB at {per_folder} keys "
                        f"= {rss_big / rss_small:.2f}")
    return result


class _Phases:
    """Runs one measurement in a fresh child and adds what the servers saw meanwhile."""

    def __init__(self, moto: MotoProcess, emulator: EmulatorProcess) -> None:
        self.moto, self.emulator = moto, emulator

    def __call__(self, title: str, kind: str, manifest: Path, objects: int) -> Row:
        mark, invoked, moto_cpu = self.moto.mark(), len(self.emulator.records()), self.moto.cpu_seconds()
        row = in_fresh_process(["s3", "--s3-phase", kind, "--manifest", str(manifest)], CHILD_TIMEOUT_S)
        moto_cpu = self.moto.cpu_seconds() - moto_cpu
        requests: list[S3Request] = self.moto.since(mark)
        counts = bill(requests)
        return row | dict(counts) | {
            "phase": f"{title}, {objects:,} keys" if kind != "run" else title, "objects": objects,
            "s3_total": counts["total"], "s3_per_object": counts["total"] / objects,
            "s3_errors": sum(1 for r in requests if r.status >= 500),
            "invoke": len(self.emulator.records()) - invoked, "moto_cpu_s": moto_cpu,
            "in_flight": f"{most_in_flight(requests, 'GetObject')}/{most_in_flight(requests, 'HeadObject')}",
            "keys_per_s": objects / row["knows_s"] if row.get("knows_s") else None,
        }


def _checks(rows: list[Row], objects: int) -> list[Check]:
    _, small, listing, plan, first, again, lost_plan, lost = rows
    ratio = plan["peak_rss_mb"] / small["peak_rss_mb"]
    expected = objects - plan["deduplicated"]
    reads = again["GetObject"] + again["HeadObject"]
    return [
        Check("plan: items found (markers, non-images ignored)", plan["files_found"], f"= {objects}",
              plan["files_found"] == objects),
        Check(f"plan: s to list + scan {objects} new keys", plan["knows_s"], f"<= {SCAN_TARGET_S:g}",
              plan["knows_s"] <= SCAN_TARGET_S),
        Check("plan: S3 requests per new object", plan["s3_per_object"], "<= 1.02 (one ranged GET)",
              plan["s3_per_object"] <= 1.02),
        Check("plan: InvokeModel", plan["invoke"] + small["invoke"] + listing["invoke"], "0",
              plan["invoke"] + small["invoke"] + listing["invoke"] == 0),
        Check("plan: peak RSS at 10x the keys (ratio)", ratio, f"<= {RSS_RATIO_TARGET:g}", ratio <= RSS_RATIO_TARGET),
        Check("run: InvokeModel = objects - deduplicated", first["invoke"], f"= {expected}",
              first["invoke"] == expected and first["succeeded"] == objects and first["failed"] == 0),
        Check("run: S3Access.calls = checkpoint = report.json", first["s3_calls"], f"= {first['report_s3_requests']}",
              first["s3_calls"] == first["report_s3_requests"]),
        Check("rerun: InvokeModel", again["invoke"], "0", again["invoke"] == 0),
        Check("rerun: GET + HEAD (per unchanged object: 0)", reads, "<= 1 (the owner marker)",
              again["HeadObject"] == 0 and again["GetObject"] <= 1),
        Check("state deleted: plan proven_done", lost_plan["proven_done"], f"= {objects}",
              lost_plan["proven_done"] == objects and lost_plan["requests"] == 0),
        Check("state deleted: HEADs", lost["HeadObject"], f"= {objects}", lost["HeadObject"] == objects),
        Check("state deleted: InvokeModel", lost["invoke"], "0", lost["invoke"] == 0 and lost["succeeded"] == objects),
    ]


# ---- setup -------------------------------------------------------------------------------------
def _client(endpoint_url: str) -> Any:
    config = Config(max_pool_connections=UPLOAD_THREADS * 2, retries={"mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1", config=config, **CREDENTIALS)


def source_key(index: int, objects: int) -> str:
    return f"photos/d{index // (objects // FOLDERS):04d}/img{index:06d}.png"


def fill(s3: Any, objects: int) -> None:
    """The buckets, ``objects`` distinct 64x64 PNGs in FOLDERS folders, and the keys to be ignored."""
    for bucket in (SOURCE_BUCKET, OUTPUT_BUCKET):
        s3.create_bucket(Bucket=bucket)

    def put(index: int) -> None:
        s3.put_object(Bucket=SOURCE_BUCKET, Key=source_key(index, objects), Body=solid_png(index, 64))

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(put, range(objects)))
    for key in IGNORED_KEYS:
        s3.put_object(Bucket=SOURCE_BUCKET, Key=key, Body=b"" if key.endswith("/") else b"not an image")


def _manifest(work: Path, name: str, source: str, output: str, s3_endpoint: str, emulator_endpoint: str,
              report_dir: str | None = None) -> Path:
    spec = job.JobSpec(name=name, sources=work, work_dir=work / name, endpoint_url=emulator_endpoint,
                       concurrency=CONCURRENCY, requests_per_minute=60_000)
    doc = job.manifest_doc(spec) | {"sources": [source], "s3": {"endpoint_url": s3_endpoint}}
    doc["output"] = {**doc["output"], "dir": output}
    if report_dir is not None:
        doc["report_dir"] = report_dir
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    path = spec.work_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _report(s3: Any) -> Row:
    """The last run's S3 figures as its report.json (in S3) states them."""
    report = json.loads(s3.get_object(Bucket=OUTPUT_BUCKET, Key="_reports/report.json")["Body"].read())
    figures = report.get("s3") or {}
    return {"report_s3_requests": figures.get("requests"), "report_s3_retried": figures.get("retried")}


# ---- the children ------------------------------------------------------------------------------
def add_child_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-phase", choices=("list", "plan", "run"), help="s3: measure one phase in this process")


def child(args: argparse.Namespace) -> None:
    job.use_dummy_credentials()
    measure = {"list": measure_listing, "plan": measure_plan, "run": measure_run}[args.s3_phase]
    emit(measure(args.manifest))


@contextmanager
def _s3_access_made() -> Iterator[list[S3Access]]:
    """The S3Access objects made meanwhile, to read their ``calls`` and ``retries`` (nothing else changes)."""
    made: list[S3Access] = []
    original = S3Access.__init__

    def init(self: S3Access, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    with mock.patch.object(S3Access, "__init__", init):
        yield made


def measure_listing(manifest: Path) -> Row:
    """The source listing alone (ListObjectsV2 pages, filtered into items), as the scan streams it."""
    settings = load_settings(manifest)
    with _s3_access_made() as made:
        cpu, started = cpu_seconds(), time.perf_counter()
        found = asyncio.run(_count_found(settings))
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return {"files_found": found, "knows_s": elapsed, "elapsed_s": elapsed, "s3_calls": sum(a.calls for a in made),
            "cpu_s": cpu, "peak_rss_mb": peak_rss_mb()}


async def _count_found(settings: JobSettings) -> int:
    async with open_storage(settings) as storage:
        return sum([1 async for _ in storage.sources.found()])


def measure_plan(manifest: Path) -> Row:
    """``plan`` (what ``plan --json`` prints), timed, with the S3 calls it made."""
    settings = load_settings(manifest)
    with _s3_access_made() as made:
        cpu, started = cpu_seconds(), time.perf_counter()
        plan = plan_job(settings, RunOptions())
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    figures = plan.to_json()
    keep = ("files_found", "new", "unchanged", "proven_done", "already_done", "to_process", "deduplicated", "requests")
    return {key: figures[key] for key in keep} | {
        "knows_s": elapsed, "elapsed_s": elapsed, "cpu_s": cpu, "s3_calls": sum(a.calls for a in made),
        "s3_retries": sum(a.retries for a in made), "peak_rss_mb": peak_rss_mb()}


def measure_run(manifest: Path) -> Row:
    """The real ``run_job``: seconds to its scan summary and to its end, and the run's recorded S3 figures."""
    cpu = cpu_seconds()
    outcome = job.run_manifest(manifest)
    cpu = cpu_seconds() - cpu
    settings = load_settings(manifest)
    with sqlite3.connect(f"{settings.checkpoint_path.resolve().as_uri()}?mode=ro", uri=True) as conn:
        calls, retries = conn.execute("SELECT s3_requests, s3_retries FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    knows = None if outcome.scanned_at is None else outcome.scanned_at - outcome.started_at
    return {"knows_s": knows, "elapsed_s": outcome.elapsed_s, "exit_code": outcome.exit_code,
            "succeeded": outcome.succeeded, "failed": outcome.failed, "pending": outcome.pending,
            "runner_requests": outcome.requests, "s3_calls": calls, "s3_retries": retries, "cpu_s": cpu,
            "peak_rss_mb": peak_rss_mb()}
