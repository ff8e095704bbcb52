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
    with pytest.raises(ValueError, match=r"cost must return amounts >= 0.*for 'item'$"):
        _checked("cost", {"tokens": 10**400}, "item")
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
