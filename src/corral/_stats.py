"""Run statistics: a frozen snapshot, and the latency histogram behind it.

Latency is recorded in a fixed log-linear histogram (16 buckets per power of
two: within 3.2 % of the true value, from 1 µs to a day), so recording costs one
``frexp`` and one list increment, and percentiles cost O(buckets) when a
snapshot is taken. The engine does not time every call: timing two clock reads
per item would cost more than the rest of the engine on a no-op call. It times
every call at first and then one call in ``SAMPLE_STRIDE``, adding each sample
with the weight of the calls it stands for, so percentiles stay unbiased.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

#: Calls timed one by one before the engine switches to sampling.
EXACT_SAMPLES = 1024
#: After that, one call in this many is timed (and counts this many times).
SAMPLE_STRIDE = 16

_SUBBUCKETS = 16
_MIN_EXPONENT = -20  # 2**-20 s ~ 1 µs: anything faster lands in bucket 0
_MAX_EXPONENT = 17  # 2**17 s ~ 36 hours: anything slower lands in the last bucket
_BUCKETS = (_MAX_EXPONENT - _MIN_EXPONENT) * _SUBBUCKETS


class LatencyHistogram:
    """Weighted log-linear histogram of durations in seconds."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.total = 0

    def add(self, seconds: float, weight: int = 1) -> None:
        if seconds <= 0.0:
            index = 0
        else:
            mantissa, exponent = math.frexp(seconds)  # seconds = m * 2**e, 0.5 <= m < 1
            index = (exponent - _MIN_EXPONENT) * _SUBBUCKETS + int(
                (mantissa - 0.5) * (2 * _SUBBUCKETS)
            )
            index = 0 if index < 0 else min(index, _BUCKETS - 1)
        self.counts[index] += weight
        self.total += weight

    def percentile(self, q: float) -> float | None:
        """The duration below which a fraction ``q`` of the weight lies (bucket midpoint)."""
        if self.total == 0:
            return None
        rank = q * self.total
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if count and seen >= rank:
                return _bucket_midpoint(index)
        return _bucket_midpoint(_BUCKETS - 1)  # pragma: no cover - rank <= total always hits


def _bucket_midpoint(index: int) -> float:
    exponent, sub = divmod(index, _SUBBUCKETS)
    low = math.ldexp(0.5 + sub / (2 * _SUBBUCKETS), exponent + _MIN_EXPONENT)
    high = math.ldexp(0.5 + (sub + 1) / (2 * _SUBBUCKETS), exponent + _MIN_EXPONENT)
    return (low + high) / 2


@dataclass(frozen=True, slots=True)
class Stats:
    """A frozen snapshot of one map's progress.

    Attributes:
        started: items taken from the input whose call began: an item still
            waiting for its first start (a Limiter's slot, its turn under
            ``rate="20/s"``) has not started. Once the map has ended, an item
            cancelled while it waited counts as started, as a call cut short.
        completed: items that ended with a result.
        failed: items that ended with an exception (after retries).
        retried: retry attempts made (a call that is re-run counts once per re-run).
        in_flight: items started and not yet ended, those waiting to be retried
            included (0 once the map has ended; calls an early stop cut short
            are ``started - completed - failed``).
        elapsed: seconds since the map started (loop time).
        throughput: items ended per second over ``elapsed``.
        limit: the concurrency limit in force (``None``: unbounded).
        latency_p50, latency_p90, latency_p99: seconds per item, from the start of
            its first attempt to its end (a result or a failure; a call an early
            stop cut short did not end); ``None`` before any item ended.
        max_loop_lag: the longest the event loop was late, in seconds (``None``
            unless the map runs with ``monitor=True``).
    """

    started: int
    completed: int
    failed: int
    retried: int
    in_flight: int
    elapsed: float
    throughput: float
    limit: int | None
    latency_p50: float | None
    latency_p90: float | None
    latency_p99: float | None
    max_loop_lag: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a flat, JSON-serialisable dict."""
        return asdict(self)


class Waiting:
    """How many of a map's items wait for their first start: a Limiter's slot, the rate's turn.

    The engine counts an item started once a worker hands it to the call; an
    item still waiting for its slot or its turn has not started, and stats
    leave it out of ``started`` and ``in_flight`` (the engine's
    ``unstarted``). Else a map on a shared adaptive Limiter, which runs a
    worker per slot the limit may reach (its ``max``), showed hundreds of
    calls in flight under a limit of 4. Only first attempts count: an item
    waiting to be retried has started.

    ``cell`` times a call past its gates: latency runs from the start of the
    first attempt, and waiting for a slot or a turn is no part of it. For a
    call it times, the engine sets ``cell`` to a one-item list holding the
    time it called; the first gate takes it as it is entered (before any
    other task runs), and the last one it passes writes the time into it
    (a gate with another inside it hands it on, the same way). Other calls
    find ``None`` and pay one attribute read.
    """

    __slots__ = ("cell", "count")

    def __init__(self) -> None:
        self.count = 0
        self.cell: list[float] | None = None

    def __call__(self) -> int:
        return self.count
