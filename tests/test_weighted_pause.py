"""A cooldown on a Limiter with a weighted rate, or several windows: the weighted gate's
pause. Callers the rate let through just before it go back to the head of the line, a
pause ends with its event loop, and a granted start whose caller was cancelled goes to
the next caller in line when that one's cost fits in it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from _limiting import now
from _loops import run
from corral import Limiter, Rate
from corral._weighted import GateLine, WeightedGate

Cost = Mapping[str, float] | None


class Starts:
    """Callers of one Limiter: each records (name, loop time) when acquire() returns."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        self.log: list[tuple[str, float]] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def _call(self, name: str, cost: Cost) -> None:
        await self.limiter.acquire(cost)
        self.log.append((name, now()))
        self.limiter.release()

    def arrive(self, name: str, cost: Cost = None) -> asyncio.Task[None]:
        task = self.tasks[name] = asyncio.create_task(self._call(name, cost))
        return task

    async def finish(self) -> list[tuple[str, float]]:
        async with asyncio.timeout(60):  # hang guard, not the assertion
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        assert (self.limiter.in_flight, self.limiter.waiting) == (0, 0)
        gate = self.limiter._gate
        assert isinstance(gate, GateLine)
        # Nobody is left as granted, or as moved back in line.
        assert (getattr(gate, "_grantees", {}), getattr(gate, "_moved", {})) == ({}, {})
        return self.log


def approx(expected: list[tuple[str, float]]) -> list[tuple[str, object]]:
    return [(name, pytest.approx(t)) for name, t in expected]


# -- a caller granted just before the pause -----------------------------------------------


@pytest.mark.virtual_time
async def test_a_token_only_rate_sends_a_caller_granted_just_before_a_cooldown_first() -> None:
    """No requests dimension: the pause holds the tokens cell, and the caller the rate let
    through in the instant the cooldown began starts first after it, the next ones at the
    tokens' pace (10 tokens at 100/s: 0.1 s), not two at its end."""
    ten: dict[str, float] = {"tokens": 10}
    limiter = Limiter(rate=Rate({"tokens": 100}))
    loop = asyncio.get_running_loop()
    calls = Starts(limiter)
    for n in range(4):
        calls.arrive(f"c{n}", ten)
    await asyncio.sleep(0)  # c0 started at 0; c1 is due at 0.1
    loop.call_at(0.1 + 1e-12, limiter.cooldown, 1.0)  # just after the gate grants c1
    assert await calls.finish() == approx([("c0", 0.0), ("c1", 1.1), ("c2", 1.2), ("c3", 1.3)])


@pytest.mark.virtual_time
async def test_callers_granted_together_before_a_cooldown_start_after_it_at_the_pace() -> None:
    """A late timer grants two callers at once (burst 2); a cooldown begins before they
    resume. Both go back to the head of the line, in order: after the pause they start
    one interval apart, then the caller behind them, none of them at once."""
    limiter = Limiter(rate=Rate({"requests": 1, "tokens": 1000}, burst=2))
    loop = asyncio.get_running_loop()
    for _ in range(2):
        assert limiter.acquire_nowait()  # the burst at 0
    limiter.release()
    limiter.release()
    calls = Starts(limiter)
    for name in ("a", "b", "c"):
        calls.arrive(name)
    await asyncio.sleep(0)  # all in line for the rate; the next start is due at 1.0
    loop.call_at(0.5, loop.advance, 4.5)  # type: ignore[attr-defined]  # the loop blocked
    loop.call_at(1.0 + 1e-12, limiter.cooldown, 1.0)  # runs right after "a" and "b" are granted
    # The pause ends at 6.0; the burst is spent then, as after any wait at the rate.
    assert await calls.finish() == approx([("a", 6.0), ("b", 7.0), ("c", 8.0)])


@pytest.mark.virtual_time
@pytest.mark.parametrize(
    "rate", [Rate({"requests": 10, "tokens": 1000}), Rate(10)], ids=["weighted", "plain"]
)
async def test_a_short_cooldown_lets_the_caller_sent_back_start_at_its_end(rate: Rate) -> None:
    """Sent back to the head of the line by a 10 ms cooldown, the caller granted at 0.1
    starts when it ends (0.11), not at the slot the gate had set for the caller behind."""
    limiter = Limiter(rate=rate)
    loop = asyncio.get_running_loop()
    calls = Starts(limiter)
    for n in range(3):
        calls.arrive(f"c{n}")
    await asyncio.sleep(0)
    loop.call_at(0.1 + 1e-12, limiter.cooldown, 0.01)
    assert await calls.finish() == approx([("c0", 0.0), ("c1", 0.11), ("c2", 0.21)])


@pytest.mark.virtual_time
async def test_a_caller_sent_back_and_granted_again_then_cancelled_leaves_its_slot() -> None:
    """Sent back by a cooldown, granted again at its end, cancelled before it resumes: no
    later start was made on top, so its slot goes back and the next caller starts then."""
    limiter = Limiter(rate=[Rate(10), Rate(600, per=60)])
    loop = asyncio.get_running_loop()
    calls = Starts(limiter)
    for n in range(4):
        calls.arrive(f"c{n}")
    await asyncio.sleep(0)
    loop.call_at(0.1 + 1e-12, limiter.cooldown, 1.0)
    loop.call_at(1.1 + 1e-12, calls.tasks["c1"].cancel)  # granted again at 1.1, not resumed
    assert await calls.finish() == approx([("c0", 0.0), ("c2", 1.1), ("c3", 1.2)])


# -- a cancelled grant passed on -----------------------------------------------------------


def _late_batch(victim: Cost, third: Cost, *, cancel: bool) -> list[tuple[str, float]]:
    """Burst of 2 at 1/s; the loop blocks from 0.5 s to 5 s, so the gate's 1 s timer, late,
    grants "victim" and "second" at once; "third" waits in line (its slot: 6.0)."""

    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        limiter = Limiter(10, rate=Rate({"requests": 1, "tokens": 1000}, burst=2))
        for _ in range(2):
            assert limiter.acquire_nowait()  # the burst at 0
        calls = Starts(limiter)
        task = calls.arrive("victim", victim) if cancel else None
        calls.arrive("second", victim)
        calls.arrive("third", third)
        await asyncio.sleep(0)
        loop.call_at(0.5, loop.advance, 4.5)  # type: ignore[attr-defined]
        if task is not None:
            loop.call_at(1.0 + 1e-12, task.cancel)  # right after the late timer granted it
        await asyncio.sleep(0.1)
        limiter.release()
        limiter.release()
        return await calls.finish()

    result: list[tuple[str, float]] = run(main, virtual_time=True)
    return result


@pytest.mark.parametrize(
    ("victim", "third"),
    [
        pytest.param(None, None, id="one-request-each"),
        pytest.param({"tokens": 10}, {"tokens": 10}, id="equal-costs"),
        pytest.param({"tokens": 10}, {"tokens": 5}, id="a-smaller-cost"),
    ],
)
def test_a_weighted_grant_cancelled_under_a_later_one_is_passed_on(
    victim: Cost, third: Cost
) -> None:
    """Cancelled once granted, with a later start granted on top: its booking used to
    stay spent (the next caller started an interval late). The next caller in line, whose
    cost fits in it, starts in its place, as if the cancelled caller had never come."""
    expected = [("second", 5.0), ("third", 5.0)]
    assert _late_batch(victim, third, cancel=False) == expected
    assert _late_batch(victim, third, cancel=True) == expected


def test_a_weighted_grant_cancelled_under_a_later_one_is_not_passed_on_to_a_larger_cost() -> None:
    """The next caller needs more tokens than the cancelled one booked: starting in its
    place would go past what was booked, so the booking stays spent and that caller waits
    for its own slot (one start later, never one too many)."""
    assert _late_batch({"tokens": 10}, {"tokens": 50}, cancel=True) == [
        ("second", 5.0),
        ("third", 6.0),
    ]


# -- successive event loops ----------------------------------------------------------------

# Made at import time, outside any event loop, as users do.
_TOKENS_ONLY = Limiter(rate=Rate({"tokens": 100}))
_TWO_WINDOWS = Limiter(2, rate=[Rate(10), Rate(600, per=60)])


@pytest.mark.parametrize(
    "limiter",
    [pytest.param(_TOKENS_ONLY, id="tokens-only"), pytest.param(_TWO_WINDOWS, id="two-windows")],
)
def test_a_cooldown_in_force_when_a_run_ends_does_not_hold_the_next_run(limiter: Limiter) -> None:
    """A cooldown of 100 s in force when asyncio.run ends: the next run's first start comes
    at once (the last run's starts still owe at most one interval), not 100 s later."""
    ten: dict[str, float] = {"tokens": 10}

    async def cut() -> None:
        await limiter.acquire(ten)
        limiter.release()
        limiter.cooldown(100.0)

    async def first_start() -> float:
        async with asyncio.timeout(60):  # hang guard, not the assertion
            await limiter.acquire(ten)
        limiter.release()
        return now()

    for _ in range(2):
        run(cut, virtual_time=True)
        assert run(first_start, virtual_time=True) <= 0.1 + 1e-9


@pytest.mark.virtual_time
async def test_a_caller_given_a_cancelled_grant_settles_its_own_reservation() -> None:
    """The caller a cancelled grant was passed on to settles with its own cost mapping:
    the gate finds that reservation and refunds the unused tokens (here, down to the
    schedule the start booked on top of it keeps), as for any call it let through."""
    limiter = Limiter(10, rate=Rate({"requests": 1, "tokens": 1000}, burst=2))
    gate = limiter._gate
    assert isinstance(gate, WeightedGate)
    loop = asyncio.get_running_loop()
    for _ in range(2):
        assert limiter.acquire_nowait()  # the burst at 0
    booked, smaller = {"tokens": 10}, {"tokens": 5}
    victim = asyncio.create_task(limiter.acquire(booked))
    second = asyncio.create_task(limiter.acquire(booked))
    third = asyncio.create_task(limiter.acquire(smaller))
    await asyncio.sleep(0)
    loop.call_at(0.5, loop.advance, 4.5)  # type: ignore[attr-defined]
    loop.call_at(1.0 + 1e-12, victim.cancel)  # granted at 5.0 with "second", not resumed
    async with asyncio.timeout(60):  # hang guard, not the assertion
        await asyncio.gather(second, third)
    assert victim.cancelled()
    assert now() == pytest.approx(5.0)
    tokens = gate._by_dimension["tokens"][0]
    # The victim's 10 tokens and the second's 10, each 1 ms, from 5.0.
    assert gate._tats[tokens] == pytest.approx(5.02)
    limiter.settle(smaller, {"tokens": 0})
    # Its 5 tokens back: down to 5.015, above what "second" keeps on its own (5.01).
    assert gate._tats[tokens] == pytest.approx(5.015)
    for _ in range(4):
        limiter.release()
