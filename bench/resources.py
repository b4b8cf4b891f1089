"""Measures this process's CPU time and peak memory, and runs a measurement in a fresh process.

Peak RSS is a high-water mark for the whole life of a process, so a figure that must not be
polluted by earlier work is measured in a fresh ``python -m bench`` child, which prints its result
as one JSON line prefixed with ``RESULT_PREFIX``. On Linux it is read from ``VmHWM`` (the peak of
the process's own address space since its exec), not from ``ru_maxrss``: the kernel carries the
parent's high-water mark into ``ru_maxrss`` across fork and exec, so a child's ``ru_maxrss`` is
never below its parent's peak.
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
    """This process's own peak resident set size so far, in MiB (VmHWM; ru_maxrss where there is no /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB (inherits the parent's peak)


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
