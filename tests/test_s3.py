"""S3 as source, destination and report store, against a real S3-compatible server on 127.0.0.1 (moto in
server mode, behind a fault-injecting proxy where a test needs faults) and the emulator's request log
as the bill. No aiobotocore or botocore internals are mocked (issue 11)."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from batch_upscaler.cli import main
from batch_upscaler.emulator import EmulatorThread
from tests.conftest import cli_env, image_bytes, manifest_doc, write_image
from tests.s3_server import Faults, FaultyProxy, MotoS3, moto_s3

EmulatorFactory = Callable[..., EmulatorThread]


@pytest.fixture
def s3() -> Iterator[MotoS3]:
    yield from moto_s3()


@pytest.fixture(autouse=True)
def aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")


def s3_manifest(tmp_path: Path, emulator: EmulatorThread, endpoint: str, **overrides: Any) -> Path:
    doc = manifest_doc(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                       output={"dir": "s3://archive-upscaled/photos/"}, s3={"endpoint_url": endpoint}, **overrides)
    path = tmp_path / "archive.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def archive(s3: MotoS3) -> dict[str, bytes]:
    s3.bucket("archive")
    s3.bucket("archive-upscaled")
    objects = {f"photos/2019/img{i}.png": image_bytes(80 + i, 70, color=(i * 20, 1, 2)) for i in range(3)}
    objects["photos/2019/deeper/x.jpg"] = image_bytes(90, 90, "JPEG", (9, 9, 200))
    objects["photos/2019/notes.txt"] = b"not an image"
    objects["photos/2019/.hidden.png"] = image_bytes(70, 70)
    for key, body in objects.items():
        s3.put("archive", key, body)
    s3.put("archive", "photos/2019/empty-folder/", b"")  # a folder marker
    return objects


def report(s3: MotoS3) -> dict[str, Any]:
    return dict(json.loads(s3.get("archive-upscaled", "_reports/report.json")))


def sent_shas(emulator: EmulatorThread) -> list[str]:
    return [r.image_sha256 for r in emulator.records() if r.image_sha256]


def test_an_s3_archive_is_upscaled_into_another_prefix_with_proof_of_work(
        tmp_path: Path, s3: MotoS3, emulator_factory: EmulatorFactory) -> None:
    objects = archive(s3)
    write_image(tmp_path / "scans" / "local.png", 100, 80)  # local and S3 sources mix
    emulator = emulator_factory()
    manifest = s3_manifest(tmp_path, emulator, s3.endpoint_url,
                           sources=["s3://archive/photos/2019/", "scans"],
                           report_dir="s3://archive-upscaled/_reports/")
    assert main(["run", str(manifest)]) == 0
    outputs = sorted(s3.keys("archive-upscaled", "photos/"))
    assert outputs == ["photos/.batch-upscaler-job.json", "photos/deeper/x.png", "photos/img0.png",
                       "photos/img1.png", "photos/img2.png", "photos/local.png"]
    head = s3.head("archive-upscaled", "photos/img1.png")
    meta = head["Metadata"]
    source = objects["photos/2019/img1.png"]
    assert head["ContentType"] == "image/png"
    assert meta["bu-source"] == "s3://archive/photos/2019/img1.png"
    assert meta["bu-source-sha256"] == hashlib.sha256(source).hexdigest()
    assert meta["bu-source-etag"] == hashlib.md5(source).hexdigest()
    with Image.open(io.BytesIO(s3.get("archive-upscaled", "photos/img1.png"))) as im:
        im.load()
    rep = report(s3)
    assert rep["totals"]["succeeded"] == 5 and rep["totals"]["discovered"] == 5
    assert {i["source"] for i in rep["items"]} >= {"s3://archive/photos/2019/img1.png", "scans/local.png"}
    assert "_reports/report.html" in s3.keys("archive-upscaled", "_reports/")
    assert len(sent_shas(emulator)) == 5
    # Before/after pictures of every S3 item, made from bytes the run had (no second download).
    page = s3.get("archive-upscaled", "_reports/report.html").decode()
    assert page.count('<img src="data:image/jpeg;base64,') == 2 * 5 and "no picture kept" not in page

    assert main(["run", str(manifest)]) == 0  # unchanged keys: no GET, no request
    assert len(sent_shas(emulator)) == 5
    s3.put("archive", "photos/2019/img2.png", image_bytes(99, 77, color=(1, 200, 1)))  # a new ETag
    assert main(["run", str(manifest)]) == 0
    assert len(sent_shas(emulator)) == 6


def test_a_fresh_state_folder_over_finished_outputs_pays_nothing(
        tmp_path: Path, s3: MotoS3, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    archive(s3)
    emulator = emulator_factory()
    manifest = s3_manifest(tmp_path, emulator, s3.endpoint_url, sources=["s3://archive/photos/2019/"])
    assert main(["run", str(manifest)]) == 0
    assert len(sent_shas(emulator)) == 4
    (tmp_path / ".batch-upscaler" / "job.sqlite").unlink()  # the machine's disk was thrown away
    capsys.readouterr()
    assert main(["plan", str(manifest), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["requests"] == 0 and planned["proven_done"] == 4 and planned["already_done"] == 4
    assert main(["run", str(manifest)]) == 0
    assert len(sent_shas(emulator)) == 4  # nothing sent: the outputs prove themselves

    changed = s3_manifest(tmp_path, emulator, s3.endpoint_url, sources=["s3://archive/photos/2019/"],
                          model={"prompt": "a different prompt"})
    (tmp_path / ".batch-upscaler" / "job.sqlite").unlink()
    assert main(["run", str(changed)]) == 0
    assert len(sent_shas(emulator)) == 8  # the prompt changed: every output is redone


def test_a_lost_state_folder_reads_the_outputs_proofs_ahead_not_one_at_a_time(
        tmp_path: Path, s3: MotoS3, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    s3.bucket("archive")
    s3.bucket("archive-upscaled")
    for i in range(24):
        s3.put("archive", f"photos/{i:02d}.png", image_bytes(70, 70, color=(i, 7, 7)))
    emulator = emulator_factory()
    faults = Faults(hold_heads_s=0.05)
    proxy = FaultyProxy(s3.endpoint_url, faults)
    try:
        manifest = s3_manifest(tmp_path, emulator, proxy.endpoint_url, sources=["s3://archive/photos/"])
        assert main(["run", str(manifest)]) == 0
        assert faults.heads_at_once == 0  # a fresh job with no outputs yet reads no proof
        (tmp_path / ".batch-upscaler" / "job.sqlite").unlink()
        capsys.readouterr()
        assert main(["plan", str(manifest), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["proven_done"] == 24
        # One HEAD per output, made in the scan's look-ahead window with the header probes: against
        # S3's latency, 100,000 HEADs one after another would take the better part of an hour.
        assert faults.heads_at_once > 1
        assert main(["run", str(manifest)]) == 0
        assert len(sent_shas(emulator)) == 24
    finally:
        proxy.stop()


def test_listing_pages_past_1000_keys_and_globs_under_a_prefix(
        tmp_path: Path, s3: MotoS3, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    s3.bucket("archive")
    s3.bucket("archive-upscaled")
    tiny = image_bytes(70, 70)
    for i in range(1_050):  # past one ListObjectsV2 page (1,000 keys)
        s3.put("archive", f"bulk/{i:04d}.png", tiny)
    s3.put("archive", "phone/2020/a.JPG", image_bytes(90, 70, "JPEG"))
    s3.put("archive", "phone/2020/deep/b.jpeg", image_bytes(91, 70, "JPEG"))
    s3.put("archive", "phone/2020/skip.png", image_bytes(90, 70))  # not matched by the glob
    emulator = emulator_factory()
    manifest = s3_manifest(tmp_path, emulator, s3.endpoint_url,
                           sources=["s3://archive/bulk/", "s3://archive/phone/**/*.{jpg,jpeg}"])
    capsys.readouterr()
    assert main(["plan", str(manifest), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    # 1,050 identical bulk images are one request and 1,049 copies; the glob finds both phone JPEGs.
    assert planned["files_found"] == 1_052 and planned["requests"] == 3 and planned["deduplicated"] == 1_049


def test_a_key_with_spaces_percent_and_unicode_round_trips_to_its_output_key(
        tmp_path: Path, s3: MotoS3, emulator_factory: EmulatorFactory) -> None:
    s3.bucket("archive")
    s3.bucket("archive-upscaled")
    s3.put("archive", "phone/2020/a b%c/été.JPG", image_bytes(90, 70, "JPEG"))
    emulator = emulator_factory()
    manifest = s3_manifest(tmp_path, emulator, s3.endpoint_url, sources=["s3://archive/phone/"])
    assert main(["run", str(manifest)]) == 0
    assert s3.keys("archive-upscaled", "photos/2020/") == ["photos/2020/a b%c/été.png"]
    meta = s3.head("archive-upscaled", "photos/2020/a b%c/été.png")["Metadata"]
    assert meta["bu-source"].endswith("a%20b%25c/%C3%A9t%C3%A9.JPG")  # ASCII metadata, the URL round-trips
    items = json.loads((tmp_path / ".batch-upscaler/reports/job/report.json").read_text())["items"]
    assert [i["source"] for i in items] == ["s3://archive/phone/2020/a b%c/été.JPG"]
    assert items[0]["output"] == "s3://archive-upscaled/photos/2020/a b%c/été.png"


def test_an_upload_that_keeps_failing_never_loses_the_paid_image(
        tmp_path: Path, s3: MotoS3, emulator_factory: EmulatorFactory) -> None:
    archive(s3)
    faults = Faults(match="/archive-upscaled/photos/img", fail_puts=3)  # transient: retried within the call
    proxy = FaultyProxy(s3.endpoint_url, faults)
    try:
        emulator = emulator_factory()
        manifest = s3_manifest(tmp_path, emulator, proxy.endpoint_url, sources=["s3://archive/photos/2019/"])
        assert main(["run", str(manifest)]) == 0
        assert len(sent_shas(emulator)) == 4 and len(s3.keys("archive-upscaled", "photos/img")) == 3

        faults.fail_puts = 10_000  # now every upload of these keys fails, however often it is retried
        s3.put("archive", "photos/2019/img0.png", image_bytes(111, 70, color=(3, 3, 3)))
        assert main(["run", str(manifest)]) == 1
        assert len(sent_shas(emulator)) == 5  # paid once ...
        kept = list((tmp_path / ".batch-upscaler" / "unsent-outputs").glob("*.img"))
        assert len(kept) == 1  # ... and kept

        faults.fail_puts = 0  # the store works again: the next run uploads the kept image first
        assert main(["run", str(manifest)]) == 0
        assert len(sent_shas(emulator)) == 5  # not paid again
        with Image.open(io.BytesIO(s3.get("archive-upscaled", "photos/img0.png"))) as im:
            assert im.width > 111
    finally:
        proxy.stop()


def test_access_denied_on_the_output_bucket_stops_before_any_request(
        tmp_path: Path, s3: MotoS3, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    archive(s3)
    proxy = FaultyProxy(s3.endpoint_url, Faults(match="/archive-upscaled/", deny_puts=True))
    try:
        emulator = emulator_factory()
        manifest = s3_manifest(tmp_path, emulator, proxy.endpoint_url, sources=["s3://archive/photos/2019/"])
        capsys.readouterr()
        assert main(["run", str(manifest)]) == 3
        err = capsys.readouterr().err
        assert "s3:PutObject" in err and "arn:aws:s3:::archive-upscaled" in err
        assert emulator.records() == []
    finally:
        proxy.stop()


def test_a_missing_source_bucket_is_fatal_and_bad_urls_are_named(
        tmp_path: Path, s3: MotoS3, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    s3.bucket("archive-upscaled")
    emulator = emulator_factory()
    manifest = s3_manifest(tmp_path, emulator, s3.endpoint_url, sources=["s3://no-such-archive/photos/"])
    assert main(["run", str(manifest)]) == 3
    assert "no-such-archive" in capsys.readouterr().err and emulator.records() == []
    bad = s3_manifest(tmp_path, emulator, s3.endpoint_url, sources=["s3://", "s3://Bad_Bucket/x", "s3://b*/x"],
                      report_dir="s3:///nothing")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sources: item 0: 's3://' names no bucket" in err
    assert "report_dir: 's3:///nothing' names no bucket" in err


def test_kill_9_mid_run_then_resume_pays_nothing_twice(tmp_path: Path, s3: MotoS3,
                                                       emulator_factory: EmulatorFactory) -> None:
    s3.bucket("archive")
    s3.bucket("archive-upscaled")
    for i in range(10):
        s3.put("archive", f"p/{i}.png", image_bytes(80 + i, 70, color=(i * 9, 5, 5)))
    emulator = emulator_factory(latency_s=0.2)
    manifest = s3_manifest(tmp_path, emulator, s3.endpoint_url, sources=["s3://archive/p/"],
                           limits={"concurrency": 2})
    run = subprocess.Popen([sys.executable, "-m", "batch_upscaler", "run", str(manifest)], env=cli_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while sum(1 for r in emulator.records() if r.status == 200) < 3:
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    uploaded_before = set(s3.keys("archive-upscaled", "photos/"))
    seen_before = len(emulator.records())
    done = subprocess.run([sys.executable, "-m", "batch_upscaler", "run", str(manifest)], env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    resent = {r.image_sha256 for r in emulator.records()[seen_before:]}
    for key in uploaded_before - {"photos/.batch-upscaler-job.json"}:
        source = s3.head("archive-upscaled", key)["Metadata"]["bu-source-sha256"]
        assert source not in resent, f"{key} was paid for again"
    for i in range(10):
        with Image.open(io.BytesIO(s3.get("archive-upscaled", f"photos/{i}.png"))) as im:
            im.load()  # every object whole


def test_an_object_changed_or_deleted_between_scan_and_send_is_not_sent(
        tmp_path: Path, s3: MotoS3, emulator_factory: EmulatorFactory) -> None:
    s3.bucket("archive")
    s3.bucket("archive-upscaled")
    for i in range(4):
        s3.put("archive", f"p/{i}.png", image_bytes(80 + i, 70, color=(i * 40, 5, 5)))
    emulator = emulator_factory(latency_s=0.5)
    manifest = s3_manifest(tmp_path, emulator, s3.endpoint_url, sources=["s3://archive/p/"],
                           limits={"concurrency": 1})
    run = subprocess.Popen([sys.executable, "-m", "batch_upscaler", "run", str(manifest)], env=cli_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not s3.keys("archive-upscaled", "photos/0"):  # the first image is done: the scan is long over
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    s3.put("archive", "p/2.png", image_bytes(120, 70, color=(9, 9, 9)))  # rewritten after it was listed
    s3.client.delete_object(Bucket="archive", Key="p/3.png")  # deleted after it was listed
    _, err = run.communicate(timeout=60)
    assert run.returncode == 1, err
    items = {i["source"]: i for i in json.loads((tmp_path / ".batch-upscaler/reports/job/report.json")
                                                .read_text())["items"]}
    assert items["s3://archive/p/2.png"]["error_code"] == "source_changed"
    assert items["s3://archive/p/3.png"]["error_code"] == "source_unreadable"
    assert len(sent_shas(emulator)) == 2  # neither was paid for


def test_doctor_checks_the_buckets_and_names_the_missing_iam_actions(
        tmp_path: Path, s3: MotoS3, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    archive(s3)
    emulator = emulator_factory()
    manifest = s3_manifest(tmp_path, emulator, s3.endpoint_url, sources=["s3://archive/photos/2019/",
                                                                         "s3://no-such-archive/x/"])
    capsys.readouterr()
    main(["doctor", str(manifest), "--endpoint-url", emulator.endpoint_url])
    out = capsys.readouterr().out
    assert "s3 bucket archive" in out and "exists and is reachable" in out
    assert "s3 source s3://archive/photos/2019/" in out and "can be listed and read" in out
    assert "FAIL  s3 bucket no-such-archive" in out
    assert "s3 output s3://archive-upscaled/photos/" in out and "probe was put and deleted" in out
    assert not [k for k in s3.keys("archive-upscaled") if "doctor" in k]  # the probe object is gone

    proxy = FaultyProxy(s3.endpoint_url, Faults(match="/archive-upscaled/", deny_puts=True))
    try:
        denied = s3_manifest(tmp_path, emulator, proxy.endpoint_url, sources=["s3://archive/photos/2019/"])
        assert main(["doctor", str(denied), "--endpoint-url", emulator.endpoint_url]) == 3
        out = capsys.readouterr().out
        assert "fix: grant s3:PutObject on arn:aws:s3:::archive-upscaled/photos/*" in out
    finally:
        proxy.stop()


def test_outputs_stream_through_a_staging_file_and_large_ones_upload_in_parts(
        tmp_path: Path, s3: MotoS3, emulator_factory: EmulatorFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13: an S3 output is staged on local disk while it arrives (never whole in memory), then
    uploaded: one PutObject when small, a multipart upload above the part size, with the same proof
    of work either way."""
    import random
    import sqlite3

    import xxhash

    from batch_upscaler.storage import s3 as s3_storage

    monkeypatch.setattr(s3_storage, "PART_BYTES", 5 * 1024 * 1024)  # S3's smallest part: a test-sized output
    s3.bucket("archive")
    s3.bucket("archive-upscaled")
    noise = Image.frombytes("RGB", (700, 700), random.Random(3).randbytes(700 * 700 * 3))
    big = io.BytesIO()
    noise.save(big, "PNG")
    s3.put("archive", "photos/2019/noise.png", big.getvalue())
    s3.put("archive", "photos/2019/small.png", image_bytes(90, 80))
    emulator = emulator_factory(output_max_pixels=3_000_000)
    manifest = s3_manifest(tmp_path, emulator, s3.endpoint_url, sources=["s3://archive/photos/"])
    assert main(["run", str(manifest)]) == 0
    with sqlite3.connect(tmp_path / ".batch-upscaler" / "job.sqlite") as conn:
        digests = dict(conn.execute("SELECT output_path, output_digest FROM items"))
    for name, multipart in (("noise.png", True), ("small.png", False)):
        body = s3.get("archive-upscaled", f"photos/2019/{name}")
        head = s3.head("archive-upscaled", f"photos/2019/{name}")
        assert xxhash.xxh3_128(body).hexdigest() == digests[f"2019/{name}"] == head["Metadata"]["bu-digest"]
        assert head["ETag"].strip('"').endswith("-2") is multipart, (name, len(body), head["ETag"])
        assert head["Metadata"]["bu-source"].startswith("s3://archive/photos/2019/")
    assert len(s3.get("archive-upscaled", "photos/2019/noise.png")) > 5 * 1024 * 1024
    staged = [p for p in (tmp_path / ".batch-upscaler" / "s3-staging").rglob("*") if p.is_file()]
    assert staged == []  # uploaded files are removed, and so is the run's staging folder
