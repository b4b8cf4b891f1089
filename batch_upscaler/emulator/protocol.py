"""How bedrock-runtime InvokeModel answers look on the wire: error codes, statuses, headers, bodies.

botocore's rest-json parser takes ``Error.Code`` from the ``x-amzn-ErrorType`` header (the text
before ``:``) and ``Error.Message`` from the body's ``message``; the HTTP status decides retries.
So those three things, and nothing else, must match the real service.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import pybase64
from aiohttp import web

ERROR_TYPE_SUFFIX = ":http://internal.amazon.com/coral/com.amazon.bedrock/"
JSON_CONTENT_TYPE = "application/json"
REQUEST_ID_HEADER = "x-amzn-RequestId"
ERROR_TYPE_HEADER = "x-amzn-ErrorType"
INVOCATION_LATENCY_HEADER = "X-Amzn-Bedrock-Invocation-Latency"


class ErrorCode(StrEnum):
    """Exception names the emulator can answer with (the botocore ``Error.Code``)."""

    ACCESS_DENIED = "AccessDeniedException"
    MISSING_AUTH = "MissingAuthenticationTokenException"
    VALIDATION = "ValidationException"
    THROTTLING = "ThrottlingException"
    MODEL_NOT_READY = "ModelNotReadyException"
    MODEL_TIMEOUT = "ModelTimeoutException"
    MODEL_ERROR = "ModelErrorException"
    INTERNAL = "InternalServerException"
    SERVICE_UNAVAILABLE = "ServiceUnavailableException"
    UNKNOWN_OPERATION = "UnknownOperationException"


# Statuses from each shape's error.httpStatusCode in botocore's bedrock-runtime service model.
HTTP_STATUS: Mapping[ErrorCode, int] = {
    ErrorCode.ACCESS_DENIED: 403,
    ErrorCode.MISSING_AUTH: 403,
    ErrorCode.VALIDATION: 400,
    ErrorCode.THROTTLING: 429,
    ErrorCode.MODEL_NOT_READY: 429,
    ErrorCode.MODEL_TIMEOUT: 408,
    ErrorCode.MODEL_ERROR: 424,
    ErrorCode.INTERNAL: 500,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
    ErrorCode.UNKNOWN_OPERATION: 404,
}

MSG_MISSING_AUTH = "Missing Authentication Token"
MSG_ACCESS_DENIED = "You don't have access to the model with the specified model ID."
MSG_THROTTLED = "Too many requests, please wait before trying again."
MSG_INVALID_MODEL = "The provided model identifier is invalid."
MSG_MALFORMED = "Malformed input request, please reformat your input and try again."


@dataclass(frozen=True)
class ErrorReply:
    """One error answer: the exception code, its message and any extra body fields."""

    code: ErrorCode
    message: str
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.code]

    def body(self) -> bytes:
        return json.dumps({"message": self.message, **self.extra}).encode()


class Rejected(Exception):
    """Raised anywhere in request handling to stop and answer with ``reply``."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(f"{reply.code}: {reply.message}")
        self.reply = reply


def validation_error(message: str) -> Rejected:
    return Rejected(ErrorReply(ErrorCode.VALIDATION, message))


def malformed_request(problems: Sequence[str]) -> Rejected:
    """A JSON-schema style rejection; Bedrock concatenates the ``#...`` problems without a separator."""
    joined = "".join(problems)
    return validation_error(f"Malformed input request: {joined}, please reformat your input and try again.")


def on_demand_not_supported(base_id: str) -> Rejected:
    return validation_error(
        f"Invocation of model ID {base_id} with on-demand throughput isn't supported. "
        "Retry your request with the ID or ARN of an inference profile that contains this model."
    )


def new_request_id() -> str:
    return str(uuid.uuid4())


def error_response(reply: ErrorReply, request_id: str, retry_after_s: float | None = None) -> web.Response:
    headers = {
        ERROR_TYPE_HEADER: f"{reply.code}{ERROR_TYPE_SUFFIX}",
        REQUEST_ID_HEADER: request_id,
    }
    if retry_after_s is not None and reply.code is ErrorCode.THROTTLING:
        headers["Retry-After"] = f"{retry_after_s:g}"
    return web.Response(status=reply.status, body=reply.body(), content_type=JSON_CONTENT_TYPE,
                        headers=headers)


def success_body(seed: int, image_b64: str) -> bytes:
    return json.dumps({"seeds": [seed], "finish_reasons": [None], "images": [image_b64]}).encode()


def filtered_body(seed: int, reason: str) -> bytes:
    # A moderated result is still HTTP 200; Bedrock leaves ``images`` out entirely.
    return json.dumps({"seeds": [seed], "finish_reasons": [reason]}).encode()


def b64encode(data: bytes) -> str:
    # pybase64: several times faster than the stdlib on multi-megabyte images.
    return pybase64.b64encode(data).decode("ascii")
