"""``auto`` starts where earlier runs left off: a remembered rate, the applied quota, or cold (issue 13).

The decision is pure and tested exactly; the memory (checkpoint and rates.json) and the Service
Quotas lookup are tested through real runs against the emulator, which enforces a quota and
publishes it the way Service Quotas does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batch_upscaler.cli import main
from batch_upscaler.manifest import load_settings
from batch_upscaler.quotas import AppliedQuota, QuotaTarget, matches, pick
from batch_upscaler.ratelimit import AdaptiveRateLimiter, StartRate
from batch_upscaler.ratememory import (
    RateMemory,
    Remembered,
    choose_start,
    decide_start,
    leave_rate,
    memory_key,
    unshared_warning,
)
from batch_upscaler.shards import Shard
from tests.conftest import FakeClock, manifest_doc, write_image

DAY = 86_400.0
NOW = 1_800_000_000.0
QUOTA = AppliedQuota(600.0, "Cross-Region InvokeModel requests per minute for Stable Image Conservative Upscale",
                     "L-12345678")


# ---- the decision ------------------------------------------------------------------------------
def test_a_recent_measured_rate_is_trusted() -> None:
    remembered = Remembered(588.0, measured=True, at=NOW - 2 * DAY, job="nightly")
    choice = choose_start(remembered, QUOTA, now=NOW, max_age_s=7 * DAY)
    assert choice.start == StartRate(588.0, trusted=True)
    assert "job nightly" in choice.why and "trusted" in choice.why


@pytest.mark.parametrize(("remembered", "why"), [
    (Remembered(900.0, measured=True, at=NOW - 8 * DAY, job="j"), "older than 7.0 d"),
    (Remembered(900.0, measured=False, at=NOW - 60, job="j"), "not measured"),
])
def test_an_old_or_unmeasured_rate_is_a_guess_capped_by_the_quota(remembered: Remembered, why: str) -> None:
    choice = choose_start(remembered, QUOTA, now=NOW, max_age_s=7 * DAY)
    assert choice.start == StartRate(600.0, trusted=False) and why in choice.why
    assert choose_start(remembered, None, now=NOW, max_age_s=7 * DAY).start == StartRate(900.0, trusted=False)


def test_the_quota_then_cold() -> None:
    assert choose_start(None, QUOTA, now=NOW, max_age_s=DAY).start == StartRate(600.0, trusted=False)
    cold = choose_start(None, None, now=NOW, max_age_s=DAY)
    assert cold.start is None and cold.rpm is None and cold.why.startswith("cold")


def test_shards_start_at_their_share_and_remember_the_whole() -> None:
    remembered = Remembered(600.0, measured=True, at=NOW - 60, job="j")
    assert choose_start(remembered, None, now=NOW, max_age_s=DAY, shards=4).start == StartRate(150.0, trusted=True)
    # A quota known job-wide is split as a fixed rate would be: each shard's share is its ceiling.
    choice = choose_start(None, QUOTA, now=NOW, max_age_s=DAY, shards=3)
    assert choice.start == StartRate(200.0, ceiling=200.0) and "at most 200/min" in choice.why
    both = choose_start(remembered, QUOTA, now=NOW, max_age_s=DAY, shards=4)
    assert both.start == StartRate(150.0, trusted=True, ceiling=150.0)
    assert choose_start(None, QUOTA, now=NOW, max_age_s=DAY).start == StartRate(600.0)  # one job: no ceiling


def test_shards_on_auto_without_a_known_quota_nor_a_share_board_are_warned() -> None:
    remembered = Remembered(600.0, measured=True, at=NOW - 60, job="j")
    cold = choose_start(None, None, now=NOW, max_age_s=DAY, shards=4)
    unboarded = Shard(0, 4, share_every_s=0)
    warning = unshared_warning(cold, unboarded)
    assert warning is not None and "servicequotas:ListServiceQuotas" in warning and "shards.share_every" in warning
    assert unshared_warning(choose_start(remembered, None, now=NOW, max_age_s=DAY, shards=4), unboarded) is not None
    held = choose_start(None, QUOTA, now=NOW, max_age_s=DAY, shards=4)
    assert unshared_warning(held, unboarded) is None  # held to 150
    assert unshared_warning(cold, Shard(0, 4)) is None  # the share board keeps them fair
    assert unshared_warning(cold, Shard(0, 1, share_every_s=0)) is None  # one job alone has nothing to share


@pytest.mark.parametrize(("shards", "asked"), [(1, False), (4, True)])
def test_a_shard_asks_for_the_quota_even_with_a_trusted_rate(tmp_path: Path, write_manifest: Callable[..., Path],
                                                            shards: int, asked: bool) -> None:
    settings = load_settings(write_manifest(limits={"requests_per_minute": "auto"}, state_dir=str(tmp_path / "s")))
    settings = dataclasses.replace(settings, shard=Shard(0, shards))
    calls: list[str] = []

    async def ask() -> AppliedQuota | None:
        calls.append("asked")
        return QUOTA

    choice = asyncio.run(decide_start(settings, (600.0, True, NOW - 60), ask, NOW))
    assert bool(calls) is asked
    assert choice.start is not None and choice.start.trusted
    assert choice.start.ceiling == (150.0 if asked else None)


def test_leave_rate_stores_the_job_wide_rate(tmp_path: Path, write_manifest: Callable[..., Path]) -> None:
    settings = load_settings(write_manifest(limits={"requests_per_minute": "auto"}, state_dir=str(tmp_path / "s")))
    settings = dataclasses.replace(settings, shard=Shard(1, 4))
    limiter = AdaptiveRateLimiter(FakeClock(), start=StartRate(150.0, trusted=True))
    assert leave_rate(settings, limiter, None, requests=0, now=NOW) is None  # sent nothing: says nothing
    rate = leave_rate(settings, limiter, None, requests=10, now=NOW)
    assert rate is not None and rate.remembered_rpm == pytest.approx(600.0) and rate.measured is False
    recalled = RateMemory(settings.state_dir).recall(memory_key(settings))
    assert recalled == Remembered(pytest.approx(600.0), False, NOW, "job")  # type: ignore[arg-type]


# ---- the memory ----------------------------------------------------------------------------------
def test_an_unmeasured_rate_never_replaces_a_measured_one(tmp_path: Path) -> None:
    memory = RateMemory(tmp_path)
    assert memory.recall("k") is None
    memory.remember("k", Remembered(588.0, True, NOW, "a"))
    memory.remember("k", Remembered(120.0, False, NOW + 60, "b"))  # a 3-image run never met the quota
    assert memory.recall("k") == Remembered(588.0, True, NOW, "a")
    memory.remember("k", Remembered(300.0, True, NOW + 120, "b"))  # the quota was measured lower: replaced
    assert memory.recall("k") == Remembered(300.0, True, NOW + 120, "b")
    memory.remember("other", Remembered(50.0, False, NOW, "c"))
    assert memory.recall("k") is not None and memory.recall("other") is not None


@pytest.mark.parametrize("content", ["", "not json", "[1, 2]", '{"k": {"rpm": "fast"}}', '{"k": 3}'])
def test_a_damaged_rates_file_is_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / "rates.json").write_text(content)
    memory = RateMemory(tmp_path)
    assert memory.recall("k") is None
    memory.remember("k", Remembered(10.0, True, NOW, "a"))
    assert memory.recall("k") == Remembered(10.0, True, NOW, "a")


# ---- Service Quotas names --------------------------------------------------------------------------
def test_quota_names_match_the_model_and_the_kind(write_manifest: Callable[..., Path]) -> None:
    settings = QuotaTarget.of(load_settings(write_manifest()))  # conservative via the us. profile: cross-region
    assert settings == QuotaTarget("conservative", cross_region=True)
    assert matches(QUOTA.name, settings)
    assert matches("Cross-region InvokeModel  requests per minute for Stability AI Stable Image Conservative "
                   "Upscale", settings)
    assert not matches("On-demand InvokeModel requests per minute for Stable Image Conservative Upscale", settings)
    assert not matches("Cross-Region InvokeModel requests per minute for Stable Image Creative Upscale", settings)
    assert not matches("Cross-Region InvokeModel tokens per minute for Stable Image Conservative Upscale", settings)
    listed = [{"QuotaName": "Cross-Region InvokeModel requests per minute for Stable Image Fast Upscale",
               "QuotaCode": "L-AAAAAAAA", "Value": 50.0},
              {"QuotaName": QUOTA.name, "QuotaCode": "L-BBBBBBBB", "Value": 250.0}]
    assert pick(listed, settings) == AppliedQuota(250.0, QUOTA.name, "L-BBBBBBBB")
    by_code = dataclasses.replace(settings, code="L-AAAAAAAA")
    assert pick(listed, by_code) == AppliedQuota(50.0, str(listed[0]["QuotaName"]), "L-AAAAAAAA")


# ---- through real runs -----------------------------------------------------------------------------
def _photos(folder: Path, first: int, count: int) -> None:
    for n in range(first, first + count):
        write_image(folder / f"p{n:03d}.png", 90 + n % 40, 80 + n // 40)


def _runs(state: Path, job: str = "job") -> list[dict[str, Any]]:
    with sqlite3.connect(state / f"{job}.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM runs ORDER BY id")]


def _start_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The run's one "auto starts" line (stderr: the CLI configures its own logging)."""
    lines = [line.split(" INFO ", 1)[1] for line in capsys.readouterr().err.splitlines()
             if " INFO rate: auto starts" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_runs_start_from_the_quota_then_from_what_the_last_run_measured(
        tmp_path: Path, write_manifest: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    _photos(tmp_path / "photos", 0, 40)
    auto = {"requests_per_minute": "auto", "concurrency": 4}
    manifest = write_manifest(limits=auto, emulator={"quota_rpm": 600})
    assert main(["run", str(manifest)]) == 0
    assert _start_line(capsys).startswith("rate: auto starts at 600/min: the applied quota 600/min (Cross-Region")
    first = _runs(tmp_path / ".batch-upscaler")[-1]
    # Whether 40 images met the quota depends on this machine's speed; both ways are remembered.
    assert first["start_rpm"] == 600.0 and first["rate_measured"] in (0, 1)
    remembered = first["remembered_rpm"]
    assert 100 < remembered <= 600 * 1.02

    _photos(tmp_path / "photos", 40, 10)  # the next night: a few new images
    assert main(["plan", str(manifest)]) == 0
    plan = capsys.readouterr().out
    assert f"auto starts at {remembered:.4g}/min: the rate job job ended at" in plan and "10 requests/min" not in plan
    assert main(["run", str(manifest)]) == 0
    line = _start_line(capsys)
    assert line.startswith(f"rate: auto starts at {remembered:.0f}/min: the rate job job ended at")
    assert line.endswith("(measured: trusted)" if first["rate_measured"] else "(not measured: a guess, checked)")
    assert _runs(tmp_path / ".batch-upscaler")[-1]["start_rpm"] == pytest.approx(remembered)
    report = json.loads((tmp_path / ".batch-upscaler/reports/job/report.json").read_text())
    assert report["rate"]["start_rpm"] == round(remembered, 1) and report["rate"]["remembered_rpm"] > 0

    # Another job in the same state folder (its own files and outputs) shares what job "job" learned.
    _photos(tmp_path / "other", 0, 5)
    other = write_manifest(manifest_doc(name="other", sources=["other"], output={"dir": "out2"}, limits=auto,
                                        emulator={"quota_rpm": 600}), name="other.yaml")
    assert main(["run", str(other)]) == 0
    assert "the rate job job ended at" in _start_line(capsys)
    rates = json.loads((tmp_path / ".batch-upscaler" / "rates.json").read_text())
    assert list(rates) == ["emulator|-|us-east-1|us.stability.stable-conservative-upscale-v1:0"]


def test_a_denied_quota_lookup_starts_cold_and_costs_nothing(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: Callable[..., Any],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    emulator = emulator_factory(quota_rpm=600, quotas_denied=True)
    _photos(tmp_path / "photos", 0, 6)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url,
                                                          "quotas_endpoint_url": emulator.endpoint_url},
                              limits={"requests_per_minute": "auto"})
    assert main(["run", "-v", str(manifest)]) == 0
    err = capsys.readouterr().err
    denied = [line for line in err.splitlines() if "Service Quotas: AccessDeniedException" in line]
    assert len(denied) == 1 and " DEBUG " in denied[0], denied
    assert " INFO rate: auto starts cold" in err
    records = emulator.records()  # the bill: invocations only (a throttled one is never billed)
    assert all(r.model_id.endswith("conservative-upscale-v1:0") for r in records)
    assert sorted(r.status for r in records if r.status != 429) == [200] * 6
