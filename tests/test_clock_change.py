"""A Limiter serves successive event loops, whose clocks may start anywhere.

A loop's ``time()`` is its own: the default loop reads the machine's
monotonic clock, a virtual clock starts at 0. What a Limiter keeps in one
loop's times (the adaptive controller's windows, the retry budget's slots)
must not freeze it on the next loop's clock when that one reads lower.
"""

from __future__ import annotations

import asyncio

import pytest

import corral
from _loops import VirtualClockLoop, run
from corral import Adaptive, Limiter, RetryBudget
from corral._adaptive import DROP_BACKOFF, MIN_SAMPLES, Controller
from corral._retry_budget import ERROR, RetryBudgetState

# -- the adaptive controller ----------------------------------------------------


def test_a_controller_adapts_on_a_clock_that_reads_lower() -> None:
    """Windows judged by the old clock's times would never close on a clock that starts at 0."""
    controller = Controller(Adaptive(initial=8, max=1000))
    for _ in range(MIN_SAMPLES):
        controller.success(1e6, 0.01, True)
    grown = controller.limit
    assert grown > 8  # slow start: one window closed, the limit grew

    # The next loop's clock starts at 0: its calls are judged, and slow start goes on.
    for step in range(1, 200):
        controller.success(step * 0.001, 0.0005, True)
    assert controller.limit > grown


def test_a_drop_on_a_clock_that_reads_lower_still_cuts() -> None:
    """A drop whose call began 'before the latest change' by the old clock is not ignored."""
    controller = Controller(Adaptive(initial=100, max=1000))
    controller.drop(1e6, 0.01)
    assert controller.limit == pytest.approx(100 * DROP_BACKOFF)
    controller.drop(5.0, 0.01)  # another loop, whose clock reads 5 s
    assert controller.limit == pytest.approx(100 * DROP_BACKOFF**2)
    controller.drop(5.001, 0.01)  # started before that cut, on the same clock: answered by it
    assert controller.limit == pytest.approx(100 * DROP_BACKOFF**2)


# -- the retry budget -------------------------------------------------------------


def test_a_retry_budget_ages_on_a_clock_that_reads_lower() -> None:
    """Retries spent by the old clock count on, then leave the window by the new one's times."""
    state = RetryBudgetState(RetryBudget(ratio=0.0, floor=2, window=10.0))
    assert [state.try_retry(ERROR, 1e6) for _ in range(3)] == [True, True, False]
    # A new loop whose clock starts at 0: the retries of a moment ago still count...
    assert not state.try_retry(ERROR, 0.0)
    assert state.counts(5.0) == (0, 0, 2)
    # ...until a window has passed on the new clock (by the old one, never).
    assert state.counts(10.5) == (0, 0, 0)
    assert state.try_retry(ERROR, 10.5)


# -- a shared Limiter, end to end ---------------------------------------------------


def test_an_adaptive_limiter_adapts_on_the_next_loops_clock() -> None:
    """Limiter('auto') used in one asyncio.run after another keeps finding its limit."""
    limiter = Limiter(Adaptive(initial=4, max=64))

    async def call(item: int) -> int:
        await asyncio.sleep(0.01)  # no queue behind it: the limit grows (slow start)
        return item

    async def main(start: float) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualClockLoop)
        loop.advance(start)  # this loop's clock starts `start` seconds in
        before = limiter.limit
        assert await corral.gather(call, range(60), limit=limiter) == list(range(60))
        return before, limiter.limit

    before, after = run(lambda: main(1e6), virtual_time=True)
    assert before < after < 64
    # The next loop's clock reads 1e6 s lower; its calls still move the limit.
    again, last = run(lambda: main(0.0), virtual_time=True)
    assert again == after
    assert last > again
