"""Retries and paid-API pacing at their edges: demand-bound rate growth, exception
groups that carry a throttle, ``on=`` predicates that answer with an awaitable, and
rate-limit headers in bytes or in the rarer forms the standards allow."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import httpcore
import pytest

import corral
from corral._auto_rate import (
    DECREASE,
    HEADROOM,
    SLOW_START_GAIN,
    AutoRateGate,
    RateController,
)
from corral._headers import RateHeader, parse_reset, read_rate_limits
from corral._retry import retry_kind
from corral._retry_budget import ERROR, THROTTLE


class Throttled(Exception):
    """An HTTP 429 without Retry-After, as aiohttp's ClientResponseError carries it."""

    def __init__(self) -> None:
        super().__init__("429")
        self.status = 429


def _n(limiter: corral.Limiter) -> float:
    rate = limiter.rate
    assert isinstance(rate, corral.Rate)
    return float(rate.n)


# -- rate="auto" grows only while the rate is what holds the calls back ----------------


@pytest.mark.virtual_time
async def test_auto_rate_does_not_grow_past_what_the_calls_use() -> None:
    """Two slots and 1 s calls start 2 calls/s whatever the rate: 200 successes must not
    raise the rate to 141/s, a level no call ever tested and a 429 burst would then take
    a dozen cuts (one per second) to come down from."""
    limiter = corral.Limiter(limit=2, rate="auto")

    async def slow(item: int) -> int:
        await asyncio.sleep(1.0)
        return item

    assert await corral.gather(slow, range(200), limit=limiter) == list(range(200))
    assert _n(limiter) <= 5 * 2.0  # within a few times the demand: room to follow it


@pytest.mark.virtual_time
async def test_auto_rate_still_grows_while_it_holds_the_calls_back() -> None:
    """Calls that take no time are held back by the rate alone: every success grows it."""
    limiter = corral.Limiter(limit=8, rate="auto")

    async def instant(item: int) -> int:
        return item

    await corral.gather(instant, range(30), limit=limiter)
    assert _n(limiter) == pytest.approx(1.0 + 30 * SLOW_START_GAIN)


@pytest.mark.virtual_time
async def test_a_per_map_auto_rate_does_not_grow_past_what_the_calls_use() -> None:
    """The same for map(rate="auto"): the gate's rate after the run stays near the demand."""
    gates: list[AutoRateGate] = []
    original = AutoRateGate.__init__

    def spy(self: AutoRateGate, controller: RateController | None = None) -> None:
        original(self, controller)
        gates.append(self)

    async def slow(item: int) -> int:
        await asyncio.sleep(1.0)
        return item

    AutoRateGate.__init__ = spy  # type: ignore[method-assign]
    try:
        await corral.gather(slow, range(200), limit=2, rate="auto")
    finally:
        AutoRateGate.__init__ = original  # type: ignore[method-assign]
    assert len(gates) == 1
    assert gates[0].controller.rate <= 5 * 2.0


def test_the_controller_stops_growing_at_a_few_times_the_successes_per_second() -> None:
    """Pure arithmetic on times passed in: one success a second for ten minutes."""
    c = RateController(initial=1.0)
    for second in range(600):
        c.success(float(second))
    assert c.demand == pytest.approx(2.0)  # d + 1 at a steady d per second
    assert c.rate <= HEADROOM * c.demand + SLOW_START_GAIN
    assert c.slow_start  # no throttle: still slow start, only capped
    without_times = RateController(initial=1.0)
    for _ in range(600):
        without_times.success()
    assert without_times.rate == pytest.approx(1.0 + 600 * SLOW_START_GAIN)


def test_a_gate_that_never_granted_a_start_does_not_grow() -> None:
    """No start went through the gate, so no success can say its rate was too low."""
    gate = AutoRateGate(RateController(initial=2.0))
    gate.success()
    assert gate.controller.rate == 2.0


# -- a throttle inside an ExceptionGroup is a throttle ----------------------------------


def test_retry_kind_of_a_group_holding_a_throttle() -> None:
    assert retry_kind(ExceptionGroup("fan-out", [Throttled(), ConnectionError()])) == THROTTLE
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [corral.RetryAfter(1.0)])])
    assert retry_kind(nested) == THROTTLE
    assert retry_kind(ExceptionGroup("fan-out", [ConnectionError(), TimeoutError()])) == ERROR


@pytest.mark.virtual_time
async def test_a_throttle_inside_an_exception_group_cuts_the_auto_rate() -> None:
    """A TaskGroup in the function fails with a group: its 429 must still slow the rate."""
    limiter = corral.Limiter(rate="auto")
    for _ in range(3):
        async with limiter:
            pass
    grown = _n(limiter)

    async def fan_out() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(asyncio.sleep(0))

            async def refused() -> None:
                raise Throttled()

            group.create_task(refused())

    with pytest.raises(ExceptionGroup):
        async with limiter:
            await fan_out()
    assert _n(limiter) == pytest.approx(grown * DECREASE)


@pytest.mark.virtual_time
async def test_a_grouped_throttle_draws_on_the_throttle_allowance() -> None:
    """Retries of grouped 429s are throttles: they must not use up the errors' allowance."""
    budget = corral.RetryBudget(ratio=0.0, floor=2.0, window=1_000.0)
    limiter = corral.Limiter(4)
    calls: dict[int, int] = {}

    async def ask(item: int) -> int:
        calls[item] = calls.get(item, 0) + 1
        if calls[item] == 1:
            raise ExceptionGroup("fan-out", [Throttled()])
        return item

    retry = corral.Retry(attempts=2, backoff=0.0, budget=budget)
    assert await corral.gather(ask, [1, 2], limit=limiter, retries=retry) == [1, 2]
    state = limiter.retry_budget(budget)
    _, throttles, errors = state.counts(asyncio.get_running_loop().time())
    assert (throttles, errors) == (2, 0)


# -- on= answering with an awaitable ----------------------------------------------------


def test_an_on_predicate_returning_a_coroutine_is_an_error_not_a_yes() -> None:
    """``on=lambda exc: check(exc)`` with an async ``check`` returns a coroutine, which is
    true: every failure, bugs included, would be retried, and the coroutine never awaited."""
    made: list[Coroutine[Any, Any, bool]] = []

    async def check(exc: BaseException) -> bool:
        return False

    def on(exc: BaseException) -> Any:
        made.append(check(exc))
        return made[-1]

    retry = corral.Retry(on=on)
    with pytest.raises(TypeError, match=r"on=.*returned a coroutine"):
        retry.next_wait(ValueError("bug"), 1, random.Random(0))
    assert len(made) == 1
    assert made[0].cr_frame is None  # closed: no "never awaited" warning


def test_an_on_predicate_may_answer_with_any_truthy_value() -> None:
    """A non-bool answer (None, a match object, a numpy bool) is read as its truth."""
    assert corral.Retry(on=lambda exc: None).next_wait(OSError(), 1, random.Random(0)) is None
    wait = corral.Retry(on=lambda exc: "yes", jitter=False).next_wait(
        ValueError(), 1, random.Random(0)
    )
    assert wait == pytest.approx(0.1)


# -- provider rate-limit headers in the forms a server or client may give them -----------


def test_rate_limit_headers_as_bytes_are_read_like_retry_after() -> None:
    """A lower-level client hands over bytes; Retry-After is read from them, and so
    must the rate-limit headers be, rather than be skipped without a word."""
    headers = {
        b"X-RateLimit-Remaining-Requests": b"3",
        b"x-ratelimit-reset-requests": bytearray(b"1.5s"),
        "x-ratelimit-limit-requests": b"10",
        b"x-ratelimit-remaining-tokens": 7,  # neither str nor bytes: skipped
        b"\xff\xfe": b"\xff",
    }
    assert read_rate_limits(headers) == [RateHeader("requests", 3.0, 1.5, 10.0)]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2027-01-15t08:00:30z", 30.0),  # RFC 3339 section 5.6 allows lower case
        ("2027-01-15T08:00:30Z", 30.0),
        ("2027-01-15T08:00:30.5+00:00", 30.5),
        ("1\u03bcs", 1e-6),  # Go reads the Greek mu too
        ("1\u00b5s", 1e-6),
        ("6m0s", 360.0),
    ],
)
def test_resets_in_every_form_the_standards_allow(text: str, seconds: float) -> None:
    now = datetime(2027, 1, 15, 8, 0, 0, tzinfo=UTC).timestamp()
    assert parse_reset(text, now=now) == pytest.approx(seconds)


@pytest.mark.virtual_time
async def test_sync_headers_in_bytes_pause_a_limiter_with_nothing_left() -> None:
    limiter = corral.Limiter(2)
    limiter.sync_headers(
        {b"x-ratelimit-remaining-requests": b"0", b"x-ratelimit-reset-requests": b"2s"}
    )
    loop = asyncio.get_running_loop()
    began = loop.time()
    await limiter.acquire()
    limiter.release()
    assert loop.time() - began >= 2.0


# -- rate="auto" and a provider's headers together ----------------------------------------


@pytest.mark.virtual_time
async def test_an_auto_rate_keeps_the_servers_slower_pace_after_a_success() -> None:
    """The server refills one request a second (10 missing, full in 10 s): starts follow
    that pace until its bucket is half full again, even while successes grow the rate."""
    limiter = corral.Limiter(rate=corral.Rate(10.0))  # a plain rate: the reference
    auto = corral.Limiter(rate="auto")
    loop = asyncio.get_running_loop()
    headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "10s",
        "x-ratelimit-limit-requests": "10",
    }
    for each in (limiter, auto):
        for _ in range(12):  # grow the auto rate to 1 + 12 * 0.7 = 9.4/s
            async with each:
                pass
        each.sync_headers(headers)
        starts = []
        for _ in range(4):
            async with each:
                starts.append(loop.time())
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert min(gaps) == pytest.approx(1.0), each


async def test_raw_headers_from_a_real_response_pause_the_limiter() -> None:
    """httpcore (under httpx) gives a response's headers as bytes pairs: a dict of them
    is what a user hands over. Served on loopback by aiohttp."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            status=429,
            headers={
                "X-RateLimit-Remaining-Requests": "0",
                "X-RateLimit-Reset-Requests": "1m0s",
                "Retry-After": "60",
            },
        )

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with httpcore.AsyncConnectionPool() as pool:
            response = await pool.request("GET", f"http://127.0.0.1:{port}/")
        headers = dict(response.headers)
        assert all(isinstance(key, bytes) for key in headers)
        assert read_rate_limits(headers) == [RateHeader("requests", 0.0, 60.0, None)]

        limiter = corral.Limiter(2)
        limiter.sync_headers(headers)
        waiting = asyncio.ensure_future(limiter.acquire())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not waiting.done()  # paused for the server's minute
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        await runner.cleanup()


# -- stopping during a backoff --------------------------------------------------------------


@pytest.mark.virtual_time
async def test_cancelling_a_map_during_a_backoff_ends_it_at_once_and_frees_the_slot() -> None:
    """An item asleep before its retry holds no slot, and a cancel does not wait for it."""
    loop = asyncio.get_running_loop()
    shared = corral.Limiter(limit=1)
    failed = asyncio.Event()

    async def flaky(item: int) -> int:
        if item == 0:
            failed.set()
            raise ConnectionResetError("transient")
        return item

    retry = corral.Retry(attempts=2, backoff=100.0, max_backoff=100.0, jitter=False)
    async with corral.map(flaky, [0], limit=shared, retries=retry) as results:
        await failed.wait()
        async with shared:  # the slot is free while item 0 waits its 100 s
            pass
        began = loop.time()
        results.cancel()
        assert [r async for r in results] == []
    assert loop.time() - began < 1.0
    assert shared.in_flight == 0
    assert asyncio.all_tasks() == {asyncio.current_task()}
