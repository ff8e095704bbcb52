"""Retry budgets: retries stay a share of the successes, per Limiter or per map."""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

import aiohttp
import pytest

import corral
from corral import Retry, RetryBudget, RetryBudgetExhausted
from corral._retry_budget import ERROR, THROTTLE, RetryBudgetState
from corral.lab.server import TargetServer


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


# -- the parameters -----------------------------------------------------------------


def test_on_by_default_tunable_and_off_with_none() -> None:
    assert Retry().budget == RetryBudget(ratio=0.1, floor=10, window=10.0)
    assert Retry(budget=0.25).budget == RetryBudget(ratio=0.25)
    assert Retry(budget=RetryBudget(floor=0)).budget == RetryBudget(floor=0)
    assert Retry(budget=None).budget is None
    with pytest.raises(TypeError, match=r"got budget='lots'$"):
        Retry(budget="lots")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"ratio": -0.1},
            ValueError,
            "RetryBudget(ratio=-0.1): ratio must be a finite number >= 0",
        ),
        ({"floor": True}, TypeError, "RetryBudget(floor=True): floor must be a finite number >= 0"),
        ({"window": 0}, ValueError, "RetryBudget(window=0): window must be a finite number > 0"),
        (
            {"window": float("inf")},
            ValueError,
            "RetryBudget(window=inf): window must be a finite number > 0",
        ),
    ],
)
def test_bad_parameters_are_refused(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=exactly(message)):
        RetryBudget(**kwargs)


# -- the state, on times passed in ------------------------------------------------------


def test_the_floor_then_a_share_of_successes() -> None:
    state = RetryBudgetState(RetryBudget(ratio=0.1, floor=3, window=10.0))
    assert [state.try_retry(ERROR, 0.0) for _ in range(4)] == [True, True, True, False]
    for _ in range(20):
        state.success(1.0)
    # 3 + 0.1 * 20 = 5 allowed, 3 spent: two more.
    assert [state.try_retry(ERROR, 1.0) for _ in range(3)] == [True, True, False]
    assert state.counts(1.0) == (20, 0, 5)


def test_throttle_and_error_retries_are_counted_apart() -> None:
    state = RetryBudgetState(RetryBudget(ratio=0.0, floor=2, window=10.0))
    assert [state.try_retry(THROTTLE, 0.0) for _ in range(3)] == [True, True, False]
    assert [state.try_retry(ERROR, 0.0) for _ in range(3)] == [True, True, False]


def test_the_window_slides() -> None:
    """What happened more than `window` seconds ago no longer counts, slot by slot."""
    state = RetryBudgetState(RetryBudget(ratio=1.0, floor=0, window=10.0))
    state.success(0.0)
    state.success(5.0)
    assert state.allowance(ERROR, 9.9) == 2
    assert state.try_retry(ERROR, 9.9)
    assert state.allowance(ERROR, 9.9) == 1
    assert state.allowance(ERROR, 10.5) == 0  # the success at 0 has left the window
    assert state.allowance(ERROR, 15.5) == -1  # the one at 5 too; the retry at 9.9 not yet
    assert state.allowance(ERROR, 18.5) == -1
    assert state.allowance(ERROR, 19.5) == 0  # slot by slot: the retry at 9.9 is out
    assert state.allowance(ERROR, 25.0) == 0  # all gone
    assert state.counts(1000.0) == (0, 0, 0)


@pytest.mark.parametrize("window", [1e-320, 1e-300, 1e-9])
def test_a_tiny_window_slides_past_any_gap(window: float) -> None:
    """A gap of more slots than a float counts to (1 s over 1e-321 s slots) empties the window."""
    state = RetryBudgetState(RetryBudget(ratio=1.0, floor=0, window=window))
    state.success(0.0)
    assert state.counts(0.0) == (1, 0, 0)
    state.success(1.0)
    assert state.counts(1.0) == (1, 0, 0)
    assert not state.try_retry(ERROR, 2.0)
    assert state.counts(3.0) == (0, 0, 0)


# -- in a map, on virtual time ------------------------------------------------------------


def _flaky(rate: float, seed: int = 1) -> tuple[Any, dict[str, int]]:
    """An async fn failing `rate` of its calls with ConnectionError; counts its attempts."""
    rng = random.Random(seed)
    counts = {"attempts": 0}

    async def call(item: int) -> int:
        counts["attempts"] += 1
        await asyncio.sleep(0.001)
        if rng.random() < rate:
            raise ConnectionError(f"flaky {item}")
        return item

    return call, counts


@pytest.mark.virtual_time
async def test_against_half_failing_calls_attempts_stay_near_the_items() -> None:
    """50% failures, retries=5: attempts <= 1.1 x items + the floor, not 3 x items."""
    items = 2_000
    fn, counts = _flaky(0.5)
    async with corral.map(
        fn, range(items), limit=20, retries=Retry(attempts=6, backoff=0.001), return_exceptions=True
    ) as results:
        out = [r async for r in results]
        stats = results.stats
    assert asyncio.get_running_loop().time() < 10.0  # one window: one floor
    exhausted = [r for r in out if isinstance(r, RetryBudgetExhausted)]
    assert counts["attempts"] <= 1.1 * items + 10
    assert exhausted, "the budget must have refused retries"
    assert all(isinstance(r.error, ConnectionError) for r in exhausted)
    assert all(isinstance(r.__cause__, ConnectionError) for r in exhausted)
    assert stats.failed == sum(isinstance(r, Exception) for r in out)
    assert stats.retried == counts["attempts"] - items


@pytest.mark.virtual_time
async def test_without_a_budget_every_attempt_is_used() -> None:
    items = 500
    fn, counts = _flaky(0.5)
    out = await corral.gather(
        fn,
        range(items),
        retries=Retry(attempts=6, backoff=0.001, budget=None),
        return_exceptions=True,
    )
    assert not any(isinstance(r, RetryBudgetExhausted) for r in out)
    assert counts["attempts"] > 1.6 * items  # about 2x: every failure retried


@pytest.mark.virtual_time
async def test_a_shared_limiter_shares_the_budget_and_separate_maps_do_not() -> None:
    """Every call fails: a map on its own retries `floor` times; two maps on one Limiter, too."""

    async def broken(item: int) -> int:
        raise ConnectionError("down")

    retry = Retry(attempts=3, backoff=0.001, budget=RetryBudget(floor=4))

    async def attempts(limit: Any) -> int:
        async with corral.map(
            broken, range(20), limit=limit, retries=retry, return_exceptions=True
        ) as rs:
            [r async for r in rs]
            return rs.stats.retried

    assert await attempts(5) == 4
    assert await attempts(5) == 4  # a fresh map: a fresh budget
    shared = corral.Limiter(limit=5)
    both = await asyncio.gather(attempts(shared), attempts(shared))
    assert sum(both) == 4
    assert await attempts(corral.Limiter(limit=5)) == 4


class _Status(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@pytest.mark.virtual_time
async def test_429_retries_do_not_starve_error_retries() -> None:
    calls: dict[int, int] = {}

    async def fn(item: int) -> int:
        calls[item] = calls.get(item, 0) + 1
        if calls[item] == 1:
            raise _Status(429 if item < 10 else 502)
        return item

    retry = Retry(attempts=2, backoff=0.001, budget=RetryBudget(ratio=0.0, floor=5))
    out = await corral.gather(fn, range(20), limit=1, retries=retry, return_exceptions=True)
    # 5 of the 429s and 5 of the 502s were retried: each kind its own floor.
    assert [isinstance(r, int) for r in out] == [True] * 5 + [False] * 5 + [True] * 5 + [False] * 5
    assert "retries of throttled (429/503) calls" in str(out[5])
    assert "retries of failed calls" in str(out[15])


# -- over real HTTP -------------------------------------------------------------------------


@pytest.mark.slow
async def test_retry_budget_against_a_server_failing_half_its_calls() -> None:
    """`corral serve` answering 500 to half the calls: attempts <= 1.1 x items + the floor."""
    items = 600
    async with asyncio.timeout(60):
        async with (
            TargetServer(capacity=64, service_ms=2, fail_fraction=0.5, seed=7) as server,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        ):

            async def fetch(url: str) -> Any:
                async with session.get(url) as response:
                    response.raise_for_status()
                    return await response.json()

            urls = [f"{server.url}/item/{i}" for i in range(items)]
            loop = asyncio.get_running_loop()
            began = loop.time()
            out = await corral.gather(
                fetch,
                urls,
                limit=32,
                retries=Retry(attempts=4, backoff=0.001),
                return_exceptions=True,
            )
            elapsed = loop.time() - began
            stats = server.stats()
    attempts = stats.served + stats.failed
    windows = int(elapsed // 10.0) + 1  # the floor is per 10 s window
    assert attempts <= 1.1 * items + 10 * windows
    assert sum(isinstance(r, RetryBudgetExhausted) for r in out) > 0
    assert sum(isinstance(r, dict) for r in out) == stats.served


@pytest.mark.virtual_time
async def test_a_named_wait_of_zero_is_no_invitation() -> None:
    """Retry-After: 0 paces nothing: such retries draw on the budget like any other."""

    async def fn(item: int) -> int:
        raise corral.RetryAfter(0)

    retry = Retry(attempts=3, backoff=0.001, budget=RetryBudget(ratio=0.0, floor=2))
    out = await corral.gather(fn, range(10), limit=1, retries=retry, return_exceptions=True)
    # The floor's 2 retries, then every item fails at its first refusal.
    assert sum(isinstance(r, RetryBudgetExhausted) for r in out) == 9
    assert isinstance(out[0], corral.RetryAfter)


@pytest.mark.virtual_time
async def test_retries_the_server_asked_for_are_not_charged() -> None:
    """A RetryAfter (or a 429 with Retry-After) is retried even with no budget left."""
    calls: dict[int, int] = {}

    async def fn(item: int) -> int:
        calls[item] = calls.get(item, 0) + 1
        if calls[item] == 1:
            raise corral.RetryAfter(0.01) if item < 10 else _Status(429)
        return item

    retry = Retry(attempts=2, backoff=0.001, budget=RetryBudget(ratio=0.0, floor=2))
    out = await corral.gather(fn, range(20), limit=1, retries=retry, return_exceptions=True)
    # Every invited retry went through; of the 429s without a wait, only the floor.
    assert out[:10] == list(range(10))
    assert [isinstance(r, int) for r in out[10:]] == [True] * 2 + [False] * 8
    assert all(isinstance(r, RetryBudgetExhausted) for r in out[12:])
