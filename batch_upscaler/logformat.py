"""Log output formats: readable text for people, or one JSON object per line for machines.

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


def text_formatter() -> logging.Formatter:
    return logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
