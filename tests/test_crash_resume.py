"""Crash and signal safety with the real command in a subprocess: kill -9, SIGTERM drain, resume."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from batch_upscaler.emulator import EmulatorThread, RequestRecord
from batch_upscaler.storage.local import OWNER_FILE
from tests.conftest import cli_env, run_cli, write_image

EmulatorFactory = Callable[..., EmulatorThread]


def start_run(manifest: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "batch_upscaler", "run", str(manifest)], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], timeout: float = 60) -> None:
    """Poll until ``condition`` holds (not a timing assumption: it waits for the event itself)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"run ended early: {process.communicate()}"
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def succeeded_hashes(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT key, content_sha256 FROM items WHERE state = 'succeeded'").fetchall())


def ok_responses(records: list[RequestRecord]) -> int:
    return sum(1 for r in records if r.status == 200)


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    return [write_image(tmp_path / "photos" / f"p{i:02d}.png", 90 + i, 70, color=(i * 9 % 256, 7, 200))
            for i in range(12)]


def test_sigkill_mid_run_then_resume(tmp_path: Path, photos: list[Path], write_manifest: Callable[..., Path],
                                     emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(latency_s=0.15)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 3})
    run = start_run(manifest)
    wait_for(lambda: ok_responses(emulator.records()) >= 4, run)
    run.send_signal(signal.SIGKILL)
    run.wait()
    db = tmp_path / ".batch-upscaler" / "job.sqlite"
    done_before = succeeded_hashes(db)
    assert 0 < len(done_before) < len(photos)
    seen_before = len(emulator.records())

    second = run_cli("run", str(manifest), "--endpoint-url", emulator.endpoint_url)
    assert second.returncode == 0, second.stderr

    after_kill = emulator.records()[seen_before:]
    assert not {r.image_sha256 for r in after_kill} & set(done_before.values()), \
        "an image recorded as succeeded was sent again"
    final = succeeded_hashes(db)
    assert len(final) == len(photos)
    for photo in photos:
        assert final[f"photos:{photo.name}"] == hashlib.sha256(photo.read_bytes()).hexdigest()
        with Image.open(tmp_path / "out" / photo.name) as im:
            im.load()  # complete and decodable
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.suffix != ".png"
                 and p.name != OWNER_FILE]
    assert leftovers == [] and not (tmp_path / "out" / ".batch-upscaler-tmp").exists()


def test_first_sigterm_drains_then_resume(tmp_path: Path, photos: list[Path], write_manifest: Callable[..., Path],
                                          emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(latency_s=0.4)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 2})
    run = start_run(manifest)
    wait_for(lambda: len(emulator.records()) >= 1, run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 75, err
    assert "finishing requests in flight" in err
    with sqlite3.connect(tmp_path / ".batch-upscaler" / "job.sqlite") as conn:
        states = dict(conn.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
    assert "in_progress" not in states and states["pending"] > 0
    # Every request the server answered before the drain was recorded: nothing paid is lost.
    assert states.get("succeeded", 0) == ok_responses(emulator.records())
    assert (tmp_path / ".batch-upscaler/reports/job/report.json").exists()
    assert run_cli("run", str(manifest)).returncode == 0


def test_second_signal_cancels_and_checkpoint_stays_consistent(
        tmp_path: Path, photos: list[Path], write_manifest: Callable[..., Path],
        emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(latency_s=5)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 2})
    run = start_run(manifest)
    wait_for(lambda: _in_flight(tmp_path) >= 2, run)
    run.send_signal(signal.SIGINT)
    assert run.stderr is not None
    while "finishing requests in flight" not in (line := run.stderr.readline()):
        assert line, "the run ended without acknowledging the first signal"
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=30)
    assert run.returncode == 75, err
    with sqlite3.connect(tmp_path / ".batch-upscaler" / "job.sqlite") as conn:
        states = dict(conn.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
    assert states == {"pending": len(photos)}


def _in_flight(tmp_path: Path) -> int:
    db = tmp_path / ".batch-upscaler" / "job.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM items WHERE attempts > 0 AND state = 'in_progress'"
                                    ).fetchone()[0])
    except sqlite3.OperationalError:  # the table does not exist yet
        return 0


def test_sigkill_leaves_no_partial_output(tmp_path: Path, write_manifest: Callable[..., Path],
                                          emulator_factory: EmulatorFactory) -> None:
    """Kill while outputs are being written: no half file is ever visible under its final name."""
    photos = [write_image(tmp_path / "photos" / f"q{i}.png", 300, 300, color=(i, i, i)) for i in range(6)]
    emulator = emulator_factory(output_max_pixels=2048 * 2048)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 3})
    run = start_run(manifest)
    wait_for(lambda: ok_responses(emulator.records()) >= 2, run)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    for out in (tmp_path / "out").glob("*.png"):
        with Image.open(out) as im:
            im.load()
    assert run_cli("run", str(manifest), "--endpoint-url", emulator.endpoint_url).returncode == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == len(photos)
    assert not (tmp_path / "out" / ".batch-upscaler-tmp").exists()
