"""Statistics of counted values (report.json's and report.html's scale factors) equal those of the values."""

from __future__ import annotations

import statistics
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from batch_upscaler.countstats import counted_median, counted_stats


@given(st.lists(st.sampled_from([1.5, 2.0, 2.25, 3.0, 4.0, 4.0625, 8.0]), min_size=1, max_size=60))
def test_the_median_of_counted_values_is_the_median_of_the_values(values: list[float]) -> None:
    """Reports count scale factors (a million items have few distinct ones) instead of listing them."""
    counts = Counter(values)
    assert counted_median(sorted(counts), counts, len(values)) == statistics.median(values)
    stats = counted_stats(counts)
    assert stats is not None and (stats.n, stats.min, stats.max) == (len(values), min(values), max(values))
    assert round(stats.mean, 9) == round(statistics.fmean(values), 9)


def test_no_values_have_no_statistics() -> None:
    assert counted_stats(Counter()) is None
