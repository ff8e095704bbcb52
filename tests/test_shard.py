"""processes=N: one map over N worker processes, each with its own loop and engine."""

from __future__ import annotations

import asyncio
import functools
import os
import reprlib
import signal
import sys
import types
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corral
from _flaky import (
    FLOOR,
    always_failing,
    attempts_logged,
    budgeted_retry,
    check_budget_held,
    collect,
    half_failing,
    jobs,
)
from _loops import run
from _work import (
    async_echo,
    async_exit_on_three,
    async_fail_on_three,
    async_flaky,
    async_odd_result,
    async_peak,
    async_pid,
    async_record_pid_and_sleep,
    async_returns_a_lambda,
    async_sleep,
    async_sleep_or_fail,
    async_square,
    async_start_time,
    complete_lines,
    ctrl_c,
    square,
    worker_processes,
)
from corral import _shard as corral_shard
from corral._offload import WorkerCrashed
from corral._remote import split_retry_budget
from corral._shard import ShardedStream, split_limit

# ---------------------------------------------------------------------------
# Refused at once, before any process starts
# ---------------------------------------------------------------------------


def test_a_lambda_is_refused_at_once_saying_why_and_what_to_do() -> None:
    """A lambda cannot be imported by another process: TypeError with the fix."""
    with pytest.raises(TypeError) as info:
        corral.map(lambda x: x, range(3), processes=2)
    message = str(info.value)
    assert message.startswith("processes=N runs fn in other processes, which import it by name;")
    assert message.endswith(
        "Define it with `async def` at module level in a module (not a lambda, a closure "
        "or a function defined inside another)."
    )


def test_a_closure_is_refused_at_once() -> None:
    """An async function defined inside another is refused the same way."""

    async def local(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"cannot be sent there"):
        corral.map(local, range(3), processes=2)


def test_a_plain_function_is_pointed_to_executor_process() -> None:
    """processes=N is for async fn; a plain def is told to use executor='process'."""
    with pytest.raises(TypeError, match=r"use executor='process' instead\.$"):
        corral.map(square, range(3), processes=2)


@pytest.mark.parametrize("processes", [0, -1, True, 1.5, "2"])
def test_processes_must_be_an_int_of_at_least_one(processes: Any) -> None:
    """A bad processes= fails at once, naming the argument and its value."""
    with pytest.raises(ValueError) as info:
        corral.map(async_square, range(3), processes=processes)
    assert str(info.value) == (
        "processes must be an int >= 1 (worker processes, each with its own event loop) "
        f"or None (run in this process); got processes={processes!r}"
    )


def test_a_shared_limiter_cannot_be_split_across_processes() -> None:
    """A Limiter lives in one process: refused, asking for an int."""
    with pytest.raises(TypeError, match=r"Pass an int or None; got limit=<corral.Limiter"):
        corral.map(async_square, range(3), processes=2, limit=corral.Limiter(5))


def test_retries_that_cannot_be_pickled_are_refused_at_once() -> None:
    """A Retry(on=lambda) cannot reach the processes: TypeError naming it and the fix."""
    with pytest.raises(
        TypeError,
        match=r"^processes=N sends retries= to its processes, but retries=Retry\(.*\) cannot "
        r"be pickled \(.*\)\. Give Retry\(on=\.\.\.\) exception types or a module-level "
        r"function\.$",
    ):
        corral.map(async_square, range(3), processes=2, retries=corral.Retry(on=lambda e: True))


def test_keywords_a_sharded_map_does_not_take_are_refused() -> None:
    """executor= makes no sense with processes=N: refused, naming both."""
    with pytest.raises(ValueError) as info:
        corral.map(async_square, range(3), processes=2, executor="thread")
    assert str(info.value) == (
        "executor= is not available with processes=N; got executor='thread' and "
        "processes=2. Drop one of them."
    )


def test_limit_is_split_as_evenly_as_possible() -> None:
    """400 over 4 is 100 each; 5 over 2 is 3 and 2; a limit below N starts fewer processes."""
    assert split_limit(400, 4) == [100] * 4
    assert split_limit(5, 2) == [3, 2]
    assert split_limit(1, 4) == [1]


def test_the_stream_is_a_result_stream() -> None:
    """corral.map(..., processes=N) returns a ResultStream (with stats, aclose, cancel)."""
    stream = corral.map(async_square, range(3), processes=2)
    assert isinstance(stream, corral.ResultStream)
    assert isinstance(stream, ShardedStream)
    assert stream.stats.started == 0
    run(stream.aclose)  # never started: nothing to stop


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_results_come_back_in_input_order_from_several_processes() -> None:
    """Every result, in input order, computed in worker processes (not this one)."""
    async with asyncio.timeout(60):  # hang guard
        squares = await corral.gather(async_square, range(500), processes=2, limit=20)
        pids = await corral.gather(async_pid, range(100), processes=2)
    assert squares == [x * x for x in range(500)]
    assert len(set(pids)) == 2
    assert os.getpid() not in pids
    assert worker_processes() == set()


@pytest.mark.slow
def test_as_completed_each_result_comes_once() -> None:
    """ordered=False: the same results, each once."""

    async def main() -> list[int]:
        async with corral.map(
            async_square, range(300), processes=2, limit=10, ordered=False
        ) as results:
            return [r async for r in results]

    assert sorted(run(main)) == [x * x for x in range(300)]


@pytest.mark.slow
def test_an_async_iterable_input_and_an_empty_one() -> None:
    """Async iterables are pulled like sync ones; an empty input gives an empty list."""

    async def numbers() -> AsyncIterator[int]:
        for i in range(50):
            yield i

    assert corral.run(async_square, numbers(), processes=2) == [i * i for i in range(50)]
    assert corral.run(async_square, [], processes=2) == []


@pytest.mark.slow
def test_exceptions_keep_their_type_and_remote_traceback() -> None:
    """A failing item yields its own exception type, with the worker's traceback as a note."""
    results = corral.run(async_fail_on_three, range(20), processes=2, return_exceptions=True)
    assert [type(r) for r in results] == [KeyError if i % 10 == 3 else int for i in range(20)]
    notes = "".join(getattr(results[3], "__notes__", []))
    assert "Traceback in the worker process" in notes
    assert "async_fail_on_three" in notes
    with pytest.raises(KeyError, match=r"bad item 1?3"):  # the first failure to arrive
        corral.run(async_fail_on_three, range(20), processes=2)


@pytest.mark.slow
def test_an_unpicklable_item_fails_alone() -> None:
    """An item that cannot be sent fails with a TypeError in its place; the others run."""
    items: list[Any] = [1, 2, lambda: 3, 4]
    results: list[Any] = corral.run(async_square, items, processes=2, return_exceptions=True)
    assert (results[0], results[1], results[3]) == (1, 4, 16)
    assert isinstance(results[2], TypeError)


# ---------------------------------------------------------------------------
# Limits, rate, retries, stats
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_the_limit_is_split_across_the_processes() -> None:
    """limit=6 over 2 processes: each runs at most 3 calls at once, and reaches 3."""
    outcomes = corral.run(async_peak, range(200), processes=2, limit=6)
    peaks: dict[int, int] = {}
    for pid, peak in outcomes:
        peaks[pid] = max(peaks.get(pid, 0), peak)
    assert len(peaks) == 2
    assert max(peaks.values()) == 3
    assert sum(peaks.values()) <= 6


@pytest.mark.slow
def test_the_rate_is_global_across_the_processes() -> None:
    """rate=40/s with 2 processes: 30 starts take at least 29/40 s in all, not half that."""
    starts = sorted(corral.run(async_start_time, range(30), processes=2, rate="40/s"))
    # Token delivery may delay a start by a few ms, never advance it by more.
    assert starts[-1] - starts[0] >= 29 / 40 - 0.05


@pytest.mark.slow
def test_retries_run_in_the_children_and_stats_add_up() -> None:
    """Each item fails once (transient) and is retried in its process; stats sum it all."""
    # Every item's retry is wanted here: no retry budget (its tests are below).
    retry = corral.Retry(attempts=2, budget=None)

    async def main() -> tuple[list[int], corral.Stats]:
        async with corral.map(async_flaky, range(40), processes=2, limit=8, retries=retry) as out:
            return [r async for r in out], out.stats

    results, stats = run(main)
    assert results == list(range(40))
    assert (stats.started, stats.completed, stats.failed, stats.retried) == (40, 40, 0, 40)
    assert (stats.in_flight, stats.limit) == (0, 8)
    assert stats.latency_p50 is not None
    assert stats.elapsed > 0


def test_the_retry_budget_floor_is_split_across_the_processes() -> None:
    """Each process keeps the ratio of its own successes; the floor is shared out, not copied."""
    budget = corral.RetryBudget(ratio=0.2, floor=10, window=30.0)
    shares = split_retry_budget(corral.Retry(budget=budget), 4)
    assert [b.floor if b else None for b in shares] == [3, 3, 2, 2]
    assert all(b == corral.RetryBudget(ratio=0.2, floor=b.floor, window=30.0) for b in shares if b)
    odd = split_retry_budget(corral.Retry(budget=corral.RetryBudget(floor=2.5)), 2)
    assert [b.floor if b else None for b in odd] == [1.25, 1.25]
    assert split_retry_budget(corral.Retry(budget=None), 3) == [None] * 3
    assert split_retry_budget(None, 2) == [None] * 2


@pytest.mark.slow
def test_the_retry_budget_holds_across_processes(tmp_path: Path) -> None:
    """Half of all calls fail, 6 attempts each: attempts stay <= 1.1 x items + the floor."""
    retry = budgeted_retry(ratio=0.1, attempts=6)
    options = {"processes": 2, "limit": 40, "retries": retry, "return_exceptions": True}
    results, stats = run(lambda: collect(half_failing, jobs(tmp_path, 2_000), **options))
    check_budget_held(tmp_path, results, stats, attempts=6)


@pytest.mark.slow
def test_the_retry_budget_floor_is_not_multiplied_by_the_processes(tmp_path: Path) -> None:
    """Every call fails, ratio 0, floor 10 over 3 processes: 10 retries in all, not 30."""
    retry = budgeted_retry(ratio=0.0, attempts=3)
    options = {"processes": 3, "limit": 90, "retries": retry, "return_exceptions": True}
    results, stats = run(lambda: collect(always_failing, jobs(tmp_path, 90), **options))
    assert attempts_logged(tmp_path) == 90 + FLOOR
    assert (stats.started, stats.completed, stats.failed, stats.retried) == (90, 0, 90, FLOOR)
    exhausted = sum(isinstance(r, corral.RetryBudgetExhausted) for r in results)
    # An item retried twice ends on its last attempt's ConnectionError instead.
    assert 85 <= exhausted <= 90
    assert all(isinstance(r, ConnectionError | corral.RetryBudgetExhausted) for r in results)


@pytest.mark.slow
def test_failures_are_counted_with_return_exceptions() -> None:
    """stats.failed counts the items that ended with an exception."""

    async def main() -> corral.Stats:
        async with corral.map(
            async_fail_on_three, range(30), processes=2, return_exceptions=True
        ) as out:
            async for _ in out:
                pass
            return out.stats

    stats = run(main)
    assert (stats.completed, stats.failed, stats.started) == (27, 3, 30)


@pytest.mark.slow
def test_the_input_is_pulled_lazily() -> None:
    """With limit=4 the parent pulls a few dozen items ahead of the consumer, not the input."""
    pulled = 0

    def numbers() -> Iterator[int]:
        nonlocal pulled
        for i in range(10**9):
            pulled += 1
            yield i

    async def main() -> int:
        async with corral.map(async_square, numbers(), processes=2, limit=4) as out:
            async for result in out:
                if result == 100:
                    break
                await asyncio.sleep(0)  # a consumer slower than the workers
        return pulled

    # 11 consumed; the parent may run WINDOW_PER_LIMIT * limit = 16 items ahead.
    assert run(main) <= 11 + 16


# ---------------------------------------------------------------------------
# Cleanup: no process outlives the map
# ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_failure_stops_every_process_at_once() -> None:
    """Item 5 fails while the others sleep a minute: the map raises now, no process remains."""
    async with asyncio.timeout(30):  # a minute-long sleep would trip this
        with pytest.raises(ValueError, match=r"item 5 fails"):
            await corral.gather(async_sleep_or_fail, range(10), processes=2, limit=10)
    assert worker_processes() == set()


@pytest.mark.slow
async def test_cancellation_leaves_no_worker_process(tmp_path: Path) -> None:
    """Cancelled while both processes sleep in calls: they are terminated, none remains."""
    items = [(str(tmp_path), 60.0)] * 8

    async with asyncio.timeout(30):  # hang guard
        task = asyncio.create_task(
            corral.gather(async_record_pid_and_sleep, items, processes=2, limit=8)
        )
        while len(os.listdir(tmp_path)) < 2:
            await asyncio.sleep(0.01)  # until both processes are inside calls
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert worker_processes() == set()


@pytest.mark.slow
def test_leaving_async_with_early_stops_the_processes() -> None:
    """break after the first result: the processes still sleeping in calls are stopped."""

    async def main() -> int:
        async with corral.map(async_sleep, [0.0] + [60.0] * 5, processes=2) as out:
            async for pid in out:
                return pid
        raise AssertionError("no result")

    assert run(main) != os.getpid()
    assert worker_processes() == set()


@pytest.mark.slow
def test_cancel_ends_the_map_keeping_what_is_done() -> None:
    """cancel() after a result: iteration ends without an error, the processes are stopped."""

    async def main() -> list[int]:
        got = []
        async with corral.map(async_sleep, [0.0] + [60.0] * 5, processes=2) as out:
            async for pid in out:
                got.append(pid)
                out.cancel()
        return got

    assert len(run(main)) == 1
    assert worker_processes() == set()


@pytest.mark.slow
def test_ctrl_c_leaves_no_worker_process(tmp_path: Path) -> None:
    """SIGINT to a script's process group (Ctrl-C): the script exits and its workers with it."""
    call = (
        f"corral.run(async_record_pid_and_sleep, [({str(tmp_path)!r}, 60.0)] * 4, "
        "processes=2, limit=4)"
    )
    stderr, survivors = ctrl_c(call, tmp_path, workers=2)
    assert b"KeyboardInterrupt" in stderr
    assert survivors == []


async def test_processes_that_cannot_start_end_the_map_saying_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure while starting the processes is raised to the consumer, not waited on."""

    def no_fork_server(context: object) -> None:
        raise OSError("the fork server cannot start here")

    monkeypatch.setattr(corral_shard, "warm_up_start_method", no_fork_server)
    async with asyncio.timeout(30):  # hang guard
        with pytest.raises(OSError, match=r"^the fork server cannot start here$"):
            await corral.gather(async_square, range(5), processes=2)
    assert worker_processes() == set()


@pytest.mark.slow
def test_a_dead_process_ends_the_map_with_worker_crashed() -> None:
    """A worker process that exits mid-map ends the map with WorkerCrashed, saying how."""
    with pytest.raises(WorkerCrashed, match=r"died \(exit code 3\)"):
        corral.run(async_exit_on_three, range(20), processes=2)
    assert worker_processes() == set()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fn", "kind"),
    [
        # async functions of one item, importable by the children, that raise it
        (functools.partial(asyncio.to_thread, sys.exit), SystemExit),
        (
            functools.partial(asyncio.to_thread, signal.default_int_handler, signal.SIGINT),
            KeyboardInterrupt,
        ),
    ],
    ids=["SystemExit", "KeyboardInterrupt"],
)
def test_system_exit_or_keyboard_interrupt_from_fn_ends_the_map_as_itself(
    fn: Callable[[Any], Awaitable[Any]], kind: type[BaseException]
) -> None:
    """Not a crash of the child, not captured by return_exceptions: raised as itself."""

    async def main() -> None:
        async with asyncio.timeout(10):  # hang guard
            await corral.gather(fn, range(6), processes=2, return_exceptions=True)

    with pytest.raises(kind):
        run(main)
    assert worker_processes() == set()


# ---------------------------------------------------------------------------
# Exactly once
# ---------------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(st.integers(0, 40), max_size=60),
    ordered=st.booleans(),
    limit=st.integers(1, 12),
    processes=st.integers(1, 3),
)
def test_each_item_ends_exactly_once_across_processes(
    values: list[int], ordered: bool, limit: int, processes: int
) -> None:
    """Whatever the split: each item yields exactly one result or exception, once."""

    async def main() -> list[Any]:
        async with corral.map(
            async_fail_on_three,
            values,
            processes=processes,
            limit=limit,
            ordered=ordered,
            return_exceptions=True,
        ) as out:
            return [r async for r in out]

    results = [repr(r) for r in run(main)]
    expected = [repr(KeyError(f"bad item {x}")) if x % 10 == 3 else repr(x) for x in values]
    if ordered:
        assert results == expected
    else:
        assert Counter(results) == Counter(expected)


@pytest.mark.slow
def test_a_function_the_processes_cannot_import_ends_the_map_saying_why() -> None:
    """fn pickles here but cannot be loaded there: a RuntimeError naming fn and the cause."""
    module = types.ModuleType("corral_ghost_module")
    exec("async def double(x):\n    return 2 * x\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        with pytest.raises(RuntimeError, match=r"cannot load fn=<function double") as info:
            corral.run(module.double, range(5), processes=2)
    finally:
        del sys.modules[module.__name__]
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert worker_processes() == set()


@pytest.mark.slow
def test_a_result_that_cannot_be_pickled_fails_in_its_place() -> None:
    """A result the child cannot send back becomes a TypeError for that item."""
    results: list[Any] = corral.run(
        async_returns_a_lambda, range(3), processes=2, return_exceptions=True
    )
    assert all(isinstance(r, TypeError) for r in results)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "what"),
    [("unloadable", "the result"), ("raise-unloadable", "the exception")],
)
def test_a_result_this_process_cannot_load_fails_its_item_alone(
    kind: str, what: str, tmp_path: Path
) -> None:
    """Pickled in the child, unloadable here: that item fails, named; the others are delivered."""
    log = str(tmp_path / "calls")
    items = [(log, x, kind if x == 3 else "") for x in range(8)]

    async def main() -> tuple[list[Any], corral.Stats]:
        async with (
            asyncio.timeout(60),  # hang guard
            corral.map(async_odd_result, items, processes=2, return_exceptions=True) as out,
        ):
            return [r async for r in out], out.stats

    results, stats = run(main)
    assert results[:3] + results[4:] == [0, 1, 2, 4, 5, 6, 7]
    error = results[3]
    assert isinstance(error, RuntimeError)
    assert str(error).startswith(
        f"{what} of fn(item) for item={reprlib.repr((log, 3, kind))} could not be loaded in this "
        "process: LookupError("
    )
    assert isinstance(error.__cause__, LookupError)
    assert (stats.completed, stats.failed) == (7, 1)
    assert sorted(complete_lines(tmp_path / "calls")) == list(range(8))  # each called once
    assert worker_processes() == set()


@pytest.mark.slow
def test_a_result_this_process_cannot_load_is_raised_naming_its_item(tmp_path: Path) -> None:
    """Without return_exceptions the map raises that error (not a bare unpickling error)."""
    log = str(tmp_path / "calls")
    items = [(log, x, "unloadable" if x == 3 else "") for x in range(6)]
    with pytest.raises(RuntimeError, match=r"^the result of fn\(item\) for item=\(.*, 3, "):
        corral.run(async_odd_result, items, processes=2)
    assert worker_processes() == set()


@pytest.mark.slow
@pytest.mark.parametrize("ordered", [True, False])
def test_an_item_a_child_cannot_unpickle_fails_alone_and_named(ordered: bool) -> None:
    """It travelled in a batch of many: the others run once each; it fails, named, in its place."""
    module = types.ModuleType("corral_ghost_module")
    exec("class Thing:\n    pass\n", module.__dict__)
    sys.modules[module.__name__] = module
    thing = module.Thing()
    items: list[Any] = [thing if i == 5 else i for i in range(12)]

    async def main() -> list[Any]:
        async with (
            asyncio.timeout(60),  # hang guard
            corral.map(
                async_square, items, processes=2, ordered=ordered, return_exceptions=True
            ) as out,
        ):
            return [r async for r in out]

    try:
        results = run(main)
    finally:
        del sys.modules[module.__name__]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1
    assert isinstance(errors[0], ModuleNotFoundError)
    assert f"raised for item={reprlib.repr(thing)}, which" in errors[0].__notes__[-1]
    values = [r for r in results if not isinstance(r, BaseException)]
    expected = [x * x for x in range(12) if x != 5]
    assert values == expected if ordered else sorted(values) == expected
    if ordered:
        assert results[5] is errors[0]
    assert worker_processes() == set()


@pytest.mark.slow
@pytest.mark.parametrize("hosted", [False, True], ids=["stream", "engine-in-front"])
async def test_unpicklable_items_give_back_their_room(hosted: bool) -> None:
    """Items that cannot be sent fill a child's room, then fail: the next items still go."""
    items: list[Any] = [lambda: 1, lambda: 2, 3]
    # progress= puts corral's engine in front of the processes (items handed over one by one).
    extra: dict[str, Any] = {"progress": lambda stats: None} if hosted else {}
    async with asyncio.timeout(60):  # hang guard: before, item 3 waited for room for ever
        results = await corral.gather(
            async_square, items, processes=1, limit=1, return_exceptions=True, **extra
        )
    assert [type(r) for r in results] == [TypeError, TypeError, int]
    assert results[2] == 9
    assert worker_processes() == set()


@pytest.mark.slow
def test_results_of_every_kind_come_back_as_they_were() -> None:
    """Plain values travel as they are, others pickled one by one: bytes too come back intact."""
    values: list[Any] = [b"raw", bytearray(b"ba"), True, None, 1.5, "s", 7, (1, b"x"), {"k": [1]}]
    values.append(signal.SIGTERM)  # an IntEnum: not a plain int
    results = corral.run(async_echo, values, processes=2)
    assert results == values
    assert [type(r) for r in results] == [type(v) for v in values]
