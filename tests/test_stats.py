"""The latency histogram and the stats snapshot."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral._stats import LatencyHistogram, Stats


def test_empty_histogram_has_no_percentiles() -> None:
    """Before any sample, percentiles are None."""
    assert LatencyHistogram().percentile(0.5) is None


@given(st.floats(1e-6, 1e4))
def test_a_single_duration_is_recovered_within_resolution(seconds: float) -> None:
    """One sample's percentile is that sample, within the bucket resolution (~3 %)."""
    histogram = LatencyHistogram()
    histogram.add(seconds)
    assert histogram.percentile(0.5) == pytest.approx(seconds, rel=0.033)


def test_percentiles_follow_the_weights() -> None:
    """p50/p99 of 90 fast and 10 slow samples: fast and slow respectively."""
    histogram = LatencyHistogram()
    histogram.add(0.001, weight=90)
    histogram.add(1.0, weight=10)
    assert histogram.percentile(0.5) == pytest.approx(0.001, rel=0.033)
    assert histogram.percentile(0.95) == pytest.approx(1.0, rel=0.033)
    assert histogram.total == 100


def test_out_of_range_durations_are_clamped() -> None:
    """Zero, negative and absurdly long durations land in the end buckets, never fail."""
    histogram = LatencyHistogram()
    for seconds in (0.0, -1.0, 1e-12, 1e12):
        histogram.add(seconds)
    assert histogram.total == 4
    assert histogram.percentile(0.0) is not None
    assert histogram.percentile(1.0) is not None


def test_stats_as_dict_is_flat_and_json_serialisable() -> None:
    """as_dict() has every documented field and dumps to JSON."""
    stats = Stats(3, 2, 1, 4, 0, 1.5, 2.0, 10, 0.1, 0.2, 0.3, None)
    data = stats.as_dict()
    assert list(data) == [
        "started",
        "completed",
        "failed",
        "retried",
        "in_flight",
        "elapsed",
        "throughput",
        "limit",
        "latency_p50",
        "latency_p90",
        "latency_p99",
        "max_loop_lag",
    ]
    assert json.loads(json.dumps(data)) == data
