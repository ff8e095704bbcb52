"""The engine's guarantees: limits, order, exactly-once, bounded memory, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import corral
from _loops import run


class Spy:
    """Stand-in fn that records the most calls ever in flight."""

    def __init__(self, yields: int = 3) -> None:
        self.running = 0
        self.peak = 0
        self.calls = 0
        self.yields = yields

    async def __call__(self, item: int) -> int:
        self.calls += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            for _ in range(self.yields):
                await asyncio.sleep(0)  # yield so calls overlap
        finally:
            self.running -= 1
        return item * 2


class Counted:
    """An input iterator that counts how many items were pulled from it."""

    def __init__(self, n: int | None = None) -> None:
        self.pulled = 0
        self._items: Iterator[int] = iter(range(n)) if n is not None else itertools.count()

    def __iter__(self) -> Counted:
        return self

    def __next__(self) -> int:
        item = next(self._items)
        self.pulled += 1
        return item


def no_tasks_but_current() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


# -- limits -------------------------------------------------------------------


async def test_limit_is_reached_and_never_exceeded() -> None:
    """With limit=7, exactly 7 calls run at once at the peak, never more."""
    spy = Spy()
    async with asyncio.timeout(10):  # hang guard, not the assertion
        assert await corral.gather(spy, range(1000), limit=7) == [i * 2 for i in range(1000)]
    assert spy.peak == 7


async def test_limit_none_runs_every_call_at_once() -> None:
    """limit=None is unbounded: all 500 calls are in flight together (each waits for all)."""
    n = 500
    started = 0
    everyone = asyncio.Event()

    async def rendezvous(item: int) -> int:
        nonlocal started
        started += 1
        if started == n:
            everyone.set()
        await everyone.wait()
        return item

    async with asyncio.timeout(10):
        assert await corral.gather(rendezvous, range(n), limit=None) == list(range(n))


async def test_shared_limiter_holds_across_maps() -> None:
    """Two maps sharing a Limiter(limit=5) never have more than 5 calls in flight together."""
    spy = Spy()
    shared = corral.Limiter(limit=5)
    async with asyncio.timeout(10):
        await asyncio.gather(
            corral.gather(spy, range(300), limit=shared),
            corral.gather(spy, range(300), limit=shared),
        )
    assert spy.peak == 5
    assert shared.in_flight == 0


@pytest.mark.virtual_time
async def test_rate_spaces_starts_evenly() -> None:
    """rate=Rate(2, per=1, burst=1) starts calls exactly every 0.5 s."""
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def record(item: int) -> None:
        starts.append(loop.time())

    t0 = loop.time()
    await corral.gather(record, range(5), rate=corral.Rate(2, per=1.0, burst=1))
    assert [s - t0 for s in starts] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])


@pytest.mark.virtual_time
async def test_rate_string_is_understood() -> None:
    """rate='600/min' means one start every 0.1 s."""
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def record(item: int) -> None:
        starts.append(loop.time())

    await corral.gather(record, range(4), rate="600/min")
    assert [b - a for a, b in itertools.pairwise(starts)] == pytest.approx([0.1] * 3)


# -- order and exactly-once ---------------------------------------------------


@pytest.mark.virtual_time
async def test_ordered_results_follow_input_order() -> None:
    """ordered=True yields in input order even when later items finish first."""

    async def slower_first(item: int) -> int:
        await asyncio.sleep(10 - item)
        return item

    async with corral.map(slower_first, range(10), limit=10) as results:
        assert [r async for r in results] == list(range(10))


@pytest.mark.virtual_time
async def test_unordered_results_come_as_completed() -> None:
    """ordered=False yields each result as soon as its call ends."""

    async def slower_first(item: int) -> int:
        await asyncio.sleep(10 - item)
        return item

    async with corral.map(slower_first, range(10), limit=10, ordered=False) as results:
        assert [r async for r in results] == list(reversed(range(10)))


def _exactly_once_case(
    delays: list[int], fail: set[int], limit: int, ordered: bool, stop_after: int | None
) -> None:
    async def work(item: int) -> int:
        await asyncio.sleep(delays[item])
        if item in fail:
            raise KeyError(item)
        return item

    async def main() -> list[object]:
        seen: list[object] = []
        async with corral.map(
            work, range(len(delays)), limit=limit, ordered=ordered, return_exceptions=True
        ) as results:
            async for r in results:
                seen.append(r)
                if stop_after is not None and len(seen) >= stop_after:
                    break
        assert no_tasks_but_current()
        return seen

    seen = run(main, virtual_time=True)
    keys = [r.args[0] if isinstance(r, KeyError) else r for r in seen]
    if stop_after is None:
        assert sorted(keys) == list(range(len(delays)))  # type: ignore[type-var]
    assert len(set(keys)) == len(keys)  # never duplicated
    if ordered:
        assert keys == list(range(len(keys)))
    for r in seen:
        assert isinstance(r, KeyError) == ((r.args[0] if isinstance(r, KeyError) else r) in fail)


@settings(max_examples=60, deadline=None)
@given(
    delays=st.lists(st.integers(0, 5), max_size=60),
    fail_every=st.integers(2, 7),
    limit=st.integers(1, 12),
    ordered=st.booleans(),
    stop_after=st.none() | st.integers(1, 30),
)
def test_each_item_yields_exactly_once(
    delays: list[int], fail_every: int, limit: int, ordered: bool, stop_after: int | None
) -> None:
    """Under random latencies, failures and early exits: no item lost or duplicated, order kept."""
    fail = {i for i in range(len(delays)) if i % fail_every == 1}
    _exactly_once_case(delays, fail, limit, ordered, stop_after)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), limit=st.integers(1, 50), yields=st.integers(0, 3))
def test_gather_returns_every_result_in_order(n: int, limit: int, yields: int) -> None:
    """gather returns exactly one result per item, in input order, on every loop kind."""
    from _loops import LOOP_KINDS

    spy = Spy(yields)
    for kind in LOOP_KINDS:
        assert run(lambda: corral.gather(spy, range(n), limit=limit), kind) == [
            i * 2 for i in range(n)
        ]


# -- bounded memory -----------------------------------------------------------


async def test_slow_head_item_pauses_new_starts() -> None:
    """ordered=True: while item 0 hangs, only about 2*limit later items are pulled."""
    release = asyncio.Event()
    source = Counted()  # endless

    async def head_blocks(item: int) -> int:
        if item == 0:
            await release.wait()
        return item

    async with asyncio.timeout(10), corral.map(head_blocks, source, limit=10) as results:
        for _ in range(50):
            await asyncio.sleep(0)  # let the workers run as far as they may
        assert source.pulled <= 2 * 10 + 10
        release.set()
        got = [r async for r in _take(results, 100)]
    assert got == list(range(100))


async def _take(results: corral.ResultStream[int], n: int) -> AsyncIterator[int]:
    async for r in results:
        yield r
        n -= 1
        if n == 0:
            return


async def test_slow_consumer_bounds_buffered_results() -> None:
    """ordered=False: a consumer that stops reading stops the pulling after ~2*limit items."""
    source = Counted()

    async def instant(item: int) -> int:
        return item

    async with asyncio.timeout(10), corral.map(instant, source, limit=4, ordered=False) as rs:
        first = await anext(rs)
        for _ in range(50):
            await asyncio.sleep(0)  # the consumer dawdles; workers run
        assert source.pulled <= 2 * 4 + 4 + 1
    assert first == 0


# -- failures ------------------------------------------------------------------


async def test_first_failure_cancels_in_flight_calls_and_is_raised_as_itself() -> None:
    """A failing call cancels the others, stops the pulling, and its exception object is raised."""
    cancelled = 0
    source = Counted(10_000)
    boom = ValueError("item 5 is bad")

    async def work(item: int) -> int:
        nonlocal cancelled
        if item == 5:
            raise boom
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return item

    with pytest.raises(ValueError) as info:
        await corral.gather(work, source, limit=10)
    assert info.value is boom
    assert cancelled >= 5
    assert source.pulled < 100
    assert no_tasks_but_current()


async def test_failure_in_stream_raises_in_consumer() -> None:
    """In a streaming map the failure reaches the consumer's async for, after cleanup."""

    async def work(item: int) -> int:
        if item == 3:
            raise KeyError(item)
        await asyncio.sleep(0)  # let the others run a little
        return item

    with pytest.raises(KeyError):
        async with corral.map(work, range(100), limit=4) as results:
            async for _ in results:
                pass
    assert no_tasks_but_current()


async def test_return_exceptions_puts_the_exception_in_place() -> None:
    """return_exceptions=True: a failed item's exception object is its result."""

    async def work(item: int) -> int:
        if item % 3 == 0:
            raise LookupError(item)
        return item

    results = await corral.gather(work, range(7), return_exceptions=True)
    assert [type(r) if isinstance(r, Exception) else r for r in results] == [
        LookupError,
        1,
        2,
        LookupError,
        4,
        5,
        LookupError,
    ]


async def test_input_iterator_error_fails_the_run() -> None:
    """An exception raised by the input itself is raised to the caller."""

    def items() -> Iterator[int]:
        yield 1
        raise OSError("input broke")

    async def ident(item: int) -> int:
        return item

    with pytest.raises(OSError, match="input broke"):
        await corral.gather(ident, items())


async def test_async_input_error_fails_the_run() -> None:
    """An exception raised by an async input is raised to the consumer."""

    async def items() -> AsyncIterator[int]:
        yield 1
        raise OSError("stream broke")

    async def ident(item: int) -> int:
        return item

    with pytest.raises(OSError, match="stream broke"):
        await corral.gather(ident, items(), return_exceptions=True)


async def test_fn_raising_cancelled_error_fails_the_run_instead_of_losing_the_item() -> None:
    """A CancelledError raised by fn itself (not by corral) is an error, not a silent drop."""

    async def rogue(item: int) -> int:
        if item == 2:
            raise asyncio.CancelledError
        return item

    with pytest.raises(RuntimeError, match="raised CancelledError for item 2"):
        await corral.gather(rogue, range(5), return_exceptions=True)
    seen = []
    with pytest.raises(RuntimeError, match="raised CancelledError for item 2"):
        async with corral.map(rogue, range(5), limit=1, return_exceptions=True) as results:
            async for value in results:
                seen.append(value)
    assert seen == [0, 1]
    stats = results.stats  # the failure that ended the run is no result handed out
    assert (stats.started, stats.completed, stats.failed) == (3, 2, 1)


class Boom(BaseException):
    """Not an Exception: like pytest's own outcomes, or a framework's control flow."""


@pytest.mark.parametrize("limit", [1, 4])
async def test_a_base_exception_from_fn_fails_the_run_instead_of_ending_it_short(
    limit: int,
) -> None:
    async def boom(item: int) -> int:
        if item == 3:
            raise Boom(item)
        await asyncio.sleep(0)
        return item

    with pytest.raises(Boom):
        await corral.gather(boom, range(10), limit=limit)
    seen: list[int] = []
    with pytest.raises(Boom):
        async with corral.map(boom, range(10), limit=limit) as results:
            async for value in results:
                seen.append(value)
    # One at a time, 0-2 are done before 3 starts. With four running, 3 may
    # fail the run before 2 is handed out (the eager task factory runs 3's
    # first step at once): what is delivered is an in-order prefix, never more.
    expected = [0, 1, 2] if limit == 1 else [0, 1, 2][: len(seen)]
    assert seen == expected
    assert no_tasks_but_current()


async def test_stop_async_iteration_from_fn_is_an_error_not_the_end_of_the_results() -> None:
    async def exhausted() -> AsyncIterator[int]:
        return
        yield

    async def fn(item: int) -> int:
        if item == 2:
            return await anext(exhausted())  # raises StopAsyncIteration
        return item

    seen: list[int] = []
    with pytest.raises(RuntimeError, match="raised StopAsyncIteration for item 2") as caught:
        async with corral.map(fn, range(5), limit=1) as results:
            async for value in results:
                seen.append(value)
    assert seen == [0, 1]
    assert isinstance(caught.value.__cause__, StopAsyncIteration)
    # As a value in its item's place it is no error.
    outcomes = await corral.gather(fn, range(4), return_exceptions=True)
    assert isinstance(outcomes[2], StopAsyncIteration)


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_stop_iteration_from_a_plain_fn_is_an_error_not_a_hang(executor: str) -> None:
    with pytest.raises(RuntimeError, match="raised StopIteration for item 3"):
        await asyncio.wait_for(
            corral.gather(_stop_at_three, range(6), executor=executor, limit=2), 60
        )


def _stop_at_three(item: int) -> int:
    if item == 3:
        raise StopIteration
    return item


class Swallower:
    """fn that swallows its first cancellation and returns instead (as a buggy
    ``wait_for`` on Python 3.11 may), and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, item: int) -> int:
        self.calls += 1
        try:
            await asyncio.sleep(3600 if item > 0 else 0)
        except asyncio.CancelledError:
            return -item
        return item


@pytest.mark.parametrize("exit_by", ["break", "failure"])
async def test_a_call_that_swallows_its_cancellation_does_not_lead_on_to_more_calls(
    exit_by: str,
) -> None:
    """Leaving the map cancels the calls: one that returns anyway ends its worker.

    Before, the worker took the next item, and the map waited for it forever.
    """
    swallower = Swallower()
    async with asyncio.timeout(30):
        with pytest.raises(KeyError) if exit_by == "failure" else contextlib.nullcontext():
            async with corral.map(swallower, range(1000), limit=4) as results:
                async for _ in results:
                    if exit_by == "failure":
                        raise KeyError("the consumer failed")
                    break
    assert swallower.calls <= 8
    assert no_tasks_but_current()


async def test_cancel_stops_new_starts_even_when_calls_swallow_their_cancellation() -> None:
    swallower = Swallower()
    async with corral.map(swallower, itertools.count(), limit=4, ordered=False) as results:
        seen = []
        async for value in results:
            seen.append(value)
            if len(seen) == 1:
                results.cancel()
    assert swallower.calls <= 5
    assert sorted(seen) == sorted(-i for i in range(swallower.calls))
    assert no_tasks_but_current()


# -- cleanup on every exit path ------------------------------------------------


class Tracker:
    """fn that records which calls were cancelled and which ran to the end."""

    def __init__(self) -> None:
        self.started = 0
        self.finished = 0
        self.cancelled = 0

    async def __call__(self, item: int) -> int:
        self.started += 1
        try:
            if item > 0:
                await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return item

    @property
    def in_flight(self) -> int:
        return self.started - self.finished - self.cancelled


async def test_break_cancels_and_awaits_everything() -> None:
    """Leaving async with by break leaves no task and no call running."""
    tracker = Tracker()
    async with corral.map(tracker, range(100), limit=8) as results:
        async for _ in results:
            break
    assert tracker.in_flight == 0
    assert tracker.cancelled > 0
    assert no_tasks_but_current()


async def test_consumer_exception_cancels_everything() -> None:
    """An exception in the consumer's loop body propagates after the map is cleaned up."""
    tracker = Tracker()
    with pytest.raises(ZeroDivisionError):
        async with corral.map(tracker, range(100), limit=8) as results:
            async for _ in results:
                1 / 0  # noqa: B018
    assert tracker.in_flight == 0
    assert no_tasks_but_current()


async def test_cancelling_the_consumer_cancels_everything() -> None:
    """Cancelling the task that consumes the map cancels and awaits its calls."""
    tracker = Tracker()

    async def consume() -> None:
        async with corral.map(tracker, range(100), limit=8) as results:
            async for _ in results:
                pass

    task = asyncio.get_running_loop().create_task(consume())
    while tracker.started < 8:
        await asyncio.sleep(0)  # let the map start its calls
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tracker.in_flight == 0
    assert no_tasks_but_current()


async def test_cancelling_gather_cancels_everything() -> None:
    """Cancelling an awaiting gather cancels and awaits its calls."""
    tracker = Tracker()
    task = asyncio.get_running_loop().create_task(corral.gather(tracker, range(100), limit=8))
    while tracker.started < 8:
        await asyncio.sleep(0)  # let the calls start
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tracker.in_flight == 0
    assert no_tasks_but_current()


async def test_plain_async_for_cleans_up_when_exhausted() -> None:
    """Without async with, a fully consumed map leaves nothing behind."""
    spy = Spy()
    assert [r async for r in corral.map(spy, range(50), limit=5)] == [i * 2 for i in range(50)]
    assert no_tasks_but_current()


async def test_async_generator_input_is_closed_on_early_exit() -> None:
    """An async generator given as items is closed when the map ends early."""
    closed = False

    async def items() -> AsyncIterator[int]:
        nonlocal closed
        try:
            for i in itertools.count():
                yield i
        finally:
            closed = True

    async def ident(item: int) -> int:
        await asyncio.sleep(0)  # a real suspension, as in I/O
        return item

    async with corral.map(ident, items(), limit=3) as results:
        got = [r async for r in _take(results, 20)]
    assert got == list(range(20))
    assert closed
    assert no_tasks_but_current()


async def test_async_input_runs_every_item() -> None:
    """An async iterable input yields every result, in order, with the limit held."""

    async def items() -> AsyncIterator[int]:
        for i in range(500):
            if i % 7 == 0:
                await asyncio.sleep(0)  # an input that itself suspends now and then
            yield i

    spy = Spy()
    assert await corral.gather(spy, items(), limit=9) == [i * 2 for i in range(500)]
    assert spy.peak == 9


# -- stats ---------------------------------------------------------------------


@pytest.mark.virtual_time
async def test_stats_count_and_time_the_run() -> None:
    """stats report counts, limit and latency percentiles of a finished run."""

    async def one_second(item: int) -> int:
        await asyncio.sleep(1)
        if item == 9:
            raise KeyError(item)
        return item

    async with corral.map(one_second, range(10), limit=5, return_exceptions=True) as results:
        assert results.stats.started == 0 or results.stats.in_flight >= 0
        got = [r async for r in results]
    stats = results.stats
    assert len(got) == 10
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (10, 9, 1, 0)
    assert stats.limit == 5
    assert stats.elapsed == pytest.approx(2.0)
    assert stats.throughput == pytest.approx(5.0)
    assert stats.latency_p50 == pytest.approx(1.0, rel=0.05)
    assert stats.latency_p99 == pytest.approx(1.0, rel=0.05)
    assert stats.max_loop_lag is None
    assert stats.as_dict()["completed"] == 9


@pytest.mark.virtual_time
async def test_stats_while_running_show_in_flight() -> None:
    """A snapshot taken mid-run shows the calls in flight."""
    gate = asyncio.Event()

    async def wait_gate(item: int) -> int:
        await gate.wait()
        return item

    async with corral.map(wait_gate, range(10), limit=4) as results:
        for _ in range(10):
            await asyncio.sleep(0)  # let the workers start their calls
        snap = results.stats
        assert (snap.in_flight, snap.completed) == (4, 0)
        gate.set()
        assert len([r async for r in results]) == 10


# -- run() ---------------------------------------------------------------------


def test_run_from_sync_code() -> None:
    """corral.run starts a loop, runs gather, and returns the list."""
    assert corral.run(Spy(), range(20), limit=3) == [i * 2 for i in range(20)]
    assert corral.run(Spy(), range(20), limit=3, uvloop=False) == [i * 2 for i in range(20)]


async def test_run_inside_a_loop_is_refused() -> None:
    """corral.run inside a running loop says to use gather instead."""
    with pytest.raises(RuntimeError, match=r"use `await corral.gather\(\.\.\.\)`"):
        corral.run(Spy(), range(3))


# -- timeouts and retries --------------------------------------------------------


@pytest.mark.virtual_time
async def test_timeout_ends_a_late_attempt_with_timeout_error() -> None:
    """timeout=1 ends a 10 s call at exactly 1 s with the builtin TimeoutError."""
    loop = asyncio.get_running_loop()

    async def slow(item: int) -> int:
        await asyncio.sleep(10)
        return item

    t0 = loop.time()
    with pytest.raises(TimeoutError):
        await corral.gather(slow, [1], timeout=1)
    assert loop.time() - t0 == pytest.approx(1.0)


@pytest.mark.virtual_time
async def test_timed_out_attempts_are_retried_on_schedule() -> None:
    """Each attempt gets the full timeout; retries wait backoff * 2**(k-1) between them."""
    loop = asyncio.get_running_loop()
    attempts: list[float] = []

    async def slow_then_fast(item: int) -> int:
        attempts.append(loop.time())
        if len(attempts) < 3:
            await asyncio.sleep(10)
        return item

    retry = corral.Retry(attempts=3, backoff=1.0, max_backoff=60, jitter=False)
    async with corral.map(slow_then_fast, [7], timeout=2, retries=retry) as results:
        assert [r async for r in results] == [7]
    # attempt 1 at 0, times out at 2, waits 1; attempt 2 at 3, times out at 5, waits 2.
    assert attempts == pytest.approx([0.0, 3.0, 7.0])
    assert results.stats.retried == 2


@pytest.mark.virtual_time
async def test_int_retries_means_that_many_extra_calls() -> None:
    """retries=2 calls a failing fn 3 times, then raises its error."""
    calls = 0

    async def flaky(item: int) -> int:
        nonlocal calls
        calls += 1
        raise ConnectionResetError("peer went away")

    with pytest.raises(ConnectionResetError):
        await corral.gather(flaky, [1], retries=2)
    assert calls == 3


@pytest.mark.virtual_time
async def test_programming_errors_are_not_retried_by_default() -> None:
    """A ValueError fails at once even with retries left."""
    calls = 0

    async def buggy(item: int) -> int:
        nonlocal calls
        calls += 1
        raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        await corral.gather(buggy, [1], retries=5)
    assert calls == 1


@pytest.mark.virtual_time
async def test_retry_after_waits_at_least_that_long() -> None:
    """RetryAfter(30) from fn delays the next attempt by 30 s, beyond max_backoff."""
    loop = asyncio.get_running_loop()
    attempts: list[float] = []

    async def throttled(item: int) -> int:
        attempts.append(loop.time())
        if len(attempts) == 1:
            raise corral.RetryAfter(30)
        return item

    retry = corral.Retry(attempts=2, backoff=0.1, max_backoff=1, jitter=False)
    assert await corral.gather(throttled, [5], retries=retry) == [5]
    assert attempts == pytest.approx([0.0, 30.0])


@pytest.mark.virtual_time
async def test_limiter_slot_is_free_during_backoff() -> None:
    """While one map's item waits to retry, another map sharing the Limiter uses the slot."""
    loop = asyncio.get_running_loop()
    shared = corral.Limiter(limit=1)
    log: list[tuple[str, float]] = []

    async def throttled_once(item: str) -> str:
        log.append((item, loop.time()))
        if len(log) == 1:
            raise ConnectionResetError("transient")
        await asyncio.sleep(1)
        return item

    retry = corral.Retry(attempts=2, backoff=5, max_backoff=5, jitter=False)
    assert await asyncio.gather(
        corral.gather(throttled_once, ["a"], limit=shared, retries=retry),
        corral.gather(throttled_once, ["b"], limit=shared),
    ) == [["a"], ["b"]]
    assert log == [("a", 0.0), ("b", 0.0), ("a", 5.0)]


# -- stopping early: cancel(), deadline, budget ------------------------------------


@pytest.mark.virtual_time
async def test_cancel_keeps_what_is_done_and_ends_quietly() -> None:
    """results.cancel() mid-run: no new start, in-flight calls cancelled, no error."""
    tracker = Tracker()
    got: list[int] = []
    async with corral.map(tracker, range(100), limit=4) as results:
        async for r in results:
            got.append(r)
            results.cancel()
    assert got == [0]
    assert tracker.in_flight == 0
    assert 1 < tracker.started <= 4  # the pool grows lazily, never past the limit
    assert results.stats.in_flight == 0
    assert no_tasks_but_current()


async def test_cancel_from_another_task_ends_the_map() -> None:
    """cancel() called by another task stops a map whose calls hang forever."""
    tracker = Tracker()
    async with corral.map(tracker, range(100), limit=4) as results:

        async def stop_soon() -> None:
            while tracker.started < 4:
                await asyncio.sleep(0)  # wait until the calls are in flight
            results.cancel()

        stopper = asyncio.get_running_loop().create_task(stop_soon())
        got = [r async for r in results]
        await stopper
    assert got == [0]
    assert tracker.in_flight == 0


async def test_cancel_before_iteration_runs_nothing() -> None:
    """A map cancelled before it started yields nothing and calls nothing."""
    tracker = Tracker()
    results = corral.map(tracker, range(10))
    results.cancel()
    assert [r async for r in results] == []
    assert tracker.started == 0


@pytest.mark.virtual_time
async def test_deadline_hands_out_results_then_raises() -> None:
    """deadline=2.5: items that finished by then are yielded, then DeadlineExceeded."""
    loop = asyncio.get_running_loop()

    async def item_seconds(item: int) -> int:
        await asyncio.sleep(item)
        return item

    got: list[int] = []
    with pytest.raises(corral.DeadlineExceeded, match=r"deadline of 2\.5 s passed"):
        async with corral.map(item_seconds, range(10), limit=10, deadline=2.5) as results:
            async for r in results:
                got.append(r)
    assert got == [0, 1, 2]
    assert loop.time() == pytest.approx(2.5)
    assert no_tasks_but_current()


@pytest.mark.virtual_time
async def test_deadline_with_return_exceptions_reports_cut_calls() -> None:
    """With return_exceptions, each call the deadline cut short yields DeadlineExceeded."""

    async def item_seconds(item: int) -> int:
        await asyncio.sleep(item)
        return item

    results = await corral.gather(
        item_seconds, range(5), limit=5, deadline=2.5, return_exceptions=True
    )
    assert results[:3] == [0, 1, 2]
    assert [type(r) for r in results[3:]] == [corral.DeadlineExceeded] * 2
    async with corral.map(
        item_seconds, range(5), limit=5, deadline=2.5, return_exceptions=True
    ) as stream:
        assert len([r async for r in stream]) == 5
    stats = stream.stats
    assert (stats.started, stats.completed, stats.failed) == (5, 3, 2)


@pytest.mark.virtual_time
async def test_deadline_with_return_exceptions_reports_every_item_not_started() -> None:
    """Each item still has one outcome: those never started yield DeadlineExceeded too."""

    async def item_seconds(item: int) -> int:
        await asyncio.sleep(item)
        return item

    # Two at a time: 0-2 end by 2 s, 3 and 4 are in flight at 2.5 s, 5-9 never start.
    results = await corral.gather(
        item_seconds, range(10), limit=2, deadline=2.5, return_exceptions=True
    )
    assert results[:3] == [0, 1, 2]
    assert [str(r) for r in results[3:]] == [
        "the deadline passed while item 3 ran",
        "the deadline passed while item 4 ran",
        *(f"the deadline passed before item {i} started" for i in range(5, 10)),
    ]
    assert all(type(r) is corral.DeadlineExceeded for r in results[3:])

    async def items() -> AsyncIterator[int]:
        for i in range(10):
            yield i

    async with corral.map(
        item_seconds, items(), limit=2, deadline=2.5, return_exceptions=True
    ) as stream:
        got = [r async for r in stream]
    assert [r if isinstance(r, int) else "x" for r in got] == [0, 1, 2] + ["x"] * 7
    stats = stream.stats  # the items not started count as neither completed nor failed
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (5, 3, 2, 0)
    assert no_tasks_but_current()


def _deadline_case(
    delays: list[int], limit: int, ordered: bool, deadline: int, consumer_delay: int
) -> None:
    async def work(item: int) -> int:
        await asyncio.sleep(delays[item])
        return item

    async def main() -> tuple[list[object], corral.Stats]:
        seen: list[object] = []
        async with corral.map(
            work,
            range(len(delays)),
            limit=limit,
            ordered=ordered,
            deadline=deadline + 0.5,
            return_exceptions=True,
        ) as results:
            async for r in results:
                seen.append(r)
                await asyncio.sleep(consumer_delay)  # a slow consumer holds workers back
        assert no_tasks_but_current()
        return seen, results.stats

    seen, stats = run(main, virtual_time=True)
    outcome = re.compile(r"the deadline passed (?:while item (\d+) ran|before item (\d+) started)")
    keys: list[int] = []
    cut = 0
    for r in seen:
        if isinstance(r, int):
            keys.append(r)
            continue
        assert type(r) is corral.DeadlineExceeded
        match = outcome.fullmatch(str(r))
        assert match is not None, str(r)
        keys.append(int(match[1] or match[2]))
        cut += match[1] is not None
    if ordered:
        assert keys == list(range(len(delays)))
    else:
        assert sorted(keys) == list(range(len(delays)))  # each item once
    assert (stats.completed, stats.failed) == (
        len(seen) - sum(not isinstance(r, int) for r in seen),
        cut,
    )


@settings(max_examples=60, deadline=None)
@given(
    delays=st.lists(st.integers(0, 5), max_size=40),
    limit=st.integers(1, 8),
    ordered=st.booleans(),
    deadline=st.integers(0, 8),
    consumer_delay=st.integers(0, 2),
)
def test_a_deadline_with_return_exceptions_gives_each_item_one_outcome(
    delays: list[int], limit: int, ordered: bool, deadline: int, consumer_delay: int
) -> None:
    """Random latencies, a slow or fast consumer, any deadline: one outcome per item."""
    _deadline_case(delays, limit, ordered, deadline, consumer_delay)


@pytest.mark.virtual_time
async def test_deadline_not_reached_changes_nothing() -> None:
    """A deadline longer than the run neither raises nor leaves a timer behind."""

    async def quick(item: int) -> int:
        await asyncio.sleep(1)
        return item

    assert await corral.gather(quick, range(3), deadline=100) == [0, 1, 2]
    assert no_tasks_but_current()


@pytest.mark.virtual_time
async def test_budget_stops_starting_and_lets_in_flight_finish() -> None:
    """budget={'requests': 5}: 5 calls run to the end, none more, then BudgetExhausted."""
    spy = Spy()
    got: list[int] = []
    with pytest.raises(corral.BudgetExhausted, match="budget of 5 requests"):
        async with corral.map(spy, range(100), limit=3, budget={"requests": 5}) as results:
            async for r in results:
                got.append(r)
    assert spy.calls == 5
    assert got == [0, 2, 4, 6, 8]
    # Items the budget refused were taken from the input but never ran.
    stats = results.stats
    assert (stats.started, stats.completed, stats.failed) == (5, 5, 0)


@pytest.mark.virtual_time
async def test_budget_counts_retries() -> None:
    """Each retry attempt spends one request of the budget."""
    calls = 0

    async def flaky(item: int) -> int:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    with pytest.raises(corral.BudgetExhausted):
        await corral.gather(flaky, range(10), limit=1, retries=10, budget={"requests": 4})
    assert calls == 4


def test_deadline_and_budget_are_checked() -> None:
    """Bad deadline or budget values are refused, naming them."""

    async def ident(item: int) -> int:
        return item

    with pytest.raises(ValueError, match=r"got deadline=0$"):
        corral.map(ident, range(3), deadline=0)
    with pytest.raises(ValueError, match=r"^budget must be a dict like"):
        corral.map(ident, range(3), budget=[("requests", 5)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^budget\['requests'\] must be a finite number >= 0"):
        corral.map(ident, range(3), budget={"requests": -1})


def test_unknown_keyword_is_refused_with_a_suggestion() -> None:
    """A misspelt keyword fails at once and suggests the right one."""

    async def ident(item: int) -> int:
        return item

    with pytest.raises(
        TypeError,
        match=r"^corral\.map\(\) got an unexpected keyword argument 'limt'; did you mean limit=\?$",
    ):
        corral.map(ident, range(3), limt=5)  # type: ignore[call-overload]
