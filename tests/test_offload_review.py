"""Plain functions off the loop at awkward moments: executors shut down, workers dying together."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import corral
from _loops import run
from _work import StartsRunOut, alive, record_pid_and_sleep, worker_processes
from corral import _offload

pytestmark = pytest.mark.slow


def wait_for_file(path: str) -> str:
    """Runs in a pool's process: blocks until ``path`` exists (30 s at most)."""
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)
    return path


def identity(x: int) -> int:
    return x


class _CountingProcessPool(concurrent.futures.ProcessPoolExecutor):
    """A ProcessPoolExecutor that counts its submissions."""

    submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future = super().submit(*args, **kwargs)
        self.submitted += 1
        return future


class _CountingThreadPool(concurrent.futures.ThreadPoolExecutor):
    """A ThreadPoolExecutor that counts its submissions."""

    submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future = super().submit(*args, **kwargs)
        self.submitted += 1
        return future


async def _until(condition: Any, what: str, seconds: float = 20.0) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------------------
# A given executor shut down with cancel_futures=True while the map runs
# ---------------------------------------------------------------------------


def test_a_given_process_pool_shut_down_mid_run_fails_the_items_it_dropped(
    tmp_path: Path,
) -> None:
    """Calls the pool cancels (shutdown(cancel_futures=True)) fail as items, not as the map.

    They were never run: with return_exceptions=True every item still ends
    with its own error, and none reads as if fn had been cancelled.
    """
    marker = str(tmp_path / "go")
    context = multiprocessing.get_context("forkserver")
    pool = _CountingProcessPool(1, mp_context=context)

    async def main() -> list[Any]:
        # Three of the user's calls fill the pool's process and its call queue
        # (one more than its processes), so the map's submissions stay pending.
        own = [pool.submit(wait_for_file, marker) for _ in range(3)]
        async with asyncio.timeout(30):  # hang guard
            async with corral.map(identity, range(4), executor=pool, return_exceptions=True) as out:
                await _until(lambda: pool.submitted >= 5, "the map submitted its two chunks")
                pool.shutdown(wait=False, cancel_futures=True)
                os.close(os.open(marker, os.O_CREAT | os.O_WRONLY))  # the user's calls end
                results = [r async for r in out]
                stats = out.stats
        # Ours, ended or cancelled by the same shutdown.
        await _until(lambda: all(f.done() for f in own), "the user's own calls ended")
        assert (stats.completed, stats.failed, stats.in_flight) == (0, 4, 0)
        return results

    try:
        results = run(main)
    finally:
        Path(marker).touch()
        pool.shutdown(wait=True)
    assert len(results) == 4
    assert all(isinstance(r, RuntimeError) for r in results), results
    dropped = [r for r in results if "cancelled" in str(r)]
    assert len(dropped) == 2, results  # the two submitted chunks, one item each
    assert "item=0" in str(dropped[0])
    assert "cancel_futures" in str(dropped[0])


def test_a_given_thread_pool_shut_down_mid_run_fails_the_items_it_dropped() -> None:
    """A call queued in a user's thread pool that is shut down fails alone, named."""
    gate = threading.Event()
    pool = _CountingThreadPool(1)

    async def main() -> list[Any]:
        own = pool.submit(gate.wait, 30)  # the pool's one thread is busy
        async with asyncio.timeout(30):  # hang guard
            async with corral.map(identity, range(3), executor=pool, return_exceptions=True) as out:
                await _until(lambda: pool.submitted >= 2, "the map submitted its first call")
                pool.shutdown(wait=False, cancel_futures=True)
                gate.set()
                results = [r async for r in out]
                stats = out.stats
        assert own.result(timeout=20) is True
        assert (stats.completed, stats.failed, stats.in_flight) == (0, 3, 0)
        return results

    try:
        results = run(main)
    finally:
        gate.set()
        pool.shutdown(wait=True)
    assert all(isinstance(r, RuntimeError) for r in results), results
    assert "item=0" in str(results[0])
    assert "cancel_futures" in str(results[0])
    assert "after shutdown" in str(results[1])  # later calls: the pool refuses them


# ---------------------------------------------------------------------------
# executor="process": workers dying together when no new one can start
# ---------------------------------------------------------------------------


def _wait_dead(pids: list[int]) -> None:
    """Block (bounded) until every pid has died, its sockets closed by the kernel."""
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "the killed workers did not die"
        time.sleep(0.001)


def test_workers_dying_together_with_no_replacement_fail_their_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both workers killed at once, and no new one can start: each item fails, none hangs.

    The first death to be handled finds no worker left and no way to start
    one, so the pool gives up; the items of the second dead worker must fail
    with the same error instead of waiting for a worker that will never come.
    """
    context = StartsRunOut(allowed=2)
    monkeypatch.setattr(_offload, "mp_context", lambda: context)
    directory = tmp_path / "pids"
    directory.mkdir()

    async def main() -> list[Any]:
        pool = _offload.ProcessPool(record_pid_and_sleep, 2)
        try:
            async with asyncio.timeout(30):  # hang guard
                # A first call starts the pool and measures the task time.
                await pool((str(tmp_path / "warm-up"), 0.0))
                await _until(lambda: len(pool._workers) == 2, "both workers started")
                calls = [asyncio.ensure_future(pool((str(directory), 60.0))) for _ in range(2)]
                await _until(lambda: len(os.listdir(directory)) == 2, "each worker is in a call")
                pids = [int(name) for name in os.listdir(directory)]
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                # Both sockets are closed before the loop looks again: it sees
                # both deaths at once.
                _wait_dead(pids)
                return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await pool.close(False)

    (tmp_path / "warm-up").mkdir()
    results = run(main)
    assert len(results) == 2
    for result in results:
        assert isinstance(result, OSError), results
        assert "Too many open files" in str(result)
    assert worker_processes() == set()


# ---------------------------------------------------------------------------
# executor="process": workers that die before they can run anything
# ---------------------------------------------------------------------------


class DiesWhenLoaded:
    """A function whose worker process ends while loading it, before running any item.

    As a script without ``if __name__ == "__main__":`` does under the fork
    server or spawn, or a module of fn that ends its process on import.
    """

    def __call__(self, x: int) -> int:
        return x

    def __reduce__(self) -> tuple[Any, ...]:
        return (os._exit, (1,))


def test_workers_dying_before_they_load_fn_blame_no_item(
    pools: list[_offload.ProcessPool],
) -> None:
    """Items sent to a worker that never loaded fn did not run: no item is blamed or re-run.

    After MAX_CRASHES such deaths in a row every call fails with one
    WorkerCrashed saying the workers die before running anything, instead of
    each item killing three workers of its own and being named as the cause.
    """

    async def main() -> tuple[list[Any], corral.Stats]:
        async with asyncio.timeout(30):  # hang guard
            async with corral.map(
                DiesWhenLoaded(), range(6), executor="process", limit=2, return_exceptions=True
            ) as out:
                return [r async for r in out], out.stats

    results, stats = run(main)
    assert len(results) == 6
    for result in results:
        assert isinstance(result, corral.WorkerCrashed), results
        assert result.item is None
        assert "before running anything" in str(result)
        assert "exit code 1" in str(result)
    (pool,) = pools
    assert len(pool.pids) <= _offload.MAX_CRASHES + 2  # not three per item
    assert (stats.completed, stats.failed, stats.retried, stats.in_flight) == (0, 6, 0, 0)
    assert worker_processes() == set()


# ---------------------------------------------------------------------------
# processes=N: a BaseException of the program's own from fn
# ---------------------------------------------------------------------------


class Halt(BaseException):
    """A BaseException that is no SystemExit nor KeyboardInterrupt (some libraries raise one)."""


async def halt_on_three(x: int) -> int:
    if x == 3:
        raise Halt(f"halted at {x}")
    await asyncio.sleep(0)
    return x


def test_a_base_exception_from_fn_ends_a_map_in_one_process_as_itself() -> None:
    """Raised as itself, not captured by return_exceptions."""

    async def main() -> None:
        async with asyncio.timeout(30):  # hang guard
            await corral.gather(halt_on_three, range(8), limit=2, return_exceptions=True)

    with pytest.raises(Halt, match="halted at 3"):
        run(main)


def raise_cancelled(x: int) -> int:
    if x == 2:
        raise asyncio.CancelledError
    return x


def test_a_cancelled_error_raised_by_a_sync_fn_in_a_thread_is_still_called_fns() -> None:
    """Only a call the executor dropped is blamed on it; fn raising CancelledError stays fn's."""

    async def main() -> None:
        async with asyncio.timeout(30):  # hang guard
            await corral.gather(raise_cancelled, range(4), return_exceptions=True)

    with pytest.raises(RuntimeError, match="fn raised CancelledError for item 2"):
        run(main)


def quick_then_sleep(arg: tuple[str, int]) -> int:
    """Item 0 returns at once; every other leaves its pid in a directory and sleeps 60 s."""
    directory, item = arg
    if item:
        record_pid_and_sleep((directory, 60.0))
    return item


async def async_quick_then_sleep(arg: tuple[str, int]) -> int:
    directory, item = arg
    if item:
        os.close(os.open(os.path.join(directory, str(os.getpid())), os.O_CREAT | os.O_WRONLY))
        await asyncio.sleep(60)
    return item


@pytest.mark.parametrize(
    "how",
    [
        pytest.param({"executor": "process"}, id="executor=process"),
        pytest.param({"processes": 2, "progress": lambda stats: None}, id="processes+engine"),
    ],
)
def test_a_break_out_of_a_plain_async_for_leaves_no_worker_process(
    how: dict[str, Any], tmp_path: Path
) -> None:
    """``break`` with no ``async with``: the stream is dropped unclosed, and its close
    runs in the background, which ``asyncio.run`` ends before it is done. The workers,
    busy with calls nobody waits for, are stopped at once all the same."""
    fn = quick_then_sleep if "executor" in how else async_quick_then_sleep
    directory = str(tmp_path)

    busy_before_break: list[int] = []
    deadline = time.monotonic() + 60

    async def main_waiting_for_busy_workers() -> None:
        items = [(directory, item) for item in range(4)]
        async for first in corral.map(fn, items, limit=2, ordered=False, **how):
            assert first == 0
            # Wait (bounded) until a worker is inside a 60 s call: without a
            # prompt stop it would outlive the map by that much.
            while not os.listdir(directory):
                assert time.monotonic() < deadline, "no call started"
                await asyncio.sleep(0.01)
            busy_before_break.extend(int(name) for name in os.listdir(directory))
            break

    asyncio.run(main_waiting_for_busy_workers())
    end = time.monotonic() + 10
    while any(alive(pid) for pid in busy_before_break):
        assert time.monotonic() < end, "a worker busy when the map was dropped lives on"
        time.sleep(0.01)
    assert busy_before_break
