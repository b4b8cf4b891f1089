"""Unattended (cron) operation: caps that stop cleanly with exit 75, quiet progress, grace period, stale locks."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from batch_upscaler.emulator import EmulatorThread
from tests.conftest import cli_env, run_cli, write_image

EmulatorFactory = Callable[..., EmulatorThread]


def photos(tmp_path: Path, n: int) -> None:
    for i in range(n):
        write_image(tmp_path / "photos" / f"p{i:02d}.png", 70 + i, 66, color=(i * 11 % 256, 2, 3))


def states(tmp_path: Path) -> dict[str, int]:
    with sqlite3.connect(tmp_path / ".batch-upscaler" / "job.sqlite") as conn:
        return dict(conn.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())


def test_max_duration_stops_starting_work_and_exits_75(tmp_path: Path, write_manifest: Callable[..., Path],
                                                       emulator_factory: EmulatorFactory) -> None:
    photos(tmp_path, 20)
    emulator = emulator_factory(latency_s=0.2)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 1})
    first = run_cli("run", str(manifest), "--max-duration", "0.5s")
    assert first.returncode == 75, first.stderr
    assert "max-duration: no new image starts" in first.stderr
    done = states(tmp_path)
    assert "in_progress" not in done and 0 < done.get("succeeded", 0) < 20
    assert run_cli("run", str(manifest)).returncode == 0
    assert states(tmp_path) == {"succeeded": 20}


def test_max_images_exits_75_until_done(tmp_path: Path, write_manifest: Callable[..., Path]) -> None:
    photos(tmp_path, 5)
    manifest = write_manifest()
    assert run_cli("run", str(manifest), "--max-images", "3").returncode == 75
    assert states(tmp_path) == {"succeeded": 3, "pending": 2}
    assert run_cli("run", str(manifest), "--max-images", "3").returncode == 0


def test_without_a_terminal_there_is_no_bar_but_a_summary_line(tmp_path: Path, write_manifest: Callable[..., Path],
                                                                emulator_factory: EmulatorFactory) -> None:
    photos(tmp_path, 6)
    emulator = emulator_factory(latency_s=0.25)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 1})
    result = run_cli("run", str(manifest), "--progress-interval", "0.3")
    assert result.returncode == 0
    lines = [line for line in result.stderr.splitlines() if "progress: " in line]
    assert lines, result.stderr
    assert "img/min" in lines[-1] and "/6 done" in lines[-1]
    assert "\r" not in result.stderr and "%|" not in result.stderr  # no tqdm bar without a TTY


def test_grace_period_ends_a_drain_that_takes_too_long(tmp_path: Path, write_manifest: Callable[..., Path],
                                                       emulator_factory: EmulatorFactory) -> None:
    photos(tmp_path, 4)
    emulator = emulator_factory(latency_s=30)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 2})
    proc = subprocess.Popen([sys.executable, "-m", "batch_upscaler", "run", str(manifest), "--grace", "0.5"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not _two_in_flight(tmp_path):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 75, err
    assert time.monotonic() - started < 15  # the 30 s requests were not waited for
    assert "grace period of 0.5s over" in err
    assert states(tmp_path) == {"pending": 4}


def _two_in_flight(tmp_path: Path) -> bool:
    """Two requests are on the wire (sent, unanswered): not merely started items, which a stop
    releases before they send anything."""
    try:
        with sqlite3.connect(tmp_path / ".batch-upscaler" / "job.sqlite") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM items WHERE in_flight = 1").fetchone()[0]) >= 2
    except sqlite3.OperationalError:
        return False


def test_a_lock_file_left_by_a_dead_process_does_not_block(tmp_path: Path, write_manifest: Callable[..., Path]) -> None:
    photos(tmp_path, 1)
    manifest = write_manifest()
    lock = tmp_path / ".batch-upscaler" / "job.lock"
    lock.parent.mkdir()
    lock.write_text("999999\n")  # a PID that is not running, and no flock held
    result = run_cli("run", str(manifest))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / ".batch-upscaler/reports/job/report.json").read_text())
    assert report["totals"]["succeeded"] == 1


def test_a_live_holder_makes_a_second_run_exit_4_at_once(tmp_path: Path, write_manifest: Callable[..., Path],
                                                         emulator_factory: EmulatorFactory) -> None:
    photos(tmp_path, 3)
    emulator = emulator_factory(latency_s=5)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url})
    holder = subprocess.Popen([sys.executable, "-m", "batch_upscaler", "run", str(manifest)], env=cli_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not emulator.records() and not _two_in_flight(tmp_path):
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        second = run_cli("run", str(manifest))
        assert second.returncode == 4
        assert f"already running (PID {holder.pid})" in second.stderr
    finally:
        holder.kill()
        holder.wait()
