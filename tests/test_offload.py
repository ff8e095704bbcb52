"""Plain functions run off the loop: a thread pool as wide as the limit, or processes."""

from __future__ import annotations

import asyncio
import threading

import pytest

import corral
from _work import fail_on_three, fail_unpicklably, pid_of, square


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
