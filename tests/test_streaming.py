"""The streaming reader against whole-body references: same outcome for every body, whatever its pieces.

* jsonscan.ResponseScanner against ``bedrock.parse_response`` (today's parser, on the whole body)
  on every 200 the emulator can send, cut off at every offset and split at random; and against a
  strict reference (parse_response plus jsonscan's documented strictness) on generated bodies.
* streamcheck.StreamCheck against ``imagecheck.check_encoded``: same structure or same message.
* splicestream.StreamSplicer against ``metadata.inject_with_report``: same bytes, same notes.
* streaming.receive and the sinks: nothing is kept of a failed answer.

Pure tests: no network; hypothesis draws the bodies, the damage and the piece boundaries.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import itertools
import json
import json.decoder
import json.scanner
import random
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import pybase64
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from batch_upscaler.bedrock import parse_response
from batch_upscaler.emulator.faults import FaultKind, fault_body
from batch_upscaler.imagecheck import Structure, StructureError, check_encoded
from batch_upscaler.jsonscan import REST_LIMIT, ResponseScanner
from batch_upscaler.metadata import SourceMetadata, inject_with_report, prepare_exif
from batch_upscaler.retry import AttemptError
from batch_upscaler.splicestream import StreamSplicer
from batch_upscaler.streamcheck import StreamCheck
from batch_upscaler.streaming import CheckedSink, ImageRejected, MemorySink, Received, receive
from tests.test_imagecheck import samples as check_samples
from tests.test_metadata import OUTPUTS, PROFILE, _source_exif, _with_png_chunks

Outcome = bytes | str  # the image, or the failure's code


def pieces(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    """``data`` split at ``cuts`` (any offsets, in any order; empty pieces are left out)."""
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        yield data[start:end]


CUTS = st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=12)


# ---------------------------------------------------------------------------------------------- references


def whole(body: bytes) -> Outcome:
    """Today's parser on the whole body."""
    result = parse_response(body)
    return result.code if isinstance(result, AttemptError) else result


class _Text(str):
    """A JSON string that remembers whether its source text held an escape."""

    escaped = False


def _scanstring(text: str, end: int, strict: bool = True) -> tuple[str, int]:
    value, after = json.decoder.scanstring(text, end, strict)  # type: ignore[attr-defined]
    found = _Text(value)
    found.escaped = "\\" in text[end:after]
    return found, after


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError("repeated key")
    return dict(pairs)


_STRICT = json.JSONDecoder(object_pairs_hook=_unique)
_STRICT.parse_string = _scanstring  # type: ignore[attr-defined]
_STRICT.scan_once = json.scanner.py_make_scanner(_STRICT)  # type: ignore[attr-defined]


def strict_reference(body: bytes) -> Outcome:
    """parse_response with jsonscan's documented strictness: UTF-8 only, no repeated key, finish_reasons
    a list (or empty), exactly one image, written as plain base64 (no escape). Independent of
    jsonscan: the standard library's JSON decoder on the whole body, one base64 decode of the whole text."""
    try:
        document = _STRICT.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return "bad_response"
    if not isinstance(document, dict):
        return "bad_response"
    reasons = document.get("finish_reasons")
    if reasons and not isinstance(reasons, list):
        return "bad_response"
    if reasons and reasons[0] is not None:
        return "content_filtered"
    images = document.get("images")
    if (not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str)
            or getattr(images[0], "escaped", False)):
        return "bad_response"
    try:  # pybase64 as parse_response (the standard library's decoder accepts excess padding: "AAAA=")
        return pybase64.b64decode(images[0], validate=True)
    except (binascii.Error, ValueError):
        return "bad_response"


def scanned(body: bytes, cuts: list[int]) -> Outcome:
    scanner = ResponseScanner()
    decoded: list[bytes] = []
    for piece in pieces(body, cuts):
        decoded += scanner.feed(piece)
        if scanner.verdict is not None:
            break
    problem = scanner.finish()
    return problem.code if problem is not None else b"".join(decoded)


# ---------------------------------------------------------------------------------------------- emulator bodies

IMAGE = check_samples()["png-rgb"]
IMAGE_B64 = base64.b64encode(IMAGE).decode()
ANSWERS_200 = (FaultKind.NONE, FaultKind.CONTENT_FILTERED, FaultKind.TRUNCATED, FaultKind.NON_JSON,
               FaultKind.BAD_BASE64, FaultKind.CORRUPT_IMAGE)


def emulator_body(kind: FaultKind, image_b64: str = IMAGE_B64) -> bytes:
    return fault_body(kind, 1234, image_b64)[0]


@pytest.mark.parametrize("kind", ANSWERS_200, ids=str)
def test_every_emulator_answer_gives_what_the_whole_body_parser_gives(kind: FaultKind) -> None:
    body = emulator_body(kind)
    expected = whole(body)
    assert scanned(body, []) == expected == strict_reference(body)
    rng = random.Random(kind.value)
    for _ in range(20):
        assert scanned(body, [rng.randrange(len(body)) for _ in range(rng.randrange(1, 30))]) == expected
    assert scanned(body, list(range(len(body)))) == expected  # one byte at a time


@pytest.mark.parametrize("kind", [FaultKind.NONE, FaultKind.CONTENT_FILTERED], ids=str)
def test_a_body_cut_off_at_any_offset_is_a_bad_response(kind: FaultKind) -> None:
    """What a disconnect mid-body or a truncating proxy leaves: every proper prefix is refused."""
    body = emulator_body(kind, base64.b64encode(IMAGE[:700]).decode())
    for end in range(len(body)):
        assert scanned(body[:end], [end // 3, end // 2]) == whole(body[:end]) == "bad_response", end


def test_the_key_order_and_spacing_do_not_matter() -> None:
    for order in (["seeds", "finish_reasons", "images"], ["images", "seeds", "finish_reasons"],
                  ["finish_reasons", "images", "seeds"]):
        values = {"seeds": [7], "finish_reasons": [None], "images": [IMAGE_B64]}
        for separators in ((",", ":"), (", ", ": "), (" ,\n", " :\t ")):
            body = json.dumps({k: values[k] for k in order}, separators=separators).encode()
            assert scanned(body, [5, 17, 40]) == IMAGE == whole(body)
        filtered = json.dumps({k: (["Filter reason: prompt"] if k == "finish_reasons" else values[k]) for k in order})
        assert scanned(filtered.encode(), [9]) == "content_filtered" == whole(filtered.encode())


@pytest.mark.parametrize(("body", "why"), [
    ('{"images": ["' + IMAGE_B64.replace("/", "\\/") + '"]}', "an escaped slash is not plain base64"),
    (json.dumps({"images": [IMAGE_B64, IMAGE_B64]}), "a second image"),
    ('{"images": ["QUJD"], "images": ["' + IMAGE_B64 + '"]}', "a repeated key"),
    ('\ufeff{"images": ["' + IMAGE_B64 + '"]}', "a byte-order mark"),
    (json.dumps({"finish_reasons": "abc", "images": [IMAGE_B64]}), "finish_reasons not a list"),
])
def test_stricter_than_json_where_documented(body: str, why: str) -> None:
    assert scanned(body.encode("utf-8"), [3, 30]) == "bad_response" == strict_reference(body.encode()), why


def test_decoys_and_escaped_keys() -> None:
    decoy = {"note": '"images": ["QUJD"]', "seeds": [{"images": ["QUJD"]}], "images": [IMAGE_B64]}
    assert scanned(json.dumps(decoy).encode(), [11, 12, 13]) == IMAGE
    escaped_key = '{"imag\\u0065s": ["' + IMAGE_B64 + '"], "finish_reasons": [null]}'
    assert scanned(escaped_key.encode(), [7, 8]) == IMAGE == whole(escaped_key.encode())


def test_a_body_with_too_much_besides_the_image_stops_being_read() -> None:
    scanner = ResponseScanner()
    chunk = b"[" + b" " * 65536
    fed = 0
    while scanner.verdict is None:
        scanner.feed(chunk)
        fed += len(chunk)
    assert scanner.verdict.code == "bad_response" and REST_LIMIT < fed <= REST_LIMIT + 2 * len(chunk)


# ---------------------------------------------------------------------------------------------- generated bodies

_SPACE = st.sampled_from(["", " ", "\n", "\t", "  \r\n"])
_B64_TEXT = st.binary(max_size=200).map(lambda data: base64.b64encode(data).decode())


@st.composite
def image_texts(draw: st.DrawFn) -> str:
    text = draw(_B64_TEXT)
    damage = draw(st.sampled_from(["none", "none", "escape", "bad-char", "cut", "space", "mid-padding", "unicode"]))
    at = draw(st.integers(min_value=0, max_value=len(text)))
    if damage == "escape":
        return json.dumps(text[:at] + "/" + text[at:]).replace("/", "\\/")[1:-1]
    if damage == "bad-char":
        return text[:at] + draw(st.sampled_from(["!", "-", "_", "é", "=", "\\u0041", "\\n"])) + text[at:]
    if damage == "cut":
        return text[:at]
    if damage == "space":
        return text[:at] + " " + text[at:]
    if damage == "mid-padding":
        return "QQ==" + text
    if damage == "unicode":
        return text[:at] + "\\u00e9" + text[at:]
    return text


_SCALARS = st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.sampled_from(
    ['"images"', "images", "a\\b", "\u2603"])
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    members: list[tuple[str, str]] = []  # (key's JSON text, value's JSON text)
    image = '"' + draw(image_texts()) + '"'
    images = draw(st.sampled_from(["[I]", "[I]", "[I]", "[I]", "[I]", "[I, I]", "[]", "I", "[5, I]", "null", "[I, 5]"]))
    if draw(st.booleans()) or images:
        members.append(('"images"', images.replace("I", image)))
    reasons = draw(st.sampled_from([None, "[null]", '["Filter reason: output image"]', "null", "[]", '"abc"',
                                    "[null, \"x\"]", "{}", "0", '{"a": 1}']))
    if reasons is not None:
        members.append(('"finish_reasons"', reasons))
    for key, value in draw(st.dictionaries(st.sampled_from(["seeds", "x", "imagesx", "imag\\u0065s", "images"]),
                                           _VALUES, max_size=3)).items():
        members.append((f'"{key}"', json.dumps(value)))
    members = draw(st.permutations(members))
    text = "{" + ",".join(draw(_SPACE) + k + draw(_SPACE) + ":" + draw(_SPACE) + v + draw(_SPACE)
                          for k, v in members) + "}"
    return (draw(_SPACE) + text + draw(_SPACE)).encode("utf-8")


def damaged(body: bytes, data: st.DataObject) -> bytes:
    kind = data.draw(st.sampled_from(["none", "none", "cut", "flip", "insert", "garbage"]), label="damage")
    at = data.draw(st.integers(min_value=0, max_value=len(body)), label="at")
    if kind == "cut":
        return body[:at]
    if kind == "flip" and at < len(body):
        return body[:at] + bytes([body[at] ^ data.draw(st.integers(1, 255), label="xor")]) + body[at + 1:]
    if kind == "insert":
        return body[:at] + data.draw(st.binary(min_size=1, max_size=3), label="inserted") + body[at:]
    if kind == "garbage":
        return data.draw(st.binary(max_size=300), label="garbage")
    return body


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies(), data=st.data(), cuts=CUTS)
def test_generated_bodies_match_the_strict_reference(body: bytes, data: st.DataObject, cuts: list[int]) -> None:
    body = damaged(body, data)
    assert scanned(body, cuts) == strict_reference(body)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(ANSWERS_200), data=st.data(), cuts=CUTS)
def test_damaged_emulator_answers_match_the_whole_body_parser(kind: FaultKind, data: st.DataObject,
                                                             cuts: list[int]) -> None:
    """Cut, flipped, grown or replaced: the answers parse_response and the scanner give agree, unless
    the damage made one of the documented stricter cases (then the strict reference decides)."""
    body = damaged(emulator_body(kind, base64.b64encode(IMAGE[:400]).decode()), data)
    expected = strict_reference(body)
    assert scanned(body, cuts) == expected
    if b"\\" not in body and not body.startswith(b"\xef\xbb\xbf"):
        assert whole(body) == expected or (isinstance(whole(body), bytes) and expected == "bad_response")


# ---------------------------------------------------------------------------------------------- the image check


def checked(data: bytes, cuts: list[int]) -> Structure | str:
    check = StreamCheck()
    try:
        for piece in pieces(data, cuts):
            check.feed(piece)
        return check.finish()
    except StructureError as exc:
        return str(exc)


def checked_whole(data: bytes) -> Structure | str:
    try:
        return check_encoded(data)
    except StructureError as exc:
        return str(exc)


def _big_samples() -> dict[str, bytes]:
    """Larger images: many IDAT chunks, long entropy-coded data full of 0xFF."""
    noise = Image.frombytes("RGB", (300, 200), random.Random(3).randbytes(300 * 200 * 3))
    out: dict[str, bytes] = {}
    for name, fmt, options in (("png", "PNG", {}), ("jpeg", "JPEG", {"quality": 95}),
                               ("jpeg-progressive", "JPEG", {"progressive": True}),
                               ("jpeg-restart", "JPEG", {"restart_marker_blocks": 3}), ("webp", "WEBP", {})):
        buffer = io.BytesIO()
        noise.save(buffer, fmt, **options)
        out[f"big-{name}"] = buffer.getvalue()
    return out


CHECK_SAMPLES = {**check_samples(), **_big_samples()}


@pytest.mark.parametrize("name", list(CHECK_SAMPLES))
def test_stream_check_accepts_every_sample_in_any_pieces(name: str) -> None:
    data = CHECK_SAMPLES[name]
    expected = check_encoded(data)
    rng = random.Random(name)
    for _ in range(10):
        assert checked(data, [rng.randrange(len(data)) for _ in range(rng.randrange(1, 40))]) == expected
    assert checked(data, list(range(0, len(data), 1 if len(data) < 50_000 else 7))) == expected


@settings(max_examples=1500, deadline=None)
@given(name=st.sampled_from(list(CHECK_SAMPLES)), data=st.data(), cuts=CUTS)
def test_stream_check_gives_check_encoded_s_verdict_on_damaged_images(name: str, data: st.DataObject,
                                                                      cuts: list[int]) -> None:
    image = CHECK_SAMPLES[name]
    kind = data.draw(st.sampled_from(["cut", "flip", "append", "insert", "delete"]), label="damage")
    at = data.draw(st.integers(min_value=0, max_value=len(image) - 1), label="at")
    if kind == "cut":
        image = image[:at]
    elif kind == "flip":
        image = image[:at] + bytes([image[at] ^ data.draw(st.integers(1, 255), label="xor")]) + image[at + 1:]
    elif kind == "append":
        image += data.draw(st.binary(min_size=1, max_size=40) | st.just(b"\0" * 16) | st.just(b"\0" * 17))
    elif kind == "insert":
        image = image[:at] + data.draw(st.sampled_from([b"\xff", b"\xff\xd9", b"\xff\xd8", b"\0", b"\xff\xff\xd9"]))
        image += CHECK_SAMPLES[name][at:]
    else:
        image = image[:at] + image[at + data.draw(st.integers(1, 8), label="length"):]
    assert checked(image, cuts) == checked_whole(image)


@pytest.mark.parametrize("data", [b"", b"\x89PNG", b"\x89PNG\r\n\x1a\n", b"<html>garbage</html>", b"RIFF\0\0\0\0WEB"])
def test_stream_check_on_almost_nothing(data: bytes) -> None:
    assert checked(data, [1, 2, 3]) == checked_whole(data)


# ---------------------------------------------------------------------------------------------- the splice

META_EXIF = prepare_exif(_source_exif().tobytes(), strip_gps=False)
_CMYK_PROFILE = PROFILE[:16] + b"CMYK" + PROFILE[20:]
METAS = {
    "none": SourceMetadata(None, None),
    "exif": SourceMetadata(META_EXIF, None),
    "icc": SourceMetadata(None, PROFILE),
    "both": SourceMetadata(META_EXIF, PROFILE),
    "cmyk-icc": SourceMetadata(META_EXIF, _CMYK_PROFILE),
    "not-tiff": SourceMetadata(b"not tiff at all", PROFILE),
    "huge-exif": SourceMetadata(META_EXIF + bytes(70_000), None),
}


def _splice_outputs() -> dict[str, bytes]:
    out = {name: make() for name, make in OUTPUTS.items()}
    out["png-with-colour-chunks"] = _with_png_chunks(out["png"], (b"sRGB", b"\x00"), (b"eXIf", META_EXIF))
    out["png-exif-after-idat"] = out["png"][:-12] + struct.pack(">I", 4) + b"eXIf" + b"II*\0" + struct.pack(
        ">I", zlib.crc32(b"eXIfII*\0")) + out["png"][-12:]
    out["jpeg-with-exif-and-icc"] = inject_with_report(out["jpeg-jfif"], METAS["both"]).data
    for name, data in _big_samples().items():
        out[name] = data
    return {name: data for name, data in out.items() if not isinstance(checked_whole(data), str)}


SPLICE_OUTPUTS = _splice_outputs()


def spliced(image: bytes, meta: SourceMetadata, cuts: list[int]) -> tuple[bytes, tuple[str, ...]]:
    splicer = StreamSplicer(meta)
    parts: list[bytes | memoryview] = []
    for piece in pieces(image, cuts):
        parts += splicer.feed(piece)
    parts += splicer.finish()
    return b"".join(parts), splicer.skipped


@settings(max_examples=600, deadline=None)
@given(name=st.sampled_from(sorted(SPLICE_OUTPUTS)), meta=st.sampled_from(sorted(METAS)), cuts=CUTS)
def test_the_streamed_splice_gives_inject_with_report_s_bytes(name: str, meta: str, cuts: list[int]) -> None:
    image = SPLICE_OUTPUTS[name]
    expected = inject_with_report(image, METAS[meta])
    assert spliced(image, METAS[meta], cuts) == (expected.data, expected.skipped)


@pytest.mark.parametrize("name", sorted(SPLICE_OUTPUTS))
def test_the_streamed_splice_in_one_byte_pieces(name: str) -> None:
    image = SPLICE_OUTPUTS[name]
    if len(image) > 20_000:
        pytest.skip("one-byte pieces of a large image: covered by the random splits")
    expected = inject_with_report(image, METAS["both"])
    assert spliced(image, METAS["both"], list(range(len(image)))) == (expected.data, expected.skipped)


def test_a_jpeg_head_longer_than_the_limit_is_spliced_whole() -> None:
    big_icc = bytearray(PROFILE + bytes(1_200_000 - len(PROFILE)))
    struct.pack_into(">I", big_icc, 0, len(big_icc))
    image = inject_with_report(SPLICE_OUTPUTS["jpeg-jfif"], SourceMetadata(None, bytes(big_icc))).data
    expected = inject_with_report(image, METAS["both"])
    assert spliced(image, METAS["both"], [100, 70_000, 500_000]) == (expected.data, expected.skipped)


# ---------------------------------------------------------------------------------------------- receive and sinks


def judge_nothing(found: Structure | StructureError) -> str | None:
    return f"damaged: {found}" if isinstance(found, StructureError) else None


def received(body: bytes, cuts: list[int], sink: Any = None) -> Any:
    chunks = list(pieces(body, cuts))

    async def read(_: int) -> bytes:
        return chunks.pop(0) if chunks else b""

    return asyncio.run(receive(read, sink or CheckedSink(MemorySink(), judge_nothing)))


@pytest.mark.parametrize("kind", ANSWERS_200, ids=str)
def test_receive_gives_the_checked_image_or_the_buffered_path_s_error(kind: FaultKind) -> None:
    body = emulator_body(kind)
    result = received(body, [100, 4000, 4001])
    whole_result = parse_response(body)
    if isinstance(whole_result, AttemptError):
        assert isinstance(result, AttemptError) and (result.code, result.message) == (whole_result.code,
                                                                                   whole_result.message)
    elif isinstance(checked_whole(whole_result), str):
        assert isinstance(result, AttemptError) and result.code == "bad_response"
        assert result.message == f"damaged: {checked_whole(whole_result)}"
    else:
        assert result == Received(check_encoded(whole_result), whole_result)


class RecordingSink(MemorySink):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    async def commit(self) -> bytes:
        self.events.append("commit")
        return await super().commit()

    async def abort(self) -> None:
        self.events.append("abort")
        await super().abort()


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(ANSWERS_200), end=st.integers(min_value=0, max_value=5000), cuts=CUTS)
def test_a_sink_is_committed_only_for_a_whole_good_answer(kind: FaultKind, end: int, cuts: list[int]) -> None:
    body = emulator_body(kind)[:end]
    sink = RecordingSink()
    result = received(body, cuts, CheckedSink(sink, judge_nothing))
    assert sink.events == (["commit"] if isinstance(result, Received) else ["abort"])


def test_a_read_error_aborts_the_sink() -> None:
    sink = RecordingSink()
    body = emulator_body(FaultKind.NONE)

    async def read(_: int) -> bytes:
        if sink.events or body[:0]:
            return b""
        raise ConnectionResetError("gone")

    with pytest.raises(ConnectionResetError):
        asyncio.run(receive(read, sink))
    assert sink.events == ["abort"]


def test_checked_sink_rejects_through_commit() -> None:
    async def go() -> None:
        sink = RecordingSink()
        checked_sink = CheckedSink(sink, lambda found: "wrong aspect" if isinstance(found, Structure) else "broken")
        await checked_sink.write(IMAGE)
        with pytest.raises(ImageRejected, match="wrong aspect"):
            await checked_sink.commit()
        assert sink.events == ["abort"]
    asyncio.run(go())


def test_pieces_helper_covers_everything() -> None:
    data = bytes(range(50))
    assert b"".join(pieces(data, [3, 3, 70, 0, 49])) == data

