"""Plain functions run off the loop: a thread pool as wide as the limit, or processes."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import pickle
import reprlib
import signal
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corral
from _loops import run
from _work import (
    StartsRunOut,
    complete_lines,
    crash_once,
    crash_once_or_fail,
    ctrl_c,
    echo,
    exit_on_three,
    fail_on_three,
    fail_unpicklably,
    kill_on_three,
    odd_result,
    pid_of,
    record_pid_and_sleep,
    returns_a_lambda,
    segfault_on_three,
    sleep_then_pid,
    spin,
    square,
    worker_processes,
)
from corral import _offload
from corral._offload import WorkerCrashed


@pytest.mark.slow
async def test_sync_fn_runs_in_threads_as_wide_as_the_limit() -> None:
    """A plain def runs off the loop thread, `limit` calls at once (a barrier of 8 passes)."""
    barrier = threading.Barrier(8, timeout=10)
    loop_thread = threading.get_ident()

    def blocking(item: int) -> int:
        barrier.wait()  # all 8 must be inside at the same time
        assert threading.get_ident() != loop_thread
        return item

    async with asyncio.timeout(20):
        assert await corral.gather(blocking, range(16), limit=8) == list(range(16))
    assert not [t for t in threading.enumerate() if t.name.startswith("corral")]


@pytest.mark.slow
async def test_sync_fn_returning_a_coroutine_is_awaited() -> None:
    """A lambda that returns a coroutine still gives the coroutine's result."""

    async def double(x: int) -> int:
        return 2 * x

    assert await corral.gather(lambda x: double(x), range(4)) == [0, 2, 4, 6]


@pytest.mark.slow
def test_process_executor_runs_in_other_processes() -> None:
    """executor='process' computes in worker processes and returns results in order."""
    import os

    assert corral.run(square, range(50), executor="process") == [x * x for x in range(50)]
    pids = set(corral.run(pid_of, range(20), executor="process", limit=20))
    assert os.getpid() not in pids


@pytest.mark.slow
def test_process_exception_keeps_its_type_and_remote_traceback() -> None:
    """An exception in a worker process comes back as its own type with the remote traceback."""
    with pytest.raises(KeyError) as info:
        corral.run(fail_on_three, range(10), executor="process")
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "Traceback in the worker process" in notes
    assert "fail_on_three" in notes


@pytest.mark.slow
def test_unpicklable_process_exception_becomes_runtime_error() -> None:
    """An exception that cannot travel back is replaced by a RuntimeError naming it."""
    results = corral.run(fail_unpicklably, range(2), executor="process", return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert "Unpicklable: cannot travel (not picklable)" in str(results[0])


def test_process_executor_refuses_a_lambda_at_once() -> None:
    """A lambda cannot go to another process: refused with the fix."""
    with pytest.raises(TypeError, match=r"Define it at module level"):
        corral.map(lambda x: x, range(3), executor="process")


# ---------------------------------------------------------------------------
# executor="process": chunks, backpressure, crash recovery, cleanup
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_tasks_travel_in_chunks_never_more_than_the_limit(
    pools: list[_offload.ProcessPool],
) -> None:
    """50 µs tasks go many per message, and the workers never hold more than `limit` items."""
    assert corral.run(spin, range(3000), executor="process", limit=100) == list(range(3000))
    (pool,) = pools
    assert pool.items_sent == 3000
    assert pool.chunks_sent <= 3000 / 5  # ~25 per chunk once the task time is known
    assert pool.peak_in_pool <= 100


@pytest.mark.slow
def test_slow_tasks_go_one_at_a_time_to_every_process(pools: list[_offload.ProcessPool]) -> None:
    """Tasks of 60 ms are sent one per message, so no item waits behind another."""
    pids = corral.run(sleep_then_pid, [0.06] * 8, executor="process", limit=8)
    (pool,) = pools
    assert pool.chunks_sent == pool.items_sent == 8
    assert len(set(pids)) == min(8, _offload.usable_cpus())


def test_chunk_size_follows_the_measured_task_time() -> None:
    """About TARGET_CHUNK_SECONDS of work per chunk, shared over the free slots, capped."""
    sizer = _offload.ChunkSizer()
    assert sizer.size(waiting=100, free_slots=4) == 1  # unknown task time: one item
    assert sizer.depth() == 2
    sizer.observe(elapsed=0.005, items=100)  # 50 µs each
    assert sizer.size(waiting=100, free_slots=4) == 25  # an even share of what waits
    assert sizer.size(waiting=10_000, free_slots=4) == 200  # 10 ms of work
    sizer.per_item = 1e-9
    assert sizer.size(waiting=10_000, free_slots=1) == _offload.MAX_CHUNK
    sizer.per_item = 0.5
    assert sizer.size(waiting=100, free_slots=4) == 1
    assert sizer.depth() == 1  # slow items: nothing queued behind a running one


@pytest.mark.slow
def test_a_worker_that_dies_is_replaced_and_its_items_rerun_once(
    tmp_path: Path, pools: list[_offload.ProcessPool]
) -> None:
    """Items whose worker died are re-run (counted as retries); no result is lost or doubled."""
    items = [(str(tmp_path), i, i in (5, 50)) for i in range(120)]

    async def main() -> tuple[list[int], corral.Stats]:
        async with corral.map(crash_once, items, executor="process", limit=20) as results:
            return [r async for r in results], results.stats

    out, stats = run(main)
    assert out == list(range(120))
    (pool,) = pools
    assert pool.crashes == 2
    assert stats.retried >= 2  # both crashing items, plus any that shared their chunk
    assert stats.completed == 120
    assert stats.failed == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fn", "exitcode", "how"),
    [
        (exit_on_three, 3, "exit code 3"),
        (kill_on_three, -signal.SIGKILL, "killed by SIGKILL"),
        (segfault_on_three, -signal.SIGSEGV, "killed by SIGSEGV"),
    ],
)
def test_an_item_that_keeps_killing_its_worker_fails_with_worker_crashed(
    fn: Callable[[int], int], exitcode: int, how: str
) -> None:
    """os._exit, SIGKILL or a segfault three times: that item fails, naming it; the rest run."""
    results: list[Any] = corral.run(fn, range(20), executor="process", return_exceptions=True)
    assert results[:3] == [0, 1, 2]
    assert results[4:] == list(range(4, 20))
    error = results[3]
    assert isinstance(error, WorkerCrashed)
    assert (error.item, error.exitcode) == (3, exitcode)
    assert str(error) == (
        f"fn(item) killed its worker process 3 times (last: {how}); giving up on item=3. "
        "A plain `def` run with executor='process' must not end its process: os._exit(), "
        "a crash in C code, or a kill (e.g. by the OOM killer) all look alike here."
    )


@pytest.mark.slow
def test_worker_crashed_is_raised_as_the_failure_of_the_map() -> None:
    """Without return_exceptions the map fails with WorkerCrashed, and it pickles intact."""
    with pytest.raises(WorkerCrashed, match=r"giving up on item=3\.") as info:
        corral.run(exit_on_three, range(10), executor="process")
    copy = pickle.loads(pickle.dumps(info.value))
    assert (type(copy), str(copy), copy.item, copy.exitcode) == (
        WorkerCrashed,
        str(info.value),
        3,
        3,
    )


@pytest.mark.slow
def test_an_unpicklable_item_fails_alone() -> None:
    """An item that cannot be sent fails with a TypeError in its place; the others run."""
    items: list[Any] = [1, 2, lambda: 3, 4]
    results: list[Any] = corral.run(square, items, executor="process", return_exceptions=True)
    assert results[:2] == [1, 4]
    assert results[3] == 16
    assert isinstance(results[2], TypeError)
    assert "cannot be sent to a worker process" in str(results[2])


@pytest.mark.slow
async def test_cancelling_a_map_leaves_no_worker_process(tmp_path: Path) -> None:
    """Cancelled while every worker is busy for a minute: they are terminated, none remains."""
    items = [(str(tmp_path), 60.0)] * 10

    async def consume() -> None:
        await corral.gather(record_pid_and_sleep, items, executor="process", limit=4)

    async with asyncio.timeout(30):  # hang guard
        task = asyncio.create_task(consume())
        while len(os.listdir(tmp_path)) < min(4, _offload.usable_cpus()):
            await asyncio.sleep(0.01)  # until every worker is inside a call
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert worker_processes() == set()
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_ctrl_c_leaves_no_worker_process(tmp_path: Path) -> None:
    """SIGINT to a script's process group (Ctrl-C): the script exits and its workers with it."""
    call = (
        f"corral.run(record_pid_and_sleep, [({str(tmp_path)!r}, 60.0)] * 4, "
        "executor='process', limit=4)"
    )
    stderr, survivors = ctrl_c(call, tmp_path, workers=min(4, _offload.usable_cpus()))
    assert b"KeyboardInterrupt" in stderr
    assert survivors == []


@pytest.mark.slow
def test_a_given_process_pool_is_fed_in_chunks_and_left_open() -> None:
    """A ProcessPoolExecutor passed in is used (chunked) and not shut down by corral."""
    import concurrent.futures

    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        assert corral.run(square, range(300), executor=pool) == [x * x for x in range(300)]
        assert pool.submit(square, 7).result() == 49


@pytest.mark.slow
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(st.integers(-5, 40), max_size=40),
    ordered=st.booleans(),
    limit=st.integers(1, 16),
)
def test_each_item_ends_exactly_once_through_worker_processes(
    values: list[int], ordered: bool, limit: int
) -> None:
    """Through processes, with failures and a crash: each item yields exactly one outcome."""
    with tempfile.TemporaryDirectory() as directory:
        items = [(directory, x, x % 10 == 7) for x in values]  # 7, 17... kill a worker once

        async def main() -> list[Any]:
            async with corral.map(
                crash_once_or_fail,
                items,
                executor="process",
                limit=limit,
                ordered=ordered,
                return_exceptions=True,
            ) as results:
                return [r async for r in results]

        out = run(main)
    expected = [ValueError(x) if x < 0 else x for x in values]
    key = repr
    if ordered:
        assert [key(r) for r in out] == [key(e) for e in expected]
    else:
        assert sorted(map(key, out)) == sorted(map(key, expected))


@pytest.fixture
def ghost() -> Iterator[types.ModuleType]:
    """A module that exists in this process only: worker processes cannot import it."""
    module = types.ModuleType("corral_ghost_module")
    code = "def double(x):\n    return 2 * x\n\nclass Thing:\n    pass\n"
    exec(code, module.__dict__)
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


@pytest.mark.slow
def test_a_function_the_workers_cannot_import_fails_every_call_saying_why(
    ghost: types.ModuleType,
) -> None:
    """fn pickles here but cannot be loaded there: a RuntimeError naming fn and the cause."""
    with pytest.raises(RuntimeError, match=r"cannot load fn=<function double") as info:
        corral.run(ghost.double, range(5), executor="process")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert worker_processes() == set()


@pytest.mark.slow
def test_items_or_results_that_cannot_cross_fail_in_their_place(ghost: types.ModuleType) -> None:
    """An item the worker cannot unpickle, or a result it cannot pickle, fails that item."""
    results: list[Any] = corral.run(
        returns_a_lambda, range(3), executor="process", return_exceptions=True
    )
    assert all(isinstance(r, TypeError) for r in results)
    assert "cannot be sent back from the worker process" in str(results[0])
    things: list[Any] = corral.run(
        pid_of, [ghost.Thing()], executor="process", return_exceptions=True
    )
    assert isinstance(things[0], ModuleNotFoundError)


# ---------------------------------------------------------------------------
# Worker processes that cannot start, busy ones at the end, escaping exceptions
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_workers_that_cannot_start_fail_the_calls_with_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No worker starts (EMFILE): the calls fail with that error instead of waiting for ever."""
    context = StartsRunOut(allowed=0)
    monkeypatch.setattr(_offload, "mp_context", lambda: context)

    async def main() -> None:
        async with asyncio.timeout(10):  # hang guard
            await corral.gather(square, range(4), executor="process", limit=2)

    with pytest.raises(OSError, match=r"Too many open files"):
        run(main)
    assert worker_processes() == set()


@pytest.mark.slow
def test_a_pool_goes_on_with_the_workers_that_could_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One worker of three starts: it runs every call, and the failure is logged, not lost."""
    context = StartsRunOut(allowed=1)
    monkeypatch.setattr(_offload, "mp_context", lambda: context)

    async def main() -> tuple[list[int], _offload.ProcessPool]:
        pool = _offload.ProcessPool(square, 3)
        try:
            async with asyncio.timeout(10):  # hang guard
                return list(await asyncio.gather(*(pool(x) for x in range(20)))), pool
        finally:
            await pool.close(True)

    # run() also fails the test on a task exception nobody retrieved.
    results, pool = run(main)
    assert results == [x * x for x in range(20)]
    assert len(pool.pids) == 1
    assert "could not start a worker process" in caplog.text
    assert "going on with 1" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_busy_workers_are_terminated_not_waited_for_after_cancel_or_a_deadline(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cancel() or deadline= while a worker is in a minute-long call: over in seconds,
    without the grace of a clean end (raised here to a minute: a wait for it is plain)."""
    monkeypatch.setattr(_offload, "EXIT_GRACE", 60.0)
    items = [(str(tmp_path), 60.0)] * 4

    async def main() -> float:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(50):  # hang guard
            if how == "deadline":
                began = loop.time()
                with pytest.raises(corral.DeadlineExceeded):
                    await corral.gather(
                        record_pid_and_sleep, items, executor="process", limit=2, deadline=1.0
                    )
                assert os.listdir(tmp_path)  # the deadline found a worker busy
                return loop.time() - began - 1.0
            async with corral.map(record_pid_and_sleep, items, executor="process", limit=2) as out:
                while not os.listdir(tmp_path):
                    await asyncio.sleep(0.01)  # until a worker is inside a call
                began = loop.time()
                out.cancel()
                assert [r async for r in out] == []
            return loop.time() - began

    assert run(main) < 15  # the terminate's second and room for a loaded machine
    assert worker_processes() == set()


@pytest.mark.slow
def test_stopping_processes_gives_them_one_grace_period_in_all() -> None:
    """Four processes that will not exit: the grace period is shared, not one after another."""

    async def main() -> float:
        context = _offload.mp_context()
        processes = [context.Process(target=time.sleep, args=(60,), daemon=True) for _ in range(4)]
        for process in processes:
            process.start()
        loop = asyncio.get_running_loop()
        began = loop.time()
        await _offload.stop_processes(processes, grace=2.0)
        return loop.time() - began

    assert run(main) < 6.0  # 4 x 2 s before


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fn", "kind"),
    [
        (sys.exit, SystemExit),
        (functools.partial(signal.default_int_handler, signal.SIGINT), KeyboardInterrupt),
    ],
    ids=["SystemExit", "KeyboardInterrupt"],
)
def test_system_exit_or_keyboard_interrupt_from_fn_in_a_process_ends_the_run(
    fn: Callable[[Any], Any], kind: type[BaseException], pools: list[_offload.ProcessPool]
) -> None:
    """As with threads: raised as itself, never captured by return_exceptions nor retried."""

    async def main() -> None:
        async with asyncio.timeout(10):  # hang guard
            await corral.gather(
                fn, range(6), executor="process", limit=2, retries=2, return_exceptions=True
            )

    with pytest.raises(kind):
        run(main)
    (pool,) = pools
    assert pool.crashes == 0  # the worker reported it; it did not die of it
    assert worker_processes() == set()


def test_a_given_process_pool_refuses_a_lambda_at_once() -> None:
    """A user's ProcessPoolExecutor cannot take a lambda either: refused before any call."""
    import concurrent.futures

    with (
        concurrent.futures.ProcessPoolExecutor(1) as pool,
        pytest.raises(TypeError, match=r"^executor=<concurrent\.futures\.process\.") as info,
    ):
        corral.map(lambda x: x, range(3), executor=pool)
    assert str(info.value).endswith("so worker processes can import it.")


@pytest.mark.slow
def test_an_item_a_worker_cannot_unpickle_fails_alone_and_named(ghost: types.ModuleType) -> None:
    """It travelled in a chunk of many: its neighbours are re-run and succeed; it fails named."""
    thing = ghost.Thing()
    items: list[Any] = [thing if i == 20 else i for i in range(40)]

    async def main() -> tuple[list[Any], int]:
        pool = _offload.ProcessPool(spin, 1)
        try:
            async with asyncio.timeout(10):  # hang guard
                await pool(-1)  # the task time is known: what waits goes in chunks
                calls = (pool(item) for item in items)
                results = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await pool.close(True)
        return results, pool.chunks_sent

    results, chunks = run(main)
    assert chunks < len(items)  # the 40 did not go one by one
    assert [i for i, r in enumerate(results) if isinstance(r, BaseException)] == [20]
    assert results[:20] == list(range(20))
    assert results[21:] == list(range(21, 40))
    error = results[20]
    assert isinstance(error, ModuleNotFoundError)
    assert f"raised for item={reprlib.repr(thing)}, which" in error.__notes__[-1]


def test_a_chunk_that_ends_after_the_pool_broke_is_ignored() -> None:
    """Its calls failed with the pool's error already: its late results are not news."""

    async def main() -> None:
        pool = _offload.ProcessPool(time.sleep, 1)
        try:
            async with asyncio.timeout(10):  # hang guard
                await pool(0)  # started, fn loaded
                call = asyncio.ensure_future(pool(0.3))
                [worker] = pool._workers
                while not worker.chunks:  # until its chunk is in the worker
                    await asyncio.sleep(0.005)
                pool._break(lambda: RuntimeError("the pool broke"))
                with pytest.raises(RuntimeError, match="the pool broke"):
                    await call
                # The worker ends the chunk and reports it (0.3 s, or more on a
                # loaded machine: its report is read whenever it comes).
                await asyncio.sleep(1.5)
        finally:
            await pool.close(True)

    run(main)  # fails on anything the loop logged, as a protocol callback's error


# ---------------------------------------------------------------------------
# timeout=: the clock measures the call, never the wait for a thread or process
# ---------------------------------------------------------------------------

# Module-level, so worker processes can import them from this module.


def _log_call(log: str, x: int) -> None:
    """Appends a line ``x`` to the file ``log`` (one O_APPEND write: lines never mix)."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b"%d\n" % x)
    finally:
        os.close(fd)


def logged_sleep(arg: tuple[str, int, float]) -> int:
    """For ``(log, x, seconds)``: logs the call, sleeps, returns ``x``."""
    log, x, seconds = arg
    _log_call(log, x)
    time.sleep(seconds)
    return x


def hang_the_first_time(arg: tuple[str, int, bool]) -> int:
    """For ``(directory, x, hang)``: logs the call; a marked item's first call hangs a minute."""
    directory, x, hang = arg
    _log_call(os.path.join(directory, "calls"), x)
    marker = os.path.join(directory, f"hung-{x}")
    if hang and not os.path.exists(marker):
        with open(marker, "w"):
            pass
        time.sleep(60)
    return x


@pytest.mark.slow
def test_a_timeout_in_worker_processes_counts_the_call_not_the_wait_for_a_worker(
    tmp_path: Path, pools: list[_offload.ProcessPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 calls of 0.2 s on 2 workers with timeout=1 (limit 100): none times out, each runs once."""
    monkeypatch.setattr(_offload, "usable_cpus", lambda: 2)
    log = tmp_path / "calls"
    items = [(str(log), x, 0.2) for x in range(16)]

    async def main() -> list[Any]:
        async with asyncio.timeout(30):  # hang guard
            return await corral.gather(
                logged_sleep, items, executor="process", timeout=1.0, return_exceptions=True
            )

    assert run(main) == list(range(16))  # before: the last ~6 waited past 1 s and failed
    assert sorted(complete_lines(log)) == list(range(16))
    (pool,) = pools
    assert pool.chunks_sent == pool.items_sent == 16  # timed items travel alone
    assert (pool.overruns, pool.crashes) == (0, 0)
    assert worker_processes() == set()


@pytest.mark.slow
@pytest.mark.parametrize("ordered", [True, False])
def test_a_call_past_its_timeout_loses_its_worker_and_the_others_run(
    ordered: bool, tmp_path: Path, pools: list[_offload.ProcessPool]
) -> None:
    """Item 0 hangs: TimeoutError for it alone; its worker is replaced, not waited for."""
    log = tmp_path / "calls"
    items = [(str(log), x, 60.0 if x == 0 else 0.02) for x in range(12)]

    async def main() -> tuple[list[Any], float]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with (
            asyncio.timeout(20),  # hang guard
            corral.map(
                logged_sleep,
                items,
                executor="process",
                limit=2,
                timeout=1.0,
                ordered=ordered,
                return_exceptions=True,
            ) as results,
        ):
            out = [r async for r in results]
        return out, loop.time() - began

    out, took = run(main)
    errors = [r for r in out if isinstance(r, BaseException)]
    assert len(errors) == 1
    assert isinstance(errors[0], TimeoutError)
    assert "ran past timeout=1 s for item=" in str(errors[0])
    values = [r for r in out if not isinstance(r, BaseException)]
    assert values == list(range(1, 12)) if ordered else sorted(values) == list(range(1, 12))
    if ordered:
        assert out[0] is errors[0]
    assert sorted(complete_lines(log)) == list(range(12))  # no re-run: it was no crash
    (pool,) = pools
    assert (pool.overruns, pool.crashes) == (1, 0)
    assert len(pool.pids) == min(2, _offload.usable_cpus()) + 1  # one replacement
    assert took < 10  # not the hanging call's minute
    assert worker_processes() == set()


@pytest.mark.slow
def test_a_call_past_its_timeout_is_retried_in_a_fresh_worker(
    tmp_path: Path, pools: list[_offload.ProcessPool]
) -> None:
    """limit=1 (one worker): the hung first attempt is terminated, the retry runs and succeeds."""
    items = [(str(tmp_path), x, x == 1) for x in range(4)]

    async def main() -> tuple[list[int], corral.Stats]:
        async with (
            asyncio.timeout(20),  # hang guard
            corral.map(
                hang_the_first_time, items, executor="process", limit=1, timeout=1.0, retries=2
            ) as results,
        ):
            return [r async for r in results], results.stats

    out, stats = run(main)
    assert out == [0, 1, 2, 3]  # before: the retry waited behind the hung call, and timed out
    assert stats.retried == 1
    assert sorted(complete_lines(tmp_path / "calls")) == [0, 1, 1, 2, 3]
    (pool,) = pools
    assert (pool.overruns, pool.crashes) == (1, 0)
    assert worker_processes() == set()


@pytest.mark.slow
def test_a_given_process_pool_times_the_call_not_the_wait_for_a_process(
    tmp_path: Path,
) -> None:
    """ProcessPoolExecutor(2), 16 calls of 0.2 s, timeout=1: one per process at once, none late."""
    import concurrent.futures

    log = tmp_path / "calls"
    items = [(str(log), x, 0.2) for x in range(16)]

    async def main(pool: concurrent.futures.ProcessPoolExecutor) -> list[Any]:
        async with asyncio.timeout(30):  # hang guard
            return await corral.gather(
                logged_sleep, items, executor=pool, timeout=1.0, return_exceptions=True
            )

    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        assert run(lambda: main(pool)) == list(range(16))
    assert sorted(complete_lines(log)) == list(range(16))


@pytest.mark.slow
@pytest.mark.parametrize("given", [False, True], ids=["own-threads", "given-threads"])
def test_threads_run_no_more_calls_than_threads_so_none_waits_under_its_timeout(
    given: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 threads, 32 calls of 0.05 s, timeout=0.3, a wider limit: none waits for a thread."""
    import concurrent.futures

    lock = threading.Lock()
    running = peak = 0

    def nap(x: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return x

    async def main(executor: concurrent.futures.Executor | None, limit: int | None) -> list[Any]:
        async with asyncio.timeout(20):  # hang guard
            return await corral.gather(
                nap, range(32), limit=limit, executor=executor, timeout=0.3, return_exceptions=True
            )

    if given:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = run(lambda: main(pool, 32))
    else:
        monkeypatch.setattr(_offload, "UNBOUNDED_THREADS", 4)
        results = run(lambda: main(None, None))  # limit=None: the map's own 4 threads
    assert results == list(range(32))  # before: calls queued for a thread timed out
    assert peak == 4


# ---------------------------------------------------------------------------
# Items and results that cannot cross: only their own item fails, each runs once
# ---------------------------------------------------------------------------


def _odd_items(log: Path, bad: dict[int, str], count: int = 40) -> list[tuple[str, int, str]]:
    return [(str(log), x, bad.get(x, "")) for x in range(count)]


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["given", "process"])
@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("lambda", TypeError, "cannot be sent back from the worker process: it cannot be pickled"),
        ("unloadable", RuntimeError, "the result of fn(item) for item="),
        ("raise-unloadable", RuntimeError, "the exception of fn(item) for item="),
    ],
)
def test_a_result_that_cannot_come_back_fails_its_item_alone_in_its_chunk(
    executor: str, kind: str, error: type[Exception], message: str, tmp_path: Path
) -> None:
    """Item 20 travels in a chunk of many: it alone fails, named; the others run once each."""
    import concurrent.futures

    log = tmp_path / "calls"
    items = _odd_items(log, {20: kind})

    async def main(pool: concurrent.futures.Executor | str) -> list[Any]:
        async with asyncio.timeout(60):  # hang guard
            return await corral.gather(odd_result, items, executor=pool, return_exceptions=True)

    if executor == "given":
        with concurrent.futures.ProcessPoolExecutor(1) as pool:
            results = run(lambda: main(pool))
            assert pool.submit(square, 7).result() == 49  # the pool still works
    else:
        results = run(lambda: main("process"))
    assert [i for i, r in enumerate(results) if isinstance(r, BaseException)] == [20]
    assert results[:20] + results[21:] == [x for x in range(40) if x != 20]
    assert isinstance(results[20], error)
    assert message in str(results[20])
    if error is RuntimeError:
        assert f"item={reprlib.repr(items[20])}" in str(results[20])
    assert sorted(complete_lines(log)) == list(range(40))  # none ran twice
    assert worker_processes() == set()


@pytest.mark.slow
def test_an_unpicklable_item_fails_alone_in_a_given_pool() -> None:
    """A lambda among 40 items for a ProcessPoolExecutor: it fails, named; its chunk runs."""
    import concurrent.futures

    items: list[Any] = [(lambda: 20) if i == 20 else i for i in range(40)]
    with concurrent.futures.ProcessPoolExecutor(1) as pool:
        results: list[Any] = corral.run(spin, items, executor=pool, return_exceptions=True)
    assert [i for i, r in enumerate(results) if isinstance(r, BaseException)] == [20]
    assert results[:20] + results[21:] == [x for x in range(40) if x != 20]
    assert isinstance(results[20], TypeError)
    assert str(results[20]).startswith(
        f"the item {reprlib.repr(items[20])} cannot be sent to a worker process: it cannot be "
        "pickled ("  # then pickle's own words, which differ between Python versions
    )
    assert "local object" in str(results[20])


@pytest.mark.slow
def test_an_item_a_given_pool_cannot_unpickle_fails_alone_and_named(
    ghost: types.ModuleType,
) -> None:
    """An item its processes cannot import, in a chunk of many: it alone fails, named."""
    import concurrent.futures

    thing = ghost.Thing()
    items: list[Any] = [thing if i == 20 else i for i in range(40)]
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=_offload.mp_context()) as pool:
        results: list[Any] = corral.run(spin, items, executor=pool, return_exceptions=True)
    assert [i for i, r in enumerate(results) if isinstance(r, BaseException)] == [20]
    assert results[:20] + results[21:] == [x for x in range(40) if x != 20]
    assert isinstance(results[20], ModuleNotFoundError)
    assert f"raised for item={reprlib.repr(thing)}, which" in results[20].__notes__[-1]


@pytest.mark.slow
def test_unpicklable_items_take_no_worker_slot_from_the_items_behind_them() -> None:
    """Two lambdas then an int, one worker (two slots): the int still runs, nothing hangs."""

    async def main() -> list[Any]:
        pool = _offload.ProcessPool(square, 1)
        try:
            async with asyncio.timeout(30):  # hang guard: before, item 3 waited for ever
                calls = (pool(item) for item in [lambda: 1, lambda: 2, 3])
                return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await pool.close(True)

    first, second, third = run(main)
    assert isinstance(first, TypeError)
    assert isinstance(second, TypeError)
    assert third == 9
    assert worker_processes() == set()


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["given", "process"])
def test_results_of_every_kind_come_back_as_they_were(executor: str) -> None:
    """Plain values travel as they are, others pickled one by one: bytes too come back intact."""
    import concurrent.futures

    values: list[Any] = [b"raw", bytearray(b"ba"), True, None, 1.5, "s", 7, (1, b"x"), {"k": [1]}]
    values.append(signal.SIGTERM)  # an IntEnum: not a plain int
    if executor == "given":
        with concurrent.futures.ProcessPoolExecutor(1) as pool:
            results = corral.run(echo, values, executor=pool)
    else:
        results = corral.run(echo, values, executor="process")
    assert results == values
    assert [type(r) for r in results] == [type(v) for v in values]
