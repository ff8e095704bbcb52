"""map/gather/run argument checking: bad input fails at once, naming the argument."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest

import corral


async def ident(item: int) -> int:
    return item


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        (
            0,
            r"^limit must be an int >= 1, None \(unbounded\), 'auto' \(adaptive\), "
            r"a corral\.Adaptive or a corral\.Limiter; got limit=0$",
        ),
        (-3, r"^limit must be an int >= 1, .*; got limit=-3$"),
        ("lots", r"^limit must be .*; got limit='lots'$"),
        ("Auto", r"^limit must be .*; got limit='Auto'$"),
        (True, r"^limit must be .*; got limit=True$"),
        (2.5, r"^limit must be .*; got limit=2\.5$"),
    ],
)
def test_bad_limit_is_refused_at_once(limit: object, message: str) -> None:
    """map() refuses a bad limit when called, before anything runs."""
    with pytest.raises(ValueError, match=message):
        corral.map(ident, range(3), limit=limit)  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", ["auto", corral.Adaptive(initial=2, max=8)])
async def test_adaptive_limit_is_accepted_and_shown_in_stats(limit: object) -> None:
    """limit='auto' and limit=corral.Adaptive(...) run the map; stats show the limit in force."""
    async with corral.map(ident, range(50), limit=limit) as results:  # type: ignore[call-overload]
        assert [r async for r in results] == list(range(50))
        limit_now = results.stats.limit
    assert isinstance(limit_now, int)
    assert limit_now >= 1


@pytest.mark.parametrize("rate", ["fast", -1, 0])
def test_bad_rate_is_refused_at_once(rate: object) -> None:
    """map() refuses a bad rate, naming it."""
    with pytest.raises(ValueError, match=rf"got rate={rate!r}$"):
        corral.map(ident, range(3), rate=rate)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, 0, float("nan"), float("inf"), "1s", True])
def test_bad_timeout_is_refused_at_once(timeout: object) -> None:
    """map() refuses a timeout that is not a positive finite number of seconds."""
    with pytest.raises(
        ValueError,
        match=r"^timeout must be a number of seconds > 0 \(per attempt\), or None; got timeout=",
    ):
        corral.map(ident, range(3), timeout=timeout)  # type: ignore[arg-type]


def test_bad_retries_is_refused_at_once() -> None:
    """map() refuses retries=-1, naming it."""
    with pytest.raises(ValueError, match=r"got retries=-1"):
        corral.map(ident, range(3), retries=-1)


def test_non_callable_fn_is_refused() -> None:
    """A non-callable fn is refused with its value."""
    with pytest.raises(
        TypeError, match=r"^corral\.map\(\) needs a function of one item as fn; got fn=42$"
    ):
        corral.map(42, range(3))  # type: ignore[call-overload]


def test_coroutine_object_fn_is_refused_and_closed() -> None:
    """Passing fetch(x) instead of fetch is explained, and the coroutine closed (no warning)."""
    coro = ident(1)
    with pytest.raises(TypeError, match=r"needs a function, got a coroutine object"):
        corral.map(coro, range(3))  # type: ignore[call-overload]
    assert coro.cr_frame is None  # closed: no "never awaited" warning


def test_non_iterable_items_are_refused() -> None:
    """items=5 is refused at once."""
    with pytest.raises(
        TypeError, match=r"^items must be an iterable or an async iterable; got items=5$"
    ):
        corral.map(ident, 5)  # type: ignore[call-overload]


def test_bad_flags_are_refused() -> None:
    """ordered and return_exceptions must be booleans."""
    with pytest.raises(TypeError, match=r"^ordered must be True or False; got ordered='yes'$"):
        corral.map(ident, range(3), ordered="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got return_exceptions=1$"):
        corral.map(ident, range(3), return_exceptions=1)  # type: ignore[arg-type]


def test_bad_executor_is_refused() -> None:
    """executor must be a known name or an Executor; async fns take none."""
    with pytest.raises(ValueError, match=r"got executor='gpu'$"):
        corral.map(len, ["a"], executor="gpu")
    with pytest.raises(ValueError, match=r"runs plain functions, but fn is async"):
        corral.map(ident, range(3), executor="thread")


async def test_gather_checks_arguments_too() -> None:
    """gather validates like map."""
    with pytest.raises(ValueError, match=r"got limit=0$"):
        await corral.gather(ident, range(3), limit=0)


def test_run_requires_uvloop_when_asked() -> None:
    """run(uvloop=True) without uvloop says how to install it; with it, uses it."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'corral\[uvloop\]'"):
            corral.run(ident, range(3), uvloop=True)
    else:
        seen: list[str] = []

        async def loop_name(item: int) -> int:
            seen.append(type(asyncio.get_running_loop()).__module__)
            return item

        assert corral.run(loop_name, range(3), uvloop=True) == [0, 1, 2]
        assert seen[0].startswith("uvloop")


def test_public_names_are_exported() -> None:
    """__all__ lists exactly the public names, and they say they come from corral."""
    public = {n for n in vars(corral) if not n.startswith("_") and n not in {"annotations"}}
    public -= {name for name, mod in vars(corral).items() if type(mod) is type(sys)}
    assert sorted(public | {"__version__"}) == sorted(corral.__all__)
    assert corral.Limiter.__module__ == "corral"


def test_import_corral_loads_no_third_party_module() -> None:
    """import corral pulls in nothing outside the standard library."""
    import subprocess

    code = (
        "import sys; before = set(sys.modules); import corral; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new - set(sys.stdlib_module_names) - {'corral'}))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_executor_instance_is_used_and_left_open() -> None:
    """A given Executor runs the calls and is not shut down by corral."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert corral.run(str.upper, ["a", "b"], executor=pool) == ["A", "B"]
        assert pool.submit(lambda: 1).result() == 1  # still usable


HUGE = 10**400  # an int, and finite, but no float can hold it


async def _same(item: int) -> int:
    return item


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: corral.map(_same, [1], rate=HUGE), "rate="),
        (lambda: corral.map(_same, [1], timeout=HUGE), "timeout="),
        (lambda: corral.map(_same, [1], deadline=HUGE), "deadline="),
        (lambda: corral.map(_same, [1], budget={"requests": HUGE}), "budget["),
        (lambda: corral.Limiter(rate=HUGE), "rate="),
        (lambda: corral.Retry(backoff=HUGE), "Retry(backoff="),
        (lambda: corral.Retry(max_backoff=HUGE), "Retry(max_backoff="),
        (lambda: corral.Retry(budget=HUGE), "RetryBudget(ratio="),
        (lambda: corral.RetryBudget(window=HUGE), "RetryBudget(window="),
        (lambda: corral.RetryAfter(HUGE), "RetryAfter(seconds="),
        (lambda: corral.Adaptive(max=HUGE), "max="),
    ],
)
def test_an_int_too_large_for_a_float_is_refused_by_name(
    make: Callable[[], object], named: str
) -> None:
    """Not a bare OverflowError from deep inside: the argument and its value."""
    with pytest.raises(ValueError, match=r"\d{300}") as info:
        make()
    assert named in str(info.value)


def test_a_retry_budget_window_too_short_to_slice_is_refused() -> None:
    """Its slots would be 0 s wide: the first retry would divide by zero."""
    with pytest.raises(ValueError, match=r"RetryBudget\(window=5e-324\)"):
        corral.RetryBudget(window=5e-324)


def _numpy() -> Any:
    return pytest.importorskip("numpy")  # the lab's matplotlib brings it


async def test_a_numpy_int_is_taken_where_an_int_is() -> None:
    """As Limiter(limit=) and Rate(burst=) take one: map's own int arguments do too."""
    int64 = _numpy().int64
    assert await corral.gather(
        _same, range(5), limit=int64(2), retries=int64(1), budget={"requests": int64(100)}
    ) == list(range(5))
    retry = corral.Retry(attempts=int64(2))
    assert type(retry.attempts) is int
    assert retry.attempts == 2


@pytest.mark.parametrize(
    "real",
    [
        pytest.param(Fraction, id="Fraction"),
        pytest.param(lambda n: _numpy().float64(n), id="numpy.float64"),
    ],
)
async def test_any_real_number_is_taken_where_a_float_is(real: Callable[[int], Any]) -> None:
    """As Rate(...) and monitor= take one: seconds and budgets take a Fraction too."""
    assert await corral.gather(
        _same, range(5), timeout=real(5), deadline=real(60), budget={"tokens": real(100)}
    ) == list(range(5))
    retry = corral.Retry(backoff=real(1), max_backoff=real(2), max_retry_after=real(5))
    assert (retry.backoff, retry.max_backoff, retry.max_retry_after) == (1.0, 2.0, 5.0)
    assert type(retry.backoff) is float
    budget = corral.RetryBudget(ratio=real(1), floor=real(2), window=real(10))
    assert (budget.ratio, budget.floor, budget.window) == (1.0, 2.0, 10.0)
    assert corral.RetryAfter(real(2)).seconds == 2.0
