"""Operator experience: plan matches the run, cost cap, JSON logs, metrics.prom, failed.txt and --only."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from batch_upscaler.cli import main
from batch_upscaler.emulator import EmulatorThread, FaultKind
from tests.conftest import write_image

EmulatorFactory = Callable[..., EmulatorThread]


@pytest.fixture(autouse=True)
def aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")


def report(tmp_path: Path) -> dict[str, Any]:
    return dict(json.loads((tmp_path / ".batch-upscaler/reports/job/report.json").read_text()))


def archive(tmp_path: Path) -> None:
    """12 photos: 3 of them share one content, one is too small, one is a panorama."""
    for i in range(8):
        write_image(tmp_path / "photos" / f"p{i}.png", 80 + i, 72, color=(i * 30, 5, 5))
    twin = io.BytesIO()
    Image.new("RGB", (90, 90), (9, 9, 9)).save(twin, "PNG")
    for name in ("twin-a.png", "twin-b.png", "twin-c.png"):
        (tmp_path / "photos" / name).write_bytes(twin.getvalue())
    write_image(tmp_path / "photos" / "tiny.png", 40, 40)
    write_image(tmp_path / "photos" / "pano.png", 500, 100)


def plan(manifest: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["plan", str(manifest), "--json", *flags]) == 0
    return dict(json.loads(capsys.readouterr().out))


def db_rows(tmp_path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp_path / ".batch-upscaler" / "job.sqlite") as conn:
        return conn.execute("SELECT * FROM items ORDER BY key").fetchall()


def test_plan_on_a_half_finished_job_matches_the_run(tmp_path: Path, write_manifest: Callable[..., Path],
                                                     emulator_factory: EmulatorFactory,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    archive(tmp_path)
    emulator = emulator_factory()
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              prepare={"aspect": "skip"}, limits={"concurrency": 1})
    assert main(["run", str(manifest), "--max-images", "4"]) == 75
    write_image(tmp_path / "photos" / "p0.png", 100, 100, color=(1, 2, 3))  # changed since the run
    write_image(tmp_path / "photos" / "new.png", 99, 77, color=(7, 7, 7))
    before_rows, before_requests = db_rows(tmp_path), len(emulator.records())
    planned = plan(manifest, capsys)
    assert db_rows(tmp_path) == before_rows and len(emulator.records()) == before_requests  # a dry run
    assert planned["files_found"] == 14 and planned["new"] == 1 and planned["changed"] == 1
    assert planned["skipped_by_reason"] == {"aspect_ratio": 1, "too_small": 1}

    assert main(["run", str(manifest)]) == 0
    done = report(tmp_path)
    assert len(emulator.records()) - before_requests == planned["requests"]
    assert done["skips_by_reason"] == planned["skipped_by_reason"]
    assert planned["deduplicated"] >= 1 and done["requests_saved_by_dedup"] >= planned["deduplicated"]
    assert planned["estimated_cost_usd"] == pytest.approx(planned["requests"] * 0.40)
    assert plan(manifest, capsys)["requests"] == 0


def test_plan_text_output(tmp_path: Path, write_manifest: Callable[..., Path],
                          capsys: pytest.CaptureFixture[str]) -> None:
    archive(tmp_path)
    manifest = write_manifest(limits={"requests_per_minute": 30})
    assert main(["plan", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "requests          10 (2 duplicates will be copied, not sent)" in out
    assert "will be skipped   1 too_small" in out
    assert "$4.00 at $0.40/image (estimate" in out and "20 s at 30 requests/min" in out


def test_cost_cap_stops_at_the_right_item_and_the_next_run_continues(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    for i in range(12):
        write_image(tmp_path / "photos" / f"c{i:02d}.png", 70 + i, 70, color=(i, 0, 0))
    emulator = emulator_factory()
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 3})
    assert main(["run", str(manifest), "--max-cost", "2.00"]) == 75  # $0.40 each: 5 fit
    first = report(tmp_path)
    assert len(emulator.records()) == 5 and first["totals"]["succeeded"] == 5
    assert first["last_run_spent_usd"] == 2.0 and first["estimated_cost_usd"] == 2.0
    assert main(["run", str(manifest), "--max-cost", "2.00"]) == 75
    assert len(emulator.records()) == 10
    assert main(["run", str(manifest), "--max-cost", "2.00"]) == 0
    assert report(tmp_path)["totals"]["succeeded"] == 12 and len(emulator.records()) == 12


def test_json_logs_metrics_failed_list_and_only(tmp_path: Path, write_manifest: Callable[..., Path],
                                                emulator_factory: EmulatorFactory,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    paths = [write_image(tmp_path / "photos" / f"m{i}.png", 80 + i, 80, color=(i, 9, 9)) for i in range(4)]
    bad = hashlib.sha256(paths[2].read_bytes()).hexdigest()
    emulator = emulator_factory(faults_by_image={bad: (FaultKind.VALIDATION,)})
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url})
    capsys.readouterr()
    assert main(["run", str(manifest), "--log-format", "json"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines and all({"timestamp", "level", "job", "event", "file", "attempt", "error_code"} <= set(x)
                         for x in lines)
    failure = next(x for x in lines if x["event"] == "item_failed")
    assert (failure["job"], failure["file"], failure["error_code"]) == ("job", "photos/m2.png", "ValidationException")
    assert {x["event"] for x in lines} >= {"scan", "item_failed", "run_finished"}

    reports = tmp_path / ".batch-upscaler/reports/job"
    families = {f.name: f for f in text_string_to_metric_families((reports / "metrics.prom").read_text())}
    images = {s.labels["state"]: s.value for s in families["batch_upscaler_images"].samples}
    assert images["succeeded"] == 3 and images["failed"] == 1
    assert families["batch_upscaler_requests"].samples[0].value == 4
    assert families["batch_upscaler_estimated_cost_usd"].samples[0].value == pytest.approx(1.6)
    assert families["batch_upscaler_last_success_timestamp_seconds"].samples[0].value > 1.7e9

    failed_list = reports / "failed.txt"
    assert failed_list.read_text() == "photos/m2.png\n"
    only = tmp_path / "redo.txt"
    shutil.copy(failed_list, only)
    with only.open("a") as fh:
        fh.write("# a comment\nphotos/m0.png\nphotos/not-there.png\n")
    assert main(["run", str(manifest), "--only", str(only)]) == 0
    assert len(emulator.records()) == 5  # only m2 was sent again; m0 was already done
    assert failed_list.read_text() == ""
    assert "photos/not-there.png is not an item" in capsys.readouterr().err


@pytest.mark.parametrize(("max_images", "expected"), [(None, 2503), (1001, 1001), (2500, 2500)])
def test_plan_walks_pending_items_a_page_at_a_time_and_stops_at_max_images(
        tmp_path: Path, write_manifest: Callable[..., Path], capsys: pytest.CaptureFixture[str],
        max_images: int | None, expected: int) -> None:
    """More items than one page (1,000), two of them with equal bytes: counted across pages, never held."""
    photos = tmp_path / "photos"
    photos.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(png, "PNG")
    for n in range(2502):  # distinct sizes' worth of names, one shared content: a pair of twins at the end
        (photos / f"p{n:05d}.png").write_bytes(png.getvalue() if n >= 2500 else _tiny_png(n))
    (photos / "twin.png").write_bytes(png.getvalue())
    manifest = write_manifest(limits={"requests_per_minute": 600})
    flags = () if max_images is None else ("--max-images", str(max_images))
    planned = plan(manifest, capsys, *flags)
    assert planned["to_process"] == expected
    assert planned["deduplicated"] == (2 if max_images is None else 0)
    assert planned["requests"] == expected - planned["deduplicated"]


def _tiny_png(n: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (n % 251, n // 251 % 251, 3)).save(out, "PNG")
    return out.getvalue()
