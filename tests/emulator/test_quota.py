"""Token bucket, driven by a fake clock: no sleeping."""

from __future__ import annotations

import pytest

from batch_upscaler.emulator.quota import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_starts_full_then_throttles() -> None:
    clock = FakeClock()
    bucket = TokenBucket.per_minute(60, burst=2, clock=clock)
    assert [bucket.try_take() for _ in range(3)] == [True, True, False]


def test_refills_at_rpm_over_sixty_per_second() -> None:
    clock = FakeClock()
    bucket = TokenBucket.per_minute(30, burst=1, clock=clock)  # one token per 2 s
    assert bucket.try_take()
    clock.now += 1.9
    assert not bucket.try_take()
    clock.now += 0.1
    assert bucket.try_take()
    assert not bucket.try_take()


def test_never_exceeds_capacity_and_ignores_backwards_clock() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=10, capacity=3, clock=clock)
    clock.now += 3600
    assert bucket.tokens == 3
    clock.now -= 100  # a clock stepping back must not drain or overfill
    assert bucket.tokens == 3
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize(("rate", "capacity"), [(0, 1), (-1, 1), (1, 0)])
def test_rejects_nonsense(rate: float, capacity: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, capacity)
