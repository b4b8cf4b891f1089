"""How a run ends: its exit code, and the last lines that tell a person (or a cron log) what happened.

Exit 1 means *this run* produced failures (named on stderr, the first 20); failures an earlier run
already reported, on unchanged files, are one line and exit 0 (``--strict-exit`` restores "any
failed item → 1"). The last line is worded by how the run ended: done, or stopped by what.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from batch_upscaler.checkpoint import Checkpoint, ItemState
from batch_upscaler.discovery import printable
from batch_upscaler.errors import ExitCode
from batch_upscaler.storage.names import Names

log = logging.getLogger(__name__)
NAMED_FAILURES = 20  # the stderr summary names this many of the run's failed files


def unfinished(counts: Mapping[ItemState, int]) -> int:
    return counts[ItemState.PENDING] + counts[ItemState.IN_PROGRESS]


def exit_code_for(fatal: bool, stopped_by: str | None, counts: Mapping[ItemState, int], new_failures: int,
                  strict: bool = False, scanned: bool = True) -> ExitCode:
    """0 done; 1 this run produced failures (any failed item with ``strict``); 3 fatal; 75 stopped early
    (work left, or a scan that did not finish: its files are not even known yet)."""
    if fatal:
        return ExitCode.FATAL_BACKEND
    if stopped_by and (unfinished(counts) > 0 or not scanned):
        return ExitCode.INTERRUPTED
    failures = counts[ItemState.FAILED] if strict else new_failures
    return ExitCode.ITEMS_FAILED if failures else ExitCode.OK


def stop_line(stopped_by: str | None, pending: int, scanned: bool = True) -> str:
    """How the run ended, in words people and cron logs can act on."""
    if stopped_by is None or (pending == 0 and scanned):
        return "done"
    worded = {
        "max-duration": "stopped: --max-duration reached; run again to resume",
        "max-images": "stopped: --max-images reached; run again to continue",
        "max-cost": "stopped: the next request would pass the cost cap (--max-cost); run again to continue",
        "SIGINT": "stopped by SIGINT (Ctrl-C); run again to resume",
        "SIGTERM": "stopped by SIGTERM; run again to resume",
    }
    return worded.get(stopped_by, f"stopped: {stopped_by}; run again to resume")


def log_summary(names: Names, checkpoint: Checkpoint, run_id: int, stopped_by: str | None,
                counts: Mapping[ItemState, int], new_failures: int, report: str, scanned: bool = True) -> None:
    """The run's last lines: the files that failed in this run (bounded), earlier failures in one
    line, then one line worded by how the run ended."""
    failed = checkpoint.failed_in_run(run_id, NAMED_FAILURES)
    for source, relpath, key, message in failed:
        log.warning("failed this run: %s: %s", printable(names.item(source, relpath, key)), message,
                    extra={"event": "run_failure"})
    failed_list = f"{report.rstrip('/')}/failed.txt"
    if new_failures > len(failed):
        log.warning("… and %d more, see %s", new_failures - len(failed), failed_list)
    old = counts[ItemState.FAILED] - new_failures
    if old > 0:
        log.info("%d item(s) failed in earlier runs and are unchanged (listed in %s; --retry-failed retries them)",
                 old, failed_list, extra={"event": "old_failures"})
    tallies = (f"{counts[ItemState.SUCCEEDED]} succeeded, {counts[ItemState.FAILED]} failed "
               f"({new_failures} this run), {counts[ItemState.SKIPPED]} skipped, {unfinished(counts)} pending")
    if not scanned:
        tallies += " (the scan did not finish: not every file is counted yet)"
    log.info("%s: %s; report in %s", stop_line(stopped_by, unfinished(counts), scanned), tallies, report,
             extra={"event": "run_finished"})
