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

import datetime
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from batch_upscaler.errors import CheckpointError, StateUnavailable

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
    etag TEXT,
    params_hash TEXT NOT NULL,
    content_sha256 TEXT,
    format TEXT,
    width INTEGER,
    height INTEGER,
    sent_width INTEGER,
    sent_height INTEGER,
    output_path TEXT,
    output_norm TEXT,
    output_bytes INTEGER,
    output_digest TEXT,
    output_width INTEGER,
    output_height INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    throttles INTEGER NOT NULL DEFAULT 0,
    in_flight INTEGER NOT NULL DEFAULT 0,
    possibly_billed INTEGER NOT NULL DEFAULT 0,
    checks_hash TEXT,
    failed_run INTEGER,
    dedup_of TEXT,
    error_code TEXT,
    error_message TEXT,
    scan_id INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    finished_at REAL,
    exit_code INTEGER,
    requests INTEGER NOT NULL DEFAULT 0,
    throttles INTEGER NOT NULL DEFAULT 0,
    rate_mode TEXT,
    final_rpm REAL,
    spent_usd REAL,
    stop_reason TEXT,
    s3_requests INTEGER,
    s3_retries INTEGER,
    start_rpm REAL,
    rate_key TEXT,
    remembered_rpm REAL,
    rate_measured INTEGER
);
"""
# Created after the additive migration, since they may index columns an older checkpoint lacks.
_INDEXES = """
CREATE INDEX IF NOT EXISTS items_state_seq ON items (state, seq);
CREATE INDEX IF NOT EXISTS items_output ON items (output_path);
CREATE INDEX IF NOT EXISTS items_output_norm ON items (output_norm);
CREATE INDEX IF NOT EXISTS items_content ON items (content_sha256);
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


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRate:
    """What a run of ``auto`` started at and leaves the next run (ratememory.py decides both)."""

    start_rpm: float | None = None
    key: str | None = None  # backend, profile, region and model: runs with the same key share a rate
    remembered_rpm: float | None = None  # job-wide (a shard's rate × shard count)
    measured: bool | None = None  # the run hit the quota and measured it


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
    output_digest: str | None = None
    output_norm: str | None = None
    error_code: str | None = None
    checks_hash: str | None = None
    etag: str | None = None
    gone: bool = False


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
    output_norm: str | None = None  # the output path as the output filesystem compares names
    checks_hash: str | None = None  # the limits the scan-time decision was made with
    etag: str | None = None  # S3 sources: the object's ETag (its cheap fingerprint, with the size)
    # Succeeded at scan: an output the checkpoint did not know, proven by its own record (S3 metadata).
    content_sha256: str | None = None
    output_bytes: int | None = None
    output_digest: str | None = None
    output_size: tuple[int, int] | None = None
    sent_size: tuple[int, int] | None = None


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
    possibly_billed: int = 0  # attempts of earlier runs that may have been billed without an answer recorded
    etag: str | None = None  # S3 sources: read only if the object still has this ETag

    @property
    def fs_relpath(self) -> str:
        """The relative path as the filesystem names it (``relpath`` may be a printable stand-in)."""
        return os.fsdecode(self.raw_relpath) if self.raw_relpath is not None else self.relpath


@dataclass(frozen=True)
class OutputCopy:
    """A succeeded item's output that de-duplication may copy, with what proves it is still that output."""

    key: str
    output_path: str
    output_bytes: int | None
    output_digest: str | None  # None: an older checkpoint did not record it; the copy cannot be proven
    gone: bool


_KNOWN_COLUMNS = ("size", "mtime_ns", "params_hash", "content_sha256", "output_path", "output_bytes",
                  "output_digest", "output_norm", "error_code", "checks_hash", "etag")
_BUSY_STEP_S = 1.0  # sqlite's own busy wait per try; our logged back-off comes between tries


class Checkpoint:
    """One job's checkpoint database. Not thread-safe: use it from the event loop thread only."""

    def __init__(self, conn: sqlite3.Connection, now: Callable[[], float] = time.time,
                 busy_timeout_s: float = 300.0, sleep: Callable[[float], None] = time.sleep,
                 path: Path | None = None) -> None:
        self._conn = conn
        self._path = path
        self._now = now
        self._sleep = sleep
        self._busy_timeout_s = busy_timeout_s
        self._scan_id = 0
        self._pending_writes = 0
        self.run_id: int | None = None  # the run recording now (failures carry it: "new this run")
        self._merged_seq = 0

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, job: str, now: Callable[[], float] = time.time,
             busy_timeout_s: float = 300.0) -> Checkpoint:
        """Open (or create) the checkpoint of ``job``; a corrupt or foreign file is an error."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_STEP_S)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # durable at WAL checkpoints; safe on crash
            if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            conn.executescript(_SCHEMA)
            _add_missing_columns(conn)
            conn.executescript(_INDEXES)
        except sqlite3.OperationalError as exc:
            if _storage_problem(exc):
                raise StateUnavailable(f"{path}: the checkpoint cannot be written: {exc}{_free_space(path)}") from None
            raise CheckpointError(f"{path}: checkpoint database is unreadable ({exc}); "
                                  "it was left untouched — move it away to start this job afresh") from None
        except sqlite3.DatabaseError as exc:
            raise CheckpointError(f"{path}: checkpoint database is unreadable ({exc}); "
                                  "it was left untouched — move it away to start this job afresh") from None
        checkpoint = cls(conn, now, busy_timeout_s, path=path)
        checkpoint._claim(path, job)
        return checkpoint

    @classmethod
    def snapshot(cls, path: Path, job: str, now: Callable[[], float] = time.time) -> Checkpoint:
        """A private copy of the checkpoint (``plan``): a consistent state read without any lock a
        running job would wait for; whatever is done to the copy is never written back. The copy is
        SQLite's private temporary database (file name ""): on disk beyond a small page cache, and
        deleted when closed, so a plan of a million new items does not hold a million rows in memory."""
        memory = sqlite3.connect("", isolation_level=None)
        try:
            if path.exists():
                source = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
                try:
                    source.backup(memory)
                finally:
                    source.close()
            memory.executescript(_SCHEMA)
            _add_missing_columns(memory)
            memory.executescript(_INDEXES)
        except sqlite3.DatabaseError as exc:
            raise CheckpointError(f"{path}: checkpoint database is unreadable ({exc}); "
                                  "it was left untouched — move it away to start this job afresh") from None
        copy = cls(memory, now)
        copy._claim(path, job)
        return copy

    def _claim(self, path: Path, job: str) -> None:
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            with self._transaction() as conn:
                conn.executemany("INSERT INTO meta VALUES (?, ?)",
                                 [("schema_version", str(SCHEMA_VERSION)), ("job", job), ("scan_id", "0")])
            meta = {"schema_version": str(SCHEMA_VERSION), "job": job, "scan_id": "0"}
        if meta.get("job") != job or meta.get("schema_version") != str(SCHEMA_VERSION):
            raise CheckpointError(f"{path}: belongs to job {meta.get('job')!r} (schema "
                                  f"{meta.get('schema_version')}), not {job!r} (schema {SCHEMA_VERSION})")
        self._scan_id = int(meta["scan_id"])

    def close(self) -> None:
        self._conn.close()

    # ---- writing safely ------------------------------------------------------------------
    @contextmanager
    def _guard(self) -> Iterator[None]:
        """A full state disk or a database held too long stops the run cleanly (exit 75), never an item."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if _storage_problem(exc) or _busy(exc):
                raise StateUnavailable(f"the checkpoint cannot be written: {exc}{_free_space(self._path)}") from None
            raise

    def _begin(self) -> None:
        """BEGIN IMMEDIATE, waiting with a logged, bounded back-off while another process holds the
        write lock (a sqlite3 shell, a backup tool): a busy database delays the run, never fails an item."""
        waited, pause = 0.0, 0.5
        while True:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise
                waited += _BUSY_STEP_S
                if waited >= self._busy_timeout_s:
                    raise StateUnavailable(f"the checkpoint stayed locked by another process for "
                                           f"{waited:.0f} s; stopping so nothing is lost") from None
                log.warning("the checkpoint is locked by another process; waiting (%.0f s so far, at most %.0f s)",
                            waited, self._busy_timeout_s, extra={"event": "checkpoint_busy"})
                self._sleep(pause)
                waited += pause
                pause = min(pause * 2, 10.0)

    def _rollback(self) -> None:
        if self._conn.in_transaction:  # SQLite may already have rolled back (a full disk does that)
            self._conn.execute("ROLLBACK")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._guard():
            if self._conn.in_transaction:  # nested (inside a scan): a savepoint keeps the move atomic
                self._conn.execute("SAVEPOINT move")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK TO move")
                    self._conn.execute("RELEASE move")
                    raise
                self._conn.execute("RELEASE move")
                return
            self._begin()
            try:
                yield self._conn
            except BaseException:
                self._rollback()
                raise
            self._conn.execute("COMMIT")

    # ---- scanning ------------------------------------------------------------------------
    @contextmanager
    def scan(self) -> Iterator[int]:
        """A discovery pass: writes are batched; on completion unseen items are marked gone.

        The pass's id is recorded before it starts, so an interrupted pass's id is never reused
        (items it saw must not count as seen by the next pass).
        """
        with self._transaction() as conn:
            self._scan_id += 1
            conn.execute("UPDATE meta SET value = ? WHERE key = 'scan_id'", (str(self._scan_id),))
        with self._guard():
            self._begin()
            self._pending_writes = 0
            try:
                yield self._scan_id
                self._conn.execute("UPDATE items SET gone = (scan_id <> ?)", (self._scan_id,))
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("COMMIT")  # keep what was recorded; the next scan redoes the rest
                raise
            self._conn.execute("COMMIT")

    def _scan_write(self, sql: str, args: tuple[Any, ...]) -> None:
        with self._guard():
            self._conn.execute(sql, args)
            self._pending_writes += 1
            if self._pending_writes >= 2000:  # bound the WAL growth of a 100k-file first scan
                self._conn.execute("COMMIT")
                self._begin()
                self._pending_writes = 0

    def lookup(self, key: str) -> Known | None:
        row = self._conn.execute(f"SELECT state, gone, {', '.join(_KNOWN_COLUMNS)} FROM items WHERE key = ?",
                                 (key,)).fetchone()
        if row is None:
            return None
        return Known(ItemState(row[0]), gone=bool(row[1]), **dict(zip(_KNOWN_COLUMNS, row[2:], strict=True)))

    def mark_seen(self, key: str, seq: int, *, size: int | None = None, mtime_ns: int | None = None,
                  etag: str | None = None) -> None:
        """An unchanged item was seen again (optionally with a refreshed fingerprint of equal content)."""
        self._scan_write("UPDATE items SET seq = ?, scan_id = ?, gone = 0, size = COALESCE(?, size), "
                         "mtime_ns = COALESCE(?, mtime_ns), etag = COALESCE(?, etag) WHERE key = ?",
                         (seq, self._scan_id, size, mtime_ns, etag, key))

    def lookup_names(self, key: str) -> tuple[str, str] | None:
        """(source, relpath) of ``key``, to name it to people."""
        row = self._conn.execute("SELECT source, relpath FROM items WHERE key = ?", (key,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def record_scanned(self, item: Scanned) -> None:
        """Insert a new item, or reset a changed one to the state its fresh probe decided."""
        # Succeeded only when proven at scan by the output's own record; otherwise a probe's verdict.
        assert item.state is not ItemState.IN_PROGRESS
        now = self._now()
        failed_run = self.run_id if item.state is ItemState.FAILED else None
        out_w, out_h = item.output_size or (None, None)
        sent_w, sent_h = item.sent_size or (None, None)
        self._scan_write(
            "INSERT INTO items (key, seq, source, relpath, state, size, mtime_ns, params_hash, output_path,"
            " format, width, height, error_code, error_message, scan_id, created_at, updated_at, raw_relpath,"
            " output_norm, checks_hash, failed_run, etag, content_sha256, output_bytes, output_digest,"
            " output_width, output_height, sent_width, sent_height, finished_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (key) DO UPDATE SET seq=excluded.seq, state=excluded.state, gone=0,"
            " size=excluded.size, mtime_ns=excluded.mtime_ns, params_hash=excluded.params_hash, etag=excluded.etag,"
            " content_sha256=excluded.content_sha256, output_path=excluded.output_path,"
            " output_norm=excluded.output_norm, output_bytes=excluded.output_bytes,"
            " output_digest=excluded.output_digest, output_width=excluded.output_width,"
            " output_height=excluded.output_height, sent_width=excluded.sent_width,"
            " sent_height=excluded.sent_height, dedup_of=NULL, format=excluded.format,"
            " width=excluded.width, height=excluded.height, checks_hash=excluded.checks_hash,"
            " attempts=0, throttles=0, in_flight=0, possibly_billed=0,"
            # A refusal decided again for an unchanged file, with the same outcome, is not new.
            " failed_run=CASE WHEN items.state = excluded.state AND items.error_code IS excluded.error_code"
            " AND items.size = excluded.size AND items.mtime_ns = excluded.mtime_ns"
            " THEN items.failed_run ELSE excluded.failed_run END,"
            " error_code=excluded.error_code, error_message=excluded.error_message,"
            " scan_id=excluded.scan_id, updated_at=excluded.updated_at, started_at=NULL,"
            " finished_at=excluded.finished_at",
            (item.key, item.seq, item.source, item.relpath, item.state, item.size, item.mtime_ns,
             item.params_hash, item.output_path, item.format, item.width, item.height, item.error_code,
             item.error_message, self._scan_id, now, now, item.raw_relpath, item.output_norm, item.checks_hash,
             failed_run, item.etag, item.content_sha256, item.output_bytes, item.output_digest, out_w, out_h,
             sent_w, sent_h, now if item.state is ItemState.SUCCEEDED else None))

    def output_owner(self, output_norm: str, key: str) -> str | None:
        """The live item other than ``key`` that holds ``output_norm``, across the whole checkpoint.

        Every live row with an output path holds it (pending, running, done, or failed while
        sending): the item that holds a path keeps it, and a newcomer is refused. Refused and skipped
        rows hold none.
        """
        row = self._conn.execute("SELECT key FROM items WHERE output_norm = ? AND key <> ? AND gone = 0 "
                                 "ORDER BY seq LIMIT 1", (output_norm, key)).fetchone()
        return None if row is None else str(row[0])

    def wrote_output(self, output_norm: str) -> bool:
        """Some item of this job (live or gone) wrote ``output_norm``: the file there is this job's."""
        return self._conn.execute("SELECT 1 FROM items WHERE output_norm = ? AND output_digest IS NOT NULL LIMIT 1",
                                  (output_norm,)).fetchone() is not None

    def renormalise_outputs(self, mode: str, fold: Callable[[str], str], refusals: Collection[str]) -> None:
        """Recompute every output's comparison key when the name-comparison rule changed (or the
        checkpoint predates it). Skipped rows and rows refused for one of ``refusals`` hold no path."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'name_compare'").fetchone()
        if row is not None and row[0] == mode:
            return
        self._conn.create_function("fold_name", 1, fold, deterministic=True)
        marks = ",".join("?" * len(refusals))
        with self._transaction() as conn:
            conn.execute("UPDATE items SET output_norm = CASE WHEN output_path IS NULL OR state = 'skipped' OR "
                         f"(state = 'failed' AND error_code IN ({marks})) THEN NULL ELSE fold_name(output_path) END",
                         tuple(refusals))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('name_compare', ?)", (mode,))

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
        """Recorded *before* each send, so a crash mid-request still counts the attempt; ``in_flight``
        stays set until the answer is recorded, so an unanswered attempt is known as possibly billed."""
        self._move(key, (ItemState.IN_PROGRESS,), "attempts = attempts + 1, in_flight = 1", ())

    def record_answer(self, key: str, *, throttled: bool = False, possibly_billed: bool = False) -> None:
        """An attempt was answered with an error: throttled (never billed) or possibly billed."""
        self._move(key, (ItemState.IN_PROGRESS,), "in_flight = 0, throttles = throttles + ?, "
                   "possibly_billed = possibly_billed + ?", (int(throttled), int(possibly_billed)))

    def record_content_hash(self, key: str, sha256: str) -> None:
        self._move(key, (ItemState.IN_PROGRESS,), "content_sha256 = ?", (sha256,))

    def succeed(self, key: str, output_bytes: int, output_size: tuple[int, int] | None,
                sent_size: tuple[int, int] | None = None, dedup_of: str | None = None,
                output_digest: str | None = None) -> None:
        out_w, out_h = output_size or (None, None)
        sent_w, sent_h = sent_size or (None, None)
        self._move(key, (ItemState.IN_PROGRESS,), "state = 'succeeded', in_flight = 0, output_bytes = ?, "
                   "output_digest = ?, output_width = ?, output_height = ?, sent_width = ?, sent_height = ?, "
                   "dedup_of = ?, finished_at = ?",
                   (output_bytes, output_digest, out_w, out_h, sent_w, sent_h, dedup_of, self._now()))

    def adopt_output(self, key: str, content_sha256: str, output_bytes: int, output_digest: str,
                     output_size: tuple[int, int] | None, sent_size: tuple[int, int] | None) -> None:
        """A pending item whose output is already there, proven by its own record (S3 metadata): a run
        that was killed after the upload and before recording it. Done, and not paid again."""
        out_w, out_h = output_size or (None, None)
        sent_w, sent_h = sent_size or (None, None)
        self._move(key, (ItemState.PENDING,), "state = 'succeeded', in_flight = 0, content_sha256 = ?, "
                   "output_bytes = ?, output_digest = ?, output_width = ?, output_height = ?, sent_width = ?, "
                   "sent_height = ?, finished_at = ?",
                   (content_sha256, output_bytes, output_digest, out_w, out_h, sent_w, sent_h, self._now()))

    def fail(self, key: str, code: str, message: str) -> None:
        self._move(key, (ItemState.IN_PROGRESS,), "state = 'failed', in_flight = 0, error_code = ?, "
                   "error_message = ?, failed_run = ?, finished_at = ?",
                   (code, message[:2000], self.run_id, self._now()))

    def release(self, key: str) -> None:
        """An item that was started but not finished (interrupted, or the run hit a fatal error).

        An attempt still on the wire when it was cancelled may have run: it counts as possibly billed.
        """
        self._move(key, (ItemState.IN_PROGRESS,), "state = 'pending', possibly_billed = possibly_billed + in_flight, "
                   "in_flight = 0", ())

    def recover(self) -> int:
        """At start: items a crashed run left in progress are pending again (an attempt that was
        sent and never answered counts as possibly billed, across runs)."""
        with self._transaction() as conn:
            return conn.execute("UPDATE items SET state = 'pending', possibly_billed = possibly_billed + in_flight, "
                                "in_flight = 0 WHERE state = 'in_progress'").rowcount

    def retry_failed(self, codes: Collection[str] | None = None) -> int:
        """Failed items become pending again: all of them (``--retry-failed``), or those failed with
        one of ``codes`` (failures that were the service's state, not a fact about the image)."""
        where = "state = 'failed' AND gone = 0"
        args: tuple[str, ...] = ()
        if codes is not None:
            where += f" AND error_code IN ({','.join('?' * len(codes))})"
            args = tuple(codes)
        with self._transaction() as conn:
            return conn.execute("UPDATE items SET state = 'pending', attempts = 0, throttles = 0, possibly_billed = 0, "
                                f"error_code = NULL, error_message = NULL, failed_run = NULL WHERE {where}",
                                args).rowcount

    def retry_keys(self, keys: Iterable[str]) -> int:
        """``--only``: these failed items become pending again."""
        with self._transaction() as conn:
            return sum(conn.execute("UPDATE items SET state = 'pending', attempts = 0, throttles = 0, "
                                    "possibly_billed = 0, error_code = NULL, error_message = NULL, failed_run = NULL "
                                    "WHERE key = ? AND state = 'failed'", (key,)).rowcount for key in keys)

    # ---- reading -------------------------------------------------------------------------
    def pending(self, after_seq: int, limit: int) -> list[WorkItem]:
        rows = self._conn.execute(
            "SELECT key, seq, source, relpath, size, mtime_ns, output_path, format, width, height, raw_relpath, "
            "possibly_billed, etag FROM items "
            "WHERE state = 'pending' AND gone = 0 AND seq > ? ORDER BY seq LIMIT ?", (after_seq, limit))
        return [WorkItem(*row) for row in rows.fetchall()]

    def counts(self) -> dict[ItemState, int]:
        counts = dict.fromkeys(ItemState, 0)
        for state, n in self._conn.execute("SELECT state, COUNT(*) FROM items WHERE gone = 0 GROUP BY state"):
            counts[ItemState(state)] = n
        return counts

    def new_failures(self, run_id: int) -> int:
        """Live items that failed in run ``run_id`` (refused at its scan, or failed while sending)."""
        row = self._conn.execute("SELECT COUNT(*) FROM items WHERE state = 'failed' AND gone = 0 AND failed_run = ?",
                                 (run_id,)).fetchone()
        return int(row[0])

    def failed_by_run(self, run_id: int) -> dict[str, int]:
        """Live items that failed in run ``run_id``, by reason."""
        rows = self._conn.execute("SELECT COALESCE(error_code, 'unknown'), COUNT(*) FROM items WHERE state = 'failed' "
                                  "AND gone = 0 AND failed_run = ? GROUP BY 1 ORDER BY 1", (run_id,))
        return {str(code): int(n) for code, n in rows.fetchall()}

    def failed_in_run(self, run_id: int, limit: int) -> list[tuple[str, str, str, str]]:
        """(source, relpath, key, message) of the first ``limit`` items that failed in run ``run_id``."""
        rows = self._conn.execute("SELECT source, relpath, key, COALESCE(error_message, error_code, '') FROM items "
                                  "WHERE state = 'failed' AND gone = 0 AND failed_run = ? ORDER BY seq LIMIT ?",
                                  (run_id, limit))
        return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows.fetchall()]

    def succeeded_copies(self, content_sha256: str, params_hash: str, key: str) -> list[OutputCopy]:
        """Succeeded items (live ones first) with the same content and parameters: candidates whose
        output de-duplication may copy once the file on disk is proven to be what was recorded."""
        rows = self._conn.execute(
            "SELECT key, output_path, output_bytes, output_digest, gone FROM items WHERE content_sha256 = ? "
            "AND params_hash = ? AND key <> ? AND state = 'succeeded' AND output_path IS NOT NULL "
            "ORDER BY gone, seq LIMIT 8", (content_sha256, params_hash, key))
        return [OutputCopy(str(k), str(p), n, d, bool(g)) for k, p, n, d, g in rows.fetchall()]

    def reasons(self, state: ItemState) -> dict[str, int]:
        """Live items in ``state`` counted by error code (skips and failures by reason)."""
        rows = self._conn.execute("SELECT COALESCE(error_code, 'unknown'), COUNT(*) FROM items "
                                  "WHERE state = ? AND gone = 0 GROUP BY 1 ORDER BY 1", (state.value,))
        return {str(code): int(n) for code, n in rows.fetchall()}

    def totals(self) -> dict[str, float]:
        """Job-wide sums for metrics: attempts, throttles, retries, de-duplicated, last success time,
        and attempts that may have been billed without their answer being received."""
        row = self._conn.execute(
            "SELECT COALESCE(SUM(attempts), 0), COALESCE(SUM(throttles), 0), "
            "COALESCE(SUM(MAX(attempts - 1, 0)), 0), COUNT(dedup_of), "
            "COALESCE(MAX(CASE WHEN state = 'succeeded' THEN finished_at END), 0), "
            "COALESCE(SUM(possibly_billed), 0) FROM items WHERE gone = 0"
        ).fetchone()
        return dict(zip(("attempts", "throttles", "retries", "deduplicated", "last_success", "possibly_billed"),
                        (float(v) for v in row), strict=True))

    def succeeded_hashes_by_size(self) -> dict[int, set[str]]:
        """Content hashes of succeeded items, by file size (what a pending duplicate could reuse)."""
        found: dict[int, set[str]] = {}
        rows = self._conn.execute("SELECT size, content_sha256 FROM items WHERE state = 'succeeded' "
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

    def keys_in(self, state: ItemState) -> Iterator[tuple[str, int]]:
        """(key, seq) of every live item in ``state``, streamed: a walk without building rows."""
        yield from self._conn.execute("SELECT key, seq FROM items WHERE state = ? AND gone = 0", (state.value,))

    def items_with_keys(self, keys: Iterable[str]) -> list[dict[str, Any]]:
        """The live items with these keys (a handful), in discovery order."""
        wanted = list(keys)
        rows: list[dict[str, Any]] = []
        for start in range(0, len(wanted), 500):  # under SQLite's bound-parameter limit
            chunk = wanted[start:start + 500]
            cur = self._conn.execute(f"SELECT * FROM items WHERE gone = 0 AND key IN ({','.join('?' * len(chunk))})",
                                     chunk)
            names = [d[0] for d in cur.description]
            rows += [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        return sorted(rows, key=lambda row: int(row["seq"]))

    # Reports aggregate in SQL: one pass in Python per item is what makes a million-item report slow.
    def report_sums(self) -> tuple[int, int, int, int]:
        """Over live items: attempts, throttled attempts, de-duplicated items, possibly billed attempts."""
        row = self._conn.execute(
            "SELECT COALESCE(SUM(attempts), 0), COALESCE(SUM(throttles), 0), COUNT(dedup_of), "
            "COALESCE(SUM(possibly_billed), 0) FROM items WHERE gone = 0").fetchone()
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    def first_with_reason(self, state: ItemState, reason: str, limit: int) -> list[dict[str, Any]]:
        """The first ``limit`` live items in ``state`` with error code ``reason`` ('unknown': none)."""
        cur = self._conn.execute(
            "SELECT * FROM items WHERE state = ? AND gone = 0 AND COALESCE(error_code, 'unknown') = ? "
            "ORDER BY seq LIMIT ?", (state.value, reason, limit))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def size_pairs(self) -> list[tuple[int, int, int]]:
        """(input width, output width, items) over live succeeded items with both known."""
        rows = self._conn.execute(
            "SELECT width, output_width, COUNT(*) FROM items WHERE state = 'succeeded' AND gone = 0 "
            "AND width > 0 AND output_width > 0 GROUP BY width, output_width")
        return [(int(w), int(ow), int(n)) for w, ow, n in rows.fetchall()]

    def finished_per_slot(self, state: ItemState, slot_s: int) -> dict[int, int]:
        """Live items in ``state`` counted by ``slot_s``-second slot of their finish time."""
        rows = self._conn.execute(
            "SELECT CAST(finished_at / ? AS INTEGER), COUNT(*) FROM items WHERE state = ? AND gone = 0 "
            "AND finished_at IS NOT NULL GROUP BY 1", (slot_s, state.value))
        return {int(slot): int(n) for slot, n in rows.fetchall()}

    # ---- runs ----------------------------------------------------------------------------
    def begin_run(self) -> int:
        with self._transaction() as conn:
            cur = conn.execute("INSERT INTO runs (started_at) VALUES (?)", (self._now(),))
            self.run_id = int(cur.lastrowid or 0)
        return self.run_id

    def finish_run(self, run_id: int, exit_code: int, requests: int, throttles: int, *,
                   rate_mode: str | None = None, final_rpm: float | None = None, spent_usd: float = 0.0,
                   stop_reason: str | None = None, s3_requests: int | None = None,
                   s3_retries: int | None = None, rate: RunRate | None = None) -> None:
        rate = rate or RunRate()
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET finished_at = ?, exit_code = ?, requests = ?, throttles = ?, "
                         "rate_mode = ?, final_rpm = ?, spent_usd = ?, stop_reason = ?, s3_requests = ?, "
                         "s3_retries = ?, start_rpm = ?, rate_key = ?, remembered_rpm = ?, rate_measured = ? "
                         "WHERE id = ?",
                         (self._now(), exit_code, requests, throttles, rate_mode, final_rpm, spent_usd,
                          stop_reason, s3_requests, s3_retries, rate.start_rpm, rate.key, rate.remembered_rpm,
                          None if rate.measured is None else int(rate.measured), run_id))

    def last_rate(self, key: str) -> tuple[float, bool, float] | None:
        """(rpm, measured, when) the latest finished run with ``key`` (backend, region, model) left
        for the next one to start at, preferring a measured rate to a later unmeasured one."""
        row = self._conn.execute(
            "SELECT remembered_rpm, rate_measured, finished_at FROM runs WHERE rate_key = ? AND remembered_rpm"
            " IS NOT NULL AND finished_at IS NOT NULL ORDER BY rate_measured DESC, id DESC LIMIT 1", (key,)).fetchone()
        return None if row is None else (float(row[0]), bool(row[1]), float(row[2]))

    # ---- the merge's scratch checkpoint -------------------------------------------------------
    @classmethod
    def open_scratch(cls, path: Path, job: str) -> Checkpoint:
        """A throw-away checkpoint for ``report --merge``: written once, then read by the report code.
        The indexes a run uses to find owners and duplicates would only slow its million inserts,
        and a crash loses nothing (the merge starts again from the shards' reports)."""
        checkpoint = cls.open(path, job)
        checkpoint._conn.execute("PRAGMA synchronous=OFF")
        checkpoint._conn.executescript("DROP INDEX IF EXISTS items_output; DROP INDEX IF EXISTS items_output_norm; "
                                       "DROP INDEX IF EXISTS items_content;")
        return checkpoint

    def import_items(self, items: Iterable[Mapping[str, Any]]) -> None:
        """Load a shard report's items (``report --merge``) into this scratch checkpoint, so the one
        report code writes the merged report; names and output locations come already displayed."""
        now = self._now()

        def rows() -> Iterator[tuple[Any, ...]]:
            for item in items:
                self._merged_seq += 1
                inputs, sent, out = (item.get(k) or [None, None] for k in ("input_size", "sent_size", "output_size"))
                finished = item.get("finished_at")
                yield (item["source"], self._merged_seq, "merged", item["source"], item["status"], 0, 0, "",
                       item.get("output"), *inputs, *sent, *out, item.get("attempts") or 0,
                       item.get("throttles") or 0, item.get("possibly_billed") or 0, item.get("dedup_of"),
                       item.get("error_code"), item.get("error_message"), self._scan_id, now, now,
                       _timestamp(finished) if finished else None)

        with self._transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO items (key, seq, source, relpath, state, size, mtime_ns, params_hash,"
                " output_path, width, height, sent_width, sent_height, output_width, output_height, attempts,"
                " throttles, possibly_billed, dedup_of, error_code, error_message, scan_id, created_at, updated_at,"
                " finished_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows())

    def record_merged_run(self, started: float | None, finished: float | None, requests: int, throttles: int,
                          spent_usd: float, stop_reason: str | None) -> None:
        """The merged report's "last run": the shards' runs together."""
        with self._transaction() as conn:
            conn.execute("INSERT INTO runs (started_at, finished_at, exit_code, requests, throttles, spent_usd, "
                         "stop_reason) VALUES (?, ?, NULL, ?, ?, ?, ?)",
                         (started or self._now(), finished, requests, throttles, spent_usd, stop_reason))

    def runs(self) -> list[dict[str, Any]]:
        cur = self._conn.execute("SELECT * FROM runs ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _timestamp(iso: str) -> float | None:
    try:
        return datetime.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def _storage_problem(exc: sqlite3.OperationalError) -> bool:
    """The state disk is full or failing (SQLITE_FULL, SQLITE_IOERR and its extended codes)."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN)


def _free_space(path: Path | None) -> str:
    """What the state disk has left, for the one line that explains a stop."""
    if path is None:
        return ""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return ""
    return f" ({free:,} bytes free on the state disk {path.parent})"


def _busy(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
