"""The aiohttp application that answers bedrock-runtime ``InvokeModel`` calls for the upscale models.

Per request, in this order: auth header present, access allowed, model id, body size, quota,
body schema, base64, injected fault, upscale (in a worker thread; reused per size and format
when ``canned_output``), latency (fixed or lognormal), answer. Every invoke request -- rejected
or not -- is recorded exactly once in the RequestLog.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from batch_upscaler.catalogue import ModelName, ModelSpec
from batch_upscaler.emulator import protocol, servicequotas
from batch_upscaler.emulator.faults import FaultKind, FaultPicker, fault_body, fault_error
from batch_upscaler.emulator.latency import LatencyModel
from batch_upscaler.emulator.protocol import ErrorCode, ErrorReply, Rejected
from batch_upscaler.emulator.quota import TokenBucket
from batch_upscaler.emulator.request import (
    InvokeRequest,
    body_too_large,
    check_body_size,
    parse_body,
    resolve_model,
)
from batch_upscaler.emulator.requestlog import RequestLog, RequestRecord
from batch_upscaler.emulator.settings import EmulatorConfig
from batch_upscaler.emulator.upscale import CannedOutputs, ImageRejected, UpscaleResult, sniff_format, upscale

# Above the 25,000,000-byte Bedrock cap so that *our* ValidationException answers, not aiohttp's 413.
CLIENT_MAX_SIZE = 64 * 1024 * 1024
SEED_MAX = 4_294_967_294
_CREDENTIAL_SCOPE = re.compile(r"Credential=[^/,\s]+/\d{8}/([a-z0-9-]+)/")
AUTH_SCHEMES = ("AWS4-HMAC-SHA256 ", "Bearer ")
CANCELLED_STATUS = 499  # recorded (never sent) when the client leaves or the server stops mid-request
_DISCONNECT_MAX_PART = 64 * 1024  # small enough to leave with the headers before the abort

CONFIG_KEY = web.AppKey("emulator_config", EmulatorConfig)
LOG_KEY = web.AppKey("emulator_log", RequestLog)


@dataclass
class _Exchange:
    """What one invoke request has turned into so far; it becomes a RequestRecord at the end."""

    seq: int
    model_id: str
    started: float
    received_at: float = field(default_factory=time.time)
    request_id: str = field(default_factory=protocol.new_request_id)
    image_sha256: str | None = None
    input_size: tuple[int, int] | None = None
    output_size: tuple[int, int] | None = None
    output_sha256: str | None = None
    fault: FaultKind | None = None
    error_type: str | None = None
    image_format: str | None = None
    params: dict[str, Any] | None = None
    latency_s: float | None = None
    signing_region: str | None = None

    def record(self, status: int, now: float) -> RequestRecord:
        return RequestRecord(
            seq=self.seq, at=time.time(), model_id=self.model_id, image_sha256=self.image_sha256,
            input_size=self.input_size, status=status, error_type=self.error_type,
            fault=None if self.fault is None else str(self.fault), output_size=self.output_size,
            duration_s=max(0.0, now - self.started), image_format=self.image_format, params=self.params,
            output_sha256=self.output_sha256,
            received_at=self.received_at, latency_s=self.latency_s, signing_region=self.signing_region,
        )


@dataclass(frozen=True)
class _Answer:
    """A 200 answer ready to send: body, content type and the upscale behind it."""

    body: bytes
    content_type: str
    result: UpscaleResult


def create_app(config: EmulatorConfig, log: RequestLog,
               clock: Callable[[], float] = time.monotonic) -> web.Application:
    """The emulator application; ``clock`` drives the quota bucket and the recorded durations."""
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app[CONFIG_KEY] = config
    app[LOG_KEY] = log
    invoker = _Invoker(config, log, clock)
    app.router.add_post("/model/{model_id}/invoke", invoker.handle)
    app.router.add_get("/_emulator/log", _show_log)
    app.router.add_post("/", _service_quotas)
    app.router.add_route("*", "/{tail:.*}", _unknown_operation)
    return app


async def _service_quotas(request: web.Request) -> web.Response:
    """``POST /`` with a Service Quotas target (see servicequotas.py); anything else is unknown."""
    if not request.headers.get("X-Amz-Target", "").startswith(servicequotas.TARGET_PREFIX):
        return await _unknown_operation(request)
    return await servicequotas.handle(request, request.app[CONFIG_KEY],
                                      signing_region(request.headers) or "us-east-1")


async def _show_log(request: web.Request) -> web.Response:
    """Debugging aid (not Bedrock): every record so far as a JSON list."""
    records = request.app[LOG_KEY].records()
    return web.json_response([record.to_dict() for record in records])


async def _unknown_operation(request: web.Request) -> web.Response:
    reply = ErrorReply(ErrorCode.UNKNOWN_OPERATION, f"Unknown operation {request.method} {request.path}")
    return protocol.error_response(reply, protocol.new_request_id())


def _model_id(request: web.Request) -> str:
    # aiohttp already percent-decodes match_info (even %2F); unquote again only if a client
    # double-encoded. Real ids never contain '%', so this cannot corrupt one.
    model_id = request.match_info["model_id"]
    return unquote(model_id) if "%" in model_id else model_id


def signing_region(headers: Mapping[str, str]) -> str | None:
    """The region of a SigV4 signature's credential scope (``Credential=KEY/DATE/REGION/SERVICE/aws4_request``)."""
    match = _CREDENTIAL_SCOPE.search(headers.get("Authorization", ""))
    return match.group(1) if match else None


def _check_auth(headers: Mapping[str, str]) -> None:
    # Presence only: signatures are not verified, so dummy credentials work.
    if not headers.get("Authorization", "").startswith(AUTH_SCHEMES):
        raise Rejected(ErrorReply(ErrorCode.MISSING_AUTH, protocol.MSG_MISSING_AUTH))


async def _read_body(request: web.Request, spec: ModelSpec) -> bytes:
    """The whole body, or the body-size ValidationException (also past aiohttp's own read limit)."""
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise body_too_large(spec) from exc
    check_body_size(len(body), spec)
    return body


class _Invoker:
    """Handles ``POST /model/{model_id}/invoke``; owns the per-app quota, fault and seed state."""

    def __init__(self, config: EmulatorConfig, log: RequestLog, clock: Callable[[], float]) -> None:
        self._config = config
        self._log = log
        self._clock = clock
        self._picker = FaultPicker.from_config(config)
        # A separate stream from the fault draws, so asking for seeds never shifts the faults.
        self._seeds = random.Random(f"seeds-{config.seed}")
        self._buckets: dict[ModelName, TokenBucket] = {}
        self._latency = LatencyModel.from_config(config)
        self._canned = (CannedOutputs(config.output_max_pixels, config.png_compress_level, config.canned_noise)
                        if config.canned_output else None)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        exchange = _Exchange(seq=self._log.next_seq(), model_id=_model_id(request), started=self._clock(),
                             signing_region=signing_region(request.headers))
        try:
            response = await self._process(request, exchange)
        except Rejected as rejected:
            exchange.error_type = str(rejected.reply.code)
            response = protocol.error_response(rejected.reply, exchange.request_id, self._config.retry_after_s)
        except asyncio.CancelledError:
            self._log.append(exchange.record(CANCELLED_STATUS, self._clock()))
            raise
        self._log.append(exchange.record(response.status, self._clock()))
        return response

    async def _process(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        _check_auth(request.headers)
        if self._config.deny_access:
            raise Rejected(ErrorReply(ErrorCode.ACCESS_DENIED, protocol.MSG_ACCESS_DENIED))
        spec = resolve_model(exchange.model_id, self._config.catalogue)
        body = await _read_body(request, spec)
        self._take_quota(spec)
        try:
            invoke = await asyncio.to_thread(parse_body, body, spec)
        except Rejected:
            outage = fault_error(self._picker.draw(), exchange.model_id)
            if outage is not None and outage.status >= 500:  # a 503 storm answers every request
                raise Rejected(outage) from None
            raise
        exchange.image_sha256 = invoke.image_sha256
        exchange.image_format = sniff_format(invoke.image)
        exchange.params = dict(invoke.params)
        fault = self._picker.pick(invoke.image_sha256)
        exchange.fault = None if fault is FaultKind.NONE else fault
        error = fault_error(fault, exchange.model_id)
        if error is not None:
            raise Rejected(error)
        return await self._answer(request, exchange, spec, invoke, fault)

    def _take_quota(self, spec: ModelSpec) -> None:
        # One bucket per model, like Bedrock's per-model "requests per minute" quotas.
        if self._config.quota_rpm is None:
            return
        bucket = self._buckets.get(spec.name)
        if bucket is None:
            bucket = TokenBucket.per_minute(self._config.quota_rpm, self._config.quota_burst, self._clock)
            self._buckets[spec.name] = bucket
        if not bucket.try_take():
            raise Rejected(ErrorReply(ErrorCode.THROTTLING, protocol.MSG_THROTTLED))

    async def _answer(self, request: web.Request, exchange: _Exchange, spec: ModelSpec,
                      invoke: InvokeRequest, fault: FaultKind) -> web.StreamResponse:
        started = self._clock()
        if fault is FaultKind.SLOW:
            await asyncio.sleep(self._config.slow_s)
        seed = invoke.seed or self._seeds.randint(1, SEED_MAX)
        try:
            answer = await asyncio.to_thread(self._render, spec, invoke, fault, seed)
        except ImageRejected as exc:
            exchange.input_size = exc.input_size
            raise protocol.validation_error(exc.message) from exc
        exchange.input_size = answer.result.input_size
        if fault is not FaultKind.CONTENT_FILTERED:
            exchange.output_size = answer.result.output_size
            exchange.output_sha256 = hashlib.sha256(answer.result.data).hexdigest()
        exchange.latency_s = delay = self._latency.draw()
        if delay > 0:
            await asyncio.sleep(delay)
        headers = {
            protocol.REQUEST_ID_HEADER: exchange.request_id,
            protocol.INVOCATION_LATENCY_HEADER: str(round((self._clock() - started) * 1000)),
        }
        if fault is FaultKind.HANGUP:
            return _hang_up(request)
        if fault is FaultKind.DISCONNECT:
            return await _send_part_and_abort(request, answer, headers)
        return web.Response(body=answer.body, content_type=answer.content_type, headers=headers)

    def _render(self, spec: ModelSpec, invoke: InvokeRequest, fault: FaultKind, seed: int) -> _Answer:
        """Worker-thread part: upscale, base64 and the JSON body (all CPU-heavy for big images)."""
        if self._canned is not None:
            result, image_b64 = self._canned.upscale(invoke.image, spec, invoke.output_format)
        else:
            result = upscale(invoke.image, spec, invoke.output_format,
                             max_pixels=self._config.output_max_pixels,
                             png_compress_level=self._config.png_compress_level)
            image_b64 = protocol.b64encode(result.data)
        body, content_type = fault_body(fault, seed, image_b64)
        return _Answer(body, content_type, result)


def _hang_up(request: web.Request) -> web.StreamResponse:
    """Close the connection without a response byte (the client sees ConnectionClosedError)."""
    if request.transport is not None:
        request.transport.abort()
    # Writing to an aborted transport is a no-op for aiohttp; the status is only what we record.
    return web.Response(status=200)


async def _send_part_and_abort(request: web.Request, answer: _Answer,
                               headers: Mapping[str, str]) -> web.StreamResponse:
    """Send the headers (with the full Content-Length) and part of the body, then abort."""
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = answer.content_type
    response.content_length = len(answer.body)
    await response.prepare(request)
    await response.write(answer.body[: min(len(answer.body) // 2, _DISCONNECT_MAX_PART)])
    if request.transport is not None:
        request.transport.abort()
    return response

