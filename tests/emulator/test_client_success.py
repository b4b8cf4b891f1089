"""Successful invokes through a real aiobotocore client: shapes, sizes, formats, seeds, log."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from botocore.exceptions import ClientError
from yarl import URL

from batch_upscaler.emulator import FaultKind, image_key

from .helpers import (
    CONSERVATIVE,
    CREATIVE,
    FAST,
    body,
    decoded,
    emulated,
    invoke,
    invoke_json,
    make_image,
)


@pytest.mark.asyncio
async def test_success_shape_and_headers() -> None:
    async with emulated() as (_, client):
        result = await invoke(client, body(make_image(128, 128), prompt="a cat", seed=42))
    response, answer = result["response"], json.loads(result["raw"])
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert response["contentType"] == "application/json"
    assert len(response["ResponseMetadata"]["RequestId"]) == 36  # x-amzn-RequestId, a uuid4
    assert set(answer) == {"seeds", "finish_reasons", "images"}
    assert answer["seeds"] == [42] and answer["finish_reasons"] == [None]
    picture = decoded(answer)
    assert picture.format == "PNG" and picture.size == (256, 256)


@pytest.mark.asyncio
async def test_documented_output_sizes() -> None:
    """The catalogue's sizes when output_max_pixels is None: 200x200 conservative -> 3112x3112, fast 4x."""
    async with emulated(output_max_pixels=None) as (_, client):
        conservative = await invoke_json(client, body(make_image(200, 200), prompt="p"))
        fast = await invoke_json(client, body(make_image(100, 60)), FAST)
    assert decoded(conservative).size == (3112, 3112)
    assert decoded(fast).size == (400, 240)


@pytest.mark.asyncio
@pytest.mark.parametrize(("fmt", "pil"), [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
async def test_output_format_and_cap_keeps_aspect(fmt: str, pil: str) -> None:
    async with emulated() as (_, client):
        answer = await invoke_json(client, body(make_image(160, 80, "JPEG"), prompt="p", output_format=fmt),
                                   CREATIVE)
    picture = decoded(answer)
    assert picture.format == pil
    width, height = picture.size  # ~9.7 MP capped to 256*256, keeping 2:1
    assert width * height <= 256 * 256 and (width, height) == (361, 181)


@pytest.mark.asyncio
async def test_random_seed_is_deterministic_per_config_seed() -> None:
    async def seeds(seed: int) -> list[int]:
        async with emulated(seed=seed) as (_, client):
            return [(await invoke_json(client, body(make_image(64, 64)), FAST))["seeds"][0] for _ in range(2)]

    first = await seeds(3)
    assert first == await seeds(3)
    assert first != await seeds(4)
    assert all(1 <= s <= 4_294_967_294 for s in first)


@pytest.mark.asyncio
async def test_log_records_decoded_sha_and_never_the_body() -> None:
    image = make_image(96, 96)
    async with emulated() as (running, client):
        await invoke_json(client, body(image, prompt="secret prompt"))
        async with aiohttp.ClientSession() as http, http.get(f"{running.endpoint_url}/_emulator/log") as resp:
            listed = await resp.json()
    (record,) = running.log.records()
    assert record.image_sha256 == image_key(image)
    assert (record.seq, record.status, record.model_id) == (1, 200, CONSERVATIVE)
    assert (record.input_size, record.output_size, record.error_type, record.fault) == (
        (96, 96), (256, 256), None, None)
    assert listed == [json.loads(json.dumps(record.to_dict()))]
    dumped = json.dumps(listed)
    # The parameters are recorded (tests assert what was received); the image and credentials never.
    assert record.params == {"prompt": "secret prompt"} and record.image_format == "png"
    assert body(image)["image"][:40] not in dumped and "AKIDEXAMPLE" not in dumped


@pytest.mark.asyncio
async def test_request_log_file(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    image = make_image(64, 64)
    async with emulated(request_log_path=path, faults_by_image={image_key(image): (FaultKind.THROTTLE,)}) as (
            _, client):
        with pytest.raises(ClientError):  # the scripted throttle
            await invoke(client, body(image), FAST)
        await invoke(client, body(image), FAST)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["status"], r["fault"], r["error_type"]) for r in lines] == [
        (429, "throttle", "ThrottlingException"), (200, None, None)]
    assert "image" not in lines[0] and body(image)["image"] not in path.read_text()


@pytest.mark.asyncio
async def test_latency_is_added() -> None:
    async with emulated(latency_s=0.3) as (_, client):
        started = time.monotonic()
        await invoke_json(client, body(make_image(64, 64)), FAST)
    assert time.monotonic() - started >= 0.3


@pytest.mark.asyncio
async def test_percent_encoded_and_literal_model_ids_both_work() -> None:
    """botocore sends ':' as %3A; a hand-written client may send it literally. aiohttp decodes both."""
    payload = json.dumps(body(make_image(64, 64))).encode()
    headers = {"Authorization": "Bearer test-token", "Content-Type": "application/json"}
    async with emulated() as (running, _), aiohttp.ClientSession() as http:
        for path in ("us.stability.stable-fast-upscale-v1:0", "us.stability.stable-fast-upscale-v1%3A0"):
            url = URL(f"{running.endpoint_url}/model/{path}/invoke", encoded=True)
            async with http.post(url, data=payload, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                assert "x-amzn-RequestId" in resp.headers
    assert [r.model_id for r in running.log.records()] == [FAST, FAST]


@pytest.mark.asyncio
async def test_loop_keeps_serving_during_an_upscale() -> None:
    """Pillow runs in a worker thread: a slow documented-size upscale must not block the log endpoint."""
    async with emulated(output_max_pixels=None) as (running, client):
        big = asyncio.create_task(invoke_json(client, body(make_image(200, 200), prompt="p")))
        await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            started = time.monotonic()
            async with http.get(f"{running.endpoint_url}/_emulator/log") as resp:
                assert resp.status == 200
            log_latency = time.monotonic() - started
        await big
    assert log_latency < 0.2
