"""End-to-end runs over real HTTP: the runner's aiobotocore client against the emulator."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batch_upscaler.bedrock import BedrockInvoker, ClientSettings, open_client
from batch_upscaler.cli import main
from batch_upscaler.emulator import EmulatorThread, FaultKind
from batch_upscaler.joblock import JobLock
from batch_upscaler.payload import build_body
from batch_upscaler.retry import Action, AttemptError, Backoff, decide
from batch_upscaler.storage.local import OWNER_FILE
from tests.conftest import REPO, image_bytes, write_image

EmulatorFactory = Callable[..., EmulatorThread]


@pytest.fixture(autouse=True)
def dummy_aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # backend: bedrock with endpoint_url uses the default credential chain, as a real run does.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def report(tmp_path: Path, job: str = "job") -> dict[str, Any]:
    return dict(json.loads((tmp_path / ".batch-upscaler" / "reports" / job / "report.json").read_text()))


def by_source(rep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["source"]: item for item in rep["items"]}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_manifest_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(REPO / "manifests", tmp_path / "manifests")
    manifest = tmp_path / "manifests" / "demo.yaml"
    assert main(["run", str(manifest)]) == 0  # the too-small sample is skipped, not failed
    rep = json.loads((tmp_path / ".batch-upscaler/reports/demo/report.json").read_text())
    assert rep["totals"] == {"discovered": 7, "succeeded": 6, "failed": 0, "skipped": 1, "pending": 0,
                             "in_progress": 0}
    assert rep["skips_by_reason"] == {"too_small": 1}
    assert rep["requests"] == 6 and rep["throttled_attempts"] == 0
    items = by_source(rep)
    assert items["demo-images/catalogue/icon-too-small.png"]["error_message"] == "too_small: 48x48 < 64 px"
    outputs = sorted(p for p in (tmp_path / "demo-output").rglob("*") if p.is_file() and not p.name.startswith("."))
    assert (tmp_path / "demo-output" / OWNER_FILE).is_file()  # the output root is claimed by job "demo"
    assert [p.relative_to(tmp_path / "demo-output").as_posix() for p in outputs] == [
        "1970s/beach.png", "1970s/birthday.png", "garden.png", "mug.png", "portrait.png", "teapot.png"]
    for item in rep["items"]:
        if item["status"] != "succeeded":
            continue
        with Image.open(item["output"]) as im:
            assert im.format == "PNG" and list(im.size) == item["output_size"]
        assert item["scale_factor"] == round(item["output_size"][0] / item["input_size"][0], 4)
    assert rep["scale_factor"]["min"] <= rep["scale_factor"]["median"] <= rep["scale_factor"]["max"]
    rows = list(csv.DictReader((tmp_path / ".batch-upscaler/reports/demo/items.csv").open()))
    assert len(rows) == 7 and {r["status"] for r in rows} == {"succeeded", "skipped"}
    assert "too_small (1)" in (tmp_path / ".batch-upscaler/reports/demo/report.md").read_text()

    # A second run finds nothing to do and pays for nothing.
    assert main(["run", str(manifest)]) == 0
    rep2 = json.loads((tmp_path / ".batch-upscaler/reports/demo/report.json").read_text())
    assert rep2["requests"] == 6 and rep2["runs"] == 2
    capsys.readouterr()
    assert main(["status", str(manifest)]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["succeeded"] == 6


def make_photos(tmp_path: Path, n: int) -> list[Path]:
    return [write_image(tmp_path / "photos" / f"img{i:02d}.png", 96 + i, 80, color=(i * 20 % 256, 50, 90))
            for i in range(n)]


def bedrock_manifest(write_manifest: Callable[..., Path], emulator: EmulatorThread, **overrides: Any) -> Path:
    return write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url}, **overrides)


def test_throttling_below_configured_rate_still_completes(tmp_path: Path, write_manifest: Callable[..., Path],
                                                          emulator_factory: EmulatorFactory) -> None:
    make_photos(tmp_path, 8)
    emulator = emulator_factory(quota_rpm=240, quota_burst=2)
    manifest = bedrock_manifest(write_manifest, emulator,
                                limits={"concurrency": 4, "requests_per_minute": 6000, "max_attempts": 12})
    assert main(["run", str(manifest)]) == 0
    rep = report(tmp_path)
    throttled = [r for r in emulator.records() if r.status == 429]
    assert rep["totals"]["succeeded"] == 8
    assert throttled, "the quota was meant to throttle"
    assert rep["throttled_attempts"] == len(throttled)
    assert rep["requests"] == len(emulator.records())
    assert sum(item["throttles"] for item in rep["items"]) == len(throttled)


def test_content_filter_and_validation_fail_the_item_without_retry(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    photos = make_photos(tmp_path, 4)
    filtered, invalid = sha(photos[1]), sha(photos[2])
    emulator = emulator_factory(faults_by_image={filtered: (FaultKind.CONTENT_FILTERED,) * 9,
                                                 invalid: (FaultKind.VALIDATION,) * 9})
    manifest = bedrock_manifest(write_manifest, emulator)
    assert main(["run", str(manifest)]) == 1
    items = by_source(report(tmp_path))
    assert items["photos/img01.png"]["error_code"] == "content_filtered"
    assert items["photos/img01.png"]["error_message"] == "content_filtered: Filter reason: output image"
    assert items["photos/img02.png"]["error_code"] == "ValidationException"
    assert {items[f"photos/img0{i}.png"]["status"] for i in (0, 3)} == {"succeeded"}
    sent = [r.image_sha256 for r in emulator.records()]
    assert sent.count(filtered) == 1 and sent.count(invalid) == 1
    assert (tmp_path / "out/img00.png").exists() and not (tmp_path / "out/img01.png").exists()


def test_access_denied_stops_the_run_early_with_exit_3(tmp_path: Path, write_manifest: Callable[..., Path],
                                                       emulator_factory: EmulatorFactory,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    make_photos(tmp_path, 10)
    denied = emulator_factory(deny_access=True)
    manifest = bedrock_manifest(write_manifest, denied, limits={"concurrency": 2})
    assert main(["run", str(manifest)]) == 3
    assert "AccessDeniedException" in capsys.readouterr().err
    assert len(denied.records()) <= 2  # not one request per file
    assert report(tmp_path)["totals"]["pending"] == 10  # nothing blamed on the images
    allowed = emulator_factory()
    assert main(["run", str(manifest), "--endpoint-url", allowed.endpoint_url]) == 0
    assert report(tmp_path)["totals"]["succeeded"] == 10


def test_transient_errors_are_retried(tmp_path: Path, write_manifest: Callable[..., Path],
                                      emulator_factory: EmulatorFactory) -> None:
    photos = make_photos(tmp_path, 3)
    emulator = emulator_factory(faults_by_image={
        sha(photos[0]): (FaultKind.SERVICE_UNAVAILABLE, FaultKind.INTERNAL_ERROR),
        sha(photos[1]): (FaultKind.THROTTLE, FaultKind.MODEL_NOT_READY),
        sha(photos[2]): (FaultKind.DISCONNECT,)})
    manifest = bedrock_manifest(write_manifest, emulator)
    assert main(["run", str(manifest)]) == 0
    items = by_source(report(tmp_path))
    assert [items[f"photos/img0{i}.png"]["attempts"] for i in range(3)] == [3, 3, 2]
    assert items["photos/img01.png"]["throttles"] == 2


def test_bare_model_id_is_fatal(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory()

    async def attempt() -> bytes | AttemptError:
        settings = ClientSettings("us-east-1", emulator.endpoint_url, None, 1, 10, 5, ("AKID", "secret"))
        async with open_client(settings) as client:
            invoker = BedrockInvoker(client, "stability.stable-conservative-upscale-v1:0")
            return await invoker.invoke(build_body(image_bytes(100, 100), {"prompt": "x"}))

    result = asyncio.run(attempt())
    assert isinstance(result, AttemptError) and result.code == "ValidationException" and result.status == 400
    assert "on-demand throughput" in result.message
    import random

    assert decide(result, 1, 6, Backoff(1, 1), random.Random(0)).action is Action.FATAL


def test_unchanged_rerun_reads_no_bytes_and_changes_are_redone(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    photos = make_photos(tmp_path, 4)
    emulator = emulator_factory()
    manifest = bedrock_manifest(write_manifest, emulator)
    assert main(["run", str(manifest)]) == 0
    import batch_upscaler.storage.local as local_storage

    def forbidden(*args: object) -> None:
        raise AssertionError("an unchanged file was read")

    with monkeypatch.context() as m:
        m.setattr(local_storage, "read_header", forbidden)
        m.setattr(local_storage, "file_sha256", forbidden)
        assert main(["run", str(manifest)]) == 0
    assert len(emulator.records()) == 4

    write_image(photos[0], 120, 90, color=(1, 2, 3))  # rewritten content
    (tmp_path / "out/img01.png").unlink()  # output lost
    photos[2].touch()  # same bytes, new mtime: the paid result is kept
    assert main(["run", str(manifest)]) == 0
    assert len(emulator.records()) == 6
    items = by_source(report(tmp_path))
    assert items["photos/img00.png"]["input_size"] == [120, 90]

    # Changing a parameter that affects the result makes everything pending again.
    manifest = bedrock_manifest(write_manifest, emulator, model={"prompt": "a different prompt"})
    assert main(["run", str(manifest)]) == 0
    assert len(emulator.records()) == 10


def test_second_run_of_the_same_job_exits_4(tmp_path: Path, write_manifest: Callable[..., Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    make_photos(tmp_path, 1)
    manifest = write_manifest()
    with JobLock(tmp_path / ".batch-upscaler" / "job.lock", "job"):
        assert main(["run", str(manifest)]) == 4
    assert "already running (PID" in capsys.readouterr().err
    assert main(["run", str(manifest)]) == 0  # the lock went with its holder


def test_limit_and_retry_failed(tmp_path: Path, write_manifest: Callable[..., Path],
                                emulator_factory: EmulatorFactory) -> None:
    photos = make_photos(tmp_path, 5)
    emulator = emulator_factory(faults_by_image={sha(photos[4]): (FaultKind.VALIDATION,)})
    manifest = bedrock_manifest(write_manifest, emulator)
    assert main(["run", str(manifest), "--limit", "2"]) == 75  # work remains: run again to resume
    assert report(tmp_path)["totals"]["succeeded"] == 2
    assert main(["run", str(manifest)]) == 1
    assert report(tmp_path)["totals"]["failed"] == 1
    assert main(["run", str(manifest), "--retry-failed"]) == 0  # the fault script is used up
    assert report(tmp_path)["totals"]["succeeded"] == 5


def test_output_is_written_byte_for_byte(tmp_path: Path, write_manifest: Callable[..., Path],
                                         emulator_factory: EmulatorFactory) -> None:
    make_photos(tmp_path, 1)
    emulator = emulator_factory()
    manifest = bedrock_manifest(write_manifest, emulator, output={"format": "webp"})
    assert main(["run", str(manifest)]) == 0
    out = tmp_path / "out/img00.webp"
    with Image.open(io.BytesIO(out.read_bytes())) as im:
        assert im.format == "WEBP"
    assert not list((tmp_path / "out").rglob("*.part"))
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_report_command_rewrites_from_checkpoint(tmp_path: Path, write_manifest: Callable[..., Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    make_photos(tmp_path, 2)
    manifest = write_manifest()
    assert main(["report", str(manifest)]) == 2  # no checkpoint yet
    assert main(["run", str(manifest)]) == 0
    report_json = tmp_path / ".batch-upscaler/reports/job/report.json"
    first = json.loads(report_json.read_text())
    report_json.unlink()
    assert main(["report", str(manifest)]) == 0
    again = json.loads(report_json.read_text())
    assert again["items"] == first["items"] and again["totals"] == first["totals"]


def test_auto_rate_against_a_quota(tmp_path: Path, write_manifest: Callable[..., Path],
                                   emulator_factory: EmulatorFactory) -> None:
    make_photos(tmp_path, 6)
    emulator = emulator_factory(quota_rpm=60, quota_burst=2)
    manifest = bedrock_manifest(write_manifest, emulator, limits={"concurrency": 4, "max_attempts": 12})
    assert main(["run", str(manifest), "--rpm", "auto"]) == 0
    rep = report(tmp_path)
    assert rep["totals"]["succeeded"] == 6
    assert rep["rate"]["mode"] == "auto" and rep["rate"]["final_rpm"] > 0
    assert rep["throttled_attempts"] == sum(1 for r in emulator.records() if r.status == 429)
