"""Model-id resolution and body schema checks, without the server."""

from __future__ import annotations

import json

import pytest

from batch_upscaler.catalogue import BUILTIN, ModelName
from batch_upscaler.emulator.faults import image_key
from batch_upscaler.emulator.protocol import ErrorCode, Rejected
from batch_upscaler.emulator.request import check_body_size, parse_body, resolve_model

from .helpers import b64

CONSERVATIVE = BUILTIN[ModelName.CONSERVATIVE]
FAST = BUILTIN[ModelName.FAST]


def _message(exc: pytest.ExceptionInfo[Rejected]) -> str:
    assert exc.value.reply.code is ErrorCode.VALIDATION
    return exc.value.reply.message


@pytest.mark.parametrize("model_id", [
    "us.stability.stable-conservative-upscale-v1:0",
    "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.stability.stable-conservative-upscale-v1:0",
])
def test_profile_ids_and_arns_resolve(model_id: str) -> None:
    assert resolve_model(model_id, BUILTIN) is CONSERVATIVE


@pytest.mark.parametrize(("model_id", "start"), [
    ("stability.stable-fast-upscale-v1:0", "Invocation of model ID stability.stable-fast-upscale-v1:0 with"),
    ("arn:aws:bedrock:us-east-1::foundation-model/stability.stable-fast-upscale-v1:0", "Invocation of model"),
    ("us.anthropic.claude-v2", "The provided model identifier is invalid."),
    ("arn:aws:bedrock:us-east-1:1:provisioned-model/abc", "The provided model identifier is invalid."),
])
def test_bad_model_ids(model_id: str, start: str) -> None:
    with pytest.raises(Rejected) as caught:
        resolve_model(model_id, BUILTIN)
    assert _message(caught).startswith(start)


def test_body_size_cap() -> None:
    check_body_size(25_000_000, CONSERVATIVE)
    with pytest.raises(Rejected):
        check_body_size(25_000_001, CONSERVATIVE)


def test_parse_ok_hashes_the_decoded_image() -> None:
    payload = json.dumps({"image": b64(b"pixels"), "prompt": "p", "seed": 9}).encode()
    parsed = parse_body(payload, CONSERVATIVE)
    assert (parsed.image, parsed.image_sha256, parsed.seed, parsed.output_format) == (
        b"pixels", image_key(b"pixels"), 9, "png")


@pytest.mark.parametrize(("payload", "message"), [
    (b"[1, 2]", "Malformed input request, please reformat your input and try again."),
    (b"\xff\xfe", "Malformed input request, please reformat your input and try again."),
    (b'{"prompt": "p"}', "Malformed input request: #: required key [image] not found, please reformat"),
    (b'{"image": 5, "prompt": "p"}', "Malformed input request: #/image: must be a string, got int, please"),
    (b'{"image": "QQ==", "prompt": "p", "foo": 1, "bar": 2}',
     ("Malformed input request: #: extraneous key [foo] is not permitted"
      "#: extraneous key [bar] is not permitted, please")),
    (b'{"image": "QQ==", "foo": 1}',
     ("Malformed input request: #: required key [prompt] not found"
      "#: extraneous key [foo] is not permitted, please")),
])
def test_schema_messages(payload: bytes, message: str) -> None:
    with pytest.raises(Rejected) as caught:
        parse_body(payload, CONSERVATIVE)
    assert _message(caught).startswith(message)


def test_bad_base64() -> None:
    with pytest.raises(Rejected) as caught:
        parse_body(b'{"image": "!!not base64!!"}', FAST)
    assert "not_base64" in _message(caught)
