"""Shared test helpers: small images and a real aiobotocore bedrock-runtime client on the emulator."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import ClientError
from PIL import Image

from batch_upscaler.emulator import EmulatorConfig, RunningEmulator, serve

CONSERVATIVE = "us.stability.stable-conservative-upscale-v1:0"
CREATIVE = "us.stability.stable-creative-upscale-v1:0"
FAST = "us.stability.stable-fast-upscale-v1:0"
SMALL_OUTPUT = 256 * 256
CREDENTIALS = {"aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "x"}

_session: AioSession | None = None


def session() -> AioSession:
    # One session for all tests: a fresh one reloads the service JSON (~100 ms) every time.
    global _session
    if _session is None:
        _session = get_session()
    return _session


def make_image(width: int, height: int, fmt: str = "PNG",
               color: tuple[int, int, int] = (200, 120, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, fmt)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def body(image: bytes, **params: Any) -> dict[str, Any]:
    return {"image": b64(image), **params}


@asynccontextmanager
async def bedrock_client(endpoint_url: str, **config: Any) -> AsyncIterator[Any]:
    retries = config.pop("retries", {"total_max_attempts": 1, "mode": "standard"})
    async with session().create_client(
        "bedrock-runtime", region_name="us-east-1", endpoint_url=endpoint_url,
        config=AioConfig(retries=retries, **config), **CREDENTIALS,
    ) as client:
        yield client


@asynccontextmanager
async def emulated(**config: Any) -> AsyncIterator[tuple[RunningEmulator, Any]]:
    """A running emulator (small outputs unless told otherwise) and a client pointed at it."""
    config.setdefault("output_max_pixels", SMALL_OUTPUT)
    async with serve(EmulatorConfig(**config)) as running, bedrock_client(running.endpoint_url) as client:
        yield running, client


Payload = dict[str, Any] | bytes


async def invoke(client: Any, payload: Payload, model_id: str = CONSERVATIVE) -> dict[str, Any]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response = await client.invoke_model(modelId=model_id, body=raw, contentType="application/json",
                                         accept="application/json")
    data = await response["body"].read()
    return {"response": response, "raw": data}


async def invoke_json(client: Any, payload: dict[str, Any], model_id: str = CONSERVATIVE) -> dict[str, Any]:
    result = await invoke(client, payload, model_id)
    parsed: dict[str, Any] = json.loads(result["raw"])
    return parsed


async def invoke_error(client: Any, payload: Payload, model_id: str = CONSERVATIVE) -> ClientError:
    with pytest.raises(ClientError) as caught:
        await invoke(client, payload, model_id)
    return caught.value


def error_of(exc: ClientError) -> tuple[str, int, str]:
    """(Error.Code, HTTP status, Error.Message) as botocore parsed them."""
    return (exc.response["Error"]["Code"], exc.response["ResponseMetadata"]["HTTPStatusCode"],
            exc.response["Error"]["Message"])


def decoded(answer: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
