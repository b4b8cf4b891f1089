"""Text log lines start with an ISO 8601 date and time with the local UTC offset (nights in a cron log differ)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_upscaler.logformat import text_formatter
from tests.conftest import run_cli


@pytest.fixture
def paris(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _line(created: float) -> str:
    record = logging.LogRecord("batch_upscaler", logging.INFO, __file__, 1, "scan: %d files", (3,), None)
    record.created = created
    return text_formatter().format(record)


@pytest.mark.usefixtures("paris")
def test_prefix_is_local_time_with_offset() -> None:
    assert _line(1796190000.25) == "2026-12-02T06:40:00+01:00 INFO scan: 3 files"  # winter: CET
    assert _line(1782000000.0).startswith("2026-06-21T02:00:00+02:00 INFO ")  # summer: CEST


def test_cli_log_line_parses_as_aware_datetime(tmp_path: Path) -> None:
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    result = run_cli("status", str(tmp_path / "missing.yaml"))
    after = dt.datetime.now(dt.UTC)
    assert result.returncode == 2, result.stderr
    stamp, level, _ = result.stderr.splitlines()[0].split(" ", 2)
    when = dt.datetime.fromisoformat(stamp)
    assert level == "ERROR" and when.tzinfo is not None
    assert before <= when <= after
