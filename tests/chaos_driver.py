"""The chaos driver shared by tests/test_chaos.py and bench/chaos.py.

It runs the real command in a subprocess against an emulator, kills it with SIGKILL after a
random number of further answered requests (seeded; event-driven, never a timed sleep), records
after every kill which images the checkpoint says succeeded, then lets a last run finish and
checks everything a user relies on.
"""

from __future__ import annotations

import hashlib
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from batch_upscaler.emulator import EmulatorThread
from batch_upscaler.storage.local import OWNER_FILE
from tests.conftest import cli_env, write_image


@dataclass(frozen=True)
class ChaosPlan:
    images: int
    kills: int
    seed: int
    concurrency: int = 4
    max_requests_between_kills: int = 12


@dataclass
class ChaosResult:
    kills: int = 0
    final_exit: int | None = None
    succeeded: int = 0
    outputs_match_emulator: int = 0
    temp_files: int = 0
    resent_after_success: int = 0
    fault_responses: int = 0
    requests_per_image: dict[str, int] = field(default_factory=dict)


def _answered(emulator: EmulatorThread) -> int:
    return sum(1 for r in emulator.records() if r.status == 200)


def _succeeded_hashes(db: Path) -> set[str]:
    if not db.exists():
        return set()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT content_sha256 FROM items WHERE state = 'succeeded'").fetchall()
    return {r[0] for r in rows if r[0]}


def _kill_after(manifest: Path, emulator: EmulatorThread, answers: int, timeout: float = 120) -> bool:
    """Start a run; SIGKILL it once ``answers`` more requests were answered. False if it finished first."""
    target = _answered(emulator) + answers
    proc = subprocess.Popen([sys.executable, "-m", "batch_upscaler", "run", str(manifest)], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while _answered(emulator) < target and proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run made no progress")
        time.sleep(0.005)  # polling for an event, not waiting for time to pass
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def run_chaos(plan: ChaosPlan, tmp_path: Path, write_manifest: Callable[..., Path],
              emulator: EmulatorThread) -> ChaosResult:
    rng = random.Random(plan.seed)
    sources = [write_image(tmp_path / "photos" / f"{i // 50:02d}" / f"img{i:04d}.png", 64 + i % 17, 64 + i % 13,
                           color=(i % 256, (i // 256) % 256, 99)) for i in range(plan.images)]
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": plan.concurrency, "max_attempts": 10,
                                      "backoff_base_s": 0.01, "backoff_max_s": 0.05})
    db = tmp_path / ".batch-upscaler" / "job.sqlite"
    result = ChaosResult()
    checkpoints: list[tuple[int, set[str]]] = []  # (emulator records seen at the kill, succeeded hashes then)
    for _ in range(plan.kills):
        if not _kill_after(manifest, emulator, rng.randint(1, plan.max_requests_between_kills)):
            break
        result.kills += 1
        checkpoints.append((len(emulator.records()), _succeeded_hashes(db)))
    final = subprocess.run([sys.executable, "-m", "batch_upscaler", "run", str(manifest)], env=cli_env(),
                           capture_output=True, text=True, timeout=600)
    result.final_exit = final.returncode
    _check(result, emulator, checkpoints, sources, tmp_path, db)
    return result


def _check(result: ChaosResult, emulator: EmulatorThread, checkpoints: list[tuple[int, set[str]]],
           sources: list[Path], tmp_path: Path, db: Path) -> None:
    records = emulator.records()
    for seen, done in checkpoints:
        result.resent_after_success += sum(1 for r in records[seen:] if r.image_sha256 in done)
    returned: dict[str, set[str]] = {}
    for r in records:
        if r.status == 200 and r.output_sha256 and r.image_sha256:
            returned.setdefault(r.image_sha256, set()).add(r.output_sha256)
    result.fault_responses = sum(1 for r in records if r.status != 200 or r.fault)
    counts = Counter(r.image_sha256 for r in records)
    result.succeeded = len(_succeeded_hashes(db))
    for source in sources:
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        result.requests_per_image[source.name] = counts[digest]
        output = tmp_path / "out" / source.relative_to(tmp_path / "photos")
        if output.exists() and hashlib.sha256(output.read_bytes()).hexdigest() in returned.get(digest, set()):
            result.outputs_match_emulator += 1
    out = tmp_path / "out"
    result.temp_files = sum(1 for p in out.rglob("*") if p.is_file() and p.name != OWNER_FILE
                            and (p.suffix != ".png" or ".batch-upscaler-tmp" in p.parts))
