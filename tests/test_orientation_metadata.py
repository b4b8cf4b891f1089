"""prepare.orientation apply vs keep, end to end: what the emulator received and how a viewer shows the output.

A viewer shows a file through its EXIF Orientation (``PIL.ImageOps.exif_transpose`` here). Each case
stores an upright 160x100 picture (red marker top-left) the way a camera does for one Orientation
value, as JPEG, PNG and WebP, and runs them with ``output.format: same`` so that the EXIF splice into
each of the three containers is exercised.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageOps

from batch_upscaler.cli import main
from batch_upscaler.emulator import EmulatorThread, RequestRecord
from tests.test_preparation_corpus import INVERSE, MARKER, exif_bytes

EmulatorFactory = Callable[..., EmulatorThread]
ORIENTATION = 0x0112
SIZE = (160, 100)
# source extension -> (Pillow writer, options, the output_format that ``same`` asks for)
CONTAINERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "jpg": ("JPEG", {"quality": 95}, "jpeg"),
    "png": ("PNG", {}, "png"),
    "webp": ("WEBP", {"lossless": True}, "webp"),
}


@pytest.fixture(autouse=True)
def aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")


def upright() -> Image.Image:
    """Blue, with a red block in the top-left corner: the marker that shows which way is up."""
    im = Image.new("RGB", SIZE, (20, 40, 200))
    im.paste(MARKER, (0, 0, SIZE[0] // 5, SIZE[1] // 5))
    return im


def marker_corner(im: Image.Image) -> str:
    """Which corner of ``im``'s pixels (as decoded, no EXIF applied) holds the red marker."""
    rgb = im.convert("RGB")
    w, h = rgb.size
    dx, dy = max(1, w // 20), max(1, h // 20)
    corners = {"top-left": (dx, dy), "top-right": (w - 1 - dx, dy),
               "bottom-left": (dx, h - 1 - dy), "bottom-right": (w - 1 - dx, h - 1 - dy)}
    red = []
    for name, xy in corners.items():
        pixel = rgb.getpixel(xy)
        assert isinstance(pixel, tuple)
        if pixel[0] > 200 and pixel[2] < 80:
            red.append(name)
    assert len(red) == 1, f"expected the marker in exactly one corner, found {red}"
    return red[0]


def displayed(im: Image.Image) -> Image.Image:
    """The picture as a viewer shows it: EXIF Orientation applied."""
    return ImageOps.exif_transpose(im) or im


def write_sources(photos: Path, orientation: int, exif: bytes) -> dict[str, Path]:
    inverse = INVERSE[orientation]
    stored = upright() if inverse is None else upright().transpose(inverse)
    photos.mkdir(parents=True, exist_ok=True)
    paths = {}
    for ext, (fmt, options, _) in CONTAINERS.items():
        paths[ext] = photos / f"o{orientation}.{ext}"
        stored.save(paths[ext], format=fmt, exif=exif, **options)
    return paths


def run(tmp_path: Path, write_manifest: Callable[..., Path], emulator: EmulatorThread, setting: str,
        metadata: dict[str, bool] | None = None) -> dict[str, dict[str, Any]]:
    output = {"format": "same"} | ({"metadata": metadata} if metadata else {})
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              output=output, prepare={"orientation": setting})
    assert main(["run", str(manifest)]) == 0
    report = json.loads((tmp_path / ".batch-upscaler/reports/job/report.json").read_text())
    return {Path(item["source"]).suffix[1:]: item for item in report["items"]}


def received_by_container(emulator: EmulatorThread) -> dict[str, RequestRecord]:
    """Each request by the source container it came from (``same`` gives each a distinct output_format)."""
    by_format = {str((r.params or {})["output_format"]): r for r in emulator.records()}
    assert len(by_format) == len(emulator.records()) == len(CONTAINERS)
    return {ext: by_format[out] for ext, (_, _, out) in CONTAINERS.items()}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("setting", ["apply", "keep"])
def test_orientation_setting_sends_and_tags_the_output_so_viewers_show_it_upright(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory,
        received_images: dict[str, bytes], setting: str, orientation: int) -> None:
    sources = write_sources(tmp_path / "photos", orientation, exif_bytes(orientation))
    emulator = emulator_factory(output_max_pixels=320 * 200)

    items = run(tmp_path, write_manifest, emulator, setting)

    received = received_by_container(emulator)
    for ext, source_path in sources.items():
        with Image.open(source_path) as source:
            stored_corner, shown_source = marker_corner(source), displayed(source)
        assert marker_corner(shown_source) == "top-left" and shown_source.size == SIZE
        record = received[ext]
        with Image.open(io.BytesIO(received_images[record.image_sha256 or ""])) as sent:
            sent_corner, sent_size, sent_tag = marker_corner(sent), sent.size, sent.getexif().get(ORIENTATION, 1)
        if setting == "keep":  # not rotated: the stored pixels, byte-for-byte
            assert record.image_sha256 == hashlib.sha256(source_path.read_bytes()).hexdigest(), ext
            assert (sent_corner, sent_tag) == (stored_corner, orientation), ext
        else:  # rotated upright before sending, so nothing in the sent file may ask for another rotation
            assert (sent_corner, sent_size, sent_tag) == ("top-left", SIZE, 1), ext

        item = items[ext]
        assert item["status"] == "succeeded", item
        with Image.open(item["output"]) as out:
            assert out.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
            exif = out.getexif()
            shown = displayed(out)
            assert exif.get(ORIENTATION) == (orientation if setting == "keep" else 1), ext
            assert exif.get(0x010F) == "TestCam", f"{ext}: the rest of the EXIF is carried as before"
            assert marker_corner(shown) == marker_corner(shown_source), f"{ext} is shown sideways or flipped"
            assert shown.width / shown.height == pytest.approx(SIZE[0] / SIZE[1], rel=0.02), ext


@pytest.mark.parametrize(("setting", "orientation", "expected"), [
    ("keep", 6, {ORIENTATION: 6}),  # the display still needs the Orientation: a minimal EXIF carries just it
    ("keep", 3, {ORIENTATION: 3}),
    ("keep", 1, {}),  # nothing to keep: no EXIF at all
    ("apply", 6, {}),  # rotated pixels need no Orientation: no EXIF at all
])
def test_exif_false_carries_only_an_orientation_that_the_display_needs(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory,
        setting: str, orientation: int, expected: dict[int, int]) -> None:
    write_sources(tmp_path / "photos", orientation, exif_bytes(orientation))
    emulator = emulator_factory(output_max_pixels=320 * 200)

    items = run(tmp_path, write_manifest, emulator, setting, {"exif": False})

    for ext, item in items.items():
        with Image.open(item["output"]) as out:
            assert dict(out.getexif()) == expected, ext
            assert marker_corner(displayed(out)) == "top-left", ext
