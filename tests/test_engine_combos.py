"""Features combined: each is tested alone elsewhere; these check how they meet."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import corral
from _loops import run


def no_tasks_but_current() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


# -- a spent budget and the items waiting at the gates ---------------------------


async def ident(item: int) -> int:
    return item


RATES: dict[str, Any] = {
    "plain": "1/s",
    "weighted": corral.Rate({"requests": 1}, per=1),
}


@pytest.mark.virtual_time
@pytest.mark.parametrize("kind", sorted(RATES))
async def test_a_spent_budget_turns_away_the_items_waiting_for_the_rate(kind: str) -> None:
    """limit=10 at 1/s: ten workers wait for their turn. The budget of two is
    spent by the start at 1 s; the eight others are refused then, not one by
    one as their turns come (which ended the map at 10 s)."""
    loop = asyncio.get_running_loop()
    with pytest.raises(corral.BudgetExhausted, match="budget of 2 requests is spent"):
        async with corral.map(
            ident, range(100), limit=10, rate=RATES[kind], budget={"requests": 2}
        ) as results:
            async for _ in results:
                pass
    assert loop.time() == 1.0
    stats = results.stats
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (2, 2, 0, 0)
    assert no_tasks_but_current()


@pytest.mark.virtual_time
@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
async def test_a_spent_budget_leaves_a_shared_limiters_rate_to_its_other_users(
    keyed: bool, weighted: bool
) -> None:
    """A map whose budget is spent takes no more of the shared rate: another
    map on the same Limiter starts its calls at once, and the Limiter ends
    with no slot taken and nobody in line."""
    loop = asyncio.get_running_loop()
    rate = corral.Rate({"requests": 1}, per=1) if weighted else "1/s"
    key = (lambda item: "one") if keyed else None
    api = corral.Limiter(limit=10, rate=rate, key=key)
    with pytest.raises(corral.BudgetExhausted):
        await corral.gather(ident, range(100), limit=api, budget={"requests": 2})
    assert loop.time() == 1.0
    assert (api.in_flight, api.waiting) == (0, 0)
    began = loop.time()
    assert await corral.gather(ident, range(3), limit=api) == [0, 1, 2]
    assert loop.time() - began == 3.0  # its own three turns, none lost to the first map
    assert (api.in_flight, api.waiting) == (0, 0)
    assert no_tasks_but_current()


@pytest.mark.virtual_time
@pytest.mark.parametrize("shared", [False, True])
async def test_a_retry_in_line_when_the_budget_is_spent_is_refused_and_counts_as_started(
    shared: bool,
) -> None:
    """At 1/s, item 0 fails at 0 s and its retry queues for the turn at 2 s,
    behind item 1's at 1 s, which spends the budget: the retry is refused at
    1 s, and item 0, which did start, counts as started."""
    loop = asyncio.get_running_loop()
    calls: list[int] = []

    async def fn(item: int) -> int:
        calls.append(item)
        if item == 0:
            raise ConnectionError("down")
        return item

    options: dict[str, Any] = (
        {"limit": corral.Limiter(limit=2, rate="1/s")}
        if shared
        else {"limit": "auto", "rate": "1/s"}
    )
    retry = corral.Retry(attempts=3, backoff=0.5, jitter=False)
    got: list[int] = []
    with pytest.raises(corral.BudgetExhausted):
        async with corral.map(
            fn, range(2), ordered=False, retries=retry, budget={"requests": 2}, **options
        ) as results:
            async for value in results:
                got.append(value)
    assert (calls, got, loop.time()) == ([0, 1], [1], 1.0)
    stats = results.stats
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (2, 1, 0, 0)
    assert stats.retried == 1
    assert no_tasks_but_current()


# -- a deadline after a budget was spent ------------------------------------------


async def slow(item: int) -> int:
    await asyncio.sleep(1000)
    return item


@pytest.mark.virtual_time
@pytest.mark.parametrize("return_exceptions", [False, True])
async def test_the_deadline_still_cuts_the_calls_a_spent_budget_let_run_on(
    return_exceptions: bool,
) -> None:
    """Item 0 starts and spends the budget; item 1 is refused, so the map
    stops starting calls and lets item 0 run on. The deadline at 5 s still
    cuts it short (in its place with return_exceptions), rather than the map
    waiting 1000 s for its end; the run ends with the budget's reason."""
    loop = asyncio.get_running_loop()
    got: list[object] = []
    with pytest.raises(corral.BudgetExhausted):
        async with corral.map(
            slow,
            range(3),
            limit=2,
            deadline=5,
            budget={"requests": 1},
            return_exceptions=return_exceptions,
        ) as results:
            async for value in results:
                got.append(value)
    assert loop.time() == 5.0
    if return_exceptions:
        assert len(got) == 1
        assert isinstance(got[0], corral.DeadlineExceeded)
        assert "while item 0 ran" in str(got[0])
    else:
        assert got == []
    stats = results.stats
    assert (stats.started, stats.completed, stats.in_flight) == (1, 0, 0)
    assert stats.failed == (1 if return_exceptions else 0)
    assert no_tasks_but_current()


@pytest.mark.virtual_time
async def test_cancel_after_a_spent_budget_cancels_the_calls_it_let_run_on() -> None:
    """results.cancel() cancels the calls in flight, also once a budget has
    stopped the starts: the map ends at 5 s, not when item 0 would end."""
    loop = asyncio.get_running_loop()

    async def cancel_later(results: corral.ResultStream[int]) -> None:
        await asyncio.sleep(5)
        results.cancel()

    with pytest.raises(corral.BudgetExhausted):
        async with corral.map(slow, range(3), limit=2, budget={"requests": 1}) as results:
            canceller = asyncio.create_task(cancel_later(results))
            async for _ in results:
                pass
    await canceller
    assert loop.time() == 5.0
    stats = results.stats
    assert (stats.started, stats.completed, stats.failed, stats.in_flight) == (1, 0, 0, 0)
    assert no_tasks_but_current()


# -- a retry predicate that fails --------------------------------------------------


@pytest.mark.virtual_time
@pytest.mark.parametrize("return_exceptions", [False, True])
@pytest.mark.parametrize("budgeted", [False, True])
async def test_a_failing_on_predicate_is_named_with_the_item_and_the_error_it_judged(
    return_exceptions: bool, budgeted: bool
) -> None:
    """Its error takes the item's place (as documented) with a note saying it
    came from ``on=``, judging which error of which item: bare, it read as
    the call's own."""

    async def fn(item: int) -> int:
        if item == 1:
            raise ConnectionError("reset")
        return item

    def on(exc: BaseException) -> bool:
        raise LookupError("a bug in the predicate")

    retry = corral.Retry(attempts=3, on=on, budget=corral.RetryBudget() if budgeted else None)
    if return_exceptions:
        got = await corral.gather(fn, range(3), retries=retry, return_exceptions=True)
        assert (got[0], got[2]) == (0, 2)
        error = got[1]
    else:
        with pytest.raises(LookupError) as caught:
            await corral.gather(fn, range(3), retries=retry)
        error = caught.value
    assert isinstance(error, LookupError)
    assert error.__notes__ == [
        f"raised by the retries' on={on!r} judging ConnectionError('reset') for item 1"
    ]
    assert isinstance(error.__context__, ConnectionError)


# -- every feature at once, in virtual time -----------------------------------------


class Fatal(Exception):
    """A final failure (not retried by default); carries its item."""

    def __init__(self, item: int) -> None:
        super().__init__(item)
        self.item = item


class Flaky(ConnectionResetError):
    """A transient failure of an item's first attempt; carries its item."""

    def __init__(self, item: int) -> None:
        super().__init__(item)
        self.item = item


class InputBroke(Exception):
    """What the input raises halfway through."""


#: What the run may raise (besides nothing).
ENDINGS = (
    Fatal,
    Flaky,
    TimeoutError,
    InputBroke,
    corral.DeadlineExceeded,
    corral.BudgetExhausted,
    corral.RetryBudgetExhausted,
)


@dataclass(frozen=True)
class Plan:
    items: tuple[tuple[int, str, float], ...]  # (index, behaviour, seconds before it)
    ordered: bool
    return_exceptions: bool
    retries: str
    timeout: float | None
    limit: str
    rate: str | None
    deadline: float | None
    budget: int | None
    source: str
    consumer: str
    stop_at: int
    twin: bool  # a second map shares the Limiter meanwhile


plans = st.builds(
    Plan,
    items=st.integers(0, 9).flatmap(
        lambda n: st.tuples(
            *(
                st.tuples(
                    st.just(i),
                    st.sampled_from(["ok", "ok", "ok", "flaky", "fatal", "hang"]),
                    st.sampled_from([0.0, 0.25, 1.0, 3.0]),
                )
                for i in range(n)
            )
        )
    ),
    ordered=st.booleans(),
    return_exceptions=st.booleans(),
    retries=st.sampled_from(["none", "int", "retry", "retry-budget"]),
    timeout=st.sampled_from([None, 2.0]),
    limit=st.sampled_from(["1", "3", "none", "auto", "limiter", "keyed", "adaptive"]),
    rate=st.sampled_from([None, "4/s"]),
    deadline=st.sampled_from([None, 2.5, 7.0]),
    budget=st.sampled_from([None, 3, 100]),
    source=st.sampled_from(["list", "async", "async-raises"]),
    consumer=st.sampled_from(["all", "break", "cancel", "cancel-elsewhere", "gather"]),
    stop_at=st.integers(0, 5),
    twin=st.booleans(),
)


def owner(result: object) -> int | None:
    """The item a result belongs to, if it says (a value, a Fatal, a Flaky)."""
    if isinstance(result, Fatal | Flaky):
        return result.item
    return result if isinstance(result, int) else None


async def run_plan(plan: Plan) -> None:
    attempts: dict[int, int] = {}
    running = peak = 0

    async def fn(item: tuple[int, str, float]) -> int:
        nonlocal running, peak
        i, behaviour, seconds = item
        attempts[i] = attempts.get(i, 0) + 1
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(seconds)
            if behaviour == "flaky" and attempts[i] == 1:
                raise Flaky(i)
            if behaviour == "fatal":
                raise Fatal(i)
            if behaviour == "hang":
                await asyncio.sleep(50)
            return i
        finally:
            running -= 1

    limiter: corral.Limiter | None = None
    cap: int | None = {"1": 1, "3": 3, "limiter": 2, "keyed": 2}.get(plan.limit)
    limit: Any = cap
    if plan.limit == "none":
        limit = None
    elif plan.limit == "auto":
        limit = "auto"
    elif plan.limit == "limiter":
        limit = limiter = corral.Limiter(limit=2)
    elif plan.limit == "keyed":  # one call at a time per key, two keys
        limit = limiter = corral.Limiter(limit=1, key=lambda item: item[0] % 2)
    elif plan.limit == "adaptive":
        limit = limiter = corral.Limiter(limit=corral.Adaptive(initial=2, min=1, max=4))
    retries: Any = {
        "none": 0,
        "int": 2,
        "retry": corral.Retry(attempts=3, backoff=0.5, jitter=False),
        "retry-budget": corral.Retry(
            attempts=3,
            backoff=0.5,
            on=(Flaky, TimeoutError),
            budget=corral.RetryBudget(floor=1, ratio=0.0, window=10),
        ),
    }[plan.retries]

    async def async_items() -> AsyncIterator[tuple[int, str, float]]:
        for position, item in enumerate(plan.items):
            if plan.source == "async-raises" and position == len(plan.items) // 2:
                raise InputBroke("halfway")
            await asyncio.sleep(0)
            yield item

    items: Any = list(plan.items) if plan.source == "list" else async_items()
    options: dict[str, Any] = {
        "limit": limit,
        "ordered": plan.ordered,
        "return_exceptions": plan.return_exceptions,
        "retries": retries,
        "timeout": plan.timeout,
        "rate": plan.rate,
        "deadline": plan.deadline,
        "budget": None if plan.budget is None else {"requests": plan.budget},
    }
    twin_items = [(100 + k, "ok", 1.0) for k in range(4)]
    twin = (
        asyncio.create_task(corral.gather(fn, twin_items, limit=limiter))
        if plan.twin and limiter is not None
        else None
    )
    got: list[Any] = []
    raised: BaseException | None = None
    stopped = False  # the consumer left or cancelled early
    stats: corral.Stats | None = None
    canceller: asyncio.Task[None] | None = None
    async with asyncio.timeout(10_000):  # a hang guard (virtual time), not the assertion
        try:
            if plan.consumer == "gather":
                got = await corral.gather(fn, items, **options)
            else:
                async with corral.map(fn, items, **options) as results:
                    if plan.consumer == "cancel-elsewhere":
                        stopped = True

                        async def cancel_later() -> None:
                            await asyncio.sleep(plan.stop_at * 0.7)
                            results.cancel()

                        canceller = asyncio.create_task(cancel_later())
                    async for value in results:
                        got.append(value)
                        if len(got) == plan.stop_at and plan.consumer in ("break", "cancel"):
                            stopped = True
                            if plan.consumer == "break":
                                break
                            results.cancel()
        except ENDINGS as exc:
            raised = exc
        if plan.consumer != "gather":
            stats = results.stats
        if canceller is not None:
            await canceller
        if twin is not None:
            assert await twin == [100, 101, 102, 103]

    # Structured: nothing left running, every slot given back.
    assert asyncio.all_tasks() == {asyncio.current_task()}
    if limiter is not None:
        assert (limiter.in_flight, limiter.waiting) == (0, 0)
    if cap is not None:
        assert peak <= cap  # across both maps when they share a Limiter
    # Exactly once, in order when asked.
    owners = [owner(value) for value in got]
    known = [i for i in owners if i is not None]
    assert len(known) == len(set(known)), got
    if plan.ordered or plan.consumer == "gather":
        assert known == sorted(known), got
    if not plan.return_exceptions:
        assert not any(isinstance(value, BaseException) for value in got), got
    complete = raised is None and not stopped
    if complete and plan.budget is None:
        assert len(got) == len(plan.items), got
        if not plan.return_exceptions:
            assert known == list(range(len(plan.items))) or not plan.ordered
            assert sorted(known) == list(range(len(plan.items)))
    # Stats add up once the run is over.
    if stats is not None:
        assert stats.in_flight == 0, stats
        assert stats.completed + stats.failed <= stats.started, stats
        if complete:
            succeeded = sum(1 for value in got if not isinstance(value, BaseException))
            assert stats.completed == succeeded, (stats, got)
            if plan.deadline is None:
                assert stats.failed == len(got) - succeeded, (stats, got)
            if plan.deadline is None and plan.budget is None:
                assert stats.started == len(plan.items), stats
                made = sum(n for i, n in attempts.items() if i < 100)
                assert stats.retried == made - len([i for i in attempts if i < 100]), stats
    # A Limiter the map used serves the next map at its full limit.
    if limiter is not None and limiter.key is None and limiter.adaptive is None:
        peak = 0
        await corral.gather(fn, [(200 + k, "ok", 1.0) for k in range(4)], limit=limiter)
        assert peak == 2


@settings(max_examples=60, deadline=None, derandomize=True)
@given(plans)
def test_every_feature_at_once_keeps_the_guarantees(plan: Plan) -> None:
    """Exactly once, order, stats, no orphan task and every Limiter slot given
    back, whatever the mix of order, errors, retries, timeout, limit, rate,
    deadline, budget, input and way of consuming."""
    run(lambda: run_plan(plan), virtual_time=True)
    gc.collect()


@pytest.mark.skipif(sys.version_info < (3, 12), reason="the eager task factory is 3.12+")
@settings(max_examples=30, deadline=None, derandomize=True)
@given(plans)
def test_every_feature_at_once_under_the_eager_task_factory(plan: Plan) -> None:
    async def main() -> None:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
        await run_plan(plan)

    run(main, virtual_time=True)
