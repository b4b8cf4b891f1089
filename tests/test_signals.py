"""Signals at any instant, and what a stop costs: the real command in a subprocess, an emulator
process whose request log is the bill (issue 9, points 11, 12 and 13).

The long version of the random-instant test (50 signals) is ``python -m bench.signals``.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.emulator_process import EmulatorProcess
from tests.conftest import cli_env, manifest_doc, run_cli, write_image

EmulatorStarter = Callable[..., EmulatorProcess]
INTERPRETER_START_S = 0.04


def start(manifest: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "batch_upscaler", "run", str(manifest), *flags], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def job(directory: Path, endpoint: str, images: int, **overrides: Any) -> Path:
    for i in range(images):
        write_image(directory / "photos" / f"p{i:03d}.png", 70 + i % 40, 66, color=(i % 256, i // 256, 77))
    manifest = directory / "job.yaml"
    manifest.write_text(yaml.safe_dump(manifest_doc(backend="bedrock", bedrock={"endpoint_url": endpoint},
                                                    **overrides)))
    return manifest


def states(directory: Path) -> Counter[str]:
    db = directory / ".batch-upscaler" / "job.sqlite"
    if not db.exists():
        return Counter()
    with sqlite3.connect(db) as conn:
        return Counter(dict(conn.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall()))


def in_flight(directory: Path) -> int:
    try:
        with sqlite3.connect(directory / ".batch-upscaler" / "job.sqlite") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM items WHERE in_flight = 1").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def attempts(directory: Path) -> int:
    try:
        with sqlite3.connect(directory / ".batch-upscaler" / "job.sqlite") as conn:
            return int(conn.execute("SELECT COALESCE(SUM(attempts), 0) FROM items").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"run ended early: {process.communicate()}"
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


def signal_at_random_instants(base: Path, emulator: EmulatorProcess, runs: int, seed: int) -> Counter[str]:
    """Start a run, send SIGINT or SIGTERM at a seeded random instant in [0.04, 3 s], check how it ends."""
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    for n in range(runs):
        directory = base / f"run{n:02d}"
        manifest = job(directory, emulator.endpoint_url, 45, limits={"concurrency": 3})
        process = start(manifest)
        # The instant under test: any moment of start-up, scan, pool or report. The first ~15 ms
        # are the Python interpreter starting, before any code of ours can run (a SIGTERM there
        # ends the process by its default action, before anything was done): not drawn.
        time.sleep(rng.uniform(INTERPRETER_START_S, 3.0))
        process.send_signal(rng.choice((signal.SIGINT, signal.SIGTERM)))
        _, err = process.communicate(timeout=120)
        final = states(directory)
        if process.returncode == 0:
            assert final == Counter(succeeded=45), (n, final, err)
            outcomes["finished first"] += 1
            continue
        assert process.returncode == 75, (n, process.returncode, err)
        assert "Traceback" not in err and "internal error" not in err, err
        assert final["in_progress"] == 0 and final["succeeded"] < 45, (n, final)
        if final:  # it got as far as opening the checkpoint: a report says where it stopped
            report = json.loads((directory / ".batch-upscaler/reports/job/report.json").read_text())
            assert report["stopped"] in ("SIGINT", "SIGTERM"), report["stopped"]
        outcomes["stopped"] += 1
    return outcomes


def test_a_signal_at_any_instant_ends_with_75_and_a_report(tmp_path: Path,
                                                           emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process(latency_s=0.2)
    outcomes = signal_at_random_instants(tmp_path, emulator, runs=6, seed=2026)
    assert outcomes["stopped"] >= 4, outcomes  # most signals land before the ~4 s of work is done


def test_after_the_first_signal_no_request_starts_and_retry_after_is_capped(
        tmp_path: Path, emulator_process: EmulatorStarter) -> None:
    # Every request throttled, with a Retry-After of a day.
    emulator = emulator_process("--fault-rates", '{"throttle": 1.0}', "--retry-after", "86400")
    manifest = job(tmp_path, emulator.endpoint_url, 4,
                   limits={"concurrency": 2, "max_attempts": 50, "retry_after_max_s": 0.3,
                           "requests_per_minute": 6000, "backoff_base_s": 0.01, "backoff_max_s": 0.05})
    process = start(manifest)
    wait_for(lambda: len(emulator.records()) >= 6, process)  # capped at 0.3 s, it keeps trying: not stalled
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 75, err
    assert time.time() - sent < 5  # no day-long wait, no grace period used up
    late = [r for r in emulator.records() if (r.received_at or 0.0) > sent + 0.05]
    assert late == [], "requests started after the first SIGTERM"
    assert states(tmp_path) == Counter(pending=4)


def test_possibly_billed_attempts_are_capped_across_runs(tmp_path: Path,
                                                        emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process(latency_s=30)
    manifest = job(tmp_path, emulator.endpoint_url, 4, limits={"concurrency": 2})
    for kill in range(1, 3):  # killed twice while the same two images' requests are on the wire
        process = start(manifest)
        wait_for(lambda k=kill: in_flight(tmp_path) == 2 and attempts(tmp_path) == 2 * k, process)  # type: ignore[misc]
        time.sleep(0.3)  # let the two requests leave: they were recorded in flight before they were sent
        process.send_signal(signal.SIGKILL)
        process.wait()
    quick = emulator_process()  # the third run gets quick answers (and its own bill)
    manifest.write_text(manifest.read_text().replace(emulator.endpoint_url, quick.endpoint_url))
    third = run_cli("run", str(manifest))
    assert third.returncode == 1, third.stderr
    report = json.loads((tmp_path / ".batch-upscaler/reports/job/report.json").read_text())
    by_code = Counter(item["error_code"] for item in report["items"])
    assert by_code == Counter({None: 2, "possibly_billed_cap": 2}), by_code
    assert report["possibly_billed_not_received"] == 4
    assert len(quick.records()) == 2  # the two capped images were not sent a third time
    retried = run_cli("run", str(manifest), "--retry-failed")
    assert retried.returncode == 0, retried.stderr
    assert len(quick.records()) == 4


def test_a_second_signal_counts_the_cancelled_requests_as_possibly_billed(
        tmp_path: Path, emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process(latency_s=30)
    manifest = job(tmp_path, emulator.endpoint_url, 3, limits={"concurrency": 2})
    process = start(manifest)
    wait_for(lambda: in_flight(tmp_path) == 2, process)
    process.send_signal(signal.SIGINT)
    assert process.stderr is not None
    while "finishing requests in flight" not in (line := process.stderr.readline()):
        assert line, "the run ended without acknowledging the first signal"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 75, err
    with sqlite3.connect(tmp_path / ".batch-upscaler" / "job.sqlite") as conn:
        billed = sorted(n for (n,) in conn.execute("SELECT possibly_billed FROM items"))
    assert billed == [0, 1, 1] and states(tmp_path) == Counter(pending=3)
