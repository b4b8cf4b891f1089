"""Metadata carry-over: EXIF/ICC spliced into PNG, JPEG and WebP outputs without touching their pixels."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin, TiffImagePlugin, WebPImagePlugin
from PIL.ExifTags import IFD

from batch_upscaler.metadata import (
    SourceMetadata,
    exif_orientation,
    inject,
    inject_with_report,
    orientation_exif,
    prepare_exif,
    read_metadata,
)

MAKE, MODEL, DATETIME_ORIGINAL, USER_COMMENT = 0x010F, 0x0110, 0x9003, 0x9286
TAKEN = "2021:06:05 14:03:59"
LATITUDE = (52.0, 31.0, 12.5)


def _profile() -> bytes:
    try:
        from PIL import ImageCms
    except ImportError:  # Pillow built without LittleCMS: a hand-made header is enough for byte-level tests
        body = bytes(16) + b"RGB XYZ " + bytes(12) + b"acsp" + bytes(88)
        return struct.pack(">I", len(body) + 4) + body
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


PROFILE = _profile()


def _source_exif(**exif_ifd_extra: bytes) -> Image.Exif:
    exif = Image.Exif()
    exif[MAKE], exif[MODEL], exif[0x0112] = "Canon", "EOS R5", 6
    exif.get_ifd(IFD.Exif)[DATETIME_ORIGINAL] = TAKEN
    for value in exif_ifd_extra.values():
        exif.get_ifd(IFD.Exif)[USER_COMMENT] = value
    gps = exif.get_ifd(IFD.GPSInfo)
    gps[1], gps[2] = "N", LATITUDE
    return exif


def _encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **params)
    return out.getvalue()


def _picture(mode: str = "RGB", size: tuple[int, int] = (37, 29)) -> Image.Image:
    """Odd-sized, textured and deterministic, so canvas fields and pixel comparisons mean something."""
    noise = Image.frombytes("L", size, random.Random(1).randbytes(size[0] * size[1]))
    bands = [noise, noise.rotate(90), noise.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    im = Image.merge("RGB", bands)
    if mode == "RGBA":
        im.putalpha(noise.point(lambda v: 255 - v))
    return im.convert(mode) if mode not in ("RGB", "RGBA") else im


@pytest.fixture(scope="module")
def source_jpeg() -> bytes:
    return _encode(_picture(), "JPEG", exif=_source_exif().tobytes(), icc_profile=PROFILE)


def _strip_app0(jpeg: bytes) -> bytes:
    assert jpeg[2:4] == b"\xff\xe0"
    return jpeg[:2] + jpeg[4 + struct.unpack(">H", jpeg[4:6])[0]:]


OUTPUTS: dict[str, Callable[[], bytes]] = {
    "png": lambda: _encode(_picture(), "PNG"),
    "png-palette": lambda: _encode(_picture().quantize(64), "PNG"),
    "png-rgba": lambda: _encode(_picture("RGBA"), "PNG"),
    "jpeg-jfif": lambda: _encode(_picture(), "JPEG", quality=90),
    "jpeg-no-jfif": lambda: _strip_app0(_encode(_picture(), "JPEG", quality=90)),
    "jpeg-progressive": lambda: _encode(_picture(), "JPEG", progressive=True),
    "webp-lossy": lambda: _encode(_picture(), "WEBP", quality=80),
    "webp-lossless": lambda: _encode(_picture(), "WEBP", lossless=True),
    "webp-lossy-alpha": lambda: _encode(_picture("RGBA"), "WEBP", quality=80),
    "webp-lossless-alpha": lambda: _encode(_picture("RGBA"), "WEBP", lossless=True),
}


def _decoded(data: bytes) -> tuple[str, tuple[int, int], bytes]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.mode, im.size, im.tobytes()


# ------------------------------------------------------------------ independent container walkers (test oracles)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes, bool]]:
    """(type, payload, crc_ok) for every chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        ctype, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        chunks.append((ctype, payload, crc == zlib.crc32(ctype + payload)))
        pos += 12 + length
    return chunks


def _jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of every segment before the first scan."""
    segments, pos = [], 2
    while data[pos + 1] != 0xDA:
        (length,) = struct.unpack_from(">H", data, pos + 2)
        segments.append((data[pos + 1], data[pos + 4:pos + 2 + length]))
        pos += 2 + length
    return segments


def _webp_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert struct.unpack_from("<I", data, 4)[0] + 8 == len(data), "RIFF size must cover the whole file"
    chunks, pos = [], 12
    while pos < len(data):
        (size,) = struct.unpack_from("<I", data, pos + 4)
        chunks.append((data[pos:pos + 4], data[pos + 8:pos + 8 + size]))
        pos += 8 + size + (size & 1)
    assert pos == len(data)
    return chunks


# ------------------------------------------------------------------ injection round trips


@pytest.mark.parametrize("strip_gps", [False, True], ids=["keep-gps", "strip-gps"])
@pytest.mark.parametrize("kind", list(OUTPUTS))
def test_inject_round_trip(kind: str, strip_gps: bool, source_jpeg: bytes) -> None:
    meta = read_metadata(source_jpeg)
    assert meta.exif is not None
    meta = replace(meta, exif=prepare_exif(meta.exif, strip_gps=strip_gps))
    output = OUTPUTS[kind]()

    result = inject_with_report(output, meta)

    assert result.skipped == ()
    assert _decoded(result.data) == _decoded(output), "pixels must be untouched"
    with Image.open(io.BytesIO(result.data)) as im:
        im.load()
        assert im.info["icc_profile"] == PROFILE
        exif = im.getexif()
        assert exif[MAKE] == "Canon"
        assert exif[MODEL] == "EOS R5"
        assert exif[0x0112] == 1
        assert exif.get_ifd(IFD.Exif)[DATETIME_ORIGINAL] == TAKEN
        if strip_gps:
            assert IFD.GPSInfo not in exif
        else:
            assert exif.get_ifd(IFD.GPSInfo)[2] == LATITUDE


def _inject_png(output: bytes) -> bytes:
    return inject(output, SourceMetadata(exif=prepare_exif(_source_exif().tobytes(), strip_gps=False),
                                         icc_profile=PROFILE))


def _with_png_chunks(png: bytes, *chunks: tuple[bytes, bytes]) -> bytes:
    """``png`` with extra chunks right after IHDR (IHDR is always 25 bytes from offset 8)."""
    extra = b"".join(struct.pack(">I", len(p)) + t + p + struct.pack(">I", zlib.crc32(t + p)) for t, p in chunks)
    return png[:33] + extra + png[33:]


def test_png_chunks_are_well_formed_and_ordered() -> None:
    output = _with_png_chunks(OUTPUTS["png-palette"](), (b"sRGB", b"\x00"), (b"gAMA", struct.pack(">I", 45455)))
    result = _inject_png(output)

    chunks = _png_chunks(result)
    assert all(crc_ok for _, _, crc_ok in chunks)
    types = [ctype for ctype, _, _ in chunks]
    assert types[:3] == [b"IHDR", b"iCCP", b"eXIf"]
    assert b"sRGB" not in types and b"gAMA" not in types, "sRGB/gAMA conflict with the injected iCCP"
    assert types.index(b"PLTE") > types.index(b"iCCP")
    assert types.count(b"iCCP") == types.count(b"eXIf") == 1
    name, _, rest = chunks[1][1].partition(b"\x00")
    assert name == b"ICC Profile" and rest[0] == 0 and zlib.decompress(rest[1:]) == PROFILE
    with Image.open(io.BytesIO(result)) as im:
        im.verify()  # Pillow re-checks every chunk CRC


@pytest.mark.parametrize("kind", ["png", "jpeg-jfif", "webp-lossy"])
def test_injection_returns_views_of_the_output_not_a_copy(kind: str) -> None:
    """The pixel data is written from the returned image's own buffer: no second ~10 MB copy."""
    # Noise does not compress, so this PNG has many IDAT chunks (Pillow writes one per 64 kB).
    noise = Image.frombytes("RGB", (300, 300), random.Random(5).randbytes(300 * 300 * 3))
    output = _encode(noise, {"png": "PNG", "jpeg-jfif": "JPEG", "webp-lossy": "WEBP"}[kind])
    meta = SourceMetadata(exif=prepare_exif(_source_exif().tobytes(), strip_gps=False), icc_profile=PROFILE)

    result = inject_with_report(output, meta)

    assert result.data == b"".join(result.parts) and len(result.data) > len(output)
    assert len(result.parts) <= 8, "neighbouring chunks are written as one part"
    largest = max(result.parts, key=len)
    assert isinstance(largest, memoryview) and largest.obj is output and len(largest) > len(output) // 2
    with Image.open(io.BytesIO(result.data)) as im:
        assert im.getexif()[MAKE] == "Canon" and im.info["icc_profile"] == PROFILE


def test_reinjection_replaces_instead_of_duplicating(source_jpeg: bytes) -> None:
    first = read_metadata(source_jpeg)
    second = SourceMetadata(exif=prepare_exif(_source_exif().tobytes(), strip_gps=True), icc_profile=PROFILE)
    png = inject(inject(OUTPUTS["png"](), first), second)
    assert [c for c, _, _ in _png_chunks(png)].count(b"eXIf") == 1
    jpeg = inject(inject(OUTPUTS["jpeg-jfif"](), first), second)
    markers = [(m, p[:12]) for m, p in _jpeg_segments(jpeg)]
    assert sum(1 for m, p in markers if m == 0xE1 and p.startswith(b"Exif\0\0")) == 1
    assert sum(1 for m, p in markers if m == 0xE2 and p.startswith(b"ICC_PROFILE\0")) == 1
    webp = inject(inject(OUTPUTS["webp-lossy"](), first), second)
    fourccs = [c for c, _ in _webp_chunks(webp)]
    assert fourccs == [b"VP8X", b"ICCP", b"VP8 ", b"EXIF"]
    for data in (png, jpeg, webp):
        with Image.open(io.BytesIO(data)) as im:
            assert IFD.GPSInfo not in im.getexif(), "the second injection's (GPS-free) EXIF wins"


def test_jpeg_segment_order_keeps_jfif_first() -> None:
    exif = prepare_exif(_source_exif().tobytes(), strip_gps=True)
    result = inject(OUTPUTS["jpeg-jfif"](), SourceMetadata(exif=exif, icc_profile=PROFILE))
    segments = _jpeg_segments(result)
    assert segments[0][0] == 0xE0 and segments[0][1].startswith(b"JFIF\0")
    assert segments[1][0] == 0xE1 and segments[1][1].startswith(b"Exif\0\0")
    assert segments[2][0] == 0xE2 and segments[2][1][:14] == b"ICC_PROFILE\0\x01\x01"
    no_jfif = _jpeg_segments(inject(OUTPUTS["jpeg-no-jfif"](), SourceMetadata(None, PROFILE)))
    assert no_jfif[0][0] == 0xE2, "without JFIF the metadata goes right after SOI"


def test_jpeg_large_icc_profile_is_split_per_icc_spec() -> None:
    big = bytearray(PROFILE + bytes(150_000 - len(PROFILE)))
    struct.pack_into(">I", big, 0, len(big))  # keep the header's declared size honest
    output = OUTPUTS["jpeg-jfif"]()

    result = inject(output, SourceMetadata(exif=None, icc_profile=bytes(big)))

    app2 = [payload for marker, payload in _jpeg_segments(result) if marker == 0xE2]
    assert len(app2) == 3
    assert [(p[12], p[13]) for p in app2] == [(1, 3), (2, 3), (3, 3)]
    assert all(len(p) - 14 <= 65519 for p in app2)
    assert _decoded(result) == _decoded(output)
    with Image.open(io.BytesIO(result)) as im:
        assert im.info["icc_profile"] == bytes(big)


def _padded_exif(size: int) -> bytes:
    """A valid EXIF of exactly ``size`` bytes (TIFF readers ignore bytes nothing points at)."""
    base = prepare_exif(_source_exif().tobytes(), strip_gps=False)
    return base + bytes(size - len(base))


def test_jpeg_exif_at_the_app1_limit_fits_and_one_byte_more_is_skipped() -> None:
    output = OUTPUTS["jpeg-jfif"]()
    fits = inject_with_report(output, SourceMetadata(exif=_padded_exif(65527), icc_profile=PROFILE))
    assert fits.skipped == ()
    with Image.open(io.BytesIO(fits.data)) as im:
        assert im.getexif()[MAKE] == "Canon"

    too_big = inject_with_report(output, SourceMetadata(exif=_padded_exif(65528), icc_profile=PROFILE))
    assert len(too_big.skipped) == 1 and too_big.skipped[0].startswith("exif:")
    assert _decoded(too_big.data) == _decoded(output), "file stays valid"
    with Image.open(io.BytesIO(too_big.data)) as im:
        assert "exif" not in im.info
        assert im.info["icc_profile"] == PROFILE, "the ICC profile is still carried over"


def test_exif_over_64k_from_a_real_source_is_skipped_for_jpeg_but_kept_for_png() -> None:
    exif = prepare_exif(_source_exif(comment=b"ASCII\0\0\0" + b"x" * 70_000).tobytes(), strip_gps=False)
    assert len(exif) > 65535
    meta = SourceMetadata(exif=exif, icc_profile=None)
    jpeg = OUTPUTS["jpeg-no-jfif"]()
    result = inject_with_report(jpeg, meta)
    assert result.data == jpeg and result.skipped[0].startswith("exif:")
    with Image.open(io.BytesIO(inject(OUTPUTS["png"](), meta))) as im:
        assert im.getexif().get_ifd(IFD.Exif)[DATETIME_ORIGINAL] == TAKEN


def test_webp_layout_flags_and_canvas() -> None:
    meta = SourceMetadata(exif=prepare_exif(_source_exif().tobytes(), strip_gps=False), icc_profile=PROFILE)
    expected = {
        "webp-lossy": ([b"VP8X", b"ICCP", b"VP8 ", b"EXIF"], 0x28),
        "webp-lossless": ([b"VP8X", b"ICCP", b"VP8L", b"EXIF"], 0x28),
        "webp-lossy-alpha": ([b"VP8X", b"ICCP", b"ALPH", b"VP8 ", b"EXIF"], 0x38),
        "webp-lossless-alpha": ([b"VP8X", b"ICCP", b"VP8L", b"EXIF"], 0x38),
    }
    for kind, (fourccs, flags) in expected.items():
        chunks = _webp_chunks(inject(OUTPUTS[kind](), meta))
        assert [c for c, _ in chunks] == fourccs, kind
        vp8x = chunks[0][1]
        assert vp8x[0] == flags, kind
        assert vp8x[4:10] == struct.pack("<I", 36)[:3] + struct.pack("<I", 28)[:3], "canvas is 37x29 minus one"
        assert chunks[-1][1] == meta.exif


def test_webp_keeps_xmp_after_exif_and_handles_animation() -> None:
    meta = SourceMetadata(exif=prepare_exif(_source_exif().tobytes(), strip_gps=False), icc_profile=PROFILE)
    with_xmp = _encode(_picture(), "WEBP", xmp=b"<x:xmpmeta/>")
    chunks = _webp_chunks(inject(with_xmp, meta))
    assert [c for c, _ in chunks] == [b"VP8X", b"ICCP", b"VP8 ", b"EXIF", b"XMP "]
    assert chunks[0][1][0] == 0x2C, "ICC + EXIF + the existing XMP flag"

    frames = [_picture(), _picture().rotate(90)]
    animated = _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    result = inject(animated, meta)
    fourccs = [c for c, _ in _webp_chunks(result)]
    assert fourccs[:2] == [b"VP8X", b"ICCP"] and fourccs[-1] == b"EXIF" and fourccs.count(b"ANMF") == 2
    with Image.open(io.BytesIO(result)) as im:
        assert getattr(im, "n_frames", 1) == 2 and im.getexif()[MAKE] == "Canon"


# ------------------------------------------------------------------ what is left alone


@pytest.mark.parametrize("kind", list(OUTPUTS))
def test_no_metadata_leaves_output_unchanged(kind: str) -> None:
    output = OUTPUTS[kind]()
    assert inject(output, SourceMetadata(exif=None, icc_profile=None)) == output


def test_unknown_and_malformed_outputs_are_returned_unchanged() -> None:
    meta = SourceMetadata(exif=prepare_exif(_source_exif().tobytes(), strip_gps=True), icc_profile=PROFILE)
    gif = _encode(_picture().convert("P"), "GIF")
    assert inject_with_report(gif, meta).data == gif
    assert inject_with_report(gif, meta).skipped
    for kind, cut in (("png", 0.5), ("jpeg-jfif", 0.02), ("webp-lossy", 0.5)):
        truncated = OUTPUTS[kind]()
        truncated = truncated[:int(len(truncated) * cut)]
        result = inject_with_report(truncated, meta)
        assert result.data == truncated, kind
        assert "malformed" in result.skipped[0], kind


def test_icc_profile_for_the_wrong_colour_space_is_skipped() -> None:
    meta = SourceMetadata(exif=prepare_exif(_source_exif().tobytes(), strip_gps=False), icc_profile=PROFILE)
    for fmt in ("PNG", "JPEG"):
        grey = _encode(_picture("L"), fmt)
        result = inject_with_report(grey, meta)
        assert len(result.skipped) == 1 and result.skipped[0].startswith("icc:"), fmt
        with Image.open(io.BytesIO(result.data)) as im:
            assert "icc_profile" not in im.info
            assert im.getexif()[MAKE] == "Canon", "EXIF still goes in"
    not_icc = inject_with_report(OUTPUTS["webp-lossy"](), SourceMetadata(exif=None, icc_profile=b"junk" * 40))
    assert not_icc.data == OUTPUTS["webp-lossy"]() and not_icc.skipped


# ------------------------------------------------------------------ reading sources


def _assert_source_metadata(meta: SourceMetadata) -> None:
    assert meta.icc_profile == PROFILE
    assert meta.exif is not None and meta.exif[:4] in (b"II*\0", b"MM\0*"), "raw TIFF, no Exif\\0\\0 prefix"
    exif = Image.Exif()
    exif.load(meta.exif)
    assert exif[MAKE] == "Canon" and exif[0x0112] == 6
    assert exif.get_ifd(IFD.Exif)[DATETIME_ORIGINAL] == TAKEN
    assert exif.get_ifd(IFD.GPSInfo)[2] == LATITUDE


def _late_exif_png() -> bytes:
    """A PNG whose eXIf follows IDAT, which Pillow only sees after decoding the pixels."""
    chunks = _png_chunks(_encode(_picture(), "PNG", icc_profile=PROFILE))
    exif = _source_exif().tobytes()[6:]
    chunks.insert(-1, (b"eXIf", exif, True))
    body = b"".join(struct.pack(">I", len(p)) + t + p + struct.pack(">I", zlib.crc32(t + p)) for t, p, _ in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


SOURCES: dict[str, Callable[[], bytes]] = {
    "jpeg": lambda: _encode(_picture(), "JPEG", exif=_source_exif().tobytes(), icc_profile=PROFILE),
    "png": lambda: _encode(_picture(), "PNG", exif=_source_exif(), icc_profile=PROFILE),
    "png-exif-after-idat": _late_exif_png,
    "webp": lambda: _encode(_picture(), "WEBP", exif=_source_exif(), icc_profile=PROFILE),
    # bytes, not an Exif object: Pillow's TIFF writer silently drops the sub-IFDs of an Exif object
    "tiff": lambda: _encode(_picture(), "TIFF", exif=_source_exif().tobytes(), icc_profile=PROFILE),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_read_metadata_from_bytes_and_path(kind: str, tmp_path: Path) -> None:
    data = SOURCES[kind]()
    _assert_source_metadata(read_metadata(data))
    path = tmp_path / f"source.{kind}"
    path.write_bytes(data)
    _assert_source_metadata(read_metadata(path))
    _assert_source_metadata(read_metadata(str(path)))


def test_read_metadata_keeps_only_descriptive_tags_from_tiff() -> None:
    meta = read_metadata(SOURCES["tiff"]())
    assert meta.exif is not None
    exif = Image.Exif()
    exif.load(meta.exif)
    for structural in (0x0100, 0x0101, 0x0102, 0x0111, 0x0117, 0x8773):  # size, depth, strips, embedded ICC
        assert structural not in exif


def test_read_metadata_never_decodes_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Image.Image) -> None:
        raise AssertionError(f"{type(self).__name__}.load() decoded pixels")

    for cls in (ImageFile.ImageFile, JpegImagePlugin.JpegImageFile, PngImagePlugin.PngImageFile,
                WebPImagePlugin.WebPImageFile, TiffImagePlugin.TiffImageFile):
        monkeypatch.setattr(cls, "load", refuse)
    for make in SOURCES.values():
        _assert_source_metadata(read_metadata(make()))


def test_read_metadata_without_metadata() -> None:
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        assert read_metadata(_encode(_picture(), fmt)) == SourceMetadata(exif=None, icc_profile=None), fmt


# ------------------------------------------------------------------ EXIF editing


def test_prepare_exif_sets_orientation_and_strips_gps() -> None:
    source = _source_exif().tobytes()
    for strip_gps in (False, True):
        prepared = prepare_exif(source, strip_gps=strip_gps)
        assert prepared[:4] in (b"II*\0", b"MM\0*")
        exif = Image.Exif()
        exif.load(prepared)
        assert (exif[0x0112], exif[MAKE], exif[MODEL]) == (1, "Canon", "EOS R5")
        assert exif.get_ifd(IFD.Exif)[DATETIME_ORIGINAL] == TAKEN
        assert (IFD.GPSInfo in exif) is not strip_gps
        assert prepare_exif(prepared, strip_gps=strip_gps) == prepared, "idempotent"


def _camera_exif(order: str) -> bytes:
    """EXIF laid out the way cameras write it, built without Pillow so Pillow's own rewriting can't hide loss."""
    def pack(fmt: str, *values: int) -> bytes:
        return struct.pack(order + fmt * len(values), *values)

    ifds: dict[str, list[tuple[int, int, bytes | str]]] = {
        "ifd0": [(0x010F, 2, b"Canon\0"), (0x0110, 2, b"Canon EOS R5\0"), (0x011A, 5, pack("I", 72, 1)),
                 (0x0128, 3, pack("H", 2)), (0x0132, 2, TAKEN.encode() + b"\0"), (0x0213, 3, pack("H", 2)),
                 (0x8769, 4, "exif"), (0x8825, 4, "gps")],
        "exif": [(0x829A, 5, pack("I", 1, 250)), (0x829D, 5, pack("I", 28, 10)), (0x8827, 3, pack("H", 400)),
                 (0x9000, 7, b"0231"), (DATETIME_ORIGINAL, 2, TAKEN.encode() + b"\0"), (0x9101, 7, b"\1\2\3\0"),
                 (0x9201, 10, pack("i", 8, 1)), (0x9204, 10, pack("i", -1, 3)),
                 (0x927C, 7, b"MAKERNOTE" + bytes(range(60))), (USER_COMMENT, 7, b"ASCII\0\0\0hello"),
                 (0xA002, 4, pack("I", 8192)), (0xA005, 4, "interop"), (0xA300, 7, b"\3")],
        "interop": [(0x0001, 2, b"R98\0"), (0x0002, 7, b"0100")],
        "gps": [(0x0001, 2, b"N\0"), (0x0002, 5, pack("I", 52, 1, 31, 1, 125, 10)), (0x0006, 5, pack("I", 1234, 10))],
        "ifd1": [(0x0103, 3, pack("H", 6)), (0x0201, 4, pack("I", 0)), (0x0202, 4, pack("I", 0))],
    }
    sizes = {2: 1, 3: 2, 4: 4, 5: 8, 7: 1, 10: 8}
    offsets, pos = {}, 8
    for name, entries in ifds.items():
        offsets[name] = pos
        blobs = [v for _, _, v in entries if isinstance(v, bytes) and len(v) > 4]
        pos += 6 + 12 * len(entries) + sum(len(v) + len(v) % 2 for v in blobs)
    out = bytearray((b"II*\0" if order == "<" else b"MM\0*") + pack("I", 8))
    for name, entries in ifds.items():
        table, blob = pack("H", len(entries)), b""
        data_at = offsets[name] + 6 + 12 * len(entries)
        for tag, field_type, value in sorted(entries):
            if isinstance(value, str):
                table += pack("H", tag) + pack("H", 4) + pack("I", 1) + pack("I", offsets[value])
                continue
            field = value.ljust(4, b"\0") if len(value) <= 4 else pack("I", data_at + len(blob))
            blob += value + bytes(len(value) % 2) if len(value) > 4 else b""
            table += pack("H", tag) + pack("H", field_type) + pack("I", len(value) // sizes[field_type]) + field
        out += table + pack("I", offsets["ifd1"] if name == "ifd0" else 0) + blob
    return bytes(out)


def _raw_ifds(tiff: bytes) -> dict[str, dict[int, bytes]]:
    """Every IFD's entries as raw 12-byte records (type, count and value offset included)."""
    order = "<" if tiff[:2] == b"II" else ">"
    found: dict[str, dict[int, bytes]] = {}

    def walk(offset: int, name: str) -> None:
        (count,) = struct.unpack_from(order + "H", tiff, offset)
        entries = {struct.unpack_from(order + "H", tiff, offset + 2 + 12 * i)[0]:
                   tiff[offset + 2 + 12 * i:offset + 14 + 12 * i] for i in range(count)}
        found[name] = entries
        for tag, sub in ((0x8769, "exif"), (0x8825, "gps"), (0xA005, "interop")):
            if tag in entries:
                walk(struct.unpack_from(order + "I", entries[tag], 8)[0], sub)
        (next_ifd,) = struct.unpack_from(order + "I", tiff, offset + 2 + 12 * count)
        if next_ifd and name == "ifd0":
            walk(next_ifd, "ifd1")

    walk(struct.unpack_from(order + "I", tiff, 4)[0], "ifd0")
    return found


@pytest.mark.parametrize("order", ["<", ">"], ids=["intel", "motorola"])
@pytest.mark.parametrize("strip_gps", [False, True], ids=["keep-gps", "strip-gps"])
def test_prepare_exif_is_lossless_for_camera_exif(order: str, strip_gps: bool) -> None:
    source = _camera_exif(order)
    before = _raw_ifds(source)

    prepared = prepare_exif(source, strip_gps=strip_gps)
    after = _raw_ifds(prepared)

    assert prepared[:4] == source[:4], "byte order kept"
    assert "ifd1" not in after, "the stale thumbnail IFD is dropped"
    for name in ("exif", "interop"):
        assert after[name] == before[name], f"{name}: types, counts, values and offsets all unchanged"
    assert {t: e for t, e in after["ifd0"].items() if t != 0x0112} == {
        t: e for t, e in before["ifd0"].items() if t != 0x0112 and not (strip_gps and t == 0x8825)}
    assert after["ifd0"][0x0112] == struct.pack(order + "HHIH2x", 0x0112, 3, 1, 1)
    latitude = struct.pack(order + "6I", 52, 1, 31, 1, 125, 10)
    if strip_gps:
        assert "gps" not in after
        assert latitude not in prepared, "coordinates are scrubbed, not just unlinked"
    else:
        assert after["gps"] == before["gps"]
    exif = Image.Exif()
    exif.load(prepared)
    assert exif.get_ifd(IFD.Exif)[DATETIME_ORIGINAL] == TAKEN


def test_prepare_exif_adds_a_missing_orientation() -> None:
    exif = _source_exif()
    del exif[0x0112]
    prepared = prepare_exif(exif.tobytes(), strip_gps=False)
    loaded = Image.Exif()
    loaded.load(prepared)
    assert loaded[0x0112] == 1 and loaded[MAKE] == "Canon"
    assert loaded.get_ifd(IFD.Exif)[DATETIME_ORIGINAL] == TAKEN
    assert loaded.get_ifd(IFD.GPSInfo)[2] == LATITUDE
    assert prepare_exif(prepared, strip_gps=False) == prepared


def test_prepare_exif_keeps_the_source_orientation_when_asked() -> None:
    source = _source_exif().tobytes()  # Orientation 6
    kept = prepare_exif(source, strip_gps=True, keep_orientation=True)
    exif = Image.Exif()
    exif.load(kept)
    assert (exif[0x0112], exif[MAKE]) == (6, "Canon") and IFD.GPSInfo not in exif
    assert exif.get_ifd(IFD.Exif)[DATETIME_ORIGINAL] == TAKEN
    assert exif_orientation(kept) == 6 and exif_orientation(prepare_exif(source, strip_gps=True)) == 1


@pytest.mark.parametrize("order", ["<", ">"], ids=["intel", "motorola"])
def test_prepare_exif_keeping_orientation_adds_none_and_changes_nothing_else(order: str) -> None:
    source = _camera_exif(order)  # no Orientation tag, as some cameras write it
    before, after = _raw_ifds(source), _raw_ifds(prepare_exif(source, strip_gps=False, keep_orientation=True))
    assert exif_orientation(source) is None
    assert after["ifd0"] == before["ifd0"] and after["exif"] == before["exif"] and after["gps"] == before["gps"]
    assert "ifd1" not in after


@pytest.mark.parametrize("orientation", range(1, 9))
def test_minimal_orientation_exif_holds_only_the_orientation(orientation: int) -> None:
    minimal = orientation_exif(orientation)
    exif = Image.Exif()
    exif.load(minimal)
    assert dict(exif) == {0x0112: orientation}
    assert exif_orientation(minimal) == orientation
    for output in ("png", "jpeg-jfif", "webp-lossy"):
        with Image.open(io.BytesIO(inject(OUTPUTS[output](), SourceMetadata(minimal, None)))) as im:
            assert dict(im.getexif()) == {0x0112: orientation}, output


@pytest.mark.parametrize("garbage", [b"", b"II*\0", b"not exif", b"MM\0*\0\0\0\x08\0\x09"])
def test_exif_orientation_of_unreadable_exif_is_none(garbage: bytes) -> None:
    assert exif_orientation(garbage) is None


@pytest.mark.parametrize("garbage", [
    b"", b"II*\0", b"not exif at all", b"Exif\0\0II*\0\xff\xff\0\0", b"MM\0*\0\0\0\x08\0\x09",
])
def test_prepare_exif_rejects_unreadable_exif(garbage: bytes) -> None:
    with pytest.raises(ValueError):
        prepare_exif(garbage, strip_gps=True)

