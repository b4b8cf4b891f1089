"""The record of what the emulator was asked and how it answered, in memory and as JSON lines.

Records hold only metadata: never the request body (it carries the image) nor any header (of the
Authorization header only the region the request was signed for is kept).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RequestRecord:
    """One invoke request. ``fault`` is the injected FaultKind value, None for a plain answer."""

    seq: int
    at: float  # time.time() when the answer was sent (or the request was rejected)
    model_id: str
    image_sha256: str | None
    input_size: tuple[int, int] | None
    status: int
    error_type: str | None
    fault: str | None
    output_size: tuple[int, int] | None
    duration_s: float
    image_format: str | None = None  # jpeg | png | webp | unknown, sniffed from the decoded image
    params: Mapping[str, Any] | None = None  # the body's parameters other than ``image``
    output_sha256: str | None = None  # of the image returned (faults that break the body aside)
    received_at: float | None = None  # time.time() when the request arrived
    latency_s: float | None = None  # the latency drawn for this answer (None: none was reached)
    # The region the request was signed for (SigV4 credential scope), the only piece of a header kept
    signing_region: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestRecord:
        """Inverse of :meth:`to_dict`, also for a JSON line (where tuples came back as lists)."""
        fields = dict(data)
        for name in ("input_size", "output_size"):
            if fields.get(name) is not None:
                width, height = fields[name]
                fields[name] = (int(width), int(height))
        return cls(**fields)


class RequestLog:
    """Thread-safe list of records; also appends each one to ``path`` (flushed) when given."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._seq = 0

    @property
    def path(self) -> Path | None:
        return self._path

    def next_seq(self) -> int:
        """Sequence number for a request that just arrived (1, 2, ...)."""
        with self._lock:
            self._seq += 1
            return self._seq

    def append(self, record: RequestRecord) -> None:
        line = json.dumps(record.to_dict(), separators=(",", ":"))
        with self._lock:
            self._records.append(record)
            if self._path is not None:
                # Open per record: nothing to close, and a crash loses at most the current line.
                with self._path.open("a", encoding="utf-8") as out:
                    out.write(line + "\n")
                    out.flush()

    def records(self) -> list[RequestRecord]:
        """A snapshot copy, safe to use from any thread."""
        with self._lock:
            return list(self._records)

    @staticmethod
    def read_file(path: Path) -> list[RequestRecord]:
        """The records of a JSON-lines log written by a (possibly other) process."""
        lines = path.read_text(encoding="utf-8").splitlines()
        return [RequestRecord.from_dict(json.loads(line)) for line in lines if line.strip()]
