"""Scenario ``shards``: four shards share one quota (issue 12).

Four real ``batch-upscaler run --shard-count 4 --shard-index i`` processes at once, one emulator
process enforcing one 600 RPM quota (token bucket, burst 10; lognormal latency, 0.2 s median),
concurrency 8 each, for ``--max-duration 150s`` (then they drain and exit 75 with work left, as a
shard told to stop does). Two variants, each against its own fresh emulator:

- ``fixed``: ``requests_per_minute: 600``, so each shard paces at 600 / 4 = 150 RPM;
- ``auto, applied quota known``: every shard on ``auto`` reads the applied quota from Service Quotas
  (the emulator answers with the quota it enforces) and is held to its share of it;
- ``auto, cold``: no quota known (no Service Quotas answer, nothing remembered): every shard finds
  the quota on its own, and every 10 s posts what it got on the share board in the job's report
  folder and steers towards the mean of the shards that want more (fairshare.py). Without the
  board each measured only what it got and kept the split of the start (0.60 1.45 1.78 0.17).

The figures come from the emulator's request log (the bill). Each request is attributed to its
shard by the image it carried (each shard's checkpoint lists its items' content hashes). Goodput is
measured while all four shards are sending: from the last shard's first success to the first
shard's last success, which keeps each shard's start-up and drain out of the figure (a run too
short to have such a moment, the smoke, falls back to the whole span: ``all_shards_window`` false).

Targets: fixed goodput >= 0.97 of the quota with <= 1% throttled; auto >= 0.90 with <= 5%
throttled; each shard's share of the successes within +-25% of a quarter; no image paid twice.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from batch_upscaler.emulator import RequestRecord
from bench import job
from bench.child_server import REPO
from bench.cold import COLD_EMULATOR
from bench.emulator_process import EmulatorProcess
from bench.table import Check, Column, Row, ScenarioResult
from bench.throughput import COLD, QUOTA_RPM, corpus, slug
from bench.workspace import Workspace

NAME = "shards"
SHARDS = 4
CONCURRENCY = 8  # per shard
IMAGES, SMOKE_IMAGES = 2400, 24  # enough that no shard runs out of work before the time cap
TIME_CAP_S, SMOKE_TIME_CAP_S = 150.0, 20.0  # the smoke is expected to finish well before its cap
WAIT_S = 120.0  # beyond the cap: the drain, the report, the process's start-up
SHARE_TOLERANCE = 0.25
QUOTA_LOOKUP: tuple[tuple[str, object], ...] = (("quota_lookup", True),)
# (label, requests_per_minute, limits): the Service Quotas answer is the emulator's, the quota it enforces.
VARIANTS: tuple[tuple[str, float | str, tuple[tuple[str, object], ...]], ...] = (
    ("fixed 600 RPM split", QUOTA_RPM, COLD),
    ("auto, applied quota known", "auto", QUOTA_LOOKUP),
    ("auto, cold (no quota known)", "auto", COLD),
)

COLUMNS = (
    Column("variant", "variant"), Column("requests", "requests"), Column("succeeded", "ok"),
    Column("throttled", "throttled"), Column("throttled_pct", "throttled %", "{:.2f}"),
    Column("window_s", "all-shards window s", "{:.1f}"), Column("goodput_rpm", "goodput RPM", "{:.1f}"),
    Column("ratio", "goodput/quota", "{:.3f}"), Column("shares", "shard shares (window)"),
    Column("paid_twice", "paid twice"), Column("exit_codes", "exit codes"),
)


@dataclass(frozen=True)
class ShardTraffic:
    """One shard's answers in the emulator's log: when its successes came and how often it was throttled."""

    ok_times: tuple[float, ...]
    throttled: int
    requests: int


def run(workspace: Workspace) -> ScenarioResult:
    job.use_dummy_credentials()
    images = SMOKE_IMAGES if workspace.smoke else IMAGES
    cap = SMOKE_TIME_CAP_S if workspace.smoke else TIME_CAP_S
    sources = corpus(workspace, images)
    rows = [_measure(workspace, label, rpm, limits, sources, cap) for label, rpm, limits in VARIANTS]
    result = ScenarioResult(NAME, workspace.smoke, COLUMNS, rows)
    result.notes.append(f"{SHARDS} `batch-upscaler run --shard-count {SHARDS} --shard-index i` processes, "
                        f"c={CONCURRENCY} each, --max-duration {cap:.0f}s, one emulator: quota "
                        f"{QUOTA_RPM:.0f} RPM (burst {COLD_EMULATOR.quota_burst}), median latency "
                        f"{COLD_EMULATOR.latency_median_s} s")
    fixed, *autos = rows
    result.checks = [
        Check("fixed split goodput/quota", fixed["ratio"], ">= 0.97", fixed["ratio"] >= 0.97),
        Check("fixed split throttled %", fixed["throttled_pct"], "<= 1", fixed["throttled_pct"] <= 1.0),
    ]
    for auto in autos:
        result.checks += [
            Check(f"{auto['variant']}: goodput/quota", auto["ratio"], ">= 0.90", auto["ratio"] >= 0.90),
            Check(f"{auto['variant']}: throttled %", auto["throttled_pct"], "<= 5", auto["throttled_pct"] <= 5.0),
        ]
    for row in rows:
        result.checks += [
            Check(f"{row['variant']}: worst shard share vs fair", row["worst_share"],
                  f"within +-{SHARE_TOLERANCE:.0%}", abs(row["worst_share"] - 1.0) <= SHARE_TOLERANCE),
            Check(f"{row['variant']}: images paid twice", row["paid_twice"], "0", row["paid_twice"] == 0),
        ]
    return result


def _measure(workspace: Workspace, label: str, rpm: float | str, limits: tuple[tuple[str, object], ...],
             sources: Path, cap: float) -> Row:
    work = workspace.fresh(f"{NAME}-{slug(label)}")
    with EmulatorProcess(COLD_EMULATOR, work / "requests.jsonl") as emulator:
        spec = job.JobSpec(name="archive", sources=sources, work_dir=work, endpoint_url=emulator.endpoint_url,
                           concurrency=CONCURRENCY, requests_per_minute=rpm, limits=limits)
        manifest = job.write_manifest(spec)
        exit_codes = _run_shards(manifest, work, cap)
        records = emulator.records()
    owners = _owners(work / "state")
    return _row(label, records, owners, exit_codes)


def _run_shards(manifest: Path, work: Path, cap: float) -> list[int]:
    """The shards as the engine would start them, all at once; their exit codes in index order."""
    processes = []
    for index in range(SHARDS):
        output = (work / f"shard-{index}.log").open("w", encoding="utf-8")
        command = [sys.executable, "-m", "batch_upscaler", "run", str(manifest), "--shard-count", str(SHARDS),
                   "--shard-index", str(index), "--max-duration", f"{cap:.0f}", "--no-progress", "--grace", "60s"]
        processes.append(subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT))
        output.close()
    try:
        return [process.wait(cap + WAIT_S) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _owners(state_dir: Path) -> dict[str, int]:
    """Content hash -> shard index, from each shard's own checkpoint."""
    owners: dict[str, int] = {}
    for index in range(SHARDS):
        databases = sorted(state_dir.glob(f"*shard-{index:04d}-of-{SHARDS:04d}*.sqlite"))
        if not databases:
            raise RuntimeError(f"shard {index} left no checkpoint in {state_dir}")
        with sqlite3.connect(databases[0]) as conn:
            owners |= {sha: index for (sha,) in conn.execute("SELECT content_sha256 FROM items") if sha}
    return owners


def _by_shard(records: Sequence[RequestRecord], owners: dict[str, int]) -> list[ShardTraffic]:
    traffic = []
    for index in range(SHARDS):
        mine = [r for r in records if r.image_sha256 is not None and owners.get(r.image_sha256) == index]
        traffic.append(ShardTraffic(ok_times=tuple(sorted(r.at for r in mine if r.status == 200)),
                                    throttled=sum(1 for r in mine if r.status == 429), requests=len(mine)))
    return traffic


def _row(label: str, records: Sequence[RequestRecord], owners: dict[str, int], exit_codes: list[int]) -> Row:
    shards = _by_shard(records, owners)
    unattributed = len(records) - sum(shard.requests for shard in shards)
    active = [shard.ok_times for shard in shards if shard.ok_times]
    start = max((times[0] for times in active), default=0.0)
    end = min((times[-1] for times in active), default=0.0)
    overlap = len(active) == SHARDS and end > start
    if not overlap:  # a short run (the smoke) where no moment had every shard sending: the whole span
        start = min((times[0] for times in active), default=0.0)
        end = max((times[-1] for times in active), default=0.0)
    window = end - start
    in_window = [sum(1 for t in shard.ok_times if start <= t <= end) for shard in shards]
    total = sum(in_window)
    goodput = total / window * 60.0 if window > 0 else 0.0
    shares = [count * SHARDS / total if total else 0.0 for count in in_window]
    throttled = sum(1 for r in records if r.status == 429)
    paid = Counter(r.image_sha256 for r in records if r.status == 200)
    return {"variant": label, "requests": len(records), "succeeded": sum(paid.values()), "throttled": throttled,
            "throttled_pct": 100.0 * throttled / len(records) if records else 0.0, "window_s": window,
            "goodput_rpm": goodput, "ratio": goodput / QUOTA_RPM,
            "shares": " ".join(f"{share:.2f}" for share in shares),
            "worst_share": max(shares, key=lambda share: abs(share - 1.0)) if shares else 0.0,
            "shard_throttled": [shard.throttled for shard in shards], "unattributed": unattributed,
            "paid_twice": sum(1 for n in paid.values() if n > 1), "exit_codes": " ".join(map(str, exit_codes)),
            "all_shards_window": overlap}
