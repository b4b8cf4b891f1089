"""Retry policy as pure decisions: given what an attempt ended with, retry, fail the item, or stop the run.

The runner owns retries (botocore's are switched off) so every attempt the server sees is
counted in the checkpoint and no possibly-billed request is re-sent silently. The policy per error
is the table :data:`POLICIES` (documented in docs/architecture.md):

* throttling (429 ThrottlingException / ModelNotReadyException): retry, and slow the rate limiter;
* transient server errors (500, 503) and connection failures: retry with jittered back-off;
* possibly billed or model-side failures (read time-out, 408, 424, a malformed 200): retry once;
* the item's own fault (400 ValidationException, content filtered): fail the item, no retry;
* nothing can succeed (403 AccessDenied, 404, bad credentials, on-demand-throughput 400): fatal.

Errors where nothing ran (connection refused or reset before an answer, 503, other 5xx) are the
*service's* state, not the image's (:func:`is_service_state`): batch_upscaler.outage pauses the
pool on a run of them, and a plain run retries items an older run failed with them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Action(StrEnum):
    RETRY = "retry"
    FAIL = "fail"  # this item fails; the run goes on
    FATAL = "fatal"  # the run stops (exit 3)


@dataclass(frozen=True)
class AttemptError:
    """How one attempt failed, as data; ``code`` is botocore's error code or one of ours."""

    code: str
    message: str
    status: int | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True)
class ErrorPolicy:
    action: Action
    throttling: bool = False
    # The request may already have run (and been billed): such failures are capped per image
    # (limits.possibly_billed_resends, across runs), however many attempts max_attempts would allow.
    possibly_billed: bool = False


_RETRY = ErrorPolicy(Action.RETRY)
_RETRY_ONCE = ErrorPolicy(Action.RETRY, possibly_billed=True)
_THROTTLED = ErrorPolicy(Action.RETRY, throttling=True)
_FAIL = ErrorPolicy(Action.FAIL)
_FATAL = ErrorPolicy(Action.FATAL)

POLICIES: Mapping[str, ErrorPolicy] = {
    "ThrottlingException": _THROTTLED,
    "ModelNotReadyException": _THROTTLED,
    "InternalServerException": _RETRY,
    "ServiceUnavailableException": _RETRY,
    "connection_error": _RETRY,
    "read_timeout": _RETRY_ONCE,  # the request may already be running (and billed) server-side
    "ModelTimeoutException": _RETRY_ONCE,
    "ModelErrorException": _RETRY_ONCE,
    "bad_response": _RETRY_ONCE,
    "response_interrupted": _RETRY_ONCE,  # the 200 arrived, its body did not
    "ValidationException": _FAIL,
    "content_filtered": _FAIL,
    "ServiceQuotaExceededException": _FATAL,
    "AccessDeniedException": _FATAL,
    "ResourceNotFoundException": _FATAL,
    "UnrecognizedClientException": _FATAL,
    "InvalidSignatureException": _FATAL,
    "ExpiredTokenException": _FATAL,
    "MissingAuthenticationTokenException": _FATAL,
    "no_credentials": _FATAL,
}
# A ValidationException with one of these messages is about the model id, not the image.
_FATAL_VALIDATION = ("on-demand throughput", "model identifier is invalid")


# Codes that say the service was unreachable or broken, not that the image is: never a fact about the image.
SERVICE_STATE_CODES = frozenset({"connection_error", "ServiceUnavailableException", "InternalServerException"})


def is_service_state(error: AttemptError) -> bool:
    """Nothing ran for this attempt because the service was down (counts toward an outage)."""
    return error.code in SERVICE_STATE_CODES or (error.status is not None and error.status >= 500
                                                  and error.code not in POLICIES)


def policy_for(error: AttemptError) -> ErrorPolicy:
    if error.code == "ValidationException" and any(m in error.message for m in _FATAL_VALIDATION):
        return _FATAL
    policy = POLICIES.get(error.code)
    if policy is not None:
        return policy
    # Unknown codes: server-side (5xx) is worth another try, anything else is the request's fault.
    return _RETRY if error.status is not None and error.status >= 500 else _FAIL


@dataclass(frozen=True)
class Backoff:
    base_s: float
    max_s: float

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Equal-jitter exponential back-off after the ``attempt``-th failure (1-based)."""
        ceiling = min(self.max_s, self.base_s * 2.0 ** (attempt - 1))
        return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


@dataclass(frozen=True)
class Decision:
    action: Action
    delay_s: float = 0.0
    throttling: bool = False


def possibly_billed(error: AttemptError) -> bool:
    return policy_for(error).possibly_billed


def decide(error: AttemptError, attempt: int, max_attempts: int, backoff: Backoff,
           rng: random.Random, billed_failures: int = 0, *, billed_cap: int = 2,
           retry_after_max_s: float = 60.0, may_fail: bool = True) -> Decision:
    """What to do after ``attempt`` (1-based) ended with ``error``.

    ``billed_failures`` counts this image's possibly-billed attempts so far (earlier runs' unanswered
    ones and this one included); ``billed_cap`` is how many of them an image may cost. A server's
    Retry-After is honoured up to ``retry_after_max_s`` (an unbounded one would stall a drain).
    ``may_fail`` False defers the attempt cap: the service, not the image, is failing (see outage).
    """
    policy = policy_for(error)
    billed_out = policy.possibly_billed and billed_failures >= billed_cap
    exhausted = billed_out or (may_fail and attempt >= max_attempts)
    if policy.action is Action.RETRY and exhausted:
        return Decision(Action.FAIL, throttling=policy.throttling)
    if policy.action is not Action.RETRY:
        return Decision(policy.action, throttling=policy.throttling)
    delay = max(backoff.delay(attempt, rng), min(error.retry_after_s or 0.0, retry_after_max_s))
    return Decision(Action.RETRY, delay, policy.throttling)
