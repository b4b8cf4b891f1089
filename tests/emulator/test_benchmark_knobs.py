"""The knobs benchmarks use: lognormal latency, canned outputs, the log fields, and their CLI flags."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from batch_upscaler.catalogue import BUILTIN, ModelName
from batch_upscaler.emulator import EmulatorConfig, RequestLog
from batch_upscaler.emulator.__main__ import parse_config
from batch_upscaler.emulator.latency import LatencyModel
from batch_upscaler.emulator.upscale import CannedOutputs, ImageRejected

from .helpers import FAST, body, decoded, emulated, invoke_json, make_image

CONSERVATIVE_SPEC = BUILTIN[ModelName.CONSERVATIVE]
FAST_SPEC = BUILTIN[ModelName.FAST]


def test_fixed_latency_is_the_default() -> None:
    assert [LatencyModel(0.25).draw() for _ in range(3)] == [0.25, 0.25, 0.25]
    assert LatencyModel().draw() == 0.0


def test_lognormal_latency_is_seeded_and_has_the_asked_median_and_spread() -> None:
    draws = [LatencyModel(median_s=0.5, sigma=0.3, seed=7).draw() for _ in range(2)]
    assert draws[0] == draws[1]  # a fresh model with the same seed starts the same sequence
    model = LatencyModel(median_s=0.5, sigma=0.3, seed=7)
    sample = [model.draw() for _ in range(4000)]
    assert abs(statistics.median(sample) / 0.5 - 1) < 0.05
    assert abs(statistics.stdev(math.log(x) for x in sample) - 0.3) < 0.02
    other = LatencyModel(median_s=0.5, sigma=0.3, seed=8)
    assert [other.draw() for _ in range(5)] != sample[:5]


def test_lognormal_without_spread_is_the_median() -> None:
    model = LatencyModel.from_config(EmulatorConfig(latency_median_s=0.2))
    assert {model.draw() for _ in range(5)} == {0.2}


@pytest.mark.parametrize("kwargs", [
    {"latency_median_s": 0}, {"latency_median_s": -1}, {"latency_median_s": math.inf},
    {"latency_sigma": 0.3}, {"latency_median_s": 0.5, "latency_sigma": -0.1},
    {"latency_median_s": 0.5, "latency_sigma": 6}, {"latency_median_s": 0.5, "latency_sigma": math.nan},
    {"latency_s": 0.1, "latency_median_s": 0.5}, {"latency_s": math.nan},
])
def test_invalid_latency_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="invalid EmulatorConfig"):
        EmulatorConfig(**kwargs)


def test_canned_outputs_render_once_per_size_and_format() -> None:
    canned = CannedOutputs(max_pixels=128 * 128)
    first, first_b64 = canned.upscale(make_image(64, 64, color=(1, 2, 3)), FAST_SPEC, "png")
    second, second_b64 = canned.upscale(make_image(64, 64, "JPEG", color=(250, 0, 0)), FAST_SPEC, "png")
    assert second.data is first.data and second_b64 is first_b64  # the input's content is ignored
    assert (second.input_size, second.output_size) == ((64, 64), (128, 128))
    wide, _ = canned.upscale(make_image(96, 48), FAST_SPEC, "png")
    as_jpeg, _ = canned.upscale(make_image(64, 64), FAST_SPEC, "jpeg")
    assert wide.data is not first.data and as_jpeg.data is not first.data
    assert wide.output_size == (181, 90) and as_jpeg.output_format == "jpeg"


def test_canned_noise_is_as_large_as_a_png_gets() -> None:
    canned = CannedOutputs(max_pixels=200 * 200, noise=True)
    noisy, _ = canned.upscale(make_image(64, 64), FAST_SPEC, "png")
    again, _ = canned.upscale(make_image(64, 64, color=(9, 9, 9)), FAST_SPEC, "png")
    assert again.data is noisy.data and noisy.output_size == (200, 200)
    assert len(noisy.data) > 200 * 200 * 3  # noise does not compress
    plain, _ = CannedOutputs(max_pixels=200 * 200).upscale(make_image(64, 64), FAST_SPEC, "png")
    assert len(plain.data) < len(noisy.data) // 10
    assert parse_config(["--canned-output", "--canned-noise"]).canned_noise is True


def test_canned_noise_needs_canned_output(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--canned-noise"])
    assert "canned_noise needs canned_output" in capsys.readouterr().err


def test_canned_outputs_still_check_the_limits() -> None:
    with pytest.raises(ImageRejected, match="too_small"):
        CannedOutputs().upscale(make_image(40, 40), CONSERVATIVE_SPEC, "png")


@pytest.mark.asyncio
async def test_server_answers_canned_images_and_logs_what_accounting_needs(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    async with emulated(canned_output=True, latency_median_s=0.01, latency_sigma=0.5, seed=3,
                        request_log_path=path) as (_, client):
        red = await invoke_json(client, body(make_image(64, 64, color=(255, 0, 0))), FAST)
        blue = await invoke_json(client, body(make_image(64, 64, color=(0, 0, 255))), FAST)
    assert red["images"] == blue["images"] and decoded(red).size == (256, 256)
    records = RequestLog.read_file(path)
    expected = LatencyModel(median_s=0.01, sigma=0.5, seed=3)
    assert [r.latency_s for r in records] == [expected.draw(), expected.draw()]
    for record in records:
        assert record.status == 200 and record.image_sha256 is not None
        assert record.received_at is not None and record.received_at <= record.at
        assert record.duration_s >= (record.latency_s or 0)


def test_cli_flags_reach_the_config(tmp_path: Path) -> None:
    config = parse_config(["--latency-median", "0.5", "--latency-sigma", "0.3", "--quota-rpm", "600",
                           "--quota-burst", "10", "--canned-output", "--seed", "4", "--png-compress-level", "0",
                           "--log", str(tmp_path / "l.jsonl")])
    assert (config.latency_median_s, config.latency_sigma, config.quota_rpm, config.quota_burst) == (0.5, 0.3, 600, 10)
    assert (config.canned_output, config.seed, config.png_compress_level, config.host) == (True, 4, 0, "127.0.0.1")
    assert config.request_log_path == tmp_path / "l.jsonl"
    defaults = parse_config([])
    assert (defaults.latency_median_s, defaults.canned_output, defaults.quota_burst) == (None, False, 1)


def test_cli_rejects_an_invalid_combination(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_config(["--latency-sigma", "0.3"])
    assert caught.value.code == 2
    assert "latency_sigma needs latency_median_s" in capsys.readouterr().err
