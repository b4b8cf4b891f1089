"""The checkpoint state machine: allowed moves only, crash recovery, corruption and ownership checks."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from batch_upscaler.checkpoint import Checkpoint, ItemState, Scanned
from batch_upscaler.errors import CheckpointError, StateUnavailable


def scanned(key: str, seq: int, state: ItemState = ItemState.PENDING, **extra: object) -> Scanned:
    return Scanned(key=key, seq=seq, source="p", relpath=key, size=10, mtime_ns=1, params_hash="h",
                   state=state, output_path=f"{key}.png", **extra)  # type: ignore[arg-type]


@pytest.fixture
def cp(tmp_path: Path) -> Checkpoint:
    checkpoint = Checkpoint.open(tmp_path / "job.sqlite", "job")
    with checkpoint.scan():
        checkpoint.record_scanned(scanned("a", 1))
        checkpoint.record_scanned(scanned("b", 2))
        checkpoint.record_scanned(scanned("c", 3, ItemState.SKIPPED, error_code="too_small"))
    return checkpoint


def test_happy_path_and_counters(cp: Checkpoint) -> None:
    cp.start("a")
    cp.count_attempt("a")
    cp.record_answer("a", throttled=True)
    cp.count_attempt("a")
    cp.record_content_hash("a", "abc")
    cp.succeed("a", 1234, (400, 300))
    row = next(r for r in cp.items() if r["key"] == "a")
    assert (row["state"], row["attempts"], row["throttles"], row["output_bytes"], row["output_width"],
            row["content_sha256"]) == ("succeeded", 2, 1, 1234, 400, "abc")
    assert cp.counts()[ItemState.SUCCEEDED] == 1


@pytest.mark.parametrize("move", ["succeed_pending", "start_twice", "succeed_twice", "fail_skipped"])
def test_illegal_moves_are_refused(cp: Checkpoint, move: str) -> None:
    with pytest.raises(CheckpointError, match="illegal state move"):
        if move == "succeed_pending":
            cp.succeed("a", 1, None)
        elif move == "start_twice":
            cp.start("a")
            cp.start("a")
        elif move == "succeed_twice":
            cp.start("a")
            cp.succeed("a", 1, None)
            cp.succeed("a", 1, None)
        else:
            cp.fail("c", "x", "y")


def test_recover_and_release_return_items_to_pending(cp: Checkpoint) -> None:
    cp.start("a")
    cp.start("b")
    cp.release("b")
    assert cp.state_of("b") is ItemState.PENDING
    assert cp.recover() == 1
    assert [w.key for w in cp.pending(0, 10)] == ["a", "b"]


def test_retry_failed_resets_errors(cp: Checkpoint) -> None:
    cp.start("a")
    cp.count_attempt("a")
    cp.fail("a", "ValidationException", "bad")
    assert cp.retry_failed() == 1
    row = next(r for r in cp.items() if r["key"] == "a")
    assert (row["state"], row["attempts"], row["error_code"]) == ("pending", 0, None)


def test_items_not_seen_by_a_complete_scan_are_gone(cp: Checkpoint) -> None:
    with cp.scan():
        cp.mark_seen("a", 1)
    assert [r["key"] for r in cp.items()] == ["a"]
    assert sum(cp.counts().values()) == 1


def test_pending_pages_by_sequence(cp: Checkpoint) -> None:
    assert [w.key for w in cp.pending(0, 1)] == ["a"]
    assert [w.key for w in cp.pending(1, 10)] == ["b"]


def test_rescan_of_changed_item_resets_it(cp: Checkpoint) -> None:
    cp.start("a")
    cp.count_attempt("a")
    cp.succeed("a", 5, (1, 1))
    with cp.scan():
        cp.record_scanned(scanned("a", 1))
    row = next(r for r in cp.items() if r["key"] == "a")
    assert (row["state"], row["attempts"], row["output_bytes"]) == ("pending", 0, None)


def test_corrupt_database_is_a_clear_error_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "job.sqlite"
    garbage = b"this is not a database" * 100
    path.write_bytes(garbage)
    with pytest.raises(CheckpointError, match="unreadable"):
        Checkpoint.open(path, "job")
    assert path.read_bytes() == garbage


def test_checkpoint_of_another_job_is_refused(tmp_path: Path) -> None:
    Checkpoint.open(tmp_path / "x.sqlite", "one").close()
    with pytest.raises(CheckpointError, match="belongs to job 'one'"):
        Checkpoint.open(tmp_path / "x.sqlite", "two")


def test_state_column_rejects_unknown_states(cp: Checkpoint, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "job.sqlite")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE items SET state = 'done' WHERE key = 'a'")


def test_an_interrupted_scan_never_lends_its_id_to_the_next_one(cp: Checkpoint) -> None:
    """Ctrl-C during a scan: the items it saw must not count as seen by the next scan."""
    with pytest.raises(KeyboardInterrupt), cp.scan():
        cp.mark_seen("a", 1)
        raise KeyboardInterrupt  # stopped half-way: b and c were not reached
    with cp.scan():  # the next scan sees only b (a was deleted in between)
        cp.mark_seen("b", 1)
    assert {r["key"] for r in cp.items()} == {"b"}
    assert cp.counts()[ItemState.PENDING] == 1


def test_possibly_billed_attempts_survive_a_crash_and_a_cancel(tmp_path: Path) -> None:
    path = tmp_path / "job.sqlite"
    first = Checkpoint.open(path, "job")
    with first.scan():
        first.record_scanned(scanned("a", 1))
        first.record_scanned(scanned("b", 2))
    first.begin_run()
    for key in ("a", "b"):
        first.start(key)
        first.count_attempt(key)
    first.record_answer("b", throttled=True)  # b's answer came: a throttle, never billed
    first.close()  # the process dies with a on the wire
    second = Checkpoint.open(path, "job")
    assert second.recover() == 2
    billed = {r["key"]: r["possibly_billed"] for r in second.items()}
    assert billed == {"a": 1, "b": 0}
    second.start("a")
    second.count_attempt("a")
    second.release("a")  # a second Ctrl-C cancels it on the wire
    assert next(r for r in second.items() if r["key"] == "a")["possibly_billed"] == 2
    assert second.retry_failed() == 0
    assert second.pending(0, 10)[0].possibly_billed == 2


def test_a_busy_database_is_waited_for_then_a_bounded_stop(tmp_path: Path) -> None:
    path = tmp_path / "job.sqlite"
    slept: list[float] = []
    cp = Checkpoint.open(path, "job", busy_timeout_s=2.5)
    cp._sleep = slept.append  # virtual back-off: the test does not wait for real
    with cp.scan():
        cp.record_scanned(scanned("a", 1))
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StateUnavailable, match="stayed locked by another process"):
        cp.start("a")
    assert slept and slept == sorted(slept)  # a growing back-off between tries
    other.execute("ROLLBACK")
    cp.start("a")  # the lock is gone: the move goes through
    assert cp.state_of("a") is ItemState.IN_PROGRESS
