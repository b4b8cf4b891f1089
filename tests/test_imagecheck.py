"""Structure checks of encoded PNG/JPEG/WebP bytes: valid files give their header's size, broken ones a specific error.

Images are made with Pillow (or by hand where Pillow cannot write the variant); nothing is mocked.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batch_upscaler.imagecheck import (
    JPEG_NO_EOI,
    PNG_NO_IEND,
    Structure,
    StructureError,
    check_encoded,
    check_file,
    check_input,
)
from batch_upscaler.probe import truncation

SIZE = (123, 77)  # not square, so a swapped width and height shows


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def noise(size: tuple[int, int] = SIZE, mode: str = "RGB") -> Image.Image:
    """Noise compresses badly, so the entropy-coded data is long and full of 0xFF bytes."""
    bands = [Image.effect_noise(size, 60 + 7 * i) for i in range(3)]
    rgb = Image.merge("RGB", bands)
    if mode == "RGBA":  # a real alpha channel (an opaque one is dropped by the WebP encoder)
        rgb.putalpha(Image.linear_gradient("L").resize(size))
        return rgb
    return rgb.convert(mode)


def exif_bytes() -> bytes:
    exif = Image.Exif()
    exif[0x010F], exif[0x0112] = "Canon", 6
    return exif.tobytes()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_from_chunks(*chunks: bytes) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def ihdr(width: int, height: int, interlace: int = 0) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, interlace))


def interlaced_png(image: Image.Image) -> bytes:
    """An Adam7-interlaced RGB PNG (Pillow reads these but cannot write them): each pass's rows, filter 0."""
    width, height = image.size
    pixels = image.tobytes()
    rows = []
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        for y in range(y0, height, dy):
            row = b"".join(pixels[(y * width + x) * 3:(y * width + x) * 3 + 3] for x in range(x0, width, dx))
            if row:
                rows.append(b"\0" + row)
    return png_from_chunks(ihdr(width, height, interlace=1), png_chunk(b"IDAT", zlib.compress(b"".join(rows))),
                           png_chunk(b"IEND", b""))


@cache
def samples() -> dict[str, bytes]:
    """Valid files of every variant the checks must accept, made once per test session."""
    rgb = noise()
    return {
        "png-rgb": encode(rgb, "PNG"),
        "png-l": encode(rgb.convert("L"), "PNG"),
        "png-rgba": encode(noise(mode="RGBA"), "PNG"),
        "png-16bit": encode(Image.linear_gradient("L").resize(SIZE).convert("I;16"), "PNG"),
        "png-interlaced": interlaced_png(rgb),
        "png-exif": encode(rgb, "PNG", exif=exif_bytes()),
        "jpeg-baseline": encode(rgb, "JPEG", quality=95),
        "jpeg-progressive": encode(rgb, "JPEG", quality=90, progressive=True),
        "jpeg-exif": encode(rgb, "JPEG", exif=exif_bytes()),
        "jpeg-grey": encode(rgb.convert("L"), "JPEG"),
        "jpeg-restart-markers": encode(rgb, "JPEG", restart_marker_rows=1),
        "webp-lossy": encode(rgb, "WEBP", quality=80),
        "webp-lossless": encode(rgb, "WEBP", lossless=True),
        "webp-alpha": encode(noise(mode="RGBA"), "WEBP", quality=80),
        "webp-exif": encode(rgb, "WEBP", exif=exif_bytes()),
    }


FORMAT_OF = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@pytest.mark.parametrize("name", list(samples()))
def test_valid_images_give_their_format_and_size(name: str) -> None:
    data = samples()[name]
    with Image.open(io.BytesIO(data)) as im:  # the sample really is what its name says
        im.load()
        assert im.size == SIZE
    expected = Structure(FORMAT_OF[name.split("-")[0]], *SIZE)
    assert check_encoded(data) == expected
    assert check_encoded(memoryview(data)) == expected
    assert check_input(data) == expected


def test_webp_variants_use_the_chunks_they_claim() -> None:
    """The WebP samples cover all three first chunks, so each size parser runs."""
    assert [samples()[name][12:16] for name in ("webp-lossy", "webp-lossless", "webp-alpha", "webp-exif")] == [
        b"VP8 ", b"VP8L", b"VP8X", b"VP8X"]


def test_png_size_comes_from_ihdr_without_decoding() -> None:
    # 5000x3 declared, while the (valid) IDAT holds far fewer pixels: the check reads headers only.
    data = png_from_chunks(ihdr(5000, 3), png_chunk(b"IDAT", zlib.compress(b"\0" * 10)), png_chunk(b"IEND", b""))
    assert check_encoded(data) == Structure("PNG", 5000, 3)


def error_of(check: Callable[[bytes], object], data: bytes) -> str:
    with pytest.raises(StructureError) as caught:
        check(data)
    return str(caught.value)


def idat_offset(data: bytes) -> int:
    return data.index(b"IDAT") - 4


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


@pytest.mark.parametrize(("damage", "message"), [
    pytest.param(lambda d: flip(d, idat_offset(d) + 100), "PNG chunk IDAT at offset {idat}: CRC mismatch",
                 id="flipped-idat-byte"),
    pytest.param(lambda d: d + b"GARBAGE", "PNG has 7 bytes after its IEND chunk", id="garbage-after-iend"),
    pytest.param(lambda d: d[:-12], PNG_NO_IEND, id="no-iend"),
    pytest.param(lambda d: d[:idat_offset(d) + 50], "PNG data ends inside chunk IDAT at offset {idat}",
                 id="cut-in-idat"),
    pytest.param(lambda d: d[:5], "image data ends after 5 bytes, inside its file signature", id="cut-in-signature"),
])
def test_broken_png_gives_a_specific_error(damage: Callable[[bytes], bytes], message: str) -> None:
    data = samples()["png-rgb"]
    assert error_of(check_encoded, damage(data)) == message.format(idat=idat_offset(data))


@pytest.mark.parametrize(("data", "message"), [
    pytest.param(png_from_chunks(ihdr(0, 10), png_chunk(b"IDAT", zlib.compress(b"")), png_chunk(b"IEND", b"")),
                 "PNG header gives a zero size (0x10)", id="zero-width"),
    pytest.param(png_from_chunks(ihdr(4, 4), png_chunk(b"IEND", b"")), "PNG has no IDAT chunk", id="no-idat"),
    pytest.param(png_from_chunks(png_chunk(b"IDAT", zlib.compress(b"")), ihdr(4, 4), png_chunk(b"IEND", b"")),
                 "PNG starts with a IDAT chunk, not IHDR", id="ihdr-not-first"),
    pytest.param(png_from_chunks(ihdr(4, 4), png_chunk(b"ID\x00T", b"x"), png_chunk(b"IEND", b"")),
                 "PNG chunk at offset 33 has an invalid type b'ID\\x00T'", id="bad-chunk-type"),
])
def test_malformed_png_structure(data: bytes, message: str) -> None:
    assert error_of(check_encoded, data) == message


def test_jpeg_without_eoi_or_cut_mid_scan() -> None:
    data = samples()["jpeg-baseline"]
    sos = data.index(b"\xff\xda")
    for broken in (data[:-2], data[:(sos + len(data)) // 2], data[:-1]):
        assert error_of(check_encoded, broken) == error_of(check_input, broken) == JPEG_NO_EOI


def test_progressive_jpeg_cut_between_scans_is_caught() -> None:
    """A cut right before a later scan's header leaves whole scans and no EOI: the walk must go on past scan 1."""
    data = samples()["jpeg-progressive"]
    later_scan = data.rindex(b"\xff\xda")
    assert data.index(b"\xff\xda") < later_scan  # it has several scans
    assert error_of(check_encoded, data[:later_scan]) == JPEG_NO_EOI


def test_jpeg_bytes_after_eoi() -> None:
    """A model's JPEG may carry a few bytes of padding after its end, not a trailer."""
    data = samples()["jpeg-baseline"]
    assert check_encoded(data + b"\0" * 16) == Structure("JPEG", *SIZE)
    assert check_encoded(data + b"\r\n") == Structure("JPEG", *SIZE)
    assert error_of(check_encoded, data + b"\0" * 17) == "JPEG has 17 bytes after its end-of-image marker"
    assert error_of(check_encoded, data + b"junk") == "JPEG has 4 bytes after its end-of-image marker"
    assert check_input(data + b"phone trailer" * 1000) == Structure("JPEG", *SIZE)  # inputs: tolerated


def test_jpeg_structure_errors() -> None:
    data = samples()["jpeg-baseline"]
    sof = data.index(b"\xff\xc0")
    zero_height = data[:sof + 5] + b"\0\0" + data[sof + 7:]
    assert error_of(check_encoded, zero_height) == "JPEG header gives a zero size (123x0)"
    no_frame = data[:sof] + b"\xff\xfe" + data[sof + 2:]  # the frame header turned into a comment
    with pytest.raises(StructureError, match=r"^JPEG has no frame header before its first scan \(offset \d+\)$"):
        check_encoded(no_frame)
    assert error_of(check_encoded, data[:sof] + b"\x00" + data[sof + 1:]) == f"JPEG has no marker at offset {sof}"
    two_images = data + data  # an MPO-like second image: fine for an input, not for a model's output
    assert error_of(check_encoded, two_images) == f"JPEG has {len(data)} bytes after its end-of-image marker"
    assert check_input(two_images) == Structure("JPEG", *SIZE)


def with_riff_length(data: bytes, declared: int) -> bytes:
    return data[:4] + struct.pack("<I", declared - 8) + data[8:]


def test_webp_riff_length_must_match_the_file() -> None:
    data = samples()["webp-lossy"]
    n = len(data)
    assert error_of(check_encoded, with_riff_length(data, n + 10)) == f"WebP declares {n + 10} bytes but has {n}"
    assert error_of(check_encoded, data + b"\0\0\0\0") == f"WebP declares {n} bytes but has {n + 4}"
    assert error_of(check_encoded, data[:-100]) == f"WebP declares {n} bytes but has {n - 100}"
    assert check_input(data + b"\0\0\0\0") == Structure("WEBP", *SIZE)  # inputs: a trailer is tolerated


def test_webp_chunk_structure_errors() -> None:
    lossy = samples()["webp-lossy"]
    overlong = lossy[:16] + struct.pack("<I", len(lossy)) + lossy[20:]  # VP8 chunk longer than the file
    with pytest.raises(StructureError, match=r"^WebP chunk 'VP8 ' at offset 12 declares \d+ bytes, past the end"):
        check_encoded(overlong)
    extended = samples()["webp-exif"]
    wider = extended[:24] + (SIZE[0]).to_bytes(3, "little") + extended[27:]  # canvas 124 wide, image 123
    assert error_of(check_encoded, wider) == "WebP canvas is 124x77 but its image is 123x77"
    odd = lossy[:12] + b"ABCD" + lossy[16:]
    assert error_of(check_encoded, odd) == "WebP starts with a b'ABCD' chunk, not VP8, VP8L or VP8X"


@pytest.mark.parametrize(("data", "message"), [
    pytest.param(b"", "no image data (0 bytes)", id="empty"),
    pytest.param(b"<!DOCTYPE html><html><body>Service Unavailable</body></html>", "not a PNG, JPEG or WebP file",
                 id="html"),
    pytest.param(b'{"message": "error"}', "not a PNG, JPEG or WebP file", id="json"),
    pytest.param(b"GIF89a" + b"\0" * 20, "not a PNG, JPEG or WebP file", id="gif"),
])
def test_not_an_image(data: bytes, message: str) -> None:
    assert error_of(check_encoded, data) == message


SAMPLE_NAMES = st.sampled_from(list(samples()))


@settings(max_examples=300, deadline=None)
@given(name=SAMPLE_NAMES, data=st.data())
def test_any_truncation_is_an_error(name: str, data: st.DataObject) -> None:
    whole = samples()[name]
    cut = data.draw(st.integers(min_value=0, max_value=len(whole) - 1), label="cut")
    with pytest.raises(StructureError):
        check_encoded(whole[:cut])
    if cut >= 12:  # the lenient input check agrees (below 12 bytes it cannot tell a WebP from other RIFF data)
        with pytest.raises(StructureError):
            check_input(whole[:cut])


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from([n for n in samples() if n.startswith("png")]), data=st.data())
def test_any_flipped_png_byte_is_an_error(name: str, data: st.DataObject) -> None:
    """Every byte of a PNG is covered by its signature, a chunk length or a CRC."""
    whole = bytearray(samples()[name])
    at = data.draw(st.integers(min_value=0, max_value=len(whole) - 1), label="offset")
    whole[at] ^= data.draw(st.integers(min_value=1, max_value=255), label="xor")
    with pytest.raises(StructureError):
        check_encoded(bytes(whole))


# Inputs: check_file, with bounded I/O, and the same answers as check_input and probe.truncation ------------------


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def lenient_answers(tmp_path: Path, name: str, data: bytes) -> tuple[Structure | str | None, ...]:
    """check_file, check_input and probe.truncation on the same bytes, each as its result or its message."""
    def outcome(check: Callable[[], Structure | None]) -> Structure | str | None:
        try:
            return check()
        except StructureError as exc:
            return str(exc)
    path = write(tmp_path, name, data)
    pil_format = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WEBP"}.get(name.split(".")[-1].upper(), "OTHER")
    return (outcome(lambda: check_file(path, len(data))), outcome(lambda: check_input(data)),
            truncation(data, pil_format))


@pytest.mark.parametrize("name", list(samples()))
def test_check_file_accepts_valid_inputs(tmp_path: Path, name: str) -> None:
    data = samples()[name]
    expected = Structure(FORMAT_OF[name.split("-")[0]], *SIZE)
    assert lenient_answers(tmp_path, f"{name}.{FORMAT_OF[name.split('-')[0]].lower()}", data) == (
        expected, expected, None)


@pytest.mark.parametrize(("name", "cut", "message"), [
    ("png-rgb", 20, PNG_NO_IEND),
    ("png-rgb", 12, PNG_NO_IEND),
    ("jpeg-baseline", 2, JPEG_NO_EOI),
    ("jpeg-progressive", 700, JPEG_NO_EOI),
    ("webp-lossy", 100, "WebP declares {n} bytes but has {m}"),
])
def test_check_file_refuses_truncated_inputs_like_the_upload_does(tmp_path: Path, name: str, cut: int,
                                                                   message: str) -> None:
    data = samples()[name]
    text = message.format(n=len(data), m=len(data) - cut)
    ext = FORMAT_OF[name.split("-")[0]].lower()
    assert lenient_answers(tmp_path, f"cut.{ext}", data[:-cut]) == (text, text, text)


def test_check_file_tolerates_what_cameras_append(tmp_path: Path) -> None:
    jpeg = samples()["jpeg-exif"]
    mpo = encode(noise(), "MPO", save_all=True, append_images=[noise()])
    expected = Structure("JPEG", *SIZE)
    assert lenient_answers(tmp_path, "trailer.jpeg", jpeg + b"SEFT" * 50) == (expected, expected, None)
    assert check_file(write(tmp_path, "pair.mpo", mpo), len(mpo)) == expected
    png = samples()["png-rgb"]
    assert lenient_answers(tmp_path, "trailer.png", png + b"\0" * 100)[:2] == (Structure("PNG", *SIZE),) * 2


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF"])
def test_check_file_does_not_judge_other_formats(tmp_path: Path, fmt: str) -> None:
    data = encode(noise(), fmt)
    assert check_file(write(tmp_path, f"image.{fmt.lower()}", data), len(data)) is None
    assert check_file(write(tmp_path, "page.jpg", b"<html></html>"), 13) is None  # the header probe reports it


@cache
def large_jpeg() -> bytes:
    """A noisy JPEG over 1 MiB, so its scan alone is longer than check_file's tail window."""
    data = encode(noise((1200, 1000)), "JPEG", quality=95)
    assert len(data) > 1 << 20
    return data


def test_eoi_before_a_long_trailer_is_found_by_reading_the_whole_file(tmp_path: Path) -> None:
    """The tail window sees only trailer: check_file must fall back to a full read, not call the file truncated."""
    trailer = bytes(range(0x10, 0xF0)) * (5 << 12)  # 1.1 MiB without a single 0xFF byte
    assert len(trailer) > 1 << 20
    whole, cut = large_jpeg() + trailer, large_jpeg()[:-3000] + trailer
    expected = Structure("JPEG", 1200, 1000)
    assert lenient_answers(tmp_path, "whole.jpeg", whole) == (expected, expected, None)
    assert lenient_answers(tmp_path, "cut.jpeg", cut) == (JPEG_NO_EOI,) * 3


def bytes_read_by_this_process() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's per-process I/O counters")
def test_check_file_reads_a_bounded_part_of_large_files(tmp_path: Path) -> None:
    """A 4 MiB JPEG (its scan filling the file) and a 9 MiB PNG cost about a MiB and a few kB of reads."""
    jpeg = write(tmp_path, "big.jpeg", encode(noise((2000, 1600)), "JPEG", quality=95))
    png = write(tmp_path, "big.png", encode(noise((2000, 1600)), "PNG", compress_level=1))
    for path, budget in ((jpeg, (1 << 20) + (1 << 16) + 4096), (png, (1 << 16) + 8 * 1024)):
        size = path.stat().st_size
        assert size > 3 * budget
        before = bytes_read_by_this_process()
        assert check_file(path, size) is not None
        assert bytes_read_by_this_process() - before <= budget, path.name
