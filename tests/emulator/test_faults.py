"""FaultPicker determinism and the shape of each fault's answer."""

from __future__ import annotations

import json
from collections import Counter

from batch_upscaler.emulator.faults import (
    BAD_BASE64_IMAGE,
    FaultKind,
    FaultPicker,
    fault_body,
    fault_error,
    image_key,
)
from batch_upscaler.emulator.protocol import ErrorCode
from batch_upscaler.emulator.settings import EmulatorConfig

A = image_key(b"image a")
B = image_key(b"image b")


def test_script_is_consumed_per_image_then_answers_normally() -> None:
    picker = FaultPicker({A: (FaultKind.THROTTLE, FaultKind.NONE, FaultKind.INTERNAL_ERROR)}, {}, seed=0)
    assert picker.pick(B) is FaultKind.NONE
    assert [picker.pick(A) for _ in range(5)] == [
        FaultKind.THROTTLE, FaultKind.NONE, FaultKind.INTERNAL_ERROR, FaultKind.NONE, FaultKind.NONE]


def test_script_wins_over_rates() -> None:
    picker = FaultPicker({A: (FaultKind.NONE,)}, {FaultKind.THROTTLE: 1.0}, seed=0)
    assert picker.pick(A) is FaultKind.NONE  # a scripted NONE is a normal answer, no random draw
    assert picker.pick(A) is FaultKind.THROTTLE


def test_seeded_rates_are_deterministic_and_roughly_right() -> None:
    rates = {FaultKind.THROTTLE: 0.2, FaultKind.MODEL_ERROR: 0.1}
    keys = [image_key(str(i).encode()) for i in range(2000)]
    first = [FaultPicker({}, rates, seed=7).pick(k) for k in keys[:1]]
    picker_a, picker_b = FaultPicker({}, rates, seed=7), FaultPicker({}, rates, seed=7)
    seq_a = [picker_a.pick(k) for k in keys]
    assert seq_a == [picker_b.pick(k) for k in keys]
    assert first == seq_a[:1]
    counts = Counter(seq_a)
    assert 300 < counts[FaultKind.THROTTLE] < 500  # 0.2 * 2000 = 400
    assert 100 < counts[FaultKind.MODEL_ERROR] < 220  # 0.1 * 0.8 * 2000 = 160
    assert [FaultPicker({}, rates, seed=8).pick(k) for k in keys] != seq_a


def test_from_config_accepts_fault_names_as_strings() -> None:
    config = EmulatorConfig(faults_by_image={A.upper(): ("throttle", "none")})  # type: ignore[dict-item]
    picker = FaultPicker.from_config(config)
    assert [picker.pick(A), picker.pick(A)] == [FaultKind.THROTTLE, FaultKind.NONE]


def test_error_faults_map_to_bedrock_codes() -> None:
    expected = {
        FaultKind.THROTTLE: (ErrorCode.THROTTLING, 429),
        FaultKind.SERVICE_UNAVAILABLE: (ErrorCode.SERVICE_UNAVAILABLE, 503),
        FaultKind.INTERNAL_ERROR: (ErrorCode.INTERNAL, 500),
        FaultKind.MODEL_TIMEOUT: (ErrorCode.MODEL_TIMEOUT, 408),
        FaultKind.MODEL_ERROR: (ErrorCode.MODEL_ERROR, 424),
        FaultKind.MODEL_NOT_READY: (ErrorCode.MODEL_NOT_READY, 429),
        FaultKind.VALIDATION: (ErrorCode.VALIDATION, 400),
        FaultKind.ACCESS_DENIED: (ErrorCode.ACCESS_DENIED, 403),
    }
    for kind in FaultKind:
        reply = fault_error(kind, "us.model")
        if kind in expected:
            assert reply is not None and (reply.code, reply.status) == expected[kind]
        else:
            assert reply is None, kind
    model_error = fault_error(FaultKind.MODEL_ERROR, "us.model")
    assert model_error is not None
    assert json.loads(model_error.body())["resourceName"] == "us.model"
    assert json.loads(model_error.body())["originalStatusCode"] == 500


def test_body_faults() -> None:
    normal, ctype = fault_body(FaultKind.NONE, 5, "QUJD")
    assert json.loads(normal) == {"seeds": [5], "finish_reasons": [None], "images": ["QUJD"]}
    assert ctype == "application/json"
    filtered = json.loads(fault_body(FaultKind.CONTENT_FILTERED, 5, "QUJD")[0])
    assert filtered == {"seeds": [5], "finish_reasons": ["Filter reason: output image"]}
    assert fault_body(FaultKind.TRUNCATED, 5, "QUJD")[0] == normal[: len(normal) // 2]
    assert fault_body(FaultKind.NON_JSON, 5, "QUJD")[1] == "text/html"
    assert json.loads(fault_body(FaultKind.BAD_BASE64, 5, "QUJD")[0])["images"] == [BAD_BASE64_IMAGE]
