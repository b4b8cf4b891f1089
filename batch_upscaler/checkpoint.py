"""The checkpoint: the per-item state machine, persisted in SQLite (WAL).

Every feature reads or writes item state through this module. States and the only allowed moves::

    (scan) ──► pending ──start──► in_progress ──succeed──► succeeded
       │          ▲                   │  ╰──────fail─────► failed ──retry_failed──┐
       │          ╰──release/recover──╯                                           │
       ├──► skipped / failed (refused before sending)        pending ◄────────────┘
       ╰── a changed source file or changed parameters: back to pending (or skipped)

Each move is one ``UPDATE ... WHERE state IN (allowed)`` in its own transaction, so a crash at
any instant leaves every row in a valid state, and an item can only become ``succeeded`` from
``in_progress`` (never twice from one start). ``sqlite3`` is called directly on the event loop:
at ~15k commits/s with WAL + synchronous=NORMAL it is far faster than the work it records
(measured: docs/bedrock-reference.md, "Client-side facts").

Rows are keyed by the machine-independent item key (``<source>:<relpath>``); output paths are
stored relative to the output root.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from batch_upscaler.errors import CheckpointError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    source TEXT NOT NULL,
    relpath TEXT NOT NULL,
    raw_relpath BLOB,
    state TEXT NOT NULL CHECK (state IN ('pending','in_progress','succeeded','failed','skipped')),
    gone INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    params_hash TEXT NOT NULL,
    content_sha256 TEXT,
    format TEXT,
    width INTEGER,
    height INTEGER,
    sent_width INTEGER,
    sent_height INTEGER,
    output_path TEXT,
    output_bytes INTEGER,
    output_width INTEGER,
    output_height INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    throttles INTEGER NOT NULL DEFAULT 0,
    dedup_of TEXT,
    error_code TEXT,
    error_message TEXT,
    scan_id INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS items_state_seq ON items (state, seq);
CREATE INDEX IF NOT EXISTS items_output ON items (output_path);
CREATE INDEX IF NOT EXISTS items_content ON items (content_sha256);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    finished_at REAL,
    exit_code INTEGER,
    requests INTEGER NOT NULL DEFAULT 0,
    throttles INTEGER NOT NULL DEFAULT 0,
    rate_mode TEXT,
    final_rpm REAL,
    spent_usd REAL
);
"""


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Additive migration: a checkpoint written by an older version gains the newer columns, so an
    upgrade never strands a half-finished job. The wanted layout is read from _SCHEMA itself, built
    in memory, so the schema has one source."""
    wanted = sqlite3.connect(":memory:")
    wanted.executescript(_SCHEMA)
    tables = [r[0] for r in wanted.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for _, name, kind, _notnull, default, _pk in wanted.execute(f"PRAGMA table_info({table})"):
            if name not in have:  # added columns are nullable or carry a default
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}"
                             + (f" DEFAULT {default}" if default is not None else ""))
    wanted.close()


class ItemState(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Known:
    """What the checkpoint remembers of an item, enough to decide if it changed."""

    state: ItemState
    size: int
    mtime_ns: int
    params_hash: str
    content_sha256: str | None
    output_path: str | None
    output_bytes: int | None


@dataclass(frozen=True)
class Scanned:
    """A row to (re)write after probing a new or changed file."""

    key: str
    seq: int
    source: str
    relpath: str
    size: int
    mtime_ns: int
    params_hash: str
    state: ItemState  # pending, skipped or failed
    output_path: str | None
    format: str | None = None
    width: int | None = None
    height: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    raw_relpath: bytes | None = None  # the name's bytes when it is not UTF-8


@dataclass(frozen=True)
class WorkItem:
    """A pending item as the worker pool needs it."""

    key: str
    seq: int
    source: str
    relpath: str
    size: int
    mtime_ns: int
    output_path: str
    format: str | None
    width: int | None
    height: int | None
    raw_relpath: bytes | None = None

    @property
    def fs_relpath(self) -> str:
        """The relative path as the filesystem names it (``relpath`` may be a printable stand-in)."""
        return os.fsdecode(self.raw_relpath) if self.raw_relpath is not None else self.relpath


class Checkpoint:
    """One job's checkpoint database. Not thread-safe: use it from the event loop thread only."""

    def __init__(self, conn: sqlite3.Connection, now: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self._now = now
        self._scan_id = 0
        self._pending_writes = 0
        self._dry = False  # inside dry_run(): nothing is ever committed

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, job: str, now: Callable[[], float] = time.time) -> Checkpoint:
        """Open (or create) the checkpoint of ``job``; a corrupt or foreign file is an error."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # durable at WAL checkpoints; safe on crash
            if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            conn.executescript(_SCHEMA)
            _add_missing_columns(conn)
        except sqlite3.DatabaseError as exc:
            raise CheckpointError(f"{path}: checkpoint database is unreadable ({exc}); "
                                  "it was left untouched — move it away to start this job afresh") from None
        checkpoint = cls(conn, now)
        checkpoint._claim(path, job)
        return checkpoint

    def _claim(self, path: Path, job: str) -> None:
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            self._conn.executemany("INSERT INTO meta VALUES (?, ?)",
                                   [("schema_version", str(SCHEMA_VERSION)), ("job", job), ("scan_id", "0")])
            meta = {"schema_version": str(SCHEMA_VERSION), "job": job, "scan_id": "0"}
        if meta.get("job") != job or meta.get("schema_version") != str(SCHEMA_VERSION):
            raise CheckpointError(f"{path}: belongs to job {meta.get('job')!r} (schema "
                                  f"{meta.get('schema_version')}), not {job!r} (schema {SCHEMA_VERSION})")
        self._scan_id = int(meta["scan_id"])

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self._conn.in_transaction:  # nested (a dry run): a savepoint keeps the move atomic
            self._conn.execute("SAVEPOINT move")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK TO move")
                self._conn.execute("RELEASE move")
                raise
            self._conn.execute("RELEASE move")
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def dry_run(self) -> Iterator[None]:
        """Everything inside happens as it would, is visible to queries inside, and is rolled back.

        ``plan`` runs the very same recover/scan/retry code as ``run`` this way, so its counts are
        what the run will see.
        """
        self._conn.execute("BEGIN IMMEDIATE")
        self._dry = True
        scan_id = self._scan_id
        try:
            yield
        finally:
            self._conn.execute("ROLLBACK")
            self._dry = False
            self._scan_id = scan_id

    # ---- scanning ------------------------------------------------------------------------
    @contextmanager
    def scan(self) -> Iterator[int]:
        """A discovery pass: writes are batched; on completion unseen items are marked gone."""
        self._scan_id += 1
        if not self._dry:
            self._conn.execute("BEGIN IMMEDIATE")
        self._pending_writes = 0
        try:
            yield self._scan_id
            self._conn.execute("UPDATE items SET gone = (scan_id <> ?)", (self._scan_id,))
            self._conn.execute("UPDATE meta SET value = ? WHERE key = 'scan_id'", (str(self._scan_id),))
        except BaseException:
            if not self._dry:
                self._conn.execute("COMMIT")  # keep what was recorded; the next scan redoes the rest
            raise
        if not self._dry:
            self._conn.execute("COMMIT")

    def _scan_write(self, sql: str, args: tuple[Any, ...]) -> None:
        self._conn.execute(sql, args)
        self._pending_writes += 1
        if self._pending_writes >= 2000 and not self._dry:  # bound the WAL growth of a 100k-file first scan
            self._conn.execute("COMMIT")
            self._conn.execute("BEGIN IMMEDIATE")
            self._pending_writes = 0

    def lookup(self, key: str) -> Known | None:
        row = self._conn.execute(
            "SELECT state, size, mtime_ns, params_hash, content_sha256, output_path, output_bytes "
            "FROM items WHERE key = ?", (key,)).fetchone()
        return None if row is None else Known(ItemState(row[0]), *row[1:])

    def mark_seen(self, key: str, seq: int, *, size: int | None = None, mtime_ns: int | None = None) -> None:
        """An unchanged item was seen again (optionally with a refreshed stat of equal content)."""
        self._scan_write("UPDATE items SET seq = ?, scan_id = ?, gone = 0, size = COALESCE(?, size), "
                         "mtime_ns = COALESCE(?, mtime_ns) WHERE key = ?",
                         (seq, self._scan_id, size, mtime_ns, key))

    def record_scanned(self, item: Scanned) -> None:
        """Insert a new item, or reset a changed one to the state its fresh probe decided."""
        assert item.state in (ItemState.PENDING, ItemState.SKIPPED, ItemState.FAILED)
        now = self._now()
        self._scan_write(
            "INSERT INTO items (key, seq, source, relpath, state, size, mtime_ns, params_hash, output_path,"
            " format, width, height, error_code, error_message, scan_id, created_at, updated_at, raw_relpath)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (key) DO UPDATE SET seq=excluded.seq, state=excluded.state, gone=0,"
            " size=excluded.size, mtime_ns=excluded.mtime_ns, params_hash=excluded.params_hash,"
            " content_sha256=NULL, output_path=excluded.output_path, output_bytes=NULL, output_width=NULL,"
            " output_height=NULL, sent_width=NULL, sent_height=NULL, dedup_of=NULL, format=excluded.format,"
            " width=excluded.width, height=excluded.height,"
            " attempts=0, throttles=0, error_code=excluded.error_code, error_message=excluded.error_message,"
            " scan_id=excluded.scan_id, updated_at=excluded.updated_at, started_at=NULL, finished_at=NULL",
            (item.key, item.seq, item.source, item.relpath, item.state, item.size, item.mtime_ns,
             item.params_hash, item.output_path, item.format, item.width, item.height, item.error_code,
             item.error_message, self._scan_id, now, now, item.raw_relpath))

    def output_owner(self, output_path: str, key: str) -> str | None:
        """Another live item already writing to ``output_path`` (collision detection)."""
        row = self._conn.execute("SELECT key FROM items WHERE output_path = ? AND key <> ? AND scan_id = ? "
                                 "AND state <> 'skipped' LIMIT 1", (output_path, key, self._scan_id)).fetchone()
        return None if row is None else str(row[0])

    # ---- moves of the state machine ------------------------------------------------------
    def _move(self, key: str, allowed: tuple[ItemState, ...], sets: str, args: tuple[Any, ...]) -> None:
        marks = ",".join("?" * len(allowed))
        with self._transaction() as conn:
            cur = conn.execute(f"UPDATE items SET {sets}, updated_at = ? WHERE key = ? AND state IN ({marks})",
                               (*args, self._now(), key, *allowed))
            if cur.rowcount != 1:
                row = conn.execute("SELECT state FROM items WHERE key = ?", (key,)).fetchone()
                raise CheckpointError(f"{key}: illegal state move from {row[0] if row else 'missing'}")

    def start(self, key: str) -> None:
        self._move(key, (ItemState.PENDING,), "state = 'in_progress', started_at = ?, error_code = NULL, "
                   "error_message = NULL", (self._now(),))

    def count_attempt(self, key: str) -> None:
        """Recorded *before* each send, so a crash mid-request still counts the attempt."""
        self._move(key, (ItemState.IN_PROGRESS,), "attempts = attempts + 1", ())

    def count_throttle(self, key: str) -> None:
        self._move(key, (ItemState.IN_PROGRESS,), "throttles = throttles + 1", ())

    def record_content_hash(self, key: str, sha256: str) -> None:
        self._move(key, (ItemState.IN_PROGRESS,), "content_sha256 = ?", (sha256,))

    def succeed(self, key: str, output_bytes: int, output_size: tuple[int, int] | None,
                sent_size: tuple[int, int] | None = None, dedup_of: str | None = None) -> None:
        out_w, out_h = output_size or (None, None)
        sent_w, sent_h = sent_size or (None, None)
        self._move(key, (ItemState.IN_PROGRESS,), "state = 'succeeded', output_bytes = ?, output_width = ?, "
                   "output_height = ?, sent_width = ?, sent_height = ?, dedup_of = ?, finished_at = ?",
                   (output_bytes, out_w, out_h, sent_w, sent_h, dedup_of, self._now()))

    def fail(self, key: str, code: str, message: str) -> None:
        self._move(key, (ItemState.IN_PROGRESS,), "state = 'failed', error_code = ?, error_message = ?, "
                   "finished_at = ?", (code, message[:2000], self._now()))

    def release(self, key: str) -> None:
        """An item that was started but not finished (interrupted, or the run hit a fatal error)."""
        self._move(key, (ItemState.IN_PROGRESS,), "state = 'pending'", ())

    def recover(self) -> int:
        """At start: items a crashed run left in progress are pending again."""
        with self._transaction() as conn:
            return conn.execute("UPDATE items SET state = 'pending' WHERE state = 'in_progress'").rowcount

    def retry_failed(self) -> int:
        with self._transaction() as conn:
            return conn.execute("UPDATE items SET state = 'pending', attempts = 0, throttles = 0, "
                                "error_code = NULL, error_message = NULL WHERE state = 'failed' AND gone = 0"
                                ).rowcount

    def retry_keys(self, keys: Iterable[str]) -> int:
        """``--only``: these failed items become pending again."""
        with self._transaction() as conn:
            return sum(conn.execute("UPDATE items SET state = 'pending', attempts = 0, throttles = 0, "
                                    "error_code = NULL, error_message = NULL WHERE key = ? AND state = 'failed'",
                                    (key,)).rowcount for key in keys)

    # ---- reading -------------------------------------------------------------------------
    def pending(self, after_seq: int, limit: int) -> list[WorkItem]:
        rows = self._conn.execute(
            "SELECT key, seq, source, relpath, size, mtime_ns, output_path, format, width, height, raw_relpath "
            "FROM items "
            "WHERE state = 'pending' AND gone = 0 AND seq > ? ORDER BY seq LIMIT ?", (after_seq, limit))
        return [WorkItem(*row) for row in rows.fetchall()]

    def counts(self) -> dict[ItemState, int]:
        counts = dict.fromkeys(ItemState, 0)
        for state, n in self._conn.execute("SELECT state, COUNT(*) FROM items WHERE gone = 0 GROUP BY state"):
            counts[ItemState(state)] = n
        return counts

    def find_succeeded_copy(self, content_sha256: str, params_hash: str, key: str) -> tuple[str, str] | None:
        """(key, output path) of another succeeded item with the same content and parameters."""
        row = self._conn.execute(
            "SELECT key, output_path FROM items WHERE content_sha256 = ? AND params_hash = ? AND key <> ? "
            "AND state = 'succeeded' AND output_path IS NOT NULL ORDER BY seq LIMIT 1",
            (content_sha256, params_hash, key)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def reasons(self, state: ItemState) -> dict[str, int]:
        """Live items in ``state`` counted by error code (skips and failures by reason)."""
        rows = self._conn.execute("SELECT COALESCE(error_code, 'unknown'), COUNT(*) FROM items "
                                  "WHERE state = ? AND gone = 0 GROUP BY 1 ORDER BY 1", (state.value,))
        return {str(code): int(n) for code, n in rows.fetchall()}

    def totals(self) -> dict[str, float]:
        """Job-wide sums for metrics: attempts, throttles, retries, de-duplicated, last success time."""
        row = self._conn.execute(
            "SELECT COALESCE(SUM(attempts), 0), COALESCE(SUM(throttles), 0), "
            "COALESCE(SUM(MAX(attempts - 1, 0)), 0), COUNT(dedup_of), "
            "COALESCE(MAX(CASE WHEN state = 'succeeded' THEN finished_at END), 0) FROM items WHERE gone = 0"
        ).fetchone()
        return dict(zip(("attempts", "throttles", "retries", "deduplicated", "last_success"),
                        (float(v) for v in row), strict=True))

    def succeeded_hashes_by_size(self) -> dict[int, set[str]]:
        """Content hashes of succeeded items, by file size (what a pending duplicate could reuse)."""
        found: dict[int, set[str]] = {}
        rows = self._conn.execute("SELECT size, content_sha256 FROM items WHERE state = 'succeeded' AND gone = 0 "
                                  "AND content_sha256 IS NOT NULL")
        for size, digest in rows:
            found.setdefault(int(size), set()).add(str(digest))
        return found

    def state_of(self, key: str) -> ItemState | None:
        row = self._conn.execute("SELECT state FROM items WHERE key = ?", (key,)).fetchone()
        return None if row is None else ItemState(row[0])

    def items(self) -> Iterator[dict[str, Any]]:
        """Every live item in discovery order, as column dicts (streamed, for reports)."""
        cur = self._conn.execute("SELECT * FROM items WHERE gone = 0 ORDER BY seq")
        names = [d[0] for d in cur.description]
        for row in cur:
            yield dict(zip(names, row, strict=True))

    # ---- runs ----------------------------------------------------------------------------
    def begin_run(self) -> int:
        with self._transaction() as conn:
            cur = conn.execute("INSERT INTO runs (started_at) VALUES (?)", (self._now(),))
            return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, exit_code: int, requests: int, throttles: int, *,
                   rate_mode: str | None = None, final_rpm: float | None = None, spent_usd: float = 0.0) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET finished_at = ?, exit_code = ?, requests = ?, throttles = ?, "
                         "rate_mode = ?, final_rpm = ?, spent_usd = ? WHERE id = ?",
                         (self._now(), exit_code, requests, throttles, rate_mode, final_rpm, spent_usd, run_id))

    def runs(self) -> list[dict[str, Any]]:
        cur = self._conn.execute("SELECT * FROM runs ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
