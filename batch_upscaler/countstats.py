"""Statistics of values kept as counts (value -> how many items have it).

A report over a million items keeps its scale factors this way: a job has few distinct factors,
so memory stays flat however many items there are. Used by report.json and report.html alike.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class CountedStats:
    n: int
    min: float
    median: float
    max: float
    mean: float


def counted_stats(counts: Counter[float]) -> CountedStats | None:
    """min, median, max and mean of the values ``counts`` holds; None when it holds none."""
    values = sorted(value for value, n in counts.items() if n > 0)
    n = sum(counts[value] for value in values)
    if not n:
        return None
    return CountedStats(n=n, min=values[0], median=counted_median(values, counts, n), max=values[-1],
                        mean=math.fsum(value * counts[value] for value in values) / n)


def counted_median(values: list[float], counts: Counter[float], n: int) -> float:
    """The median of ``n`` values given as their sorted distinct ``values`` and ``counts``."""
    wanted = [(n - 1) // 2, n // 2]  # the middle one, or the two middle ones
    found: list[float] = []
    seen = 0
    for value in values:
        seen += counts[value]
        while wanted and wanted[0] < seen:
            found.append(value)
            wanted.pop(0)
        if not wanted:
            break
    return (found[0] + found[1]) / 2
