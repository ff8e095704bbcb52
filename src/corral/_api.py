"""``map``, ``gather`` and ``run``: argument checking and wiring.

Everything flexible about the arguments (``rate="20/s"``, ``retries=3``, a
sync ``fn``) is normalised here, once, so the engine sees only a coroutine
function of one item with its timeout, retries and limits already wrapped
around it, and plain numbers for the worker count and window.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import inspect
import math
import random
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import Any, TypeVar, overload

from . import __version__
from ._engine import Call, Engine, ResultStream, _Retried
from ._limits import Limiter, Rate, RateGate, as_rate
from ._offload import is_async_callable, offload
from ._retry import Retry, as_retry

T = TypeVar("T")
R = TypeVar("R")

LimitLike = int | Limiter | None
RateLike = Rate | float | str | None
ExecutorLike = str | concurrent.futures.Executor | None

#: A Limiter that caps only the rate still gets this many workers per map.
DEFAULT_LIMIT = 100


# ---------------------------------------------------------------------------
# Argument checks: each names the argument and the value, and says the fix.
# ---------------------------------------------------------------------------


def _check_fn(fn: object, caller: str) -> None:
    if inspect.iscoroutine(fn):
        fn.close()  # no "never awaited" warning on top of our error
        raise TypeError(
            f"corral.{caller}() needs a function, got a coroutine object {fn!r}.\n"
            f"  corral.{caller}(get_page(u), urls)   # wrong: runs once, right now\n"
            f"  corral.{caller}(get_page, urls)      # right: corral calls it per item"
        )
    if not callable(fn):
        raise TypeError(f"corral.{caller}() needs a function of one item as fn; got fn={fn!r}")


def _check_limit(limit: object) -> None:
    if limit is None or isinstance(limit, Limiter):
        return
    if limit == "auto":
        raise ValueError(
            f"limit='auto' (adaptive concurrency) is not available in corral {__version__}; "
            "pass an int >= 1, None or a corral.Limiter"
        )
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(
            f"limit must be an int >= 1, None (unbounded) or a corral.Limiter; got limit={limit!r}"
        )


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(
            f"timeout must be a number of seconds > 0 (per attempt), or None; "
            f"got timeout={timeout!r}"
        )
    return float(timeout)


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {name}={value!r}")


def _check_executor(executor: object, fn_is_async: bool) -> None:
    if not (
        executor is None
        or executor in ("thread", "process")
        or isinstance(executor, concurrent.futures.Executor)
    ):
        raise ValueError(
            "executor must be None, 'thread', 'process' or a concurrent.futures.Executor; "
            f"got executor={executor!r}"
        )
    if executor is not None and fn_is_async:
        raise ValueError(
            f"executor={executor!r} runs plain functions, but fn is async: it already runs "
            "on the event loop. Drop executor=, or pass a plain `def` function."
        )


def _as_items(items: object) -> Iterable[Any] | AsyncIterable[Any]:
    if isinstance(items, AsyncIterable):
        return items
    try:
        return iter(items)  # type: ignore[call-overload,no-any-return]
    except TypeError:
        raise TypeError(
            f"items must be an iterable or an async iterable; got items={items!r}"
        ) from None


# ---------------------------------------------------------------------------
# Wrapping the call: innermost first — the call itself, its timeout, the
# limits it must pass before starting, the retries around all of that.
# ---------------------------------------------------------------------------


def _with_timeout(call: Call, timeout: float) -> Call:
    async def timed(item: Any) -> Any:
        async with asyncio.timeout(timeout):
            return await call(item)

    return timed


def _with_limiter(call: Call, limiter: Limiter) -> Call:
    async def limited(item: Any) -> Any:
        await limiter.acquire()
        try:
            return await call(item)
        finally:
            limiter.release()

    return limited


def _with_rate(call: Call, gate: RateGate) -> Call:
    async def paced(item: Any) -> Any:
        await gate.wait()
        return await call(item)

    return paced


def _with_retries(call: Call, retry: Retry, retried: _Retried) -> Call:
    rng = random.Random()

    async def retrying(item: Any) -> Any:
        calls = 1
        while True:
            try:
                return await call(item)
            except Exception as exc:
                wait = retry.next_wait(exc, calls, rng)
                if wait is None:
                    raise
            retried.count += 1
            calls += 1
            await asyncio.sleep(wait)

    return retrying


def _engine(
    caller: str,
    fn: Any,
    items: Any,
    *,
    limit: LimitLike,
    rate: RateLike,
    ordered: bool,
    timeout: float | None,
    retries: int | Retry | None,
    return_exceptions: bool,
    executor: ExecutorLike,
    collect: bool,
) -> Engine[Any, Any]:
    _check_fn(fn, caller)
    _check_limit(limit)
    rate_ = as_rate(rate)
    seconds = _check_timeout(timeout)
    retry = as_retry(retries)
    _check_flag("ordered", ordered)
    _check_flag("return_exceptions", return_exceptions)
    fn_is_async = is_async_callable(fn)
    _check_executor(executor, fn_is_async)
    source = _as_items(items)

    if isinstance(limit, Limiter):
        limiter: Limiter | None = limit
        workers: int | None = limit.limit or DEFAULT_LIMIT

        def limit_reader() -> int | None:
            return limiter.limit if limiter is not None else None
    else:
        limiter = None
        workers = limit

        def limit_reader() -> int | None:
            return workers

    call: Call
    on_close = None
    if fn_is_async:
        call = fn
    else:
        call, on_close = offload(fn, executor, workers)
    if seconds is not None:
        call = _with_timeout(call, seconds)
    if rate_ is not None:
        call = _with_rate(call, RateGate(rate_))
    if limiter is not None:
        call = _with_limiter(call, limiter)
    retried = _Retried()
    if retry is not None:
        call = _with_retries(call, retry, retried)

    window = None if collect or workers is None else 2 * workers
    return Engine(
        call,
        source,
        workers=workers,
        window=window,
        ordered=ordered,
        collect=collect,
        return_exceptions=return_exceptions,
        limit_reader=limit_reader,
        retried=retried,
        on_close=on_close,
    )


# ---------------------------------------------------------------------------
# The public functions
# ---------------------------------------------------------------------------


@overload
def map(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    *,
    limit: LimitLike = ...,
    rate: RateLike = ...,
    ordered: bool = ...,
    timeout: float | None = ...,
    retries: int | Retry | None = ...,
    return_exceptions: bool = ...,
    executor: ExecutorLike = ...,
) -> ResultStream[R]: ...
@overload
def map(
    fn: Callable[[T], R],
    items: Iterable[T] | AsyncIterable[T],
    *,
    limit: LimitLike = ...,
    rate: RateLike = ...,
    ordered: bool = ...,
    timeout: float | None = ...,
    retries: int | Retry | None = ...,
    return_exceptions: bool = ...,
    executor: ExecutorLike = ...,
) -> ResultStream[R]: ...
def map(
    fn: Callable[[Any], Any],
    items: Iterable[Any] | AsyncIterable[Any],
    *,
    limit: LimitLike = DEFAULT_LIMIT,
    rate: RateLike = None,
    ordered: bool = True,
    timeout: float | None = None,
    retries: int | Retry | None = 0,
    return_exceptions: bool = False,
    executor: ExecutorLike = None,
) -> ResultStream[Any]:
    """Call ``fn`` on every item, at most ``limit`` at a time, and stream the results.

    ::

        async with corral.map(fetch, urls, limit=100) as pages:
            async for page in pages:       # input order; ordered=False: as completed
                ...

    Items are pulled lazily, only when a call can start, so ``items`` may be a
    generator of millions or an endless async stream: memory stays O(limit).
    With ``ordered=True`` a slow item at the head pauses new starts once about
    ``2 * limit`` later results wait behind it, instead of buffering without end.

    Args:
        fn: an ``async def`` function of one item. A plain ``def`` runs in a
            thread pool as wide as ``limit`` (or processes, ``executor="process"``).
        items: any iterable or async iterable, possibly endless.
        limit: the most calls in flight: an int >= 1, ``None`` for no bound (like
            ``asyncio.gather``), or a shared :class:`corral.Limiter`.
        rate: the most call starts per time: ``20`` (per second), ``"20/s"``,
            ``"600/min"``, ``"5/100ms"`` or ``corral.Rate(20, per=1.0, burst=5)``.
        ordered: results in input order (``True``) or as they complete.
        timeout: seconds per attempt; a late attempt raises ``TimeoutError``,
            which is retried like any transient failure.
        retries: extra attempts (an int), or a :class:`corral.Retry` policy.
        return_exceptions: ``False``: the first failure (after its retries)
            cancels everything in flight and is raised as itself. ``True``: the
            exception object takes the item's place among the results.
        executor: for a plain ``def`` fn: ``None``/``"thread"``, ``"process"``,
            or a ``concurrent.futures.Executor`` that corral uses but does not
            shut down.

    Raises:
        TypeError, ValueError: at once, for a bad argument (the message names it).
    """
    engine = _engine(
        "map",
        fn,
        items,
        limit=limit,
        rate=rate,
        ordered=ordered,
        timeout=timeout,
        retries=retries,
        return_exceptions=return_exceptions,
        executor=executor,
        collect=False,
    )
    return ResultStream(engine)


@overload
async def gather(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    *,
    limit: LimitLike = ...,
    rate: RateLike = ...,
    timeout: float | None = ...,
    retries: int | Retry | None = ...,
    return_exceptions: bool = ...,
    executor: ExecutorLike = ...,
) -> list[R]: ...
@overload
async def gather(
    fn: Callable[[T], R],
    items: Iterable[T] | AsyncIterable[T],
    *,
    limit: LimitLike = ...,
    rate: RateLike = ...,
    timeout: float | None = ...,
    retries: int | Retry | None = ...,
    return_exceptions: bool = ...,
    executor: ExecutorLike = ...,
) -> list[R]: ...
async def gather(
    fn: Callable[[Any], Any],
    items: Iterable[Any] | AsyncIterable[Any],
    *,
    limit: LimitLike = DEFAULT_LIMIT,
    rate: RateLike = None,
    timeout: float | None = None,
    retries: int | Retry | None = 0,
    return_exceptions: bool = False,
    executor: ExecutorLike = None,
) -> list[Any]:
    """Call ``fn`` on every item like :func:`map` and return the results as a list.

    The list is in input order. Takes the same keywords as :func:`map`
    (``ordered`` is meaningless here: the list is always in input order).
    """
    engine = _engine(
        "gather",
        fn,
        items,
        limit=limit,
        rate=rate,
        ordered=True,
        timeout=timeout,
        retries=retries,
        return_exceptions=return_exceptions,
        executor=executor,
        collect=True,
    )
    return await engine.run_to_end()


@overload
def run(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    *,
    limit: LimitLike = ...,
    rate: RateLike = ...,
    timeout: float | None = ...,
    retries: int | Retry | None = ...,
    return_exceptions: bool = ...,
    executor: ExecutorLike = ...,
    uvloop: bool | None = ...,
) -> builtins.list[R]: ...
@overload
def run(
    fn: Callable[[T], R],
    items: Iterable[T] | AsyncIterable[T],
    *,
    limit: LimitLike = ...,
    rate: RateLike = ...,
    timeout: float | None = ...,
    retries: int | Retry | None = ...,
    return_exceptions: bool = ...,
    executor: ExecutorLike = ...,
    uvloop: bool | None = ...,
) -> builtins.list[R]: ...
def run(
    fn: Callable[[Any], Any],
    items: Iterable[Any] | AsyncIterable[Any],
    *,
    limit: LimitLike = DEFAULT_LIMIT,
    rate: RateLike = None,
    timeout: float | None = None,
    retries: int | Retry | None = 0,
    return_exceptions: bool = False,
    executor: ExecutorLike = None,
    uvloop: bool | None = None,
) -> builtins.list[Any]:
    """:func:`gather` from synchronous code: start an event loop, run, return the list.

    Args:
        uvloop: use uvloop's faster event loop. ``None`` (default): when it is
            installed. ``True``: require it. ``False``: the standard loop.
        Every other keyword as in :func:`map`.

    Raises:
        RuntimeError: when called from a running event loop (``await
            corral.gather(...)`` there instead).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "corral.run() starts its own event loop and cannot run inside one; "
            "use `await corral.gather(...)` in async code"
        )
    loop_factory = _loop_factory(uvloop)
    coro = gather(
        fn,
        items,
        limit=limit,
        rate=rate,
        timeout=timeout,
        retries=retries,
        return_exceptions=return_exceptions,
        executor=executor,
    )
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


def _loop_factory(use_uvloop: bool | None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if use_uvloop is False:
        return None
    try:
        import uvloop
    except ImportError:
        if use_uvloop:
            raise ImportError(
                "corral.run(..., uvloop=True) needs uvloop: pip install 'corral[uvloop]'"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
