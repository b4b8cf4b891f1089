"""metrics.prom read back with prometheus_client's own parser: exact values, names dashboards use, mode 0644."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batch_upscaler.checkpoint import Checkpoint, ItemState, Scanned
from batch_upscaler.metrics import write_metrics

LAST_SUCCESS = 1796190000.123
ATTEMPTS, THROTTLES = 10_000_001, 1_234_567
PRICE = 0.40
EXPOSED = {  # name -> type, exactly as dashboards and alerts know them
    "batch_upscaler_images": "gauge",
    "batch_upscaler_requests_total": "counter",
    "batch_upscaler_throttles_total": "counter",
    "batch_upscaler_retries_total": "counter",
    "batch_upscaler_requests_saved_total": "counter",
    "batch_upscaler_estimated_cost_usd": "gauge",
    "batch_upscaler_last_success_timestamp_seconds": "gauge",
}


def _scanned(key: str, seq: int, state: ItemState = ItemState.PENDING) -> Scanned:
    return Scanned(key=key, seq=seq, source="p", relpath=key, size=10, mtime_ns=1, params_hash="h",
                   state=state, output_path=f"{key}.png")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Checkpoint:
    path = tmp_path / "job.sqlite"
    cp = Checkpoint.open(path, "job", now=lambda: LAST_SUCCESS)
    with cp.scan():
        cp.record_scanned(_scanned("a", 1))
        cp.record_scanned(_scanned("b", 2))
        cp.record_scanned(_scanned("c", 3, ItemState.SKIPPED))
    cp.start("a")
    cp.count_attempt("a")
    cp.succeed("a", 100, (400, 300))
    with sqlite3.connect(path) as conn:  # a long job's totals, without sending ten million requests
        conn.execute("UPDATE items SET attempts = ?, throttles = ? WHERE key = 'a'", (ATTEMPTS, THROTTLES))
    return cp


def test_values_read_back_exactly(checkpoint: Checkpoint, tmp_path: Path) -> None:
    path = tmp_path / "textfile" / "metrics.prom"
    write_metrics(path, 'my "job"', checkpoint, PRICE)
    text = path.read_text()
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["batch_upscaler_last_success_timestamp_seconds"].value == LAST_SUCCESS
    assert samples["batch_upscaler_requests_total"].value == ATTEMPTS
    assert samples["batch_upscaler_throttles_total"].value == THROTTLES
    assert samples["batch_upscaler_retries_total"].value == ATTEMPTS - 1
    assert samples["batch_upscaler_requests_saved_total"].value == 0
    assert samples["batch_upscaler_estimated_cost_usd"].value == pytest.approx((ATTEMPTS - THROTTLES) * PRICE,
                                                                                rel=1e-12)
    assert all(s.labels["job"] == 'my "job"' for s in samples.values())
    images = {s.labels["state"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "batch_upscaler_images"}
    assert images == {"pending": 1, "in_progress": 0, "succeeded": 1, "failed": 0, "skipped": 1}


def test_names_help_and_type_lines_are_unchanged(checkpoint: Checkpoint, tmp_path: Path) -> None:
    path = tmp_path / "metrics.prom"
    write_metrics(path, "job", checkpoint, PRICE)
    lines = path.read_text().splitlines()
    assert {line.split()[2]: line.split()[3] for line in lines if line.startswith("# TYPE ")} == EXPOSED
    assert {line.split()[2] for line in lines if line.startswith("# HELP ")} == set(EXPOSED)
    assert {line.split("{")[0] for line in lines if not line.startswith("#")} == set(EXPOSED)  # no _created


def test_file_is_world_readable_and_alone(checkpoint: Checkpoint, tmp_path: Path) -> None:
    path = tmp_path / "metrics.prom"
    old = os.umask(0o077)  # a strict cron umask must not hide the file from the collector's user
    try:
        write_metrics(path, "job", checkpoint, PRICE)
        write_metrics(path, "job", checkpoint, PRICE)  # rewritten in place, atomically
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("metrics")] == ["metrics.prom"]
