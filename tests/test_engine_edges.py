"""The engine at its edges: stopping while workers wait, odd inputs, closing twice, stats."""

from __future__ import annotations

import asyncio
import gc
import itertools
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import corral
from _loops import LOOP_KINDS, run


def no_tasks_but_current() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


class Boom(BaseException):
    """Not an Exception: like pytest's own outcomes, or a framework's control flow."""


# -- a budget that runs out while a worker waits for the consumer ----------------


@pytest.mark.virtual_time
@pytest.mark.parametrize("ordered", [True, False])
async def test_a_budget_spent_while_a_worker_waits_for_room_ends_the_map(ordered: bool) -> None:
    """Item 0 waits 10 s to retry while the other worker runs items 1-3 and then
    waits for the consumer with item 4 (window 2 x limit = 4). Item 0's retry
    finds the budget spent: the map stops starting calls. The waiting worker
    must neither start item 4 when the consumer makes room nor wait for ever
    for room that, in input order, never comes (item 0 has no result).
    """
    called: list[int] = []

    async def flaky(item: int) -> int:
        called.append(item)
        if item == 0:
            raise ConnectionError("down")
        return item

    retry = corral.Retry(attempts=5, backoff=10, jitter=False)
    got: list[int] = []
    async with asyncio.timeout(1000):  # hang guard (virtual time), not the assertion
        with pytest.raises(corral.BudgetExhausted):
            async with corral.map(
                flaky, range(100), limit=2, ordered=ordered, retries=retry, budget={"requests": 4}
            ) as results:
                await asyncio.sleep(20)  # the consumer comes late: the budget is spent at 10 s
                async for value in results:
                    got.append(value)
    assert called == [0, 1, 2, 3]
    assert got == ([] if ordered else [1, 2, 3])
    stats = results.stats
    assert (stats.completed, stats.in_flight) == (3, 0)
    assert no_tasks_but_current()


@pytest.mark.virtual_time
@pytest.mark.parametrize("weighted", [False, True])
async def test_an_item_whose_retry_the_budget_refuses_counts_as_started(weighted: bool) -> None:
    """Its first attempt ran: the stats say started 1, not 0 (completed 0, failed 0)."""

    async def down(item: int) -> int:
        raise ConnectionError("down")

    extra = {"rate": corral.Rate({"requests": 100}, per=1)} if weighted else {}
    retry = corral.Retry(attempts=3, backoff=1, jitter=False)
    with pytest.raises(corral.BudgetExhausted):
        async with corral.map(
            down, [0], limit=1, retries=retry, budget={"requests": 1}, **extra
        ) as results:
            async for _ in results:
                pass
    stats = results.stats
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (1, 0, 0, 0)


@pytest.mark.virtual_time
async def test_an_item_the_budget_refuses_before_its_first_attempt_is_not_started() -> None:
    async def ok(item: int) -> int:
        return item

    with pytest.raises(corral.BudgetExhausted):
        async with corral.map(ok, range(5), limit=1, budget={"requests": 2}) as results:
            async for _ in results:
                pass
    stats = results.stats
    assert (stats.started, stats.completed, stats.failed) == (2, 2, 0)


# -- the input fails in an unusual way ---------------------------------------------


async def test_a_base_exception_from_an_async_input_fails_the_run() -> None:
    """Not an Exception, raised by the input: the run raises it, it does not end short."""

    async def items() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise Boom("the input")

    async def ident(item: int) -> int:
        await asyncio.sleep(0)
        return item

    with pytest.raises(Boom):
        await corral.gather(ident, items())
    got: list[int] = []
    with pytest.raises(Boom):
        async with corral.map(ident, items()) as results:
            async for value in results:
                got.append(value)
    assert got == [1, 2][: len(got)]
    assert no_tasks_but_current()


class NotAnAsyncIterator:
    """``__aiter__`` returns something without ``__anext__``."""

    def __aiter__(self) -> object:
        return self

    def __repr__(self) -> str:
        return "<NotAnAsyncIterator>"


async def test_an_async_iterable_whose_aiter_is_no_async_iterator_is_refused() -> None:
    """The error names items and its value, and the stream is left closed (no task)."""

    async def ident(item: int) -> int:
        return item

    expected = r"^items must be an iterable or an async iterable; got items=<NotAnAsyncIterator>"
    with pytest.raises(TypeError, match=expected):
        await corral.gather(ident, NotAnAsyncIterator())  # type: ignore[arg-type]
    results = corral.map(ident, NotAnAsyncIterator())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=expected):
        async with results:
            pass
    with pytest.raises(TypeError, match=expected):
        await anext(corral.map(ident, NotAnAsyncIterator()))  # type: ignore[arg-type]
    assert results.stats.started == 0
    await results.aclose()
    del results
    assert no_tasks_but_current()


async def test_an_async_iterables_own_aiter_error_is_raised_as_itself() -> None:
    class Unopenable:
        def __aiter__(self) -> AsyncIterator[int]:
            raise OSError("cannot open the stream")

    async def ident(item: int) -> int:
        return item

    with pytest.raises(OSError, match=r"^cannot open the stream$"):
        await corral.gather(ident, Unopenable())
    with pytest.raises(OSError, match=r"^cannot open the stream$"):
        async with corral.map(ident, Unopenable()) as results:
            async for _ in results:
                pass
    assert no_tasks_but_current()


# -- stats ---------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3])
async def test_a_base_exception_from_fn_counts_its_item_as_failed(limit: int) -> None:
    async def boom(item: int) -> int:
        if item == 3:
            raise Boom(item)
        return item

    with pytest.raises(Boom):
        async with corral.map(boom, range(10), limit=limit) as results:
            async for _ in results:
                pass
    stats = results.stats
    assert stats.failed == 1
    assert stats.in_flight == 0
    # What started and did not complete or fail was cut short by the failure.
    assert stats.started >= stats.completed + stats.failed
    if limit == 1:
        assert (stats.started, stats.completed) == (4, 3)


# -- the deadline ----------------------------------------------------------------


@pytest.mark.virtual_time
async def test_a_deadline_after_every_call_ended_raises_nothing() -> None:
    """Every item ended at 1 s; the consumer is slow, past the 5 s deadline: no error."""
    loop = asyncio.get_running_loop()

    async def one_second(item: int) -> int:
        await asyncio.sleep(1)
        return item

    got: list[int] = []
    async with corral.map(one_second, range(3), limit=5, deadline=5) as results:
        async for value in results:
            got.append(value)
            await asyncio.sleep(10)
    assert got == [0, 1, 2]
    assert loop.time() == pytest.approx(31.0)
    stats = results.stats
    assert (stats.started, stats.completed, stats.failed, stats.elapsed) == (3, 3, 0, 1.0)


@pytest.mark.virtual_time
async def test_cancel_after_the_deadline_ends_the_report_of_an_endless_input() -> None:
    """With return_exceptions the items left after the deadline are reported one by
    one; cancel() stops that as it stops a map before its deadline."""

    async def one_second(item: int) -> int:
        await asyncio.sleep(1)
        return item

    got: list[object] = []
    async with asyncio.timeout(1000):  # hang guard (virtual time), not the assertion
        async with corral.map(
            one_second, itertools.count(), limit=2, deadline=1.5, return_exceptions=True
        ) as results:
            async for value in results:
                got.append(value)
                if len(got) == 5:
                    results.cancel()
                assert len(got) < 100, "cancel() did not end the map"
    assert got[:2] == [0, 1]
    assert all(type(r) is corral.DeadlineExceeded for r in got[2:])
    assert 5 <= len(got) <= 5 + 4  # and what was reported already, within the window
    assert no_tasks_but_current()


def test_a_map_cancelled_by_its_first_call_is_not_cut_by_its_deadline_later() -> None:
    """Item 0's call cancels the map, then goes on past the deadline: the map was
    stopped by cancel(), so the items never started are not reported as cut by
    the deadline. (Under the eager task factory the first call runs while the
    map starts.)"""

    async def main() -> list[object]:
        async def first_cancels(item: int) -> int:
            if item == 0:
                results.cancel()
                await asyncio.sleep(10)
            return item

        got: list[object] = []
        results = corral.map(first_cancels, range(100), limit=3, deadline=5, return_exceptions=True)
        async with results:
            async for value in results:
                got.append(value)
        assert no_tasks_but_current()
        return got

    for kind in LOOP_KINDS:
        assert run(main, kind, virtual_time=True) == [0]


# -- closing ---------------------------------------------------------------------


@pytest.mark.virtual_time
async def test_aclose_from_another_task_while_the_consumer_closes_too() -> None:
    """Two closes at once: each returns once the map is closed, the input is closed once."""
    loop = asyncio.get_running_loop()
    cleaned: list[float] = []

    async def items() -> AsyncIterator[int]:
        try:
            for i in itertools.count():
                yield i
        finally:
            await asyncio.sleep(1)  # a cleanup that takes time (closing a connection)
            cleaned.append(loop.time())

    async def ident(item: int) -> int:
        await asyncio.sleep(0.5)
        return item

    got: list[int] = []
    async with corral.map(ident, items(), limit=2) as results:
        async for value in results:
            got.append(value)
            if len(got) == 3:
                closer = loop.create_task(results.aclose())
    left = loop.time()
    assert cleaned == [left]  # the consumer's close waited for the other's cleanup
    await closer
    assert got == list(range(len(got)))
    assert cleaned == [left]
    assert no_tasks_but_current()


# -- exactly once, in every mode ----------------------------------------------------

EAGER_OR_NOT = [kind for kind in LOOP_KINDS if kind in ("asyncio", "eager")]


def _stream_case(
    delays: list[int],
    limit: int,
    ordered: bool,
    async_input: bool,
    input_fails_at: int | None,
    stop: str,
    stop_after: int,
    consumer_delay: int,
) -> None:
    n = len(delays)
    fail = {i for i in range(n) if i % 5 == 3}

    async def work(item: int) -> int:
        await asyncio.sleep(delays[item])
        if item in fail:
            raise KeyError(item)
        return item

    def sync_items() -> Iterator[int]:
        for i in range(n):
            if i == input_fails_at:
                raise OSError("the input broke")
            yield i

    async def async_items() -> AsyncIterator[int]:
        for i in sync_items():
            if i % 3 == 0:
                await asyncio.sleep(0)  # an input that suspends now and then
            yield i

    async def main() -> None:
        seen: list[object] = []
        results = corral.map(
            work,
            async_items() if async_input else sync_items(),
            limit=limit,
            ordered=ordered,
            return_exceptions=True,
        )
        raised: BaseException | None = None
        try:
            async with results:
                async for r in results:
                    seen.append(r)
                    await asyncio.sleep(consumer_delay)
                    if len(seen) == stop_after:
                        if stop == "break":
                            break
                        if stop == "raise":
                            raise LookupError("the consumer failed")
                        if stop == "cancel":
                            results.cancel()
                            results.cancel()  # twice changes nothing
        except (OSError, LookupError) as exc:
            raised = exc
        assert no_tasks_but_current()
        results.cancel()  # after the end: changes nothing

        keys = [r.args[0] if isinstance(r, KeyError) else r for r in seen]
        assert all(isinstance(r, KeyError) == (k in fail) for r, k in zip(seen, keys, strict=True))
        assert len(set(keys)) == len(keys)  # never twice
        if ordered:
            assert keys == list(range(len(keys)))  # an in-order prefix
        stopped = stop != "none" and stop_after <= len(seen)
        if stop == "raise" and stopped:
            assert isinstance(raised, LookupError)
        elif input_fails_at is not None and input_fails_at < n:
            # A consumer that left or cancelled first may not see the input fail.
            assert isinstance(raised, OSError) or (stopped and raised is None)
            assert set(keys) <= set(range(input_fails_at))
        else:
            assert raised is None
            if not stopped:
                assert sorted(keys) == list(range(n))  # type: ignore[type-var]
        stats = results.stats
        assert stats.in_flight == 0
        assert stats.started >= stats.completed + stats.failed
        captured = sum(isinstance(r, KeyError) for r in seen)
        assert stats.completed >= len(seen) - captured
        assert stats.failed >= captured
        if raised is None and not stopped:
            assert (stats.started, stats.completed, stats.failed) == (n, n - captured, captured)

    for kind in EAGER_OR_NOT:
        run(main, kind, virtual_time=True)


@settings(max_examples=80, deadline=None)
@given(
    delays=st.lists(st.integers(0, 4), max_size=40),
    limit=st.integers(1, 10),
    ordered=st.booleans(),
    async_input=st.booleans(),
    input_fails_at=st.none() | st.integers(0, 40),
    stop=st.sampled_from(["none", "break", "raise", "cancel"]),
    stop_after=st.integers(1, 30),
    consumer_delay=st.integers(0, 2),
)
def test_every_item_is_handed_out_at_most_once_and_all_of_them_unless_stopped(
    delays: list[int],
    limit: int,
    ordered: bool,
    async_input: bool,
    input_fails_at: int | None,
    stop: str,
    stop_after: int,
    consumer_delay: int,
) -> None:
    """Sync or async input, failing or not, and a consumer that reads it all,
    breaks, raises or cancels (twice) at any point, slow or fast: each item at
    most once, all of them when nothing stopped the map, in order when asked,
    no task left, stats consistent."""
    _stream_case(
        delays, limit, ordered, async_input, input_fails_at, stop, stop_after, consumer_delay
    )


@pytest.mark.parametrize("limit", [1, 3, 1000, None])
@pytest.mark.parametrize("async_input", [False, True])
async def test_limits_below_at_and_above_the_item_count(
    limit: int | None, async_input: bool
) -> None:
    async def items(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def double(item: int) -> int:
        await asyncio.sleep(0)
        return item * 2

    for n in (0, 1, 5):
        source = items(n) if async_input else range(n)
        async with corral.map(double, source, limit=limit) as results:
            assert [r async for r in results] == [i * 2 for i in range(n)]
        assert (results.stats.started, results.stats.completed) == (n, n)
        source = items(n) if async_input else range(n)
        assert await corral.gather(double, source, limit=limit) == [i * 2 for i in range(n)]
    assert no_tasks_but_current()


# -- stopping at every point ---------------------------------------------------------


async def test_cancelling_the_consumer_while_workers_wait_for_room() -> None:
    """The consumer stops reading; workers park waiting for room; its task is cancelled."""
    pulled = 0

    def items() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    async def instant(item: int) -> int:
        return item

    parked = asyncio.Event()

    async def consume() -> None:
        async with corral.map(instant, items(), limit=2) as results:
            await anext(results)
            parked.set()
            await asyncio.Event().wait()  # reads no more

    task = asyncio.get_running_loop().create_task(consume())
    await parked.wait()
    for _ in range(20):
        await asyncio.sleep(0)  # the workers run until the window is full
    assert 5 <= pulled <= 1 + 2 * 2 + 2  # the window is full: the workers are parked
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert no_tasks_but_current()


@pytest.mark.parametrize("how", ["cancel_task", "cancel_map", "break"])
async def test_stopping_while_the_async_input_is_waiting_for_its_next_item(how: str) -> None:
    """The input's __anext__ is pending (nothing comes): each way out ends the map
    and closes the input."""
    closed = asyncio.Event()
    asked = asyncio.Event()

    async def items() -> AsyncIterator[int]:
        try:
            yield 0
            asked.set()
            await asyncio.Event().wait()  # the next item never comes
            yield 1
        finally:
            closed.set()

    async def ident(item: int) -> int:
        return item

    got: list[int] = []

    async def consume() -> None:
        async with corral.map(ident, items(), limit=4) as results:
            async for value in results:
                got.append(value)
                await asked.wait()
                if how == "cancel_map":
                    results.cancel()
                elif how == "break":
                    break

    task = asyncio.get_running_loop().create_task(consume())
    await asked.wait()
    if how == "cancel_task":
        for _ in range(5):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        await task
    assert got == [0]
    assert closed.is_set()
    assert no_tasks_but_current()


@pytest.mark.virtual_time
async def test_cancel_from_fn_stops_the_map_and_keeps_that_calls_result() -> None:
    """fn may call results.cancel(): no new call starts, the other calls are
    cancelled, its own call goes on and its result is kept."""
    started: list[int] = []

    async def work(item: int) -> int:
        started.append(item)
        if item == 2:
            results.cancel()
            await asyncio.sleep(5)
            return item
        await asyncio.sleep(1 if item == 0 else 3600)
        return item

    results = corral.map(work, range(100), limit=3, ordered=False)
    got: list[int] = []
    async with results:
        async for value in results:
            got.append(value)
    assert sorted(started) == [0, 1, 2]
    assert got == [2]
    stats = results.stats
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (3, 1, 0, 0)
    assert no_tasks_but_current()


@pytest.mark.virtual_time
async def test_stats_after_a_deadline_and_after_cancel_add_up() -> None:
    """Final snapshots: started = completed + failed + calls cut short; nothing in flight."""

    async def item_seconds(item: int) -> int:
        await asyncio.sleep(item)
        return item

    with pytest.raises(corral.DeadlineExceeded):
        async with corral.map(item_seconds, range(10), limit=4, deadline=2.5) as results:
            async for _ in results:
                pass
    stats = results.stats
    # 0-3 start at 0 s; 0-2 end at 0, 1 and 2 s, their workers start 4-6;
    # 3-6 are cut at 2.5 s.
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (7, 3, 0, 0)
    assert stats.elapsed == pytest.approx(2.5)

    async with corral.map(item_seconds, range(10), limit=4) as results:
        async for value in results:
            if value == 1:
                results.cancel()
    stats = results.stats  # 0-3 start at 0 s, 4 once 0 ends, 5 once 1 ends (at 1 s)
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (6, 2, 0, 0)


async def test_a_stream_dropped_after_break_starts_no_new_call() -> None:
    """Plain ``async for`` (no ``async with``) left by ``break``: the stream is
    closed in the background once dropped; a call that swallows its
    cancellation and returns does not lead its worker on to another item."""
    calls = 0

    async def swallower(item: int) -> int:
        nonlocal calls
        calls += 1
        try:
            await asyncio.sleep(3600 if item > 0 else 0)
        except asyncio.CancelledError:
            return -item
        return item

    async for _ in corral.map(swallower, range(1000), limit=4):
        at_break = calls
        break
    gc.collect()  # the stream is dropped: its tasks are cancelled, its close scheduled
    for _ in range(20):
        await asyncio.sleep(0)  # the background close runs
    assert calls == at_break
    assert no_tasks_but_current()


# -- one reader at a time -------------------------------------------------------------


async def test_a_second_task_waiting_for_the_next_result_is_refused() -> None:
    """Each result wakes one waiter: a second one would wait for ever, so it is told at once."""
    release = asyncio.Event()

    async def held(item: int) -> int:
        await release.wait()
        return item

    async with asyncio.timeout(60):  # hang guard, not the assertion
        async with corral.map(held, range(3), limit=3) as results:
            first = asyncio.create_task(anext(results))
            while results._engine._consumer is None:  # type: ignore[attr-defined]
                await asyncio.sleep(0)  # until the first reader waits
            with pytest.raises(RuntimeError, match="one task at a time"):
                await anext(results)
            release.set()
            assert await first == 0
            assert [value async for value in results] == [1, 2]


async def test_a_second_reader_of_a_map_on_processes_is_refused() -> None:
    """The same over worker processes: the only item sleeps there for 30 s, nothing wakes
    the first reader meanwhile, and leaving the block stops the worker."""
    from _work import async_sleep

    async with asyncio.timeout(60):  # hang guard, not the assertion
        async with corral.map(async_sleep, [30.0], processes=1) as results:
            first = asyncio.create_task(anext(results))
            while results._engine._consumer is None:  # type: ignore[attr-defined]
                await asyncio.sleep(0.01)  # until the first reader waits
            with pytest.raises(RuntimeError, match="one task at a time"):
                await anext(results)
            first.cancel()


# -- a stream dropped unclosed --------------------------------------------------------


async def test_a_background_close_that_fails_is_logged_by_corral(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nobody awaits the close of a stream dropped after `break`: its failure goes to the log."""
    closed = asyncio.Event()

    async def items() -> AsyncIterator[int]:
        try:
            for i in range(100):
                yield i
        finally:
            closed.set()
            raise OSError("the input's own cleanup failed")

    async def ident(item: int) -> int:
        return item

    async def consume() -> None:
        async for _ in corral.map(ident, items(), limit=2):
            break

    await consume()
    gc.collect()  # the stream, dropped unclosed, closes in the background
    async with asyncio.timeout(10):  # hang guard, not the assertion
        await closed.wait()
        while not any("dropped unclosed failed" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0)
    (record,) = [r for r in caplog.records if "dropped unclosed failed" in r.getMessage()]
    assert record.name == "corral"
    assert record.exc_info is not None
    assert "cleanup failed" in str(record.exc_info[1])
    assert no_tasks_but_current()


@pytest.mark.virtual_time
async def test_errors_naming_an_item_name_a_large_one_cut_short() -> None:
    """A deadline's report of 50 prompts of 100 KB each is not 50 copies of them."""
    prompts = [f"{i}:" + "x" * 100_000 for i in range(50)]

    async def ask(prompt: str) -> int:
        await asyncio.sleep(1)
        return len(prompt)

    out = await corral.gather(ask, prompts, limit=5, deadline=1.5, return_exceptions=True)
    assert out[:5] == [100_002] * 5
    missed = out[5:]
    assert all(isinstance(e, corral.DeadlineExceeded) for e in missed)
    assert all(len(str(e)) < 200 for e in missed)
    assert str(missed[0]).startswith("the deadline passed while item '5:xxx")
    assert str(missed[-1]).startswith("the deadline passed before item '49:xx")
