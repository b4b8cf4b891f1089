"""InvokeModel 200 bodies: the fast path and the full JSON parser agree on every layout."""

from __future__ import annotations

import base64
import json
import os

import pytest

from batch_upscaler.bedrock import _parse_any_layout, _parse_plain_layout, parse_response
from batch_upscaler.retry import AttemptError

IMAGE = os.urandom(3000)
B64 = base64.b64encode(IMAGE).decode()


@pytest.mark.parametrize("body", [
    json.dumps({"seeds": [1], "finish_reasons": [None], "images": [B64]}),
    json.dumps({"images": [B64], "seeds": [1], "finish_reasons": [None]}, separators=(",", ":")),
    '{"images" : [ "' + B64 + '" ], "finish_reasons": [null]}',
    '{"images": ["' + B64.replace("/", "\\/") + '"], "finish_reasons": [null]}',  # escaped slashes
    json.dumps({"images": [B64, B64], "finish_reasons": [None, None]}),
])
def test_success_layouts(body: str) -> None:
    assert parse_response(body.encode()) == IMAGE
    assert _parse_any_layout(body.encode()) == IMAGE


def test_fast_path_takes_the_usual_layout_and_leaves_the_rest() -> None:
    assert _parse_plain_layout(json.dumps({"finish_reasons": [None], "images": [B64]}).encode()) == IMAGE
    assert _parse_plain_layout(('{"images": ["' + B64.replace("/", "\\/") + '"]}').encode()) is None
    assert _parse_plain_layout(json.dumps({"images": [B64, B64]}).encode()) is None


@pytest.mark.parametrize(("body", "code"), [
    (json.dumps({"seeds": [1], "finish_reasons": ["Filter reason: output image"]}), "content_filtered"),
    (json.dumps({"finish_reasons": ["Filter reason: prompt"], "images": [B64]}), "content_filtered"),
    ('{"images": ["!!not base64!!"], "finish_reasons": [null]}', "bad_response"),
    ('{"images": ["' + B64[: len(B64) // 2], "bad_response"),
    ("<html>busy</html>", "bad_response"),
    ("[1, 2]", "bad_response"),
    ('{"finish_reasons": [null]}', "bad_response"),
])
def test_failures(body: str, code: str) -> None:
    result = parse_response(body.encode())
    assert isinstance(result, AttemptError) and result.code == code
