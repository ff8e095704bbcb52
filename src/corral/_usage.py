"""Cost and usage: what a call is expected to spend, what it spent, and the map's budget.

``corral.map(fn, items, cost=estimate, usage=actual)``:

- ``cost(item)`` returns the amounts a call is expected to spend, per
  dimension (``{"input_tokens": 1200, "output_tokens": 500}``; one request is
  implied, and a ``requests`` amount, if named, is >= 1). They are
  *reserved* on every weighted rate (the map's and its Limiter's) before the
  call starts, each attempt on a copy of its own.
- ``usage(result)`` returns what it actually spent. The difference is
  *settled*: refunded, or carried as debt that delays later starts (see
  :mod:`corral._weighted`). Dimensions it leaves out keep their reservation;
  None keeps all of it.
- A failed attempt spends its reservation, unless its usage can be read from
  the error: an exception with a ``usage`` attribute (a mapping of
  dimensions, or a provider's usage object) settles like a result.

Without ``usage=``, :func:`token_usage` reads the ``usage`` of OpenAI's and
Anthropic's response objects (and of their JSON as dicts), duck-typed.

``budget={"output_tokens": 2_000_000, "requests": 50_000}`` caps what the
whole map may spend, on any dimension the usage reports (``requests`` are
counted at each start). It is a soft cap: the check happens before each
start, so the map overshoots by at most what the calls already in flight
spend; once it is reached no call starts and the map ends with
:class:`corral.BudgetExhausted` after handing out what is done.
"""

from __future__ import annotations

import asyncio
import functools
import math
import reprlib
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._engine import Halt
from ._errors import BudgetExhausted
from ._headers import read_rate_limits
from ._rate import RateGate
from ._stats import Waiting
from ._weighted import MAX_AMOUNT, WeightedGate

if TYPE_CHECKING:
    # Imported where used at run time: _limits checks a Limiter's costs with
    # _checked() below, so it imports this module first.
    from ._limits import Limiter

__all__ = ["Meter", "NoRetry", "UsageBudget", "metered", "token_usage"]

Usage = Mapping[str, float]
Call = Callable[[Any], Awaitable[Any]]

#: The largest amount taken (and token count read): the rate gates and the
#: budget add amounts up in floats, and past it a sum could overflow to inf
#: (see corral._weighted.MAX_AMOUNT).
_MAX = MAX_AMOUNT


def _get(obj: object, name: str) -> Any:
    """``obj.name`` or ``obj[name]``; None when neither (or reading it raises)."""
    # Per call, so the common shapes go first: a dict (parsed JSON), then any
    # object with attributes (SDK models); the Mapping ABC check is slow.
    if type(obj) is dict:
        return obj.get(name)
    try:
        value = getattr(obj, name, None)
        if value is None and isinstance(obj, Mapping):
            return obj.get(name)
    except Exception:
        return None
    return value


def _count(obj: object, name: str) -> float | None:
    return _num(_get(obj, name))


def _num(value: object) -> float | None:
    """A token count: a number from 0 to ``_MAX``, as a float; anything else None."""
    kind = type(value)
    if (kind is int or kind is float) and 0 <= value <= _MAX:  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= _MAX:
        return float(value)  # NumPy numbers and other subclasses
    return None


def token_usage(result: object, *, cache_reads: bool = True) -> dict[str, float] | None:
    """The tokens an LLM response reports, as ``input_tokens``, ``output_tokens``, ``tokens``.

    The default ``usage=`` of :func:`corral.map`. Duck-typed, no import: reads
    ``result.usage`` (or ``result["usage"]`` for parsed JSON) with

    - OpenAI Chat Completions: ``prompt_tokens`` -> input, ``completion_tokens`` -> output;
    - OpenAI Responses and Anthropic Messages: ``input_tokens``, ``output_tokens``;
    - Anthropic's ``cache_creation_input_tokens`` and ``cache_read_input_tokens``
      added to the input (Anthropic leaves them out of ``input_tokens``).

    ``tokens`` is input + output (OpenAI's TPM counts both).

    Args:
        result: what ``fn`` returned (or an exception carrying ``usage``).
        cache_reads: whether tokens read from a prompt cache count as input.
            Anthropic does not count them against its input-tokens-per-minute
            limit for most models: pass ``cache_reads=False`` (e.g.
            ``usage=functools.partial(corral.token_usage, cache_reads=False)``)
            to leave them out (OpenAI's ``cached_tokens`` are then subtracted).

    A count that is missing reads as 0; one that is present but unreadable
    (not a number, negative, NaN, above 1e200) is left out, with
    ``tokens``, so that dimension keeps its reservation.

    Returns:
        The amounts, or None when ``result`` has no readable usage.
    """
    if type(result) is dict:
        usage = result.get("usage")
    else:
        try:
            usage = getattr(result, "usage", None)
        except Exception:
            return None
        if usage is None and isinstance(result, Mapping):
            usage = result.get("usage")
    if usage is None:
        return None
    # Read the fields from a dict when there is one (parsed JSON, or the
    # __dict__ of an SDK's model object): a missing attribute costs an
    # exception inside getattr, a missing key costs nothing.
    fields = usage if type(usage) is dict else getattr(usage, "__dict__", None)
    get: Callable[[str], Any] = (
        fields.get if type(fields) is dict else functools.partial(_get, usage)
    )

    # Raw values first, checked only when present: this runs once per call,
    # so a plain int or float (what JSON and the SDKs give) is checked inline
    # and kept as it is (an int is a fine amount).
    raw_in, raw_out = get("input_tokens"), get("output_tokens")
    details = "input_tokens_details"
    if raw_in is None and raw_out is None:
        raw_in, raw_out = get("prompt_tokens"), get("completion_tokens")
        details = "prompt_tokens_details"
        if raw_in is None and raw_out is None:
            return None
    # A count that is absent reads as 0 (an SDK's optional field, the output
    # of an embeddings call); one that is there but unreadable (a string,
    # NaN, a negative or huge number) is left out, so its reservation stands
    # instead of being refunded whole.
    kind = type(raw_in)
    if (kind is int or kind is float) and 0 <= raw_in <= _MAX:
        input_tokens: float | None = raw_in
    else:
        input_tokens = 0.0 if raw_in is None else _num(raw_in)
    kind = type(raw_out)
    if (kind is int or kind is float) and 0 <= raw_out <= _MAX:
        output_tokens: float | None = raw_out
    else:
        output_tokens = 0.0 if raw_out is None else _num(raw_out)
    raw_read, raw_write = get("cache_read_input_tokens"), get("cache_creation_input_tokens")
    if raw_read is not None or raw_write is not None:
        # Anthropic: the cache's tokens are reported apart from input_tokens.
        cache_write = 0.0 if raw_write is None else _num(raw_write)
        cache_read = 0.0 if raw_read is None or not cache_reads else _num(raw_read)
        if input_tokens is not None:
            if cache_write is None or cache_read is None:
                input_tokens = None  # part of the input unreadable: keep its reservation
            else:
                input_tokens += cache_write + cache_read
    elif not cache_reads and input_tokens is not None:
        # OpenAI: prompt/input tokens include the cached ones.
        cached = _count(_get(usage, details), "cached_tokens")
        if cached:
            input_tokens = max(0.0, input_tokens - cached)
    if input_tokens is None or output_tokens is None:
        if input_tokens is not None:
            return {"input_tokens": input_tokens}
        if output_tokens is not None:
            return {"output_tokens": output_tokens}
        return None
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "tokens": input_tokens + output_tokens,
    }


#: ``subject`` of :func:`_checked` for amounts given to a Limiter method directly.
_GIVEN = object()


class _AttemptCost(dict[str, float]):
    """A map's cost for one attempt: checked, and copied, so it is this attempt's alone.

    The type tells :meth:`corral.Limiter.acquire` that the check is done: it
    would cost more per call than the copy.
    """

    __slots__ = ()


def _checked(what: str, amounts: object, subject: object = _GIVEN) -> Usage:
    """``amounts`` if it is a mapping of dimension -> number from 0 to 1e200; else a clear error.

    ``requests``, when named, must be >= 1: every call that starts is at
    least one request, and a smaller amount would let starts through the
    request rate unchecked. ``subject`` is what a map's ``cost=`` (or
    ``usage=``) function was given; left out, ``amounts`` came to a Limiter
    method as its argument ``what``, and the message names it so.
    """
    if type(amounts) is dict:
        # The common case, checked with exact types first: this runs per call.
        for name, value in amounts.items():
            kind = type(value)
            if not ((kind is int or kind is float) and 0 <= value <= _MAX and type(name) is str):
                break
        else:
            if amounts.get("requests", 1.0) >= 1:
                return amounts
    given = subject is _GIVEN
    if not isinstance(amounts, Mapping):
        example = "{'input_tokens': 1200, 'output_tokens': 500}"
        if given:
            raise TypeError(
                f"{what} must be a dict of amounts per dimension, like {example}, or None; "
                f"got {what}={amounts!r}"
            )
        raise TypeError(
            f"{what} must return a dict of amounts per dimension, like {example}, or None; "
            f"got {amounts!r} for {subject!r}"
        )
    for name, value in amounts.items():
        if (
            not isinstance(name, str)
            or isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 <= value < math.inf  # NaN, negative or infinite
        ):
            if given:
                raise ValueError(
                    f"{what} must hold amounts >= 0 (finite numbers) named by strings; "
                    f"got {what}={amounts!r}"
                )
            raise ValueError(
                f"{what} must return amounts >= 0 (finite numbers) named by strings; "
                f"got {dict(amounts)!r} for {subject!r}"
            )
        if value > _MAX:  # an int past any float too
            if given:
                raise ValueError(
                    f"{what} must hold amounts of at most {_MAX:g} (the rates add them up "
                    f"in floats); got {what}={amounts!r}"
                )
            raise ValueError(
                f"{what} must return amounts of at most {_MAX:g} (the rates add them up "
                f"in floats); got {dict(amounts)!r} for {subject!r}"
            )
    if amounts.get("requests", 1.0) < 1:
        if given:
            raise ValueError(
                f"{what}['requests'] must be >= 1 (a call is at least one request); "
                f"got {what}={amounts!r}"
            )
        raise ValueError(
            f"{what} must return 'requests' >= 1 (a call is at least one request); "
            f"got {dict(amounts)!r} for {subject!r}"
        )
    return amounts


class NoRetry(Exception):
    """Carries ``error``, which fails its item at once, whatever ``Retry(on=)`` says.

    :func:`metered` raises it under retries for an error of ``cost=`` (no
    call was made: calling again fails again) or of reading the usage (the
    call succeeded and was paid for: calling again pays twice). The retry
    wrapper raises ``error`` in its place.
    """

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def _add_note(exc: BaseException, note: str) -> None:
    try:
        exc.add_note(note)
    except Exception:
        pass  # an exception that refuses attributes (a frozen dataclass) stays as it is


class Meter:
    """A map's ``cost=`` and ``usage=``, checked on every call."""

    __slots__ = ("_cost", "_usage", "read_usage")

    def __init__(
        self,
        cost: Callable[[Any], Usage | None] | None,
        usage: Callable[[Any], Usage | None] | None,
    ) -> None:
        self._cost = cost
        self._usage = usage
        # What reads a result's usage per call; the built-in reader returns
        # checked amounts, so it needs no check on top.
        self.read_usage: Callable[[Any], Usage | None] = (
            token_usage if usage is None else self.usage_of
        )

    def cost_of(self, item: Any) -> Usage | None:
        """The reservation for ``item``'s call: a copy of ``cost(item)``, or None (one request)."""
        cost = self._cost
        if cost is None:
            return None
        try:
            amounts = cost(item)
        except Exception as exc:
            _add_note(
                exc,
                f"raised by cost={cost!r} for the item {reprlib.repr(item)}: "
                "no call was made, and none is retried",
            )
            raise
        # Each attempt gets a mapping of its own: the rate gates tell a
        # reservation by its mapping's identity (the latest start's from the
        # others'), which one dict returned for every item would defeat; and
        # the caller may reuse or change its dict once this call has started.
        if type(amounts) is dict:
            # _checked()'s common case, inline: this runs before every call.
            for name, value in amounts.items():
                kind = type(value)
                if not (
                    (kind is float or kind is int) and 0 <= value <= _MAX and type(name) is str
                ):
                    break
            else:
                if amounts.get("requests", 1.0) >= 1:
                    return _AttemptCost(amounts)
        return None if amounts is None else _AttemptCost(_checked("cost", amounts, item))

    def usage_of(self, result: Any) -> Usage | None:
        """What the call that returned ``result`` spent, or None when unknown."""
        if self._usage is None:
            return token_usage(result)
        amounts = self._usage(result)
        return None if amounts is None else _checked("usage", amounts, result)

    def usage_failed(self, exc: BaseException, item: Any, result: Any) -> None:
        """Say on ``exc`` that reading the usage of ``item``'s result raised it."""
        # The type and message stay the reader's own (Retry(on=) and the
        # caller read them as ever); the result is lost with this error.
        reader = token_usage if self._usage is None else self._usage
        _add_note(
            exc,
            f"raised reading with usage={reader!r} the result {reprlib.repr(result)} "
            f"of the item {reprlib.repr(item)}: the call succeeded, so it is not retried",
        )

    @staticmethod
    def usage_of_error(exc: BaseException) -> Usage | None:
        """What a failed attempt spent, when the error carries a ``usage``; else None."""
        usage = _get(exc, "usage")
        if usage is None:
            return None
        if isinstance(usage, Mapping):
            try:
                return _checked("the error's usage", usage, exc)
            except (TypeError, ValueError):
                return None  # unreadable: the reservation stands
        return token_usage(exc)


class UsageBudget:
    """What the whole map may spend: ``{"output_tokens": 2_000_000, "requests": 50_000}``."""

    __slots__ = ("_limits", "_spent")

    def __init__(self, limits: Mapping[str, float]) -> None:
        self._limits = dict(limits)
        self._spent = dict.fromkeys(limits, 0.0)

    @property
    def spent(self) -> dict[str, float]:
        """What was spent so far per dimension (reservations of calls in flight included)."""
        return dict(self._spent)

    def start(self, cost: Usage | None) -> None:
        """Before a start: stop the map if a dimension is spent; else reserve ``cost``.

        Raises:
            Halt: carrying :class:`corral.BudgetExhausted`.
        """
        spent, limits = self._spent, self._limits
        for name, limit in limits.items():
            if spent[name] >= limit:
                raise Halt(
                    BudgetExhausted(
                        f"the map's budget of {limit:g} {name} is spent ({spent[name]:g} used)"
                    )
                )
        for name in limits:
            amount = 1.0 if name == "requests" else 0.0
            if cost is not None:
                amount = cost.get(name, amount)
            spent[name] += amount

    def settle(self, reserved: Usage | None, used: Usage | None) -> None:
        """Replace a reservation by the usage reported (dimensions it names)."""
        if not used:
            return
        spent = self._spent
        for name in self._limits:
            actual = used.get(name)
            if actual is not None:
                before = 1.0 if name == "requests" else 0.0
                if reserved is not None:
                    before = reserved.get(name, before)
                spent[name] += actual - before


def sync_gate(gate: RateGate | WeightedGate, headers: Any) -> None:
    """Clamp a map's own rate to a provider's rate-limit headers."""
    for dimension, remaining, reset, limit in read_rate_limits(headers):
        gate.clamp(dimension, remaining, reset, limit)


def _no_clock() -> float:
    return 0.0


def headers_of(exc: BaseException) -> Any:
    headers = _get(exc, "headers")
    return headers if headers is not None else _get(_get(exc, "response"), "headers")


def metered(
    call: Call,
    meter: Meter,
    *,
    gate: RateGate | WeightedGate | None,
    limiter: Limiter | None,
    budget: UsageBudget | None,
    max_cooldown: float | None = None,
    under_retries: bool = False,
    waiting: Waiting | None = None,
) -> Call:
    """Wrap ``call`` with reservations, settlement and the budget, per attempt.

    In order: the item's cost is computed; the Limiter's slot (and its
    rate, reserving the cost) is taken; the map's own rate reserves it too;
    the budget is checked. The call runs; its usage (or an error's) settles
    every reservation. A failure with rate-limit headers (a 429's) clamps
    the rates to them, and a Retry-After cools the Limiter down, as for
    any Limiter, for at most ``max_cooldown`` seconds (the map's
    ``Retry.max_retry_after``; None: the Limiter's own default cap); an
    adaptive Limiter (or one with ``rate="auto"``) learns from the latency
    and outcome.

    An error of ``cost=`` (no call is made) or of reading the usage (the
    call succeeded; its reservations stand, as for an unknown usage) fails
    the item at once: with ``under_retries`` it is raised wrapped in
    :class:`NoRetry`, which the retry wrapper around this one unwraps
    instead of calling again.

    ``waiting`` counts the items waiting for their slot or their turn under
    the rates (not started yet, see :class:`~corral._stats.Waiting`).
    """
    from ._limits import MAX_COOLDOWN, Limiter

    if waiting is None:
        waiting = Waiting()

    cap = MAX_COOLDOWN if max_cooldown is None else max_cooldown
    cost_of, usage_of, usage_of_error = meter.cost_of, meter.read_usage, meter.usage_of_error
    keyed = limiter is not None and limiter.key is not None
    # Whether each call's end is reported: an adaptive limit learns from its
    # latency, rate="auto" from its outcome (Limiter.record_success does both).
    timed = limiter is not None and (limiter.adaptive is not None or limiter.auto_rate)
    auto: Any = gate if gate is not None and hasattr(gate, "feedback") else None  # rate="auto"
    weighted = gate if isinstance(gate, WeightedGate) else None

    def settle_everywhere(own: Limiter | None, cost: Usage | None, used: Usage) -> None:
        """Settle a call's reservation against what it used, everywhere it was reserved."""
        if weighted is not None:
            weighted.settle(cost, used)
        if own is not None:
            if type(own).settle is Limiter.settle:
                # All Limiter.settle does but check ``used`` again, which
                # was checked where it was read (a key's Limiter is key-less).
                own_gate = own._gate
                if isinstance(own_gate, WeightedGate):
                    own_gate.settle(cost, used)
            else:
                own.settle(cost, used)
        if budget is not None:
            budget.settle(cost, used)

    def failed(own: Limiter | None, cost: Usage | None, exc: BaseException, now: float) -> None:
        """After a failed attempt: settle what the error says it used, follow its headers."""
        if auto is not None:
            auto.feedback(exc, now)
        if not isinstance(exc, Exception):
            return  # cancelled: the reservation stands, nothing to learn
        used = usage_of_error(exc)
        if used:
            settle_everywhere(own, cost, used)
        headers = headers_of(exc)
        if headers is not None:
            if own is not None:
                own.sync_headers(headers)
            if gate is not None:
                sync_gate(gate, headers)

    if limiter is not None and not keyed and not timed and gate is None and budget is None:
        # The common case, one shared Limiter (a weighted one, usually): its
        # methods looked up once, no clock read, nothing else to settle.
        acquire, release = limiter.acquire, limiter.release
        settle: Callable[[Usage | None, Usage | None], None] = limiter.settle
        own_gate = limiter._gate
        if type(limiter).settle is Limiter.settle and isinstance(own_gate, WeightedGate):
            settle = own_gate.settle  # all that Limiter.settle does for a key-less Limiter

        async def limited(item: Any) -> Any:
            try:
                cost = cost_of(item)
            except Exception as exc:
                if under_retries:  # a bug: calling again fails again
                    raise NoRetry(exc) from exc
                raise
            # acquire() alone when there is no cost: a Limiter subclass may not take one.
            cell = waiting.cell  # a call the engine times: see Waiting
            if cell is not None:
                waiting.cell = None
            waiting.count += 1
            try:
                await (acquire() if cost is None else acquire(cost))
            finally:
                waiting.count -= 1
            if cell is not None:
                cell[0] = asyncio.get_running_loop().time()
            try:
                value = await call(item)
            except BaseException as exc:
                try:
                    failed(limiter, cost, exc, 0.0)
                    limiter.record_error(0.0, exc, max_cooldown=cap)
                finally:
                    release()
                raise
            try:
                try:
                    used = usage_of(value)
                except Exception as exc:
                    meter.usage_failed(exc, item, value)
                    raise
                if used:
                    settle(cost, used)
            except Exception as exc:
                # The call succeeded and was paid for: calling again would pay twice.
                if under_retries:
                    raise NoRetry(exc) from exc
                raise
            finally:
                release()
            return value

        return limited

    async def run(item: Any) -> Any:
        try:
            cost = cost_of(item)
        except Exception as exc:
            if under_retries:  # a bug: calling again fails again
                raise NoRetry(exc) from exc
            raise
        own = limiter.for_item(item) if keyed else limiter  # type: ignore[union-attr]
        cell = waiting.cell  # a call the engine times: see Waiting
        if cell is not None:
            waiting.cell = None
        waiting.count += 1
        try:
            if own is not None:
                await (own.acquire() if cost is None else own.acquire(cost))
            try:
                if gate is not None and not gate.wait_nowait(cost):
                    await gate.wait(cost)
                if budget is not None:
                    budget.start(cost)
            except BaseException:
                if own is not None:
                    own.release()  # a slot held, but no call will start
                raise
        finally:
            waiting.count -= 1
        # The loop's clock only for what reads it: no clock read per call otherwise.
        clock = asyncio.get_running_loop().time if timed or auto is not None else _no_clock
        began = clock() if timed else 0.0
        if cell is not None:
            cell[0] = began if timed else asyncio.get_running_loop().time()
        try:
            value = await call(item)
        except BaseException as exc:
            try:
                now = clock()
                failed(own, cost, exc, now)
                if own is not None:
                    own.record_error(now - began if timed else 0.0, exc, max_cooldown=cap)
            finally:
                if own is not None:
                    own.release()
            raise
        if auto is not None:
            auto.success()
        try:
            try:
                used = usage_of(value)
            except Exception as exc:
                meter.usage_failed(exc, item, value)
                raise
            if used:
                settle_everywhere(own, cost, used)
        except Exception as exc:
            # The call succeeded and was paid for: calling again would pay twice.
            if under_retries:
                raise NoRetry(exc) from exc
            raise
        finally:
            if own is not None:
                if timed:
                    now = clock()
                    own.record_success(now - began, now)
                own.release()
        return value

    return run
