"""Runs moto's S3 server in a separate process for a benchmark, with a per-request log as the S3 bill.

``python -m bench.s3_process --log FILE`` serves moto (its werkzeug app, threaded, as
``ThreadedMotoServer`` does) on 127.0.0.1 at an ephemeral port, announces the port on its first
stdout line, and appends one JSON line per request to FILE (``op``: ListObjectsV2, GetObject,
HeadObject, PutObject, ...; ``ranged``, ``if_match``, ``status``, ``bucket``, ``key``), flushed
before the response is sent. :class:`MotoProcess` starts it from the benchmark and reads that log;
the server's CPU and memory are its own, not the measured runner's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bench.child_server import ChildServer

_ANNOUNCE = "moto listening on "
_MAIN_OPS = ("ListObjectsV2", "GetObject", "HeadObject", "PutObject")  # always in a bill, 0 when not made

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WsgiApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def operation(method: str, path: str, query: str) -> tuple[str, str, str]:
    """(S3 operation, bucket, key) of a path-style request, as the bill counts it."""
    bucket, _, key = urllib.parse.unquote(path).lstrip("/").partition("/")
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    if bucket == "moto-api":
        return "moto-api", "", ""
    if not key:
        names = {"GET": "ListObjectsV2" if params.get("list-type") == ["2"] else "ListObjects",
                 "HEAD": "HeadBucket", "PUT": "CreateBucket", "DELETE": "DeleteBucket",
                 "POST": "DeleteObjects" if "delete" in params else "PostBucket"}
        return names.get(method, method + "Bucket"), bucket, ""
    names = {"GET": "GetObject", "HEAD": "HeadObject", "PUT": "PutObject", "DELETE": "DeleteObject"}
    return names.get(method, method + "Object"), bucket, key


class RequestLogger:
    """WSGI middleware: one JSON line per request, written and flushed before the body is returned."""

    def __init__(self, app: WsgiApp, log: IO[str]) -> None:
        self.app, self.log = app, log
        self._lock = threading.Lock()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        received = time.time()
        seen: dict[str, int] = {}

        def recording_start_response(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            seen["status"] = int(status.split(" ", 1)[0])
            return start_response(status, headers, *args)

        body = self.app(environ, recording_start_response)
        op, bucket, key = operation(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                    environ.get("QUERY_STRING", ""))
        record = {"at": time.time(), "received_at": received, "op": op, "bucket": bucket, "key": key,
                  "status": seen.get("status", 0), "ranged": "HTTP_RANGE" in environ,
                  "if_match": "HTTP_IF_MATCH" in environ}
        with self._lock:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
        return body


def serve(log_path: Path, port: int) -> None:
    """The child's side: moto's app behind the request logger, until SIGTERM."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the access log is ours, in JSON
    with log_path.open("a", encoding="utf-8") as log:
        app = RequestLogger(DomainDispatcherApplication(create_backend_app), log)
        server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
        host, bound = server.server_address[:2]
        print(f"{_ANNOUNCE}http://{host!s}:{bound}", flush=True)
        server.serve_forever()


@dataclass(frozen=True)
class S3Request:
    """One logged S3 request."""

    received_at: float
    at: float
    op: str
    bucket: str
    key: str
    status: int
    ranged: bool
    if_match: bool


_FIELDS = tuple(S3Request.__dataclass_fields__)


def bill(records: Sequence[S3Request]) -> Counter[str]:
    """Requests per operation; ranged and If-Match GETs are counted apart as well."""
    counts: Counter[str] = Counter(dict.fromkeys(_MAIN_OPS, 0))
    counts.update(record.op for record in records)
    counts["GetObject ranged"] = sum(1 for r in records if r.op == "GetObject" and r.ranged)
    counts["GetObject If-Match"] = sum(1 for r in records if r.op == "GetObject" and r.if_match)
    counts["total"] = sum(1 for r in records if r.op != "moto-api")
    return counts


def most_in_flight(records: Sequence[S3Request], op: str) -> int:
    """The most requests of ``op`` the server was handling at once (1: they were made one after another)."""
    events = sorted([(r.received_at, 1) for r in records if r.op == op] + [(r.at, -1) for r in records if r.op == op])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


class MotoProcess(ChildServer):
    """``with MotoProcess(log_path) as moto:`` -- ``moto.endpoint_url`` is live inside, and
    ``moto.records()`` / ``moto.mark()`` read the request log (``since(mark)``: one phase's share)."""

    announce = _ANNOUNCE
    label = "moto"

    def arguments(self) -> list[str]:
        return ["-m", "bench.s3_process", "--log", str(self.log_path)]

    def cpu_seconds(self) -> float:
        """The server process's user + system CPU time so far (from /proc; 0 where there is none)."""
        if self.pid is None:
            return 0.0
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def mark(self) -> int:
        """A position in the log: requests logged after it are ``since(mark)``."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def since(self, mark: int) -> list[S3Request]:
        return list(self._read(mark))

    def records(self) -> list[S3Request]:
        return list(self._read(0))

    def _read(self, offset: int) -> Iterator[S3Request]:
        if not self.log_path.exists():
            return
        with self.log_path.open("rb") as log:
            log.seek(offset)
            for line in log:
                if line.endswith(b"\n"):
                    doc = json.loads(line)
                    yield S3Request(**{name: doc[name] for name in _FIELDS})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.s3_process", description=__doc__)
    parser.add_argument("--log", type=Path, required=True, help="JSON lines, one per request")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (announced on stdout)")
    args = parser.parse_args(argv)
    serve(args.log, args.port)


if __name__ == "__main__":
    main()
