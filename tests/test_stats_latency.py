"""Latency percentiles: every item that ended counts, and only those.

``stats.latency_p50/p90/p99`` are seconds per item from its first attempt to
its end. The engine times every call at first, then one in ``SAMPLE_STRIDE``
(see corral._stats); on a virtual clock the latencies are exact.
"""

from __future__ import annotations

import asyncio

import pytest

import corral
from _loops import run
from corral._stats import EXACT_SAMPLES, SAMPLE_STRIDE


async def _fail_first_then_sleep(x: int) -> int:
    if x == 0:
        raise ValueError("the first item fails at once")
    await asyncio.sleep(1.0)
    return x


@pytest.mark.parametrize("n", [100, EXACT_SAMPLES + 40 * SAMPLE_STRIDE])
def test_a_failed_call_does_not_stop_the_timing_of_later_calls(n: int) -> None:
    """With return_exceptions, items after a failure are still timed.

    A failure used to leave the worker's sampling countdown at zero, so that
    worker timed nothing more: here the one failure (0 s) stood for the run.
    """

    async def main() -> corral.Stats:
        async with corral.map(
            _fail_first_then_sleep, range(n), limit=1, return_exceptions=True
        ) as results:
            got = [r async for r in results]
        assert isinstance(got[0], ValueError)
        assert got[1:] == list(range(1, n))
        return results.stats

    stats = run(main, virtual_time=True)
    assert stats.failed == 1
    for p in (stats.latency_p50, stats.latency_p90, stats.latency_p99):
        assert p == pytest.approx(1.0, rel=0.04)  # the histogram's buckets: within 3.2%


def test_a_failed_item_ended_and_is_timed() -> None:
    """A failure is an end: its latency counts, as a result's does."""

    async def fails_after(x: int) -> int:
        await asyncio.sleep(x)
        raise ValueError(x)

    async def main() -> corral.Stats:
        async with corral.map(fails_after, [2, 2, 2], limit=3, return_exceptions=True) as results:
            assert len([r async for r in results]) == 3
        return results.stats

    stats = run(main, virtual_time=True)
    assert stats.failed == 3
    assert stats.latency_p50 == pytest.approx(2.0, rel=0.04)


def test_calls_cut_short_are_not_timed() -> None:
    """A call cancelled by an early stop did not end: no latency, as with processes=N."""

    async def main() -> corral.Stats:
        async with corral.map(asyncio.sleep, [3600.0] * 4, limit=4) as results:
            await asyncio.sleep(5.0)
            results.cancel()
            assert [r async for r in results] == []
        return results.stats

    stats = run(main, virtual_time=True)
    assert (stats.started, stats.completed, stats.failed) == (4, 0, 0)
    assert stats.latency_p50 is None
    assert stats.latency_p99 is None
