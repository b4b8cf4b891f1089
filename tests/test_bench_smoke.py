"""Each benchmark scenario's smoke version runs and reports sane figures (the full runs are not tests).

The smoke runs are started together as separate ``python -m bench <scenario> --smoke``
processes (most of their time is the emulator's latency, so they overlap well), each writing its
JSON into its own temporary folder; each test then checks one scenario's result.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import REPO

SCENARIOS = ("known", "auto", "cold", "remembered", "baselines", "cost", "scale", "s3", "shards", "merge")
TIMEOUT_S = 110


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("bench")
    processes = {name: subprocess.Popen([sys.executable, "-m", "bench", name, "--smoke", "--out", str(root / name)],
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for name in SCENARIOS}
    outputs: dict[str, str] = {}
    try:
        for name, process in processes.items():
            outputs[name], _ = process.communicate(timeout=TIMEOUT_S)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    # Each scenario's outcome is checked by its own test, so one broken scenario fails one test.
    yield {name: {"returncode": processes[name].returncode, "stdout": outputs[name],
                  "path": root / name / f"{name}-smoke.json"} for name in SCENARIOS}


def _result(outcomes: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    outcome = outcomes[name]
    assert outcome["returncode"] == 0 and outcome["path"].exists(), f"{name} smoke failed:\n{outcome['stdout'][-3000:]}"
    return dict(json.loads(outcome["path"].read_text())) | {"stdout": outcome["stdout"]}


def _rows(result: dict[str, Any], columns: set[str]) -> list[dict[str, Any]]:
    assert result["smoke"] is True and result["rows"], result
    for row in result["rows"]:
        assert columns <= set(row), f"missing {columns - set(row)} in {row}"
    assert all(check["figure"] for check in result["checks"])
    assert "| " in result["stdout"]  # the table was printed
    return list(result["rows"])


THROUGHPUT_COLUMNS = {"variant", "images", "succeeded", "failed", "not_done", "requests", "throttled",
                      "throttled_pct", "elapsed_s", "goodput_rpm", "ceiling_rpm", "ratio"}


@pytest.mark.parametrize("scenario", ["known", "auto"])
def test_runner_throughput_smoke(smoke_results: dict[str, dict[str, Any]], scenario: str) -> None:
    (row,) = _rows(_result(smoke_results, scenario), THROUGHPUT_COLUMNS)
    assert row["failed"] == 0 and row["not_done"] == 0 and row["succeeded"] == row["images"]
    assert row["requests"] >= row["images"] and row["ceiling_rpm"] == 600
    assert 0 < row["goodput_rpm"] <= 2 * row["ceiling_rpm"] and row["ratio"] > 0


def test_baselines_smoke(smoke_results: dict[str, dict[str, Any]]) -> None:
    rows = _rows(_result(smoke_results, "baselines"), THROUGHPUT_COLUMNS)
    assert [row["variant"][:3] for row in rows[:3]] == ["(a)", "(b)", "(c)"]
    assert [row["variant"] for row in rows[3:]] == ["runner rpm=600", "runner rpm=auto"]
    for row in rows:
        assert row["succeeded"] + row["failed"] + row["not_done"] == row["images"]
        assert row["requests"] >= row["succeeded"] and row["goodput_rpm"] >= 0
    assert all(row["failed"] == 0 and row["succeeded"] > 0 for row in rows[3:])


def test_cold_smoke(smoke_results: dict[str, dict[str, Any]]) -> None:
    runner, baseline, known = _rows(_result(smoke_results, "cold"), THROUGHPUT_COLUMNS | {"vs_baseline"})
    assert "auto" in runner["variant"] and "adaptive" in baseline["variant"] and "known" in known["variant"]
    for row in (runner, baseline, known):
        assert row["succeeded"] == row["images"] and row["failed"] == 0 and row["ceiling_rpm"] == 600
    assert baseline["vs_baseline"] == 1.0 and runner["vs_baseline"] > 0


def test_remembered_smoke(smoke_results: dict[str, dict[str, Any]]) -> None:
    rows = _rows(_result(smoke_results, "remembered"), THROUGHPUT_COLUMNS | {"start_rpm", "trusted", "remember_rpm"})
    assert [row["variant"][:2] for row in rows] == ["1.", "2.", "3.", "4."]
    assert all(row["succeeded"] == row["images"] and row["failed"] == 0 for row in rows)
    # The runner itself found each start: job A's checkpoint, then rates.json for job B, then Service Quotas.
    assert rows[0]["start_rpm"] is None and rows[1]["start_rpm"] == pytest.approx(rows[0]["remember_rpm"])
    # (rates.json keeps job A's night 1 rate if night 1 measured the quota and night 2 did not)
    assert rows[2]["start_rpm"] in (pytest.approx(rows[0]["remember_rpm"]), pytest.approx(rows[1]["remember_rpm"]))
    assert rows[3]["start_rpm"] == 600 and rows[3]["trusted"] is False


def test_cost_smoke(smoke_results: dict[str, dict[str, Any]]) -> None:
    columns = {"variant", "concurrency", "images", "failed", "output_mb", "runner_cpu_ms", "floor_cpu_ms", "ratio",
               "user_ratio", "peak_rss_mb"}
    rows = _rows(_result(smoke_results, "cost"), columns)
    assert [row["variant"] for row in rows] == ["buffered c=8 photo", "streamed c=8 photo", "buffered c=32 photo",
                                                "streamed c=32 photo", "buffered c=32 noise", "streamed c=32 noise"]
    for row in rows:
        assert row["failed"] == 0 and row["succeeded"] == row["images"] > 0
        # the ~9.7 MP PNG really came back: the upscale of a photo, or noise (~29 MB)
        assert row["output_mb"] > (25 if row["output"] == "noise" else 5)
        assert row["runner_cpu_ms"] > 0 and row["floor_cpu_ms"] > 0 and 30 < row["peak_rss_mb"] < 4000


def test_scale_smoke(smoke_results: dict[str, dict[str, Any]]) -> None:
    scan, resume, some = _rows(_result(smoke_results, "scale"), {"phase", "items", "pending", "knows_s", "elapsed_s",
                                                        "requests", "peak_rss_mb"})
    assert scan["items"] == scan["pending"] == 500 and scan["files_per_s"] > 0
    assert resume["items"] == 500 and resume["pending"] == 0 and resume["requests"] == 0
    assert resume["knows_s"] is not None and 0 <= resume["knows_s"] < 10
    assert some["requests"] == 50 and some["pending"] == 0 and some["failed"] == 0
    assert 0 < some["first_request_s"] < 10


def test_s3_smoke(smoke_results: dict[str, dict[str, Any]]) -> None:
    result = _result(smoke_results, "s3")
    rows = _rows(result, {"phase", "objects", "knows_s", "s3_total", "GetObject", "HeadObject", "PutObject",
                          "ListObjectsV2", "s3_calls", "invoke", "peak_rss_mb"})
    _, small, _, plan, first, again, lost_plan, lost = rows
    assert plan["files_found"] == plan["new"] == 200 and small["files_found"] == 20  # markers, non-images ignored
    assert plan["GetObject ranged"] == 200 and plan["invoke"] == small["invoke"] == 0
    assert first["invoke"] == 200 - plan["deduplicated"] and first["succeeded"] == 200 and first["failed"] == 0
    assert first["s3_calls"] == first["report_s3_requests"] > 0
    assert again["invoke"] == 0 and again["HeadObject"] == 0 and again["GetObject"] <= 1
    assert lost_plan["proven_done"] == 200 and lost_plan["requests"] == 0
    assert lost["invoke"] == 0 and lost["HeadObject"] == 200 and lost["succeeded"] == 200
    assert all(check["met"] for check in result["checks"]), result["checks"]


def test_shards_smoke(smoke_results: dict[str, dict[str, Any]]) -> None:
    rows = _rows(_result(smoke_results, "shards"), {"variant", "requests", "succeeded", "throttled_pct",
                                                    "goodput_rpm", "ratio", "shares", "paid_twice"})
    assert len(rows) == 3
    for row in rows:
        # 24 images, 4 real shard processes: every image paid once, every request traced to its shard
        assert row["succeeded"] == 24 and row["paid_twice"] == 0 and row["unattributed"] == 0
        assert row["exit_codes"] == "0 0 0 0" and len(row["shares"].split()) == 4
        assert row["goodput_rpm"] > 0 and row["window_s"] >= 0


def test_merge_smoke(smoke_results: dict[str, dict[str, Any]]) -> None:
    result = _result(smoke_results, "merge")
    baseline, full = _rows(result, {"shards", "items", "merged_items", "exit_code", "elapsed_s", "peak_rss_mb"})
    assert (baseline["shards"], full["shards"]) == (2, 8)
    assert baseline["merged_items"] == baseline["items"] == 600 and full["merged_items"] == full["items"] == 2400
    assert full["exit_code"] == baseline["exit_code"] == 1  # the template's failed item is in every shard
    assert 30 < full["peak_rss_mb"] < 4000 and full["elapsed_s"] > 0
