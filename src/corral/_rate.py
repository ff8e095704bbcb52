"""Rates: what "20 per second" means, and a gate that keeps starts to it.

A :class:`Rate` is how often a call may start, like an API's "20 requests
per second"; a :class:`RateGate` enforces one on an event loop (inside a
:class:`~corral.Limiter`, or inside one ``corral.map``). A rate with several
dimensions (requests and tokens) goes to :mod:`corral._weighted`'s gate.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from ._numbers import check_finite, is_integral, to_float
from ._weighted import Cell, GateLine, WeightedGate

__all__ = [
    "Rate",
    "RateGate",
    "RateLike",
    "RateSpec",
    "as_rate",
    "as_rates",
    "gate_for",
    "gcra_delay",
    "gcra_next_tat",
]


# ---------------------------------------------------------------------------
# Rate: what "20 per second" means
#
# A rate is read as the Generic Cell Rate Algorithm (GCRA) reads it: starts are
# *evenly spaced*, one every T = per / n seconds (the emission interval), and up
# to `burst` of them may happen back to back when the caller has been idle
# (the tolerance tau = (burst - 1) * T). "20/s" is therefore one start every
# 50 ms, not 20 starts in the first millisecond of each second, which is what
# a fixed window allows and what makes servers answer 429.
#
# The state is one number, the theoretical arrival time (TAT): when the next
# start would be due if starts came exactly every T. A start at `now` conforms
# when now >= TAT - tau; it then moves TAT to max(TAT, now) + T. For any window
# of length w this admits at most burst + w / T starts, and never stores up
# more than `burst` starts however long the caller was idle.
# ---------------------------------------------------------------------------

# A number in a rate string: "20", "2.5", ".5", "1e3".
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_RATE_TEXT = re.compile(
    rf"""\s*(?P<n>[+-]?{_NUMBER})\s*
    (?:/\s*(?P<count>{_NUMBER})?\s*(?P<unit>[a-z]+)\s*)?""",
    re.VERBOSE | re.IGNORECASE,
)
_UNIT_SECONDS: dict[str, float] = {
    **dict.fromkeys(("ms", "msec", "msecs", "millisecond", "milliseconds"), 0.001),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}


_RATE_FORMS = "'20/s', '600/min' or '5/100ms'"


def _rate_error(value: object) -> str:
    # "finite" too: 10**400, math.inf and "1e400/s" are > 0 but no rate a float can hold.
    return (
        "rate must be a finite number > 0, like 20, '20/s' or corral.Rate(20, per=1.0); "
        f"got rate={value!r}"
    )


def _check_dimensions(n: Mapping[Any, Any]) -> dict[str, float]:
    """A weighted rate's dimensions, checked: non-empty names, each a finite number > 0."""
    if not n:
        raise ValueError(
            "a weighted Rate needs at least one dimension, like "
            "Rate({'requests': 500, 'output_tokens': 40_000}, per=60); got n={}"
        )
    checked: dict[str, float] = {}
    for name, value in n.items():
        if not isinstance(name, str) or not name:
            raise TypeError(
                "Rate dimensions must be named by non-empty strings like 'requests' or "
                f"'output_tokens'; got {name!r} in n={dict(n)!r}"
            )
        message = (
            f"Rate dimension {name!r} must be a finite number > 0 (allowed per `per` "
            f"seconds); got n={dict(n)!r}"
        )
        # The gates count in floats: 10**400 is refused too.
        checked[name] = check_finite(value, message)
    return checked


def _check_positive(name: str, value: object, what: str) -> None:
    """Raise unless ``value`` is a finite real number > 0; the message names ``name``."""
    message = f"Rate {name} must be {what} > 0, like Rate(20, per=1.0); got {name}={value!r}"
    check_finite(value, message)  # the gates count in floats: 10**400 is refused too


def _quotient(per: Any, amount: Any) -> float:
    """``per / amount`` as the float the gates compute with; inf where it overflows one."""
    try:
        return to_float(per / amount)  # exact for ints and Fractions, then made a float
    except ZeroDivisionError:  # a float per over a Fraction amount that is 0.0 as a float
        return math.inf


def _check_schedule(n: float | Mapping[str, float], per: float, burst: int) -> None:
    """Refuse values that are each in range but whose schedule is not.

    The gates work in float seconds: an interval that overflows to inf (or
    underflows to 0) or a tolerance that overflows would let every start
    through, or fail with a bare OverflowError on the first one.
    """
    if isinstance(n, Mapping):
        for name, amount in n.items():
            interval = _quotient(per, amount)
            if not (math.isfinite(interval) and interval > 0):
                raise ValueError(
                    f"Rate per / n[{name!r}] (the seconds one unit of {name!r} costs) must "
                    f"be a finite number > 0, like Rate({{'requests': 500}}, per=60); got "
                    f"n={dict(n)!r}, per={per!r}: per / n[{name!r}] = {interval!r}"
                )
        requests = n.get("requests")
        if requests is None or burst == 1:
            return
        interval = _quotient(per, requests)
        what = "per / n['requests']"
    else:
        interval = _quotient(per, n)
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(
                "Rate per / n (the seconds between two starts) must be a finite number > 0, "
                f"like Rate(20, per=1.0); got n={n!r}, per={per!r}: per / n = {interval!r}"
            )
        what = "per / n"
    tolerance = to_float(burst - 1) * interval  # inf, not an OverflowError, for a huge burst
    if not math.isfinite(tolerance):
        raise ValueError(
            f"Rate (burst - 1) * {what} (the seconds starts may run ahead) must be a "
            f"finite number, like Rate(20, per=1.0, burst=5); got n={n!r}, per={per!r}, "
            f"burst={burst!r}: (burst - 1) * {what} = {tolerance!r}"
        )


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``n`` call starts per ``per`` seconds, evenly spaced, with a burst.

    Think of a metronome: it ticks once every ``per / n`` seconds and each
    tick lets one call start. A caller that was idle may use up to ``burst``
    ticks at once, then has to keep time again. ``Rate(20)`` lets one call
    start every 50 ms; ``Rate(20, burst=5)`` lets 5 start at once after a
    pause, then one every 50 ms.

    This is GCRA (the Generic Cell Rate Algorithm), the even-spacing form of
    a token bucket. It is *not* a fixed window: ``Rate(600, per=60)`` never
    allows 600 starts in the first second of a minute, only ``burst`` of them.
    It limits when calls *start*, not how many run at once (that is
    ``corral.Limiter(limit=)``'s job).

    Over any window of ``w`` seconds at most ``burst + w / interval`` calls
    start.

    Args:
        n: Starts allowed per ``per`` seconds; a finite number > 0.
        per: The length of that period in seconds; a finite number > 0.
        burst: How many starts may happen back to back after an idle spell;
            an int >= 1. The default 1 spaces every start evenly.

    Raises:
        TypeError: a value of the wrong type (bools are not numbers here).
        ValueError: a value out of range (0, negative, NaN, infinite).

    ``Rate.parse("20/s")`` reads the short text forms, and everywhere corral
    takes a ``rate=``, ``20``, ``"20/s"``, ``"600/min"`` and ``"5/100ms"`` mean
    the same as the matching ``Rate``.

    **Weighted rates.** ``n`` may be a dict of dimensions, for an API that
    limits tokens as well as requests::

        Rate({"requests": 500, "input_tokens": 200_000, "output_tokens": 40_000}, per=60)

    Each dimension is its own GCRA schedule (one number of state each). A
    call's ``cost`` (``corral.map(cost=)``, ``Limiter.acquire(cost)``; one
    request implied) is booked on each when it starts, and it starts once
    every schedule allows, whatever its own size: the cost is paid *after*
    the start, as a delay for the next ones, so a call larger than a whole
    window still runs. Its actual ``usage`` settles the booking later (a
    refund, or a debt). ``burst`` counts requests: every dimension may run
    ``(burst - 1) * per / n["requests"]`` seconds ahead of its schedule; a
    weighted rate without ``requests`` has ``burst=1``. Several windows at
    once (per minute and per day) are a list of rates.

    .. versionadded:: 0.1
    """

    n: float | Mapping[str, float]
    per: float = 1.0
    burst: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.n, Mapping):
            # A weighted rate: its own copy, so the caller's dict can change freely.
            object.__setattr__(self, "n", _check_dimensions(self.n))
        else:
            _check_positive("n", self.n, "a finite number")
        _check_positive("per", self.per, "a finite number of seconds")
        burst = self.burst
        message = (
            "Rate burst must be an int >= 1, the starts allowed back to back, "
            f"like Rate(20, per=1.0, burst=5); got burst={burst!r}"
        )
        if not is_integral(burst):
            raise TypeError(message)
        if burst < 1:
            raise ValueError(message)
        if burst > 1 and isinstance(self.n, dict) and "requests" not in self.n:
            raise ValueError(
                "Rate burst counts requests: a weighted rate with burst > 1 needs a "
                f"'requests' dimension, like Rate({{'requests': 500, 'output_tokens': 40_000}}, "
                f"per=60, burst=5); got n={self.n!r}, burst={burst!r}"
            )
        _check_schedule(self.n, self.per, burst)

    def __hash__(self) -> int:
        n = self.n
        key = tuple(sorted(n.items())) if isinstance(n, Mapping) else n
        return hash((key, self.per, self.burst))

    @property
    def weighted(self) -> bool:
        """True for a rate of several dimensions (``Rate({"requests": ..., ...})``)."""
        return isinstance(self.n, Mapping)

    @property
    def limits(self) -> dict[str, float]:
        """Each dimension's allowance per ``per`` seconds: ``{"requests": n}`` for a plain rate."""
        n = self.n
        return dict(n) if isinstance(n, Mapping) else {"requests": n}

    @property
    def interval(self) -> float:
        """T, the seconds between two evenly spaced starts: ``per / n``.

        For a weighted rate, ``per / n["requests"]``; 0.0 when it has no
        ``requests`` dimension (then only the other dimensions space starts).
        Always a Python float: a numpy ``float32`` rate's own quotient would
        make the gates' times float32 too (a step of 0.06 s at 1e6 s).
        """
        n = self.n
        if isinstance(n, Mapping):
            requests = n.get("requests")
            return _quotient(self.per, requests) if requests else 0.0
        return _quotient(self.per, n)

    @property
    def tolerance(self) -> float:
        """tau, how far ahead of its slot a start may come: ``(burst - 1) * interval``."""
        return to_float(self.burst - 1) * self.interval

    @classmethod
    def parse(cls, text: str) -> Rate:
        """Read a rate written as text: ``"20/s"``, ``"600/min"``, ``"5/100ms"``, ``"20"``.

        The form is ``N/[K]UNIT``: N starts per K units (K defaults to 1), with
        spaces allowed around the slash. Units: ``ms``; ``s``, ``sec``,
        ``second``; ``m``, ``min``, ``minute``; ``h``, ``hr``, ``hour``; ``d``,
        ``day`` (plurals too, any case). A bare number is per second. The
        result has ``burst=1``; build a ``Rate`` directly for a burst.

        >>> Rate.parse("600/min")
        Rate(n=600.0, per=60.0, burst=1)
        >>> Rate.parse("5/100ms").interval
        0.02

        Raises:
            ValueError: the text is not of that form, or its rate is not a
                finite number > 0 (a zero, negative or overflowing number).
            TypeError: ``text`` is not a str.
        """
        if not isinstance(text, str):
            raise TypeError(f"rate must look like {_RATE_FORMS}; got rate={text!r}")
        match = _RATE_TEXT.fullmatch(text)
        if match is None:
            raise ValueError(f"rate must look like {_RATE_FORMS}; got rate={text!r}")
        unit = match["unit"]
        if unit is None:
            per = 1.0
        else:
            seconds = _UNIT_SECONDS.get(unit.lower())
            if seconds is None:
                raise ValueError(f"rate must look like {_RATE_FORMS}; got rate={text!r}")
            count = match["count"]
            per = seconds * (float(count) if count is not None else 1.0)
        n = float(match["n"])
        if not (n > 0 and per > 0 and math.isfinite(n) and math.isfinite(per)):
            raise ValueError(_rate_error(text))
        return cls(n, per=per)


#: What a ``rate=`` argument may be: see :func:`as_rate`.
RateLike: TypeAlias = "Rate | int | float | str | None"
#: A ``rate=`` as corral holds it: one Rate, several (all enforced at once), or none.
RateSpec: TypeAlias = "Rate | tuple[Rate, ...] | Literal['auto'] | None"


def as_rates(value: object) -> RateSpec:
    """Normalise a ``rate=`` that may also be a list of rates (several windows at once).

    A list or tuple of rate-likes (``[Rate({...}, per=60), Rate({...}, per=86_400)]``)
    becomes a tuple of :class:`Rate`; ``"auto"`` (an adaptive rate, see
    :mod:`corral._auto_rate`) stays ``"auto"``; anything else goes through
    :func:`as_rate`.

    Raises:
        ValueError: an empty list, ``"auto"`` in a list, or a bad rate in it.
        TypeError: ``None`` or a list in the list; else as :func:`as_rate`.
    """
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError(
                "rate must be a rate or a non-empty list of rates, like "
                "[Rate({'requests': 500}, per=60), Rate({'requests': 10_000}, per=86_400)]; "
                "got rate=[]"
            )
        rates = tuple(_listed_rate(one, value) for one in value)
        return rates[0] if len(rates) == 1 else rates
    if isinstance(value, str) and value == "auto":
        return "auto"
    return as_rate(value)


def _listed_rate(one: object, rates: list[Any] | tuple[Any, ...]) -> Rate:
    """One rate of a list of rates (one window): a rate, never "no rate" or another list.

    ``None`` in a list used to reach the gates as a window and fail there with
    an AttributeError; ``"auto"`` and a nested list were refused naming only
    the element, as if it had been the whole ``rate=``.
    """
    if one is None or isinstance(one, list | tuple):
        raise TypeError(
            "each rate in a list of rates must be a rate like 20, '20/s' or "
            f"corral.Rate(20, per=1.0), not {one!r}; got rate={rates!r}"
        )
    if isinstance(one, str) and one == "auto":
        raise ValueError(
            "rate='auto' adapts one rate on its own and cannot be one of a list of rates; "
            f"got rate={rates!r}"
        )
    rate = as_rate(one)
    assert rate is not None  # None was refused above
    return rate


def gate_for(spec: RateSpec) -> RateGate | WeightedGate | None:
    """The gate that enforces ``spec``: a :class:`RateGate` for one plain rate (the
    fast path), a :class:`WeightedGate` for weighted rates or several windows."""
    if spec is None:
        return None
    if isinstance(spec, str):
        from ._auto_rate import AutoRateGate

        return AutoRateGate()
    if isinstance(spec, Rate) and not spec.weighted:
        return RateGate(spec)
    rates = (spec,) if isinstance(spec, Rate) else spec
    cells = [  # in Python floats, as the plain gate (see Rate.interval)
        Cell(dimension, _quotient(rate.per, amount), rate.tolerance, to_float(rate.per))
        for rate in rates
        for dimension, amount in rate.limits.items()
    ]
    return WeightedGate(cells, spec)


def as_rate(value: object) -> Rate | None:
    """Normalise a ``rate=`` argument: ``None``, a :class:`Rate`, a number or a string.

    ``None`` means no rate limit; a ``Rate`` is returned as is; a number ``x``
    means ``Rate(x, per=1.0)`` (x starts per second); a string goes through
    :meth:`Rate.parse`.

    Raises:
        ValueError: a number that is 0, negative, NaN or infinite, or a string
            that is not a rate.
        TypeError: anything else (including ``True``/``False``).
    """
    if value is None or isinstance(value, Rate):
        return value
    if isinstance(value, str):
        return Rate.parse(value)
    n = float(check_finite(value, _rate_error(value)))
    if n == 0.0:  # a Fraction too small for a float: the gates would see 0
        raise ValueError(_rate_error(value))
    return Rate(n, per=1.0)


def gcra_delay(tat: float, now: float, rate: Rate) -> float:
    """Seconds from ``now`` until a start conforms to ``rate``; 0.0 if it may start now.

    ``tat`` is the theoretical arrival time left by the previous start
    (``-math.inf`` before the first one). A start conforms once
    ``now >= tat - rate.tolerance``.
    """
    delay = tat - rate.tolerance - now
    return delay if delay > 0.0 else 0.0


def gcra_next_tat(tat: float, now: float, rate: Rate) -> float:
    """The theoretical arrival time after a (conforming) start at ``now``.

    ``max(tat, now) + rate.interval``: each start books the next evenly spaced
    slot, and an idle spell never banks more than the burst.
    """
    return (tat if tat > now else now) + rate.interval


# ---------------------------------------------------------------------------
# RateGate: a Rate enforced on an event loop
#
# Callers line up in a FIFO of futures. The gate keeps at most one timer, set
# for the moment the head of the line conforms; when it fires it lets through
# every caller that conforms then, in order, and sets itself again for the
# next. Nobody polls: each caller sleeps exactly until its slot.
#
# In GCRA, when the next start conforms depends only on TAT, not on who is
# asking, so a caller leaving the line never invalidates the timer: whoever is
# at the head next gets the same slot.
#
# Invariants:
# - a live (not cancelled) future in the line => the timer is set;
# - `_queued` counts callers in the line that were neither granted nor have
#   withdrawn; `_granted` counts callers granted a slot that have not resumed
#   yet. A newcomer takes the fast path only when both are 0, so it never
#   starts before somebody who asked first. A newcomer that finds the line
#   empty but grantees not yet resumed sets the timer, even for "now": a timer
#   runs after the wake-ups already scheduled, so the grantees start first.
#
# Times are kept as seconds since `_origin`, the loop's time when the gate
# bound to it. Loop clocks may start anywhere (a monotonic clock reads the
# uptime; some loops read the wall clock, ~1.7e9 s), and a float that large
# cannot hold a short interval exactly: at 1e9 s its step is 1.2e-7 s, so TAT
# + 1e-6 adds 0.95e-6 (starts 5% faster than the rate) and TAT + 1e-8 adds
# nothing (no limit at all). Relative to the origin, TAT stays as small as the
# gate's lifetime on one loop and each interval is added almost exactly.
# ---------------------------------------------------------------------------


#: A caller's place in a gate's line; once granted, its grant:
#: (its number, TAT before it, TAT after it).
_Slot: TypeAlias = "asyncio.Future[tuple[int, float, float]]"


class RateGate(GateLine):
    """Lets callers through at a :class:`Rate`, in the order they arrived.

    ``await gate.wait()`` returns when the caller may start one call. If a
    start conforms now and nobody is waiting, it returns at once without
    suspending; otherwise the caller joins a first-come, first-served line and
    sleeps exactly until its slot. One gate serves every task of one map
    (``rate=``), or every user of one :class:`Limiter`.

    A caller cancelled in line gives its place back: nothing is spent for it,
    and the callers behind it move up to the slot it would have had. A caller
    cancelled after being granted its slot but before it resumed gives the
    slot back too when no later start was granted on top of it and no header
    clamp moved the schedule since; when a later start was, its slot goes to
    the next caller in line; otherwise it stays spent (one start fewer, never
    one too many).

    :meth:`pause` (a :class:`~corral.Limiter`'s cooldown) grants nothing for a
    while; callers granted a slot who have not resumed yet go back to the
    head of the line, so they start first after the pause, at the rate's
    pace, not all at its end together with the next ones.

    The gate binds to no event loop when built, so it can be made at import
    time and used by successive ``asyncio.run`` calls. Loops' clocks are
    unrelated, so on a new loop the gate carries over what the last loop's
    starts (and a server's clamp) still owe, as if no time had passed in
    between: switching loops never grants an extra burst (it may cost up to
    ``burst`` intervals of extra wait); a pause does not carry over, as the
    Limiter's cooldown it serves does not. Using one gate from two loops *at
    once* is an error. Time is read only through the running loop's
    ``time()``, and kept as seconds since the gate bound to that loop, so a
    clock far from 0 (a long uptime, a wall clock) spaces starts as exactly
    as one at 0.

    Args:
        rate: The :class:`Rate` to enforce.
    """

    __slots__ = (
        "_grants",
        "_interval",
        "_last_now",
        "_loop",
        "_origin",
        "_pause",
        "_rate",
        "_tat",
        "_timer",
        "_timer_when",
        "_tolerance",
    )

    def __init__(self, rate: Rate) -> None:
        if not isinstance(rate, Rate):
            raise TypeError(f"RateGate needs a corral.Rate; got rate={rate!r}")
        if rate.weighted:
            raise TypeError(
                f"RateGate enforces a plain rate, not a weighted one; got rate={rate!r}"
            )
        self._rate = rate
        self._interval = rate.interval
        self._tolerance = rate.tolerance
        # Times below are seconds since _origin, the loop's time at binding.
        self._origin = 0.0
        self._tat = -math.inf  # no start yet: a full burst is available
        self._last_now = -math.inf  # the latest time seen: the last grant or clamp
        # Grants made through the line and still standing; a granted future's
        # result is (its number, TAT before it, TAT after it), so it can be
        # undone (_give_back).
        self._grants = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: deque[asyncio.Future[tuple[int, float, float]]] = deque()
        self._queued = 0
        self._granted = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = -math.inf
        # The futures of callers granted a slot through the line who have not
        # resumed yet, in grant order; and, for those a pause put back in line,
        # the future each waits on now (see pause).
        self._grantees: dict[_Slot, None] = {}
        self._moved: dict[_Slot, _Slot] = {}
        # The latest pause: (TAT without it, TAT with it). A new loop drops it
        # while TAT is still what the pause set (see _rebind).
        self._pause: tuple[float, float] | None = None

    @property
    def rate(self) -> Rate:
        """The rate this gate enforces."""
        return self._rate

    @property
    def waiting(self) -> int:
        """How many callers are in line for a slot."""
        return self._queued

    def __repr__(self) -> str:
        return f"<corral.RateGate rate={self._rate!r} waiting={self._queued}>"

    def fresh(self, now: float) -> bool:
        """Whether, from ``now`` on, the gate behaves exactly as a new one would.

        True when nobody is in line or just granted and no start is still
        owed (the TAT is not after ``now``, the loop's time): forgetting the
        gate then changes nothing, which is what lets a per-key Limiter forget
        idle keys.
        """
        return not self._queued and not self._granted and self._tat <= now - self._origin

    def wait_nowait(self, cost: Mapping[str, float] | None = None) -> bool:
        """Take a start now if one conforms and nobody is ahead; never suspends.

        Returns True when the caller may start (the slot is spent), False when
        it would have to wait (nothing is spent). Needs a running event loop.
        ``cost`` is accepted for a uniform interface with weighted gates: a
        plain rate counts one start whatever the cost.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        if self._queued or self._granted:
            return False
        now = loop.time() - self._origin
        tat = self._tat
        # gcra_delay() == 0 and gcra_next_tat(), inlined: this is the per-call hot path.
        slot = tat - self._tolerance  # -inf before the first start
        # A millionth of an interval early or less may be rounding alone: see _only_rounding.
        if now < slot and (slot - now > self._interval * 1e-6 or not self._only_rounding(tat, now)):
            return False
        self._tat = (tat if tat > now else now) + self._interval
        self._last_now = now
        return True

    async def wait(self, cost: Mapping[str, float] | None = None) -> None:
        """Return when the caller may start one call; FIFO among waiting callers.

        Cancelling the caller while it waits spends nothing (see the class
        docstring for the one case where a slot stays spent).
        """
        if self.wait_nowait():
            return
        loop = asyncio.get_running_loop()
        fut: _Slot = loop.create_future()
        self._waiters.append(fut)
        self._queued += 1
        if self._timer is None:
            self._arm(loop)
        await self._await_turn(loop, fut)

    def pause(self, seconds: float) -> None:
        """Grant no slot for ``seconds`` from now: a :class:`~corral.Limiter`'s cooldown.

        Callers granted a slot who have not resumed yet were granted before
        the pause but would start after it: they go back to the head of the
        line, in the order they were granted (their slots given back when
        nothing was booked on top of them), so that after the pause starts
        come at the rate's pace, in arrival order, not two at its end. Unlike
        a :meth:`clamp` (a server's word on what it has left), a pause ends
        with the loop it was made on. Needs a running event loop.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        now = loop.time() - self._origin
        if now > self._last_now:
            self._last_now = now  # as for a clamp: what a later loop carries is measured from here
        if self._grantees:
            self._requeue_grantees(loop)
        tat = self._tat
        pause = self._pause
        without = pause[0] if pause is not None and tat == pause[1] else tat
        floor = now + self._tolerance + seconds
        if floor > tat:
            self._tat = floor
            self._pause = (without, floor)
        if self._queued:
            # Callers put back in line may be due before the timer set for the old head.
            if self._timer is not None:
                self._timer.cancel()
            self._arm(loop)

    def clamp(
        self, dimension: str, remaining: float, reset: float | None, limit: float | None = None
    ) -> bool:
        """Follow a server saying ``remaining`` requests are left (see ``WeightedGate.clamp``).

        Only the ``requests`` dimension applies; returns False for any other.
        """
        if dimension != "requests":
            return False
        from ._headers import refill_wait, server_pace

        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        now = loop.time() - self._origin
        if now > self._last_now:
            # What a later loop carries over is measured from here: a clamp
            # made long after the last grant must not count that time as owed.
            self._last_now = now
        configured = self.rate.interval
        if remaining >= 1:
            if self._interval != configured and (limit is None or remaining >= limit / 2):
                self._interval = configured  # the server has room again: the rate's own pace
            floor = now + self._tolerance - (remaining - 1) * self._interval
        else:
            # The server refills continuously: one request is back long before its reset;
            # and while it refills slower than the rate, starts follow its pace.
            pace = server_pace(remaining, reset, limit)
            if pace is not None:
                self._interval = pace if pace > configured else configured
            floor = (
                now + self._tolerance + refill_wait(remaining, 1.0, reset, limit, self._interval)
            )
        if floor > self._tat:
            self._tat = floor
        return True

    # -- internals ---------------------------------------------------------

    def _only_rounding(self, tat: float, now: float) -> bool:
        """Whether a start at ``now``, just before its slot, is due in exact arithmetic.

        After an idle spell, TAT is ``now + T`` plus one T per start, each sum
        rounded, while the tolerance is ``(burst - 1) * T`` rounded once: the
        last start of a burst could miss by an ulp or two (``Rate(100,
        burst=7)`` let 6 start at once, not 7). An ulp of TAT per start of
        the burst, twice over, covers those roundings; the caller also caps
        the margin at a millionth of an interval, so no start comes
        measurably early, and asks only when a start is that close to its slot.
        """
        return tat - self._tolerance - now <= self._rate.burst * 2 * math.ulp(tat)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Set the timer for when the head of the line conforms (now at the earliest)."""
        when = self._tat - self._tolerance
        now = loop.time() - self._origin
        if when < now:
            when = now
        self._timer_when = when
        self._timer = loop.call_at(self._origin + when, self._on_timer)

    def _on_timer(self) -> None:
        """Grant every caller at the head of the line that conforms now; set the timer again."""
        self._timer = None
        loop = self._loop
        assert loop is not None  # the timer runs on the loop that set it
        # Loops with coarse timers (uvloop: 1 ms) may run this a little before
        # the time asked for. It was asked for exactly the head's slot, so read
        # the clock as that time: otherwise the head would not conform yet and
        # the gate would spin on 0-delay timers until the clock caught up.
        # (The same holds when origin + slot rounds to a loop time before it.)
        now = loop.time() - self._origin
        now = now if now > self._timer_when else self._timer_when
        waiters = self._waiters
        while waiters:
            fut = waiters[0]
            if fut.done():  # cancelled in line; its withdrawal does the counting
                waiters.popleft()
                continue
            tat = self._tat
            slot = tat - self._tolerance
            if now < slot and (
                slot - now > self._interval * 1e-6 or not self._only_rounding(tat, now)
            ):
                self._arm(loop)
                return
            waiters.popleft()
            self._queued -= 1
            self._granted += 1
            self._grants += 1
            after = (tat if tat > now else now) + self._interval
            self._tat = after
            self._last_now = now
            self._grantees[fut] = None
            fut.set_result((self._grants, tat, after))

    def _undo_grants(self, grants: list[tuple[int, float, float]]) -> None:
        """Undo ``grants`` (in grant order) when they are the latest bookings.

        Only when nothing moved TAT since (as :meth:`_give_back` does for
        one); otherwise they stay spent: one start fewer, never one too many.
        """
        count = len(grants)
        numbers = [number for number, _, _ in grants]
        if numbers == list(range(self._grants - count + 1, self._grants + 1)) and (
            self._tat == grants[-1][2]
        ):
            self._tat = grants[0][1]
            self._grants -= count

    def _placed(self, place: _Slot, kept: None) -> _Slot:
        return place

    def _withdraw(self) -> None:
        """A caller cancelled in line leaves; the timer stays right for whoever is next."""
        self._queued -= 1
        if not self._queued:
            self._waiters.clear()  # only cancelled futures are left
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _give_back(self, loop: asyncio.AbstractEventLoop, grant: tuple[int, float, float]) -> None:
        """A caller granted a slot was cancelled before it started: undo the grant if safe.

        Safe only when no later start was granted on top of it (its grant is
        the latest standing one) and nothing else moved TAT since: then TAT
        goes back to what it was and the state is exactly as if this caller
        had never asked.
        """
        self._granted -= 1
        number, tat_before, tat_after = grant
        if number != self._grants:
            # Later starts were booked after this one: undoing it would let
            # them come early. The next caller in line starts in its place.
            self._pass_on(grant)
            return
        if self._tat != tat_after:
            # A header clamp moved TAT later since: it stands for what the
            # server has left, whoever asks, so going back would drop it.
            return
        self._grants -= 1
        self._tat = tat_before
        if self._timer is not None:
            # The head of the line may conform earlier now.
            self._timer.cancel()
            self._arm(loop)

    def _pass_on(self, grant: tuple[int, float, float]) -> None:
        """Give a granted slot whose caller was cancelled to the next live caller in line.

        Nobody in line: the slot stays spent (one start fewer, never one too many).
        """
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():  # skip callers cancelled in line; their withdrawal counts them
                self._queued -= 1
                self._granted += 1
                self._grantees[fut] = None
                fut.set_result(grant)
                return

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """First use on ``loop``: drop the previous loop's line and carry the rate over."""
        old = self._loop
        if old is not None and (self._queued or self._granted) and not old.is_closed():
            raise RuntimeError(
                "this rate is in use by tasks of another event loop that is still open; "
                "a corral.Limiter or RateGate can serve successive event loops, not two at once"
            )
        # What the last starts (or a clamp) still owe, as if no time passed
        # since the last grant or clamp: conservative, as real time can only
        # have paid some of it off. The new loop's time now is the new origin.
        tat, last = self._tat, self._last_now
        pause = self._pause
        if pause is not None and tat == pause[1]:
            tat = pause[0]  # a pause (a Limiter's cooldown) ends with its loop
        self._pause = None
        self._origin = loop.time()
        self._tat = tat - last if tat > last else -math.inf
        self._last_now = 0.0
        # Futures and the timer of a closed loop can never run: forget them.
        self._waiters.clear()
        self._grantees.clear()
        self._moved.clear()
        self._queued = self._granted = 0
        self._timer = None
        self._loop = loop
