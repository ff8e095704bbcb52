"""The test loops themselves: virtual time is exact, loop errors fail tests."""

from __future__ import annotations

import asyncio

import pytest

from _loops import LOOP_KINDS, run


@pytest.mark.virtual_time
async def test_virtual_clock_jumps_over_sleeps() -> None:
    """A 1000 s sleep costs no real time and the clock reads exactly 1000 s later."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.sleep(1000)
    assert loop.time() - start == pytest.approx(1000)


@pytest.mark.virtual_time
async def test_virtual_clock_orders_timers() -> None:
    """Concurrent sleeps finish in deadline order at their exact virtual times."""
    loop = asyncio.get_running_loop()
    done: list[tuple[int, float]] = []

    async def nap(n: int) -> None:
        await asyncio.sleep(n)
        done.append((n, loop.time()))

    async with asyncio.TaskGroup() as tg:
        for n in (3, 1, 2):
            tg.create_task(nap(n))
    assert done == [(1, pytest.approx(1)), (2, pytest.approx(2)), (3, pytest.approx(3))]


async def test_runs_on_each_loop_kind(loop_kind: str) -> None:
    """The loop in use is the one the parametrisation names."""
    loop = asyncio.get_running_loop()
    if loop_kind == "uvloop":
        assert type(loop).__module__.startswith("uvloop")
    else:
        assert isinstance(loop, asyncio.BaseEventLoop)


def test_unretrieved_task_exception_fails_the_test() -> None:
    """An error the loop would only log (here: a task exception nobody retrieved) fails the run."""

    async def main() -> None:
        async def boom() -> None:
            raise RuntimeError("lost")

        asyncio.get_running_loop().create_task(boom())
        await asyncio.sleep(0)  # let boom() run and fail; its task is then garbage

    with pytest.raises(AssertionError, match="never retrieved"):
        run(main)


def test_loop_kinds_are_listed() -> None:
    """The default loop is always among the kinds the suite runs on."""
    assert "asyncio" in LOOP_KINDS
    assert run(lambda: asyncio.sleep(0, result=7)) == 7
