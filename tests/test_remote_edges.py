"""processes=N at its edges: ending at every point, exactly once, the window.

The worker processes are real; the calls log ``pid x`` to a file (see
``_work.async_logged``), so the tests know which items were called.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import corral
from _work import async_logged, async_logged_dies_at_25, logged_calls, no_worker_left
from corral._shard import sharded_call

pytestmark = pytest.mark.slow

SLOW = 10**6  # async_logged sleeps a minute on items from here on


def items(log: Path, xs: range | list[int]) -> list[tuple[str, int]]:
    return [(str(log), x) for x in xs]


async def test_cancel_before_iterating_starts_no_process_and_yields_nothing(
    tmp_path: Path,
) -> None:
    """cancel() before the first result is asked for: the map never starts, as in one
    process (fn is never called) and iteration ends at once without an error."""
    log = tmp_path / "calls"
    async with asyncio.timeout(60):  # hang guard
        stream = corral.map(async_logged, items(log, range(5)), processes=2, limit=2)
        stream.cancel()
        async with stream:
            got = [r async for r in stream]
    assert got == []
    assert not log.exists()
    stats = stream.stats
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (0, 0, 0, 0)
    await no_worker_left(400)


async def test_cancel_twice_and_after_the_end_change_nothing(tmp_path: Path) -> None:
    """cancel() after the end, and again: the results and stats stay as they were."""
    log = tmp_path / "calls"
    async with asyncio.timeout(60):  # hang guard
        async with corral.map(async_logged, items(log, range(6)), processes=2) as out:
            got = [r async for r in out]
            out.cancel()
            out.cancel()
            assert [r async for r in out] == []
        out.cancel()
    assert got == [x * x for x in range(6)]
    stats = out.stats
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (6, 6, 0, 0)
    await no_worker_left(400)


async def test_two_concurrent_acloses_both_return_once_the_workers_are_gone(
    tmp_path: Path,
) -> None:
    """aclose() from two tasks at once while calls sleep: both return, nothing remains."""
    log = tmp_path / "calls"
    async with asyncio.timeout(60):  # hang guard
        stream = corral.map(async_logged, items(log, [0, SLOW, SLOW + 1]), processes=2)
        async with stream:
            assert await anext(stream) == 0
            while len(logged_calls(log)) < 3:  # both slow calls are running
                await asyncio.sleep(0.01)
            await asyncio.gather(stream.aclose(), stream.aclose())
            assert [r async for r in stream] == []
    assert stream.stats.in_flight == 0
    assert stream.stats.completed == 1
    await no_worker_left(400)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_input_that_raises_midway_ends_the_map_with_its_error(
    tmp_path: Path, kind: str
) -> None:
    """The input raises after 5 items: the map raises that error, each result handed
    out at most once and in order, and no process remains."""
    log = tmp_path / "calls"

    def sync_items() -> Iterator[tuple[str, int]]:
        yield from items(log, range(5))
        raise LookupError("the input broke")

    async def async_items() -> AsyncIterator[tuple[str, int]]:
        for item in sync_items():
            yield item

    source: Any = sync_items() if kind == "sync" else async_items()
    got: list[int] = []
    async with asyncio.timeout(60):  # hang guard
        with pytest.raises(LookupError, match="the input broke"):
            async with corral.map(async_logged, source, processes=2, limit=2) as out:
                async for value in out:
                    got.append(value)
    assert got == [x * x for x in range(len(got))]
    assert out.stats.in_flight == 0
    await no_worker_left(400)


async def test_an_async_input_that_blocks_ends_on_cancel(tmp_path: Path) -> None:
    """An async input whose next item never comes: results so far, then cancel() ends
    the map; the input is closed and no process remains."""
    log = tmp_path / "calls"
    closed = asyncio.Event()

    async def source() -> AsyncIterator[tuple[str, int]]:
        try:
            for item in items(log, range(3)):
                yield item
            await asyncio.Event().wait()  # never set
        finally:
            closed.set()

    async with asyncio.timeout(60):  # hang guard
        async with corral.map(async_logged, source(), processes=2) as out:
            got = []
            async for value in out:
                got.append(value)
                if len(got) == 3:
                    out.cancel()
    assert got == [0, 1, 4]
    assert closed.is_set()
    stats = out.stats
    assert (stats.completed, stats.in_flight) == (3, 0)
    await no_worker_left(400)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("ordered", [True, False])
async def test_an_endless_input_and_a_consumer_that_never_reads_stay_in_the_window(
    tmp_path: Path, kind: str, ordered: bool
) -> None:
    """limit=2 (window 4 x 2 = 8): the run pulls 8 items, runs them, and waits."""
    log = tmp_path / "calls"
    pulled = 0

    def endless() -> Iterator[tuple[str, int]]:
        nonlocal pulled
        for x in range(10**9):
            pulled += 1
            yield (str(log), x)

    async def endless_async() -> AsyncIterator[tuple[str, int]]:
        for item in endless():
            yield item

    source: Any = endless() if kind == "sync" else endless_async()
    async with asyncio.timeout(60):  # hang guard
        async with corral.map(async_logged, source, processes=2, limit=2, ordered=ordered) as out:
            while out.stats.completed < 8:
                await asyncio.sleep(0.02)
            for _ in range(20):  # room would show now: results came back, none read
                await asyncio.sleep(0.01)
            assert pulled == 8
            assert len(logged_calls(log)) == 8
            assert out.stats.completed == 8
            assert await anext(out) in {x * x for x in range(8)}
            while pulled < 9:
                await asyncio.sleep(0.01)
    await no_worker_left(400)


async def test_calls_cut_short_by_cancel_still_count_as_started(tmp_path: Path) -> None:
    """Two calls sleep when cancel() comes: started stays 3 (as in one process), none is
    in flight, one completed."""
    log = tmp_path / "calls"
    async with asyncio.timeout(60):  # hang guard
        async with corral.map(
            async_logged, items(log, [0, SLOW, SLOW + 1]), processes=2, limit=4
        ) as out:
            assert await anext(out) == 0
            while out.stats.started < 3:  # the processes report both slow calls started
                await asyncio.sleep(0.02)
            assert out.stats.in_flight == 2
            out.cancel()
            stats = out.stats
            assert (stats.started, stats.completed, stats.in_flight) == (3, 1, 0)
            assert [r async for r in out] == []
    stats = out.stats
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (3, 1, 0, 0)
    await no_worker_left(400)


async def test_a_cancelled_clean_close_of_the_engines_call_still_stops_the_run(
    tmp_path: Path,
) -> None:
    """The engine's close hook is cancelled (an outer timeout, a second Ctrl-C) while it
    waits for the processes to finish: the run is closed all the same, then the
    cancellation is raised."""
    log = tmp_path / "calls"
    call = sharded_call(async_logged, processes=2, limit=2, rate=None, timeout=None, retry=None)
    async with asyncio.timeout(60):  # hang guard
        assert await call((str(log), 3)) == 9
        closing = asyncio.create_task(call.close(True))
        # The close waits for the processes' "done", which needs a round trip to them
        # that has not begun yet ("end" is sent by the feeder, woken by the close).
        await asyncio.sleep(0)
        assert not closing.done()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
    assert call._run.finished
    await no_worker_left(400)


async def test_a_dead_process_ends_the_map_with_consistent_stats(tmp_path: Path) -> None:
    """Item 25's process dies: WorkerCrashed; every result handed out once and in order
    before it; nothing left in flight, no process left."""
    log = tmp_path / "calls"
    got: list[int] = []
    async with asyncio.timeout(60):  # hang guard
        with pytest.raises(corral.WorkerCrashed):
            async with corral.map(
                async_logged_dies_at_25, items(log, range(40)), processes=2, limit=4
            ) as out:
                async for value in out:
                    got.append(value)
    assert got == [x * x for x in range(len(got))]
    assert len(got) < 40
    stats = out.stats
    assert stats.in_flight == 0
    assert stats.completed >= len(got)
    assert stats.started >= stats.completed + stats.failed
    await no_worker_left(400)


@pytest.mark.parametrize("ordered", [True, False])
async def test_cancel_with_the_engine_in_front_keeps_each_result_once(
    tmp_path: Path, ordered: bool
) -> None:
    """progress= puts corral's engine in front of the processes; cancel() after the quick
    items: each of their results once, the sleeping calls stopped with their processes."""
    log = tmp_path / "calls"
    xs = [*range(6), SLOW, SLOW + 1]
    got: list[int] = []
    async with asyncio.timeout(60):  # hang guard
        async with corral.map(
            async_logged,
            items(log, xs),
            processes=2,
            limit=4,
            ordered=ordered,
            progress=lambda stats: None,
        ) as out:
            async for value in out:
                got.append(value)
                if len(got) == 6:
                    out.cancel()
    assert sorted(got) == [x * x for x in range(6)]
    if ordered:
        assert got == [x * x for x in range(6)]
    stats = out.stats
    assert (stats.completed, stats.failed, stats.in_flight) == (6, 0, 0)
    await no_worker_left(400)


async def test_the_parent_task_cancelled_while_the_input_blocks(tmp_path: Path) -> None:
    """The consumer's task is cancelled while the async input waits for its next item:
    the input is closed, the processes stopped, and the cancellation raised."""
    log = tmp_path / "calls"
    closed = asyncio.Event()
    got: list[int] = []

    async def source() -> AsyncIterator[tuple[str, int]]:
        try:
            for item in items(log, range(2)):
                yield item
            await asyncio.Event().wait()  # never set
        finally:
            closed.set()

    async def consume() -> None:
        async with corral.map(async_logged, source(), processes=2) as out:
            async for value in out:
                got.append(value)

    async with asyncio.timeout(60):  # hang guard
        task = asyncio.create_task(consume())
        while len(got) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert got == [0, 1]
    assert closed.is_set()
    await no_worker_left(400)


async def test_an_empty_input_of_either_kind(tmp_path: Path) -> None:
    """No item: no result, stats all zero, no process left."""

    async def nothing() -> AsyncIterator[int]:
        return
        yield

    async with asyncio.timeout(60):  # hang guard
        for source in ([], nothing()):
            async with corral.map(async_logged, source, processes=2) as out:
                assert [r async for r in out] == []
            stats = out.stats
            assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (0, 0, 0, 0)
    await no_worker_left(400)


@pytest.mark.parametrize("ordered", [True, False])
async def test_the_deadline_with_the_engine_in_front_reports_each_item_once(
    tmp_path: Path, ordered: bool
) -> None:
    """deadline= and return_exceptions=True on processes: one outcome per item, the
    sleeping ones DeadlineExceeded, fn called at most once per item."""
    log = tmp_path / "calls"
    xs = [0, 1, SLOW, 2, SLOW + 1, 3, 4]
    async with asyncio.timeout(60):  # hang guard
        async with corral.map(
            async_logged,
            items(log, xs),
            processes=2,
            limit=2,
            deadline=3.0,
            ordered=ordered,
            return_exceptions=True,
        ) as out:
            got = [r async for r in out]
    assert len(got) == len(xs)
    outcomes = got if ordered else sorted(got, key=repr)
    if ordered:
        for x, outcome in zip(xs, outcomes, strict=True):
            if x >= SLOW:
                assert isinstance(outcome, corral.DeadlineExceeded)
            else:
                assert outcome == x * x or isinstance(outcome, corral.DeadlineExceeded)
    assert sum(isinstance(r, corral.DeadlineExceeded) for r in got) >= 2
    values = [r for r in got if not isinstance(r, corral.DeadlineExceeded)]
    assert len(set(values)) == len(values)
    assert set(values) <= {x * x for x in xs if x < SLOW}
    calls = [x for _, x in logged_calls(log)]
    assert len(calls) == len(set(calls))
    assert out.stats.in_flight == 0
    await no_worker_left(400)


class InputStopped(BaseException):
    """Not an Exception: the input ending with it is no normal end of the input."""


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_input_raising_a_base_exception_ends_the_map_with_it(
    tmp_path: Path, kind: str
) -> None:
    """As in one process: a BaseException (not an Exception) from the input is raised to
    the consumer, rather than the map waiting for ever for the rest of the input."""
    log = tmp_path / "calls"

    def sync_items() -> Iterator[tuple[str, int]]:
        yield from items(log, range(2))
        raise InputStopped("stop")

    async def async_items() -> AsyncIterator[tuple[str, int]]:
        for item in sync_items():
            yield item

    source: Any = sync_items() if kind == "sync" else async_items()
    async with asyncio.timeout(20):  # hang guard: before, the map waited for ever
        with pytest.raises(InputStopped, match="stop"):
            async with corral.map(async_logged, source, processes=2) as out:
                async for _ in out:
                    pass
    assert out.stats.in_flight == 0
    await no_worker_left(400)


async def slow_to_close(
    log: Path, cleaning: asyncio.Event, release: asyncio.Event
) -> AsyncIterator[tuple[str, int]]:
    """One item, then a wait for ever; closed, it sets ``cleaning`` and waits for
    ``release``: an async cleanup (closing a connection, say) that takes its time."""
    try:
        yield (str(log), 0)
        await asyncio.Event().wait()  # never set: the feeder waits here
    finally:
        cleaning.set()
        await release.wait()


async def test_a_cancelled_aclose_still_finishes_every_task_then_raises(tmp_path: Path) -> None:
    """aclose() is cancelled while the async input still cleans up: the close goes on
    until the feeder has finished and the input is closed, then raises the
    cancellation (as in one process), leaving no task and no process."""
    log = tmp_path / "calls"
    cleaning, release = asyncio.Event(), asyncio.Event()

    async with asyncio.timeout(60):  # hang guard
        stream = corral.map(async_logged, slow_to_close(log, cleaning, release), processes=2)
        async with stream:
            assert await anext(stream) == 0
            closing = asyncio.create_task(stream.aclose())
            await cleaning.wait()
            closing.cancel()
            left: list[int] = []
            closing.add_done_callback(lambda _: left.append(len(stream._run._tasks)))
            # The close must not end while the input's cleanup runs: give it the time
            # to (it would take far less), then let the cleanup finish.
            for _ in range(250):
                if closing.done():
                    break
                await asyncio.sleep(0.02)
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await closing
        assert left == [0]  # every task of the run had finished when the close ended
        assert stream._run.finished
    await no_worker_left(400)


async def test_a_worker_lost_after_the_last_outcome_is_raised_by_the_clean_close(
    tmp_path: Path,
) -> None:
    """With the engine in front, a worker that dies once every outcome is in (before
    the close) still ends the map with WorkerCrashed, as it does during the close and
    without the engine: whether it is raised does not depend on when it came."""
    log = tmp_path / "calls"
    call = sharded_call(async_logged, processes=2, limit=2, rate=None, timeout=None, retry=None)
    async with asyncio.timeout(60):  # hang guard
        assert await call((str(log), 3)) == 9
        run = call._run
        child = run._children[0]
        assert child.process is not None
        assert child.process.pid is not None
        os.kill(child.process.pid, signal.SIGKILL)
        for _ in range(400):  # the loss is noticed through its link and the exit code
            if run._error is not None:
                break
            await asyncio.sleep(0.01)
        assert isinstance(run._error, corral.WorkerCrashed)
        with pytest.raises(corral.WorkerCrashed):
            await call.close(True)
    assert run.finished
    await no_worker_left(400)


async def test_a_second_aclose_cancelled_while_the_first_runs_waits_for_it_then_raises(
    tmp_path: Path,
) -> None:
    """Two acloses, the second cancelled while the first waits for the input's cleanup:
    the second does not return before the first has finished (its caller's
    ``async with`` would end with the run still stopping), then raises the cancellation."""
    log = tmp_path / "calls"
    cleaning, release = asyncio.Event(), asyncio.Event()

    async with asyncio.timeout(60):  # hang guard
        stream = corral.map(async_logged, slow_to_close(log, cleaning, release), processes=2)
        async with stream:
            assert await anext(stream) == 0
            first = asyncio.create_task(stream.aclose())
            await cleaning.wait()
            second = asyncio.create_task(stream.aclose())
            await asyncio.sleep(0)  # the second is waiting for the first
            second.cancel()
            try:
                for _ in range(50):  # time for a second that returns early to do so
                    await asyncio.sleep(0)
                assert not second.done()
            finally:
                release.set()
            await first
            with pytest.raises(asyncio.CancelledError):
                await second
        assert stream._run.finished
    await no_worker_left(400)
