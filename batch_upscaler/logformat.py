"""Log output formats: readable text for people, or one JSON object per line for machines.

Text lines start with the local date and time and its UTC offset (ISO 8601, seconds); JSON
``timestamp`` is ISO 8601 UTC with milliseconds.

JSON lines carry ``timestamp``, ``level``, ``job``, ``event``, ``file``, ``attempt``,
``error_code`` and ``message``; the structured fields come from ``extra=`` at the call site, the
job name from the formatter (set at the CLI edge; a formatter, unlike a filter, survives tqdm's
handler swap while the progress bar is shown). Request bodies and credentials are never passed
to a log call, so neither format can carry them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging

FIELDS = ("event", "file", "attempt", "error_code")


class JsonFormatter(logging.Formatter):
    def __init__(self, job: str | None = None) -> None:
        super().__init__()
        self.job = job

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "job": self.job,
            **{name: getattr(record, name, None) for name in FIELDS},
            "message": record.getMessage(),
        }
        if entry["event"] is None:
            entry["event"] = "log"
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2026-12-02T04:20:02+01:00 INFO message``: local time with its UTC offset, so the lines of a
    log appended to night after night (cron) say which night, and across a DST change, which hour."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return dt.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="seconds")


def text_formatter() -> logging.Formatter:
    return TextFormatter()
