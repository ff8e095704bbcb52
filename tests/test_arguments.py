"""Callables of the wrong arity, and numbers a float cannot hold, refused at once by name."""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

import corral
from corral import Rate, Retry
from corral._numbers import check_arity, check_finite, positive_seconds, to_float


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


async def ident(item: int) -> int:
    return item


def no_argument() -> dict[str, float]:
    return {"tokens": 1}


def two_arguments(item: Any, other: Any) -> dict[str, float]:
    return {"tokens": 1}


def keyword_needed(item: Any, *, scale: float) -> dict[str, float]:
    return {"tokens": scale}


def only_keywords(**amounts: float) -> dict[str, float]:
    return dict(amounts)


TOKENS = Rate({"requests": 1000, "tokens": 1000}, per=1)


# -- cost= and usage= ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        (lambda: {"tokens": 1}, "<lambda> takes no argument"),
        (no_argument, "no_argument takes no argument"),
        (two_arguments, "two_arguments needs 2 arguments (item, other)"),
        (keyword_needed, "keyword_needed also needs the keyword argument 'scale'"),
        (only_keywords, "only_keywords takes no positional argument"),
        (functools.partial(two_arguments), "it needs 2 arguments (item, other)"),
    ],
)
@pytest.mark.parametrize(("name", "given"), [("cost", "the item"), ("usage", "the result")])
def test_a_cost_or_usage_of_the_wrong_arity_is_refused_at_once(
    name: str, given: str, fn: Callable[..., Any], why: str
) -> None:
    """map() refuses it when called, naming the argument and the callable, before any call."""
    with pytest.raises(
        TypeError, match=exactly(f"{name}= is called with {given}, but {why}; got {name}={fn!r}")
    ):
        corral.map(ident, range(3), rate=TOKENS, **{name: fn})


async def test_gather_refuses_a_cost_of_the_wrong_arity_before_any_call() -> None:
    """No item is called: the error comes from gather() itself, not from the first item."""
    calls: list[int] = []

    async def record(item: int) -> int:
        calls.append(item)
        return item

    with pytest.raises(TypeError, match=r"^cost= is called with the item, but <lambda> takes"):
        await corral.gather(record, range(3), cost=lambda: {"tokens": 1})
    assert calls == []


class Estimate(dict[str, float]):
    """A class used as cost=: Estimate(item) is the dict of amounts."""

    def __init__(self, item: int) -> None:
        super().__init__(tokens=float(item))


class Meter:
    """Bound methods and callable objects."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def cost(self, item: int) -> dict[str, float]:
        self.seen.append(item)
        return {"tokens": float(item)}

    def __call__(self, result: Any) -> dict[str, float]:
        self.seen.append(result)
        return {"tokens": 1.0}


def scaled(item: int, scale: float = 1.0, *, floor: float = 0.0) -> dict[str, float]:
    return {"tokens": max(floor, item * scale)}


def supplies_an_argument(fn: Callable[..., dict[str, float]]) -> Callable[[Any], Any]:
    """A decorator that passes one argument itself, keeping fn's metadata."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> dict[str, float]:
        return fn(2.0, *args)

    return wrapper


@supplies_an_argument
def weighted(scale: float, item: int) -> dict[str, float]:
    return {"tokens": scale * item}


def callable_costs() -> list[Callable[[Any], Any]]:
    meter = Meter()
    return [
        lambda item: {"tokens": float(item)},
        lambda *args: {"tokens": 1.0},
        scaled,
        functools.partial(scaled, scale=2.0),
        functools.partial(two_arguments, "fixed"),
        meter.cost,
        meter,
        dict,  # a C class inspect cannot read: accepted as before
        functools.cache(lambda item: {"tokens": 1.0}),  # a C wrapper, not inspectable
        weighted,  # wrapper's own signature (*args), not the wrapped (scale, item)
    ]


@pytest.mark.parametrize("cost", callable_costs())
async def test_a_cost_that_takes_the_item_is_accepted(cost: Callable[[Any], Any]) -> None:
    """Functions, partials, bound methods, callable objects, classes and C callables all run."""
    items = [{"tokens": 1.0}, {"tokens": 2.0}] if cost is dict else [1, 2]
    results = await corral.gather(ident, items, rate=TOKENS, cost=cost)  # type: ignore[arg-type]
    assert results == items


async def test_a_class_of_one_argument_is_accepted_as_cost() -> None:
    """A class is called with the item, so its __init__ takes it."""
    assert await corral.gather(ident, [1, 2], rate=TOKENS, cost=Estimate) == [1, 2]  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^cost= is called with the item, but Meter takes no"):
        corral.map(ident, [1], cost=Meter)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "usage",
    [
        Meter(),
        Meter().cost,
        functools.partial(scaled, floor=1.0),
        functools.partial(corral.token_usage, cache_reads=False),  # as the docs suggest
    ],
)
async def test_a_usage_that_takes_the_result_is_accepted(usage: Callable[[Any], Any]) -> None:
    assert await corral.gather(ident, [1, 2], rate=TOKENS, usage=usage) == [1, 2]  # type: ignore[arg-type]


@pytest.fixture
def signature_reads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The callables whose signature is read from now on, in order."""
    seen: list[object] = []
    signature = inspect.signature

    def counting(fn: Any, **kwargs: Any) -> inspect.Signature:
        seen.append(fn)
        return signature(fn, **kwargs)

    monkeypatch.setattr(inspect, "signature", counting)
    # Plain functions are read from their code object instead: count them as the rest.
    monkeypatch.setattr(corral._numbers, "_binds_plainly", lambda fn, count: False)
    return seen


@pytest.mark.parametrize("items", [3, 60])
async def test_the_callables_are_inspected_once_per_map_not_per_call(
    items: int, signature_reads: list[object]
) -> None:
    """Reading a signature is slow: fn, cost= and usage= are read when map() is called only."""
    seen = signature_reads
    meter = Meter()
    results = await corral.gather(ident, range(items), rate=TOKENS, cost=meter.cost, usage=meter)
    assert results == list(range(items))
    assert len(meter.seen) == 2 * items  # cost and usage did run per call
    assert seen.count(meter) == 1
    assert seen.count(meter.cost) == 1
    assert seen.count(ident) == 1


def _positional_only(a: int, b: int = 0, /) -> None: ...
def _with_varargs(a: int, *rest: int) -> None: ...
def _keyword_default(a: int, *, b: int = 0) -> None: ...
def _keyword_required(a: int, *, b: int) -> None: ...
def _no_parameters() -> None: ...
def _two_required(a: int, b: int) -> None: ...
def _all_defaults(a: int = 0, b: int = 0) -> None: ...


class _Methods:
    def one(self, a: int) -> None: ...
    def two(self, a: int, b: int) -> None: ...


@pytest.mark.parametrize(
    "fn",
    [
        _positional_only,
        _with_varargs,
        _keyword_default,
        _keyword_required,
        _no_parameters,
        _two_required,
        _all_defaults,
        _Methods().one,
        _Methods().two,
        lambda *args, **kwargs: None,
        lambda a, b=1, *c, d=2, **e: None,
    ],
)
@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_the_code_object_reading_agrees_with_inspect(fn: Callable[..., Any], count: int) -> None:
    """Reading a plain function's code object says "it binds" exactly when inspect does."""
    try:
        inspect.signature(fn).bind(*range(count))
        binds = True
    except TypeError:
        binds = False
    assert corral._numbers._binds_plainly(fn, count) is binds


# -- fn and setup= -------------------------------------------------------------------


async def nothing() -> int:
    return 0


async def pair(item: int, session: Any) -> int:
    return item


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        (nothing, "nothing takes no argument"),
        (pair, "pair needs 2 arguments (item, session)"),
        (lambda: 0, "<lambda> takes no argument"),
    ],
)
def test_a_fn_of_the_wrong_arity_is_refused_at_once(fn: Callable[..., Any], why: str) -> None:
    """Else every item fails with a TypeError, or with return_exceptions=True becomes one."""
    for caller in (corral.map, corral.run):
        with pytest.raises(
            TypeError, match=exactly(f"fn= is called with the item, but {why}; got fn={fn!r}")
        ):
            caller(fn, range(3), return_exceptions=True)


async def test_gather_refuses_a_fn_of_the_wrong_arity() -> None:
    with pytest.raises(TypeError, match=r"^fn= is called with the item, but nothing takes no"):
        await corral.gather(nothing, range(3), return_exceptions=True)


class Fetcher:
    def __init__(self) -> None:
        self.base = 10

    async def fetch(self, item: int) -> int:
        return self.base + item

    async def __call__(self, item: int) -> int:
        return item


async def add(item: int, offset: int = 0) -> int:
    return item + offset


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (Fetcher().fetch, [10, 11]),
        (Fetcher(), [0, 1]),
        (functools.partial(add, offset=5), [5, 6]),
        (add, [0, 1]),
        (abs, [0, 1]),  # a plain C function, run in a thread
        (str, ["0", "1"]),  # a C class inspect cannot read
    ],
)
async def test_a_fn_of_one_item_is_accepted(fn: Callable[[int], Any], expected: list[Any]) -> None:
    assert await corral.gather(fn, range(2)) == expected


def test_setup_and_fn_arity_is_checked_for_ray() -> None:
    """setup= takes no argument, and fn then takes the item and what setup returned."""

    def make_session(config: Any) -> object:
        return object()

    with pytest.raises(
        TypeError,
        match=r"^setup= is called with no argument, but make_session needs 1 argument "
        r"\(config\); got setup=",
    ):
        corral.map(pair, range(3), backend="ray", setup=make_session)
    with pytest.raises(
        TypeError,
        match=r"^fn= is called with the item and what setup= returned, but ident takes only "
        r"1 argument \(item\); got fn=",
    ):
        corral.map(ident, range(3), backend="ray", setup=object)


# -- Retry(on=) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on", "why"),
    [
        (lambda: True, "<lambda> takes no argument"),
        (lambda exc, attempt: True, "<lambda> needs 2 arguments (exc, attempt)"),
        (keyword_needed, "keyword_needed also needs the keyword argument 'scale'"),
    ],
)
def test_a_predicate_of_the_wrong_arity_is_refused_by_retry(
    on: Callable[..., bool], why: str
) -> None:
    """Retry(on=) is called with the exception: refused when the Retry is made."""
    with pytest.raises(
        TypeError, match=exactly(f"on= is called with the exception, but {why}; got on={on!r}")
    ):
        Retry(on=on)


class Transient:
    """A callable object as a predicate."""

    def __call__(self, exc: BaseException) -> bool:
        return isinstance(exc, ConnectionError)

    def method(self, exc: BaseException, *extra: Any) -> bool:
        return isinstance(exc, ConnectionError)


def is_kind(exc: BaseException, kind: type[BaseException] = ConnectionError) -> bool:
    return isinstance(exc, kind)


@pytest.mark.parametrize(
    "on",
    [
        lambda exc: isinstance(exc, ConnectionError),
        Transient(),
        Transient().method,
        functools.partial(is_kind, kind=ConnectionError),
        is_kind,
        functools.cache(lambda exc: isinstance(exc, ConnectionError)),  # not inspectable
        ConnectionError,  # a class: an exception type, as before
    ],
)
async def test_a_predicate_of_the_exception_is_accepted_and_used(on: Any) -> None:
    """The accepted forms are called with the exception and decide the retry."""
    calls: list[int] = []

    async def flaky(item: int) -> int:
        calls.append(item)
        if len(calls) == 1:
            raise ConnectionError("reset")
        return item

    retry = Retry(attempts=2, backoff=0, max_backoff=0, on=on)
    assert await corral.gather(flaky, [7], retries=retry) == [7]
    assert calls == [7, 7]
    assert not retry.retries(ValueError("final"))


def test_a_predicate_is_inspected_once_per_retry(signature_reads: list[object]) -> None:
    """Made once; next_wait asks the predicate without reading its signature again."""
    import random

    seen = signature_reads
    predicate = Transient()
    retry = Retry(attempts=50, on=predicate)
    for calls in range(1, 40):
        assert retry.next_wait(ConnectionError(), calls, random.Random(0)) is not None
    assert seen == [predicate]


# -- Numbers too large or too small for a float ---------------------------------------

TINY = Fraction(1, 10**400)  # > 0, but 0.0 as a float
HUGE = 10**400  # finite, but inf as a float


@pytest.mark.parametrize("name", ["timeout", "deadline"])
def test_seconds_that_are_zero_as_a_float_are_refused(name: str) -> None:
    """A Fraction that is 0.0 as a float would time out (or end the map) at once."""
    with pytest.raises(
        ValueError, match=rf"^{name} must be a number of seconds > 0 .*; got {name}=Fraction"
    ):
        corral.map(ident, range(3), **{name: TINY})


@pytest.mark.parametrize("name", ["timeout", "deadline", "monitor"])
@pytest.mark.parametrize("value", [HUGE, TINY, True, -1, 0, float("nan"), float("inf"), "1"])
def test_bad_seconds_are_refused_naming_them(name: str, value: object) -> None:
    if name == "monitor" and value is True:
        return  # monitor=True is the default threshold
    with pytest.raises(ValueError, match=rf"; got {name}={re.escape(repr(value))}$"):
        corral.map(ident, range(3), **{name: value})


@pytest.mark.parametrize("value", [0.0009, 1e-6, Fraction(1, 2000)])
def test_a_monitor_threshold_below_a_millisecond_is_refused_naming_it(value: object) -> None:
    """Below 1 ms the loop's own scheduling would be reported as blocking, turn after turn."""
    with pytest.raises(ValueError, match=rf">= 0\.001 .*; got monitor={re.escape(repr(value))}$"):
        corral.map(ident, range(3), monitor=value)
    corral.map(ident, range(3), monitor=0.001)  # a millisecond is taken


@pytest.mark.parametrize(
    ("value", "expected"),
    [(Fraction(1, 4), 0.25), (np.float64(0.5), 0.5), (np.int64(2), 2.0), (3, 3.0)],
)
def test_seconds_of_any_real_type_become_floats(value: object, expected: float) -> None:
    assert positive_seconds(value) == expected
    assert type(positive_seconds(value)) is float


@pytest.mark.parametrize(
    "n",
    [
        TINY,  # per / n is inf, and 1.0 / float(n) divides by zero
        {"requests": 5, "tokens": TINY},
    ],
)
def test_a_rate_too_small_for_a_float_is_refused_by_name(n: Any) -> None:
    """It was a bare ZeroDivisionError ("float division by zero") from the schedule check."""
    with pytest.raises(ValueError, match=r"^Rate per / n.* must be a finite number > 0, .*= inf$"):
        Rate(n)


def test_a_rate_number_too_small_for_a_float_is_refused_as_given() -> None:
    """rate=Fraction(...) is named as given, not as the 0.0 it becomes."""
    with pytest.raises(ValueError, match=r"got rate=Fraction\(1, 1000"):
        corral.map(ident, range(3), rate=TINY)


def test_a_huge_burst_is_refused_by_name() -> None:
    """(burst - 1) * interval overflows a float: refused, naming it."""
    with pytest.raises(ValueError, match=r"^Rate \(burst - 1\) \* per / n .* = inf$"):
        Rate(5, burst=HUGE)


def test_retry_takes_a_huge_max_retry_after_as_no_cap() -> None:
    assert Retry(max_retry_after=HUGE).max_retry_after == float("inf")


@pytest.mark.parametrize("value", [HUGE, -HUGE])
def test_to_float_overflows_to_infinity(value: int) -> None:
    assert to_float(value) == (float("inf") if value > 0 else -float("inf"))
    assert to_float(Fraction(3, 2)) == 1.5


def test_check_finite_returns_the_value_as_given() -> None:
    assert check_finite(Fraction(1, 3), "m") == Fraction(1, 3)
    with pytest.raises(ValueError, match=r"^m$"):
        check_finite(0, "m")
    with pytest.raises(ValueError, match=r"^m$"):
        check_finite(HUGE, "m")
    with pytest.raises(TypeError, match=r"^m$"):
        check_finite(True, "m")


def test_check_arity_accepts_what_it_cannot_inspect() -> None:
    """inspect.signature fails on these: no check, no error (they may well work)."""
    for fn in (
        max,
        dict,
        functools.cache(no_argument),
        functools.partial(isinstance, classinfo=int),
    ):
        check_arity("cost", fn, 1, "the item")


# -- processes= ----------------------------------------------------------------------


async def test_processes_takes_a_numpy_int_as_limit_does() -> None:
    """processes=np.int64(1) (from a config array) was refused as "not an int >= 1"."""
    from _work import async_square

    async with corral.map(async_square, range(4), processes=np.int64(1), limit=np.int64(2)) as out:
        assert [r async for r in out] == [0, 1, 4, 9]


@pytest.mark.parametrize(("processes", "limit"), [(10**400, None), (10**400, 100), (1025, 10)])
def test_more_processes_than_a_machine_can_run_are_refused_naming_them(
    processes: int, limit: int | None
) -> None:
    """processes=10**400 with limit=None failed with a bare OverflowError (a list of
    that many shares), and with a huge limit never returned; 1,025 processes would
    each start an interpreter. Refused at once, naming the value."""
    from _work import async_square

    with pytest.raises(
        ValueError, match=r"^processes must be at most 1024 .*got processes="
    ) as info:
        corral.map(async_square, range(3), processes=processes, limit=limit)
    assert str(info.value).endswith(f"got processes={processes!r}")
    # 1,024 is still taken (no process starts until the map is iterated).
    corral.map(async_square, range(3), processes=1024, limit=limit)


def test_more_ray_actors_than_a_cluster_could_hold_are_refused_naming_them() -> None:
    from corral._ray import check_actors

    assert check_actors(100_000) == 100_000
    for actors in (100_001, 10**400):
        with pytest.raises(ValueError, match=r"^ray_actors must be at most 100_000 .*") as info:
            check_actors(actors)
        assert str(info.value).endswith(f"got ray_actors={actors!r}")


# -- progress= and item_id= ----------------------------------------------------------


def test_a_progress_function_of_the_wrong_arity_is_refused_at_once() -> None:
    """It used to fail on its first snapshot, logged once, and the map went on without it."""
    with pytest.raises(
        TypeError,
        match=r"^progress= is called with each corral\.Stats snapshot, but <lambda> takes no "
        r"argument; got progress=",
    ):
        corral.map(ident, range(3), progress=lambda: None)


async def test_a_progress_function_of_one_snapshot_is_accepted() -> None:
    snapshots: list[corral.Stats] = []
    assert await corral.gather(ident, range(3), progress=snapshots.append) == [0, 1, 2]
    assert snapshots[-1].completed == 3


def test_an_item_id_of_the_wrong_arity_is_refused_at_once(tmp_path: Any) -> None:
    """It used to fail the first item pulled, at run time."""
    with pytest.raises(
        TypeError,
        match=r"^item_id= is called with the item, but <lambda> takes no argument; got item_id=",
    ):
        corral.map(ident, range(3), checkpoint=tmp_path / "run.sqlite", item_id=lambda: 1)


async def test_an_item_id_of_the_item_is_accepted(tmp_path: Any) -> None:
    path = tmp_path / "run.sqlite"
    assert await corral.gather(ident, range(3), checkpoint=path, item_id=str) == [0, 1, 2]
    assert await corral.gather(ident, range(3), checkpoint=path, item_id=lambda i: i) == [0, 1, 2]


# -- async functions where a plain one is called -------------------------------------


async def async_estimate(item: Any) -> dict[str, float]:
    return {"tokens": 1}


class AsyncCall:
    async def __call__(self, value: Any) -> bool:
        return True


@pytest.mark.parametrize(
    "fn",
    [async_estimate, functools.partial(async_estimate), AsyncCall()],
    ids=["function", "partial", "object"],
)
@pytest.mark.parametrize(("name", "given"), [("cost", "the item"), ("usage", "the result")])
def test_an_async_cost_or_usage_is_refused_at_once(name: str, given: str, fn: Any) -> None:
    """Its coroutine would be taken for the amounts, and never awaited."""
    with pytest.raises(
        TypeError,
        match=exactly(
            f"{name}= must be a plain function (a `def`), called with {given}; its result is "
            f"used as it is, never awaited; got the async function {name}={fn!r}"
        ),
    ):
        corral.map(ident, range(3), rate=TOKENS, **{name: fn})


def test_an_async_item_id_is_refused_at_once(tmp_path: Any) -> None:
    with pytest.raises(TypeError, match=r"^item_id= must be a plain function"):
        corral.map(ident, range(3), checkpoint=tmp_path / "run.sqlite", item_id=async_estimate)


def test_an_async_predicate_is_refused_as_it_would_retry_everything() -> None:
    """bool(coroutine) is True: Retry(on=async def) used to retry even a ValueError."""

    async def transient_only(exc: BaseException) -> bool:
        return isinstance(exc, ConnectionError)

    with pytest.raises(
        TypeError,
        match=r"^on= must be a plain function \(a `def`\), called with the exception; its "
        r"result is used as it is, never awaited; got the async function on=",
    ):
        Retry(on=transient_only)
    with pytest.raises(TypeError, match=r"^on= must be a plain function"):
        Retry(on=AsyncCall())


# -- Limiter -------------------------------------------------------------------------


async def _async_key(item: object) -> object:
    return item


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (lambda: "host", r"^key= is called with the item, but <lambda> takes no argument"),
        (lambda a, b: a, r"^key= is called with the item, but <lambda> needs 2 arguments"),
        (_async_key, r"^key= must be a plain function"),
    ],
)
def test_a_key_of_the_wrong_kind_is_refused_by_the_limiter(key: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        corral.Limiter(limit=2, key=key)


@pytest.mark.parametrize("key", [str, len, lambda url: url, functools.partial(max, 0)])
def test_a_key_of_one_argument_is_accepted(key: Any) -> None:
    corral.Limiter(limit=2, key=key)


@pytest.mark.parametrize("seconds", [HUGE, math.inf, math.nan, -1])
def test_a_cooldown_that_is_no_duration_is_refused_naming_it(seconds: Any) -> None:
    limiter = corral.Limiter(limit=2)
    with pytest.raises(ValueError, match="seconds"):
        limiter.cooldown(seconds)


def test_ray_actors_take_a_numpy_int() -> None:
    from corral._ray import check_actors

    assert check_actors(np.int64(3)) == 3
    assert type(check_actors(np.int64(3))) is int
    with pytest.raises(ValueError, match="ray_actors"):
        check_actors(True)
