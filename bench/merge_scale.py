"""Scenario ``merge``: ``report --merge`` over 32 shards of 30,000 items each (issue 12).

The shard reports are made from a real one: a small job (embedded emulator, 12 images and one
unreadable file) is run as shard 0 of 2 by ``batch-upscaler run``, and its ``report.json`` and
``done.json`` are the template. Each of the merge's shards gets a ``report.json`` holding 30,000
of the template's item lines with distinct names (succeeded and failed items in the template's
mix) and a ``done.json`` naming its index. ``batch-upscaler report --merge`` (the CLI's own
``main``) then runs in a fresh process, which reports its wall time and its own peak RSS (VmHWM).

The baseline is the same merge over 4 shards (120,000 items), measured in the same run: memory is
flat when the 32-shard merge's peak RSS stays within 1.25x of it with 8x the items.

Targets: 32 x 30,000 merged in < 30 s; peak RSS <= 1.25x the 4-shard merge's; the merged
report.json lists every item once; exit 1 (the template's failed item, in every shard).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from batch_upscaler.cli import main as cli_main
from batch_upscaler.shards import shard_of
from bench.child_server import REPO
from bench.corpus import distinct_pngs
from bench.resources import emit, in_fresh_process, peak_rss_mb
from bench.table import Check, Column, Row, ScenarioResult
from bench.workspace import Workspace

NAME = "merge"
SHARDS, BASELINE_SHARDS, SMOKE_SHARDS, SMOKE_BASELINE_SHARDS = 32, 4, 8, 2
ITEMS, SMOKE_ITEMS = 30_000, 300  # per shard
TIME_TARGET_S = 30.0
RSS_RATIO_TARGET = 1.25
TEMPLATE_IMAGES = 12
CHILD_TIMEOUT_S = 900.0
_ITEMS_LINE = '  "items": ['

COLUMNS = (
    Column("variant", "merge"), Column("shards", "shards"), Column("items", "items"),
    Column("merged_items", "items in report.json"), Column("exit_code", "exit"),
    Column("elapsed_s", "wall s", "{:.1f}"), Column("items_per_s", "items/s", "{:.0f}"),
    Column("peak_rss_mb", "peak RSS MB", "{:.0f}"), Column("rss_ratio", "RSS × baseline", "{:.2f}"),
)


def add_child_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--merge-manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--merge-count", type=int, help=argparse.SUPPRESS)


def child(args: argparse.Namespace) -> None:
    """In a fresh process: ``batch-upscaler report MANIFEST --merge --shard-count N``, timed."""
    started = time.monotonic()
    code = cli_main(["report", str(args.merge_manifest), "--merge", "--shard-count", str(args.merge_count), "-q"])
    emit({"elapsed_s": time.monotonic() - started, "exit_code": code, "peak_rss_mb": peak_rss_mb()})


def run(workspace: Workspace) -> ScenarioResult:
    shards, baseline_shards = (SMOKE_SHARDS, SMOKE_BASELINE_SHARDS) if workspace.smoke else (SHARDS, BASELINE_SHARDS)
    items = SMOKE_ITEMS if workspace.smoke else ITEMS
    work = workspace.fresh(NAME)
    template = _template(workspace, work / "template")
    baseline = _measure(work / "baseline", template, baseline_shards, items)
    full = _measure(work / "full", template, shards, items)
    for row in (baseline, full):
        row["rss_ratio"] = row["peak_rss_mb"] / baseline["peak_rss_mb"]
    result = ScenarioResult(NAME, workspace.smoke, COLUMNS, [baseline | {"variant": "baseline"},
                                                            full | {"variant": "at scale"}])
    result.notes.append(f"shard reports made from a real shard's report.json ({template.failed_share:.0%} failed "
                        "items); `batch-upscaler report --merge` in a fresh process, VmHWM as its peak RSS")
    result.checks = [
        Check(f"{shards} x {items} merged in s", full["elapsed_s"], f"< {TIME_TARGET_S:.0f}",
              full["elapsed_s"] < TIME_TARGET_S),
        Check(f"peak RSS vs {baseline_shards}-shard merge", full["rss_ratio"], f"<= {RSS_RATIO_TARGET}",
              full["rss_ratio"] <= RSS_RATIO_TARGET),
        Check("merged items == shard items", full["merged_items"], str(full["items"]),
              full["merged_items"] == full["items"] and baseline["merged_items"] == baseline["items"]),
        Check("merge exit code (failed items present)", full["exit_code"], "1", full["exit_code"] == 1),
    ]
    return result


class Template:
    """A real shard's report: its header lines, item dicts, closing lines, done.json and manifest."""

    def __init__(self, report: Path, done: Path, manifest: dict[str, Any]) -> None:
        lines = report.read_text(encoding="utf-8").splitlines(keepends=True)
        start = lines.index(_ITEMS_LINE + "\n")
        end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("    {"))
        self.header, self.footer = "".join(lines[:start + 1]), "".join(lines[end:])
        self.items = [json.loads(line.strip().rstrip(",")) for line in lines[start + 1:end]]
        self.done: dict[str, Any] = json.loads(done.read_text(encoding="utf-8"))
        self.manifest = manifest
        self.failed_share = sum(1 for item in self.items if item["status"] == "failed") / len(self.items)

    def item_lines(self, shard: int, count: int) -> Iterator[str]:
        for n in range(count):
            item = dict(self.items[n % len(self.items)])
            name = f"s{shard:02d}/img{n:06d}"
            item["source"] = f"photos/{name}.png"
            if item.get("output"):
                item["output"] = f"out/{name}.png"
            yield "    " + json.dumps(item, ensure_ascii=False) + (",\n" if n < count - 1 else "\n")


def _template(workspace: Workspace, work: Path) -> Template:
    """Run a small job as shard 0 of 2 on the embedded emulator; its report is the template."""
    photos = work / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for path in sorted(distinct_pngs(workspace.corpus_dir(f"merge-{TEMPLATE_IMAGES}"), TEMPLATE_IMAGES).glob("*.png")):
        (photos / path.name).write_bytes(path.read_bytes())
    # One truncated file that lands in shard 0 (keys are "<source as written>:<name>"): it fails there.
    broken = next(name for name in (f"broken-{n}.png" for n in range(64)) if shard_of(f"{photos}:{name}", 2) == 0)
    (photos / broken).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    doc = {"version": 1, "name": "archive", "sources": [str(photos)], "output": {"dir": str(work / "out")},
           "model": {"name": "fast"}, "backend": "emulator",
           "emulator": {"output_max_pixels": 256 * 256}, "limits": {"requests_per_minute": 6000},
           "state_dir": str(work / "state"), "report_dir": str(work / "reports")}
    manifest = work / "archive.yaml"
    manifest.write_text(yaml.safe_dump(doc), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "batch_upscaler", "run", str(manifest), "--shard-count", "2",
                    "--shard-index", "0", "--no-progress", "-q"], cwd=REPO, check=False, timeout=300)
    shard_dir = work / "reports" / "shards" / "0000-of-0002"
    return Template(shard_dir / "report.json", shard_dir / "done.json", doc)


def _measure(work: Path, template: Template, shards: int, items: int) -> Row:
    reports = work / "reports"
    for index in range(shards):
        shard_dir = reports / "shards" / f"{index:04d}-of-{shards:04d}"
        shard_dir.mkdir(parents=True, exist_ok=True)
        with (shard_dir / "report.json").open("w", encoding="utf-8") as report:
            report.write(template.header)
            report.writelines(template.item_lines(index, items))
            report.write(template.footer)
        done = template.done | {"shard": index, "count": shards}
        (shard_dir / "done.json").write_text(json.dumps(done), encoding="utf-8")
    manifest = work / "archive.yaml"
    doc = template.manifest | {"state_dir": str(work / "state"), "report_dir": str(reports)}
    manifest.write_text(yaml.safe_dump(doc), encoding="utf-8")
    measured = in_fresh_process([NAME, "--merge-manifest", str(manifest), "--merge-count", str(shards)],
                                CHILD_TIMEOUT_S)
    merged = _count_items(reports / "report.json")
    total = shards * items
    return {"shards": shards, "items": total, "merged_items": merged, "exit_code": measured["exit_code"],
            "elapsed_s": measured["elapsed_s"], "items_per_s": total / measured["elapsed_s"],
            "peak_rss_mb": measured["peak_rss_mb"], "report_mb": os.path.getsize(reports / "report.json") / 2**20}


def _count_items(report: Path) -> int:
    with report.open(encoding="utf-8") as fh:
        return sum(1 for line in fh if line.startswith("    {"))
