"""``report --merge``: one report over every shard's results, and each shard's ``done.json``.

A shard writes its report under ``<report_dir>/shards/0007-of-0032/`` (a local folder or an S3
prefix) and a small ``done.json`` last. The merge reads every shard's ``done.json`` and
``report.json`` (streamed line by line: report.json holds one item per line), loads the items into
a scratch checkpoint on disk (memory stays flat however many shards and items), and writes the
usual report.json / report.md / items.csv / report.html / failed.txt from it into ``<report_dir>``.

Exit: 0 when all ``count`` shards are done and nothing failed; 1 when items failed; 75 when shards
are missing or unfinished (they are listed).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import platform
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiobotocore.session import AioSession

from batch_upscaler import __version__
from batch_upscaler.checkpoint import Checkpoint, ItemState
from batch_upscaler.errors import ExitCode
from batch_upscaler.report import ReportWriter, write_json_atomically
from batch_upscaler.settings import JobSettings
from batch_upscaler.shards import Shard
from batch_upscaler.storage.edge import DONE_FILE, open_storage
from batch_upscaler.storage.names import Names
from batch_upscaler.storage.s3 import S3OutputStore
from batch_upscaler.storage.urls import S3Url

log = logging.getLogger(__name__)


def write_done(directory: Path, settings: JobSettings, checkpoint: Checkpoint, exit_code: ExitCode) -> None:
    """A shard's last report file: what the merge needs to know that (and how) it finished."""
    runs = checkpoint.runs()
    last = runs[-1] if runs else {}
    counts = {state.value: n for state, n in checkpoint.counts().items()}
    document = {
        "job": settings.name, "shard": settings.shard.index, "count": settings.shard.count,
        "exit_code": int(exit_code), "complete": exit_code in (ExitCode.OK, ExitCode.ITEMS_FAILED),
        "counts": counts, "requests": last.get("requests"), "spent_usd": round(last.get("spent_usd") or 0.0, 4),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {"batch_upscaler": __version__, "python": platform.python_version()},
    }
    write_json_atomically(directory / DONE_FILE, document)


@dataclass
class MergeResult:
    exit_code: ExitCode
    where: str
    missing: list[str] = field(default_factory=list)  # shard labels with no done.json
    unfinished: list[str] = field(default_factory=list)  # shards whose last run stopped early
    items: int = 0
    failed: int = 0


class _MergedNames(Names):
    """Merged rows already carry what people see: the source's name and the output's location."""

    def item(self, source: str, relpath: str, key: str | None = None) -> str:
        return relpath

    def output(self, relpath: str) -> str:
        return relpath

    def output_location(self, relpath: str) -> str:
        return relpath

    def local_source(self, source: str, relpath: str) -> Path | None:
        return None

    def local_output(self, relpath: str) -> Path | None:
        return None


def merge_reports(settings: JobSettings) -> MergeResult:
    """Merge the reports of all ``settings.shard.count`` shards into ``settings.report_root``."""
    return asyncio.run(_merge(settings))


async def _merge(settings: JobSettings) -> MergeResult:
    count = settings.shard.count
    whole = replace(settings, shard=Shard(0, 1))  # the merged report is the job's own report
    result = MergeResult(ExitCode.OK, str(settings.report_root))
    with tempfile.TemporaryDirectory(prefix="merge-", dir=_scratch_dir(settings)) as scratch:
        work = Path(scratch)
        checkpoint = Checkpoint.open_scratch(work / "merged.sqlite", settings.name)
        try:
            async with open_storage(whole, AioSession(profile=settings.profile)) as storage:
                fetch = _Fetcher(settings.report_root, storage.s3, work)
                runs = _Runs()
                for index in range(count):
                    await _merge_shard(checkpoint, fetch, Shard(index, count), result, runs)
                problems = [f"{label} missing" for label in result.missing]
                problems += [f"{label} unfinished" for label in result.unfinished]
                checkpoint.record_merged_run(runs.started, runs.finished, runs.requests, runs.throttles,
                                             runs.spent_usd, f"shards {', '.join(problems)}" if problems else None)
                ReportWriter(whole, checkpoint, _MergedNames(whole)).write(storage.reports.local_dir)
                result.where = await storage.reports.publish()
            counts = checkpoint.counts()
            result.items, result.failed = sum(counts.values()), counts[ItemState.FAILED]
        finally:
            checkpoint.close()
    result.exit_code = (ExitCode.INTERRUPTED if result.missing or result.unfinished else
                        ExitCode.ITEMS_FAILED if result.failed else ExitCode.OK)
    return result


def _scratch_dir(settings: JobSettings) -> Path:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return settings.state_dir


@dataclass
class _Runs:
    """The shards' last runs, summed: the merged report's run figures."""

    started: float | None = None
    finished: float | None = None
    requests: int = 0
    throttles: int = 0
    spent_usd: float = 0.0

    def add(self, header: dict[str, Any]) -> None:
        started, finished = (_seconds(header.get(k)) for k in ("started_at", "finished_at"))
        if started is not None:
            self.started = started if self.started is None else min(self.started, started)
        if finished is not None:
            self.finished = finished if self.finished is None else max(self.finished, finished)
        self.requests += int(header.get("requests") or 0)
        self.throttles += int(header.get("throttled_attempts") or 0)
        self.spent_usd += float(header.get("last_run_spent_usd") or 0.0)


def _seconds(iso: Any) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(iso)).timestamp() if iso else None
    except ValueError:
        return None


async def _merge_shard(checkpoint: Checkpoint, fetch: _Fetcher, shard: Shard, result: MergeResult,
                       runs: _Runs) -> None:
    done_path = await fetch.get(shard, DONE_FILE)
    report_path = await fetch.get(shard, "report.json")
    if done_path is None or report_path is None:
        result.missing.append(shard.label)
        if report_path is None:
            return
    else:
        done = json.loads(done_path.read_text(encoding="utf-8"))
        if not done.get("complete"):
            result.unfinished.append(shard.label)
    runs.add(_report_header(report_path))
    checkpoint.import_items(_report_items(report_path, shard))


class _Fetcher:
    """A shard's report files as local paths (downloaded to scratch from an S3 report_dir)."""

    def __init__(self, root: Path | S3Url, access: Any, scratch: Path) -> None:
        self.root, self.scratch = root, scratch
        self.store = S3OutputStore(access, root) if isinstance(root, S3Url) else None

    async def get(self, shard: Shard, name: str) -> Path | None:
        relpath = f"shards/{shard.label}/{name}"
        if self.store is None:
            assert isinstance(self.root, Path)
            path = self.root / relpath
            return path if path.is_file() else None
        target = self.scratch / f"{shard.label}-{name}"
        return target if await self.store.download(relpath, target) else None


def _report_header(path: Path) -> dict[str, Any]:
    """The shard report's figures before its items (the part of report.json above ``"items"``)."""
    lines = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.startswith('  "items": ['):
                break
            lines.append(line)
    text = "".join(lines).rstrip().rstrip(",") + "\n}"
    try:
        return dict(json.loads(text))
    except ValueError:
        return {}


def _report_items(path: Path, shard: Shard) -> Iterator[dict[str, Any]]:
    """The items of a shard's report.json, one per line, without loading the file."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            text = line.strip().rstrip(",")
            if text.startswith("{") and line.startswith("    {"):
                item = json.loads(text)
                item["shard"] = shard.label
                yield item
