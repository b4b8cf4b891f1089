"""The transport edge: one shared aiobotocore bedrock-runtime client and a single InvokeModel attempt.

Everything network-shaped is turned into data here: an attempt returns the decoded image (as bytes
from ``invoke``, or streamed into a sink by ``invoke_into`` without holding the body) or an
:class:`~batch_upscaler.retry.AttemptError`; the retry policy, the rate limiter and the state
machine never see a botocore exception. botocore's own retries are off (``total_max_attempts=1``)
because the runner counts and paces every attempt itself; ``max_pool_connections`` follows the
concurrency cap (the default of 10 would silently cap requests in flight).

Request bodies are never logged or put into error messages: they hold the whole image.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import pybase64
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
)

from batch_upscaler.errors import FatalBackendError
from batch_upscaler.jsonscan import filtered
from batch_upscaler.retry import AttemptError
from batch_upscaler.streaming import ImageSink, receive

T = TypeVar("T")


@dataclass(frozen=True)
class ClientSettings:
    region: str
    endpoint_url: str | None
    profile: str | None
    concurrency: int
    read_timeout_s: float
    connect_timeout_s: float
    # Explicit keys are only for the local emulator; real runs use the default credential chain.
    static_credentials: tuple[str, str] | None = None
    quotas_endpoint_url: str | None = None  # Service Quotas (quotas.py); the embedded emulator answers it too


@asynccontextmanager
async def open_client(settings: ClientSettings, session: AioSession | None = None) -> AsyncIterator[Any]:
    """The one bedrock-runtime client a run shares (its connection pool is the concurrency), made
    from the run's one AWS session (the S3 clients come from it too)."""
    config = AioConfig(
        max_pool_connections=max(10, settings.concurrency),
        read_timeout=settings.read_timeout_s,
        connect_timeout=settings.connect_timeout_s,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    keys: dict[str, str] = {}
    if settings.static_credentials:
        keys = {"aws_access_key_id": settings.static_credentials[0],
                "aws_secret_access_key": settings.static_credentials[1]}
    try:
        session = session or AioSession(profile=settings.profile)
        client_cm = session.create_client("bedrock-runtime", region_name=settings.region,
                                          endpoint_url=settings.endpoint_url, config=config, **keys)
        client = await client_cm.__aenter__()
    except ProfileNotFound as exc:
        raise FatalBackendError(f"AWS profile not found: {exc}") from None
    try:
        yield client
    finally:
        await client_cm.__aexit__(None, None, None)


_PROBE_BODY = b"{}"  # validated, never run, never billed (as doctor's model-access check)


class BedrockInvoker:
    """Sends one prepared request body to one model; knows the response shape."""

    def __init__(self, client: Any, model_id: str) -> None:
        self._client = client
        self.model_id = model_id

    async def probe(self) -> AttemptError | None:
        """Is the service up? One InvokeModel with the empty JSON body ``{}``: a working service
        authorises it and rejects the body (ValidationException), so nothing runs and nothing is
        billed. Returns how it failed (a ValidationException means "up"), or None if it answered 200."""
        result = await self.invoke(_PROBE_BODY)
        return None if isinstance(result, bytes) else result

    async def invoke(self, body: bytes) -> bytes | AttemptError:
        """One attempt: the decoded output image, or why the attempt failed (the body is held whole)."""
        response = await self._call(body)
        if isinstance(response, AttemptError):
            return response
        try:
            async with response["body"] as stream:
                payload = await stream.read()
        except _BODY_ERRORS as exc:
            return _interrupted(exc)
        return parse_response(payload)

    async def invoke_into(self, body: bytes, sink: ImageSink[T]) -> T | AttemptError:
        """One attempt whose image is decoded into ``sink`` while the body arrives (streaming.receive):
        what the sink committed, or why the attempt failed (the sink is then aborted)."""
        response = await self._call(body)
        if isinstance(response, AttemptError):
            await sink.abort()
            return response
        try:
            async with response["body"] as stream:
                return await receive(stream.read, sink)
        except _BODY_ERRORS as exc:
            return _interrupted(exc)

    async def _call(self, body: bytes) -> Any:
        """Send the request and read the answer's status and headers: the response, or an error."""
        try:
            return await self._client.invoke_model(
                modelId=self.model_id, body=body, contentType="application/json", accept="application/json")
        except ClientError as exc:
            return _client_error(exc)
        except ReadTimeoutError as exc:
            return AttemptError("read_timeout", str(exc))
        except NoCredentialsError as exc:
            return AttemptError("no_credentials", f"{exc}; configure AWS credentials or use backend: emulator")
        except (BotoCoreError, aiohttp.ClientError, ConnectionError) as exc:
            return AttemptError("connection_error", f"{type(exc).__name__}: {exc}")


# Reading a 200 body: a time-out, or the connection lost (botocore wraps aiohttp's connection errors
# in ResponseStreamingError and a short body in IncompleteReadError; aiohttp's ClientPayloadError,
# a body cut off mid-transfer, comes through as it is).
_BODY_ERRORS = (BotoCoreError, aiohttp.ClientError, ConnectionError)


def _interrupted(exc: BaseException) -> AttemptError:
    if isinstance(exc, ReadTimeoutError):
        return AttemptError("read_timeout", str(exc))
    # The model already answered 200: the image was probably billed (retried once only).
    return AttemptError("response_interrupted", f"{type(exc).__name__}: {exc}")


def parse_response(payload: bytes) -> bytes | AttemptError:
    """Decode a whole InvokeModel 200 body; a non-null ``finish_reasons[0]`` is a failure.

    The buffered path (``invoke``) and the reference the streaming reader (``jsonscan``) is tested
    against; jsonscan's docstring lists where the streaming reader is stricter.
    """
    return _parse_plain_layout(payload) or _parse_any_layout(payload)


def _parse_plain_layout(payload: bytes) -> bytes | AttemptError | None:
    """Fast path for the usual ``{..., "images": ["<base64>"], ...}`` body.

    ``json.loads`` on a ~12 MB body costs ~20 ms of CPU and a 12 MB ``str``; here the base64 is
    decoded straight from the body bytes and only the small rest is parsed as JSON. Any other
    layout (escaped characters, several images, odd spacing) returns None: the full parser decides.
    """
    key = payload.find(b'"images"')
    bracket = payload.find(b"[", key) if key >= 0 else -1
    start = payload.find(b'"', bracket) if bracket >= 0 else -1
    if start < 0 or payload[bracket + 1:start].strip():
        return None
    end = payload.find(b'"', start + 1)
    if end < 0 or payload[end + 1:end + 2] != b"]":
        return None
    try:
        rest = json.loads(payload[:start] + b'""' + payload[end + 1:])
        image = pybase64.b64decode(memoryview(payload)[start + 1:end], validate=True)
    except (json.JSONDecodeError, UnicodeDecodeError, binascii.Error, ValueError):
        return None
    if not isinstance(rest, Mapping):
        return None
    return filtered(rest) or image


def _parse_any_layout(payload: bytes) -> bytes | AttemptError:
    try:
        document = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return AttemptError("bad_response", f"response body is not JSON ({len(payload)} bytes)")
    if not isinstance(document, Mapping):
        return AttemptError("bad_response", "response body is not a JSON object")
    refused = filtered(document)
    if refused is not None:
        return refused
    images = document.get("images")
    if not isinstance(images, list) or not images or not isinstance(images[0], str):
        return AttemptError("bad_response", "response has no image")
    try:
        return pybase64.b64decode(images[0], validate=True)
    except (binascii.Error, ValueError):
        return AttemptError("bad_response", "response image is not valid base64")


def _client_error(exc: ClientError) -> AttemptError:
    error = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    headers = meta.get("HTTPHeaders", {})
    retry_after = headers.get("retry-after")
    return AttemptError(
        code=str(error.get("Code", "Unknown")),
        message=str(error.get("Message", "")),
        status=meta.get("HTTPStatusCode"),
        retry_after_s=float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None,
    )
