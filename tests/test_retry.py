"""Retry policy decisions and back-off bounds (pure, seeded randomness)."""

from __future__ import annotations

import random

import pytest

from batch_upscaler.retry import Action, AttemptError, Backoff, decide

BACKOFF = Backoff(base_s=2, max_s=60)


def decision(code: str, attempt: int = 1, max_attempts: int = 6, message: str = "", status: int | None = None,
             retry_after: float | None = None, billed: int = 0) -> tuple[Action, bool]:
    d = decide(AttemptError(code, message, status, retry_after), attempt, max_attempts, BACKOFF, random.Random(1),
               billed)
    return d.action, d.throttling


@pytest.mark.parametrize(("code", "expected"), [
    ("ThrottlingException", (Action.RETRY, True)),
    ("ModelNotReadyException", (Action.RETRY, True)),
    ("InternalServerException", (Action.RETRY, False)),
    ("ServiceUnavailableException", (Action.RETRY, False)),
    ("connection_error", (Action.RETRY, False)),
    ("read_timeout", (Action.RETRY, False)),
    ("ValidationException", (Action.FAIL, False)),
    ("content_filtered", (Action.FAIL, False)),
    ("AccessDeniedException", (Action.FATAL, False)),
    ("ResourceNotFoundException", (Action.FATAL, False)),
    ("UnrecognizedClientException", (Action.FATAL, False)),
])
def test_policy_table(code: str, expected: tuple[Action, bool]) -> None:
    assert decision(code) == expected


def test_on_demand_throughput_validation_is_fatal() -> None:
    message = ("Invocation of model ID stability.stable-conservative-upscale-v1:0 with on-demand throughput "
               "isn't supported.")
    assert decision("ValidationException", message=message) == (Action.FATAL, False)


def test_unknown_codes_retry_only_when_server_side() -> None:
    assert decision("Weird", status=502)[0] is Action.RETRY
    assert decision("Weird", status=418)[0] is Action.FAIL


def test_attempt_caps() -> None:
    assert decision("ThrottlingException", attempt=5)[0] is Action.RETRY
    assert decision("ThrottlingException", attempt=6) == (Action.FAIL, True)
    assert decision("read_timeout", attempt=1, billed=1)[0] is Action.RETRY
    assert decision("read_timeout", attempt=2, billed=2)[0] is Action.FAIL  # may be billed: one re-send only
    assert decision("ModelTimeoutException", attempt=2, billed=2)[0] is Action.FAIL
    # Earlier throttles (never billed) do not use up the one re-send of a possibly billed failure.
    assert decision("response_interrupted", attempt=4, billed=1)[0] is Action.RETRY


def test_backoff_is_jittered_exponential_and_capped() -> None:
    rng = random.Random(7)
    for attempt in range(1, 10):
        ceiling = min(60, 2 * 2 ** (attempt - 1))
        delays = [BACKOFF.delay(attempt, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1


def test_retry_after_header_is_honoured() -> None:
    d = decide(AttemptError("ThrottlingException", "", 429, 30.0), 1, 6, BACKOFF, random.Random(0))
    assert d.delay_s == 30.0
