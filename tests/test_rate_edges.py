"""Plain rates at their edges: odd values, lists of rates, clocks far from 0, loops in turn."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import corral
from _loops import VirtualClockLoop, run
from corral import Rate
from corral._rate import RateGate, as_rate, as_rates
from test_limits import _simulate  # the ideal FIFO GCRA schedule


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def _finite_message(value: object) -> str:
    return (
        "rate must be a finite number > 0, like 20, '20/s' or corral.Rate(20, per=1.0); "
        f"got rate={value!r}"
    )


def _resolution(start: float) -> float:
    """The clock resolution of a :class:`FarClockLoop` starting at ``start``."""
    return max(1e-9, math.ulp(start))


class FarClockLoop(VirtualClockLoop):
    """A virtual clock that starts at ``start`` seconds, as a monotonic clock after long uptime.

    Timers due within one step of the float grid run in the same iteration:
    at 1e9 s a float has no room for the base loop's 1e-9 s, and a timer due
    at "now" would never be run.
    """

    def __init__(self, start: float) -> None:
        super().__init__()
        self._now = start
        self._clock_resolution = _resolution(start)


def run_from(start: float, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``main()`` on a fresh virtual loop whose clock reads ``start`` at first."""
    with asyncio.Runner(loop_factory=lambda: FarClockLoop(start)) as runner:
        return runner.run(main())


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


# -- what rate= accepts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (10**400, ValueError),
        (math.inf, ValueError),
        (-math.inf, ValueError),
        (0, ValueError),
        (True, TypeError),
        ("1e400/s", ValueError),
        ("1/1e308d", ValueError),  # the period overflows a float
        ("20/0s", ValueError),
    ],
)
def test_a_rate_that_is_no_finite_number_says_so(value: object, error: type[Exception]) -> None:
    """10**400 is > 0: the message says what is wrong with it, that it is not finite."""
    with pytest.raises(error, match=exactly(_finite_message(value))):
        as_rate(value)


@pytest.mark.parametrize(
    ("text", "n", "per"),
    [
        ("0.5/s", 0.5, 1.0),
        ("1e3/min", 1000.0, 60.0),
        ("20 / s", 20.0, 1.0),
        ("20\t/\tS", 20.0, 1.0),
        ("3/H", 3.0, 3600.0),
        ("2/d", 2.0, 86400.0),
        ("1/days", 1.0, 86400.0),
        ("5/100MS", 5.0, 0.1),
        ("20/1.5sec", 20.0, 1.5),
        ("+20/s", 20.0, 1.0),
    ],
)
def test_rate_text_in_its_other_spellings(text: str, n: float, per: float) -> None:
    rate = Rate.parse(text)
    assert (rate.n, rate.burst) == (n, 1)
    assert rate.per == pytest.approx(per)


def test_numpy_numbers_are_rates_and_numpy_bools_are_not() -> None:
    np = pytest.importorskip("numpy")
    assert as_rate(np.float64(20.0)) == Rate(20.0)
    assert as_rate(np.int64(20)) == Rate(20.0)
    with pytest.raises(TypeError, match=exactly(_finite_message(np.True_))):
        as_rate(np.True_)


def test_a_numpy_float32_rate_is_kept_in_python_floats() -> None:
    """Rate(np.float32(3)) on a clock at 1e6 s: starts a third of a second apart, not 1/16 s off.

    Its interval used to be a float32, and TAT + a float32 is a float32: a
    step of 0.0625 s at 1e6 s.
    """
    np = pytest.importorskip("numpy")
    rate = Rate(np.float32(3.0), per=1.0, burst=np.int64(2))
    assert type(rate.interval) is float
    assert type(rate.tolerance) is float
    assert type(Rate({"requests": np.float32(3.0)}).interval) is float

    async def main() -> list[float]:
        gate = RateGate(rate)
        origin = _loop_time()
        starts = []
        for _ in range(5):
            await gate.wait()
            starts.append(_loop_time() - origin)
        return starts

    third = 1 / 3
    assert run_from(1e6, main) == pytest.approx([0, 0, third, 2 * third, 3 * third], abs=1e-6)


def test_a_list_of_rates_refuses_none_naming_the_list() -> None:
    """None in a list is no window: refused up front, not an AttributeError in the gate."""
    rates = [Rate(10), None]
    message = (
        "each rate in a list of rates must be a rate like 20, '20/s' or "
        f"corral.Rate(20, per=1.0), not None; got rate={rates!r}"
    )
    with pytest.raises(TypeError, match=exactly(message)):
        as_rates(rates)
    with pytest.raises(TypeError, match=exactly(message)):
        corral.Limiter(rate=rates)  # type: ignore[arg-type]

    async def call(item: int) -> int:
        return item

    async def main() -> None:
        with pytest.raises(TypeError, match=exactly(message)):
            await corral.gather(call, range(3), rate=rates)  # type: ignore[arg-type]

    run(main)
    with pytest.raises(TypeError, match=r"not None; got rate=\[None\]$"):
        as_rates([None])  # used to mean "no rate" without a word


def test_a_list_of_rates_refuses_a_list_in_it_naming_the_whole_value() -> None:
    message = (
        "each rate in a list of rates must be a rate like 20, '20/s' or "
        "corral.Rate(20, per=1.0), not [20]; got rate=[[20], '10/s']"
    )
    with pytest.raises(TypeError, match=exactly(message)):
        as_rates([[20], "10/s"])


def test_auto_in_a_list_of_rates_is_refused_saying_why() -> None:
    """'auto' is valid alone; in a list it used to be refused as text that is no rate."""
    message = (
        "rate='auto' adapts one rate on its own and cannot be one of a list of rates; "
        "got rate=[Rate(n=10, per=1.0, burst=1), 'auto']"
    )
    with pytest.raises(ValueError, match=exactly(message)):
        as_rates([Rate(10), "auto"])


def test_a_list_of_rates_keeps_duplicates_and_refuses_a_zero_period() -> None:
    assert as_rates([Rate(10), Rate(10)]) == (Rate(10), Rate(10))
    with pytest.raises(ValueError, match=r"got per=0$"):
        as_rates([Rate(10), Rate(1, per=0)])


# -- a loop clock far from 0 -----------------------------------------------------------


@pytest.mark.parametrize("start", [1e9, 1.7e9])  # long uptime; a loop on the wall clock
def test_a_fast_rate_keeps_its_pace_on_a_clock_far_from_0(start: float) -> None:
    """1e6/s at 1e9 s: the float grid is 1.2e-7 s, but starts stay 1 us apart, not 0.95 us.

    Adding 1e-6 to a TAT of 1e9 adds 0.95e-6: 5% more starts than the rate.
    """

    async def main() -> list[float]:
        gate = RateGate(Rate(1_000_000))
        starts = []
        for _ in range(1001):
            await gate.wait()
            starts.append(_loop_time())
        return starts

    starts = run_from(start, main)
    grid = math.ulp(start)
    assert starts[-1] - starts[0] >= 1000 * 1e-6 - grid
    # Each start is seen at the first clock reading at or after its slot (at
    # most one step of the grid late) and the next slot counts from there.
    assert starts[-1] - starts[0] <= 1000 * (1e-6 + grid)


def test_a_rate_finer_than_the_clock_still_admits_one_start_per_instant() -> None:
    """1e8/s at 1e9 s: TAT + 1e-8 used to be TAT, and every start at one instant conformed."""

    async def main() -> int:
        gate = RateGate(Rate(100_000_000))
        admitted = 0
        while gate.wait_nowait() and admitted < 10:
            admitted += 1
        return admitted

    assert run_from(1e9, main) == 1


def test_a_burst_on_a_clock_far_from_0_is_the_burst_exactly() -> None:
    async def main() -> tuple[int, float]:
        gate = RateGate(Rate(1_000_000, burst=40))
        admitted = 0
        while gate.wait_nowait() and admitted < 100:
            admitted += 1
        start = _loop_time()
        await gate.wait()
        return admitted, _loop_time() - start

    admitted, waited = run_from(1e9, main)
    assert admitted == 40
    assert waited == pytest.approx(1e-6, abs=math.ulp(1e9))


async def arrive_and_wait(
    offsets: list[float],
    wait: Callable[[int], Coroutine[Any, Any, None]],
    interval: float,
    patience: int,
    asked: list[tuple[int, float]],
    started: list[tuple[int, float]],
) -> None:
    """Caller ``i`` arrives ``offsets[i]`` seconds from now and awaits ``wait(i)``.

    Each records in ``asked`` when it asked and in ``started`` when it was let
    through (seconds from now, with its number). Waits at most ``patience``
    intervals per caller for the last one, then cancels whoever is left: a gate
    that stalls fails the test, it does not hang it.
    """
    loop = asyncio.get_running_loop()
    origin = loop.time()

    async def caller(i: int) -> None:
        await asyncio.sleep(0)
        asked.append((i, loop.time() - origin))
        await wait(i)
        started.append((i, loop.time() - origin))

    tasks = []
    for i, offset in enumerate(offsets):
        if origin + offset > loop.time():
            await asyncio.sleep(origin + offset - loop.time())
        tasks.append(loop.create_task(caller(i)))
    for _ in range(patience * len(offsets)):
        if len(started) == len(offsets):
            break
        await asyncio.sleep(interval)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@settings(max_examples=120, deadline=None)
@given(
    start=st.sampled_from([0.0, 3e5, 1e9, 1.7e9]),
    n=st.sampled_from([0.5, 3.0, 20.0, 1e4, 2e5, 1e6]),
    burst=st.integers(1, 6),
    arrivals=st.lists(st.floats(0.0, 40.0), min_size=1, max_size=30),
)
@example(start=1e9, n=1e6, burst=1, arrivals=[0.0] * 30)  # a line: TAT + T, again and again
@example(start=1.7e9, n=2e5, burst=3, arrivals=[0.0] * 10 + [5.0] * 10 + [30.0] * 10)
def test_any_arrivals_on_any_clock_follow_the_ideal_schedule(
    start: float, n: float, burst: int, arrivals: list[float]
) -> None:
    """Arrivals at random times (in intervals), on clocks from 0 to 1.7e9 s, fast rates too.

    Starts come in arrival order, each at its GCRA slot (replayed over the
    starts before it), and no window of starts holds more than
    ``burst + window / interval``, but for the loop clock's own grid: a
    reading is off by up to a step of it, and a start seen a step late
    books the next slot from there (a late start, as GCRA has it).
    """
    rate = Rate(n, burst=burst)
    interval = rate.interval
    offsets = sorted(at * interval for at in arrivals)
    asked: list[tuple[int, float]] = []
    started: list[tuple[int, float]] = []

    async def main() -> None:
        gate = RateGate(rate)
        # The last start is due within 40 + 30 intervals.
        await arrive_and_wait(offsets, lambda i: gate.wait(), interval, 100, asked, started)

    run_from(start, main)
    assert [i for i, _ in started] == [i for i, _ in asked]
    # Two steps of the float grid, and the loop's resolution: it runs a timer
    # due within that much of now, and the gate then grants its slot.
    grid = 2 * math.ulp(start + 100 * interval) + _resolution(start)
    starts = [t for _, t in started]
    if start == 0.0:  # no grid to speak of: the ideal schedule
        assert starts == pytest.approx(_simulate([t for _, t in asked], rate), abs=grid)
    tat, previous = -math.inf, -math.inf
    for (_, arrival), at in zip(asked, starts, strict=True):
        due = max(arrival, previous, tat - rate.tolerance)
        assert due - grid <= at <= due + grid
        tat, previous = max(tat, at) + interval, at
    for i, first in enumerate(starts):
        for j in range(i + 1, len(starts)):
            assert j - i + 1 <= burst + (starts[j] - first + grid) / interval + 1e-9


# -- successive event loops ------------------------------------------------------------


def test_a_clamp_long_after_the_last_start_carries_over_only_what_it_asked() -> None:
    """Told to wait 30 s at 100 s, 100 s after the last start: the next loop waits 30 s, not 130."""
    gate = RateGate(Rate(1))

    async def first() -> None:
        await gate.wait()  # at 0
        await asyncio.sleep(100)
        assert gate.clamp("requests", 0.0, 30.0)  # a 429: nothing left for 30 s

    async def second() -> float:
        await gate.wait()
        return _loop_time()

    run(first, virtual_time=True)
    assert run(second, virtual_time=True) == pytest.approx(30.0)


def four_starts(gate: Any) -> Callable[[], Coroutine[Any, Any, list[float]]]:
    """A main() that waits for four starts of ``gate``: their times from its own start."""

    async def main() -> list[float]:
        origin = _loop_time()
        starts = []
        for _ in range(4):
            await gate.wait()
            starts.append(_loop_time() - origin)
        return starts

    return main


@pytest.mark.parametrize(("first", "second"), [(1e9, 0.0), (0.0, 1e9), (5e5, 1.7e9)])
def test_loops_with_unrelated_clocks_in_turn_carry_the_rate_over(
    first: float, second: float
) -> None:
    """A gate made at import time, used by one loop then another: no stale TAT, no extra burst."""
    gate = RateGate(Rate(2, burst=2))

    main = four_starts(gate)

    assert run_from(first, main) == pytest.approx([0.0, 0.0, 0.5, 1.0])
    # The last start (at 1.0) left TAT at 2.0, as if no time passed: the next
    # start is 0.5 s away (TAT - tolerance), as it was on the first loop.
    assert run_from(second, main) == pytest.approx([0.5, 1.0, 1.5, 2.0], abs=1e-6)
    assert gate.waiting == 0


def test_a_gate_far_from_0_says_fresh_only_once_nothing_is_owed() -> None:
    async def main() -> tuple[bool, bool, bool]:
        gate = RateGate(Rate(10))
        now = _loop_time()
        before = gate.fresh(now)
        assert gate.wait_nowait()
        owed = gate.fresh(_loop_time())
        await asyncio.sleep(0.1)
        return before, owed, gate.fresh(_loop_time())

    assert run_from(1e9, main) == (True, False, True)


# -- cancelled waiters and one instant -------------------------------------------------


def test_callers_cancelled_in_line_on_a_far_clock_give_their_slots_back_in_order() -> None:
    """Ten ask at one instant and every other one is cancelled: the rest start a slot apart."""

    async def main() -> list[tuple[int, float]]:
        gate = RateGate(Rate(1000))
        origin = _loop_time()
        assert gate.wait_nowait()
        started: list[tuple[int, float]] = []

        async def caller(i: int) -> None:
            await gate.wait()
            started.append((i, _loop_time() - origin))

        tasks = [asyncio.create_task(caller(i)) for i in range(10)]
        await asyncio.sleep(0)  # every one in line, at the same instant
        for task in tasks[::2]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return started

    started = run_from(1e9, main)
    assert [i for i, _ in started] == [1, 3, 5, 7, 9]
    assert [t for _, t in started] == pytest.approx([0.001 * k for k in range(1, 6)], abs=1e-6)


# -- the burst, exactly ----------------------------------------------------------------


@pytest.mark.parametrize("start", [0.0, 3.3, 1e4, 1e9])
def test_a_burst_at_one_instant_is_exactly_the_burst(start: float) -> None:
    """After an idle spell, ``burst`` starts at once: not one fewer for a rounded sum.

    TAT grows by one rounded T per start, the tolerance is ``(burst - 1) * T``
    rounded once: Rate(100, burst=7) used to let 6 through at once.
    """
    rates = [
        Rate(n, burst=burst)
        for n in (3, 6, 7, 50, 100, 1000, 12_345.6, 1e6)
        for burst in (1, 2, 3, 7, 11, 12, 100, 12_345)
    ]

    async def main() -> list[tuple[Rate, int]]:
        admitted = []
        for rate in rates:
            gate = RateGate(rate)
            count = 0
            while count <= rate.burst and gate.wait_nowait():
                count += 1
            admitted.append((rate, count))
        return admitted

    assert [(rate, count) for rate, count in run_from(start, main) if count != rate.burst] == []


@pytest.mark.virtual_time
async def test_a_limiter_takes_its_whole_burst_without_waiting() -> None:
    limiter = corral.Limiter(rate=Rate(100, burst=7))
    taken = 0
    while taken <= 7 and limiter.acquire_nowait():
        taken += 1
    assert taken == 7
    for _ in range(taken):
        limiter.release()
