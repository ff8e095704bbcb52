"""Plain rates: values whose schedule overflows a float, and a grant given back after a clamp."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from corral import Rate
from corral._rate import RateGate


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


@pytest.mark.parametrize(
    ("n", "per", "burst", "message"),
    [
        (
            1e-320,
            1.0,
            1,
            "Rate per / n (the seconds between two starts) must be a finite number > 0, "
            "like Rate(20, per=1.0); got n=1e-320, per=1.0: per / n = inf",
        ),
        (
            1e300,
            1e-300,
            1,
            "Rate per / n (the seconds between two starts) must be a finite number > 0, "
            "like Rate(20, per=1.0); got n=1e+300, per=1e-300: per / n = 0.0",
        ),
        (
            1,
            1e308,
            3,
            "Rate (burst - 1) * per / n (the seconds starts may run ahead) must be a finite "
            "number, like Rate(20, per=1.0, burst=5); got n=1, per=1e+308, burst=3: "
            "(burst - 1) * per / n = inf",
        ),
        (
            10,
            1.0,
            10**400,
            "Rate (burst - 1) * per / n (the seconds starts may run ahead) must be a finite "
            f"number, like Rate(20, per=1.0, burst=5); got n=10, per=1.0, burst={10**400!r}: "
            "(burst - 1) * per / n = inf",
        ),
        (
            10**400,
            1.0,
            1,
            f"Rate n must be a finite number > 0, like Rate(20, per=1.0); got n={10**400!r}",
        ),
        (
            {"requests": 1e-320},
            1.0,
            1,
            "Rate per / n['requests'] (the seconds one unit of 'requests' costs) must be a "
            "finite number > 0, like Rate({'requests': 500}, per=60); got "
            "n={'requests': 1e-320}, per=1.0: per / n['requests'] = inf",
        ),
        (
            {"requests": 10, "tokens": 1e300},
            1e-300,
            1,
            "Rate per / n['tokens'] (the seconds one unit of 'tokens' costs) must be a "
            "finite number > 0, like Rate({'requests': 500}, per=60); got "
            "n={'requests': 10, 'tokens': 1e+300}, per=1e-300: per / n['tokens'] = 0.0",
        ),
        (
            {"requests": 1, "tokens": 5},
            1e308,
            3,
            "Rate (burst - 1) * per / n['requests'] (the seconds starts may run ahead) must "
            "be a finite number, like Rate(20, per=1.0, burst=5); got "
            "n={'requests': 1, 'tokens': 5}, per=1e+308, burst=3: "
            "(burst - 1) * per / n['requests'] = inf",
        ),
        (
            {"tokens": 10**400},
            1.0,
            1,
            "Rate dimension 'tokens' must be a finite number > 0 (allowed per `per` "
            f"seconds); got n={{'tokens': {10**400!r}}}",
        ),
    ],
    ids=[
        "interval-inf",
        "interval-0",
        "tolerance-inf",
        "burst-too-large",
        "n-too-large",
        "weighted-interval-inf",
        "weighted-interval-0",
        "weighted-tolerance-inf",
        "dimension-too-large",
    ],
)
def test_a_rate_whose_schedule_overflows_is_refused_naming_the_values(
    n: Any, per: float, burst: int, message: str
) -> None:
    """Each value in range, but the interval or the tolerance is not a usable float."""
    with pytest.raises(ValueError, match=exactly(message)):
        Rate(n, per=per, burst=burst)


def test_the_largest_schedules_that_fit_are_kept() -> None:
    assert Rate(1, per=1e308, burst=2).tolerance == 1e308
    assert Rate(10, burst=10**6).tolerance == pytest.approx(99_999.9)
    assert Rate({"tokens": 5}, per=1e308).interval == 0.0  # no requests: only tokens space starts


@pytest.mark.virtual_time
async def test_a_cancelled_grant_keeps_a_clamp_made_since() -> None:
    """Given back after a header clamp: the clamp stays.

    A is granted its slot at t=0.1 and cancelled before it resumes; in
    between, the server said no request is left for 30 s. Undoing A's slot
    must not undo that too.
    """
    gate = RateGate(Rate(10))
    await gate.wait()  # t=0, the next slot at t=0.1
    task = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)

    def at_the_grant() -> None:  # the iteration of the gate's 0.1 s timer, after it granted A
        gate.clamp("requests", 0.0, 30.0)
        task.cancel()

    asyncio.get_running_loop().call_at(0.1 + 1e-12, at_the_grant)
    with pytest.raises(asyncio.CancelledError):
        await task
    await gate.wait()
    assert _loop_time() >= 30.0


@pytest.mark.virtual_time
async def test_a_cancelled_grant_with_nothing_since_is_given_back() -> None:
    gate = RateGate(Rate(10))
    await gate.wait()
    task = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    asyncio.get_running_loop().call_at(0.1 + 1e-12, task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await task
    await gate.wait()
    assert _loop_time() == pytest.approx(0.1)  # A's slot, not the one after it
