"""The loop watch combined with itself and with maps: several watches on one loop, stats."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

import corral
from corral._monitor import watch_loop
from test_contract_api import STATS_FIELDS
from test_monitor import line_of

T = TypeVar("T")
WATCHDOG = "corral-loop-watchdog"


def blocker(seconds: float) -> None:
    time.sleep(seconds)  # blocker-sleep


def watchdog_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WATCHDOG]


class _Reports(logging.Handler):
    """Collects the block reports logged on the ``corral`` logger, optionally slowly."""

    def __init__(self, *, sleep: float = 0.0) -> None:
        super().__init__(logging.WARNING)
        self.sleep = sleep
        self.reports: list[corral.BlockReport] = []

    def emit(self, record: logging.LogRecord) -> None:
        report = record.__dict__.get("corral_block_report")
        if report is None:
            return
        self.reports.append(report)
        if self.sleep:
            time.sleep(self.sleep)  # a handler writing to a slow disk or a network


@pytest.fixture
def logged() -> Iterator[Callable[..., _Reports]]:
    """Attach a :class:`_Reports` handler to the ``corral`` logger for the test."""
    attached: list[_Reports] = []
    logger = logging.getLogger("corral")

    def attach(*, sleep: float = 0.0) -> _Reports:
        handler = _Reports(sleep=sleep)
        attached.append(handler)
        logger.addHandler(handler)
        return handler

    yield attach
    for handler in attached:
        logger.removeHandler(handler)


# ---------------------------------------------------------------------------
# Several watches on one loop
# ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_nested_watches_each_record_a_stall_that_is_logged_once(
    logged: Callable[..., _Reports],
) -> None:
    """Two watches see one stall: each keeps its report, the log says it once."""
    seen = logged()
    async with watch_loop(threshold=0.05) as outer, watch_loop(threshold=0.05) as inner:
        await asyncio.sleep(0.02)
        blocker(0.3)
        await asyncio.sleep(0.1)
    line = line_of(blocker, "blocker-sleep")
    assert [(r.function, r.lineno) for r in outer.reports] == [("blocker", line)]
    assert [(r.function, r.lineno) for r in inner.reports] == [("blocker", line)]
    assert [(r.function, r.lineno) for r in seen.reports] == [("blocker", line)]
    assert watchdog_threads() == []


@pytest.mark.slow
async def test_two_watches_and_a_slow_log_handler_do_not_report_each_other(
    logged: Callable[..., _Reports],
) -> None:
    """The time one watch spends logging is not a stall for the other.

    Each watch left out its own logging time but measured its sibling's: the
    one stall was followed by a report of the log handler every 0.2 s, one
    watch blaming the other's logging, for as long as the loop ran.
    """
    slow = logged(sleep=0.6)
    async with watch_loop(threshold=0.05) as outer, watch_loop(threshold=0.05) as inner:
        await asyncio.sleep(0.02)
        blocker(0.3)
        await asyncio.sleep(2.0)  # room for several self-inflicted reports
    assert [r.function for r in outer.reports] == ["blocker"]
    assert [r.function for r in inner.reports] == ["blocker"]
    assert [r.function for r in slow.reports] == ["blocker"]
    # Neither counts the other's logging as lag: the stall is the worst. Counted,
    # the logging right after it would read as 0.9 s (0.3 + 0.6); the bound
    # leaves a loaded machine 0.3 s of slack either way.
    assert outer.max_lag < 0.3 + 0.3
    assert inner.max_lag < 0.3 + 0.3


@pytest.mark.slow
async def test_watches_with_different_thresholds_log_what_either_sees_once(
    logged: Callable[..., _Reports],
) -> None:
    """A stall only the finer watch sees is logged by it; one both see, once."""
    seen = logged()
    async with watch_loop(threshold=0.5) as coarse, watch_loop(threshold=0.05) as fine:
        await asyncio.sleep(0.02)
        blocker(0.2)  # under the coarse threshold
        await asyncio.sleep(0.1)
        blocker(0.8)  # over both
        await asyncio.sleep(0.1)
    # A report's duration may fall short of the stall by up to its watch's interval.
    short, long = fine.reports
    assert 0.15 <= short.duration < 0.5 <= long.duration
    [both] = coarse.reports
    assert both.duration >= 0.6
    assert [r.function for r in seen.reports] == ["blocker", "blocker"]
    assert seen.reports[0] is short


@pytest.mark.slow
async def test_two_monitored_maps_at_once_log_a_stall_once(
    logged: Callable[..., _Reports],
) -> None:
    """gather() of two maps with monitor=: the blocking call is one warning, both maps lag."""
    seen = logged()
    go = asyncio.Event()

    async def calm(item: int) -> int:
        await go.wait()
        return item

    async def blocks(item: int) -> int:
        await asyncio.sleep(0.05)  # both watches have beaten
        if item == 0:
            blocker(0.3)
        go.set()
        return item

    async with asyncio.timeout(30):
        first = corral.map(calm, range(3), monitor=0.05)
        second = corral.map(blocks, range(3), monitor=0.05)
        async with first, second:
            got = await asyncio.gather(
                _collect(first),
                _collect(second),
            )
    assert got == [[0, 1, 2], [0, 1, 2]]
    assert [r.function for r in seen.reports] == ["blocker"]
    for results in (first, second):
        lag = results.stats.max_loop_lag
        assert lag is not None
        assert lag >= 0.25
    assert watchdog_threads() == []


async def _collect(results: corral.ResultStream[T]) -> list[T]:
    return [r async for r in results]


@pytest.mark.slow
async def test_corral_monitor_on_a_map_inside_a_map_logs_a_stall_once(
    logged: Callable[..., _Reports], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CORRAL_MONITOR=1 watches the outer map and the one its fn runs: one warning."""
    monkeypatch.setenv("CORRAL_MONITOR", "1")
    seen = logged()

    async def inner(item: int) -> int:
        await asyncio.sleep(0.15)  # both watches have beaten (threshold 0.1)
        if item == 1:
            blocker(0.4)
        return item

    async def outer(item: int) -> list[int]:
        return await corral.gather(inner, [item, item + 1])

    async with asyncio.timeout(30):
        results = corral.map(outer, range(1))
        got = await _collect(results)
    assert got == [[0, 1]]
    assert [r.function for r in seen.reports] == ["blocker"]
    lag = results.stats.max_loop_lag
    assert lag is not None
    assert lag >= 0.3
    assert watchdog_threads() == []


# ---------------------------------------------------------------------------
# Blame by where the blocking call runs
# ---------------------------------------------------------------------------


async def _sleep_a_little(item: int) -> int:
    await asyncio.sleep(0.01)
    return item


def _block_in_callback(_: asyncio.Future[int]) -> None:
    blocker(0.3)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["consumer", "done-callback"])
async def test_a_stall_outside_fn_is_blamed_where_it_runs(
    where: str, logged: Callable[..., _Reports]
) -> None:
    """The consumer's loop body, or a future's done-callback: blamed at blocker's line."""
    seen = logged()
    async with asyncio.timeout(30):
        async with corral.map(_sleep_a_little, range(4), monitor=0.05) as results:
            async for item in results:
                if item != 1:
                    continue
                if where == "consumer":
                    blocker(0.3)
                else:
                    future = asyncio.get_running_loop().create_future()
                    future.add_done_callback(_block_in_callback)
                    future.set_result(1)
                    await asyncio.sleep(0)
    report = results.stats
    assert report.max_loop_lag is not None
    assert report.max_loop_lag >= 0.25
    [blamed] = seen.reports
    assert (blamed.function, blamed.filename, blamed.lineno) == (
        "blocker",
        __file__,
        line_of(blocker, "blocker-sleep"),
    )


# ---------------------------------------------------------------------------
# Stats of maps that ended at once
# ---------------------------------------------------------------------------


async def test_stats_of_a_map_that_failed_at_once_are_complete_and_json() -> None:
    """Every documented name, JSON-serialisable, latency timed for the failed item."""

    async def fail(item: int) -> int:
        raise KeyError(item)

    results = corral.map(fail, range(3), monitor=True)
    with pytest.raises(KeyError):
        async with results:
            async for _ in results:
                pass
    stats = results.stats.as_dict()
    assert list(stats) == STATS_FIELDS
    assert json.loads(json.dumps(stats)) == stats
    assert stats["failed"] == 1
    assert stats["completed"] == 0
    assert stats["in_flight"] == 0
    for name in ("latency_p50", "latency_p90", "latency_p99", "max_loop_lag"):
        assert isinstance(stats[name], float)
    assert watchdog_threads() == []


async def test_stats_of_a_map_closed_before_it_started_have_no_latency() -> None:
    """Nothing ended: the percentiles are None (null in JSON), the counts zero."""
    results = corral.map(_sleep_a_little, range(3), monitor=True)
    await results.aclose()
    stats = results.stats.as_dict()
    assert list(stats) == STATS_FIELDS
    assert json.loads(json.dumps(stats)) == stats
    assert [stats[n] for n in ("started", "completed", "failed", "in_flight")] == [0, 0, 0, 0]
    assert [stats[n] for n in ("latency_p50", "latency_p90", "latency_p99")] == [None] * 3
    assert watchdog_threads() == []


async def test_stats_of_a_map_cancelled_while_its_calls_wait_count_them_started() -> None:
    """Cancelled with every call waiting: nothing completed, nothing timed, no watch left."""
    never = asyncio.Event()

    async def wait(item: int) -> int:
        await never.wait()
        return item

    results = corral.map(wait, range(3), monitor=True)
    task = asyncio.ensure_future(_collect(results))
    for _ in range(20):  # the workers start their calls within a few turns
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await results.aclose()
    stats = results.stats.as_dict()
    assert json.loads(json.dumps(stats)) == stats
    assert stats["completed"] == 0
    assert stats["failed"] == 0
    assert stats["in_flight"] == 0
    assert [stats[n] for n in ("latency_p50", "latency_p90", "latency_p99")] == [None] * 3
    assert isinstance(stats["max_loop_lag"], float)
    assert watchdog_threads() == []
