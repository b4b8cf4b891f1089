"""Measures this process's CPU time and peak memory, and runs a measurement in a fresh process.

Peak RSS (``ru_maxrss``) is a high-water mark for the whole life of a process, so a figure that
must not be polluted by earlier work is measured in a fresh ``python -m bench`` child, which
prints its result as one JSON line prefixed with ``RESULT_PREFIX``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH-RESULT "
_REPO = Path(__file__).resolve().parents[1]


def cpu_times() -> tuple[float, float]:
    """(user, system) CPU seconds of this process (all its threads), not of its children."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads), not of its children."""
    return sum(cpu_times())


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(result: dict[str, Any]) -> None:
    """The child's side: hand ``result`` to the parent."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def in_fresh_process(args: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """Run ``python -m bench ARGS`` and return the result it emitted; its stderr is passed through."""
    completed = subprocess.run([sys.executable, "-m", "bench", *args], cwd=_REPO, stdout=subprocess.PIPE,
                               text=True, timeout=timeout_s, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"bench child {' '.join(args)} exited {completed.returncode} without a result:\n"
                           + completed.stdout[-2000:])
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX):])
    return result
