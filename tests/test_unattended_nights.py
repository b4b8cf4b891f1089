"""Unattended nights: an outage blames no image, a bad file alerts once, plan counts what run refuses,
and every way a run ends is worded (issue 10, points 1, 2, 3, 5 and 10).

The outage tests run against an emulator process that is stopped and restarted mid-run, or that
answers 503 to everything for a while; its request log is the bill.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batch_upscaler.cli import main
from batch_upscaler.emulator import EmulatorThread, FaultKind
from batch_upscaler.ending import stop_line
from batch_upscaler.progress import human_duration
from bench.emulator_process import EmulatorProcess
from tests.conftest import cli_env, run_cli, write_image

EmulatorStarter = Callable[..., EmulatorProcess]
EmulatorFactory = Callable[..., EmulatorThread]
FAST_RETRIES = {"backoff_base_s": 0.2, "backoff_max_s": 1.0, "outage_errors": 4}


@pytest.fixture(autouse=True)
def aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")


def photos(tmp_path: Path, n: int) -> list[Path]:
    return [write_image(tmp_path / "photos" / f"p{i:02d}.png", 70 + i, 66, color=(i * 7 % 256, 40, 40))
            for i in range(n)]


def report(tmp_path: Path) -> dict[str, Any]:
    return dict(json.loads((tmp_path / ".batch-upscaler/reports/job/report.json").read_text()))


def statuses(tmp_path: Path) -> Counter[str]:
    return Counter(item["status"] for item in report(tmp_path)["items"])


def test_an_outage_pauses_the_run_and_it_resumes_when_the_service_returns(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process(latency_s=0.2)
    photos(tmp_path, 14)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 2, "max_attempts": 3, **FAST_RETRIES})
    run = subprocess.Popen([sys.executable, "-m", "batch_upscaler", "run", str(manifest)], env=cli_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while sum(1 for r in emulator.records() if r.status == 200) < 3:
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    port = int(emulator.endpoint_url.rsplit(":", 1)[1])
    emulator.stop()  # the service goes away mid-run
    assert run.stderr is not None
    while "the service looks down" not in (line := run.stderr.readline()):
        assert line, "the run ended instead of pausing"
    emulator_process(port=port, latency_s=0.05, log=emulator.log_path)  # and comes back on the same address
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert "the service answers again" in err
    assert statuses(tmp_path) == Counter(succeeded=14)  # no image was blamed for the outage


def test_a_long_outage_stops_with_75_keeps_every_item_pending_and_says_since_when(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process("--fault-rates", '{"service_unavailable": 1.0}')
    photos(tmp_path, 6)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 2, "max_attempts": 3, "outage_wait": "3s", **FAST_RETRIES})
    result = run_cli("run", str(manifest))
    assert result.returncode == 75, result.stderr
    match = re.search(r"stopped: service unreachable since (\d\d:\d\d); run again to resume", result.stderr)
    assert match, result.stderr
    assert report(tmp_path)["stopped"] == f"service unreachable since {match.group(1)}"
    assert statuses(tmp_path) == Counter(pending=6)
    assert len(emulator.records()) < 20  # paused and probed, not hammered: ~4 errors, then one probe at a time


def test_a_503_storm_for_a_while_is_waited_out(tmp_path: Path, write_manifest: Callable[..., Path],
                                               emulator_process: EmulatorStarter) -> None:
    """Every request answered 503 for the first 3 s (``python -m bench.outage`` runs 60 s)."""
    emulator = emulator_process("--fault-rates", '{"service_unavailable": 1.0}', "--fault-window", "0:3")
    photos(tmp_path, 6)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 2, "max_attempts": 3, **FAST_RETRIES})
    result = run_cli("run", str(manifest))
    assert result.returncode == 0, result.stderr
    assert statuses(tmp_path) == Counter(succeeded=6)
    assert "the service looks down" in result.stderr and "the service answers again" in result.stderr


def test_failures_that_were_the_services_state_are_retried_by_a_plain_run(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    paths = photos(tmp_path, 4)
    digest = hashlib.sha256(paths[0].read_bytes()).hexdigest()
    emulator = emulator_factory(faults_by_image={digest: (FaultKind.SERVICE_UNAVAILABLE,) * 3})
    (tmp_path / "photos" / "broken.jpg").write_bytes(_jpeg()[:1500])  # a fact about the file
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"max_attempts": 3})
    assert main(["run", str(manifest)]) == 1
    by_source = {i["source"]: i for i in report(tmp_path)["items"]}
    assert by_source["photos/p00.png"]["error_code"] == "ServiceUnavailableException"  # it alone kept failing
    assert main(["run", str(manifest)]) == 0  # a plain run: the 503 was not about the picture
    by_source = {i["source"]: i for i in report(tmp_path)["items"]}
    assert by_source["photos/p00.png"]["status"] == "succeeded"
    assert by_source["photos/broken.jpg"]["error_code"] == "truncated"  # not retried without --retry-failed


def test_a_permanently_bad_file_alerts_once(tmp_path: Path, write_manifest: Callable[..., Path],
                                            emulator_factory: EmulatorFactory,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    photos(tmp_path, 2)
    for i in range(25):
        (tmp_path / "photos" / f"bad{i:02d}.jpg").write_bytes(b"not a picture")
    emulator = emulator_factory()
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url})
    capsys.readouterr()
    assert main(["run", str(manifest)]) == 1
    err = capsys.readouterr().err
    named = re.findall(r"failed this run: (photos/bad\d\d\.jpg)", err)
    assert named == [f"photos/bad{i:02d}.jpg" for i in range(20)]
    assert "… and 5 more, see " in err and "failed.txt" in err

    assert main(["run", str(manifest)]) == 0  # nothing new: cron sees success
    err = capsys.readouterr().err
    assert "25 item(s) failed in earlier runs and are unchanged" in err and "failed.txt" in err
    assert "failed this run" not in err
    assert main(["run", str(manifest), "--strict-exit"]) == 1  # the old rule, on request
    capsys.readouterr()
    (tmp_path / "photos" / "bad03.jpg").write_bytes(b"still not a picture, but changed")
    assert main(["run", str(manifest)]) == 1  # a changed file that fails is news
    assert re.findall(r"failed this run: (\S+)", capsys.readouterr().err) == ["photos/bad03.jpg:"]


def test_plan_counts_what_run_will_refuse_and_words_first_time_refusals(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory,
        capsys: pytest.CaptureFixture[str]) -> None:
    photos(tmp_path, 2)
    (tmp_path / "photos" / "cut.jpg").write_bytes(_jpeg()[:1500])  # header fine, the rest missing
    (tmp_path / "photos" / "page.jpg").write_text("<html></html>")
    emulator = emulator_factory()
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url})
    capsys.readouterr()
    assert main(["plan", str(manifest)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"requests\s+2 ", text), text
    assert re.search(r"will be refused\s+1 truncated", text) and re.search(r"will be refused\s+1 unreadable", text)
    assert "failed earlier" not in text and "--retry-failed" not in text
    assert main(["run", str(manifest)]) == 1
    assert len(emulator.records()) == 2  # exactly what plan said
    assert main(["plan", str(manifest)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"failed earlier\s+1 truncated", text) and "--retry-failed" in text


def test_plan_reads_a_snapshot_while_a_run_holds_the_lock(
        tmp_path: Path, write_manifest: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    """``plan`` only reads: it works on a copy of the checkpoint while a run holds the job's lock,
    and writes nothing back."""
    from batch_upscaler.joblock import JobLock

    photos(tmp_path, 3)
    manifest = write_manifest()
    assert main(["run", str(manifest), "--max-images", "1"]) == 75
    state = tmp_path / ".batch-upscaler"
    before = (state / "job.sqlite").read_bytes()
    capsys.readouterr()
    with JobLock(state / "job.lock", "job"):  # a run is going on
        assert main(["plan", str(manifest), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert (planned["already_done"], planned["to_process"]) == (1, 2)
    assert (state / "job.sqlite").read_bytes() == before  # (reading opens the WAL; nothing is written to it)
    assert not (state / "job.sqlite-wal").exists() or (state / "job.sqlite-wal").stat().st_size == 0


def test_every_way_a_run_ends_has_its_own_words() -> None:
    assert stop_line(None, 0) == "done"
    assert stop_line("SIGTERM", 7).startswith("stopped by SIGTERM")
    assert stop_line("max-images", 3).startswith("stopped: --max-images reached")
    assert stop_line("max-cost", 3).startswith("stopped: the next request would pass the cost cap")
    assert stop_line("max-duration", 3).startswith("stopped: --max-duration reached")
    assert stop_line("service unreachable since 02:13", 3) == \
        "stopped: service unreachable since 02:13; run again to resume"
    assert stop_line("SIGTERM", 0) == "done"  # nothing left: the signal cost nothing
    assert [human_duration(s) for s in (20, 59.4, 90, 3600, 7200 * 3)] == ["20 s", "59 s", "1.5 min", "60.0 min",
                                                                           "6.0 h"]


def test_max_images_says_why_it_stopped(tmp_path: Path, write_manifest: Callable[..., Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    photos(tmp_path, 3)
    manifest = write_manifest()
    capsys.readouterr()
    assert main(["run", str(manifest), "--max-images", "1"]) == 75
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopped: --max-images reached; run again to continue: 1 succeeded" in last and "2 pending" in last


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((300, 300), 50).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()
