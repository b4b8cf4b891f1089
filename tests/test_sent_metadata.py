"""What the service receives carries only the metadata the job allows (output.metadata.gps / send_metadata).

Sources in JPEG, PNG and WebP carry GPS in their EXIF, XMP that repeats the coordinates, IPTC and
comments. The end-to-end cases inspect the images the in-process emulator decoded from the request
bodies: what they still hold, and that their pixels are bit-identical to the source's. The outputs
still get the source's EXIF per output.metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms
from PIL.ExifTags import IFD
from PIL.PngImagePlugin import PngInfo

from batch_upscaler.cli import main
from batch_upscaler.emulator import EmulatorThread, RequestRecord
from batch_upscaler.metadata import without_gps
from batch_upscaler.scrub import Scrub, scrub_metadata

EmulatorFactory = Callable[..., EmulatorThread]
MAKE, DATE_TAKEN, GPS_MAP_DATUM = 0x010F, 0x9003, 0x0012
TAKEN = "2019:08:17 16:20:00"
SECRET = b"SECRET-PLACE"  # an out-of-line GPS value: its bytes must not reach the service
XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:exif="http://ns.adobe.com/exif/1.0/" exif:GPSLatitude="52,31.2N"'
       b' exif:GPSLongitude="13,24.6E"/></rdf:RDF></x:xmpmeta>')
COMMENT = b"taken at grandma's house"
IPTC = b"8BIM\x04\x04\x00\x00" + struct.pack(">I", 11) + b"\x1c\x02\x5a\x00\x06Berlin" + b"\x00"
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
SIZE = (160, 100)
# source extension -> the output_format ``same`` asks for (tells the requests apart)
OUTPUT_FORMAT = {"jpg": "jpeg", "png": "png", "webp": "webp"}


@pytest.fixture(autouse=True)
def aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")


def picture(size: tuple[int, int] = SIZE) -> Image.Image:
    """Textured and deterministic, so a pixel comparison means something."""
    noise = Image.frombytes("L", size, random.Random(7).randbytes(size[0] * size[1]))
    return Image.merge("RGB", [noise, noise.transpose(Image.Transpose.FLIP_LEFT_RIGHT), noise.point(lambda v: v // 2)])


def gps_exif(orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[MAKE], exif[0x0112] = "TestCam", orientation
    exif.get_ifd(IFD.Exif)[DATE_TAKEN] = TAKEN
    gps = exif.get_ifd(IFD.GPSInfo)
    gps[1], gps[2], gps[GPS_MAP_DATUM] = "N", (52.0, 31.0, 12.5), "WGS-84 " + SECRET.decode()
    return exif


def encode(im: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **options)
    return out.getvalue()


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def jpeg_source(im: Image.Image, orientation: int = 1, **options: Any) -> bytes:
    """EXIF with GPS, ICC and a comment from Pillow; XMP and Photoshop/IPTC by hand (not every Pillow writes them)."""
    data = encode(im, "JPEG", quality=92, exif=gps_exif(orientation).tobytes(), comment=COMMENT, **options)
    assert data[2:4] == b"\xff\xe0"
    app0_end = 4 + struct.unpack(">H", data[4:6])[0]
    extra = (jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + XMP)
             + jpeg_segment(0xED, b"Photoshop 3.0\x00" + IPTC))
    return data[:app0_end] + extra + data[app0_end:]


def png_source(im: Image.Image) -> bytes:
    info = PngInfo()
    info.add_text("Comment", COMMENT.decode())
    info.add_text("Description", "family trip", zip=True)
    info.add_itxt("XML:com.adobe.xmp", XMP.decode())
    data = encode(im, "PNG", exif=gps_exif(), icc_profile=ICC, pnginfo=info, dpi=(300, 300))
    colour = png_chunk(b"gAMA", struct.pack(">I", 45455)) + png_chunk(b"cHRM", struct.pack(">8I", *range(8)))
    return data[:33] + colour + data[33:]  # right after the 25-byte IHDR


def webp_source(im: Image.Image) -> bytes:
    return encode(im, "WEBP", lossless=True, exif=gps_exif().tobytes(), icc_profile=ICC, xmp=XMP)


# ------------------------------------------------------------------ independent container walkers (test oracles)


def jpeg_markers(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of the segments before the first scan."""
    found, pos = [], 2
    while data[pos + 1] != 0xDA:
        (length,) = struct.unpack_from(">H", data, pos + 2)
        found.append((data[pos + 1], data[pos + 4:pos + 2 + length]))
        pos += 2 + length
    return found


def png_types(data: bytes) -> list[bytes]:
    types, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        ctype, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack_from(">I", data, pos + 8 + length)[0] == zlib.crc32(ctype + payload), ctype
        types.append(ctype)
        pos += 12 + length
    return types


def webp_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert struct.unpack_from("<I", data, 4)[0] + 8 == len(data), "RIFF size must cover the whole file"
    chunks, pos = [], 12
    while pos < len(data):
        (size,) = struct.unpack_from("<I", data, pos + 4)
        chunks.append((data[pos:pos + 4], data[pos + 8:pos + 8 + size]))
        pos += 8 + size + (size & 1)
    return chunks


def decoded(data: bytes) -> tuple[str, tuple[int, int], bytes]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.mode, im.size, im.tobytes()


def exif_of(data: bytes) -> Image.Exif:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.getexif()


def assert_no_location(data: bytes, what: str) -> None:
    assert IFD.GPSInfo not in exif_of(data), what
    assert SECRET not in data, f"{what}: GPS values are scrubbed, not just unlinked"
    assert b"GPSLatitude" not in data, f"{what}: the XMP copy of the coordinates is gone"


def assert_no_metadata(data: bytes, ext: str) -> None:
    """No EXIF, XMP, IPTC or comment of any kind; the colour description is kept."""
    assert len(exif_of(data)) == 0 and b"xmpmeta" not in data and COMMENT not in data, ext
    if ext == "jpg":
        markers = [m for m, _ in jpeg_markers(data)]
        assert not {0xE1, 0xED, 0xFE} & set(markers), markers
        assert 0xE0 in markers
    elif ext == "png":
        types = png_types(data)
        assert not {b"eXIf", b"tEXt", b"zTXt", b"iTXt"} & set(types), types
        assert {b"iCCP", b"gAMA", b"cHRM", b"pHYs"} <= set(types), types
    else:
        chunks = webp_chunks(data)
        assert [c for c, _ in chunks] == [b"VP8X", b"ICCP", b"VP8L"]
        assert chunks[0][1][0] == 0x20, "VP8X flags: ICC only"
    with Image.open(io.BytesIO(data)) as im:
        assert im.info.get("icc_profile") == ICC, ext


def assert_gps_only_removed(data: bytes, ext: str) -> None:
    """EXIF without its GPS block and no XMP; comments and the rest stay."""
    assert_no_location(data, ext)
    exif = exif_of(data)
    assert exif[MAKE] == "TestCam" and exif.get_ifd(IFD.Exif)[DATE_TAKEN] == TAKEN, ext
    if ext == "jpg":
        markers = jpeg_markers(data)
        assert [m for m, _ in markers].count(0xE1) == 1 and 0xED not in [m for m, _ in markers]
        assert (0xFE, COMMENT) in markers
    elif ext == "png":
        types = png_types(data)
        assert types.count(b"tEXt") == types.count(b"zTXt") == 1 and b"iTXt" not in types, types
        assert {b"eXIf", b"iCCP", b"gAMA", b"cHRM", b"pHYs"} <= set(types), types
    else:
        chunks = webp_chunks(data)
        assert [c for c, _ in chunks] == [b"VP8X", b"ICCP", b"VP8L", b"EXIF"]
        assert chunks[0][1][0] == 0x28, "VP8X flags: ICC and EXIF, no XMP"


def write_sources(photos: Path) -> dict[str, bytes]:
    sources = {"jpg": jpeg_source(picture(), icc_profile=ICC), "png": png_source(picture()),
               "webp": webp_source(picture())}
    photos.mkdir(parents=True, exist_ok=True)
    for ext, data in sources.items():
        (photos / f"p.{ext}").write_bytes(data)
    return sources


def run(tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory,
        metadata: dict[str, bool]) -> tuple[dict[str, RequestRecord], dict[str, dict[str, Any]]]:
    emulator = emulator_factory(output_max_pixels=320 * 200)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              output={"format": "same", "metadata": metadata})
    assert main(["run", str(manifest)]) == 0
    report = json.loads((tmp_path / ".batch-upscaler/reports/job/report.json").read_text())
    by_format = {str((r.params or {})["output_format"]): r for r in emulator.records()}
    assert len(by_format) == len(emulator.records()) == len(OUTPUT_FORMAT)
    received = {ext: by_format[fmt] for ext, fmt in OUTPUT_FORMAT.items()}
    return received, {Path(item["source"]).suffix[1:]: item for item in report["items"]}


@pytest.mark.parametrize("metadata", [
    {"gps": False},
    {"send_metadata": False},
    {"send_metadata": False, "gps": False},
    {},  # the default: valid sources still go byte-for-byte, metadata and all
], ids=["gps-false", "send-metadata-false", "both-false", "defaults"])
def test_sent_image_carries_only_the_allowed_metadata_and_the_same_pixels(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory,
        received_images: dict[str, bytes], metadata: dict[str, bool]) -> None:
    sources = write_sources(tmp_path / "photos")

    received, items = run(tmp_path, write_manifest, emulator_factory, metadata)

    for ext, source in sources.items():
        sent = received_images[received[ext].image_sha256 or ""]
        assert decoded(sent) == decoded(source), f"{ext}: the pixels sent must be the source's, bit for bit"
        if not metadata.get("send_metadata", True):
            assert_no_metadata(sent, ext)
        elif not metadata.get("gps", True):
            assert_gps_only_removed(sent, ext)
        else:
            assert hashlib.sha256(sent).digest() == hashlib.sha256(source).digest(), ext
        assert items[ext]["status"] == "succeeded", items[ext]
        output = Path(items[ext]["output"]).read_bytes()
        exif = exif_of(output)  # the output's EXIF comes from the source, per output.metadata, as before
        assert exif[MAKE] == "TestCam" and exif.get_ifd(IFD.Exif)[DATE_TAKEN] == TAKEN, ext
        if metadata.get("gps", True):
            assert exif.get_ifd(IFD.GPSInfo)[GPS_MAP_DATUM].endswith(SECRET.decode()), ext
        else:
            assert_no_location(output, f"output {ext}")


@pytest.mark.parametrize("metadata", [{"gps": False}, {"send_metadata": False}, {}],
                         ids=["gps-false", "send-metadata-false", "defaults"])
def test_reencoded_images_carry_no_metadata_to_the_service(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory,
        received_images: dict[str, bytes], metadata: dict[str, bool]) -> None:
    """Files that are decoded and re-encoded (rotated, CMYK, with alpha) never pass metadata on."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "p.jpg").write_bytes(jpeg_source(picture((100, 160)), orientation=6))  # rotated before sending
    (photos / "p.png").write_bytes(png_source(picture().convert("RGBA")))  # alpha flattened
    rgba = picture()
    rgba.putalpha(200)
    (photos / "p.webp").write_bytes(webp_source(rgba))

    received, items = run(tmp_path, write_manifest, emulator_factory, metadata)

    for ext, record in received.items():
        sent = received_images[record.image_sha256 or ""]
        assert items[ext]["status"] == "succeeded" and record.input_size == SIZE, ext
        assert len(exif_of(sent)) == 0 and b"xmpmeta" not in sent and COMMENT not in sent, ext
        assert_no_location(sent, ext)


def test_a_cmyk_profile_is_not_sent_with_the_converted_rgb_pixels(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory,
        received_images: dict[str, bytes]) -> None:
    """Both are sent as PNG, which Pillow writes with the ICC profile the decoded source had."""
    cmyk_profile = bytes(16) + b"CMYK" + bytes(16) + b"acsp" + bytes(92)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cmyk.tif").write_bytes(encode(picture().convert("CMYK"), "TIFF", icc_profile=cmyk_profile))
    palette = picture((100, 160)).quantize(64)  # converted to RGB too; its sRGB profile still fits
    (photos / "palette.png").write_bytes(encode(palette, "PNG", icc_profile=ICC))
    emulator = emulator_factory(output_max_pixels=320 * 200)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url})
    assert main(["run", str(manifest)]) == 0

    sent = {r.input_size: received_images[r.image_sha256 or ""] for r in emulator.records()}
    with Image.open(io.BytesIO(sent[SIZE])) as cmyk:
        assert (cmyk.format, cmyk.mode) == ("PNG", "RGB") and "icc_profile" not in cmyk.info
    with Image.open(io.BytesIO(sent[(100, 160)])) as rgb:
        assert (rgb.format, rgb.mode) == ("PNG", "RGB") and rgb.info.get("icc_profile") == ICC


# ------------------------------------------------------------------ the scrubbing itself, on awkward files


def test_jpeg_metadata_between_scans_and_after_the_image_is_removed() -> None:
    """A progressive scan sequence with a comment between scans, followed by a second MPO frame with GPS."""
    frames = encode(picture(), "MPO", save_all=True, append_images=[picture().rotate(180)], progressive=True,
                    exif=gps_exif().tobytes(), comment=COMMENT)
    first_sos = frames.index(b"\xff\xda")
    second_sos = frames.index(b"\xff\xda", first_sos + 2)
    data = frames[:second_sos] + jpeg_segment(0xFE, COMMENT) + frames[second_sos:]
    assert data.count(SECRET) == 2 and data.count(COMMENT) == 3

    for scrub in (Scrub.ALL, Scrub.GPS):
        sent = scrub_metadata(data, scrub)
        assert SECRET not in sent, scrub
        assert (COMMENT in sent) is (scrub is Scrub.GPS), scrub
        with Image.open(io.BytesIO(sent)) as im:
            assert im.format == "JPEG", "the index of the cut-off frames (MPF) goes with them"
        assert decoded(sent) == decoded(frames)


def test_gps_removal_keeps_every_other_offset() -> None:
    """The thumbnail IFD and maker-note offsets stay valid: the EXIF keeps its length and layout."""
    exif = gps_exif()
    exif.get_ifd(IFD.Exif)[0x927C] = b"MAKERNOTE" + bytes(range(40))
    tiff = exif.tobytes()[6:]

    stripped = without_gps(tiff)

    assert len(stripped) == len(tiff) and SECRET not in stripped
    loaded = Image.Exif()
    loaded.load(stripped)
    assert IFD.GPSInfo not in loaded and loaded[MAKE] == "TestCam"
    assert loaded.get_ifd(IFD.Exif)[0x927C] == b"MAKERNOTE" + bytes(range(40))
    assert without_gps(stripped) == stripped


def test_unreadable_exif_is_dropped_when_gps_must_go() -> None:
    broken = jpeg_segment(0xE1, b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x09" + SECRET)
    source = jpeg_source(picture())
    data = source[:2] + broken + source[2:]

    sent = scrub_metadata(data, Scrub.GPS)

    assert SECRET not in sent and decoded(sent) == decoded(source)
    assert exif_of(sent)[MAKE] == "TestCam", "the readable EXIF stays"


@pytest.mark.parametrize("data", [b"", b"GIF89a....", b"\x89PNG\r\n\x1a\n\x00\x00", b"\xff\xd8\xff\xe1\x00"])
def test_scrubbing_what_cannot_be_walked_raises(data: bytes) -> None:
    with pytest.raises(ValueError):
        scrub_metadata(data, Scrub.ALL)


SOURCES = {"jpg": jpeg_source(picture(), icc_profile=ICC), "png": png_source(picture()), "webp": webp_source(picture())}


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(sorted(SOURCES)), scrub=st.sampled_from([Scrub.ALL, Scrub.GPS]),
       cut=st.integers(min_value=0, max_value=4000),
       flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=4))
def test_damaged_files_are_scrubbed_or_refused_never_crash(kind: str, scrub: Scrub, cut: int,
                                                           flips: list[tuple[int, int]]) -> None:
    """A ValueError makes prepare re-encode the file instead; anything else would be a crash (exit 70)."""
    data = bytearray(SOURCES[kind][:len(SOURCES[kind]) - cut])
    for at, value in flips:
        if at < len(data):
            data[at] = value
    with contextlib.suppress(ValueError):
        scrub_metadata(bytes(data), scrub)
