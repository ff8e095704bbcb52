"""rate="auto": AIMD with slow start on the start rate, pure math and on virtual time."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

import corral
from corral._auto_rate import (
    DECREASE,
    HOLD,
    INCREASE,
    SLOW_START_GAIN,
    AutoRateGate,
    RateController,
)

# -- the controller, on times passed in ---------------------------------------------


def test_slow_start_grows_by_a_fixed_step_per_success() -> None:
    c = RateController(initial=1.0)
    rates = [c.success() for _ in range(3)]
    assert rates == pytest.approx([1 + SLOW_START_GAIN * k for k in (1, 2, 3)])
    assert c.slow_start


def test_a_throttle_cuts_once_per_event_and_ends_slow_start() -> None:
    c = RateController(initial=10.0)
    assert c.throttle(now=5.0) == pytest.approx(10.0 * DECREASE)
    assert not c.slow_start
    assert c.throttle(now=5.0 + HOLD / 2) == pytest.approx(10.0 * DECREASE)  # same event
    assert c.throttle(now=5.0 + HOLD) == pytest.approx(10.0 * DECREASE**2)  # a new one


def test_a_throttle_on_a_clock_that_restarted_is_a_new_event() -> None:
    """A Limiter used by the next event loop, whose clock starts again from 0, still cuts."""
    c = RateController(initial=10.0)
    c.throttle(now=100.0)  # on the first loop
    assert c.throttle(now=0.5) == pytest.approx(10.0 * DECREASE**2)  # the next loop's clock


def test_additive_increase_regains_the_cut_in_a_bounded_time() -> None:
    """After a cut, `rate` successes per second add INCREASE x the cut level per second."""
    c = RateController(initial=100.0)
    c.throttle(now=0.0)
    assert c.rate == pytest.approx(70.0)
    seconds = 0
    while c.rate < 100.0:
        for _ in range(round(c.rate)):  # about one second of successes at that rate
            c.success()
        seconds += 1
    expected = (1 - DECREASE) / INCREASE  # 6 s
    assert expected - 1 <= seconds <= expected + 1


def test_after_a_pause_slow_start_again_up_to_the_last_level() -> None:
    c = RateController(initial=40.0)
    c.throttle(now=0.0)  # 28
    assert c.after_pause() == pytest.approx(14.0)
    assert c.slow_start
    assert c.ceiling == pytest.approx(28.0)
    while c.slow_start:
        c.success()
    assert c.rate == pytest.approx(28.0)  # slow start stops at the ceiling...
    c.success()
    assert c.rate == pytest.approx(28.0 + INCREASE * 40.0 / 28.0)  # ...then grows additively


def test_bounds_hold() -> None:
    c = RateController(initial=1.0, min=0.5, max=2.0)
    for _ in range(10):
        c.success()
    assert c.rate == 2.0
    for t in range(10):
        c.throttle(now=float(t * 10))
    assert c.rate == 0.5
    c.after_pause()
    assert c.rate == 0.5


@pytest.mark.parametrize(
    "bounds",
    [
        {"initial": 0.0},
        {"initial": 5.0, "max": 2.0},
        {"min": 2.0, "initial": 1.0},
        {"max": math.inf},
        {"initial": True},
    ],
)
def test_bad_bounds_are_refused(bounds: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="an adaptive rate needs 0 < min <= initial <= max"):
        RateController(**bounds)


# -- on virtual time ------------------------------------------------------------------------


def _n(limiter: corral.Limiter) -> float:
    """The starts per second of a Limiter's rate in force."""
    rate = limiter.rate
    assert isinstance(rate, corral.Rate)
    assert isinstance(rate.n, float)
    return rate.n


class Throttled(Exception):
    def __init__(self) -> None:
        super().__init__("429")
        self.status = 429


class HiddenLimit:
    """A service allowing `per_second` starts (GCRA, burst 5) and answering 429 beyond."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second
        self.tolerance = 4 * self.interval
        self.tat = -math.inf
        self.ok: list[float] = []
        self.refused = 0

    async def __call__(self, item: int) -> int:
        now = asyncio.get_running_loop().time()
        if now < self.tat - self.tolerance:
            self.refused += 1
            raise Throttled()
        self.tat = max(self.tat, now) + self.interval
        await asyncio.sleep(0.05)
        self.ok.append(now)
        return item


@pytest.mark.virtual_time
async def test_auto_finds_a_hidden_rate_limit() -> None:
    """Told nothing, rate="auto" reaches >= 80% of a hidden 20/s limit, with few 429s."""
    service = HiddenLimit(per_second=20)
    retry = corral.Retry(attempts=20, backoff=0.05, budget=None)
    results = await corral.gather(service, range(1_500), limit=50, rate="auto", retries=retry)
    assert results == list(range(1_500))
    end = max(service.ok)
    steady = [t for t in service.ok if t >= 10.0]  # after warm-up
    achieved = len(steady) / (end - 10.0)
    assert achieved >= 0.8 * 20
    assert service.refused <= 0.05 * len(service.ok)


@pytest.mark.virtual_time
async def test_a_shared_auto_limiter_reports_its_rate_and_slows_after_a_cooldown() -> None:
    limiter = corral.Limiter(limit=4, rate="auto")
    assert limiter.auto_rate
    assert limiter.rate == corral.Rate(1.0)

    async def ok(item: int) -> int:
        return item

    await corral.gather(ok, range(10), limit=limiter)
    grown = limiter.rate
    assert isinstance(grown, corral.Rate)
    assert isinstance(grown.n, float)
    assert grown.n == pytest.approx(1.0 + 10 * SLOW_START_GAIN)

    async def busy(item: int) -> int:
        raise corral.RetryAfter(2.0)

    with pytest.raises(corral.RetryAfter):
        await corral.gather(busy, [1], limit=limiter)
    cut = grown.n * DECREASE
    assert _n(limiter) == pytest.approx(cut)
    await asyncio.sleep(2.5)  # the cooldown ends: slow start from half the rate
    assert _n(limiter) == pytest.approx(cut / 2)


@pytest.mark.virtual_time
async def test_async_with_an_auto_rate_limiter_learns_from_its_body() -> None:
    limiter = corral.Limiter(rate="auto")
    for _ in range(3):
        async with limiter:
            pass
    assert _n(limiter) == pytest.approx(1 + 3 * SLOW_START_GAIN)
    with pytest.raises(Throttled):
        async with limiter:
            raise Throttled()
    assert _n(limiter) == pytest.approx((1 + 3 * SLOW_START_GAIN) * DECREASE)


def test_auto_rate_is_refused_with_processes() -> None:
    async def ok(item: int) -> int:
        return item

    with pytest.raises(ValueError, match="not available with processes=N"):
        corral.map(ok, [1], rate="auto", processes=2)


def test_the_gate_repr_and_rate() -> None:
    gate = AutoRateGate(RateController(initial=3.0))
    assert gate.rate == corral.Rate(3.0)
    assert repr(gate) == "<corral.AutoRateGate rate=Rate(n=3.0, per=1.0, burst=1) waiting=0>"
