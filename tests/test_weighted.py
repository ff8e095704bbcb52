"""Weighted, multi-dimension rates: GCRA per (dimension, window), reserve then settle."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Coroutine, Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import corral
from _loops import run
from corral import Rate
from corral._rate import RateGate, as_rates, gate_for
from corral._weighted import MAX_AMOUNT, Cell, WeightedGate
from test_rate_edges import _resolution, arrive_and_wait, four_starts, run_from


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


# -- Rate of several dimensions ------------------------------------------------------


def test_a_dict_rate_keeps_its_dimensions_and_a_plain_rate_is_unchanged() -> None:
    """Rate({...}) lists its allowances; Rate(20) stays the requests-only rate it was."""
    rate = Rate({"requests": 500, "input_tokens": 200_000, "output_tokens": 40_000}, per=60)
    assert rate.weighted
    assert rate.limits == {"requests": 500, "input_tokens": 200_000, "output_tokens": 40_000}
    assert rate.interval == pytest.approx(60 / 500)
    assert not Rate(20).weighted
    assert Rate(20).limits == {"requests": 20}
    assert Rate(20).interval == pytest.approx(0.05)
    assert isinstance(gate_for(Rate(20)), RateGate)  # the fast path stays
    assert isinstance(gate_for(rate), WeightedGate)
    # Equal rates hash equal, and the caller's dict is copied.
    source = {"requests": 5.0, "tokens": 100.0}
    copy = Rate(source, per=1)
    source["tokens"] = 1.0
    assert copy == Rate({"tokens": 100, "requests": 5}, per=1)
    assert hash(copy) == hash(Rate({"tokens": 100, "requests": 5}, per=1))
    assert Rate({"tokens": 10}).interval == 0.0  # no requests dimension: no count spacing


@pytest.mark.parametrize(
    ("n", "burst", "error", "message"),
    [
        (
            {},
            1,
            ValueError,
            "a weighted Rate needs at least one dimension, like "
            "Rate({'requests': 500, 'output_tokens': 40_000}, per=60); got n={}",
        ),
        (
            {"tokens": 0},
            1,
            ValueError,
            "Rate dimension 'tokens' must be a finite number > 0 (allowed per `per` "
            "seconds); got n={'tokens': 0}",
        ),
        (
            {"tokens": "5"},
            1,
            TypeError,
            "Rate dimension 'tokens' must be a finite number > 0 (allowed per `per` "
            "seconds); got n={'tokens': '5'}",
        ),
        (
            {"": 5},
            1,
            TypeError,
            "Rate dimensions must be named by non-empty strings like 'requests' or "
            "'output_tokens'; got '' in n={'': 5}",
        ),
        (
            {"tokens": 5},
            3,
            ValueError,
            "Rate burst counts requests: a weighted rate with burst > 1 needs a 'requests' "
            "dimension, like Rate({'requests': 500, 'output_tokens': 40_000}, per=60, "
            "burst=5); got n={'tokens': 5}, burst=3",
        ),
    ],
)
def test_bad_dimensions_are_refused_naming_them(
    n: Any, burst: int, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=exactly(message)):
        Rate(n, per=60, burst=burst)


def test_a_list_of_rates_is_several_windows() -> None:
    minute = Rate({"requests": 500}, per=60)
    day = Rate({"requests": 10_000}, per=86_400)
    assert as_rates([minute, day]) == (minute, day)
    assert as_rates([minute]) == minute
    assert as_rates(["20/s"]) == Rate(20)
    with pytest.raises(ValueError, match=r"got rate=\[\]$"):
        as_rates([])
    with pytest.raises(ValueError, match="rate must look like"):
        corral.Limiter(rate=[minute, "fast"])  # type: ignore[list-item]
    assert corral.Limiter(rate=[minute, day]).rate == (minute, day)


# -- the gate on virtual time ---------------------------------------------------------


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


@pytest.mark.virtual_time
async def test_starts_are_spaced_by_their_cost() -> None:
    """100 tokens at 6,000 tokens/min: one start per second, whatever the request rate."""
    gate = gate_for(Rate({"requests": 600, "tokens": 6_000}, per=60))
    assert isinstance(gate, WeightedGate)
    starts = []
    for _ in range(4):
        await gate.wait({"tokens": 100})
        starts.append(_loop_time())
    assert starts == pytest.approx([0.0, 1.0, 2.0, 3.0])
    # Without a cost, one request and no tokens: only the request rate (0.1 s) applies...
    await gate.wait()
    # ...but it still waits for the tokens already owed.
    assert _loop_time() == pytest.approx(4.0)


@pytest.mark.virtual_time
async def test_a_call_costing_more_than_a_window_still_runs_and_then_delays() -> None:
    """Cost is paid after the start: 12,000 tokens at 6,000/min goes at once, the next in 2 min."""
    gate = gate_for(Rate({"tokens": 6_000}, per=60))
    assert isinstance(gate, WeightedGate)
    await gate.wait({"tokens": 12_000})
    assert _loop_time() == 0.0
    await gate.wait({"tokens": 1})
    assert _loop_time() == pytest.approx(120.0)


@pytest.mark.virtual_time
async def test_settle_refunds_and_carries_debt() -> None:
    """Used less: the next start comes earlier; used more: later, by the difference."""
    gate = gate_for(Rate({"requests": 6_000, "output_tokens": 600}, per=60))  # 0.1 s per token
    assert isinstance(gate, WeightedGate)
    cost = {"output_tokens": 10}
    await gate.wait(cost)  # t=0, booked to t=1
    gate.settle(cost, {"output_tokens": 4})  # refund 6 tokens: booked to t=0.4
    await gate.wait(cost)
    assert _loop_time() == pytest.approx(0.4)  # booked to 1.4
    gate.settle(cost, {"output_tokens": 30})  # debt 20 tokens: booked to 3.4
    await gate.wait(cost)
    assert _loop_time() == pytest.approx(3.4)
    # A dimension the usage does not name keeps its reservation; None keeps all.
    gate.settle(cost, {"input_tokens": 5})
    gate.settle(cost, None)
    await gate.wait(cost)
    assert _loop_time() == pytest.approx(4.4)


@pytest.mark.virtual_time
async def test_a_refund_never_banks_capacity_before_now() -> None:
    """A refund after the schedule has caught up gives nothing: no extra burst later."""
    gate = gate_for(Rate({"tokens": 600}, per=60))  # 0.1 s per token
    assert isinstance(gate, WeightedGate)
    await gate.wait({"tokens": 10})  # booked to t=1
    await asyncio.sleep(5)
    gate.settle({"tokens": 10}, {"tokens": 0})  # refund of 10 tokens, but it is t=5
    await gate.wait({"tokens": 10})
    await gate.wait({"tokens": 10})
    assert _loop_time() == pytest.approx(6.0)  # spaced as usual, not both at t=5


@pytest.mark.virtual_time
async def test_a_refund_is_set_against_a_later_debt_of_a_call_in_flight() -> None:
    """Settling is as if each call had reserved what it used when it started.

    A reserves 30 tokens at t=0 and uses none; B, started at t=1, reserves
    none and uses 20. Had they reserved that, the schedule would stand at
    t=3 (B's 20 tokens from t=1): so it does, although A's refund came at t=2,
    when "now" was already past B's start.
    """
    # 0.1 s a token and a request; 2 s of lead (burst 21).
    gate = gate_for(Rate({"requests": 600, "tokens": 600}, per=60, burst=21))
    assert isinstance(gate, WeightedGate)
    await gate.wait({"tokens": 30})  # A, t=0: booked to t=3
    await asyncio.sleep(1)
    await gate.wait({"tokens": 0})  # B, t=1
    await asyncio.sleep(1)
    gate.settle({"tokens": 30}, {"tokens": 0})  # A's refund, at t=2
    gate.settle({"tokens": 0}, {"tokens": 20})  # B's debt
    starts = []
    for _ in range(4):
        await gate.wait({"tokens": 10})
        starts.append(_loop_time())
    # From t=3 with 2 s of lead: two starts at once, then one a second. Had the
    # refund stopped at t=2, B's debt would count from there: [2, 3, 4, 5].
    assert starts == pytest.approx([2.0, 2.0, 3.0, 4.0])


@pytest.mark.virtual_time
async def test_a_refund_keeps_the_booking_of_a_start_made_after_its_call() -> None:
    """An earlier call's refund does not erase what a later start booked.

    A reserves 30 tokens at t=0 (booked to t=3); B starts at t=1 with 10
    (booked to t=4); A then uses nothing. Had A reserved nothing, B alone
    would have booked t=1 to t=2: so the schedule stands at t=2, not at B's
    start (which would let B's 10 tokens go unpaid).
    """
    gate = gate_for(Rate({"requests": 600, "tokens": 600}, per=60, burst=21))  # 2 s of lead
    assert isinstance(gate, WeightedGate)
    a, b = {"tokens": 30.0}, {"tokens": 10.0}
    await gate.wait(a)
    await asyncio.sleep(1)
    await gate.wait(b)
    gate.settle(a, {"tokens": 0})
    starts = []
    for _ in range(4):
        await gate.wait({"tokens": 10})
        starts.append(_loop_time())
    assert starts == pytest.approx([1.0, 1.0, 2.0, 3.0])


@pytest.mark.virtual_time
async def test_the_latest_starts_own_refund_reaches_back_to_its_start() -> None:
    """B, the latest start, uses nothing of its 10 tokens: the schedule goes back to t=1.

    So does an earlier call's refund once B has settled: B now stands for
    nothing, and A's unused tokens come back down to B's start.
    """
    rate = Rate({"requests": 600, "tokens": 600}, per=60, burst=21)
    for settle_a_too in (False, True):
        gate = gate_for(rate)
        assert isinstance(gate, WeightedGate)
        a, b = {"tokens": 30.0}, {"tokens": 10.0}
        began = _loop_time()
        await gate.wait(a)  # booked to began + 3
        await asyncio.sleep(1)
        await gate.wait(b)  # booked to began + 4
        gate.settle(b, {"tokens": 0})  # booked to began + 3
        if settle_a_too:
            gate.settle(a, {"tokens": 0})  # down to B's start, began + 1
        starts = []
        for _ in range(3):
            await gate.wait({"tokens": 10})
            starts.append(_loop_time() - began)
        expected = [1.0, 1.0, 1.0] if settle_a_too else [1.0, 2.0, 3.0]
        assert starts == pytest.approx(expected)
        await asyncio.sleep(10)


@pytest.mark.virtual_time
@pytest.mark.parametrize("same_mapping", [True, False])
async def test_a_refund_keeps_every_booking_made_after_its_call_within_a_burst(
    same_mapping: bool,
) -> None:
    """With a tolerance, a refund stops at the schedule of all the starts after its call.

    1 s of lead (100 tokens). A books 100 tokens at t=0, B 100 at t=0.5, L 1 at
    t=1 (ahead of the schedule); then A uses nothing. Had A reserved nothing,
    B would have booked t=0.5 to 1.5 and L on top: the schedule stands at
    t=1.51, not at L's own booking (t=1.01, which would let B's tokens go
    unpaid). X, 99 tokens, may start at once; the start after it waits
    until t=1.5 (X's tokens end at 2.5, less the second of lead). A refund
    passing an equal mapping, not A's own, is taken for the earliest call of
    that cost still unsettled: A.
    """
    gate = gate_for(Rate({"requests": 10, "tokens": 100}, per=1.0, burst=11))
    assert isinstance(gate, WeightedGate)
    a = {"tokens": 100.0}
    await gate.wait(a)
    await asyncio.sleep(0.5)
    await gate.wait({"tokens": 100.0})  # B
    await gate.wait({"tokens": 1.0})  # L
    assert _loop_time() == pytest.approx(1.0)
    gate.settle(a if same_mapping else {"tokens": 100.0}, {"tokens": 0.0})
    await gate.wait({"tokens": 99.0})  # X
    assert _loop_time() == pytest.approx(1.0)
    await gate.wait({"tokens": 1.0})
    assert _loop_time() == pytest.approx(1.5)


@pytest.mark.virtual_time
async def test_a_refund_while_idle_gives_no_more_than_the_burst() -> None:
    """100 tokens refunded after 20 idle seconds: still a burst of 3, then the pace."""
    gate = gate_for(Rate({"requests": 600, "tokens": 600}, per=60, burst=3))
    assert isinstance(gate, WeightedGate)
    await gate.wait({"tokens": 100})  # booked to t=10
    await asyncio.sleep(20)
    gate.settle({"tokens": 100}, {"tokens": 0})
    starts = []
    for _ in range(5):
        await gate.wait({"tokens": 1})
        starts.append(_loop_time())
    assert starts == pytest.approx([20.0, 20.0, 20.0, 20.1, 20.2])


@pytest.mark.virtual_time
async def test_several_windows_apply_at_once() -> None:
    """10/s and 12 per minute: a burst of 10 at the second's pace, then the minute's."""
    minute = Rate({"requests": 12}, per=60, burst=12)
    second = Rate({"requests": 10}, per=1)
    gate = gate_for((minute, second))
    assert isinstance(gate, WeightedGate)
    starts = []
    for _ in range(14):
        await gate.wait()
        starts.append(_loop_time())
    assert starts[:12] == pytest.approx([i * 0.1 for i in range(12)])
    # The minute's burst of 12 is spent: from then on one start every 5 s.
    assert starts[12] == pytest.approx(5.0)
    assert starts[13] == pytest.approx(10.0)


@pytest.mark.virtual_time
async def test_waiters_are_served_in_order_and_a_cancelled_one_gives_back_its_place() -> None:
    gate = gate_for(Rate({"tokens": 60}, per=60))  # 1 s per token
    assert isinstance(gate, WeightedGate)
    order: list[tuple[str, float]] = []

    async def caller(name: str, tokens: float) -> None:
        await gate.wait({"tokens": tokens})
        order.append((name, _loop_time()))

    await gate.wait({"tokens": 2})  # booked to t=2
    a = asyncio.create_task(caller("a", 3))
    await asyncio.sleep(0)
    b = asyncio.create_task(caller("b", 5))
    await asyncio.sleep(0)
    c = asyncio.create_task(caller("c", 1))
    await asyncio.sleep(0)
    assert gate.waiting == 3
    b.cancel()
    await asyncio.gather(a, c, return_exceptions=True)
    assert order == [("a", pytest.approx(2.0)), ("c", pytest.approx(5.0))]
    assert gate.waiting == 0


@pytest.mark.virtual_time
async def test_a_cancelled_grant_is_given_back() -> None:
    """Granted but cancelled before it resumed: its reservation is undone."""
    gate = gate_for(Rate({"tokens": 60}, per=60))
    assert isinstance(gate, WeightedGate)
    await gate.wait({"tokens": 1})  # booked to t=1
    task = asyncio.create_task(gate.wait({"tokens": 30}))
    await asyncio.sleep(0)
    # Below the virtual clock's resolution: runs in the iteration of the gate's
    # 1.0 s timer, right after it granted the task, before the task resumes.
    asyncio.get_running_loop().call_at(1.0 + 1e-12, task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await task
    await gate.wait({"tokens": 1})
    assert _loop_time() == pytest.approx(1.0)  # not 31: the 30 tokens were given back


@pytest.mark.virtual_time
@pytest.mark.parametrize("between", ["debt", "clamp"])
async def test_a_cancelled_grant_keeps_what_moved_the_schedule_since(between: str) -> None:
    """Given back after another call's debt or a header clamp: that stays.

    X books 10 tokens at t=0; A is granted at t=0.1 and cancelled before it
    resumes. In between, X settles 990 tokens more (9.9 s of debt), or the
    server says no token is left for 30 s. Undoing A's grant must not undo
    that too.
    """
    gate = gate_for(Rate({"requests": 10, "tokens": 100}, per=1.0))  # 0.01 s per token
    assert isinstance(gate, WeightedGate)
    x = {"tokens": 10.0}
    await gate.wait(x)  # t=0, tokens booked to t=0.1
    task = asyncio.create_task(gate.wait({"tokens": 10.0}))
    await asyncio.sleep(0)

    def at_the_grant() -> None:  # the iteration of the gate's 0.1 s timer, after it granted A
        if between == "debt":
            gate.settle(x, {"tokens": 1000.0})
        else:
            gate.clamp("tokens", 0.0, 30.0)
        task.cancel()

    asyncio.get_running_loop().call_at(0.1 + 1e-12, at_the_grant)
    with pytest.raises(asyncio.CancelledError):
        await task
    await gate.wait({"tokens": 1.0})
    # X's 1000 tokens from t=0 end at t=10; the server's refill, at t=30.
    assert _loop_time() >= (10.0 if between == "debt" else 30.0) - 1e-9


# -- the map: cost= and usage= ---------------------------------------------------------


@pytest.mark.virtual_time
async def test_map_reserves_cost_and_settles_usage() -> None:
    """cost= reserves before each start; usage= settles after: debt delays, refund speeds up."""
    starts: list[float] = []

    async def ask(n: int) -> dict[str, Any]:
        starts.append(_loop_time())
        return {"used": n}

    rate = Rate({"requests": 6_000, "output_tokens": 600}, per=60)  # 0.1 s per token
    await corral.gather(
        ask,
        [30, 30, 5, 10],
        limit=1,
        rate=rate,
        cost=lambda n: {"output_tokens": 10},
        usage=lambda r: {"output_tokens": r["used"]},
    )
    # t=0 (booked 1, then +20 debt: 3), t=3 (booked 4, +2 debt: 6), t=6 (refund: 6.5), t=6.5
    assert starts == pytest.approx([0.0, 3.0, 6.0, 6.5])


@pytest.mark.virtual_time
async def test_a_shared_weighted_limiter_is_shared_by_maps() -> None:
    """Two maps on one Limiter with a token rate: their starts interleave at the shared pace."""
    llm = corral.Limiter(limit=10, rate=Rate({"requests": 6_000, "tokens": 6_000}, per=60))
    starts: list[float] = []

    async def ask(n: int) -> SimpleNamespace:
        starts.append(_loop_time())
        await asyncio.sleep(0.01)
        return SimpleNamespace(usage=SimpleNamespace(prompt_tokens=50, completion_tokens=50))

    await asyncio.gather(
        corral.gather(ask, range(3), limit=llm, cost=lambda n: {"tokens": 100}),
        corral.gather(ask, range(3), limit=llm, cost=lambda n: {"tokens": 100}),
    )
    # 100 tokens at 100 tokens/s: one start per second across both maps; the
    # default usage reader found OpenAI's usage (100 tokens, as reserved).
    assert sorted(starts) == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])


@pytest.mark.virtual_time
async def test_a_metered_map_feeds_a_limiters_adaptive_rate() -> None:
    """cost= on a Limiter(rate="auto"): each success grows its rate, as without cost=."""
    limiter = corral.Limiter(limit=4, rate="auto")
    first = limiter.rate
    assert isinstance(first, Rate)

    async def ask(n: int) -> int:
        return n

    await corral.gather(ask, range(40), limit=limiter, cost=lambda n: {"tokens": 1})
    grown = limiter.rate
    assert isinstance(grown, Rate)
    assert isinstance(first.n, float)
    assert isinstance(grown.n, float)
    assert grown.n > first.n + 10  # slow start: every success adds to the rate


@pytest.mark.virtual_time
async def test_a_failed_attempt_spends_its_reservation_unless_the_error_says() -> None:
    starts: list[float] = []

    class Partial(Exception):
        def __init__(self, usage: dict[str, float] | None) -> None:
            super().__init__(usage)
            self.usage = usage

    async def ask(n: int) -> int:
        starts.append(_loop_time())
        if n == 1:
            raise Partial({"tokens": 0})  # used nothing: the reservation is refunded
        if n == 2:
            raise Partial(None)  # unknown: the reservation stands
        return n

    results = await corral.gather(
        ask,
        [1, 2, 3],
        limit=1,
        rate=Rate({"tokens": 60}, per=60),  # 1 s per token
        cost=lambda n: {"tokens": 5},
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [Partial, Partial, int]
    assert starts == pytest.approx([0.0, 0.0, 5.0])


def test_cost_and_usage_are_checked() -> None:
    async def ask(n: int) -> int:
        return n

    with pytest.raises(TypeError, match=r"got cost=5$"):
        corral.map(ask, [1], cost=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got usage='tokens'$"):
        corral.map(ask, [1], usage="tokens")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not available with processes=N"):
        corral.map(ask, [1], rate=Rate({"tokens": 5}), processes=2)


async def test_a_bad_cost_fails_the_item_naming_it() -> None:
    async def ask(n: int) -> int:
        return n

    with pytest.raises(ValueError, match=r"cost must return amounts >= 0.*for 7$"):
        await corral.gather(ask, [7], rate=Rate({"tokens": 5}), cost=lambda n: {"tokens": -1})
    with pytest.raises(TypeError, match=r"usage must return a dict of amounts"):
        await corral.gather(ask, [7], usage=lambda r: 3)  # type: ignore[arg-type,return-value]


# -- token_usage --------------------------------------------------------------------------


def test_token_usage_reads_openai_and_anthropic_responses() -> None:
    openai = SimpleNamespace(
        usage=SimpleNamespace(
            prompt_tokens=120,
            completion_tokens=30,
            total_tokens=150,
            prompt_tokens_details=SimpleNamespace(cached_tokens=100),
        )
    )
    assert corral.token_usage(openai) == {
        "input_tokens": 120,
        "output_tokens": 30,
        "tokens": 150,
    }
    assert corral.token_usage(openai, cache_reads=False) == {
        "input_tokens": 20,
        "output_tokens": 30,
        "tokens": 50,
    }
    anthropic = SimpleNamespace(
        usage=SimpleNamespace(
            input_tokens=10,
            output_tokens=40,
            cache_creation_input_tokens=5,
            cache_read_input_tokens=1000,
        )
    )
    assert corral.token_usage(anthropic) == {
        "input_tokens": 1015,
        "output_tokens": 40,
        "tokens": 1055,
    }
    assert corral.token_usage(anthropic, cache_reads=False) == {
        "input_tokens": 15,
        "output_tokens": 40,
        "tokens": 55,
    }
    as_json = {"usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    assert corral.token_usage(as_json) == {"input_tokens": 7, "output_tokens": 3, "tokens": 10}
    embeddings = {"usage": {"prompt_tokens": 8, "total_tokens": 8}}
    assert corral.token_usage(embeddings) == {"input_tokens": 8, "output_tokens": 0, "tokens": 8}
    for nothing in (None, 5, "text", {"usage": None}, {"usage": {"x": 1}}, SimpleNamespace()):
        assert corral.token_usage(nothing) is None
    assert corral.token_usage({"usage": {"input_tokens": -1, "output_tokens": True}}) is None


# -- budget= on any dimension -----------------------------------------------------------------


@pytest.mark.virtual_time
async def test_budget_on_output_tokens_stops_the_map_after_handing_out_what_is_done() -> None:
    """A soft cap: calls in flight finish, the overshoot is at most their usage."""
    calls = 0

    async def ask(n: int) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(1)
        return {"usage": {"input_tokens": 5, "output_tokens": 100}}

    got: list[Any] = []
    with pytest.raises(corral.BudgetExhausted, match=r"budget of 1000 output_tokens is spent"):
        async with corral.map(ask, range(100), limit=4, budget={"output_tokens": 1000}) as rs:
            async for r in rs:
                got.append(r)
    assert len(got) == calls
    # 10 calls reach the cap; at most the 4 in flight go beyond it.
    assert 10 <= calls <= 10 + 4
    # A requests budget counts starts alongside.
    with pytest.raises(corral.BudgetExhausted, match=r"budget of 3 requests"):
        await corral.gather(ask, range(10), limit=1, budget={"requests": 3, "output_tokens": 1e9})


# -- property: reserved-then-settled usage within the rate --------------------------------------

_call = st.tuples(
    st.floats(0.0, 5.0),  # arrival
    st.integers(0, 50),  # reserved tokens
    st.integers(0, 80),  # actual tokens
    st.floats(0.0, 3.0),  # duration
)

#: Calls that mostly reserve far more than they use and settle long after
#: their reservation's schedule has passed (so their refunds reach back before
#: "now"), with idle gaps between them and a few debts among them.
_overreserving_call = st.tuples(
    st.floats(0.0, 30.0),  # arrival: idle spells between calls
    st.integers(10, 60),  # reserved tokens
    st.one_of(st.integers(0, 10), st.integers(0, 100)),  # actual: mostly a refund
    st.floats(0.0, 10.0),  # duration: often longer than the reservation's schedule
)

# start time, settle time, reserved, used, start's and settle's places in event order
_Record = tuple[float, float, int, int, int, int]


def _run_calls(calls: list[tuple[float, int, int, float]], rate: Rate) -> list[_Record]:
    """Each call waits for the gate with its reservation, runs, and settles its usage."""
    records: list[_Record] = []
    events = iter(range(10**6))

    async def main() -> None:
        gate = gate_for(rate)
        assert isinstance(gate, WeightedGate)

        async def caller(at: float, reserved: int, used: int, duration: float) -> None:
            await asyncio.sleep(at)
            await gate.wait({"tokens": reserved})
            start, started = _loop_time(), next(events)
            await asyncio.sleep(duration)
            gate.settle({"tokens": reserved}, {"tokens": used})
            records.append((start, _loop_time(), reserved, used, started, next(events)))

        async with asyncio.TaskGroup() as tg:
            for call in calls:
                tg.create_task(caller(*call))

    run(main, virtual_time=True)
    return records


def _assert_within_the_rate_but_for_what_was_in_flight(
    records: list[_Record], rate: Rate, tokens: int
) -> None:
    """Over any window, usage <= allowance + the last start's own amount + what was in flight.

    The allowance of a window [a, b] is (b - a + tolerance) / interval. What
    was in flight: for every call in flight at some moment of the window
    (started by b, settled after a), the difference its settlement made
    (a debt beyond its reservation, or a refund of part of it).
    """
    interval = rate.per / tokens
    starts = sorted(r[0] for r in records)
    for a in starts:
        for b in starts:
            if b < a:
                continue
            window = [r for r in records if a <= r[0] <= b]
            used = sum(r[3] for r in window)
            last = max(window, key=lambda r: r[4])
            first = min(r[4] for r in window)
            # In flight at some start of the window: started by its last start,
            # settled after its first.
            settled = sum(abs(r[3] - r[2]) for r in records if r[4] <= last[4] and r[5] > first)
            allowance = (b - a + rate.tolerance) / interval
            assert used <= allowance + last[3] + settled + 1e-6, (a, b, records)
    # Requests: plain GCRA, whatever the tokens.
    for i, a in enumerate(starts):
        for j in range(i, len(starts)):
            assert j - i + 1 <= (starts[j] - a + rate.tolerance) / rate.interval + 1 + 1e-6


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(
    calls=st.lists(_call, min_size=1, max_size=25),
    tokens=st.sampled_from([60, 600, 3000]),
    burst=st.integers(1, 4),
)
def test_settled_usage_stays_within_the_rate_but_for_what_was_in_flight(
    calls: list[tuple[float, int, int, float]], tokens: int, burst: int
) -> None:
    rate = Rate({"requests": 20, "tokens": tokens}, per=1.0, burst=burst)
    _assert_within_the_rate_but_for_what_was_in_flight(_run_calls(calls, rate), rate, tokens)


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(
    calls=st.lists(_overreserving_call, min_size=1, max_size=25),
    tokens=st.sampled_from([20, 60, 600]),
    burst=st.integers(1, 6),
)
def test_refunds_before_now_stay_within_the_rate_but_for_what_was_in_flight(
    calls: list[tuple[float, int, int, float]], tokens: int, burst: int
) -> None:
    """The same bound when refunds reach back before "now" and debts follow them."""
    rate = Rate({"requests": 20, "tokens": tokens}, per=1.0, burst=burst)
    _assert_within_the_rate_but_for_what_was_in_flight(_run_calls(calls, rate), rate, tokens)


def _ideal_delay(booked: list[list[Any]], rate: Rate, tokens: int, now: float) -> float:
    """When the next start would conform had each call booked ``amount`` at its ``start``."""
    ready = 0.0
    for interval, amount_of in ((rate.interval, lambda amount: 1.0), (1.0 / tokens, float)):
        tat = -math.inf
        for start, _, amount in booked:
            tat = max(tat, start) + amount_of(amount) * interval
        ready = max(ready, tat - rate.tolerance - now)
    return ready


class _BookingGate(WeightedGate):
    """Notes each start the moment the gate books it: [loop time, the cost, amount booked]."""

    def __init__(self, rate: Rate, booked: list[list[Any]]) -> None:
        super().__init__(
            [Cell(d, rate.per / n, rate.tolerance, rate.per) for d, n in rate.limits.items()], rate
        )
        self.booked = booked

    def wait_nowait(self, cost: Mapping[str, float] | None = None) -> bool:
        if not super().wait_nowait(cost):
            return False
        assert cost is not None
        self.booked.append([_loop_time(), cost, cost["tokens"]])
        return True

    def _take(self, now: float, cost: Mapping[str, float] | None) -> None:
        super()._take(now, cost)  # a start granted from the line
        assert cost is not None
        # The gate's times count from its binding to the loop: noted in the loop's time.
        self.booked.append([now + self._origin, cost, cost["tokens"]])


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(
    calls=st.lists(_overreserving_call, min_size=1, max_size=20),
    tokens=st.sampled_from([20, 60, 600]),
    burst=st.integers(1, 6),
)
def test_a_refund_never_leaves_the_gate_stricter_than_reserving_the_usage(
    calls: list[tuple[float, int, int, float]], tokens: int, burst: int
) -> None:
    """Nothing an over-reservation kept back is lost once it is refunded.

    After every settlement, the next start may come no later than if every
    call settled so far had reserved exactly what it used (and every call
    still in flight what it reserved), at the same start times.
    """
    rate = Rate({"requests": 20, "tokens": tokens}, per=1.0, burst=burst)
    booked: list[list[Any]] = []  # in the order the gate booked them

    async def main() -> None:
        gate = _BookingGate(rate, booked)

        async def caller(at: float, reserved: int, used: int, duration: float) -> None:
            used = min(used, reserved)  # refunds only: a debt may cost more than the ideal
            cost = {"tokens": float(reserved)}
            await asyncio.sleep(at)
            await gate.wait(cost)
            await asyncio.sleep(duration)
            gate.settle(cost, {"tokens": used})
            [mine] = [entry for entry in booked if entry[1] is cost]
            mine[2] = used
            now = _loop_time()
            assert gate.delay(now) <= _ideal_delay(booked, rate, tokens, now) + 1e-9

        async with asyncio.TaskGroup() as tg:
            for call in calls:
                tg.create_task(caller(*call))

    run(main, virtual_time=True)


def test_no_loop_needed_to_build_a_weighted_limiter() -> None:
    """Like any Limiter: made at import time, used by successive asyncio.run calls."""
    llm = corral.Limiter(limit=2, rate=Rate({"requests": 600, "tokens": 600}, per=60))

    async def once() -> float:
        await llm.acquire({"tokens": 10})
        llm.settle({"tokens": 10}, {"tokens": 10})
        llm.release()
        return asyncio.get_running_loop().time()

    asyncio.run(once())
    asyncio.run(once())
    assert math.isfinite(asyncio.run(once()))


# -- amounts near the float range -------------------------------------------------------

_HUGE = 1e308  # finite, but two of them overflow a float


@pytest.mark.virtual_time
async def test_an_amount_above_the_bound_is_refused_naming_it() -> None:
    """Past MAX_AMOUNT a sum of amounts (or amount x interval) could overflow to inf."""
    limiter = corral.Limiter(rate=Rate({"requests": 10, "tokens": 10}, per=60.0))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "cost must hold amounts of at most 1e+200 (the rates add them up in floats); "
            "got cost={'tokens': 1e+308}"
        ),
    ):
        await limiter.acquire({"tokens": _HUGE})
    assert limiter.in_flight == 0
    cost = {"tokens": MAX_AMOUNT}  # the bound itself is taken
    await limiter.acquire(cost)
    with pytest.raises(ValueError, match=r"usage must hold amounts of at most 1e\+200"):
        limiter.settle(cost, {"tokens": 2e200})
    limiter.release()
    # Read from a response: a count past the bound keeps the reservation, like any unreadable one.
    response = {"usage": {"input_tokens": 2e200, "output_tokens": 3}}
    assert corral.token_usage(response) == {"output_tokens": 3}


@pytest.mark.virtual_time
async def test_a_cost_above_the_bound_fails_its_item_without_a_call_or_a_retry() -> None:
    calls: list[int] = []

    async def ask(n: int) -> int:
        calls.append(n)
        return n

    results = await corral.gather(
        ask,
        [1, 2],
        limit=1,
        budget={"tokens": 1.5e308},
        cost=lambda n: {"tokens": _HUGE if n == 1 else 5.0},
        usage=lambda r: {"tokens": 0.0},
        retries=corral.Retry(attempts=3, on=Exception),
        return_exceptions=True,
    )
    assert isinstance(results[0], ValueError)
    assert str(results[0]).endswith("got {'tokens': 1e+308} for 1")
    assert results[1] == 2
    assert calls == [2]


@pytest.mark.virtual_time
async def test_the_largest_amounts_on_the_slowest_rate_keep_the_schedule_finite() -> None:
    """One unit per 1e308 s: a booking of MAX_AMOUNT units must not become inf, a refund NaN."""
    rate = Rate({"requests": 1000, "tokens": 1e-300}, per=1e8)
    gate = gate_for(rate)
    assert isinstance(gate, WeightedGate)
    cost = {"tokens": MAX_AMOUNT}
    assert gate.wait_nowait(cost)
    now = _loop_time()
    assert math.isfinite(gate.delay(now))
    assert gate.delay(now) > 1e200  # never, within any run
    gate.settle(cost, {"tokens": MAX_AMOUNT / 2})  # half refunded: still never
    assert math.isfinite(gate.delay(now))
    assert gate.delay(now) > 1e200
    assert not gate.wait_nowait({"tokens": 0.0})  # not a NaN that lets every start through
    gate.settle(cost, {"tokens": 0.0})  # all refunded: back to the request rate
    assert gate.delay(now) == pytest.approx(rate.interval)


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(
    allowance=st.sampled_from([1e-300, 1e-20, 1.0, 1e20, 1e300]),
    per=st.sampled_from([1e-3, 60.0, 1e8]),
    burst=st.integers(1, 3),
    steps=st.lists(
        st.tuples(
            st.floats(0, MAX_AMOUNT),  # cost
            st.floats(0, MAX_AMOUNT),  # usage
            st.sampled_from(["oldest", "newest", "none"]),  # which call in flight settles
            st.floats(0, 1e6),  # seconds before the next step
        ),
        min_size=1,
        max_size=15,
    ),
)
def test_amounts_up_to_the_bound_never_make_the_schedule_inf_or_nan(
    allowance: float, per: float, burst: int, steps: list[tuple[float, float, str, float]]
) -> None:
    rate = Rate({"requests": 10, "tokens": allowance}, per=per, burst=burst)

    async def main() -> None:
        gate = gate_for(rate)
        assert isinstance(gate, WeightedGate)
        in_flight: list[dict[str, float]] = []
        for amount, used, which, pause in steps:
            cost = {"tokens": amount}
            if gate.wait_nowait(cost):
                in_flight.append(cost)
            if in_flight and which != "none":
                gate.settle(in_flight.pop(0 if which == "oldest" else -1), {"tokens": used})
            for tat in gate._tats:
                assert tat == -math.inf or math.isfinite(tat), gate._tats
            assert math.isfinite(gate.delay(_loop_time()))
            await asyncio.sleep(pause)

    run(main, virtual_time=True)


# -- a loop clock far from 0 (see tests/test_rate_edges.py for the plain gate) -----------


@pytest.mark.parametrize("start", [1e9, 1.7e9])  # long uptime; a loop on the wall clock
def test_several_fast_windows_keep_their_pace_on_a_clock_far_from_0(start: float) -> None:
    """1e6/s at 1e9 s: starts stay 1 us apart, not 0.954 us (TAT + 1e-6 at 1e9 adds 0.95e-6)."""

    async def main() -> list[float]:
        gate = gate_for([Rate(1_000_000), Rate(1e9, per=1000)])
        assert isinstance(gate, WeightedGate)
        starts = []
        for _ in range(1001):
            await gate.wait()
            starts.append(_loop_time())
        return starts

    starts = run_from(start, main)
    grid = math.ulp(start)
    assert starts[-1] - starts[0] >= 1000 * 1e-6 - grid
    # Each start is seen at the first clock reading at or after its slot.
    assert starts[-1] - starts[0] <= 1000 * (1e-6 + grid)


@pytest.mark.parametrize(
    ("rate", "cost"),
    [
        ([Rate(100_000_000), Rate(1e12, per=1000)], None),
        (Rate({"requests": 100_000_000, "tokens": 1e12}), {"tokens": 1.0}),
        (Rate({"tokens": 1e8}), {"tokens": 1.0}),
    ],
)
def test_a_rate_finer_than_the_clock_still_admits_one_start_per_instant(
    rate: Any, cost: dict[str, float] | None
) -> None:
    """1e8/s at 1e9 s: TAT + 1e-8 used to be TAT, and every start at one instant conformed."""

    async def main() -> int:
        gate = gate_for(rate)
        assert isinstance(gate, WeightedGate)
        admitted = 0
        while admitted < 10 and gate.wait_nowait(cost):
            admitted += 1
        return admitted

    assert run_from(1e9, main) == 1


def test_tokens_booked_and_refunded_on_a_clock_far_from_0_keep_their_pace() -> None:
    """Reserve 10 tokens, use 5, at 1e8 tokens/s: one start per 50 ns, however far the clock.

    The clock's own grid at 1e9 s (119 ns) spaces the starts no closer than
    that; without the fix the gate at 1e9 s booked nothing and let all through.
    """

    async def main() -> tuple[int, float]:
        gate = gate_for(Rate({"requests": 1e12, "tokens": 1e8}))
        assert isinstance(gate, WeightedGate)
        cost = {"tokens": 10.0}
        admitted = 0
        while admitted < 10 and gate.wait_nowait(cost):
            admitted += 1
        gate.settle(cost, {"tokens": 5.0})  # its own refund: back to its start + 50 ns
        return admitted, gate.delay(_loop_time())

    admitted, delay = run_from(1e9, main)
    assert admitted == 1
    assert delay == pytest.approx(5e-8, rel=1e-6)


def test_a_clamp_on_a_clock_far_from_0_delays_then_keeps_the_pace() -> None:
    """A server's 'nothing left for 1 ms' at 1e9 s: then starts 1 us apart, as at 0."""

    async def main() -> tuple[float, float]:
        gate = gate_for(Rate({"requests": 1_000_000, "tokens": 1e9}))
        assert isinstance(gate, WeightedGate)
        origin = _loop_time()
        assert gate.wait_nowait()
        assert gate.clamp("requests", 0.0, 0.001)
        await gate.wait()
        first = _loop_time() - origin
        for _ in range(1000):
            await gate.wait()
        return first, _loop_time() - origin - first

    first, pace = run_from(1e9, main)
    grid = math.ulp(1e9)
    assert 0.001 - grid <= first <= 0.001 + grid
    assert 1000 * 1e-6 - grid <= pace <= 1000 * (1e-6 + grid)


def test_a_weighted_gate_far_from_0_says_fresh_only_once_nothing_is_owed() -> None:
    """fresh() takes the loop's time: 50 ns of tokens owed at 1e9 s is not fresh, then is."""

    async def main() -> tuple[bool, bool, bool]:
        gate = gate_for(Rate({"requests": 1e12, "tokens": 1e8}))
        assert isinstance(gate, WeightedGate)
        before = gate.fresh(_loop_time())
        assert gate.wait_nowait({"tokens": 5.0})  # 50 ns owed: less than the clock's step
        owed = gate.fresh(_loop_time())
        await asyncio.sleep(math.ulp(1e9))
        return before, owed, gate.fresh(_loop_time())

    assert run_from(1e9, main) == (True, False, True)


@pytest.mark.parametrize(("first", "second"), [(1e9, 0.0), (0.0, 1e9), (5e5, 1.7e9)])
def test_loops_with_unrelated_clocks_in_turn_carry_the_weighted_rate_over(
    first: float, second: float
) -> None:
    """Made at import time, used by one loop then another: no stale TAT, no extra burst.

    What is owed carries over exactly, even 50 ns of tokens: finer than the
    grid of a clock at 1e9 s, where it used to be lost.
    """
    gate = gate_for([Rate(2, burst=2), Rate(40, per=10, burst=4)])
    assert isinstance(gate, WeightedGate)
    tokens = gate_for(Rate({"tokens": 1e8}))
    assert isinstance(tokens, WeightedGate)

    async def book() -> bool:
        assert tokens.wait_nowait({"tokens": 5.0})
        return tokens.fresh(_loop_time())

    async def still_owed() -> tuple[bool, bool]:
        started = tokens.wait_nowait({"tokens": 5.0})  # binds the gate to this loop
        return started, tokens.fresh(_loop_time())

    main = four_starts(gate)

    assert run_from(first, main) == pytest.approx([0.0, 0.0, 0.5, 1.0])
    # The last start (at 1.0) left TAT at 2.0, as if no time passed: the next
    # start is 0.5 s away (TAT - tolerance), as it was on the first loop.
    assert run_from(second, main) == pytest.approx([0.5, 1.0, 1.5, 2.0], abs=1e-6)
    assert gate.waiting == 0
    assert run_from(first, book) is False
    assert run_from(second, still_owed) == (False, False)


def test_a_clamp_long_after_the_last_start_carries_over_only_what_it_asked() -> None:
    """Told to wait 30 s at 100 s, 100 s after the last start: the next loop waits 30 s, not 130."""
    gate = gate_for(Rate({"requests": 1, "tokens": 100}))
    assert isinstance(gate, WeightedGate)

    async def first() -> None:
        assert gate.wait_nowait({"tokens": 1.0})  # at 0
        await asyncio.sleep(100)
        assert gate.clamp("requests", 0.0, 30.0)  # a 429: nothing left for 30 s

    async def second() -> float:
        await gate.wait({"tokens": 1.0})
        return _loop_time()

    run(first, virtual_time=True)
    assert run(second, virtual_time=True) == pytest.approx(30.0)


# -- the burst, exactly ------------------------------------------------------------------


@pytest.mark.parametrize("start", [0.0, 3.3, 1e4, 1e9])
def test_a_weighted_burst_at_one_instant_is_exactly_the_burst(start: float) -> None:
    """After an idle spell, ``burst`` starts at once: not one fewer for a rounded sum.

    Each cell's TAT grows by one rounded booking per start, the tolerance is
    ``(burst - 1) * T`` rounded once: Rate({"requests": 100, "tokens":
    10_000}, burst=7) used to let 6 through at once. So did its tokens cell
    when each start books exactly one request interval of tokens.
    """
    cases = [
        (rate, cost)
        for n in (3, 6, 7, 50, 100, 1000, 12_345.6, 1e6)
        for burst in (1, 2, 3, 7, 11, 12, 100)
        for rate, cost in (
            (Rate({"requests": n, "tokens": 100 * n}, burst=burst), None),
            (Rate({"requests": n, "tokens": 100 * n}, burst=burst), {"tokens": 100.0}),
            ([Rate(n, burst=burst), Rate(n * 1000, per=100, burst=burst)], None),
        )
    ]

    async def main() -> list[tuple[Any, int]]:
        admitted = []
        for rate, cost in cases:
            gate = gate_for(rate)
            assert isinstance(gate, WeightedGate)
            count = 0
            while count <= 200 and gate.wait_nowait(cost):
                count += 1
            admitted.append((rate, count))
        return admitted

    wrong = [
        (rate, count)
        for rate, count in run_from(start, main)
        if count != (rate[0] if isinstance(rate, list) else rate).burst
    ]
    assert wrong == []


def test_a_burst_is_exact_and_a_start_early_by_more_than_rounding_still_waits() -> None:
    """Seven at once, then the eighth waits: 2 millionths of an interval early is no rounding."""

    async def main() -> tuple[int, bool, bool]:
        gate = gate_for(Rate({"requests": 100, "tokens": 10_000}, burst=7))
        assert isinstance(gate, WeightedGate)
        admitted = 0
        while admitted < 10 and gate.wait_nowait():
            admitted += 1
        await asyncio.sleep(0.01 - 2e-8)
        early = gate.wait_nowait()
        await asyncio.sleep(2e-8)
        return admitted, early, gate.wait_nowait()

    assert run_from(0.0, main) == (7, False, True)


@pytest.mark.virtual_time
async def test_a_weighted_limiter_takes_its_whole_burst_without_waiting() -> None:
    limiter = corral.Limiter(rate=Rate({"requests": 100, "tokens": 10_000}, burst=7))
    taken = 0
    while taken <= 7 and limiter.acquire_nowait():
        taken += 1
    assert taken == 7
    for _ in range(taken):
        limiter.release()
    await asyncio.sleep(1.0)  # idle again: a burst of seven starts costing 100 tokens each
    for _ in range(7):
        await limiter.acquire({"tokens": 100.0})
    assert _loop_time() == 1.0
    for _ in range(7):
        limiter.release()


def _weighted_ideal(
    arrivals: list[tuple[float, int]], rate: Rate, starts: list[float], grid: float
) -> None:
    """Each start comes at its GCRA slot over every cell, replayed over the starts before it."""
    cells = [(d, rate.per / amount) for d, amount in rate.limits.items()]
    tats = [-math.inf] * len(cells)
    previous = -math.inf
    for (arrival, tokens), at in zip(arrivals, starts, strict=True):
        due = max(arrival, previous, *(tat - rate.tolerance for tat in tats))
        assert due - grid <= at <= due + grid, (arrival, tokens, at, due)
        booked = {"requests": 1.0, "tokens": float(tokens)}
        tats = [
            max(tat, at) + booked[d] * interval
            for tat, (d, interval) in zip(tats, cells, strict=True)
        ]
        previous = at


@settings(max_examples=100, deadline=None)
@given(
    start=st.sampled_from([0.0, 3e5, 1e9, 1.7e9]),
    n=st.sampled_from([0.5, 3.0, 20.0, 1e4, 2e5, 1e6]),
    burst=st.integers(1, 6),
    calls=st.lists(
        st.tuples(st.floats(0.0, 40.0), st.integers(0, 3)),  # arrival (intervals), tokens
        min_size=1,
        max_size=25,
    ),
)
@example(start=1e9, n=1e6, burst=1, calls=[(0.0, 1)] * 25)  # a line: TAT + T, again and again
@example(start=1.7e9, n=2e5, burst=3, calls=[(0.0, 2)] * 8 + [(5.0, 0)] * 8 + [(30.0, 3)] * 8)
def test_any_arrivals_and_costs_on_any_clock_follow_the_ideal_schedule(
    start: float, n: float, burst: int, calls: list[tuple[float, int]]
) -> None:
    """Arrivals at random times with random token costs, on clocks from 0 to 1.7e9 s.

    Starts come in arrival order, each at its slot over both cells (a token
    costs one request interval), but for the loop clock's own grid: a
    reading is off by up to a step of it, and a start seen a step late books
    the next slot from there (a late start, as GCRA has it).
    """
    rate = Rate({"requests": n, "tokens": n}, burst=burst)
    interval = rate.interval
    timed = sorted((at * interval, tokens) for at, tokens in calls)
    asked: list[tuple[int, float]] = []
    started: list[tuple[int, float]] = []

    async def main() -> None:
        gate = gate_for(rate)
        assert isinstance(gate, WeightedGate)

        def wait(i: int) -> Coroutine[Any, Any, None]:
            return gate.wait({"tokens": float(timed[i][1])})

        # The last start is due within 40 + 75 intervals.
        offsets = [offset for offset, _ in timed]
        await arrive_and_wait(offsets, wait, interval, 200, asked, started)

    run_from(start, main)
    assert [i for i, _ in started] == [i for i, _ in asked]
    grid = 2 * math.ulp(start + 200 * interval) + _resolution(start)
    arrivals = [(arrival, timed[i][1]) for i, arrival in asked]
    starts = [t for _, t in started]
    _weighted_ideal(arrivals, rate, starts, grid)
    for i, first in enumerate(starts):
        for j in range(i + 1, len(starts)):
            assert j - i + 1 <= burst + (starts[j] - first + grid) / interval + 1e-9
