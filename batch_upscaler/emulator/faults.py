"""What can go wrong with a request, and the deterministic choice of which fault a request gets."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING

import pybase64

from batch_upscaler.emulator.protocol import (
    MSG_ACCESS_DENIED,
    MSG_MALFORMED,
    MSG_THROTTLED,
    ErrorCode,
    ErrorReply,
    filtered_body,
    success_body,
)

if TYPE_CHECKING:
    from batch_upscaler.emulator.settings import EmulatorConfig


class FaultKind(StrEnum):
    """A way a request can fail; NONE is a normal answer."""

    NONE = "none"
    THROTTLE = "throttle"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INTERNAL_ERROR = "internal_error"
    MODEL_TIMEOUT = "model_timeout"
    MODEL_ERROR = "model_error"
    MODEL_NOT_READY = "model_not_ready"
    VALIDATION = "validation"
    ACCESS_DENIED = "access_denied"
    CONTENT_FILTERED = "content_filtered"  # 200 without images
    DISCONNECT = "disconnect"  # headers + part of the body, then the connection is aborted
    HANGUP = "hangup"  # connection aborted before any response byte
    SLOW = "slow"  # stall EmulatorConfig.slow_s, then answer normally
    TRUNCATED = "truncated"  # 200 whose JSON body is cut in half
    NON_JSON = "non_json"  # 200 with an HTML body
    BAD_BASE64 = "bad_base64"  # 200 whose image is not base64
    CORRUPT_IMAGE = "corrupt_image"  # 200, valid JSON and base64, but the image bytes are damaged


_ERRORS: Mapping[FaultKind, tuple[ErrorCode, str]] = {
    FaultKind.THROTTLE: (ErrorCode.THROTTLING, MSG_THROTTLED),
    FaultKind.SERVICE_UNAVAILABLE: (
        ErrorCode.SERVICE_UNAVAILABLE,
        "Bedrock is unable to process your request.",
    ),
    FaultKind.INTERNAL_ERROR: (
        ErrorCode.INTERNAL,
        "The system encountered an unexpected error during processing. Try your request again.",
    ),
    FaultKind.MODEL_TIMEOUT: (
        ErrorCode.MODEL_TIMEOUT,
        "Model has timed out in processing the request. Try your request again.",
    ),
    FaultKind.MODEL_ERROR: (ErrorCode.MODEL_ERROR, "Received server error (500) from model. See logs."),
    FaultKind.MODEL_NOT_READY: (
        ErrorCode.MODEL_NOT_READY,
        "Model is not ready for inference. Wait and try your request again.",
    ),
    FaultKind.VALIDATION: (ErrorCode.VALIDATION, MSG_MALFORMED),
    FaultKind.ACCESS_DENIED: (ErrorCode.ACCESS_DENIED, MSG_ACCESS_DENIED),
}

FILTER_REASON = "Filter reason: output image"
BAD_BASE64_IMAGE = "!!not base64!!"
HTML_BODY = b"<html><body><h1>502 Bad Gateway</h1><p>upstream answered garbage</p></body></html>"


def image_key(image: bytes) -> str:
    """The key of ``faults_by_image``: sha256 hex of the decoded image bytes."""
    return hashlib.sha256(image).hexdigest()


def fault_error(kind: FaultKind, resource_name: str) -> ErrorReply | None:
    """The error answer for an error-shaped fault, or None when the fault answers HTTP 200 (or hangs up)."""
    entry = _ERRORS.get(kind)
    if entry is None:
        return None
    code, message = entry
    extra: Mapping[str, object] = {}
    if kind is FaultKind.MODEL_ERROR:
        extra = {"originalStatusCode": 500, "resourceName": resource_name}
    return ErrorReply(code, message, extra)


def fault_body(kind: FaultKind, seed: int, image_b64: str) -> tuple[bytes, str]:
    """The (body, content type) of a 200 answer, spoiled the way ``kind`` says."""
    if kind is FaultKind.CONTENT_FILTERED:
        return filtered_body(seed, FILTER_REASON), "application/json"
    if kind is FaultKind.NON_JSON:
        return HTML_BODY, "text/html"
    if kind is FaultKind.BAD_BASE64:
        return success_body(seed, BAD_BASE64_IMAGE), "application/json"
    if kind is FaultKind.CORRUPT_IMAGE:
        return success_body(seed, _damaged(image_b64)), "application/json"
    body = success_body(seed, image_b64)
    if kind is FaultKind.TRUNCATED:
        return body[: len(body) // 2], "application/json"
    return body, "application/json"


def _damaged(image_b64: str) -> str:
    """The image with one byte in its middle flipped: every layer above it (JSON, base64) is fine."""
    data = bytearray(pybase64.b64decode(image_b64))
    data[len(data) // 2] ^= 0xFF
    return pybase64.b64encode(bytes(data)).decode("ascii")


class FaultPicker:
    """Decides each request's fault: the image's script first, then independent seeded draws.

    ``faults_by_image[sha]`` is consumed one entry per request carrying that image; a scripted
    NONE means "answer normally" and suppresses the random draws for that request, so scripts
    stay exact even when ``fault_rates`` is set. Not thread-safe: the server calls it from its
    event loop only.
    """

    def __init__(self, faults_by_image: Mapping[str, tuple[FaultKind, ...]],
                 fault_rates: Mapping[FaultKind, float], seed: int,
                 window: tuple[float, float] | None = None, now: Callable[[], float] = time.monotonic) -> None:
        self._scripts = {key.lower(): tuple(kinds) for key, kinds in faults_by_image.items()}
        # fault_rates apply only from window[0] to window[1] seconds after start ("503s for a minute").
        self._window = window
        self._now = now
        self._started = now()
        # Draw in enum order, not mapping order, so equal configs give equal sequences.
        self._rates = [(kind, fault_rates[kind]) for kind in FaultKind if fault_rates.get(kind)]
        self._rng = random.Random(seed)
        self._seen: dict[str, int] = {}

    @classmethod
    def from_config(cls, config: EmulatorConfig) -> FaultPicker:
        return cls(config.faults_by_image, config.fault_rates, config.seed, config.fault_window)

    def pick(self, image_sha256: str) -> FaultKind:
        nth = self._seen.get(image_sha256, 0)
        self._seen[image_sha256] = nth + 1
        script = self._scripts.get(image_sha256, ())
        if nth < len(script):
            return script[nth]
        return self.draw()

    def draw(self) -> FaultKind:
        """The random part alone: also for a request whose body never parsed (a service that is down
        answers 503 before it looks at the body, so an outage reaches malformed requests too)."""
        if self._window is not None and not self._window[0] <= self._now() - self._started < self._window[1]:
            return FaultKind.NONE
        for kind, rate in self._rates:
            # One draw per configured fault keeps the probabilities independent.
            if self._rng.random() < rate:
                return kind
        return FaultKind.NONE
