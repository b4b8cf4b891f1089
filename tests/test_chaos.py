"""Chaos: random kill -9s of the real command while the emulator injects faults; then every check.

The small version runs in the default suite; bench/chaos.py runs the large one (≥ 500 images,
≥ 20 kills, 20% faults) with the same driver.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from batch_upscaler.emulator import EmulatorThread, FaultKind
from tests.chaos_driver import ChaosPlan, run_chaos

EmulatorFactory = Callable[..., EmulatorThread]

# 10% of requests fail: mostly retryable faults, a little of everything that may be billed.
SMALL_FAULTS = {FaultKind.THROTTLE: 0.03, FaultKind.SERVICE_UNAVAILABLE: 0.02, FaultKind.INTERNAL_ERROR: 0.02,
                FaultKind.HANGUP: 0.01, FaultKind.MODEL_NOT_READY: 0.01, FaultKind.DISCONNECT: 0.005,
                FaultKind.TRUNCATED: 0.005}


def test_small_chaos(tmp_path: Path, write_manifest: Callable[..., Path],
                     emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(fault_rates=SMALL_FAULTS, seed=11, latency_s=0.03)
    result = run_chaos(ChaosPlan(images=60, kills=5, seed=5), tmp_path, write_manifest, emulator)
    assert result.kills == 5
    assert result.final_exit == 0
    assert result.succeeded == 60
    assert result.outputs_match_emulator == 60
    assert result.temp_files == 0
    assert result.resent_after_success == 0
    assert result.fault_responses > 0  # the faults really happened
    assert min(result.requests_per_image.values()) >= 1
