"""Rates (GCRA), the rate gate and the shared Limiter."""

from __future__ import annotations

import asyncio
import gc
import itertools
import math
import random
import re
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import corral
import corral._limits
from _loops import LOOP_KINDS, VirtualClockLoop, run
from corral._adaptive import DROP_BACKOFF, MIN_SAMPLES, Adaptive
from corral._limits import RAMP_FRACTION, RAMP_MAX, RAMP_STEPS, Limiter, outcome_of
from corral._rate import Rate, RateGate, as_rate, gcra_delay, gcra_next_tat


def exactly(message: str) -> str:
    """A ``match=`` pattern for this whole message and nothing else."""
    return f"^{re.escape(message)}$"


def virtual_loop() -> VirtualClockLoop:
    """The running loop of a ``virtual_time`` test, typed so it can be advanced."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualClockLoop)
    return loop


class Spy:
    """Stand-in call that records the most calls ever in flight."""

    def __init__(self) -> None:
        self.running = self.peak = self.calls = 0

    async def __call__(self) -> None:
        self.running += 1
        self.calls += 1
        self.peak = max(self.peak, self.running)
        for _ in range(3):
            await asyncio.sleep(0)  # yield so other callers overlap with this one
        self.running -= 1


# -- Rate ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n", "per"),
    [
        ("20/s", 20, 1.0),
        ("20/sec", 20, 1.0),
        ("20/second", 20, 1.0),
        ("20/seconds", 20, 1.0),
        ("600/min", 600, 60.0),
        ("600/m", 600, 60.0),
        ("600/minute", 600, 60.0),
        ("3600/h", 3600, 3600.0),
        ("3600/hour", 3600, 3600.0),
        ("1000/d", 1000, 86400.0),
        ("5/100ms", 5, 0.1),
        ("2.5/s", 2.5, 1.0),
        (".5/s", 0.5, 1.0),
        ("1e3/min", 1000, 60.0),
        ("20/2s", 20, 2.0),
        ("20 / s", 20, 1.0),
        (" 20/S ", 20, 1.0),
        ("20", 20, 1.0),
        ("2.5", 2.5, 1.0),
    ],
)
def test_rate_parse_reads_the_short_forms(text: str, n: float, per: float) -> None:
    """Each documented text form means n starts per `per` seconds, burst 1."""
    rate = Rate.parse(text)
    assert rate.n == n
    assert rate.per == pytest.approx(per)
    assert rate.burst == 1


@pytest.mark.parametrize(
    "text", ["fast", "", "20/", "/s", "20/fortnight", "20 s", "20/s/s", "nan", "inf/s", "20/-1s"]
)
def test_rate_parse_rejects_text_that_is_not_a_rate(text: str) -> None:
    """Text of the wrong shape fails with the forms to use and the value given."""
    message = f"rate must look like '20/s', '600/min' or '5/100ms'; got rate={text!r}"
    with pytest.raises(ValueError, match=exactly(message)):
        Rate.parse(text)


@pytest.mark.parametrize("text", ["0/s", "-5/s", "0", "20/0ms", "1e400/s", "1/1e400s"])
def test_rate_parse_rejects_rates_that_are_not_positive(text: str) -> None:
    """A zero, negative or infinite number in the text fails with the 'finite number > 0'
    message."""
    message = (
        "rate must be a finite number > 0, like 20, '20/s' or corral.Rate(20, per=1.0); "
        f"got rate={text!r}"
    )
    with pytest.raises(ValueError, match=exactly(message)):
        Rate.parse(text)


def test_rate_parse_rejects_a_non_string() -> None:
    """Rate.parse() is for text; a number passed to it says so."""
    message = "rate must look like '20/s', '600/min' or '5/100ms'; got rate=20"
    with pytest.raises(TypeError, match=exactly(message)):
        Rate.parse(20)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"n": 0},
            ValueError,
            "Rate n must be a finite number > 0, like Rate(20, per=1.0); got n=0",
        ),
        (
            {"n": -1},
            ValueError,
            "Rate n must be a finite number > 0, like Rate(20, per=1.0); got n=-1",
        ),
        (
            {"n": math.nan},
            ValueError,
            "Rate n must be a finite number > 0, like Rate(20, per=1.0); got n=nan",
        ),
        (
            {"n": math.inf},
            ValueError,
            "Rate n must be a finite number > 0, like Rate(20, per=1.0); got n=inf",
        ),
        (
            {"n": True},
            TypeError,
            "Rate n must be a finite number > 0, like Rate(20, per=1.0); got n=True",
        ),
        (
            {"n": "20"},
            TypeError,
            "Rate n must be a finite number > 0, like Rate(20, per=1.0); got n='20'",
        ),
        (
            {"n": 20, "per": 0},
            ValueError,
            "Rate per must be a finite number of seconds > 0, like Rate(20, per=1.0); got per=0",
        ),
        (
            {"n": 20, "per": -1.5},
            ValueError,
            "Rate per must be a finite number of seconds > 0, like Rate(20, per=1.0); got per=-1.5",
        ),
        (
            {"n": 20, "per": math.inf},
            ValueError,
            "Rate per must be a finite number of seconds > 0, like Rate(20, per=1.0); got per=inf",
        ),
        (
            {"n": 20, "per": None},
            TypeError,
            "Rate per must be a finite number of seconds > 0, like Rate(20, per=1.0); got per=None",
        ),
        (
            {"n": 20, "burst": 0},
            ValueError,
            "Rate burst must be an int >= 1, the starts allowed back to back, "
            "like Rate(20, per=1.0, burst=5); got burst=0",
        ),
        (
            {"n": 20, "burst": -3},
            ValueError,
            "Rate burst must be an int >= 1, the starts allowed back to back, "
            "like Rate(20, per=1.0, burst=5); got burst=-3",
        ),
        (
            {"n": 20, "burst": 2.0},
            TypeError,
            "Rate burst must be an int >= 1, the starts allowed back to back, "
            "like Rate(20, per=1.0, burst=5); got burst=2.0",
        ),
        (
            {"n": 20, "burst": True},
            TypeError,
            "Rate burst must be an int >= 1, the starts allowed back to back, "
            "like Rate(20, per=1.0, burst=5); got burst=True",
        ),
    ],
)
def test_rate_rejects_bad_fields_naming_the_field_and_value(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Every field is checked when the Rate is built; the message names it and its value."""
    with pytest.raises(error, match=exactly(message)):
        Rate(**kwargs)


def test_rate_interval_and_tolerance() -> None:
    """T = per / n between evenly spaced starts; tau = (burst - 1) * T of allowed lead."""
    assert Rate(20).interval == pytest.approx(0.05)
    assert Rate(20).tolerance == 0.0
    assert Rate(600, per=60).interval == pytest.approx(0.1)
    assert Rate(2, per=1, burst=3).tolerance == pytest.approx(1.0)


def test_rate_accepts_any_real_number_and_is_a_frozen_value() -> None:
    """Fractions work as numbers; a Rate is immutable and compares by value."""
    third = Rate(Fraction(1, 3))  # type: ignore[arg-type]
    assert third.interval == pytest.approx(3.0)
    assert Rate(20, per=1.0, burst=2) == Rate(20.0, per=1, burst=2)
    assert len({Rate(20), Rate(20.0)}) == 1
    with pytest.raises(AttributeError):
        Rate(20).n = 5  # type: ignore[misc]


# -- as_rate --------------------------------------------------------------------


def test_as_rate_normalises_the_accepted_forms() -> None:
    """None stays None, a Rate is kept, a number is per second, a string is parsed."""
    rate = Rate(5, per=2, burst=3)
    assert as_rate(None) is None
    assert as_rate(rate) is rate
    assert as_rate(20) == Rate(20.0, per=1.0)
    assert as_rate(2.5) == Rate(2.5, per=1.0)
    assert as_rate("600/min") == Rate(600.0, per=60.0)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (True, TypeError),
        ([20], TypeError),
        (b"20/s", TypeError),
    ],
)
def test_as_rate_rejects_other_values_naming_the_value(
    value: object, error: type[Exception]
) -> None:
    """Zero, negatives, NaN, infinity, bools and other types fail with the forms to use."""
    message = (
        "rate must be a finite number > 0, like 20, '20/s' or corral.Rate(20, per=1.0); "
        f"got rate={value!r}"
    )
    with pytest.raises(error, match=exactly(message)):
        as_rate(value)


def test_as_rate_passes_string_errors_through() -> None:
    """A string that is not a rate fails with Rate.parse()'s message."""
    message = "rate must look like '20/s', '600/min' or '5/100ms'; got rate='fast'"
    with pytest.raises(ValueError, match=exactly(message)):
        as_rate("fast")


# -- GCRA math --------------------------------------------------------------------


def test_gcra_first_start_conforms_at_once() -> None:
    """With no start yet (TAT = -inf) a start conforms at any time."""
    assert gcra_delay(-math.inf, 0.0, Rate(2)) == 0.0
    assert gcra_next_tat(-math.inf, 3.0, Rate(2)) == 3.5


def test_gcra_delay_counts_down_to_the_next_slot() -> None:
    """Burst 1: the next start conforms at TAT exactly, and never needs a negative wait."""
    rate = Rate(2, per=1.0)  # T = 0.5, tau = 0
    assert gcra_delay(1.0, 0.25, rate) == pytest.approx(0.75)
    assert gcra_delay(1.0, 1.0, rate) == 0.0
    assert gcra_delay(1.0, 5.0, rate) == 0.0


def test_gcra_burst_lets_starts_lead_by_the_tolerance() -> None:
    """Burst 3 with T = 0.5: a start may come up to tau = 1.0 s before TAT."""
    rate = Rate(2, per=1.0, burst=3)
    assert gcra_delay(1.0, 0.0, rate) == 0.0
    assert gcra_delay(1.5, 0.0, rate) == pytest.approx(0.5)


def test_gcra_next_tat_books_the_next_slot_and_banks_no_idle_time() -> None:
    """After a start TAT moves one interval past max(TAT, now)."""
    rate = Rate(2, per=1.0)
    assert gcra_next_tat(1.0, 0.25, rate) == 1.5
    assert gcra_next_tat(1.0, 3.0, rate) == 3.5


def test_gcra_admits_exactly_the_burst_at_one_instant() -> None:
    """Driven at a single instant, the math admits `burst` starts and then no more."""
    rate = Rate(10, per=1.0, burst=4)
    tat, admitted = -math.inf, 0
    while gcra_delay(tat, 7.0, rate) == 0.0:
        tat = gcra_next_tat(tat, 7.0, rate)
        admitted += 1
    assert admitted == 4
    assert gcra_delay(tat, 7.0, rate) == pytest.approx(0.1)


# -- RateGate -----------------------------------------------------------------------


def test_rate_gate_needs_a_rate_and_says_what_it_holds() -> None:
    """A gate is built from a Rate (outside any loop); its repr shows rate and line."""
    with pytest.raises(TypeError, match=exactly("RateGate needs a corral.Rate; got rate='20/s'")):
        RateGate("20/s")  # type: ignore[arg-type]
    gate = RateGate(Rate(2))
    assert gate.rate == Rate(2)
    assert repr(gate) == "<corral.RateGate rate=Rate(n=2, per=1.0, burst=1) waiting=0>"


@pytest.mark.virtual_time  # a real clock can free the next slot between the checks
async def test_rate_gate_fast_path_does_not_suspend() -> None:
    """A free slot with nobody waiting is taken without giving up control to the loop."""
    gate = RateGate(Rate(1000, burst=2))
    coro = gate.wait()
    with pytest.raises(StopIteration):
        coro.send(None)  # finishes on the first step: it never suspended
    assert gate.wait_nowait()
    assert not gate.wait_nowait()  # the burst of 2 is used up


@pytest.mark.virtual_time
async def test_rate_gate_spaces_starts_exactly() -> None:
    """Rate(2, per=1, burst=1): starts at 0, 0.5, 1.0, ... and not a moment earlier."""
    loop = asyncio.get_running_loop()
    gate = RateGate(Rate(2, per=1.0, burst=1))
    starts = []
    for _ in range(5):
        await gate.wait()
        starts.append(loop.time())
    assert starts == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])


@pytest.mark.virtual_time
async def test_rate_gate_allows_the_burst_then_spaces_starts() -> None:
    """Rate(2, per=1, burst=3): three start at once, then one every 0.5 s."""
    loop = asyncio.get_running_loop()
    gate = RateGate(Rate(2, per=1.0, burst=3))
    starts: list[float] = []

    async def start() -> None:
        await gate.wait()
        starts.append(loop.time())

    async with asyncio.TaskGroup() as tg:
        for _ in range(7):
            tg.create_task(start())
    assert starts == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0])


@pytest.mark.virtual_time
async def test_rate_gate_serves_waiters_first_come_first_served() -> None:
    """Many concurrent waiters start in the order they asked."""
    gate = RateGate(Rate(10, burst=5))
    order: list[int] = []

    async def start(i: int) -> None:
        for _ in range(i % 3):
            await asyncio.sleep(0)  # stagger arrivals so waiters ask in a mixed order
        order.append(i)
        await gate.wait()
        order.append(-i - 1)

    async with asyncio.TaskGroup() as tg:
        for i in range(60):
            tg.create_task(start(i))
    asked = [i for i in order if i >= 0]
    started = [-i - 1 for i in order if i < 0]
    assert started == asked
    assert gate.waiting == 0


@pytest.mark.virtual_time
async def test_rate_gate_cancelled_head_gives_its_slot_to_the_next() -> None:
    """The first in line is cancelled: the second starts at the slot the first would have had."""
    loop = virtual_loop()
    gate = RateGate(Rate(1))
    await gate.wait()  # at 0; the next slot is at 1.0
    starts: dict[str, float] = {}

    async def start(name: str) -> None:
        await gate.wait()
        starts[name] = loop.time()

    tasks = {name: asyncio.create_task(start(name)) for name in "bcd"}
    await asyncio.sleep(0)  # let b, c and d line up
    assert gate.waiting == 3
    loop.call_at(0.5, tasks["b"].cancel)
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert tasks["b"].cancelled()
    assert starts == {"c": pytest.approx(1.0), "d": pytest.approx(2.0)}


@pytest.mark.virtual_time
async def test_rate_gate_cancelled_middle_waiter_lets_later_ones_move_up() -> None:
    """A waiter cancelled mid-line spends nothing: the ones behind it start one slot earlier."""
    loop = virtual_loop()
    gate = RateGate(Rate(1))
    await gate.wait()  # at 0; the next slot is at 1.0
    starts: dict[str, float] = {}

    async def start(name: str) -> None:
        await gate.wait()
        starts[name] = loop.time()

    tasks = {name: asyncio.create_task(start(name)) for name in "bcde"}
    await asyncio.sleep(0)  # let b, c, d and e line up
    loop.call_at(0.5, tasks["c"].cancel)
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert starts == {"b": pytest.approx(1.0), "d": pytest.approx(2.0), "e": pytest.approx(3.0)}


@pytest.mark.virtual_time
async def test_rate_gate_everyone_leaving_the_line_spends_nothing() -> None:
    """All waiters cancelled: the gate's timer is dropped and a later caller starts at once."""
    loop = virtual_loop()
    gate = RateGate(Rate(1))
    await gate.wait()  # at 0; the next slot is at 1.0
    tasks = [asyncio.create_task(gate.wait()) for _ in range(3)]
    await asyncio.sleep(0)  # let the three line up
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert gate.waiting == 0
    await asyncio.sleep(10)
    await gate.wait()
    assert loop.time() == pytest.approx(10.0)


@pytest.mark.virtual_time
async def test_rate_gate_waiter_cancelled_as_its_slot_comes_up_spends_nothing() -> None:
    """Cancelled in the very loop iteration its slot is due: the slot goes to the next caller."""
    loop = virtual_loop()
    gate = RateGate(Rate(1))
    await gate.wait()  # at 0; the next slot is at 1.0
    b = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)  # let b line up
    # 1e-12 s is below the virtual clock's resolution: this runs in the same
    # iteration as the gate's 1.0 s timer, just before it, so the timer finds
    # b's future cancelled before b itself has left the line.
    loop.call_at(1.0 - 1e-12, b.cancel)
    with pytest.raises(asyncio.CancelledError):
        await b
    await gate.wait()
    assert loop.time() == pytest.approx(1.0)
    assert gate.waiting == 0


@pytest.mark.virtual_time
async def test_rate_gate_gives_back_a_slot_granted_to_a_caller_cancelled_before_it_ran() -> None:
    """Granted its slot but cancelled before resuming: the next in line gets that very slot."""
    loop = virtual_loop()
    gate = RateGate(Rate(1))
    await gate.wait()  # at 0; the next slot is at 1.0
    starts: dict[str, float] = {}

    async def start(name: str) -> None:
        await gate.wait()
        starts[name] = loop.time()

    b = asyncio.create_task(start("b"))
    c = asyncio.create_task(start("c"))
    await asyncio.sleep(0)  # let b and c line up
    # 1e-12 s is below the virtual clock's resolution: this runs in the same
    # iteration as the gate's 1.0 s timer, right after it granted b's slot and
    # before b resumes.
    loop.call_at(1.0 + 1e-12, b.cancel)
    await asyncio.gather(b, c, return_exceptions=True)
    assert b.cancelled()
    assert starts == {"c": pytest.approx(1.0)}


@pytest.mark.parametrize(
    ("cancelled", "next_start"),
    [
        ("b", 5.0),  # the latest grant: given back, so a newcomer starts at once
        ("a", 6.0),  # b was granted after it: a's slot stays spent (never one too many)
    ],
)
@pytest.mark.virtual_time
async def test_rate_gate_gives_back_only_the_latest_grant(
    cancelled: str, next_start: float
) -> None:
    """A cancelled grantee's slot is given back only if no later start was granted on top of it."""
    loop = virtual_loop()
    gate = RateGate(Rate(1, per=1.0, burst=2))
    assert gate.wait_nowait()
    assert gate.wait_nowait()  # the burst at 0: the next slot is at 1.0
    tasks = {name: asyncio.create_task(gate.wait()) for name in "ab"}
    await asyncio.sleep(0)  # let a and b line up
    loop.call_at(0.5, loop.advance, 4.5)  # a blocking call holds the loop from 0.5 s to 5 s
    # Runs right after the (late) 1.0 s timer granted both a and b, before they resume.
    loop.call_at(1.0 + 1e-12, tasks[cancelled].cancel)
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert tasks[cancelled].cancelled()
    await gate.wait()
    assert loop.time() == pytest.approx(next_start)


@pytest.mark.virtual_time
async def test_rate_gate_late_timer_catches_up_within_the_burst_in_order() -> None:
    """A timer delayed by a blocked loop grants what the burst allows, still in arrival order."""
    loop = virtual_loop()
    gate = RateGate(Rate(1, per=1.0, burst=4))
    for _ in range(4):
        assert gate.wait_nowait()  # the whole burst at 0: the next slot is at 1.0
    log: list[tuple[str, float]] = []

    async def start(name: str, again: bool) -> None:
        await gate.wait()
        log.append((name, loop.time()))
        if again:
            # b was granted in the same instant and has not resumed yet: a
            # newcomer (this task again) must not slip in ahead of it.
            assert not gate.wait_nowait()
            await gate.wait()
            log.append((name + " again", loop.time()))

    loop.call_at(0.5, loop.advance, 4.5)  # a blocking call holds the loop from 0.5 s to 5 s
    async with asyncio.TaskGroup() as tg:
        tg.create_task(start("a", again=True))
        tg.create_task(start("b", again=False))
    assert log == [("a", 5.0), ("b", 5.0), ("a again", 5.0)]


class EarlyTimerLoop(VirtualClockLoop):
    """Runs timers up to 1 ms early, as loops with a coarse clock do, and counts timers set.

    asyncio runs every timer due within its clock resolution (about 15 ms on
    Windows); uvloop rounds delays to whole milliseconds.
    """

    def __init__(self) -> None:
        super().__init__()
        self._clock_resolution = 0.001
        self.timers_set = 0

    def call_at(  # type: ignore[override]
        self, when: float, callback: Any, *args: Any, context: Any = None
    ) -> Any:
        self.timers_set += 1
        return super().call_at(when, callback, *args, context=context)


def test_rate_gate_grants_on_an_early_timer_without_spinning() -> None:
    """A timer run a little early still grants its slot: one timer per slot, no re-arming."""

    async def main() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, EarlyTimerLoop)
        gate = RateGate(Rate(1))
        await gate.wait()  # at 0: the next slot is at 1.0
        waiter = asyncio.create_task(gate.wait())
        await asyncio.sleep(0)  # let it line up: the gate sets its timer for 1.0
        # Wakes the loop at 0.9995; the gate's 1.0 timer is then within the
        # clock resolution and runs in the same iteration, 0.5 ms early.
        loop.call_at(0.9995, lambda: None)
        await waiter
        return loop.time(), loop.timers_set

    with asyncio.Runner(loop_factory=EarlyTimerLoop) as runner:
        started, timers_set = runner.run(main())
    assert started == pytest.approx(1.0, abs=0.001)
    assert timers_set == 2  # the gate's one timer and the wake-up above


def _simulate(arrivals: list[float], rate: Rate) -> list[float]:
    """The ideal FIFO GCRA schedule for callers arriving at these times, in this order."""
    tat, previous, starts = -math.inf, -math.inf, []
    for arrival in arrivals:
        now = max(arrival, previous)
        now += gcra_delay(tat, now, rate)
        tat = gcra_next_tat(tat, now, rate)
        starts.append(now)
        previous = now
    return starts


def _assert_within_rate(starts: list[float], rate: Rate) -> None:
    """Every window [s_i, s_j] holds at most burst + (s_j - s_i) / T starts."""
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            count = j - i + 1
            assert count <= rate.burst + (starts[j] - first) / rate.interval + 1e-9


_rates = st.builds(
    Rate,
    n=st.floats(0.5, 20.0),
    per=st.sampled_from([0.1, 1.0, 2.5]),
    burst=st.integers(1, 5),
)
_times = st.floats(0.0, 5.0, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(rate=_rates, arrivals=st.lists(_times, min_size=1, max_size=25))
def test_rate_gate_follows_the_ideal_schedule_for_any_arrivals(
    rate: Rate, arrivals: list[float]
) -> None:
    """For any arrivals: FIFO, every window within the rate, each start exactly at its GCRA slot."""
    asked: list[tuple[int, float]] = []
    started: list[tuple[int, float]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate = RateGate(rate)

        async def caller(i: int, at: float) -> None:
            await asyncio.sleep(at)
            asked.append((i, loop.time()))
            await gate.wait()
            started.append((i, loop.time()))

        async with asyncio.TaskGroup() as tg:
            for i, at in enumerate(arrivals):
                tg.create_task(caller(i, at))
        assert gate.waiting == 0

    run(main, virtual_time=True)
    assert [i for i, _ in started] == [i for i, _ in asked]
    starts = [t for _, t in started]
    _assert_within_rate(starts, rate)
    assert starts == pytest.approx(_simulate([t for _, t in asked], rate), abs=1e-6)


@settings(max_examples=150, deadline=None)
@given(
    rate=_rates,
    callers=st.lists(st.tuples(_times, st.none() | st.floats(0.0, 8.0)), min_size=1, max_size=25),
)
def test_rate_gate_holds_the_rate_and_order_when_waiters_are_cancelled(
    rate: Rate, callers: list[tuple[float, float | None]]
) -> None:
    """Cancelling waiters at any time never lets starts exceed the rate or jump the line."""
    asked: list[int] = []
    started: list[tuple[int, float]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate = RateGate(rate)

        async def caller(i: int, at: float) -> None:
            await asyncio.sleep(at)
            asked.append(i)
            await gate.wait()
            started.append((i, loop.time()))

        async with asyncio.TaskGroup() as tg:
            for i, (at, cancel_at) in enumerate(callers):
                task = tg.create_task(caller(i, at))
                if cancel_at is not None:
                    loop.call_at(cancel_at, task.cancel)
        assert gate.waiting == 0

    run(main, virtual_time=True)
    done = {i for i, _ in started}
    assert [i for i, _ in started] == [i for i in asked if i in done]
    _assert_within_rate([t for _, t in started], rate)


# -- Limiter: arguments -------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (True, TypeError),
        (1.5, TypeError),
        (10.0, TypeError),
        ("10", TypeError),
        ("Auto", TypeError),
    ],
)
def test_limiter_rejects_a_bad_limit_naming_it(limit: object, error: type[Exception]) -> None:
    """The cap is an int >= 1, 'auto' or an Adaptive; anything else fails with its value."""
    message = (
        "limit must be an int >= 1, 'auto', a corral.Adaptive or None, like "
        f"corral.Limiter(limit=10); got limit={limit!r}"
    )
    with pytest.raises(error, match=exactly(message)):
        Limiter(limit)  # type: ignore[arg-type]


def test_limiter_needs_a_limit_or_a_rate() -> None:
    """A Limiter with neither a cap nor a rate would limit nothing: that is an error."""
    message = (
        "corral.Limiter() needs limit=, rate= or both, like "
        "corral.Limiter(limit=10) or corral.Limiter(rate='20/s')"
    )
    with pytest.raises(TypeError, match=exactly(message)):
        Limiter()
    with pytest.raises(TypeError, match=exactly(message)):
        Limiter(None, rate=None)


def test_limiter_checks_its_rate_like_map_does() -> None:
    """rate= accepts the same forms as everywhere else and fails with the same messages."""
    assert Limiter(rate="600/min").rate == Rate(600.0, per=60.0)
    assert Limiter(rate=20).rate == Rate(20.0)
    message = (
        "rate must be a finite number > 0, like 20, '20/s' or corral.Rate(20, per=1.0); got rate=0"
    )
    with pytest.raises(ValueError, match=exactly(message)):
        Limiter(3, rate=0)
    message = "rate must look like '20/s', '600/min' or '5/100ms'; got rate='fast'"
    with pytest.raises(ValueError, match=exactly(message)):
        Limiter(3, rate="fast")


async def test_limiter_reports_limit_rate_in_flight_and_waiting() -> None:
    """Properties and repr show the cap, the rate, slots taken and callers waiting."""
    limiter = Limiter(1, rate=Rate(1000, burst=10))
    assert (limiter.limit, limiter.rate) == (1, Rate(1000, burst=10))
    assert repr(limiter) == (
        "<corral.Limiter limit=1 rate=Rate(n=1000, per=1.0, burst=10) in_flight=0 waiting=0>"
    )
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)  # let the waiter line up
    assert (limiter.in_flight, limiter.waiting) == (1, 1)
    assert repr(limiter).endswith("in_flight=1 waiting=1>")
    limiter.release()
    await waiter
    limiter.release()
    assert repr(Limiter(5)) == "<corral.Limiter limit=5 rate=None in_flight=0 waiting=0>"
    assert Limiter(rate="2/s").limit is None


# -- Limiter: the cap -------------------------------------------------------------


async def test_limiter_cap_is_reached_and_never_exceeded_across_maps() -> None:
    """Eleven workers in two 'maps' share a cap of 7: at most 7 calls ever run at once."""
    limiter = Limiter(7)
    spy = Spy()

    async def one_map(workers: int, calls: int) -> None:
        async def worker() -> None:
            for _ in range(calls):
                async with limiter:
                    await spy()

        async with asyncio.TaskGroup() as tg:
            for _ in range(workers):
                tg.create_task(worker())

    async with asyncio.timeout(10):  # hang guard, not the assertion
        async with asyncio.TaskGroup() as tg:
            tg.create_task(one_map(5, 20))
            tg.create_task(one_map(6, 20))
    assert spy.peak == 7
    assert spy.calls == 220
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


async def test_limiter_serves_waiters_in_arrival_order() -> None:
    """Callers that queue for a slot get it first come, first served."""
    limiter = Limiter(1)
    await limiter.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        async with limiter:
            order.append(i)
            await asyncio.sleep(0)  # hold the slot across a yield so others stay queued

    tasks = [asyncio.create_task(take(i)) for i in range(20)]
    await asyncio.sleep(0)  # let every task line up
    assert limiter.waiting == 20
    limiter.release()
    await asyncio.gather(*tasks)
    assert order == list(range(20))
    assert limiter.in_flight == 0


async def test_limiter_newcomer_never_barges_ahead_of_a_waiter() -> None:
    """A slot released to a waiter is its own, even before it resumes; newcomers queue behind."""
    limiter = Limiter(1)
    await limiter.acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        async with limiter:
            order.append(name)

    first = asyncio.create_task(take("queued first"))
    await asyncio.sleep(0)  # let it line up
    limiter.release()  # hands the slot to `first`, which has not run yet
    assert limiter.in_flight == 1
    assert not limiter.acquire_nowait()
    late = asyncio.create_task(take("arrived later"))
    await asyncio.gather(first, late)
    assert order == ["queued first", "arrived later"]
    assert limiter.in_flight == 0


async def test_limiter_acquire_nowait_takes_only_a_free_slot() -> None:
    """acquire_nowait() takes a free slot, and refuses when the cap is reached."""
    limiter = Limiter(2)
    assert limiter.acquire_nowait()
    assert limiter.acquire_nowait()
    assert not limiter.acquire_nowait()
    assert limiter.in_flight == 2
    limiter.release()
    limiter.release()
    assert limiter.in_flight == 0


async def test_limiter_async_with_releases_on_error() -> None:
    """`async with limiter:` holds a slot for the body and gives it back even on an exception."""
    limiter = Limiter(2)
    async with limiter:
        assert limiter.in_flight == 1
    with pytest.raises(KeyError):
        async with limiter:
            raise KeyError("boom")
    assert limiter.in_flight == 0


async def test_limiter_release_without_acquire_is_an_error() -> None:
    """Releasing more slots than were acquired fails instead of raising the cap."""
    limiter = Limiter(2)
    message = (
        "Limiter.release() called with nothing acquired: every release() must "
        "match one acquire() (or use `async with limiter:`)"
    )
    with pytest.raises(RuntimeError, match=exactly(message)):
        limiter.release()
    async with limiter:
        pass
    with pytest.raises(RuntimeError, match=exactly(message)):
        limiter.release()
    assert limiter.in_flight == 0


# -- Limiter: cancellation ------------------------------------------------------------


async def test_limiter_waiter_cancelled_in_line_gives_back_its_place() -> None:
    """A queued caller cancelled leaves the line; the ones behind it move up."""
    limiter = Limiter(1)
    await limiter.acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        async with limiter:
            order.append(name)

    tasks = {name: asyncio.create_task(take(name)) for name in ("w1", "w2", "w3")}
    await asyncio.sleep(0)  # let the three line up
    tasks["w2"].cancel()
    await asyncio.sleep(0)  # let w2 leave the line
    assert limiter.waiting == 2
    limiter.release()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert order == ["w1", "w3"]
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


@pytest.mark.virtual_time
async def test_limiter_waiter_that_times_out_leaves_nothing_behind() -> None:
    """A caller giving up on a full Limiter (asyncio.timeout) leaves the line empty."""
    limiter = Limiter(1)
    await limiter.acquire()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1):
            await limiter.acquire()
    assert (limiter.in_flight, limiter.waiting) == (1, 0)
    limiter.release()
    assert limiter.in_flight == 0
    assert limiter.acquire_nowait()
    limiter.release()


async def test_limiter_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    """Cancelled after release() handed it the slot but before it ran: the slot goes to the next."""
    limiter = Limiter(1)
    await limiter.acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        async with limiter:
            order.append(name)

    w1 = asyncio.create_task(take("w1"))
    w2 = asyncio.create_task(take("w2"))
    await asyncio.sleep(0)  # let both line up
    limiter.release()  # hands the slot to w1 ...
    w1.cancel()  # ... which is cancelled before it gets to run
    with pytest.raises(asyncio.CancelledError):
        await w1
    await w2
    assert order == ["w2"]
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


async def test_limiter_slot_freed_past_a_cancelled_waiter_goes_to_the_first_newcomer() -> None:
    """A release that skips a just-cancelled waiter still serves the next callers in order."""
    limiter = Limiter(1)
    await limiter.acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        async with limiter:
            order.append(name)
            await asyncio.sleep(0)  # hold the slot across a yield so the other stays queued

    w1 = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)  # let w1 line up
    # Both newcomers run before w1's cancellation is processed: they find w1
    # still counted in line, with the slot about to be free.
    first = asyncio.create_task(take("first"))
    second = asyncio.create_task(take("second"))
    w1.cancel()
    limiter.release()  # w1's future is cancelled: nobody to hand the slot to, it is freed
    await asyncio.gather(first, second)
    with pytest.raises(asyncio.CancelledError):
        await w1
    assert order == ["first", "second"]
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


@pytest.mark.virtual_time
async def test_limiter_caller_cancelled_waiting_for_the_rate_frees_its_slot() -> None:
    """Cancelled while holding a slot and waiting for the rate: slot and rate slot both go back."""
    loop = virtual_loop()
    limiter = Limiter(2, rate=Rate(1))
    await limiter.acquire()  # at 0: a slot and the rate at once; the next rate slot is at 1.0
    b = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)  # b takes the second slot and lines up for the rate
    assert (limiter.in_flight, limiter.waiting) == (2, 1)
    loop.call_at(0.5, b.cancel)
    with pytest.raises(asyncio.CancelledError):
        await b
    assert (limiter.in_flight, limiter.waiting) == (1, 0)
    await limiter.acquire()
    assert loop.time() == pytest.approx(1.0)  # b's rate slot was not spent
    limiter.release()
    limiter.release()
    assert limiter.in_flight == 0


# -- Limiter: rate ----------------------------------------------------------------------


@pytest.mark.virtual_time
async def test_limiter_with_limit_and_rate_keeps_both() -> None:
    """Cap 2 and 4 starts/s, calls of 1 s: starts are spaced by the rate and wait for the cap."""
    loop = asyncio.get_running_loop()
    limiter = Limiter(2, rate=Rate(4))
    starts: list[float] = []
    running = peak = 0

    async def call() -> None:
        nonlocal running, peak
        async with limiter:
            starts.append(loop.time())
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(1)
            running -= 1

    async with asyncio.TaskGroup() as tg:
        for _ in range(6):
            tg.create_task(call())
    assert starts == pytest.approx([0.0, 0.25, 1.0, 1.25, 2.0, 2.25])
    assert peak == 2


@pytest.mark.virtual_time
async def test_limiter_with_only_a_rate_caps_starts_not_calls() -> None:
    """Limiter(rate='2/s'): starts every 0.5 s, and every started call may still be running."""
    loop = asyncio.get_running_loop()
    limiter = Limiter(rate="2/s")
    starts: list[float] = []

    async def call() -> None:
        async with limiter:
            starts.append(loop.time())
            await asyncio.sleep(10)

    async with asyncio.TaskGroup() as tg:
        for _ in range(3):
            tg.create_task(call())
        await asyncio.sleep(5)
        assert limiter.in_flight == 3
    assert starts == pytest.approx([0.0, 0.5, 1.0])


@pytest.mark.virtual_time
async def test_limiter_acquire_nowait_respects_the_rate() -> None:
    """With a rate, acquire_nowait() also refuses when the next start is not due yet."""
    limiter = Limiter(1, rate=Rate(1))
    assert limiter.acquire_nowait()
    limiter.release()
    assert not limiter.acquire_nowait()  # slot free, but the next start is due at 1.0
    assert limiter.in_flight == 0
    await asyncio.sleep(1)
    assert limiter.acquire_nowait()
    limiter.release()


# -- Limiter: event loops ------------------------------------------------------------------

# Created at import time, outside any event loop, as users do.
_IMPORT_TIME_LIMITER = Limiter(2)
_IMPORT_TIME_RATED = Limiter(1, rate=Rate(2))


def test_limiter_made_at_import_time_serves_successive_loops() -> None:
    """One module-level Limiter works in one asyncio.run after another, on every loop kind."""

    async def main() -> int:
        spy = Spy()

        async def call() -> None:
            async with _IMPORT_TIME_LIMITER:
                await spy()

        async with asyncio.TaskGroup() as tg:
            for _ in range(6):
                tg.create_task(call())
        return spy.peak

    for kind in LOOP_KINDS:
        assert run(main, kind) == 2
        assert run(main, kind) == 2
    assert (_IMPORT_TIME_LIMITER.in_flight, _IMPORT_TIME_LIMITER.waiting) == (0, 0)


def test_limiter_rate_carries_over_to_the_next_loop() -> None:
    """A new loop's clock restarts, yet the rate holds: the debt of the last starts carries over."""

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        starts = []
        for _ in range(3):
            async with _IMPORT_TIME_RATED:
                starts.append(loop.time())
        return starts

    assert run(main, virtual_time=True) == pytest.approx([0.0, 0.5, 1.0])
    # The next loop's clock starts at 0 again; the start at 1.0 still owed 0.5 s.
    assert run(main, virtual_time=True) == pytest.approx([0.5, 1.0, 1.5])


def test_limiter_refuses_two_loops_at_once() -> None:
    """Waiting on a Limiter from a second loop while the first still has waiters is an error."""
    limiter = Limiter(1)
    loop_a = asyncio.new_event_loop()
    try:

        async def hold_and_queue() -> asyncio.Task[None]:
            await limiter.acquire()
            waiter = asyncio.ensure_future(limiter.acquire())
            await asyncio.sleep(0)  # let the waiter line up on loop A
            return waiter

        waiter = loop_a.run_until_complete(hold_and_queue())
        message = (
            "this Limiter has tasks waiting on another event loop that is still open; "
            "a Limiter can serve successive event loops, not two at once"
        )
        with pytest.raises(RuntimeError, match=exactly(message)):
            run(limiter.acquire)
        limiter.release()  # hands the slot to the waiter on loop A
        loop_a.run_until_complete(waiter)
        limiter.release()
        assert limiter.in_flight == 0
    finally:
        loop_a.close()


def test_limiter_forgets_waiters_of_a_closed_loop() -> None:
    """Tasks abandoned on a closed loop no longer stand in line on the next loop."""
    limiter = Limiter(1)
    loop_a = asyncio.new_event_loop()
    loop_a.set_exception_handler(lambda loop, context: None)  # abandoned tasks report as destroyed

    async def abandon() -> asyncio.Task[None]:
        await limiter.acquire()  # held by a task that will never release it
        waiter = asyncio.ensure_future(limiter.acquire())
        await asyncio.sleep(0)  # let the waiter line up on loop A
        return waiter

    waiter = loop_a.run_until_complete(abandon())
    loop_a.close()

    async def main() -> None:
        late = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)  # let it line up: the closed loop's waiter is forgotten
        limiter.release()  # the slot the abandoned task held, given back by hand
        await late
        limiter.release()

    run(main)
    assert (limiter.in_flight, limiter.waiting) == (0, 0)
    del waiter
    gc.collect()


def test_rate_gate_refuses_two_loops_at_once() -> None:
    """Waiting on a gate from a second loop while the first still has waiters is an error."""
    gate = RateGate(Rate(1))
    loop_a = VirtualClockLoop()
    try:

        async def queue() -> asyncio.Task[None]:
            await gate.wait()
            waiter = asyncio.ensure_future(gate.wait())
            await asyncio.sleep(0)  # let the waiter line up on loop A
            return waiter

        waiter = loop_a.run_until_complete(queue())
        message = (
            "this rate is in use by tasks of another event loop that is still open; "
            "a corral.Limiter or RateGate can serve successive event loops, not two at once"
        )
        with pytest.raises(RuntimeError, match=exactly(message)):
            run(gate.wait, virtual_time=True)
        loop_a.run_until_complete(waiter)
        assert loop_a.time() == pytest.approx(1.0)
    finally:
        loop_a.close()


def test_rate_gate_forgets_a_closed_loop_and_carries_the_rate_over() -> None:
    """A gate whose last loop closed with waiters serves a new loop, still owing the next slot."""
    gate = RateGate(Rate(1))
    loop_a = VirtualClockLoop()
    loop_a.set_exception_handler(lambda loop, context: None)  # abandoned tasks report as destroyed

    async def abandon() -> asyncio.Task[None]:
        await gate.wait()  # at 0: the next slot is at 1.0
        waiter = asyncio.ensure_future(gate.wait())
        await asyncio.sleep(0)  # let the waiter line up on loop A
        return waiter

    waiter = loop_a.run_until_complete(abandon())
    loop_a.close()

    async def main() -> float:
        await gate.wait()
        return asyncio.get_running_loop().time()

    assert run(main, virtual_time=True) == pytest.approx(1.0)
    assert gate.waiting == 0
    del waiter
    gc.collect()


# -- Limiter: adaptive limits ------------------------------------------------------------


async def test_limiter_accepts_auto_and_adaptive_limits() -> None:
    """'auto' means Adaptive(); the limit in force starts at initial; the ceiling is max."""
    auto = Limiter("auto")
    assert isinstance(auto, Limiter)  # a subclass that times `async with` bodies
    assert (auto.limit, auto.adaptive, auto.ceiling) == (4, Adaptive(), 1000)
    assert repr(auto) == (
        "<corral.Limiter limit=4 (adaptive 1..1000) rate=None in_flight=0 waiting=0>"
    )
    bounded = Limiter(limit=Adaptive(initial=3, min=2, max=9), rate="5/s")
    assert (bounded.limit, bounded.ceiling, bounded.rate) == (3, 9, Rate(5.0))
    assert (Limiter(5).adaptive, Limiter(5).ceiling) == (None, 5)
    assert Limiter(rate=1).ceiling is None


async def _grow_one_window(limiter: Limiter) -> None:
    """Report one busy window of fast successes (each call started after the last change)."""
    await asyncio.sleep(0.02)  # let time pass: these calls started after the last change
    for _ in range(max(MIN_SAMPLES, limiter.ceiling or 0)):
        limiter.record(0.01)


@pytest.mark.virtual_time
async def test_raising_an_adaptive_limit_hands_new_slots_to_waiters_in_order() -> None:
    """When the limit grows, callers in line get the new slots at once, first come first served."""
    limiter = Limiter(Adaptive(initial=2, max=4))
    for _ in range(2):
        await limiter.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        await limiter.acquire()
        order.append(i)

    waiters = [asyncio.create_task(take(i)) for i in range(3)]
    await asyncio.sleep(0)  # let the waiters line up
    assert limiter.waiting == 3
    await _grow_one_window(limiter)  # 2 -> 3: one new slot, nobody released
    await asyncio.sleep(0)  # let the first waiter resume
    assert (limiter.limit, limiter.in_flight, order) == (3, 3, [0])
    await _grow_one_window(limiter)  # 3 -> 4 (max)
    await asyncio.sleep(0)  # let the second waiter resume
    assert (limiter.limit, limiter.in_flight, order) == (4, 4, [0, 1])
    limiter.release()  # the slot goes straight to the last waiter
    await asyncio.gather(*waiters)
    assert (limiter.in_flight, order) == (4, [0, 1, 2])
    for _ in range(4):
        limiter.release()


async def test_lowering_an_adaptive_limit_retires_slots_until_below_it() -> None:
    """After a cut, returned slots are retired, not handed on, until below the limit."""
    limiter = Limiter(Adaptive(initial=4, max=4))
    for _ in range(4):
        await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)  # let the waiter line up
    limiter.record(0.5, "drop")  # 4 x 0.9 = 3.6: 3 in force
    assert limiter.limit == 3
    limiter.release()  # 4 in flight > 3: retired
    await asyncio.sleep(0)  # the waiter would resume here if it had been handed the slot
    assert (limiter.in_flight, limiter.waiting, waiter.done()) == (3, 1, False)
    limiter.release()  # 3 in flight: this slot goes to the waiter
    await waiter
    assert (limiter.in_flight, limiter.waiting) == (3, 0)
    for _ in range(3):
        limiter.release()


async def test_record_costs_nothing_on_a_fixed_limit() -> None:
    """A fixed limit ignores outcomes: record() and record_error() change nothing."""
    limiter = Limiter(3)
    limiter.record(0.1)
    limiter.record(0.1, "drop")
    limiter.record_error(0.1, TimeoutError())
    assert (limiter.limit, limiter.cooling_down) == (3, False)


async def test_record_refuses_an_unknown_outcome() -> None:
    """The outcome is 'success', 'drop' or 'ignore'; anything else names itself."""
    message = "outcome must be 'success', 'drop' or 'ignore'; got outcome='fail'"
    with pytest.raises(ValueError, match=exactly(message)):
        Limiter("auto").record(0.1, "fail")  # type: ignore[arg-type]


async def test_ignored_outcomes_change_nothing() -> None:
    """'ignore' (a cancelled call, an unrelated error) is neither a success nor a drop."""
    limiter = Limiter(Adaptive(initial=8))
    for _ in range(100):
        limiter.record(0.001, "ignore")
    assert limiter.limit == 8


@pytest.mark.virtual_time
async def test_async_with_an_adaptive_limiter_learns_from_the_body() -> None:
    """Bodies that take the same time each round: the limit grows (slow start)."""
    limiter = Limiter(Adaptive(initial=2, max=64))

    async def worker() -> None:
        for _ in range(40):
            async with limiter:
                await asyncio.sleep(0.01)

    async with asyncio.TaskGroup() as tg:
        for _ in range(64):
            tg.create_task(worker())
    assert limiter.limit == 64
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


async def test_a_timeout_in_an_async_with_body_is_a_drop() -> None:
    """A body that times out cuts an adaptive limit."""
    limiter = Limiter(Adaptive(initial=10))
    with pytest.raises(TimeoutError):
        async with limiter:
            raise TimeoutError
    assert limiter.limit == int(10 * DROP_BACKOFF)
    assert limiter.in_flight == 0


async def test_a_cancelled_body_is_neither_success_nor_drop() -> None:
    """Cancelling a call says nothing about the service (concurrency-limits #146)."""
    limiter = Limiter(Adaptive(initial=10))
    entered = asyncio.Event()

    async def body() -> None:
        async with limiter:
            entered.set()
            await asyncio.sleep(100)

    tasks = [asyncio.create_task(body()) for _ in range(10)]
    await entered.wait()
    await asyncio.sleep(0)  # let every task enter
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert (limiter.limit, limiter.in_flight) == (10, 0)
    assert limiter._controller is not None
    assert limiter._controller._samples == []


class FakeResponseError(Exception):
    """Shaped like aiohttp's ClientResponseError: .status and .headers."""

    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.headers = headers or {}


class FakeStatusError(Exception):
    """Shaped like httpx's HTTPStatusError: .response.status_code."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.response = SimpleNamespace(status_code=status, headers={})


class TimeoutException(Exception):
    """httpx's timeout base class (not a TimeoutError), matched by name."""


class ReadTimeout(TimeoutException):
    pass


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (None, "success"),
        (TimeoutError(), "drop"),
        (corral.RetryAfter(2.0), "drop"),
        (FakeResponseError(429), "drop"),
        (FakeResponseError(503), "drop"),
        (FakeResponseError(504), "drop"),
        (FakeResponseError(529), "drop"),  # Anthropic's "overloaded"
        (FakeStatusError(429), "drop"),
        (ReadTimeout(), "drop"),
        (FakeResponseError(404), "ignore"),
        (FakeResponseError(500), "ignore"),
        (ConnectionResetError(), "ignore"),
        (ValueError("bug"), "ignore"),
        (asyncio.CancelledError(), "ignore"),
        (KeyboardInterrupt(), "ignore"),
        # A TaskGroup in fn failed with the refusal among its errors.
        (ExceptionGroup("fn", [ValueError("bug"), FakeResponseError(429)]), "drop"),
        (ExceptionGroup("fn", [ExceptionGroup("inner", [TimeoutError()])]), "drop"),
        (ExceptionGroup("fn", [ValueError("bug"), FakeResponseError(404)]), "ignore"),
    ],
)
def test_outcome_of_reads_overload_from_failures(error: BaseException | None, outcome: str) -> None:
    """Timeouts, 429/503/504 and RetryAfter are drops; cancellation and the rest are ignored."""
    assert outcome_of(error) == outcome


@pytest.mark.virtual_time
async def test_map_with_limit_auto_shows_the_limit_in_force() -> None:
    """A map with limit='auto' grows its limit while calls keep their latency; stats show it."""

    async def call(item: int) -> int:
        await asyncio.sleep(0.01)
        return item

    async with corral.map(call, range(2000), limit="auto") as results:
        assert [r async for r in results] == list(range(2000))
        limit = results.stats.limit
    assert limit is not None
    assert 4 < limit <= 1000


@pytest.mark.virtual_time
async def test_a_map_with_limit_auto_holds_no_more_items_than_its_limit() -> None:
    """The pool follows the adaptive limit: no worker waits in line holding an item.

    Each call notes how many items had been taken from the input and not yet
    finished: never more than the limit in force, as the limit grows (where a
    pool sized for ``max`` would take 1000 at once) and as drops cut it.
    """
    taken = finished = 0

    def items() -> Iterator[int]:
        nonlocal taken
        for item in range(3000):
            taken += 1
            yield item

    held: list[tuple[int, int]] = []  # (items held, the limit in force)
    results_box: list[Any] = []

    async def call(item: int) -> int:
        nonlocal finished
        held.append((taken - finished, results_box[0].stats.limit))
        try:
            await asyncio.sleep(0.01)
            if 1000 <= item < 1100:
                raise TimeoutError  # drops: the limit comes down
            return item
        finally:
            finished += 1

    async with corral.map(call, items(), limit="auto", return_exceptions=True) as results:
        results_box.append(results)
        got = [r async for r in results]
    assert [r for r in got if not isinstance(r, TimeoutError)] == [
        i for i in range(3000) if not 1000 <= i < 1100
    ]
    limits = [limit for _, limit in held]
    assert max(limits) > 30  # it grew...
    assert any(b < a for a, b in itertools.pairwise(limits))  # ...and was cut
    # Held items: those running plus one just taken by a worker between calls.
    assert all(count <= limit + 1 for count, limit in held), max(
        count - limit for count, limit in held
    )


@pytest.mark.virtual_time
async def test_map_reports_timeouts_to_a_shared_adaptive_limiter() -> None:
    """Calls that time out in a map are drops: the shared adaptive limit comes down."""
    limiter = Limiter(Adaptive(initial=10))

    async def stuck(item: int) -> int:
        await asyncio.sleep(10)
        return item

    results = await corral.gather(
        stuck, range(30), limit=limiter, timeout=0.1, return_exceptions=True
    )
    assert all(isinstance(r, TimeoutError) for r in results)
    assert limiter.limit is not None
    assert limiter.limit < 10


# -- Limiter: cooldown ------------------------------------------------------------------


@pytest.mark.virtual_time
async def test_cooldown_pauses_new_starts_for_every_user() -> None:
    """No call starts before the cooldown ends, in any task; calls already running go on."""
    limiter = Limiter(4)
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    ends: list[float] = []

    async def call(hold: float) -> None:
        async with limiter:
            starts.append(loop.time())
            await asyncio.sleep(hold)
            ends.append(loop.time())

    running = asyncio.create_task(call(0.5))
    await asyncio.sleep(0)  # let it start before the pause
    limiter.cooldown(2.0)
    assert limiter.cooling_down
    async with asyncio.TaskGroup() as tg:
        for _ in range(6):
            tg.create_task(call(0.1))
    await running
    assert starts[0] == 0.0
    assert ends[0] == pytest.approx(0.5)  # the running call was not held up
    assert min(starts[1:]) >= 2.0
    await asyncio.sleep(5)  # the ramp after the pause ends within RAMP_FRACTION x 2 s x 1.5
    assert not limiter.cooling_down


@pytest.mark.virtual_time
async def test_cooldown_ramps_slots_back_in_jittered_steps() -> None:
    """After the pause, slots reopen over a ramp, in FIFO order, not in one thundering herd."""
    limiter = Limiter(64)
    loop = asyncio.get_running_loop()
    limiter.cooldown(2.0)
    starts: list[tuple[float, int]] = []

    async def call(i: int) -> None:
        async with limiter:
            starts.append((loop.time(), i))
            await asyncio.sleep(1000)

    tasks = [asyncio.create_task(call(i)) for i in range(64)]
    await asyncio.sleep(10)
    ramp = RAMP_FRACTION * 2.0
    times = [t for t, _ in starts]
    assert len(starts) == 64
    assert [i for _, i in starts] == list(range(64))
    assert min(times) > 2.0
    assert max(times) <= 2.0 + 1.5 * ramp
    assert len(set(times)) == RAMP_STEPS  # 2 slots per step, each step at its own time
    assert max(Counter(times).values()) == 64 // RAMP_STEPS
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert limiter.in_flight == 0


@pytest.mark.virtual_time
async def test_a_longer_cooldown_extends_a_shorter_one_never_shortens() -> None:
    """Overlapping cooldowns: the one ending last wins."""
    loop = asyncio.get_running_loop()
    for first, second in [(1.0, 3.0), (3.0, 1.0)]:
        limiter = Limiter(1)
        limiter.cooldown(first)
        limiter.cooldown(second)
        start = loop.time()
        async with limiter:
            assert loop.time() - start > 3.0


async def test_cooldown_of_zero_changes_nothing() -> None:
    """cooldown(0) is no pause at all."""
    limiter = Limiter(1)
    limiter.cooldown(0)
    assert not limiter.cooling_down
    assert limiter.acquire_nowait()
    limiter.release()


@pytest.mark.parametrize("seconds", [-1, math.nan, math.inf, "1", True])
async def test_cooldown_refuses_bad_seconds(seconds: object) -> None:
    """The pause is a finite number of seconds >= 0; the message names the value."""
    message = f"cooldown seconds must be a finite number >= 0; got seconds={seconds!r}"
    with pytest.raises(ValueError, match=exactly(message)):
        Limiter(1).cooldown(seconds)  # type: ignore[arg-type]


@pytest.mark.virtual_time
async def test_rate_only_limiter_reopens_at_the_rate_after_a_cooldown() -> None:
    """Without a cap there is nothing to ramp: the rate spaces the starts after the pause."""
    limiter = Limiter(rate=Rate(10))
    loop = asyncio.get_running_loop()
    limiter.cooldown(1.0)
    starts: list[float] = []

    async def call() -> None:
        async with limiter:
            starts.append(loop.time())

    await asyncio.gather(*(call() for _ in range(3)))
    assert starts == pytest.approx([1.0, 1.1, 1.2])


async def test_a_retry_after_from_the_server_starts_a_cooldown() -> None:
    """record_error() of a 429 with Retry-After, or of a RetryAfter, pauses the limiter."""
    for limiter in (Limiter(3), Limiter("auto")):
        limiter.record_error(0.01, FakeResponseError(429, {"Retry-After": "2"}))
        assert limiter.cooling_down
        assert limiter._cool_span == 2.0
    limiter = Limiter(3)
    limiter.record_error(0.01, corral.RetryAfter(1.5))
    assert limiter._cool_span == 1.5
    limiter = Limiter(3)
    limiter.record_error(0.01, FakeResponseError(500, {"Retry-After": "2"}))
    assert not limiter.cooling_down  # Retry-After counts on 429 and 503 only


@pytest.mark.virtual_time
async def test_a_retry_after_pauses_every_map_sharing_the_limiter() -> None:
    """One call told to come back in 1 s pauses both maps' new starts; no retry storm."""
    limiter = Limiter(2)
    loop = asyncio.get_running_loop()
    starts: list[tuple[float, int]] = []
    told = False

    async def call(item: int) -> int:
        nonlocal told
        starts.append((loop.time(), item))
        if item == 0 and not told:
            told = True
            raise corral.RetryAfter(1.0)
        await asyncio.sleep(0.1)
        return item

    a, b = await asyncio.gather(
        corral.gather(call, range(5), limit=limiter, retries=1),
        corral.gather(call, range(5, 10), limit=limiter),
    )
    assert (a, b) == (list(range(5)), list(range(5, 10)))
    assert starts[0] == (0.0, 0)  # failed at once: nothing else had started yet
    assert all(t >= 1.0 for t, _ in starts[1:])
    assert len(starts) == 11  # ten items and one retry: no storm


def test_cooldown_does_not_carry_over_to_the_next_loop() -> None:
    """A pause set on a loop that has closed means nothing to the next one."""
    limiter = Limiter(2)

    async def pause() -> None:
        limiter.cooldown(100.0)

    async def start_time() -> float:
        async with limiter:
            return asyncio.get_running_loop().time()

    run(pause, virtual_time=True)
    assert run(start_time, virtual_time=True) == 0.0
    assert not limiter.cooling_down


# -- Limiter: per key ----------------------------------------------------------------------


def test_limiter_refuses_a_key_that_is_not_callable() -> None:
    """key= is a function of the item; the message shows an example."""
    message = (
        "key must be a function of the item returning a hashable, like "
        "key=lambda url: urlsplit(url).hostname; got key='host'"
    )
    with pytest.raises(TypeError, match=exactly(message)):
        Limiter(2, key="host")  # type: ignore[arg-type]


async def test_per_key_limits_cap_each_key_separately() -> None:
    """limit=2 per key: each key has at most 2 calls running; keys run side by side."""
    limiter = Limiter(2, key=lambda item: item[0])
    spies = {"a": Spy(), "b": Spy()}
    total = Spy()

    async def call(item: str) -> None:
        async with limiter.for_item(item):
            await asyncio.gather(spies[item[0]](), total())

    async with asyncio.timeout(10):  # hang guard, not the assertion
        await asyncio.gather(*(call(f"{key}{i}") for key in "ab" for i in range(10)))
    assert (spies["a"].peak, spies["b"].peak, total.peak) == (2, 2, 4)
    assert (limiter.in_flight, limiter.waiting) == (0, 0)
    assert limiter.key is not None
    assert repr(limiter).startswith("<corral.Limiter limit=2 rate=None key=<function")


async def test_a_map_finds_each_items_key() -> None:
    """corral.map(fn, urls, limit=per_host) applies each host's cap to its own calls."""
    limiter = Limiter(3, key=lambda url: url.split("/")[2])
    running: Counter[str] = Counter()
    peaks: Counter[str] = Counter()

    async def fetch(url: str) -> str:
        host = url.split("/")[2]
        running[host] += 1
        peaks[host] = max(peaks[host], running[host])
        for _ in range(3):
            await asyncio.sleep(0)  # yield so calls overlap
        running[host] -= 1
        return host

    urls = [f"http://{host}/{i}" for i in range(30) for host in ("a.test", "b.test", "c.test")]
    async with corral.map(fetch, urls, limit=limiter) as results:
        hosts = [h async for h in results]
        assert results.stats.limit == 3
    assert hosts == [url.split("/")[2] for url in urls]
    assert dict(peaks) == {"a.test": 3, "b.test": 3, "c.test": 3}


@pytest.mark.virtual_time
async def test_per_key_rates_are_independent() -> None:
    """rate= per key: each key's starts are spaced; other keys do not wait for them."""
    limiter = Limiter(rate=Rate(1), key=lambda item: item[0])
    loop = asyncio.get_running_loop()
    starts: dict[str, list[float]] = {"a": [], "b": []}

    async def call(item: str) -> None:
        async with limiter.for_item(item):
            starts[item[0]].append(loop.time())

    await asyncio.gather(*(call(f"{key}{i}") for i in range(3) for key in "ab"))
    assert starts == {"a": [0.0, 1.0, 2.0], "b": [0.0, 1.0, 2.0]}


async def test_per_key_adaptive_limits_learn_separately() -> None:
    """limit='auto' with key=: a drop on one key cuts that key's limit only."""
    limiter = Limiter(Adaptive(initial=20), key=lambda item: item[0])
    a, b = limiter.for_item("a1"), limiter.for_item("b1")
    assert a is limiter.for_item("a2")
    assert a is not b
    a.record(0.1, "drop")
    assert (a.limit, b.limit) == (int(20 * DROP_BACKOFF), 20)
    assert limiter.limit == 20  # the highest in force among the keys


async def test_idle_keys_are_forgotten_beyond_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory follows the keys in use: idle keys beyond IDLE_KEYS go, least recent first."""
    monkeypatch.setattr(corral._limits, "IDLE_KEYS", 4)
    limiter = Limiter(1, key=lambda item: item)
    busy = limiter.for_item("busy")
    await busy.acquire()
    for i in range(100):
        async with limiter.for_item(i):
            pass
    # Swept when the keys double: the 4 idle keys kept and the busy one, and
    # as many new keys since.
    assert len(limiter._subs) <= 2 * (4 + 1)
    assert limiter.for_item("busy") is busy  # in use: never forgotten
    assert 99 in limiter._subs  # the most recent idle keys stay
    busy.release()


@pytest.mark.virtual_time
async def test_a_key_that_still_owes_its_rate_is_not_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forgetting a key must not let it start early: a key with rate debt stays."""
    monkeypatch.setattr(corral._limits, "IDLE_KEYS", 2)
    limiter = Limiter(rate=Rate(1), key=lambda item: item)
    loop = asyncio.get_running_loop()
    async with limiter.for_item("slow"):
        pass  # at t=0: the next start of "slow" is due at t=1
    await asyncio.sleep(0.5)
    for i in range(10):
        async with limiter.for_item(i):
            pass
    async with limiter.for_item("slow"):
        assert loop.time() == pytest.approx(1.0)


async def test_looking_up_a_known_key_leaves_the_keys_where_they_are() -> None:
    """for_item() of a key held already only reads: no delete and re-insert per call,
    which would leave a hole in the dict per call for later reads to step over."""
    limiter = Limiter(1, key=lambda item: item)
    subs = [limiter.for_item(i) for i in range(10)]
    order = list(limiter._subs)
    for i in (0, 5, 0, 9, 3):
        assert limiter.for_item(i) is subs[i]
    assert list(limiter._subs) == order


async def test_many_busy_keys_stay_and_the_idle_ones_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crawler with many hosts in flight: busy keys are never forgotten, idle keys
    beyond IDLE_KEYS are, and each new key costs O(1) keys examined however many are
    busy (not a sweep of them all per new key)."""
    monkeypatch.setattr(corral._limits, "IDLE_KEYS", 4)
    examined = 0
    idle = Limiter._idle

    def counted(self: Limiter, now: float) -> bool:
        nonlocal examined
        examined += 1
        return idle(self, now)

    monkeypatch.setattr(Limiter, "_idle", counted)
    limiter = Limiter(1, key=lambda item: item)
    busy: dict[object, Limiter] = {}
    for b in range(50):
        sub = busy["busy", b] = limiter.for_item(("busy", b))
        assert sub.acquire_nowait()
    for i in range(1000):
        key = ("busy", i % 50)
        assert limiter.for_item(key) is busy[key]
        async with limiter.for_item(i):
            pass
        # The busy keys and the 4 idle ones kept, and as many new keys until the sweep.
        assert len(limiter._subs) <= 2 * (50 + 4)
    assert all(limiter._subs[key] is sub for key, sub in busy.items())
    assert 999 in limiter._subs
    # A sweep over n keys comes after n/2 new keys or more.
    assert examined <= 2 * (50 + 1000)

    for sub in busy.values():
        sub.release()
    for i in range(1000, 1200):
        limiter.for_item(i)
    # Memory follows the keys in use: the former busy keys are forgotten too.
    assert len(limiter._subs) <= 2 * 4
    assert not any(key in limiter._subs for key in busy)


@pytest.mark.parametrize("seed", range(3))
async def test_the_least_recently_used_idle_keys_are_forgotten_first(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Whenever a key is forgotten, every key used after it is still held; the 4 most
    recently used always are; a key held keeps its Limiter, a forgotten one starts afresh."""
    monkeypatch.setattr(corral._limits, "IDLE_KEYS", 4)
    limiter = Limiter(1, key=lambda item: item)
    rng = random.Random(seed)
    recent: list[int] = []  # keys seen, least recently used first
    for _ in range(500):
        key = rng.randrange(30)
        held = dict(limiter._subs)
        sub = limiter.for_item(key)
        assert (sub is held[key]) if key in held else (sub not in held.values())
        if key in recent:
            recent.remove(key)
        recent.append(key)
        kept = set(limiter._subs)
        assert kept == set(recent[-len(kept) :])
        assert min(4, len(recent)) <= len(kept) <= 2 * 4


async def test_a_key_in_use_at_a_sweep_counts_as_used_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Recency is the last look-up, or the last sweep that found the key in use: a long
    call's key is not the first forgotten when it ends, as if unused since it began."""
    monkeypatch.setattr(corral._limits, "IDLE_KEYS", 2)
    limiter = Limiter(1, key=lambda item: item)
    long_call = limiter.for_item("long")
    assert long_call.acquire_nowait()
    for key in (0, 1, 2, 3):  # the 4th key held sweeps: "long" is in use then
        limiter.for_item(key)
    for key in (4, 5):  # busy: no competition for the 2 idle places kept
        assert limiter.for_item(key).acquire_nowait()
    long_call.release()
    limiter.for_item(6)  # 6 keys held: a sweep, which keeps "long" and 3 of the idle ones
    assert set(limiter._subs) == {"long", 3, 4, 5, 6}
    assert limiter.for_item("long") is long_call


@pytest.mark.virtual_time
async def test_keys_first_seen_in_a_cooldown_inherit_what_remains_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """However many keys come and go: a new key sits out the rest of a Limiter-wide
    cooldown, and a key in a cooldown is not idle, so not forgotten."""
    monkeypatch.setattr(corral._limits, "IDLE_KEYS", 2)
    limiter = Limiter(2, key=lambda item: item)
    loop = asyncio.get_running_loop()
    for i in range(10):  # keys held, some forgotten, before the cooldown
        limiter.for_item(("before", i))
    limiter.cooldown(2.0)
    await asyncio.sleep(0.5)
    during = [("during", i) for i in range(20)]
    subs = [limiter.for_item(key) for key in during]  # sweeps among them
    assert all(sub.cooling_down for sub in subs)
    assert all(limiter._subs[key] is sub for key, sub in zip(during, subs, strict=True))
    starts: list[float] = []

    async def call(key: object) -> None:
        async with limiter.for_item(key):
            starts.append(loop.time())

    await asyncio.gather(*(call(key) for key in during))
    assert min(starts) >= 2.0
    await asyncio.sleep(10)  # past the cooldown and every key's ramp
    assert not limiter.for_item("after").cooling_down
    for i in range(100):
        limiter.for_item(("after", i))
    assert len(limiter._subs) <= 2 * 2


async def test_a_keyed_limiter_needs_the_item() -> None:
    """acquire(), acquire_nowait(), record() and `async with` need a key: for_item(item)."""
    limiter = Limiter(2, key=lambda item: item)
    message = (
        "this Limiter has key=, so each key has its own slots: call {} on "
        "limiter.for_item(item), or pass the limiter to corral.map(), which does"
    )
    with pytest.raises(TypeError, match=exactly(message.format("acquire()"))):
        await limiter.acquire()
    with pytest.raises(TypeError, match=exactly(message.format("acquire()"))):
        async with limiter:
            pass
    with pytest.raises(TypeError, match=exactly(message.format("acquire_nowait()"))):
        limiter.acquire_nowait()
    with pytest.raises(TypeError, match=exactly(message.format("record()"))):
        limiter.record(0.1)
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


async def test_for_item_of_a_plain_limiter_is_the_limiter() -> None:
    """Without key=, every item shares the one budget."""
    limiter = Limiter(2)
    assert limiter.for_item("anything") is limiter


@pytest.mark.virtual_time
async def test_a_keyed_cooldown_pauses_every_key_even_new_ones() -> None:
    """cooldown() on a per-key Limiter pauses keys held now and keys first seen during it."""
    limiter = Limiter(2, key=lambda item: item)
    loop = asyncio.get_running_loop()
    async with limiter.for_item("old"):
        pass
    limiter.cooldown(1.0)
    starts = []
    for key in ("old", "new"):
        async with limiter.for_item(key):
            starts.append(loop.time())
    assert min(starts) >= 1.0


@pytest.mark.parametrize("limit", [10, None], ids=["capped", "rate-only"])
@pytest.mark.virtual_time
async def test_a_caller_in_line_for_the_rate_when_a_cooldown_begins_starts_after_it(
    limit: int | None,
) -> None:
    """Callers past the slot, waiting for the rate: none starts inside the cooldown."""
    limiter = Limiter(limit=limit, rate=Rate(10))
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def call() -> None:
        async with limiter:
            starts.append(loop.time())

    tasks = [asyncio.create_task(call()) for _ in range(4)]
    await asyncio.sleep(0.05)  # the first started; the others wait for the rate
    limiter.cooldown(1.0)
    await asyncio.gather(*tasks)
    assert starts[0] == 0.0
    assert min(starts[1:]) >= 1.05 - 1e-9
    assert limiter.in_flight == 0


@pytest.mark.virtual_time
async def test_a_caller_cancelled_while_sitting_out_a_cooldown_gives_its_slot_back() -> None:
    limiter = Limiter(limit=2, rate=Rate(10))
    first = asyncio.create_task(limiter.acquire())
    second = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.05)  # the first holds a slot; the second waits for the rate
    limiter.cooldown(1.0)
    await asyncio.sleep(0.2)  # the second has its rate slot, and sits out the cooldown
    assert limiter.in_flight == 2
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    await first
    assert limiter.in_flight == 1
    limiter.release()


@pytest.mark.virtual_time
async def test_a_keyed_limiter_says_it_is_cooling_down() -> None:
    limiter = Limiter(2, key=lambda item: item)
    async with limiter.for_item("a"):
        pass
    assert not limiter.cooling_down
    limiter.cooldown(1.0)
    assert limiter.cooling_down
    await asyncio.sleep(5)  # past the pause and every key's ramp
    assert not limiter.cooling_down


@pytest.mark.parametrize(
    "error",
    [corral.RetryAfter(2.0), FakeResponseError(429, {"Retry-After": "2"})],
    ids=["RetryAfter", "429"],
)
async def test_a_retry_after_raised_inside_async_with_cools_a_fixed_limiter(
    error: Exception,
) -> None:
    limiter = Limiter(3)
    with pytest.raises(type(error)):
        async with limiter:
            raise error
    assert limiter.cooling_down
    assert limiter.in_flight == 0
    with pytest.raises(KeyError):
        async with limiter:
            raise KeyError("not a pause")
    assert limiter._cool_span == 2.0


@pytest.mark.virtual_time
async def test_a_slot_handed_over_just_before_a_cooldown_starts_no_call_until_its_end() -> None:
    """A waiter given a slot, then a 429 before it resumes: it still starts after the pause."""
    limiter = Limiter(limit=1)
    loop = asyncio.get_running_loop()
    await limiter.acquire()
    starts: list[float] = []

    async def waiter() -> None:
        await limiter.acquire()
        starts.append(loop.time())
        limiter.release()

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)  # the waiter is in line
    handed_over = loop.time()
    limiter.release()  # the slot goes straight to the waiter...
    limiter.cooldown(2.0)  # ...and a Retry-After arrives before it runs
    await task
    assert starts == [pytest.approx(handed_over + 2.0)]


# -- Limiter: costs and usage checked -------------------------------------------------------

_TOKENS = Rate({"requests": 10, "tokens": 100}, per=1.0)


@pytest.mark.parametrize(
    ("cost", "error", "message"),
    [
        (
            {"tokens": "5"},
            ValueError,
            "cost must hold amounts >= 0 (finite numbers) named by strings; "
            "got cost={'tokens': '5'}",
        ),
        (
            {"tokens": None},
            ValueError,
            "cost must hold amounts >= 0 (finite numbers) named by strings; "
            "got cost={'tokens': None}",
        ),
        (
            {"tokens": math.inf},
            ValueError,
            "cost must hold amounts >= 0 (finite numbers) named by strings; "
            "got cost={'tokens': inf}",
        ),
        (
            {"tokens": math.nan},
            ValueError,
            "cost must hold amounts >= 0 (finite numbers) named by strings; "
            "got cost={'tokens': nan}",
        ),
        (
            {"tokens": -1.0},
            ValueError,
            "cost must hold amounts >= 0 (finite numbers) named by strings; "
            "got cost={'tokens': -1.0}",
        ),
        (
            {"tokens": True},
            ValueError,
            "cost must hold amounts >= 0 (finite numbers) named by strings; "
            "got cost={'tokens': True}",
        ),
        (
            {1: 5},
            ValueError,
            "cost must hold amounts >= 0 (finite numbers) named by strings; got cost={1: 5}",
        ),
        (
            {"requests": 0},
            ValueError,
            "cost['requests'] must be >= 1 (a call is at least one request); "
            "got cost={'requests': 0}",
        ),
        (
            {"requests": 0.001, "tokens": 5},
            ValueError,
            "cost['requests'] must be >= 1 (a call is at least one request); "
            "got cost={'requests': 0.001, 'tokens': 5}",
        ),
        (
            5,
            TypeError,
            "cost must be a dict of amounts per dimension, like "
            "{'input_tokens': 1200, 'output_tokens': 500}, or None; got cost=5",
        ),
    ],
)
@pytest.mark.virtual_time
async def test_a_bad_cost_is_refused_before_anything_is_taken(
    cost: Any, error: type[Exception], message: str
) -> None:
    """acquire(cost) checks the cost first: an error naming it, no slot or rate slot held."""
    limiter = Limiter(limit=1, rate=_TOKENS)
    with pytest.raises(error, match=exactly(message)):
        await limiter.acquire(cost)
    assert (limiter.in_flight, limiter.waiting) == (0, 0)
    began = asyncio.get_running_loop().time()
    await asyncio.wait_for(limiter.acquire({"tokens": 1}), 10)  # the slot is free, at once
    assert asyncio.get_running_loop().time() == began
    limiter.release()


@pytest.mark.virtual_time
async def test_a_bad_cost_never_reaches_the_line_for_the_rate() -> None:
    """A bad cost behind the rate fails its caller at once; the callers behind it go on."""
    limiter = Limiter(rate=_TOKENS)
    loop = asyncio.get_running_loop()
    await limiter.acquire({"tokens": 10})  # books the rate: the next start at 0.1
    limiter.release()
    bad = asyncio.create_task(limiter.acquire({"tokens": None}))  # type: ignore[dict-item]
    good = asyncio.create_task(limiter.acquire({"tokens": 1}))
    with pytest.raises(ValueError, match=r"got cost=\{'tokens': None\}$"):
        await bad
    await asyncio.wait_for(good, 10)
    assert loop.time() == pytest.approx(0.1)
    assert limiter.waiting == 0
    limiter.release()


@pytest.mark.parametrize(
    ("usage", "error", "message"),
    [
        (
            {"tokens": math.inf},
            ValueError,
            "usage must hold amounts >= 0 (finite numbers) named by strings; "
            "got usage={'tokens': inf}",
        ),
        (
            {"tokens": math.nan},
            ValueError,
            "usage must hold amounts >= 0 (finite numbers) named by strings; "
            "got usage={'tokens': nan}",
        ),
        (
            {"tokens": -1e6},
            ValueError,
            "usage must hold amounts >= 0 (finite numbers) named by strings; "
            "got usage={'tokens': -1000000.0}",
        ),
        (
            {"requests": 0, "tokens": 10},
            ValueError,
            "usage['requests'] must be >= 1 (a call is at least one request); "
            "got usage={'requests': 0, 'tokens': 10}",
        ),
        (
            [("tokens", 10)],
            TypeError,
            "usage must be a dict of amounts per dimension, like "
            "{'input_tokens': 1200, 'output_tokens': 500}, or None; "
            "got usage=[('tokens', 10)]",
        ),
    ],
)
@pytest.mark.virtual_time
async def test_a_bad_usage_is_refused_and_leaves_the_rate_as_it_was(
    usage: Any, error: type[Exception], message: str
) -> None:
    """settle(cost, usage) checks the usage: an error naming it; the schedule is untouched."""
    limiter = Limiter(rate=_TOKENS)
    loop = asyncio.get_running_loop()
    cost = {"tokens": 10}
    await limiter.acquire(cost)
    with pytest.raises(error, match=exactly(message)):
        limiter.settle(cost, usage)
    limiter.release()
    await asyncio.wait_for(limiter.acquire({"tokens": 10}), 10)
    assert loop.time() == pytest.approx(0.1)  # the first start's 10 tokens, at 100 a second
    limiter.release()


@pytest.mark.virtual_time
async def test_a_slot_is_given_back_when_the_rate_fails() -> None:
    """Whatever raises after the slot is taken, acquire() leaves nothing held."""

    class BrokenGate:
        waiting = 0

        def wait_nowait(self, cost: object = None) -> bool:
            raise RuntimeError("broken")

    limiter = Limiter(limit=1, rate="10/s")
    limiter._gate = BrokenGate()  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="broken"):
        await limiter.acquire()
    assert limiter.in_flight == 0


@pytest.mark.parametrize("cost", [{"requests": 0}, {"requests": 0.001}])
async def test_a_map_refuses_a_cost_of_less_than_one_request(cost: dict[str, float]) -> None:
    """A start is at least one request: less would switch the request rate off."""

    async def call(item: int) -> int:
        return item

    message = (
        f"cost must return 'requests' >= 1 (a call is at least one request); got {cost!r} for 0"
    )
    for limit in (10, Limiter(10, rate=Rate({"requests": 10}, per=1.0))):
        with pytest.raises(ValueError, match=exactly(message)):
            await corral.gather(
                call, range(3), limit=limit, rate=Rate({"requests": 10}), cost=lambda i: cost
            )


@pytest.mark.parametrize("where", ["map", "limiter"])
@pytest.mark.virtual_time
async def test_one_cost_dict_shared_by_every_item_keeps_the_token_rate(where: str) -> None:
    """cost=lambda item: ESTIMATE (one dict for all): an early refund erases no later booking."""
    loop = asyncio.get_running_loop()
    estimate = {"output_tokens": 500}
    starts: dict[int, float] = {}

    async def call(item: int) -> int:
        starts[item] = loop.time()
        await asyncio.sleep(0.6 if item == 0 else 5.0)
        return item

    rate = Rate({"output_tokens": 1000}, per=1.0)
    limits: Any = {"limit": 10, "rate": rate} if where == "map" else {"limit": Limiter(rate=rate)}
    await corral.gather(
        call,
        range(3),
        **limits,
        cost=lambda item: estimate,
        usage=lambda item: {"output_tokens": 0 if item == 0 else 500},
    )
    # Item 0 used nothing and refunds at 0.6; items 1 and 2 used their 500
    # tokens each: at 1000 a second, item 2 starts no sooner than 0.5 s after item 1.
    assert starts[1] == pytest.approx(0.5)
    assert starts[2] - starts[1] >= 0.5 - 1e-9
    assert estimate == {"output_tokens": 500}  # the caller's dict is not written to


# -- Limiter: how long a server's wait pauses it ---------------------------------------------


class HTTP503(Exception):
    """Shaped like aiohttp's ClientResponseError for a 503 with Retry-After."""

    def __init__(self, retry_after: str) -> None:
        super().__init__(503)
        self.status = 503
        self.headers = {"Retry-After": retry_after}


@pytest.mark.parametrize("retry_after", ["86400", "Fri, 31 Dec 9999 23:59:59 GMT"])
@pytest.mark.parametrize(
    ("options", "most"),
    [
        ({"retries": 3}, 120.0),
        ({"retries": corral.Retry(attempts=4, max_retry_after=10)}, 10.0),
        ({"retries": corral.Retry(attempts=4, max_retry_after=10), "cost": lambda i: {}}, 10.0),
        ({}, 120.0),  # MAX_COOLDOWN, Retry's default max_retry_after
    ],
    ids=["retries", "max_retry_after", "metered", "no-retries"],
)
@pytest.mark.virtual_time
async def test_a_wait_the_retries_refuse_pauses_the_limiter_no_longer_than_they_would(
    retry_after: str, options: dict[str, Any], most: float
) -> None:
    """A Retry-After beyond max_retry_after fails the item, and pauses the others <= that."""
    loop = asyncio.get_running_loop()
    limiter = Limiter(1)
    starts: dict[int, float] = {}

    async def call(item: int) -> int:
        starts[item] = loop.time()
        if item == 0:
            raise HTTP503(retry_after)
        return item

    results = await corral.gather(call, range(3), limit=limiter, return_exceptions=True, **options)
    assert isinstance(results[0], HTTP503)  # failed at once: the wait was not slept through
    assert results[1:] == [1, 2]
    assert starts[0] == 0.0
    assert most <= starts[1] <= starts[2] <= most + 1.5 * min(RAMP_MAX, RAMP_FRACTION * most)
    assert limiter._cool_span == most


@pytest.mark.parametrize(
    "error",
    [corral.RetryAfter(86400), FakeResponseError(429, {"Retry-After": "86400"})],
    ids=["RetryAfter", "429"],
)
async def test_a_limiter_used_directly_cools_down_for_max_cooldown_at_most(
    error: Exception,
) -> None:
    """No Retry in play: a day-long Retry-After pauses the Limiter for MAX_COOLDOWN (120 s)."""
    limiter = Limiter(3)
    with pytest.raises(type(error)):
        async with limiter:
            raise error
    assert limiter._cool_span == corral._limits.MAX_COOLDOWN == 120.0
    limiter = Limiter("auto")
    limiter.record_error(0.01, error, max_cooldown=30.0)
    assert limiter._cool_span == 30.0
    limiter = Limiter(3)
    limiter.record_error(0.01, corral.RetryAfter(2.0), max_cooldown=math.inf)
    assert limiter._cool_span == 2.0  # a wait below the cap is kept as it is
    limiter.record_error(0.01, error, max_cooldown=0)
    assert limiter._cool_span == 2.0  # no cap at all: no pause


@pytest.mark.parametrize("max_cooldown", [-1.0, math.nan, "60"])
async def test_record_error_refuses_a_bad_max_cooldown(max_cooldown: Any) -> None:
    message = (
        "max_cooldown must be a number of seconds >= 0 (math.inf for no cap); "
        f"got max_cooldown={max_cooldown!r}"
    )
    with pytest.raises(ValueError, match=exactly(message)):
        Limiter(3).record_error(0.01, corral.RetryAfter(1.0), max_cooldown=max_cooldown)


# -- Limiter: bounded bookkeeping, keys, loops and threads --------------------------------


async def test_callers_leaving_the_line_behind_a_live_waiter_leave_nothing_behind() -> None:
    """Timeouts queued behind a waiter that waits on: the line does not keep their futures."""
    limiter = Limiter(1)
    await limiter.acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        async with limiter:
            order.append(name)

    first = asyncio.create_task(take("first"))
    await asyncio.sleep(0)  # in line, and stays there
    for _ in range(1000):
        quitter = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)  # in line...
        quitter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await quitter  # ... and gone
    last = asyncio.create_task(take("last"))
    await asyncio.sleep(0)
    assert limiter.waiting == 2
    assert len(limiter._waiters) < 50  # not one future per caller that ever gave up
    limiter.release()
    await asyncio.gather(first, last)
    assert order == ["first", "last"]
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


def _explode(item: object) -> str:
    raise KeyError("host")


async def test_a_key_function_that_raises_names_the_item() -> None:
    """The key function's own error, with a note naming the item and the function."""
    limiter = Limiter(2, key=_explode)
    with pytest.raises(KeyError) as raised:
        limiter.for_item({"url": "http://a"})
    assert raised.value.__notes__ == [f"raised by key={_explode!r} for item={{'url': 'http://a'}}"]
    results = await corral.gather(str, ["x"], limit=limiter, return_exceptions=True)
    assert isinstance(results[0], KeyError)
    assert results[0].__notes__[-1] == f"raised by key={_explode!r} for item='x'"
    assert (limiter.in_flight, limiter.waiting, len(limiter._subs)) == (0, 0, 0)


async def test_a_key_function_returning_an_unhashable_names_the_item_and_the_key() -> None:
    def key(item: object) -> Any:
        return [item]

    limiter = Limiter(2, key=key)
    message = (
        f"key must return a hashable (a str, a number, a tuple...); key={key!r} "
        "returned ['http://a'] for item='http://a'"
    )
    with pytest.raises(TypeError, match=exactly(message)):
        limiter.for_item("http://a")
    results = await corral.gather(str, ["http://a"], limit=limiter, return_exceptions=True)
    assert isinstance(results[0], TypeError)
    assert str(results[0]) == message
    assert (limiter.in_flight, limiter.waiting, len(limiter._subs)) == (0, 0, 0)


@pytest.mark.parametrize(
    ("latency", "error"),
    [(math.nan, ValueError), (-0.5, ValueError), (math.inf, ValueError), ("0.1", TypeError)],
)
async def test_record_refuses_a_latency_that_is_not_a_duration(
    latency: Any, error: type[Exception]
) -> None:
    """A NaN latency used to crash the controller (int(nan)) and wedge the limit."""
    limiter = Limiter(Adaptive(initial=8))
    message = f"latency must be a finite number of seconds >= 0; got latency={latency!r}"
    for _ in range(2 * MIN_SAMPLES):
        with pytest.raises(error, match=exactly(message)):
            limiter.record(latency)
    for _ in range(2 * MIN_SAMPLES):
        limiter.record(0.01)  # still learning
    assert limiter.limit is not None
    assert limiter.limit >= 8


def test_acquire_nowait_after_a_loop_that_ended_in_a_cooldown() -> None:
    """The cooldown of a finished loop does not keep acquire_nowait() refusing on the next."""
    limiter = Limiter(2)

    async def cool() -> None:
        limiter.cooldown(60)

    async def take() -> bool:
        taken = limiter.acquire_nowait()
        if taken:
            limiter.release()
        return taken

    run(cool)
    assert run(take) is True
    assert (limiter.in_flight, limiter.waiting, limiter.cooling_down) == (0, 0, False)


def test_limiter_refuses_a_loop_running_in_another_thread() -> None:
    """Two loops at once (one per thread): a clear error, not slots handed across threads."""
    import threading

    limiter = Limiter(1)
    holding = threading.Event()
    done = threading.Event()

    async def hold() -> None:
        await limiter.acquire()
        helper = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)  # waits on this loop: the Limiter serves it now
        limiter.release()  # the slot goes to the helper, which holds it
        await helper
        holding.set()
        while not done.is_set():
            await asyncio.sleep(0.001)
        limiter.release()

    thread = threading.Thread(target=run, args=(hold,))
    thread.start()
    try:
        assert holding.wait(30)
        message = (
            "this Limiter is in use by an event loop running in another thread; "
            "a Limiter can serve successive event loops, not two at once"
        )

        async def take() -> None:
            async with asyncio.timeout(10):  # without the check: waits on the other thread
                await limiter.acquire()

        with pytest.raises(RuntimeError, match=exactly(message)):
            run(take)
        assert limiter.waiting == 0
    finally:
        done.set()
        thread.join()
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


async def _random_line(seed: int, rate: Rate | None) -> None:
    """Random limit changes, arrivals, releases and cancellations (queued, just handed a
    slot, waiting for the rate, holding one), checked as they go."""
    rng = random.Random(seed)
    limiter = Limiter(Adaptive(initial=3, min=1, max=12), rate=rate)
    arrived: list[int] = []
    served: list[int] = []
    holding: dict[int, asyncio.Event] = {}
    tasks: dict[int, asyncio.Task[None]] = {}
    cancelled: set[int] = set()

    async def caller(n: int) -> None:
        await limiter.acquire()
        # Whoever arrived earlier and still wants a slot was handed one already
        # (it has yet to resume): nobody later goes ahead of a caller in line.
        earlier = [a for a in arrived[:n] if a not in served and a not in cancelled]
        assert len(earlier) <= limiter.in_flight - len(holding) - 1
        served.append(n)
        done = holding[n] = asyncio.Event()
        try:
            await done.wait()
        finally:
            del holding[n]
            limiter.release()

    for step in range(300):
        op = rng.random()
        if op < 0.35:
            n = len(arrived)
            arrived.append(n)
            tasks[n] = asyncio.create_task(caller(n))
        elif op < 0.6 and holding:
            holding[rng.choice(sorted(holding))].set()
        elif op < 0.75:
            limiter._set_limit(rng.randint(1, 12))
        else:
            live = [n for n, t in tasks.items() if not t.done()]
            if live:
                n = rng.choice(live)
                cancelled.add(n)
                tasks[n].cancel()
        for _ in range(rng.choice([0, 1, 3])):
            await asyncio.sleep(0)
        if rate is not None and rng.random() < 0.3:
            await asyncio.sleep(rng.choice([0.0005, 0.002]))  # let the rate grant some
        if step % 7 == 0:
            for _ in range(5):
                await asyncio.sleep(0)
            limit = limiter.limit
            assert limit is not None
            # Slots are held by the callers running, and those waiting for the rate.
            assert limiter.in_flight - len(holding) == (limiter._gate.waiting if rate else 0)
            if limiter._n_waiting:
                assert limiter.in_flight >= limit  # no free slot while someone waits
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert len(served) > 20
    if rate is not None:  # each start waited for the rate in turn: in arrival order
        assert served == sorted(served)
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


@pytest.mark.parametrize("seed", range(12))
async def test_limit_changes_arrivals_and_cancellations_keep_the_line_exact(seed: int) -> None:
    await _random_line(seed, None)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.virtual_time
async def test_with_a_rate_too_the_line_stays_exact_and_starts_keep_arrival_order(
    seed: int,
) -> None:
    await _random_line(seed, Rate(1000))


async def test_a_map_over_many_distinct_keys_keeps_a_bounded_number_of_them() -> None:
    """Every item its own key (think: one URL each): memory follows IDLE_KEYS, not the items."""
    limiter = Limiter(2, key=lambda item: ("host", item))
    most = 0

    async def call(item: int) -> int:
        nonlocal most
        most = max(most, len(limiter._subs))
        return item

    results = await corral.gather(call, range(5000), limit=limiter, ordered=False)
    assert sorted(results) == list(range(5000))
    # The idle keys kept and the keys of the calls in flight (a map's default
    # 100 workers, each holding one item), and as many new keys until the sweep.
    assert most <= 2 * (corral._limits.IDLE_KEYS + 100)
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


@pytest.mark.virtual_time
async def test_a_caller_handed_a_slot_reaches_the_rate_before_a_later_newcomer() -> None:
    """A raised limit hands a slot to the caller in line; a caller arriving in the same
    instant, finding a slot free, must not take the next rate slot ahead of it."""
    limiter = Limiter(Adaptive(initial=1, max=10), rate=Rate(10))
    loop = asyncio.get_running_loop()
    starts: list[tuple[str, float]] = []

    async def call(name: str) -> None:
        await limiter.acquire()
        starts.append((name, loop.time()))

    await limiter.acquire()  # holds the one slot, and the rate slot at 0
    waiter = asyncio.create_task(call("waiter"))
    await asyncio.sleep(0)  # in line for a slot
    newcomer = asyncio.create_task(call("newcomer"))  # ready to run, not run yet
    limiter._set_limit(3)  # the waiter is handed a slot; one more is free
    await asyncio.gather(waiter, newcomer)
    assert starts == [("waiter", pytest.approx(0.1)), ("newcomer", pytest.approx(0.2))]
    for _ in range(3):
        limiter.release()
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


@pytest.mark.parametrize(
    ("limit", "rate"),
    [
        (10, Rate(10)),
        (None, Rate(10)),
        (10, Rate({"output_tokens": 100}, per=1.0)),  # 10 tokens a call: 10 calls/s
        (None, [Rate({"requests": 10}, per=1.0), Rate({"requests": 1000}, per=60.0)]),
    ],
    ids=["capped", "rate-only", "tokens", "two-windows"],
)
@pytest.mark.virtual_time
async def test_callers_waiting_for_the_rate_through_a_cooldown_start_at_the_rate_in_order(
    limit: int | None, rate: Any
) -> None:
    """They used to be granted during the pause, then all start at its end at once, in
    any order: a burst above the rate. They start after it at the rate, in arrival order."""
    limiter = Limiter(limit=limit, rate=rate)
    loop = asyncio.get_running_loop()
    starts: list[tuple[int, float]] = []

    async def call(n: int) -> None:
        await limiter.acquire({"output_tokens": 10})
        starts.append((n, loop.time()))
        limiter.release()

    tasks = [asyncio.create_task(call(n)) for n in range(6)]
    await asyncio.sleep(0.05)  # the first started; the others wait for the rate
    limiter.cooldown(1.0)
    await asyncio.gather(*tasks)
    assert [n for n, _ in starts] == list(range(6))
    assert [t for _, t in starts] == pytest.approx([0.0, 1.05, 1.15, 1.25, 1.35, 1.45])
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


@pytest.mark.parametrize("limit", ["auto", Adaptive(initial=2)], ids=["auto", "Adaptive"])
async def test_an_async_generator_closed_by_another_task_gives_its_slot_back(limit: Any) -> None:
    """`async with limiter:` inside an async generator that another task closes (as the
    loop's shutdown does): the slot used to stay taken, and aclose() raised KeyError."""
    limiter = Limiter(limit)

    async def pages() -> Any:
        async with limiter:
            yield 1
            yield 2

    stream = pages()
    async for _ in stream:
        break  # suspended inside `async with`, holding a slot
    assert limiter.in_flight == 1
    await asyncio.create_task(stream.aclose())  # GeneratorExit, thrown in from another task
    assert limiter.in_flight == 0
    async with limiter:  # and the limiter still times bodies
        pass
    assert limiter.in_flight == 0


@pytest.mark.parametrize("seconds", [math.nan, -1.0, math.inf])
async def test_a_nonsense_wait_on_a_failure_neither_raises_nor_keeps_the_slot(
    seconds: float,
) -> None:
    """A RetryAfter whose seconds were changed after it was made: no error from the
    limiter, no pause beyond MAX_COOLDOWN, and the slot is given back."""
    error = corral.RetryAfter(1.0)
    error.seconds = seconds
    for limiter in (Limiter(2), Limiter("auto")):
        with pytest.raises(corral.RetryAfter):
            async with limiter:
                raise error
        assert limiter.in_flight == 0
        assert 0 <= limiter._cool_span <= corral._limits.MAX_COOLDOWN
        limiter.record_error(0.01, error, max_cooldown=math.inf)
        assert 0 <= limiter._cool_span <= corral._limits.MAX_COOLDOWN
