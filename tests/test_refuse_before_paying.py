"""Nothing paid for nothing: what can be known before sending is checked before sending, and a paid
image is never lost to a full disk (issue 9, points 7, 8, 9 and 10).

Real processes against an emulator process whose request log is the bill; full and read-only
disks are tmpfs mounts inside the test's own temporary folder (skipped where mounting is not
allowed).
"""

from __future__ import annotations

import io
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batch_upscaler.storage.local import OWNER_FILE
from bench.emulator_process import EmulatorProcess
from tests.conftest import cli_env, manifest_doc, run_cli, write_image

EmulatorStarter = Callable[..., EmulatorProcess]


def noisy(path: Path, seed: int, size: tuple[int, int] = (80, 80)) -> Path:
    """An image whose upscale compresses badly (so a few outputs fill a small disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


def items(tmp_path: Path, job: str = "job") -> dict[str, dict[str, Any]]:
    report = json.loads((tmp_path / f".batch-upscaler/reports/{job}/report.json").read_text())
    return {item["source"]: item for item in report["items"]}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[Path, str], Path]]:
    mounted: list[Path] = []

    def mount(where: Path, options: str) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def test_a_full_output_disk_stops_the_run_and_keeps_the_paid_image(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_process: EmulatorStarter,
        tmpfs: Callable[[Path, str], Path]) -> None:
    emulator = emulator_process(output_max_pixels=300 * 300)
    for i in range(6):
        noisy(tmp_path / "photos" / f"n{i}.png", i)
    out = tmpfs(tmp_path / "out", "size=600k")
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 1})
    first = run_cli("run", str(manifest))
    assert first.returncode == 75, first.stderr
    assert "the output storage refuses writes" in first.stderr and "No space left on device" in first.stderr
    paid = len(emulator.records())
    done = {s: i for s, i in items(tmp_path).items() if i["status"] == "succeeded"}
    assert 0 < len(done) < 6 and paid == len(done) + 1  # one more was paid for: the one that did not fit
    assert not [i for i in items(tmp_path).values() if i["status"] == "failed"]  # no image blamed
    kept = list((tmp_path / ".batch-upscaler" / "unsent-outputs").glob("*.img"))
    assert len(kept) == 1

    remount(out, "size=20m")  # the operator makes room
    second = run_cli("run", str(manifest))
    assert second.returncode == 0, second.stderr
    assert "paid for by an earlier run were written now" in second.stderr
    assert len(emulator.records()) == 6  # every image paid exactly once
    assert {i["status"] for i in items(tmp_path).values()} == {"succeeded"}
    assert not (tmp_path / ".batch-upscaler" / "unsent-outputs").exists()
    for path in out.glob("*.png"):
        with Image.open(path) as im:
            im.load()


def test_a_read_only_output_disk_is_found_before_the_first_request(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_process: EmulatorStarter,
        tmpfs: Callable[[Path, str], Path]) -> None:
    emulator = emulator_process()
    write_image(tmp_path / "photos" / "a.png")
    tmpfs(tmp_path / "out", "size=1m,ro")
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url})
    result = run_cli("run", str(manifest))
    assert result.returncode in (2, 75), result.stderr  # read-only: 75 (it may be remounted), never paid
    assert "Read-only file system" in result.stderr
    assert len(emulator.records()) == 0
    assert {i["status"] for i in items(tmp_path).values()} == {"pending"}


def test_a_full_state_disk_is_a_clean_stop(tmp_path: Path, write_manifest: Callable[..., Path],
                                           emulator_process: EmulatorStarter,
                                           tmpfs: Callable[[Path, str], Path]) -> None:
    emulator = emulator_process()
    for i in range(3):
        write_image(tmp_path / "photos" / f"a{i}.png", 90 + i, 80)
    state = tmpfs(tmp_path / "state", "size=8m")
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              state_dir="state")
    assert run_cli("run", str(manifest)).returncode == 0
    for i in range(3, 60):
        write_image(tmp_path / "photos" / f"a{i}.png", 90 + i, 80)
    filler = state / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill the state disk to the last block
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    result = run_cli("run", str(manifest))
    assert result.returncode == 75, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert "the checkpoint cannot be written" in result.stderr and "bytes free on the state disk" in result.stderr
    filler.unlink()
    again = run_cli("run", str(manifest))
    assert again.returncode == 0, again.stderr
    assert len(emulator.records()) == 60  # nothing paid twice across the stop


def test_a_busy_checkpoint_is_waited_for_and_never_fails_a_paid_image(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process(latency_s=2.0)
    for i in range(3):
        write_image(tmp_path / "photos" / f"b{i}.png", 90 + i, 80)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 3})
    run = subprocess.Popen([sys.executable, "-m", "batch_upscaler", "run", str(manifest)], env=cli_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = tmp_path / ".batch-upscaler" / "job.sqlite"
    deadline = time.monotonic() + 30
    while _in_flight(db) < 3:
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)  # the three requests leave (recorded in flight first); the answers take 2 s
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock while the answers come in
    while not emulator.records():
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(2.0)  # hold it past the answers: the run must wait for the lock, not fail the paid images
    holder.execute("ROLLBACK")
    holder.close()
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert "the checkpoint is locked by another process; waiting" in err
    assert {i["status"] for i in items(tmp_path).values()} == {"succeeded"}
    assert len(emulator.records()) == 3


def _in_flight(db: Path) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM items WHERE in_flight = 1").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def test_two_jobs_never_write_into_one_output_root_unless_both_share_it(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process()
    write_image(tmp_path / "photos" / "a.png", color=(200, 0, 0))
    write_image(tmp_path / "scans" / "a.png", color=(0, 0, 200))
    common = {"backend": "bedrock", "bedrock": {"endpoint_url": emulator.endpoint_url}}
    nightly = write_manifest(manifest_doc(**common) | {"name": "nightly"}, name="nightly.yaml")
    scans = write_manifest(manifest_doc(**common, sources=["scans"]) | {"name": "scans"}, name="scans.yaml")
    assert run_cli("run", str(nightly)).returncode == 0
    paid = (tmp_path / "out/a.png").read_bytes()
    refused = run_cli("run", str(scans))
    assert refused.returncode == 2 and "belongs to job 'nightly'" in refused.stderr
    assert run_cli("plan", str(scans)).returncode == 2
    assert len(emulator.records()) == 1 and (tmp_path / "out/a.png").read_bytes() == paid

    shared = {"dir": "out", "shared": True}
    nightly = write_manifest(manifest_doc(**common, output=shared) | {"name": "nightly"}, name="nightly.yaml")
    assert run_cli("run", str(nightly)).returncode == 0
    same_names = write_manifest(manifest_doc(**common, sources=["scans"], output=shared) | {"name": "scans"},
                                name="scans.yaml")
    clash = run_cli("run", str(same_names))
    assert clash.returncode == 1 and "output_exists: out/a.png exists and was not written by this job" in clash.stderr
    assert len(emulator.records()) == 1 and (tmp_path / "out/a.png").read_bytes() == paid
    apart = write_manifest(manifest_doc(**common, sources=["scans"], output=shared | {"naming": "scans/{relpath}"})
                           | {"name": "scans"}, name="scans.yaml")
    assert run_cli("run", str(apart)).returncode == 0
    assert len(emulator.records()) == 2 and (tmp_path / "out/scans/a.png").exists()
    assert json.loads((tmp_path / "out" / OWNER_FILE).read_text())["jobs"] == {
        "nightly": {"shared": True}, "scans": {"shared": True}}


def test_what_cannot_be_written_or_gained_is_refused_at_scan(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process()
    photos = tmp_path / "photos"
    write_image(photos / "ok.png")
    write_image(photos / ("n" * 240 + ".png"))  # fine as a source; its output name will be too long
    write_image(photos / "linked" / "b.png")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "linked")  # an output subfolder leading out
    _save_size(photos / "strip-wide.png", (20000, 70))
    _save_size(photos / "strip-tall.png", (1, 100000))
    _save_size(photos / "big-photo.jpg", (4000, 3000))  # downscaled to fit, it would come back smaller
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              output={"dir": "out", "naming": "{relpath}-upscaled-by-{model}"})
    planned = json.loads(run_cli("plan", str(manifest), "--json").stdout)
    assert planned["requests"] == 1
    assert planned["skipped_by_reason"] == {"degenerate_aspect": 1, "no_gain": 2}
    assert planned["refused_by_reason"] == {"bad_output_path": 2}
    assert run_cli("run", str(manifest)).returncode == 1
    by_source = items(tmp_path)
    assert "ENAMETOOLONG" in by_source["photos/" + "n" * 240 + ".png"]["error_message"]
    assert "link leading outside the output root" in by_source["photos/linked/b.png"]["error_message"]
    big = by_source["photos/big-photo.jpg"]
    assert big["error_message"].startswith("no_gain: output ") and big["error_message"].endswith("≤ source 4000x3000")
    assert len(emulator.records()) == 1 and not list((tmp_path / "elsewhere").iterdir())


def _save_size(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 128).save(path, quality=80) if path.suffix == ".jpg" else Image.new("L", size, 128).save(path)
