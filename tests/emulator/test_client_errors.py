"""Every rejection and injected fault, as a real aiobotocore client parses it."""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError, ResponseStreamingError

from batch_upscaler.emulator import EmulatorConfig, FaultKind, image_key, serve
from batch_upscaler.emulator.protocol import MSG_THROTTLED

from .helpers import (
    CONSERVATIVE,
    FAST,
    SMALL_OUTPUT,
    bedrock_client,
    body,
    emulated,
    error_of,
    invoke,
    invoke_error,
    invoke_json,
    make_image,
)

IMAGE = make_image(64, 64)
KEY = image_key(IMAGE)


@pytest.mark.asyncio
@pytest.mark.parametrize(("fault", "code", "status"), [
    (FaultKind.THROTTLE, "ThrottlingException", 429),
    (FaultKind.MODEL_NOT_READY, "ModelNotReadyException", 429),
    (FaultKind.VALIDATION, "ValidationException", 400),
    (FaultKind.ACCESS_DENIED, "AccessDeniedException", 403),
    (FaultKind.MODEL_ERROR, "ModelErrorException", 424),
    (FaultKind.MODEL_TIMEOUT, "ModelTimeoutException", 408),
    (FaultKind.SERVICE_UNAVAILABLE, "ServiceUnavailableException", 503),
    (FaultKind.INTERNAL_ERROR, "InternalServerException", 500),
])
async def test_error_faults_parse_to_the_right_code(fault: FaultKind, code: str, status: int) -> None:
    async with emulated(faults_by_image={KEY: (fault,)}) as (running, client):
        exc = await invoke_error(client, body(IMAGE, prompt="p"))
    assert error_of(exc)[:2] == (code, status)
    assert exc.response["ResponseMetadata"]["RequestId"]
    (record,) = running.log.records()
    assert (record.status, record.error_type, record.fault, record.image_sha256) == (status, code, fault, KEY)
    if fault is FaultKind.MODEL_ERROR:
        assert exc.response["originalStatusCode"] == 500
        assert exc.response["resourceName"] == CONSERVATIVE


@pytest.mark.asyncio
async def test_modeled_exception_classes_match() -> None:
    async with emulated(faults_by_image={KEY: (FaultKind.THROTTLE,)}) as (_, client):
        with pytest.raises(client.exceptions.ThrottlingException):
            await invoke(client, body(IMAGE, prompt="p"))


@pytest.mark.asyncio
async def test_scripted_sequence_then_normal() -> None:
    async with emulated(faults_by_image={KEY: (FaultKind.THROTTLE, FaultKind.THROTTLE)}) as (running, client):
        outcomes = []
        for _ in range(3):
            try:
                await invoke_json(client, body(IMAGE), FAST)
                outcomes.append(200)
            except ClientError as exc:
                outcomes.append(error_of(exc)[1])
    assert outcomes == [429, 429, 200]
    assert [r.fault for r in running.log.records()] == ["throttle", "throttle", None]


@pytest.mark.asyncio
async def test_quota_third_immediate_request_is_throttled() -> None:
    async with emulated(quota_rpm=60, quota_burst=2) as (running, client):
        await invoke_json(client, body(IMAGE), FAST)
        await invoke_json(client, body(IMAGE), FAST)
        exc = await invoke_error(client, body(IMAGE), FAST)
    assert error_of(exc) == ("ThrottlingException", 429, MSG_THROTTLED)
    assert running.log.records()[-1].image_sha256 is None  # throttled before the body was parsed


@pytest.mark.asyncio
async def test_quota_refills_with_the_injected_clock() -> None:
    now = [100.0]
    async with (serve(EmulatorConfig(quota_rpm=60, quota_burst=1, output_max_pixels=SMALL_OUTPUT),
                      clock=lambda: now[0]) as running,
                bedrock_client(running.endpoint_url) as client):
        await invoke_json(client, body(IMAGE), FAST)
        assert error_of(await invoke_error(client, body(IMAGE), FAST))[1] == 429
        now[0] += 1.0  # 60 rpm = one token per second
        await invoke_json(client, body(IMAGE), FAST)
    assert [r.status for r in running.log.records()] == [200, 429, 200]


@pytest.mark.asyncio
async def test_quota_is_per_model() -> None:
    async with emulated(quota_rpm=1, quota_burst=1) as (_, client):
        await invoke_json(client, body(IMAGE), FAST)
        await invoke_json(client, body(IMAGE, prompt="p"), CONSERVATIVE)
        assert error_of(await invoke_error(client, body(IMAGE), FAST))[1] == 429


@pytest.mark.asyncio
@pytest.mark.parametrize(("model_id", "message"), [
    ("stability.stable-conservative-upscale-v1:0",
     ("Invocation of model ID stability.stable-conservative-upscale-v1:0 with on-demand throughput isn't "
      "supported. Retry your request with the ID or ARN of an inference profile that contains this model.")),
    ("us.stability.stable-ultra-upscale-v9:0", "The provided model identifier is invalid."),
])
async def test_model_id_rejections(model_id: str, message: str) -> None:
    async with emulated() as (running, client):
        exc = await invoke_error(client, body(IMAGE, prompt="p"), model_id)
    assert error_of(exc) == ("ValidationException", 400, message)
    assert running.log.records()[0].model_id == model_id


@pytest.mark.asyncio
async def test_deny_access() -> None:
    async with emulated(deny_access=True) as (_, client):
        exc = await invoke_error(client, body(IMAGE, prompt="p"))
    assert error_of(exc) == ("AccessDeniedException", 403,
                             "You don't have access to the model with the specified model ID.")


@pytest.mark.asyncio
async def test_missing_authentication_token() -> None:
    async with (emulated() as (running, _), aiohttp.ClientSession() as http,
                http.post(f"{running.endpoint_url}/model/{FAST}/invoke", json=body(IMAGE)) as resp):
        assert resp.status == 403
        assert resp.headers["x-amzn-ErrorType"].startswith("MissingAuthenticationTokenException:")
        assert resp.headers["Content-Type"].startswith("application/json")
        assert await resp.json() == {"message": "Missing Authentication Token"}
    assert running.log.records()[0].error_type == "MissingAuthenticationTokenException"


@pytest.mark.asyncio
@pytest.mark.parametrize(("model_id", "payload", "problem"), [
    (CONSERVATIVE, body(IMAGE, prompt="p", style="x"), "#: extraneous key [style] is not permitted"),
    (CONSERVATIVE, body(IMAGE), "#: required key [prompt] not found"),
    (CONSERVATIVE, body(IMAGE, prompt="p", creativity=0.9), "#/creativity: must be ≤ 0.5, got 0.9"),
    (FAST, body(IMAGE, prompt="p"), "#: extraneous key [prompt] is not permitted"),
])
async def test_validation_messages(model_id: str, payload: dict[str, object], problem: str) -> None:
    async with emulated() as (_, client):
        exc = await invoke_error(client, payload, model_id)
    message = f"Malformed input request: {problem}, please reformat your input and try again."
    assert error_of(exc) == ("ValidationException", 400, message)


@pytest.mark.asyncio
async def test_body_that_is_not_json() -> None:
    async with emulated() as (_, client):
        exc = await invoke_error(client, b"not json")
    assert error_of(exc) == ("ValidationException", 400,
                             "Malformed input request, please reformat your input and try again.")


@pytest.mark.asyncio
async def test_image_problems_are_validation_errors() -> None:
    async with emulated() as (running, client):
        too_small = await invoke_error(client, body(make_image(50, 50), prompt="p"))
        gif = await invoke_error(client, body(make_image(64, 64, "GIF")), FAST)
        not_b64 = await invoke_error(client, {"image": "!!!"}, FAST)
    assert error_of(too_small)[:2] == ("ValidationException", 400)
    assert "too_small" in error_of(too_small)[2]
    assert "unsupported_format" in error_of(gif)[2]
    assert "not_base64" in error_of(not_b64)[2]
    assert running.log.records()[0].input_size == (50, 50)


@pytest.mark.asyncio
# aiohttp warns (ResourceWarning, visible in dev mode) whenever aiobotocore hands it > 1 MiB of raw bytes.
@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_body_over_25_mb_is_our_validation_error_not_413() -> None:
    oversized = b'{"image": "' + b"A" * 25_000_000 + b'"}'
    async with emulated() as (_, client):
        exc = await invoke_error(client, oversized, FAST)
    code, status, message = error_of(exc)
    assert (code, status) == ("ValidationException", 400)
    assert "25000000" in message


@pytest.mark.asyncio
async def test_body_past_aiohttp_read_limit_is_still_our_validation_error() -> None:
    headers = {"Authorization": "Bearer t"}
    async with (emulated() as (running, _), aiohttp.ClientSession() as http,
                http.post(f"{running.endpoint_url}/model/{FAST}/invoke", data=io.BytesIO(b"x" * (65 << 20)),
                          headers=headers) as resp):
        assert resp.status == 400  # not aiohttp's 413
        assert resp.headers["x-amzn-ErrorType"].startswith("ValidationException:")
        assert "25000000" in (await resp.json())["message"]


@pytest.mark.asyncio
async def test_content_filtered_is_a_200_without_images() -> None:
    async with emulated(faults_by_image={KEY: (FaultKind.CONTENT_FILTERED,)}) as (running, client):
        answer = await invoke_json(client, body(IMAGE, prompt="p", seed=7))
    assert answer == {"seeds": [7], "finish_reasons": ["Filter reason: output image"]}
    assert running.log.records()[0].output_size is None


@pytest.mark.asyncio
async def test_broken_200_answers() -> None:
    faults = (FaultKind.TRUNCATED, FaultKind.NON_JSON, FaultKind.BAD_BASE64)
    async with emulated(faults_by_image={KEY: faults}) as (_, client):
        truncated = await invoke(client, body(IMAGE), FAST)
        html = await invoke(client, body(IMAGE), FAST)
        bad_b64 = await invoke_json(client, body(IMAGE), FAST)
    with pytest.raises(json.JSONDecodeError):
        json.loads(truncated["raw"])
    assert truncated["raw"].startswith(b'{"seeds": [')
    assert html["response"]["contentType"] == "text/html" and html["raw"].startswith(b"<html>")
    assert bad_b64["images"] == ["!!not base64!!"]


@pytest.mark.asyncio
async def test_disconnect_mid_body() -> None:
    """Headers arrive (invoke_model returns 200), the body read fails.

    aiobotocore 3.10 only wraps aiohttp's ClientConnectionError into botocore's ResponseStreamingError;
    an incomplete body raises aiohttp.ClientPayloadError (not a connection error), which leaks out raw.
    """
    async with emulated(faults_by_image={KEY: (FaultKind.DISCONNECT,)}) as (running, client):
        response = await client.invoke_model(modelId=FAST, body=json.dumps(body(IMAGE)),
                                             contentType="application/json", accept="application/json")
        assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
        async with response["body"] as stream:  # closing it releases the broken connection
            with pytest.raises((aiohttp.ClientPayloadError, ResponseStreamingError)):
                await stream.read()
        # The emulator survives and keeps answering.
        assert (await invoke_json(client, body(IMAGE), FAST))["finish_reasons"] == [None]
    assert [r.fault for r in running.log.records()] == ["disconnect", None]


@pytest.mark.asyncio
async def test_hangup_is_a_botocore_connection_error() -> None:
    async with emulated(faults_by_image={KEY: (FaultKind.HANGUP,)}) as (_, client):
        with pytest.raises(ConnectionClosedError):
            await invoke(client, body(IMAGE), FAST)
        assert (await invoke_json(client, body(IMAGE), FAST))["finish_reasons"] == [None]


@pytest.mark.asyncio
async def test_slow_answer_trips_the_client_read_timeout() -> None:
    async with (emulated(faults_by_image={KEY: (FaultKind.SLOW,)}, slow_s=2.0) as (running, _),
                bedrock_client(running.endpoint_url, read_timeout=0.3) as client):
        with pytest.raises(ReadTimeoutError):
            await invoke(client, body(IMAGE), FAST)
        # The client gave up and closed the connection: the stalled handler is cancelled, recorded once.
        for _ in range(50):
            if running.log.records():
                break
            await asyncio.sleep(0.01)
    assert [(r.fault, r.status) for r in running.log.records()] == [("slow", 499)]


@pytest.mark.asyncio
async def test_slow_answer_arrives_after_slow_s() -> None:
    async with emulated(faults_by_image={KEY: (FaultKind.SLOW,)}, slow_s=0.3) as (running, client):
        answer = await invoke_json(client, body(IMAGE), FAST)
    assert answer["finish_reasons"] == [None]
    assert running.log.records()[0].duration_s >= 0.3


@pytest.mark.asyncio
async def test_random_fault_rates_through_the_client() -> None:
    async with emulated(fault_rates={FaultKind.INTERNAL_ERROR: 1.0}) as (_, client):
        assert error_of(await invoke_error(client, body(IMAGE), FAST))[:2] == ("InternalServerException", 500)


@pytest.mark.asyncio
async def test_botocore_retries_throttles_in_standard_mode() -> None:
    # One retry only: botocore's back-off sleep (up to 1 s here) cannot be skipped.
    retries = {"total_max_attempts": 2, "mode": "standard"}
    async with (emulated(faults_by_image={KEY: (FaultKind.THROTTLE,)}) as (running, _),
                bedrock_client(running.endpoint_url, retries=retries) as client):
        answer = await invoke_json(client, body(IMAGE), FAST)
    assert answer["finish_reasons"] == [None]
    assert [r.status for r in running.log.records()] == [429, 200]


@pytest.mark.asyncio
async def test_unknown_path() -> None:
    async with (emulated() as (running, _), aiohttp.ClientSession() as http,
                http.get(f"{running.endpoint_url}/foundation-models") as resp):
        assert resp.status == 404
        assert resp.headers["x-amzn-ErrorType"].startswith("UnknownOperationException:")
