"""Shared fixtures: a fake clock, image and manifest builders, and an emulator on a background thread."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from batch_upscaler.catalogue import ModelSpec
from batch_upscaler.emulator import EmulatorConfig, EmulatorThread
from batch_upscaler.emulator import server as emulator_server
from batch_upscaler.emulator.request import InvokeRequest
from batch_upscaler.storage.urls import Location
from bench.emulator_process import EmulatorProcess, EmulatorSpec

REPO = Path(__file__).resolve().parents[1]
SMALL_OUTPUT = 128 * 128  # keeps emulator outputs tiny so tests stay fast


class FakeClock:
    """Virtual time: it only moves when sleepers wait on it (or a test advances it).

    With several tasks asleep, time jumps to the earliest wake-up, wakes that sleeper, and the
    others keep waiting, as on a real clock, but without any real waiting. Time moves only once
    no other task is ready to run: work that takes no real time takes no virtual time either
    (otherwise a long sleeper would jump past the answer another task is about to record).
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self.sleeps: list[float] = []
        self._wakeups: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        target = self.t + max(0.0, seconds)
        self._wakeups.append(target)
        try:
            while self.t < target:
                if target <= min(self._wakeups) and not _others_ready(len(self._wakeups) - 1):
                    self.t = target
                else:
                    await asyncio.sleep(0)
        finally:
            self._wakeups.remove(target)
        await asyncio.sleep(0)  # still yield, as a real sleep would

    def advance(self, seconds: float) -> None:
        self.t += seconds


def _others_ready(sleepers: int) -> bool:
    """A task or callback other than the clock's ``sleepers`` (each of which keeps one step queued
    while it waits) is ready to run on this loop (asyncio keeps them in ``_ready``)."""
    return len(getattr(asyncio.get_running_loop(), "_ready", ())) > sleepers


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def image_bytes(width: int, height: int, fmt: str = "PNG", color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format=fmt)
    return out.getvalue()


def local_dir(location: Location) -> Path:
    """A settings folder the test set up locally (output_dir and report_dir may also be S3 URLs)."""
    assert isinstance(location, Path), location
    return location


def write_image(path: Path, width: int = 96, height: int = 80, fmt: str = "PNG",
                color: tuple[int, int, int] | None = None) -> Path:
    """A small distinct image (the colour derives from the path unless given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        h = abs(hash(str(path)))
        color = (h % 256, (h >> 8) % 256, (h >> 16) % 256)
    path.write_bytes(image_bytes(width, height, fmt, color))
    return path


def manifest_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1,
        "name": "job",
        "sources": ["photos"],
        "output": {"dir": "out", "format": "png"},
        "model": {"name": "conservative", "prompt": "a sharp photo"},
        "backend": "emulator",
        "limits": {"concurrency": 2, "requests_per_minute": 6000, "backoff_base_s": 0.01, "backoff_max_s": 0.05},
        "emulator": {"output_max_pixels": SMALL_OUTPUT},
    }
    for key, value in overrides.items():
        if value is None:
            doc.pop(key, None)
        elif isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


@pytest.fixture
def write_manifest(tmp_path: Path) -> Callable[..., Path]:
    def write(doc: dict[str, Any] | None = None, name: str = "job.yaml", **overrides: Any) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc if doc is not None else manifest_doc(**overrides)))
        return path
    return write


@pytest.fixture
def emulator_factory() -> Iterator[Callable[..., EmulatorThread]]:
    """Start emulators (on their own threads and loops) that outlive runner subprocesses."""
    started: list[EmulatorThread] = []

    def start(**config: Any) -> EmulatorThread:
        config.setdefault("output_max_pixels", SMALL_OUTPUT)
        emulator = EmulatorThread(EmulatorConfig(**config)).start()
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


@pytest.fixture
def received_images(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Every image an in-process emulator decoded from a request body, keyed like the request log (sha256).

    The request log deliberately never holds a body, so tests that must look inside what was sent
    capture it here, at the emulator's own body parser (the server runs it in a worker thread).
    """
    seen: dict[str, bytes] = {}
    parse = emulator_server.parse_body  # type: ignore[attr-defined]  # (imported there, not exported)

    def capture(body: bytes, spec: ModelSpec) -> InvokeRequest:
        invoke = parse(body, spec)
        seen[invoke.image_sha256] = invoke.image
        return invoke

    monkeypatch.setattr(emulator_server, "parse_body", capture)
    return seen


@pytest.fixture
def emulator_process(tmp_path: Path) -> Iterator[Callable[..., EmulatorProcess]]:
    """Start ``batch-upscaler emulator`` processes; their request log (``.records()``) is the bill."""
    started: list[EmulatorProcess] = []

    def start(*flags: str, port: int = 0, latency_s: float = 0.0, output_max_pixels: int | None = SMALL_OUTPUT,
              log: Path | None = None) -> EmulatorProcess:
        """``port`` and ``log`` of an earlier emulator restart it where a run expects it, on the same bill."""
        spec = EmulatorSpec(canned_output=False, output_max_pixels=output_max_pixels, latency_s=latency_s,
                            port=port, extra=flags)
        log = log or tmp_path / "bill" / f"requests-{len(started)}.jsonl"
        emulator = EmulatorProcess(spec, log).__enter__()
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = str(REPO)
    # Nor the machine's AWS files: their region or profile would be a configuration layer of every run.
    env |= {"AWS_CONFIG_FILE": str(REPO / ".no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(REPO / ".no-aws-creds"),
            "AWS_EC2_METADATA_DISABLED": "true"}
    # Dummy keys, as a user's environment would hold real ones (the emulator checks only the signature's shape).
    env |= {"AWS_ACCESS_KEY_ID": "AKIDTESTTEST", "AWS_SECRET_ACCESS_KEY": "test-secret"}
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real command in a subprocess (for exit codes, signals and kill -9)."""
    return subprocess.run([sys.executable, "-m", "batch_upscaler", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
