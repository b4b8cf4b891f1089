"""Broken and hostile input: each file gets its specific reason, nothing is sent for it, the run goes on."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batch_upscaler.cli import main
from batch_upscaler.emulator import EmulatorThread
from tests.conftest import image_bytes, write_image

EmulatorFactory = Callable[..., EmulatorThread]


@pytest.fixture(autouse=True)
def aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb, as far as headers go)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def items_by_source(tmp_path: Path) -> dict[str, dict[str, Any]]:
    report = json.loads((tmp_path / ".batch-upscaler/reports/job/report.json").read_text())
    return {item["source"]: item for item in report["items"]}


def test_hostile_files_each_get_a_reason(tmp_path: Path, write_manifest: Callable[..., Path],
                                         emulator_factory: EmulatorFactory,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    write_image(photos / "good.png")
    (photos / "empty.jpg").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.effect_noise((200, 200), 40).convert("RGB").save(jpeg, "JPEG")
    (photos / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (photos / "cutoff.png").write_bytes(image_bytes(120, 120)[:-20])
    (photos / "page.jpg").write_text("<html><body>not a photo</body></html>")
    (photos / "bomb.png").write_bytes(png_claiming(50_000, 50_000))
    write_image(photos / "album.jpg" / "inside.png")  # a directory named like an image
    os.mkfifo(photos / "pipe.jpg")
    (photos / "bad\nname.jpg").write_bytes(b"")
    emulator = emulator_factory()
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url})
    assert main(["run", str(manifest)]) == 1
    items = items_by_source(tmp_path)
    expected = {
        "photos/empty.jpg": ("failed", "empty_file: 0 bytes"),
        "photos/cut.jpg": ("failed", "truncated: JPEG data ends before its end-of-image marker"),
        "photos/cutoff.png": ("failed", "truncated: PNG has no IEND chunk at its end"),
        "photos/page.jpg": ("failed", "unreadable: not an image Pillow can identify"),
        "photos/pipe.jpg": ("failed", "not_a_file: not a regular file (FIFO, socket or device)"),
        "photos/album.jpg": ("skipped", "not_a_file: a directory named like an image (its contents are scanned "
                                        "as usual)"),
    }
    for source, (status, message) in expected.items():
        assert (items[source]["status"], items[source]["error_message"]) == (status, message), source
    bomb = items["photos/bomb.png"]
    assert bomb["status"] == "skipped" and bomb["error_code"] == "decompression_bomb"
    assert "2500000000 pixels" in bomb["error_message"]
    assert items["photos/good.png"]["status"] == "succeeded"
    assert items["photos/album.jpg/inside.png"]["status"] == "succeeded"
    assert len(emulator.records()) == 2  # only the two valid images were sent
    err = capsys.readouterr().err
    assert "failed photos/bad\\nname.jpg: empty_file: 0 bytes" in err  # one line, newline escaped, real path


def test_awkward_names(tmp_path: Path, write_manifest: Callable[..., Path],
                       emulator_factory: EmulatorFactory) -> None:
    photos = tmp_path / "photos"
    write_image(photos / "Été 2019" / "photo 1 (copy).png")
    write_image(photos / "新年.png")
    raw = os.fsencode(str(photos)) + b"/caf\xe9.png"
    with open(raw, "wb") as fh:
        fh.write(image_bytes(90, 90, color=(5, 6, 7)))
    write_image(tmp_path / "elsewhere" / "linked.png")
    os.symlink(tmp_path / "elsewhere" / "linked.png", photos / "link.png")
    emulator = emulator_factory()
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url})
    assert main(["run", str(manifest)]) == 0
    items = items_by_source(tmp_path)
    assert {i["status"] for i in items.values()} == {"succeeded"} and len(items) == 4
    assert items["photos/caf\\xe9.png"]["output"].endswith("out/caf\\xe9.png")
    assert (tmp_path / "out" / "Été 2019" / "photo 1 (copy).png").exists()
    assert (tmp_path / "out" / "link.png").exists()  # the link's path, inside the output root
    assert main(["run", str(manifest)]) == 0  # and a rerun finds them all done
    assert len(emulator.records()) == 4


def test_output_directory_inside_a_source_is_never_rediscovered(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    write_image(tmp_path / "photos" / "a.png")
    emulator = emulator_factory()
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              output={"dir": "photos/upscaled"})
    assert main(["run", str(manifest)]) == 0
    assert (tmp_path / "photos/upscaled/a.png").exists()
    assert main(["run", str(manifest)]) == 0
    assert list(items_by_source(tmp_path)) == ["photos/a.png"] and len(emulator.records()) == 1


def test_unwritable_output_fails_the_item_with_its_path_before_paying(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    write_image(tmp_path / "photos" / "sub" / "a.png")
    write_image(tmp_path / "photos" / "b.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").write_text("a file where a directory must go")  # root ignores chmod
    emulator = emulator_factory()
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url})
    assert main(["run", str(manifest)]) == 1
    items = items_by_source(tmp_path)
    assert items["photos/sub/a.png"]["error_code"] == "bad_output_path"
    assert "sub/a.png" in items["photos/sub/a.png"]["error_message"]
    assert "is a file where a directory must go" in items["photos/sub/a.png"]["error_message"]
    assert items["photos/b.png"]["status"] == "succeeded"
    assert len(emulator.records()) == 1  # known before sending: nothing paid for a.png


def test_corrupt_checkpoint_exits_2_and_is_left_untouched(tmp_path: Path, write_manifest: Callable[..., Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    write_image(tmp_path / "photos" / "a.png")
    manifest = write_manifest()
    state = tmp_path / ".batch-upscaler"
    state.mkdir()
    garbage = os.urandom(8192)
    (state / "job.sqlite").write_bytes(garbage)
    assert main(["run", str(manifest)]) == 2
    assert "checkpoint database is unreadable" in capsys.readouterr().err
    assert (state / "job.sqlite").read_bytes() == garbage
    assert not (tmp_path / "out").exists()
