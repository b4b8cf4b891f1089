"""Shards: one job on many machines (the engines set the index), one quota, one merged report (issue 12).

Real processes run at once against one emulator whose request log is the bill; S3 runs use moto's
server on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from batch_upscaler.cli import _settings as cli_settings
from batch_upscaler.cli import build_parser, settings_from
from batch_upscaler.emulator import EmulatorThread
from batch_upscaler.joblock import JobLock
from batch_upscaler.manifest import load_settings, manifest_layers
from batch_upscaler.runner import shard_rate
from batch_upscaler.shards import Shard, shard_of
from tests.conftest import cli_env, image_bytes, manifest_doc, run_cli, write_image
from tests.s3_server import MotoS3, moto_s3

EmulatorFactory = Callable[..., EmulatorThread]
INDEX_VARIABLES = ("JOB_COMPLETION_INDEX", "JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX")


@pytest.fixture
def s3() -> Iterator[MotoS3]:
    yield from moto_s3()


# A change of the hash (or of what it hashes) moves every item of every running sharded job: pinned.
PINNED = {
    ("photos:a.png", 32): 19, ("photos:a.JPG", 32): 19, ("photos:2019/Été.png", 7): 3,
    ("s3://archive/photos/2019/img1.png", 32): 10, ("scans:x.tif", 3): 1, ("photos:b.png", 1): 0,
}


def test_the_partition_is_pinned() -> None:
    assert {key: shard_of(*key) for key in PINNED} == PINNED
    assert shard_of("photos:a.png", 32) == shard_of("photos:A.jpeg", 32)  # outputs that collide: one shard


@settings(max_examples=300, deadline=None)
@given(key=st.text(min_size=1, max_size=80), count=st.integers(1, 10_000))
def test_every_key_lands_in_exactly_one_shard(key: str, count: int) -> None:
    owners = [i for i in range(min(count, 50))] if count <= 50 else [shard_of(key, count)]
    assert sum(Shard(i, count).owns(key) for i in owners) == 1
    assert 0 <= shard_of(key, count) < count


def test_one_quota_is_shared_by_fixed_shards(tmp_path: Path) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(manifest_doc(limits={"requests_per_minute": 600}, shards={"count": 4})))
    assert shard_rate(load_settings(manifest)) == 150
    manifest.write_text(yaml.safe_dump(manifest_doc(limits={"requests_per_minute": 600, "shard_rpm": 200},
                                                    shards={"count": 4})))
    assert shard_rate(load_settings(manifest)) == 200


def start_shard(manifest: Path, index: int, count: int = 3) -> subprocess.Popen[str]:
    env = cli_env() | {INDEX_VARIABLES[index % 3]: str(index)}  # as the engines set it
    return subprocess.Popen([sys.executable, "-m", "batch_upscaler", "run", str(manifest), "--shard-count",
                             str(count)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def merged(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / "report.json").read_text()))


def paid(emulator: EmulatorThread) -> Counter[str]:
    return Counter(r.image_sha256 for r in emulator.records() if r.status == 200 and r.image_sha256)


def test_three_shards_at_once_pay_each_image_once_and_merge_into_one_report(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    for i in range(30):
        write_image(tmp_path / "photos" / f"p{i:02d}.png", 70 + i, 66, color=(i * 8, 3, 3))
    emulator = emulator_factory(quota_rpm=3000, latency_s=0.05)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 2, "requests_per_minute": 3000, "max_attempts": 10})
    shards = [start_shard(manifest, i) for i in range(3)]
    for shard in shards:
        _, err = shard.communicate(timeout=120)
        assert shard.returncode == 0, err
    assert len(paid(emulator)) == 30 and set(paid(emulator).values()) == {1}  # every image paid exactly once
    assert len(list((tmp_path / "out").glob("*.png"))) == 30
    reports = tmp_path / ".batch-upscaler" / "reports" / "job"
    assert sorted(p.name for p in (reports / "shards").iterdir()) == ["0000-of-0003", "0001-of-0003", "0002-of-0003"]
    assert json.loads((reports / "shards/0001-of-0003/done.json").read_text())["complete"] is True

    result = run_cli("report", str(manifest), "--merge", "--shard-count", "3")
    assert result.returncode == 0, result.stderr
    report = merged(reports)
    sources = [i["source"] for i in report["items"]]
    assert len(sources) == len(set(sources)) == 30 and report["totals"]["succeeded"] == 30
    assert "report.html" in {p.name for p in reports.iterdir()}

    with JobLock(tmp_path / ".batch-upscaler" / "job.shard-0001-of-0003.lock", "job"):  # shard 1 is running
        assert start_shard(manifest, 1).wait(60) == 4  # the same shard started twice is refused
        assert start_shard(manifest, 2).wait(60) == 0  # another shard is not blocked


def test_a_killed_shard_restarts_without_paying_twice_and_the_merge_waits_for_it(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    for i in range(24):
        write_image(tmp_path / "photos" / f"k{i:02d}.png", 70 + i, 66, color=(i * 9, 7, 7))
    emulator = emulator_factory(latency_s=0.4)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 1})
    victim = start_shard(manifest, 2)  # it owns 10 of the 24 images
    others = [start_shard(manifest, i) for i in (0, 1)]
    db = tmp_path / ".batch-upscaler" / "job.shard-0002-of-0003.sqlite"
    deadline = time.monotonic() + 60
    while _succeeded(db) < 2:
        assert victim.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    for shard in others:
        assert shard.wait(120) == 0
    done_before = _succeeded_hashes(db)
    incomplete = run_cli("report", str(manifest), "--merge", "--shard-count", "3")
    assert incomplete.returncode == 75 and "0002-of-0003" in incomplete.stderr
    seen = len(emulator.records())
    assert start_shard(manifest, 2).wait(120) == 0
    assert not {r.image_sha256 for r in emulator.records()[seen:]} & done_before, "a recorded image was paid again"
    complete = run_cli("report", str(manifest), "--merge", "--shard-count", "3")
    assert complete.returncode == 0, complete.stderr
    report = merged(tmp_path / ".batch-upscaler" / "reports" / "job")
    assert report["totals"]["succeeded"] == 24 and len({i["source"] for i in report["items"]}) == 24
    assert sum(1 for i in range(24) if (tmp_path / "out" / f"k{i:02d}.png").exists()) == 24


def test_shards_on_s3_with_the_report_in_s3(tmp_path: Path, s3: MotoS3, emulator_factory: EmulatorFactory) -> None:
    s3.bucket("archive")
    s3.bucket("archive-upscaled")
    for i in range(12):
        s3.put("archive", f"photos/{i:02d}.png", image_bytes(80 + i, 70, color=(i * 20, 9, 9)))
    emulator = emulator_factory(quota_rpm=3000, quotas_denied=True, latency_s=0.3)
    # auto with no quota known: the shards post on their share board, under the S3 report prefix.
    doc = manifest_doc(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                       sources=["s3://archive/photos/"], output={"dir": "s3://archive-upscaled/photos/"},
                       report_dir="s3://archive-upscaled/_reports/", s3={"endpoint_url": s3.endpoint_url},
                       shards={"count": 3, "share_every": 0.5},
                       limits={"concurrency": 1, "requests_per_minute": "auto"})
    manifest = tmp_path / "archive.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    shards = [subprocess.Popen([sys.executable, "-m", "batch_upscaler", "run", str(manifest)],
                               env=cli_env() | {"JOB_COMPLETION_INDEX": str(i)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True) for i in range(3)]
    for shard in shards:
        _, err = shard.communicate(timeout=120)
        assert shard.returncode == 0, err
        rounds = re.search(r"through the share board in s3://archive-upscaled/_reports/: (\d+) posts", err)
        assert rounds is not None and int(rounds[1]) >= 1, err
    assert len(paid(emulator)) == 12 and set(paid(emulator).values()) == {1}
    assert len([k for k in s3.keys("archive-upscaled", "photos/") if k.endswith(".png")]) == 12
    done = [k for k in s3.keys("archive-upscaled", "_reports/shards/") if k.endswith("done.json")]
    assert len(done) == 3
    posts = [json.loads(s3.get("archive-upscaled", f"_reports/shards/rates/{i:04d}-of-0003.json")) for i in range(3)]
    assert [p["label"] for p in posts] == [f"{i:04d}-of-0003" for i in range(3)]
    assert not any(p["limited"] for p in posts)  # each left the board: it wants nothing more
    result = run_cli("report", str(manifest), "--merge")
    assert result.returncode == 0, result.stderr
    report = json.loads(s3.get("archive-upscaled", "_reports/report.json"))
    assert report["totals"]["succeeded"] == 12 and len({i["source"] for i in report["items"]}) == 12


def test_plan_per_shard_and_a_shard_without_index_is_refused(
        tmp_path: Path, write_manifest: Callable[..., Path]) -> None:
    for i in range(9):
        write_image(tmp_path / "photos" / f"s{i}.png", 70 + i, 66, color=(i * 20, 1, 1))
    manifest = write_manifest()
    planned = run_cli("plan", str(manifest), "--shard-count", "3", "--json")
    assert planned.returncode == 0, planned.stderr
    plans = json.loads(planned.stdout)
    assert [p["shard"] for p in plans] == ["0000-of-0003", "0001-of-0003", "0002-of-0003"]
    assert sum(p["requests"] for p in plans) == 9
    text = run_cli("plan", str(manifest), "--shard-count", "3").stdout
    assert "total" in text and "0002-of-0003" in text
    refused = run_cli("run", str(manifest), "--shard-count", "3")
    assert refused.returncode == 2 and "JOB_COMPLETION_INDEX" in refused.stderr
    out_of_range = run_cli("run", str(manifest), "--shard-count", "3", "--shard-index", "3")
    assert out_of_range.returncode == 2


def test_a_shard_that_owns_nothing_exits_0(tmp_path: Path, write_manifest: Callable[..., Path]) -> None:
    write_image(tmp_path / "photos" / "only.png")
    manifest = write_manifest()
    owner = shard_of("photos:only.png", 2)
    idle = run_cli("run", str(manifest), "--shard-count", "2", "--shard-index", str(1 - owner))
    assert idle.returncode == 0, idle.stderr


def _succeeded(db: Path) -> int:
    return len(_succeeded_hashes(db))


def _succeeded_hashes(db: Path) -> set[str]:
    import sqlite3

    if not db.exists():
        return set()
    try:
        with sqlite3.connect(db) as conn:
            return {r[0] for r in conn.execute("SELECT content_sha256 FROM items WHERE state = 'succeeded'")}
    except sqlite3.OperationalError:
        return set()


def test_the_rate_is_split_among_the_shards_running_at_once(tmp_path: Path) -> None:
    """32 shards, 8 running at once (Kubernetes parallelism 8): each paces at R / 8, not R / 32, and
    a --shard-count flag keeps the manifest's at_once."""
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(manifest_doc(limits={"requests_per_minute": 640},
                                                    shards={"count": 32, "at_once": 8})))
    job = load_settings(manifest)
    assert job.shard.sharing == 8 and shard_rate(job) == 80
    assert Shard(0, 4, at_once=10).sharing == 4  # never more than there are
    flagged = settings_from(manifest_layers(manifest, None, {"shards": {"count": 16}}))
    assert flagged.shard == Shard(0, 16, 8)
    # The index the engine or a flag gives keeps every other shards key (at_once, share_every).
    manifest.write_text(yaml.safe_dump(manifest_doc(limits={"requests_per_minute": 640},
                                                    shards={"count": 32, "at_once": 8, "share_every": "30s"})))
    indexed = cli_settings(build_parser().parse_args(["run", str(manifest), "--shard-index", "3"]))
    assert indexed.shard == Shard(3, 32, 8, share_every_s=30.0) and shard_rate(indexed) == 80
