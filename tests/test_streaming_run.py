"""Streamed answers over real HTTP and on disk: the staging sink, adopt, invoke_into and whole runs.

* staging.StagingFileSink and LocalOutputStore.adopt on real files: content, digest, mode, abort
  at any moment (also while a write runs in its thread), a full disk (spilled to memory, nothing lost).
* BedrockInvoker.invoke_into against the emulator (the in-process ``emulator_factory``): every answer
  it can send ends as ``invoke`` + the returned-image check ends, and nothing is left in staging.
* Whole runs: streamed and buffered (``RunOptions.buffered_responses``) runs write the same files,
  metadata and padding crop included; memory while receiving does not grow with the image.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import os
import random
import re
import sqlite3
import struct
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pybase64
import pytest
from PIL import Image

from batch_upscaler.bedrock import BedrockInvoker, ClientSettings, open_client
from batch_upscaler.emulator import EmulatorThread, FaultKind
from batch_upscaler.imagecheck import Structure, StructureError, check_encoded
from batch_upscaler.manifest import load_settings
from batch_upscaler.metadata import SourceMetadata
from batch_upscaler.payload import build_body
from batch_upscaler.retry import AttemptError
from batch_upscaler.runner import run_job
from batch_upscaler.settings import RunOptions
from batch_upscaler.storage.base import OutputPathError
from batch_upscaler.storage.local import LocalOutputStore, digest_parts, new_file_mode
from batch_upscaler.storage.staging import Spilled, StagedFile, StagingFileSink
from batch_upscaler.streaming import CheckedSink, Received, SplicingSink, receive
from tests.conftest import manifest_doc
from tests.test_metadata import PROFILE, _source_exif

EmulatorFactory = Callable[..., EmulatorThread]
MODEL = "us.stability.stable-conservative-upscale-v1:0"


@pytest.fixture(autouse=True)
def dummy_aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


async def inline(func: Callable[..., Any], *args: Any) -> Any:
    return func(*args)


def staged_files(store: LocalOutputStore) -> list[Path]:
    return sorted(store.staging().glob("*.part"))


# ---------------------------------------------------------------------------------------------- the staging sink


def write_through(sink: StagingFileSink, data: bytes, piece: int) -> StagedFile | Spilled:
    async def go() -> StagedFile | Spilled:
        for start in range(0, len(data), piece):
            await sink.write(memoryview(data)[start:start + piece])
        return await sink.commit()
    return asyncio.run(go())


@pytest.mark.parametrize("piece", [1, 1000, 70_000])
def test_the_staging_sink_writes_the_file_and_its_digest(tmp_path: Path, piece: int) -> None:
    store = LocalOutputStore(tmp_path / "out")
    data = random.Random(piece).randbytes(300_000)
    sink = StagingFileSink(store.staging(), asyncio.to_thread, new_file_mode(), flush_bytes=64 * 1024)
    staged = write_through(sink, data, piece)
    assert isinstance(staged, StagedFile)
    assert staged.path.parent == store.staging() and staged.path.read_bytes() == data
    assert (staged.size, staged.digest) == (len(data), digest_parts([data]))
    assert staged.path.stat().st_mode & 0o777 == new_file_mode()

    written = store.adopt_file(staged, "a/b/out.png", mtime_ns=1_600_000_000_123_456_789)
    target = tmp_path / "out/a/b/out.png"
    assert (written.size, written.digest) == (len(data), digest_parts([data])) and target.read_bytes() == data
    assert target.stat().st_mtime_ns == 1_600_000_000_123_456_789 and staged_files(store) == []


def test_abort_removes_the_file_at_any_moment(tmp_path: Path) -> None:
    store = LocalOutputStore(tmp_path / "out")

    async def go() -> None:
        never_written = store.open_sink(inline)
        await never_written.abort()
        sink = StagingFileSink(store.staging(), inline, new_file_mode(), flush_bytes=10)
        await sink.write(b"x" * 100)
        assert len(staged_files(store)) == 1
        await sink.abort()
        await sink.abort()  # twice is fine
        committed = store.open_sink(inline)
        await committed.write(b"y")
        staged = await committed.commit()
        assert isinstance(staged, StagedFile)
        store.discard(staged)
    asyncio.run(go())
    assert staged_files(store) == []


def test_abort_while_a_write_runs_in_its_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancelled task's abort must not close the file under the thread still writing it: the thread
    removes it when it is done."""
    store = LocalOutputStore(tmp_path / "out")
    entered, release = threading.Event(), threading.Event()
    real_writev = os.writev

    def slow_writev(fd: int, buffers: Any) -> int:
        entered.set()
        release.wait(timeout=30)
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", slow_writev)

    async def go() -> None:
        sink = StagingFileSink(store.staging(), asyncio.to_thread, new_file_mode(), flush_bytes=10)
        writer = asyncio.create_task(sink.write(b"z" * 100))
        await asyncio.to_thread(entered.wait, 30)
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer
        await sink.abort()
        assert len(staged_files(store)) == 1  # still being written
        release.set()
    asyncio.run(go())  # waits for the worker thread to end
    assert staged_files(store) == []


@pytest.mark.parametrize("fail_after", [0, 5000, 150_000])
def test_a_full_disk_spills_the_output_to_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 fail_after: int) -> None:
    """Whatever reached the file is read back: the paid image is whole in memory, nothing staged."""
    store = LocalOutputStore(tmp_path / "out")
    room = [fail_after]
    real_writev = os.writev

    def filling_writev(fd: int, buffers: list[memoryview]) -> int:
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        head = b"".join(bytes(b) for b in buffers)[:room[0]]
        room[0] -= len(head)
        return real_writev(fd, [head])  # a short write, as a filling disk gives

    monkeypatch.setattr(os, "writev", filling_writev)  # the module staging.py writes with
    data = random.Random(fail_after).randbytes(200_000)
    result = write_through(StagingFileSink(store.staging(), inline, new_file_mode(), flush_bytes=20_000), data, 7000)
    assert isinstance(result, Spilled) and result.error.errno == errno.ENOSPC
    assert result.parts is not None and b"".join(result.parts) == data
    assert staged_files(store) == []


def test_adopt_failures_leave_the_staged_file_for_the_caller(tmp_path: Path) -> None:
    store = LocalOutputStore(tmp_path / "out")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")
    staged = write_through(store.open_sink(inline), b"data", 4)
    assert isinstance(staged, StagedFile)
    with pytest.raises(OutputPathError):
        store.adopt_file(staged, "link/out.png")
    assert staged.path.exists()
    store.discard(staged)
    assert staged_files(store) == []


# ---------------------------------------------------------------------------------------------- memory


def lazy_png(idat_chunks: int, chunk: int = 192 * 1024) -> Iterator[bytes]:
    """A structurally valid PNG (the check does not inflate IDAT) of ``idat_chunks`` random chunks, made
    piece by piece, so the test itself never holds it."""
    rng = random.Random(0)
    ihdr = struct.pack(">IIBBBBB", 3000, 2000, 8, 2, 0, 0, 0)
    yield b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    for _ in range(idat_chunks):
        yield png_chunk(b"IDAT", rng.randbytes(chunk))
    yield png_chunk(b"IEND", b"")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def lazy_body(image: Iterator[bytes]) -> Iterator[bytes]:
    """The answer's JSON around the image's base64, produced piece by piece (groups of 3 bytes)."""
    yield b'{"seeds": [1], "images": ["'
    carry = b""
    for piece in image:
        data = carry + piece
        cut = len(data) - len(data) % 3
        yield pybase64.b64encode(data[:cut])
        carry = data[cut:]
    yield pybase64.b64encode(carry) + b'"], "finish_reasons": [null]}'


def judge_structure(found: Structure | StructureError) -> str | None:
    return f"damaged: {found}" if isinstance(found, StructureError) else None


@pytest.mark.parametrize("megabytes", [8, 30])
def test_memory_while_receiving_does_not_grow_with_the_image(tmp_path: Path, megabytes: int) -> None:
    store = LocalOutputStore(tmp_path / "out")
    idats = megabytes * 1024 * 1024 // (192 * 1024)
    expected = hashlib.sha256()
    for piece in lazy_png(idats):
        expected.update(piece)
    body = lazy_body(lazy_png(idats))

    async def read(_: int) -> bytes:
        return next(body, b"")

    sink = CheckedSink(SplicingSink(store.open_sink(inline), SourceMetadata(None, PROFILE)), judge_structure)
    tracemalloc.start()
    try:
        result = asyncio.run(receive(read, sink))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(result, Received) and isinstance(result.stored, StagedFile)
    assert result.image == Structure("PNG", 3000, 2000)
    assert peak < 6 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB while receiving a {megabytes} MB image"
    with result.stored.path.open("rb") as fh:  # the ICC profile went in after IHDR, the rest as it came
        head = fh.read(33)
        fh.seek(result.stored.size - (sum(len(p) for p in lazy_png(idats)) - 33))
        rest = hashlib.sha256(head)
        while block := fh.read(1 << 20):
            rest.update(block)
    assert rest.hexdigest() == expected.hexdigest()


# ---------------------------------------------------------------------------------------------- invoke_into over HTTP


def noisy_png(seed: int, size: tuple[int, int] = (90, 70)) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3)).save(buffer, "PNG")
    return buffer.getvalue()


ANSWERS = (FaultKind.NONE, FaultKind.CONTENT_FILTERED, FaultKind.TRUNCATED, FaultKind.NON_JSON,
           FaultKind.BAD_BASE64, FaultKind.CORRUPT_IMAGE, FaultKind.DISCONNECT, FaultKind.THROTTLE)


def bytes_free(message: str) -> str:
    return re.sub(r"\d+ bytes", "N bytes", message)


def test_invoke_into_ends_every_answer_as_invoke_does(tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    images = {kind: noisy_png(n) for n, kind in enumerate(ANSWERS)}
    emulator = emulator_factory(output_max_pixels=400 * 400, faults_by_image={
        hashlib.sha256(image).hexdigest(): (kind, kind) for kind, image in images.items()})
    store = LocalOutputStore(tmp_path / "out")

    async def both(invoker: BedrockInvoker, image: bytes) -> tuple[Any, Any]:
        body = build_body(image, {"prompt": "x"})
        sink = CheckedSink(store.open_sink(asyncio.to_thread), judge_structure)
        return await invoker.invoke_into(body, sink), await invoker.invoke(body)

    async def go() -> dict[FaultKind, tuple[Any, Any]]:
        settings = ClientSettings("us-east-1", emulator.endpoint_url, None, 2, 10, 5, ("AKID", "secret"))
        async with open_client(settings) as client:
            invoker = BedrockInvoker(client, MODEL)
            return {kind: await both(invoker, image) for kind, image in images.items()}

    for kind, (streamed, buffered) in asyncio.run(go()).items():
        if isinstance(buffered, AttemptError):
            assert isinstance(streamed, AttemptError) and streamed.code == buffered.code, kind
            if kind is not FaultKind.DISCONNECT:  # the exception's wording depends on where the read was
                # (each answer has its own random seed, so bodies differ in length by a digit or two)
                assert bytes_free(streamed.message) == bytes_free(buffered.message), kind
            continue
        try:
            found = check_encoded(buffered)
        except StructureError as exc:
            assert streamed == AttemptError("bad_response", f"damaged: {exc}"), kind
            continue
        assert isinstance(streamed, Received) and streamed.image == found
        assert streamed.stored.path.read_bytes() == buffered and kind is FaultKind.NONE
        store.discard(streamed.stored)
    assert staged_files(store) == []
    assert len(emulator.records()) == 2 * len(ANSWERS)


# ---------------------------------------------------------------------------------------------- whole runs


def source_jpeg(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.frombytes("RGB", size, random.Random(size[0]).randbytes(size[0] * size[1] * 3))
    picture.save(path, "JPEG", exif=_source_exif().tobytes(), icc_profile=PROFILE, quality=90)
    return path


def digests(manifest: Path) -> dict[str, tuple[int, str]]:
    settings = load_settings(manifest)
    with sqlite3.connect(settings.checkpoint_path) as db:
        rows = db.execute("SELECT output_path, output_bytes, output_digest FROM items WHERE state = 'succeeded'")
        return {path: (size, digest) for path, size, digest in rows}


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_streamed_and_buffered_runs_write_the_same_files(tmp_path: Path, write_manifest: Callable[..., Path],
                                                        emulator_factory: EmulatorFactory, fmt: str) -> None:
    source_jpeg(tmp_path / "photos" / "camera.jpg", (120, 90))  # EXIF (Orientation 6) and an ICC profile
    source_jpeg(tmp_path / "photos" / "panorama.jpg", (330, 90))  # padded to 2.5:1, cropped back
    (tmp_path / "photos" / "plain.png").write_bytes(noisy_png(7))
    emulator = emulator_factory(output_max_pixels=500 * 400)
    manifests = {mode: write_manifest(manifest_doc(
        name=mode, output={"dir": f"out-{mode}", "format": fmt}, backend="bedrock",
        bedrock={"endpoint_url": emulator.endpoint_url}), name=f"{mode}.yaml") for mode in ("streamed", "buffered")}
    for mode, manifest in manifests.items():
        result = run_job(load_settings(manifest), RunOptions(show_progress=False,
                                                             buffered_responses=mode == "buffered"))
        assert result.exit_code == 0
    ext = {"png": "png", "jpeg": "jpg", "webp": "webp"}[fmt]
    names = sorted(p.name for p in (tmp_path / "out-streamed").glob(f"*.{ext}"))
    assert names == sorted(f"{stem}.{ext}" for stem in ("camera", "panorama", "plain"))
    for name in names:
        assert (tmp_path / "out-streamed" / name).read_bytes() == (tmp_path / "out-buffered" / name).read_bytes()
    assert list(digests(manifests["streamed"]).values()) == list(digests(manifests["buffered"]).values())
    with Image.open(tmp_path / "out-streamed" / f"camera.{ext}") as im:
        assert im.getexif()[0x010F] == "Canon" and im.info["icc_profile"] == PROFILE
    with Image.open(tmp_path / "out-streamed" / f"panorama.{ext}") as im:
        assert abs(im.height / im.width - 330 / 90) < 0.05  # upright (Orientation 6), the padding cropped off
    assert not (tmp_path / "out-streamed" / ".batch-upscaler-tmp").exists()


def test_a_run_streams_its_answers(tmp_path: Path, write_manifest: Callable[..., Path],
                                   emulator_factory: EmulatorFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The buffered transport is not used by a run (only the free outage probe would use it)."""
    for i in range(3):
        (tmp_path / "photos" / f"p{i}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "photos" / f"p{i}.png").write_bytes(noisy_png(i))
    emulator = emulator_factory(faults_by_image={
        hashlib.sha256(noisy_png(0)).hexdigest(): (FaultKind.CORRUPT_IMAGE,),
        hashlib.sha256(noisy_png(1)).hexdigest(): (FaultKind.DISCONNECT,)})

    async def no_buffering(self: BedrockInvoker, body: bytes) -> bytes | AttemptError:
        raise AssertionError("a run held an answer whole")

    monkeypatch.setattr(BedrockInvoker, "invoke", no_buffering)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url})
    assert run_job(load_settings(manifest), RunOptions(show_progress=False)).exit_code == 0
    assert len(emulator.records()) == 5  # two answers were re-sent once
    recorded = digests(manifest)
    for path, (size, digest) in recorded.items():
        data = (tmp_path / "out" / path).read_bytes()
        assert len(data) == size and digest_parts([data]) == digest


def test_without_a_staging_directory_answers_are_held_and_written_as_before(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "p.png").write_bytes(noisy_png(3))
    emulator = emulator_factory()

    def no_staging(self: LocalOutputStore, offload: Any) -> StagingFileSink:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(LocalOutputStore, "open_sink", no_staging)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url})
    assert run_job(load_settings(manifest), RunOptions(show_progress=False)).exit_code == 0
    ((path, (size, digest)),) = digests(manifest).items()
    data = (tmp_path / "out" / path).read_bytes()
    assert (len(data), digest_parts([data])) == (size, digest)
