"""Edge cases of cost= and usage=: unreadable counts, numbers past float range, failing readers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import corral
from corral import Rate
from corral._usage import _checked


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


@pytest.mark.parametrize(
    "bad",
    ["12", float("nan"), -3, float("inf"), 10**400, None],
    ids=["string", "nan", "negative", "inf", "past-float", "absent"],
)
def test_an_unreadable_token_count_keeps_its_reservation_instead_of_reading_as_zero(
    bad: object,
) -> None:
    """A count that is there but unreadable is left out (the reservation stands), not 0."""
    as_json = {"usage": {"input_tokens": bad, "output_tokens": 5}}
    expected: dict[str, float] = {"output_tokens": 5}
    if bad is None:
        # Absent (an SDK's optional field): nothing was reported, so 0.
        expected = {"input_tokens": 0, "output_tokens": 5, "tokens": 5}
    assert corral.token_usage(as_json) == expected
    openai = {"usage": {"prompt_tokens": 7, "completion_tokens": bad}}
    if bad is None:
        assert corral.token_usage(openai) == {"input_tokens": 7, "output_tokens": 0, "tokens": 7}
    else:
        assert corral.token_usage(openai) == {"input_tokens": 7}


def test_an_unreadable_cache_count_keeps_the_input_reservation() -> None:
    """Anthropic's cache counts add to the input: an unreadable one leaves the input unknown."""
    usage = {"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": "many"}
    assert corral.token_usage({"usage": usage}) == {"output_tokens": 4}
    # Not counted anyway when cache reads are left out.
    assert corral.token_usage({"usage": usage}, cache_reads=False) == {
        "input_tokens": 10,
        "output_tokens": 4,
        "tokens": 14,
    }


def test_amounts_past_the_float_range_are_refused_with_a_clear_error() -> None:
    for huge in (10**400, 1e201):
        with pytest.raises(
            ValueError, match=r"cost must return amounts of at most 1e\+200 .*for 'item'$"
        ):
            _checked("cost", {"tokens": huge}, "item")
    with pytest.raises(ValueError, match=r"got amounts=\{'tokens': 1, 'x': 1000"):
        _checked("amounts", {"tokens": 1, "x": 10**400})


@pytest.mark.virtual_time
async def test_a_huge_usage_leaves_the_gate_consistent() -> None:
    """A usage past the float range keeps the reservation; later calls run at the rate."""
    starts: list[float] = []

    async def ask(n: int) -> dict[str, Any]:
        starts.append(_loop_time())
        return {"usage": {"input_tokens": 10**400, "output_tokens": 1}}

    results = await corral.gather(
        ask,
        [1, 2, 3],
        limit=1,
        rate=Rate({"requests": 60, "input_tokens": 60, "output_tokens": 60}, per=60),
        cost=lambda n: {"input_tokens": 2, "output_tokens": 1},
    )
    assert len(results) == 3
    assert starts == pytest.approx([0.0, 2.0, 4.0])  # the input reservation stood


@pytest.mark.virtual_time
async def test_a_usage_function_that_raises_fails_the_item_naming_usage() -> None:
    """The call's own exception type is kept; a note says usage= raised, and for what."""
    calls: list[int] = []

    async def ask(n: int) -> str:
        calls.append(n)
        return f"answer {n}"

    def actual(result: str) -> dict[str, float]:
        raise KeyError("usage")

    results = await corral.gather(
        ask,
        [1],
        rate=Rate({"tokens": 60}, per=60),
        cost=lambda n: {"tokens": 1},
        usage=actual,
        retries=3,
        return_exceptions=True,
    )
    (error,) = results
    assert isinstance(error, KeyError)
    notes = getattr(error, "__notes__", [])
    assert any("usage=" in note and "'answer 1'" in note for note in notes), notes
    assert calls == [1]  # a KeyError is not transient: the paid call is not made again


# -- cost= and usage= failures are final: never retried --------------------------------

_TOKENS = Rate({"requests": 600, "tokens": 60_000}, per=60)


def _retry(budgeted: bool) -> corral.Retry:
    """Retries of any exception: the reader's failure must not be one of them."""
    if budgeted:
        return corral.Retry(attempts=3, on=Exception)  # the default retry budget
    return corral.Retry(attempts=3, on=Exception, budget=None)


def _map_options(path: str, limiter: corral.Limiter) -> dict[str, Any]:
    if path == "limiter":
        return {"limit": limiter}  # metered()'s one-Limiter path
    # The general path: the map's own rate and a budget on top of the Limiter.
    return {"limit": limiter, "rate": _TOKENS, "budget": {"requests": 10, "tokens": 10_000}}


@pytest.mark.virtual_time
@pytest.mark.parametrize("path", ["limiter", "rate-and-budget"])
@pytest.mark.parametrize("budgeted", [False, True], ids=["retry", "retry-budget"])
@pytest.mark.parametrize("return_exceptions", [True, False])
async def test_a_usage_reader_that_raises_fails_the_item_without_calling_again(
    path: str, budgeted: bool, return_exceptions: bool
) -> None:
    """The paid call is made once, whatever Retry(on=) matches; the reader's error stays."""
    calls: list[int] = []
    readings: list[object] = []

    async def ask(n: int) -> dict[str, Any]:
        calls.append(n)
        return {"answer": n}

    def actual(result: dict[str, Any]) -> dict[str, float]:
        readings.append(result)
        raise LookupError("no usage in the response")

    limiter = corral.Limiter(limit=2, rate=_TOKENS)
    options = _map_options(path, limiter)
    run_map = corral.gather(
        ask,
        [7],
        cost=lambda n: {"tokens": 100},
        usage=actual,
        retries=_retry(budgeted),
        return_exceptions=return_exceptions,
        **options,
    )
    if return_exceptions:
        (error,) = await run_map
    else:
        with pytest.raises(LookupError) as raised:
            await run_map
        error = raised.value
    assert calls == [7]
    assert readings == [{"answer": 7}]
    assert limiter.in_flight == 0
    assert type(error) is LookupError
    assert error.args == ("no usage in the response",)
    notes = getattr(error, "__notes__", [])
    assert any(
        f"usage={actual!r}" in note and "{'answer': 7}" in note and "item 7" in note
        for note in notes
    ), notes
    assert error.__context__ is None  # no wrapper left in its chain


@pytest.mark.virtual_time
@pytest.mark.parametrize("budgeted", [False, True], ids=["retry", "retry-budget"])
async def test_a_failed_usage_read_spends_one_request_of_the_budget(budgeted: bool) -> None:
    """Two requests of budget: the failing item spends one, so the next item still runs."""
    calls: list[int] = []

    async def ask(n: int) -> dict[str, Any]:
        calls.append(n)
        return {"answer": n}

    def actual(result: dict[str, Any]) -> dict[str, float]:
        if result["answer"] == 1:
            raise RuntimeError("unexpected response shape")
        return {"tokens": 10}

    limiter = corral.Limiter(limit=1, rate=_TOKENS)
    results = await corral.gather(
        ask,
        [1, 2],
        limit=limiter,
        budget={"requests": 2, "tokens": 10_000},
        cost=lambda n: {"tokens": 100},
        usage=actual,
        retries=_retry(budgeted),
        return_exceptions=True,
    )
    assert isinstance(results[0], RuntimeError)
    assert results[1] == {"answer": 2}
    assert calls == [1, 2]
    assert limiter.in_flight == 0


@pytest.mark.virtual_time
@pytest.mark.parametrize("path", ["limiter", "rate-and-budget"])
@pytest.mark.parametrize("budgeted", [False, True], ids=["retry", "retry-budget"])
@pytest.mark.parametrize(
    "broken",
    ["raises", "bad amounts"],
)
async def test_a_cost_function_that_fails_fails_the_item_without_a_call(
    path: str, budgeted: bool, broken: str
) -> None:
    """A bug in cost= is not retried: no call is made, nothing stays reserved."""
    calls: list[int] = []
    costed: list[int] = []

    async def ask(n: int) -> int:
        calls.append(n)
        return n

    def estimate(n: int) -> dict[str, float]:
        costed.append(n)
        if broken == "raises":
            raise ZeroDivisionError("no estimate")
        return {"tokens": -1}

    limiter = corral.Limiter(limit=2, rate=_TOKENS)
    (error,) = await corral.gather(
        ask,
        [3],
        cost=estimate,
        retries=_retry(budgeted),
        return_exceptions=True,
        **_map_options(path, limiter),
    )
    assert costed == [3]
    assert calls == []
    assert limiter.in_flight == 0
    if broken == "raises":
        assert type(error) is ZeroDivisionError
        notes = getattr(error, "__notes__", [])
        assert any(f"cost={estimate!r}" in note and "item 3" in note for note in notes), notes
    else:
        assert type(error) is ValueError
        assert str(error).endswith("got {'tokens': -1} for 3")


async def test_without_retries_a_failing_usage_reader_raises_its_own_error() -> None:
    """No retry wrapper to unwrap anything: the reader's error comes out as it is."""

    async def ask(n: int) -> int:
        return n

    def actual(result: int) -> dict[str, float]:
        raise KeyError("usage")

    limiter = corral.Limiter(limit=1, rate=_TOKENS)
    (error,) = await corral.gather(
        ask, [5], limit=limiter, usage=actual, retries=0, return_exceptions=True
    )
    assert type(error) is KeyError
    assert any("item 5" in note for note in getattr(error, "__notes__", []))
    assert limiter.in_flight == 0
