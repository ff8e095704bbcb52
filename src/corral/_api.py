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
import difflib
import functools
import inspect
import os
import random
import reprlib
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal, TypedDict, TypeVar, Unpack, overload

from ._adaptive import Adaptive
from ._auto_rate import AutoRateGate, with_auto_rate
from ._checkpoint import (
    CONSUMER_LAG,
    Checkpoint,
    CheckpointedStream,
    OnClose,
    as_checkpoint,
    closing,
    resume_hint,
    with_checkpoint,
)
from ._engine import Call, Engine, Halt, ResultStream, _Retried
from ._errors import BudgetExhausted
from ._limits import MAX_COOLDOWN, Limiter
from ._monitor import DEFAULT_THRESHOLD, MIN_THRESHOLD, LoopWatch, monitor_from_env
from ._numbers import (
    check_arity,
    is_async_callable,
    is_finite,
    is_integral,
    is_real,
    positive_seconds,
)
from ._offload import ProcessPool, applies_timeout, offload, thread_width
from ._progress import Progress, ProgressLike, check_progress, total_of
from ._rate import Rate, RateGate, as_rate, as_rates, gate_for
from ._ray import RayStream, check_actors, check_address, check_setup, map_on_ray, ray_call
from ._remote import RemoteCall, RemoteStream
from ._retry import Retry, as_retry, retry_after_seconds, retry_kind
from ._retry_budget import RetryBudgetExhausted, RetryBudgetState
from ._shard import ShardedStream, map_sharded, sharded_call
from ._stats import Waiting
from ._usage import Meter, NoRetry, UsageBudget, headers_of, metered, sync_gate
from ._weighted import WeightedGate

T = TypeVar("T")
R = TypeVar("R")
S = TypeVar("S")  # what setup= returns: a two-argument fn's second argument

LimitLike = int | Literal["auto"] | Adaptive | Limiter | None
RateLike = Rate | list[Rate] | float | str | None  # str: "20/s", or "auto" (adaptive)
ExecutorLike = str | concurrent.futures.Executor | None

#: A Limiter that caps only the rate still gets this many workers per map.
DEFAULT_LIMIT = 100


# ---------------------------------------------------------------------------
# Argument checks: each names the argument and the value, and says the fix.
# ---------------------------------------------------------------------------


def _check_fn(fn: object, caller: str, *, setup: bool = False) -> None:
    if inspect.iscoroutine(fn):
        fn.close()  # no "never awaited" warning on top of our error
        raise TypeError(
            f"corral.{caller}() needs a function, got a coroutine object {fn!r}.\n"
            f"  corral.{caller}(get_page(u), urls)   # wrong: runs once, right now\n"
            f"  corral.{caller}(get_page, urls)      # right: corral calls it per item"
        )
    if not callable(fn):
        raise TypeError(f"corral.{caller}() needs a function of one item as fn; got fn={fn!r}")
    # Else a fn of the wrong arity fails on every item, each failure (or, with
    # return_exceptions=True, every result) a TypeError that names neither.
    if setup:
        check_arity("fn", fn, 2, "the item and what setup= returned")
    else:
        check_arity("fn", fn, 1, "the item")


def _check_limit(limit: Any) -> Any:
    """``limit`` as given, a numpy int made a plain one; refused naming it if not a limit."""
    if limit is None or isinstance(limit, Limiter | Adaptive) or limit == "auto":
        return limit
    if is_integral(limit) and limit >= 1:
        return int(limit)
    raise ValueError(
        "limit must be an int >= 1, None (unbounded), 'auto' (adaptive), a corral.Adaptive "
        f"or a corral.Limiter; got limit={limit!r}"
    )


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    seconds = positive_seconds(timeout)
    if seconds is None:
        raise ValueError(
            f"timeout must be a number of seconds > 0 (per attempt), or None; "
            f"got timeout={timeout!r}"
        )
    return seconds


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
    if inspect.iscoroutine(items):
        items.close()  # no "never awaited" warning on top of our error
        raise TypeError(
            "items must be an iterable or an async iterable, not a coroutine: await it for "
            f"what it returns, or pass an async generator; got items={items!r}"
        )
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


def _with_limiter(
    call: Call, limiter: Limiter, max_cooldown: float, waiting: Waiting, hands_on: bool
) -> Call:
    """Take ``limiter``'s slot around each call; a Retry-After pauses it, up to ``max_cooldown``.

    ``hands_on``: ``call`` is another gate, which times the call's start
    (see :class:`Waiting`).
    """
    if limiter.adaptive is not None or limiter.key is not None or limiter.auto_rate:
        return _with_feedback(call, limiter, max_cooldown, waiting, hands_on)

    async def limited(item: Any) -> Any:
        cell = waiting.cell
        if cell is not None:
            waiting.cell = None
        waiting.count += 1
        try:
            await limiter.acquire()
        finally:
            # Cancelled too: the map is ending, and the engine reports the item
            # as a call cut short (or, past a deadline, as failed): started.
            waiting.count -= 1
        if cell is not None:
            if hands_on:
                waiting.cell = cell
            else:
                cell[0] = asyncio.get_running_loop().time()
        try:
            return await call(item)
        except Exception as exc:
            # A 429/503 with Retry-After (or RetryAfter) pauses every user of
            # the limiter, and its rate-limit headers clamp the rate; costs
            # nothing until a call fails.
            _follow_headers(exc, limiter)
            limiter.record_error(0.0, exc, max_cooldown=max_cooldown)
            raise
        finally:
            limiter.release()

    return limited


def _follow_headers(exc: BaseException, limiter: Limiter) -> None:
    """A failure's rate-limit headers (a 429's) clamp ``limiter``'s rate, as with ``cost=``."""
    if isinstance(exc, Exception):
        headers = headers_of(exc)
        if headers is not None:
            limiter.sync_headers(headers)


def _with_feedback(
    call: Call, limiter: Limiter, max_cooldown: float, waiting: Waiting, hands_on: bool
) -> Call:
    """An adaptive or per-key limiter: take the item's key's slot, report how the call went."""
    if limiter.key is not None:

        async def per_key(item: Any) -> Any:
            own = limiter.for_item(item)
            cell = waiting.cell
            if cell is not None:
                waiting.cell = None
            waiting.count += 1
            try:
                await own.acquire()
            finally:
                waiting.count -= 1
            clock = asyncio.get_running_loop().time
            began = clock()
            if cell is not None:
                if hands_on:
                    waiting.cell = cell
                else:
                    cell[0] = began
            try:
                value = await call(item)
            except BaseException as exc:  # a cancellation is recorded as "ignore"
                _follow_headers(exc, own)
                own.record_error(clock() - began, exc, max_cooldown=max_cooldown)
                own.release()
                raise
            now = clock()
            own.record_success(now - began, now)
            own.release()
            return value

        return per_key

    acquire, release = limiter.acquire, limiter.release
    record_success, record_error = limiter.record_success, limiter.record_error

    async def adaptive(item: Any) -> Any:
        cell = waiting.cell
        if cell is not None:
            waiting.cell = None
        waiting.count += 1
        try:
            await acquire()
        finally:
            waiting.count -= 1
        clock = asyncio.get_running_loop().time
        began = clock()
        if cell is not None:
            if hands_on:
                waiting.cell = cell
            else:
                cell[0] = began
        try:
            value = await call(item)
        except BaseException as exc:  # a cancellation is recorded as "ignore"
            _follow_headers(exc, limiter)
            record_error(clock() - began, exc, max_cooldown=max_cooldown)
            release()
            raise
        now = clock()
        record_success(now - began, now)
        release()
        return value

    return adaptive


def _with_rate(call: Call, gate: RateGate, waiting: Waiting) -> Call:
    wait = gate.wait

    async def paced(item: Any) -> Any:
        cell = waiting.cell
        if cell is not None:
            waiting.cell = None
        waiting.count += 1
        try:
            await wait()
        finally:
            waiting.count -= 1
        if cell is not None:
            cell[0] = asyncio.get_running_loop().time()  # the innermost gate: see Waiting
        try:
            return await call(item)
        except Exception as exc:
            # A 429's rate-limit headers clamp the map's own rate, as with cost=.
            headers = headers_of(exc)
            if headers is not None:
                sync_gate(gate, headers)
            raise

    return paced


def _with_gates(
    call: Call,
    gate: RateGate | AutoRateGate | None,
    limiter: Limiter | None,
    max_cooldown: float,
    waiting: Waiting,
) -> Call:
    """``call`` behind the map's rate and its Limiter, counting the items waiting in ``waiting``."""
    if isinstance(gate, AutoRateGate):
        call = with_auto_rate(call, gate, waiting)
    elif gate is not None:
        call = _with_rate(call, gate, waiting)
    if limiter is not None:
        call = _with_limiter(call, limiter, max_cooldown, waiting, hands_on=gate is not None)
    return call


def _judged(
    retry: Retry, exc: Exception, calls: int, rng: random.Random, item: Any
) -> float | None:
    """``retry.next_wait``; a failure of its ``on=`` predicate gets a note saying whose it is.

    Raised in the place of the call's own error, a bare ZeroDivisionError
    would read as the call's.
    """
    try:
        return retry.next_wait(exc, calls, rng)
    except Exception as error:
        error.add_note(
            f"raised by the retries' on={retry.on!r} judging {exc!r} for item {reprlib.repr(item)}"
        )
        raise


def _with_retries(
    call: Call,
    retry: Retry,
    retried: _Retried,
    budget: RetryBudgetState | None = None,
    again: Call | None = None,
) -> Call:
    """Retry ``call`` as ``retry`` says; ``again`` (default ``call``) makes the later attempts."""
    rng = random.Random()
    if again is None:
        again = call
    if budget is not None:
        return _with_budgeted_retries(call, again, retry, retried, budget, rng)

    async def retrying(item: Any) -> Any:
        calls = 1
        attempt = call
        while True:
            try:
                return await attempt(item)
            except NoRetry as final:  # cost= or the usage failed (see metered): final
                error = final.error
                break  # raised out of this handler, so that it does not become its context
            except Exception as exc:
                wait = _judged(retry, exc, calls, rng, item)
                if wait is None:
                    raise
            except Halt as halt:  # the map stopped before this retry: the item did start
                if calls > 1:
                    halt.started = True
                raise
            retried.count += 1
            calls += 1
            attempt = again
            await asyncio.sleep(wait)
        raise error

    return retrying


def _with_budgeted_retries(
    call: Call,
    again: Call,
    retry: Retry,
    retried: _Retried,
    budget: RetryBudgetState,
    rng: random.Random,
) -> Call:
    """Retries drawing on a retry budget: successes feed it, each retry spends from it."""
    success, try_retry = budget.success, budget.try_retry

    async def retrying(item: Any) -> Any:
        calls = 1
        attempt = call
        while True:
            try:
                value = await attempt(item)
            except Halt as halt:  # the map stopped before this retry: the item did start
                if calls > 1:
                    halt.started = True
                raise
            except NoRetry as final:  # cost= or the usage failed (see metered): final
                error = final.error
                break  # raised out of this handler, so that it does not become its context
            except Exception as exc:
                wait = _judged(retry, exc, calls, rng, item)
                if wait is None:
                    raise
                kind = retry_kind(exc)
                # A server that names its wait (Retry-After, RetryAfter) invites
                # the retry, and the limiter's cooldown paces it: only retries
                # nobody asked for draw on the budget. A wait of 0 paces
                # nothing: a server answering every 429 with Retry-After: 0
                # would get a storm only the attempts bound.
                named = retry_after_seconds(exc)
                invited = named is not None and named > 0
                if not invited and not try_retry(kind, asyncio.get_running_loop().time()):
                    b = budget.budget
                    which = "throttled (429/503)" if kind == 0 else "failed"
                    raise RetryBudgetExhausted(
                        f"retry budget exhausted: retries of {which} calls already reached "
                        f"{b.floor:g} + {b.ratio:g} x the successful calls in the last "
                        f"{b.window:g} s; not retrying item {reprlib.repr(item)} after {exc!r}",
                        exc,
                    ) from exc
            else:
                success(asyncio.get_running_loop().time())
                return value
            retried.count += 1
            calls += 1
            attempt = again
            await asyncio.sleep(wait)
        raise error

    return retrying


class _OptionsBesidesSetup(TypedDict, total=False):
    """Every keyword of :class:`Options` but ``setup``: the overloads for a two-argument
    ``fn`` take ``setup`` on its own, typed by ``fn``'s second parameter."""

    limit: LimitLike
    rate: RateLike
    ordered: bool
    timeout: float | None
    retries: int | Retry | None
    return_exceptions: bool
    executor: ExecutorLike
    deadline: float | None
    budget: Mapping[str, float] | None
    cost: Callable[[Any], Mapping[str, float] | None] | None
    usage: Callable[[Any], Mapping[str, float] | None] | None
    progress: ProgressLike
    checkpoint: str | os.PathLike[str] | None
    item_id: Callable[[Any], Any] | None
    fingerprint: str | None
    resume: Literal["strict", "ignore-fingerprint"]
    serializer: Literal["pickle", "json"]
    processes: int | None
    monitor: bool | float
    backend: Literal["local", "ray"]
    ray_address: str | None
    ray_actors: int | None


class Options(_OptionsBesidesSetup, total=False):
    """The keywords ``map``, ``gather`` and ``run`` share (documented on :func:`map`)."""

    setup: Callable[[], Any] | None


_DEFAULTS: dict[str, Any] = {
    "limit": DEFAULT_LIMIT,
    "rate": None,
    "ordered": True,
    "timeout": None,
    "retries": 0,
    "return_exceptions": False,
    "executor": None,
    "deadline": None,
    "budget": None,
    "cost": None,
    "usage": None,
    "progress": False,
    "checkpoint": None,
    "item_id": None,
    "fingerprint": None,
    "resume": "strict",
    "serializer": "pickle",
    "processes": None,
    "monitor": False,
    "backend": "local",
    "ray_address": None,
    "ray_actors": None,
    "setup": None,
}


def _check_keywords(caller: str, options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, _DEFAULTS, n=1)
        hint = f"; did you mean {close[0]}=?" if close else ""
        raise TypeError(f"corral.{caller}() got an unexpected keyword argument {name!r}{hint}")
    backend = options.get("backend", "local")
    if backend not in ("local", "ray"):
        raise ValueError(
            "backend must be 'local' (this process) or 'ray' (a Ray cluster's actors); "
            f"got backend={backend!r}"
        )
    if backend == "local":
        for name in _RAY_ONLY:
            if options.get(name) is not None:
                raise ValueError(
                    f"{name}= is used with backend='ray' only; got {name}={options[name]!r} "
                    "and backend='local'. Pass backend='ray' too, or drop it."
                )
    return {**_DEFAULTS, **options}


def _check_monitor(monitor: object) -> float | None:
    """The watch threshold in seconds, or None for no watch (``CORRAL_MONITOR`` decides then)."""
    if monitor is True:
        return DEFAULT_THRESHOLD
    if monitor is False:
        return DEFAULT_THRESHOLD if monitor_from_env() else None
    seconds = positive_seconds(monitor)  # a Fraction or numpy float too, as watch_loop takes
    if seconds is not None and seconds >= MIN_THRESHOLD:
        return seconds
    raise ValueError(
        f"monitor must be True, False, or a threshold in seconds >= {MIN_THRESHOLD} (report "
        f"calls that block the event loop longer than that); got monitor={monitor!r}"
    )


def _check_deadline(deadline: object) -> float | None:
    if deadline is None:
        return None
    seconds = positive_seconds(deadline)
    if seconds is None:
        raise ValueError(
            f"deadline must be a number of seconds > 0 (for the whole map), or None; "
            f"got deadline={deadline!r}"
        )
    return seconds


def _check_budget(budget: object) -> dict[str, float] | None:
    """The map's budget per dimension: ``requests`` (calls started) or any usage dimension."""
    if budget is None:
        return None
    if not isinstance(budget, Mapping) or not budget:
        raise ValueError(
            "budget must be a dict like {'requests': 50_000} or {'output_tokens': 2_000_000} "
            f"(any dimension the usage reports); got budget={budget!r}"
        )
    for name, value in budget.items():
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"budget dimensions must be named by strings like 'requests'; got budget={budget!r}"
            )
        if not is_real(value) or not (value >= 0 and is_finite(value)):
            raise ValueError(
                f"budget[{name!r}] must be a finite number >= 0; got budget={budget!r}"
            )
    # Plain numbers (a numpy int stays an int): the caps are compared per call.
    return {name: int(v) if is_integral(v) else float(v) for name, v in budget.items()}


def _check_meter_fn(name: str, fn: object) -> None:
    if fn is None:
        return
    if not callable(fn):
        raise TypeError(
            f"{name} must be a function (of the item for cost=, of the result for usage=) "
            f"returning a dict of amounts per dimension, or None; got {name}={fn!r}"
        )
    # Once per map, not per call (see _usage.Meter).
    check_arity(name, fn, 1, "the item" if name == "cost" else "the result", plain=True)


def _with_budget(call: Call, requests: float, gated: bool) -> tuple[Call, _GateLine | None]:
    """A requests-only budget without usage accounting: one counter, the fast path.

    ``gated``: the map has gates (a Limiter, a rate), whose waiting items are
    turned away once the last request is spent by the line returned (see
    :class:`_GateLine`), which the caller puts in front of the gates.
    """
    spent = 0
    message = f"the map's budget of {requests:g} requests is spent"

    def spent_now() -> str | None:
        return message if spent >= requests else None

    if not gated:

        async def budgeted(item: Any) -> Any:
            nonlocal spent
            if spent >= requests:
                raise Halt(BudgetExhausted(message))
            spent += 1
            return await call(item)

        return budgeted, None

    line = _GateLine(spent_now, settles=False)
    in_line, current_task = line.waiting, asyncio.current_task

    async def budgeted_in_line(item: Any) -> Any:
        nonlocal spent
        if spent >= requests:
            raise Halt(BudgetExhausted(message))
        spent += 1
        in_line.discard(current_task())  # through the gates: out of the line
        if spent >= requests:
            line.check()
        return await call(item)

    return budgeted_in_line, line


def _past_gates(call: Call, line: _GateLine) -> Call:
    """``call``, reached once its item passed the gates and the budget: out of ``line``."""

    async def passed(item: Any) -> Any:
        line.passed()
        return await call(item)

    return passed


class _GateLine:
    """A budgeted map's items waiting at its gates, turned away once the budget is spent.

    The budget is checked after an item has passed its gates (its Limiter
    slot, its turn under the rate), right before its call. Left in line once
    the budget is spent, every worker would wait its turn only to be refused
    then: at ``rate="1/s"`` with ``limit=10`` and a budget of 2 requests
    the map ended at 11 s instead of 1 s, and each of those turns was taken
    from a shared Limiter's other users. Instead the items in line are cancelled out of it (which
    gives back their place and rate slot) and raise :class:`Halt`, not
    started, as the budget check would have.
    """

    __slots__ = ("_cut", "_settles", "_spent", "reason", "waiting")

    def __init__(self, spent: Callable[[], str | None], *, settles: bool) -> None:
        #: What the budget says once it is spent (None: not spent yet).
        self._spent = spent
        # Whether a call's end may spend the budget (its usage settled), not
        # only its start.
        self._settles = settles
        self.reason: BudgetExhausted | None = None
        self.waiting: set[asyncio.Task[Any] | None] = set()
        self._cut: set[asyncio.Task[Any] | None] = set()  # cancelled by check()

    def passed(self) -> None:
        """The current task passed the gates and the budget: it is out of the line."""
        self.waiting.discard(asyncio.current_task())
        self.check()

    def check(self) -> None:
        """If the budget is spent, turn away every item in line (once)."""
        if self.reason is not None:
            return
        message = self._spent()
        if message is None:
            return
        self.reason = BudgetExhausted(message)
        current = asyncio.current_task()
        for task in self.waiting:
            if task is not current and task is not None:
                self._cut.add(task)
                task.cancel()

    def wrap(self, gated: Call) -> Call:
        """``gated`` (the gates with the budget and the call inside), entered through the line."""

        waiting, cut, settles, current_task = (
            self.waiting,
            self._cut,
            self._settles,
            asyncio.current_task,
        )

        async def queued(item: Any) -> Any:
            if self.reason is not None:
                raise Halt(self.reason)
            task = current_task()
            waiting.add(task)
            try:
                return await gated(item)
            except asyncio.CancelledError:
                if task in cut:
                    cut.discard(task)
                    # Cancelled by check() alone (not by the map closing too):
                    # the item is refused like any other after the budget.
                    if task is not None and task.uncancel() == 0:
                        assert self.reason is not None
                        raise Halt(self.reason) from None
                raise
            finally:
                waiting.discard(task)  # out of line already, unless it never got through
                if settles:
                    # Its usage is settled by now: it may have spent the budget.
                    self.check()

        return queued


def _usage_spent(limits: Mapping[str, float], budget: UsageBudget) -> Callable[[], str | None]:
    """What ``budget`` says once a dimension is spent (as UsageBudget.start says it)."""

    def spent() -> str | None:
        now = budget.spent
        for name, limit in limits.items():
            if now[name] >= limit:
                return f"the map's budget of {limit:g} {name} is spent ({now[name]:g} used)"
        return None

    return spent


def _engine_and_checkpoint(
    caller: str,
    fn: Any,
    items: Any,
    *,
    collect: bool,
    options: Mapping[str, Any],
    remote: RemoteCall | None = None,
) -> tuple[Engine[Any, Any], Checkpoint | None]:
    """The engine of a map in this process, and its checkpoint if it has one.

    With ``remote`` (``processes=N`` or ``backend="ray"`` with a keyword only
    this engine serves, see :data:`_HOSTED`), the calls are ``remote``'s: the
    workers there apply ``limit``, ``rate``, ``timeout`` and ``retries``.
    """
    opts = _check_keywords(caller, options)
    _check_fn(fn, caller, setup=opts["setup"] is not None)
    limit = opts["limit"] = _check_limit(opts["limit"])
    rate = as_rates(opts["rate"])
    seconds = _check_timeout(opts["timeout"])
    retry = as_retry(opts["retries"])
    _check_flag("ordered", opts["ordered"])
    _check_flag("return_exceptions", opts["return_exceptions"])
    deadline = _check_deadline(opts["deadline"])
    budget = _check_budget(opts["budget"])
    _check_meter_fn("cost", opts["cost"])
    _check_meter_fn("usage", opts["usage"])
    executor = opts["executor"]
    fn_is_async = is_async_callable(fn)
    _check_executor(executor, fn_is_async)
    progress = opts["progress"]
    check_progress(progress)
    if not isinstance(progress, bool):  # a function: else it fails once, only logged
        check_arity("progress", progress, 1, "each corral.Stats snapshot")
    threshold = _check_monitor(opts["monitor"])
    # The total is the input's len(), taken before it becomes an iterator; only
    # asked for when progress is shown (a user's __len__ may be costly).
    total = total_of(items) if progress is not False else None
    spec = as_checkpoint(
        opts["checkpoint"],
        fn=fn,
        item_id=opts["item_id"],
        fingerprint=opts["fingerprint"],
        resume=opts["resume"],
        serializer=opts["serializer"],
    )
    if opts["item_id"] is not None:  # checked callable by as_checkpoint
        check_arity("item_id", opts["item_id"], 1, "the item", plain=True)
    # A range is kept: a checkpoint's screen slices it (see _ChunkedSource).
    source = items if type(items) is range else _as_items(items)

    call: Call
    on_close: OnClose | None = None
    on_abandon: Callable[[], None] | None = None  # see Engine
    unstarted: Callable[[], int] | None = None  # see Engine
    gates: Waiting | None = None  # see Engine
    retried = _Retried()
    again: Call | None = None  # the call of a retry, when it differs from the first attempt's
    workers: int | None
    limiter: Limiter | None = None
    elastic: int | None = None  # the pool's first size when it follows an adaptive limit
    line: _GateLine | None = None  # a budgeted map's gates (see _GateLine)
    if remote is not None:
        # The workers there take twice their share of the limit (one share
        # running, one queued), so that many calls are kept in flight.
        call = remote
        on_close = remote.close
        on_abandon = remote.abandon
        unstarted = remote.unstarted
        retried = remote.retried
        fixed: int | None = limit
        workers = None if fixed is None else 2 * fixed

        def limit_reader() -> int | None:
            return fixed

    else:
        if isinstance(limit, str | Adaptive):
            limit = Limiter(limit)  # "auto": this map's own adaptive limit
            # Nobody else draws on it: the pool follows its limit (Engine.resize).
            elastic = limit.limit
        if isinstance(limit, Limiter):
            limiter = limit
            # Enough workers for the highest the limit can go (an elastic pool
            # starts at its limit and follows it); a per-key limit caps each
            # key, not the map.
            ceiling = limit.ceiling if limit.key is None else None
            workers = ceiling or DEFAULT_LIMIT

            def limit_reader() -> int | None:
                return limiter.limit if limiter is not None else None
        else:
            workers = limit
            given: int | None = limit

            def limit_reader() -> int | None:
                return given

        timed = False  # the call applies the timeout itself
        if fn_is_async:
            call = fn
        else:
            width = thread_width(executor, workers)
            if width is not None and elastic is None:
                # More calls than threads would only wait for one, their timeout
                # running. (An elastic pool follows its adaptive limit, which
                # learns from the latency, that wait included.)
                workers = width if workers is None else min(workers, width)
            call, on_close = offload(fn, executor, workers, retried, seconds)
            if isinstance(call, ProcessPool):
                on_abandon = call.abandon
            timed = applies_timeout(executor)
        if seconds is not None and not timed:
            call = _with_timeout(call, seconds)
        gate = gate_for(rate)
        # The longest pause a server's Retry-After puts on the Limiter: a wait
        # the retries will not sleep through must not stop its other users.
        max_cooldown = retry.max_retry_after if retry is not None else MAX_COOLDOWN
        if (
            opts["cost"] is not None
            or opts["usage"] is not None
            or isinstance(gate, WeightedGate)
            or (limiter is not None and _weighted_limiter(limiter))
            or (budget is not None and set(budget) != {"requests"})
        ):
            # Weighted accounting (see _usage): one wrapper reserves, settles and budgets.
            spending = UsageBudget(budget) if budget is not None else None
            if spending is not None and (gate is not None or limiter is not None):
                assert budget is not None
                line = _GateLine(_usage_spent(budget, spending), settles=True)
                call = _past_gates(call, line)
            meter = functools.partial(
                metered,
                call,
                Meter(opts["cost"], opts["usage"]),
                gate=gate,
                limiter=limiter,
                budget=spending,
                max_cooldown=max_cooldown,
                under_retries=retry is not None,  # see _with_retries
            )
            waiting = Waiting()
            unstarted = gates = waiting  # items waiting for their first start (see Waiting)
            if retry is not None:
                again = meter(waiting=Waiting())  # a retry's item has started: counts nobody
            call = meter(waiting=waiting)
            if line is not None:
                call = line.wrap(call)
                again = again if again is None else line.wrap(again)
        else:
            if budget is not None:
                gated_too = gate is not None or limiter is not None
                call, line = _with_budget(call, budget["requests"], gated_too)
            assert not isinstance(gate, WeightedGate)  # metered above
            if gate is not None or limiter is not None:
                # Items waiting for their first start are not started (see Waiting).
                waiting = Waiting()
                unstarted = gates = waiting
                gated = _with_gates(call, gate, limiter, max_cooldown, waiting)
                if retry is not None:
                    # A retry waits for its slot again, but its item has
                    # started: the later attempts pass gates that count nobody.
                    again = _with_gates(call, gate, limiter, max_cooldown, Waiting())
                    if line is not None:
                        again = line.wrap(again)
                call = gated if line is None else line.wrap(gated)
        if retry is not None:
            state = None
            if retry.budget is not None:
                assert not isinstance(retry.budget, float | int)  # normalised by Retry
                # Per Limiter when the map draws on one; per map otherwise.
                state = (
                    limiter.retry_budget(retry.budget)
                    if limiter is not None
                    else RetryBudgetState(retry.budget)
                )
            call = _with_retries(call, retry, retried, state, again)
    # checkpoint= (see _checkpoint): outermost, so a recorded item takes no
    # limiter slot, rate token, budget or retry; the file closes with the map.
    checkpoint = None
    recorder = None
    if spec is not None:
        checkpoint = Checkpoint(spec)
        call, recorder = with_checkpoint(call, checkpoint, item_id=spec.item_id)
        on_close = closing(on_close, checkpoint)

    window = None if collect or workers is None else 2 * workers
    if checkpoint is not None and window is not None:
        window += CONSUMER_LAG  # the workers go on while the consumer waits for a commit
    engine: Engine[Any, Any] = Engine(
        call,
        source,
        workers=workers,
        window=window,
        ordered=opts["ordered"],
        collect=collect,
        return_exceptions=opts["return_exceptions"],
        limit_reader=limit_reader,
        retried=retried,
        on_close=on_close,
        deadline=deadline,
        recorder=recorder,
        elastic=elastic,
        on_abandon=on_abandon,
        unstarted=unstarted,
        gates=gates,
    )
    if elastic is not None:
        assert limiter is not None
        limiter._on_limit = engine.resize
    # progress=: a timer that pulls engine.stats() while the run goes (see _progress).
    display = Progress.create(progress, engine.stats, total)
    if display is not None:
        engine.observe(display)
    if threshold is not None:  # monitor=: the loop watch runs exactly as long as the map
        watch = LoopWatch(threshold)
        engine.observe(watch)
        engine.lag_reader = lambda: watch.max_lag
    return engine, checkpoint


# ---------------------------------------------------------------------------
# processes=N: the map runs on N worker processes, each with its own loop and
# engine (see _shard). Checked here like every other keyword, then handed over.
# ---------------------------------------------------------------------------

#: Keywords a sharded map does not take (yet).
_NOT_SHARDED = ("executor", "budget", "cost", "usage", "monitor")

#: Keywords served by an engine in this process in front of the remote workers
#: (see _remote.RemoteCall): with any of them, a map on processes or on Ray is
#: that engine with a call that runs each item remotely.
_HOSTED = ("checkpoint", "deadline", "progress")
#: checkpoint='s own keywords: given without it, the engine's checks refuse them.
_CHECKPOINT_OWN = ("item_id", "fingerprint", "resume", "serializer")


def _given(opts: Mapping[str, Any], name: str) -> bool:
    """Whether keyword ``name`` differs from its default.

    By type as well as value: ``monitor=0`` and ``progress=0`` equal their
    default ``False``, but are values to check (and refuse), not "not given".
    """
    value, default = opts[name], _DEFAULTS[name]
    return not (value is default or (type(value) is type(default) and value == default))


def _hosted(opts: Mapping[str, Any]) -> bool:
    return any(_given(opts, name) for name in (*_HOSTED, *_CHECKPOINT_OWN))


def _weighted_limiter(limiter: Limiter) -> bool:
    """Whether a Limiter's rate is weighted or several windows (it needs weighted accounting)."""
    spec = limiter.rate
    return isinstance(spec, tuple) or (isinstance(spec, Rate) and spec.weighted)


#: The most worker processes ``processes=`` starts: each is an operating-system
#: process with its own interpreter (tens of MB) and sockets, so far more
#: than a machine's cores is a mistake, and a huge number would not fail
#: until a list of that many shares was built (never, for 10**400).
MAX_PROCESSES = 1024


def _check_processes(processes: object) -> int | None:
    if processes is None:
        return None
    if not is_integral(processes) or processes < 1:
        raise ValueError(
            "processes must be an int >= 1 (worker processes, each with its own event "
            f"loop) or None (run in this process); got processes={processes!r}"
        )
    if processes > MAX_PROCESSES:
        raise ValueError(
            f"processes must be at most {MAX_PROCESSES} (worker processes, each an "
            f"operating-system process; this machine has {os.cpu_count()} CPUs); "
            f"got processes={processes!r}"
        )
    return int(processes)  # a numpy int, as limit= takes, made a plain one


def _sharded(
    caller: str, fn: Any, items: Any, options: Mapping[str, Any]
) -> ShardedStream[Any] | RemoteCall | None:
    """The sharded stream when ``processes=`` is given, else None.

    With a keyword of :data:`_HOSTED`, the processes as a call for an engine
    in this process instead.
    """
    opts = _check_keywords(caller, options)
    processes = _check_processes(opts["processes"])
    if processes is None:
        return None
    _check_fn(fn, caller, setup=opts["setup"] is not None)
    opts["limit"] = _check_limit(opts["limit"])
    spec = as_rates(opts["rate"])
    if isinstance(spec, tuple | str) or (spec is not None and spec.weighted):
        raise ValueError(
            "a weighted, adaptive or multiple rate is not available with processes=N; got "
            f"rate={opts['rate']!r} and processes={processes!r}. Drop one of them."
        )
    rate = as_rate(spec)
    seconds = _check_timeout(opts["timeout"])
    retry = as_retry(opts["retries"])
    _check_flag("ordered", opts["ordered"])
    _check_flag("return_exceptions", opts["return_exceptions"])
    for name in _NOT_SHARDED:
        if _given(opts, name):
            raise ValueError(
                f"{name}= is not available with processes=N; got {name}={opts[name]!r} "
                f"and processes={processes!r}. Drop one of them."
            )
    if _hosted(opts):
        return sharded_call(
            fn, processes=processes, limit=opts["limit"], rate=rate, timeout=seconds, retry=retry
        )
    return map_sharded(
        fn,
        _as_items(items),
        processes=processes,
        limit=opts["limit"],
        rate=rate,
        ordered=opts["ordered"] if caller == "map" else True,
        timeout=seconds,
        retry=retry,
        return_exceptions=opts["return_exceptions"],
    )


# ---------------------------------------------------------------------------
# backend="ray": the map runs on a Ray cluster's async actors (see _ray).
# ---------------------------------------------------------------------------

#: Keywords that mean something with backend="ray" only.
_RAY_ONLY = ("ray_address", "ray_actors", "setup")
#: Keywords a map on Ray takes; every other one must keep its default there.
_ON_RAY = frozenset(
    {
        "limit",
        "ordered",
        "timeout",
        "retries",
        "return_exceptions",
        "backend",
        *_RAY_ONLY,
        *_HOSTED,
        *_CHECKPOINT_OWN,
    }
)


def _on_ray(
    caller: str, fn: Any, items: Any, options: Mapping[str, Any]
) -> RayStream[Any] | RemoteCall | None:
    """The stream of a map on Ray when ``backend="ray"``, else None.

    With a keyword of :data:`_HOSTED`, the actors as a call for an engine in
    this process instead.
    """
    opts = _check_keywords(caller, options)
    if opts["backend"] != "ray":
        return None
    check_setup(opts["setup"])
    if opts["setup"] is not None:
        check_arity("setup", opts["setup"], 0, "no argument")
    _check_fn(fn, caller, setup=opts["setup"] is not None)
    limit = opts["limit"] = _check_limit(opts["limit"])
    seconds = _check_timeout(opts["timeout"])
    retry = as_retry(opts["retries"])
    _check_flag("ordered", opts["ordered"])
    _check_flag("return_exceptions", opts["return_exceptions"])
    check_address(opts["ray_address"])
    actors = check_actors(opts["ray_actors"])
    for name in _DEFAULTS:
        if name not in _ON_RAY and _given(opts, name):
            raise ValueError(
                f"{name}= is not available with backend='ray'; got {name}={opts[name]!r} "
                "and backend='ray'. Drop one of them."
            )
    if not (limit is None or (isinstance(limit, int) and not isinstance(limit, bool))):
        raise ValueError(
            "backend='ray' splits an int limit across its actors; a Limiter or an adaptive "
            f"limit lives in this process. Pass an int or None; got limit={limit!r} and "
            "backend='ray'"
        )
    if _hosted(opts):
        return ray_call(
            fn,
            address=opts["ray_address"],
            setup=opts["setup"],
            actors=actors,
            limit=limit,
            timeout=seconds,
            retry=retry,
        )
    return map_on_ray(
        fn,
        _as_items(items),
        address=opts["ray_address"],
        setup=opts["setup"],
        actors=actors,
        limit=limit,
        ordered=opts["ordered"] if caller == "map" else True,
        timeout=seconds,
        retry=retry,
        return_exceptions=opts["return_exceptions"],
    )


async def _collect(stream: RemoteStream[Any]) -> list[Any]:
    async with stream:
        return [result async for result in stream]


def _remote(
    caller: str, fn: Any, items: Any, options: Mapping[str, Any]
) -> RemoteStream[Any] | RemoteCall | None:
    """A map on Ray or on processes (its stream, or a call for an engine here), else None."""
    on_ray = _on_ray(caller, fn, items, options)
    if on_ray is not None:
        return on_ray
    return _sharded(caller, fn, items, options)


# ---------------------------------------------------------------------------
# The public functions
# ---------------------------------------------------------------------------


@overload
def map(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    **options: Unpack[Options],
) -> ResultStream[R]: ...
@overload
def map(
    fn: Callable[[T], R], items: Iterable[T] | AsyncIterable[T], **options: Unpack[Options]
) -> ResultStream[R]: ...
@overload
def map(
    fn: Callable[[T, S], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    *,
    setup: Callable[[], Awaitable[S]] | Callable[[], S],
    **options: Unpack[_OptionsBesidesSetup],
) -> ResultStream[R]: ...
def map(
    fn: Callable[..., Any], items: Iterable[Any] | AsyncIterable[Any], **options: Unpack[Options]
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
        limit: the most calls in flight (default 100): an int >= 1, ``None`` for
            no bound (like ``asyncio.gather``), ``"auto"`` to find and follow the
            service's capacity from latency and failures (or a
            :class:`corral.Adaptive` to bound it), or a shared :class:`corral.Limiter`.
        rate: the most call starts per time: ``20`` (per second), ``"20/s"``,
            ``"600/min"``, ``"5/100ms"`` or ``corral.Rate(20, per=1.0, burst=5)``;
            ``"auto"`` finds and follows the rate the service allows (slow
            start, then a cut on each 429/503, additive growth after);
            a weighted rate of several dimensions,
            ``corral.Rate({"requests": 500, "output_tokens": 40_000}, per=60)``,
            spends each call's ``cost`` and settles its ``usage``; a list of
            rates enforces them all (per minute and per day).
        ordered: results in input order (``True``, default) or as they complete.
        timeout: seconds per attempt; a late attempt raises ``TimeoutError``,
            which is retried like any transient failure. The clock measures
            the attempt: for an ``async def`` fn, the await of ``fn(item)``;
            for a plain ``def`` in threads, from the call's start (the map
            runs no more calls than there are threads, so none waits for one,
            unless a late call, abandoned but still running in its thread,
            holds it);
            with ``executor="process"``, from when the item is sent to an
            idle worker process (never the wait for one), and a late call's
            process is terminated and replaced; with a given
            ``ProcessPoolExecutor``, from when the item is submitted (at most
            one per process of the pool), including any wait for a process
            the pool starts or others keep busy, and a late call cannot be
            stopped there: it runs on, holding its process.
        retries: extra attempts (an int, default 0), or a :class:`corral.Retry`.
            A worker waiting to retry an item keeps its place in ``limit``; a
            shared Limiter's slot is given back during the wait. Retries draw
            on a retry budget (``Retry(budget=)``): about 10% of the calls
            that succeed, shared by every map using one Limiter, else per map
            (split among its processes or Ray actors); a retry beyond it fails
            the item with :class:`corral.RetryBudgetExhausted`. A Retry-After
            pauses a shared Limiter for at most ``Retry.max_retry_after``
            (120 s by default; 120 s too when there are no retries).
        return_exceptions: ``False`` (default): the first failure (after its
            retries) cancels everything in flight and is raised as itself.
            ``True``: the exception object takes the item's place.
        processes: run the map on this many worker processes, each with its
            own event loop and engine, for ``async def`` calls that also use
            CPU; ``limit`` is split among them, ``rate`` stays global, ``stats``
            add up. ``fn`` must be importable (defined at module level).
            With ``checkpoint``, ``deadline`` or ``progress``, corral's engine
            runs in this process in front of the workers: it pulls, records,
            replays and orders, and the workers make the calls.
        backend: ``"local"`` (default): this process. ``"ray"``: long-lived
            async actors on a Ray cluster (the ``corral[ray]`` extra), one
            per CPU of the cluster (or ``ray_actors``), each running corral's
            engine on its share of an int ``limit``; chunks of the input are
            fed lazily and results merged in input order (or as completed).
            A killed actor is restarted and its unfinished chunk re-run:
            results stay exactly once, side effects are at-least-once. Takes
            ``limit``, ``ordered``, ``timeout``, ``retries``,
            ``return_exceptions``, and ``checkpoint``, ``deadline`` and
            ``progress`` (kept by this process, as with ``processes``);
            other keywords are refused.
        ray_address: the Ray cluster to use (``"10.0.0.5:6379"``, ``"auto"``,
            ``"ray://host:10001"``); default ``RAY_ADDRESS``, else a local
            cluster on 127.0.0.1 (no dashboard) that corral starts on first
            use and shuts down when the interpreter exits.
        ray_actors: how many actors (default: one per CPU of the cluster).
        setup: a function of no argument (or ``async def``) run once per
            actor; its return value (e.g. an HTTP session, which cannot be
            pickled) is passed to ``fn`` as a second argument, and closed
            (``aclose()``/``close()``) when the map ends.
        executor: for a plain ``def`` fn: ``None``/``"thread"``, ``"process"``,
            or a ``concurrent.futures.Executor`` that corral uses but does not
            shut down.
        deadline: seconds for the whole map. When it passes no call starts, the
            calls in flight are cancelled, and :class:`corral.DeadlineExceeded`
            is raised after the results already produced were handed out. With
            ``return_exceptions=True`` nothing is raised: each cancelled call
            yields one in its item's place, and so does every item not
            started, in input order, so each item has its one outcome (for an
            endless input, the consumer decides when to stop reading).
        budget: what the whole map may spend: ``{"requests": N}`` starts at
            most N calls (retries count); any dimension the usage reports too,
            like ``{"output_tokens": 2_000_000, "requests": 50_000}``. A soft
            cap, checked before each start: the overshoot is at most what the
            calls in flight spend. Once reached no call starts, the calls in
            flight finish, and :class:`corral.BudgetExhausted` is raised after
            the results were handed out.
        cost: a function of the item returning what its call is expected to
            spend, per dimension: ``{"input_tokens": 1200, "output_tokens":
            500}`` (one request is implied; ``"requests"``, if named, is >= 1).
            Reserved on every weighted rate
            (the map's and its Limiter's) before each attempt starts; an
            attempt that fails keeps it spent unless the error carries a
            ``usage`` attribute. Default: one request, no tokens.
        usage: a function of the result returning what the call spent, per
            dimension (dimensions it leaves out keep their reservation; None
            keeps all). The difference from ``cost`` is refunded to the rates
            or carried as debt that delays later starts, and counted against
            ``budget``. Default: :func:`corral.token_usage`, which reads the
            ``usage`` of OpenAI and Anthropic responses.
        progress: ``True``: a live display on stderr (needs the
            ``corral[progress]`` extra): done / total (when ``items`` has a
            ``len()``), rate, calls in flight, limit, failures, retries, ETA;
            a plain line every few seconds when stderr is not a terminal. A
            plain function instead receives :class:`corral.Stats` snapshots, a
            few per second and a final one; if it raises, the error is logged
            on the ``corral`` logger, it is not called again, and the map goes on.
        monitor: ``True`` (or a threshold in seconds; ``True`` means 0.1): watch
            the event loop while the map runs and report every call that
            blocks it longer than that, as :func:`corral.watch_loop` does
            (warnings on the ``corral`` logger); ``stats.max_loop_lag`` then
            holds the loop's worst lag. ``CORRAL_MONITOR=1`` in the
            environment turns it on for every map.
        checkpoint: the path of a SQLite file recording every result (and,
            with ``return_exceptions=True``, every final failure) before it is
            handed out; run the same map with the same file again and the
            recorded items replay without calling ``fn``. See ``item_id``,
            ``fingerprint``, ``resume`` and ``serializer``.
        item_id: a function giving each item's id (a str, int, bytes or
            tuple of those), under which its result is recorded; default:
            the item itself, which must then be such a value. Items with the
            same id are one item: ``fn`` runs once, each yields its result.
            Called once per item (again only after it raised); for a plain
            (not async) input, as the item is pulled: up to 256 items, and
            at most ``limit``, ahead of its call.
        fingerprint: what produced the recorded results (``"prompt-v3"``);
            default: ``fn``'s ``module:qualname``. Resuming a file recorded
            with another fingerprint is an error, unless
            ``resume="ignore-fingerprint"`` (default ``"strict"``).
        serializer: ``"pickle"`` (default) or ``"json"``: how results other
            than plain str/int/float/None are stored; a result it cannot
            store stops the map at once with an error naming the item.

    The returned stream also has ``.stats`` (a :class:`corral.Stats` snapshot)
    and ``.cancel()`` (stop early, keeping what is done).

    Raises:
        TypeError, ValueError: at once, for a bad argument (the message names it).
    """
    remote = _remote("map", fn, items, options)
    if isinstance(remote, RemoteStream):
        return remote
    engine, checkpoint = _engine_and_checkpoint(
        "map", fn, items, collect=False, options=options, remote=remote
    )
    if checkpoint is not None:  # results handed out only once recorded
        return CheckpointedStream(engine, checkpoint)
    return ResultStream(engine)


@overload
async def gather(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    **options: Unpack[Options],
) -> list[R]: ...
@overload
async def gather(
    fn: Callable[[T], R], items: Iterable[T] | AsyncIterable[T], **options: Unpack[Options]
) -> list[R]: ...
@overload
async def gather(
    fn: Callable[[T, S], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    *,
    setup: Callable[[], Awaitable[S]] | Callable[[], S],
    **options: Unpack[_OptionsBesidesSetup],
) -> list[R]: ...
async def gather(
    fn: Callable[..., Any], items: Iterable[Any] | AsyncIterable[Any], **options: Unpack[Options]
) -> list[Any]:
    """Call ``fn`` on every item like :func:`map` and return the results as a list.

    The list is in input order, whatever ``ordered`` says. Takes the same
    keywords as :func:`map`.
    """
    remote = _remote("gather", fn, items, options)
    if isinstance(remote, RemoteStream):
        return await _collect(remote)
    engine, _ = _engine_and_checkpoint(
        "gather", fn, items, collect=True, options=options, remote=remote
    )
    return await engine.run_to_end()


@overload
def run(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    *,
    uvloop: bool | None = ...,
    **options: Unpack[Options],
) -> builtins.list[R]: ...
@overload
def run(
    fn: Callable[[T], R],
    items: Iterable[T] | AsyncIterable[T],
    *,
    uvloop: bool | None = ...,
    **options: Unpack[Options],
) -> builtins.list[R]: ...
@overload
def run(
    fn: Callable[[T, S], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    *,
    setup: Callable[[], Awaitable[S]] | Callable[[], S],
    uvloop: bool | None = ...,
    **options: Unpack[_OptionsBesidesSetup],
) -> builtins.list[R]: ...
def run(
    fn: Callable[..., Any],
    items: Iterable[Any] | AsyncIterable[Any],
    *,
    uvloop: bool | None = None,
    **options: Unpack[Options],
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
    remote = _remote("run", fn, items, options)
    if isinstance(remote, RemoteStream):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_collect(remote))
    engine, checkpoint = _engine_and_checkpoint(
        "run", fn, items, collect=True, options=options, remote=remote
    )
    # Ctrl-C: asyncio cancels the map, which keeps what is done; then say how to resume.
    with resume_hint(checkpoint), asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(engine.run_to_end())


def _loop_factory(use_uvloop: bool | None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if use_uvloop is not None and not isinstance(use_uvloop, bool):
        # Else "no" or 0, being neither False nor None, would pick uvloop.
        raise TypeError(
            "uvloop must be True (require uvloop), False (the standard loop) or None (uvloop "
            f"when installed); got uvloop={use_uvloop!r}"
        )
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
