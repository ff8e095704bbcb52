"""Limits on a resource: how many calls run at once, and how often one may start.

Two different questions, two different tools:

- *How many at once?*  A concurrency cap, like a database's ``max_connections``:
  :class:`Limiter` with ``limit=N``; or, when nobody knows N, ``limit="auto"``,
  which finds and follows it from the calls' latency and failures (the
  controller is in :mod:`corral._adaptive`).
- *How often?*  A start rate, like an API's "20 requests per second":
  :class:`Rate`, enforced at run time by a :class:`RateGate` (inside a
  ``Limiter``, or inside one ``corral.map``); both are in :mod:`corral._rate`.

Both are shared by everything that uses the same object: every task and every
map holding one ``Limiter`` draws on the same cap and the same rate, and
pauses together when the service asks for a pause (:meth:`Limiter.cooldown`).
With ``key=``, each key (say, each host) has a cap and rate of its own.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from collections.abc import Callable, Coroutine, Hashable, Mapping
from types import TracebackType
from typing import Any, NoReturn, TypeAlias

from ._adaptive import Adaptive, Controller, Outcome
from ._numbers import check_arity, is_finite, is_integral, is_real
from ._rate import Rate, RateLike, as_rates, gate_for
from ._usage import _AttemptCost, _checked
from ._weighted import WeightedGate

__all__ = ["Adaptive", "Limiter", "outcome_of"]


# ---------------------------------------------------------------------------
# Limiter: a cap on calls in flight, a rate of starts, or both
#
# The concurrency part is a counter and a FIFO of futures with direct
# hand-off: release() gives the slot straight to the first live waiter
# (in_flight does not change), so a newcomer can never barge in between.
#
# The hot path compares in_flight with `_cap`, the number of slots open right
# now: the limit in force, except during a cooldown (0: nobody starts) and
# the ramp after it (rising from 0 to the limit). `_cap` is None when nothing
# caps the calls (a rate-only Limiter outside a cooldown).
#
# Invariants: a live (not cancelled) waiter in line => in_flight >= cap,
# because a caller queues only when every open slot is taken, release() hands
# a slot over only while in_flight <= cap, and whatever opens slots (a higher
# adaptive limit, a ramp step, the end of a cooldown) hands them to waiters
# first. So a free slot means nobody live is waiting, and taking it at once is
# fair. in_flight <= cap holds too, except just after the cap is lowered (an
# adaptive cut, a cooldown): running calls finish, nothing new starts until
# in_flight is below it. (`_n_waiting` may still count a waiter whose future
# was just cancelled, until its task runs its withdrawal; it is bookkeeping,
# not the gate.) With a rate, a newcomer taking a free slot while callers
# handed one have yet to resume (`_granted`) yields once first, so that they
# reach the rate before it: starts stay in arrival order.
# ---------------------------------------------------------------------------

#: After a cooldown, the open slots ramp from 0 back to the limit over this
#: share of the cooldown...
RAMP_FRACTION = 0.5
#: ...but over no more than this many seconds.
RAMP_MAX = 5.0
#: The ramp opens slots in at most this many steps, at jittered intervals.
RAMP_STEPS = 32
#: A per-key Limiter keeps this many idle keys, the most recently used ones,
#: and forgets the others, so memory follows the keys in use, not every key
#: ever seen. It sweeps for them when its keys have doubled since the last
#: sweep (see ``Limiter._evict``): in between it may hold up to twice as many.
IDLE_KEYS = 1024
#: The longest cooldown a server-directed wait (Retry-After, RetryAfter) puts
#: on a Limiter through :meth:`Limiter.record_error` when nobody says otherwise:
#: ``Retry``'s default ``max_retry_after``. A server asking for more usually
#: means a quota is spent; every user of the Limiter asleep for an hour (or,
#: for a far HTTP-date, for ever) would hide that, not help.
MAX_COOLDOWN = 120.0

LimitSpec: TypeAlias = "int | Adaptive | str | None"

_LIMIT_MESSAGE = (
    "limit must be an int >= 1, 'auto', a corral.Adaptive or None, like "
    "corral.Limiter(limit=10); got limit={!r}"
)

# HTTP statuses that mean "overloaded": too many requests, unavailable, a
# gateway that timed out waiting for the service, and Anthropic's 529.
_DROP_STATUSES = frozenset({429, 503, 504, 529})
# httpx's timeouts are not TimeoutError subclasses; matched by name, like
# everything HTTP here (importing httpx to check would be absurd).
_TIMEOUT_NAMES = frozenset({"TimeoutException"})


def outcome_of(error: BaseException | None) -> Outcome:
    """What a call's end tells an adaptive limit: ``"success"``, ``"drop"`` or ``"ignore"``.

    ``None`` (no error) is a success. A drop is overload: a ``TimeoutError``
    (asyncio's and aiohttp's timeouts are ones), an httpx ``TimeoutException``,
    a :class:`corral.RetryAfter`, or an HTTP error with status 429, 503, 504 or 529
    (aiohttp's ``.status``, httpx's ``.response.status_code``). Everything else
    is ignored: cancellation (the caller gave up; the service said nothing),
    ``KeyboardInterrupt``, and errors that are not about load (a 404, a bug).
    """
    if error is None:
        return "success"
    if not isinstance(error, Exception):
        return "ignore"  # CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit
    if isinstance(error, TimeoutError):
        return "drop"
    if isinstance(error, ExceptionGroup):
        # A TaskGroup in fn failed with the server's refusal among its errors:
        # overload all the same (as retries read a group's Retry-After).
        return "drop" if any(outcome_of(e) == "drop" for e in error.exceptions) else "ignore"
    # Imported here: _retry sits below this module (it may come to use
    # Limiter), and only an adaptive limit that saw an error gets here.
    from ._retry import RetryAfter, _status

    if isinstance(error, RetryAfter) or _status(error) in _DROP_STATUSES:
        return "drop"
    if any(cls.__name__ in _TIMEOUT_NAMES for cls in type(error).__mro__):
        return "drop"
    return "ignore"


def _is_auto(rate: object) -> bool:
    return isinstance(rate, str) and rate == "auto"


def _as_limit(limit: object) -> tuple[int | None, Adaptive | None]:
    """Normalise ``Limiter(limit=)``: (the limit in force at first, the adaptive bounds)."""
    if limit is None:
        return None, None
    if isinstance(limit, Adaptive):
        return limit.initial, limit
    if isinstance(limit, str) and limit == "auto":
        adaptive = Adaptive()
        return adaptive.initial, adaptive
    message = _LIMIT_MESSAGE.format(limit)
    if not is_integral(limit):
        raise TypeError(message)
    if limit < 1:
        raise ValueError(message)
    return int(limit), None


def _unhashable(key_fn: object, key: object, item: object) -> TypeError:
    import reprlib

    return TypeError(
        f"key must return a hashable (a str, a number, a tuple...); key={key_fn!r} "
        f"returned {reprlib.repr(key)} for item={reprlib.repr(item)}"
    )


class Limiter:
    """A shared cap on calls in flight and/or on how often calls start.

    Picture a sack holding ``limit`` tokens. Every call takes a token before it
    starts and puts it back when it ends; when the sack is empty, callers
    queue up and each token put back goes straight to the caller who has
    waited longest. However many tasks and maps share one ``Limiter``, never
    more than ``limit`` calls hold a token at once.

    With ``rate=``, a caller holding a token also waits for its turn at the
    rate (see :class:`Rate`) and starts right after it, so starts are evenly
    spaced and never bunch up. A ``Limiter`` with only a rate caps how often
    calls start, not how many run.

    ``limit="auto"`` (or a :class:`corral.Adaptive`) lets the number of tokens
    follow the service: more while latency stays at its lowest, fewer when it
    grows or calls time out or get 429/503 (see :mod:`corral._adaptive` for
    the controller). ``limiter.limit`` is always the limit in force. Raising
    it hands the new tokens to waiters at once; lowering it takes tokens out
    of circulation as calls return them.

    A server that answers 429/503 with ``Retry-After`` (or a call raising
    :class:`corral.RetryAfter`) puts the whole limiter in a :meth:`cooldown`:
    no call starts, in any map sharing it, until the wait is over; then the
    tokens come back over a jittered ramp, not all at once. Such a pause
    lasts at most :data:`MAX_COOLDOWN` (120 s, like ``Retry``'s default
    ``max_retry_after``), or the ``max_retry_after`` of the map's
    :class:`corral.Retry`: a longer wait usually means a quota is spent, and
    is better seen as failures than as every caller asleep.

    ``key=`` gives each key its own sack (and rate, and adaptive state), e.g.
    4 calls per host for a polite crawler; a map finds the key of each item::

        per_host = Limiter(limit=4, key=lambda url: urlsplit(url).hostname)
        await corral.gather(fetch, urls, limit=per_host)
        async with per_host.for_item(url):      # direct use: pick the key's limiter
            ...

    Keys with nothing in flight, nothing waiting and no rate or cooldown
    still running are idle; the least recently used idle keys beyond
    :data:`IDLE_KEYS` are forgotten (a forgotten key starts afresh) by a
    sweep when the keys held have doubled since the last one, so memory stays
    within twice the keys in use plus ``IDLE_KEYS``, and a new key costs the
    same however many keys are busy.

    What it is not: not a token bucket for the cap (tokens are not
    replenished over time, only returned), and not a per-item or per-task
    limit: one ``Limiter`` is one budget for one resource (per key).

    >>> db = Limiter(limit=90)            # e.g. Postgres max_connections=100
    >>> api = Limiter(limit=10, rate="20/s")
    >>> llm = Limiter(limit="auto")

    ``async with api:`` runs its body holding a token (and after its rate
    slot); ``corral.map(fn, items, limit=api)`` draws on the same budget. An
    adaptive limiter used with ``async with`` learns from how the body ends
    (its duration, or the exception it raises); with :meth:`acquire` and
    :meth:`release`, tell it with :meth:`record` or :meth:`record_error`.
    Callers are served in arrival order; a caller cancelled while waiting
    takes nothing with it. A ``Limiter`` may be created at import time,
    outside any event loop, and used from successive ``asyncio.run`` calls,
    but not from two event loops at once (a cooldown does not carry over to
    the next loop); like asyncio's own primitives it is not thread-safe. A
    caller that has to wait while the Limiter serves a loop still running
    in another thread (or one with callers waiting) gets a ``RuntimeError``.
    A key function's own error reaches the caller with a note naming the
    item; a key that is not hashable is a ``TypeError`` naming both.

    Args:
        limit: The most calls in flight at once: an int >= 1, ``"auto"``
            (``Adaptive()``), a :class:`corral.Adaptive`, or ``None`` for no
            cap (then ``rate`` is required).
        rate: The most call starts per time: ``20``, ``"20/s"``,
            ``"600/min"`` or a :class:`Rate` (weighted, like
            ``Rate({"requests": 500, "output_tokens": 40_000}, per=60)``, for
            :meth:`acquire` with a cost and :meth:`settle`); a list of rates
            for several windows at once; ``None`` for no rate limit.
        key: A function of the item returning a hashable key: each key gets
            its own ``limit`` and ``rate``. ``None``: one budget for all.
        redis: A Redis URL (``"redis://HOST:6379/0"``): every Limiter with
            the same Redis and ``name``, in any process on any machine,
            shares one ``limit`` and ``rate`` (needs ``corral[redis]``; see
            :mod:`corral._redis`). ``None``: this process only.
        name: With ``redis``, the name of the shared budget.
        lease: With ``redis``, seconds after which the slots of a holder that
            died are free again (default 10).

    Raises:
        TypeError: neither ``limit`` nor ``rate`` given, one of the wrong
            type, or a ``key`` that is not callable.
        ValueError: a ``limit`` < 1, or a ``rate`` that is not > 0.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_adaptive",
        "_auto_gate",
        "_cap",
        "_controller",
        "_cool_span",
        "_cool_until",
        "_entered",
        "_gate",
        "_granted",
        "_in_flight",
        "_key",
        "_limit",
        "_limit_spec",
        "_lookups",
        "_loop",
        "_n_waiting",
        "_on_limit",
        "_ramp",
        "_rate_spec",
        "_retry_budgets",
        "_rng",
        "_sitting",
        "_subs",
        "_sweep_at",
        "_timer",
        "_used",
        "_waiters",
    )

    def __init__(
        self,
        limit: int | Adaptive | str | None = None,
        *,
        rate: RateLike | list[Rate] | tuple[Rate, ...] = None,
        key: Callable[[Any], Hashable] | None = None,
        redis: str | None = None,
        name: str | None = None,
        lease: float | None = None,
    ) -> None:
        # With redis=, __new__ made a RedisLimiter, whose __init__ runs instead.
        if name is not None or lease is not None:
            raise TypeError(
                "name= and lease= belong to a Limiter shared through Redis: pass redis= too, "
                "like corral.Limiter(limit=10, redis='redis://127.0.0.1:6379/0', "
                f"name='api-key-1'); got name={name!r}, lease={lease!r}"
            )
        first, adaptive = _as_limit(limit)
        parsed = as_rates(rate)
        if first is None and parsed is None:
            raise TypeError(
                "corral.Limiter() needs limit=, rate= or both, like "
                "corral.Limiter(limit=10) or corral.Limiter(rate='20/s')"
            )
        if key is not None and not callable(key):
            raise TypeError(
                "key must be a function of the item returning a hashable, like "
                f"key=lambda url: urlsplit(url).hostname; got key={key!r}"
            )
        if key is not None:
            # Its result is used as it is: an async key would make every
            # item's key a new coroutine, one key per call.
            check_arity("key", key, 1, "the item", plain=True)
        self._limit = first
        # Open slots now (see the invariants above); a per-key Limiter has none
        # of its own, so its acquire() always takes the slow path, which refuses.
        self._cap: int | None = first if key is None else 0
        self._adaptive = adaptive
        self._controller = Controller(adaptive) if adaptive is not None and key is None else None
        # Told each new adaptive limit: the pool of the map that owns this Limiter.
        self._on_limit: Callable[[int], None] | None = None
        self._key = key
        # A keyed Limiter holds no slots itself: it makes one Limiter per key.
        self._limit_spec: LimitSpec = adaptive if adaptive is not None else first
        self._rate_spec = parsed
        self._subs: dict[Hashable, Limiter] = {}
        # Per key, for forgetting the least recently used idle keys: lookups
        # so far (a key's Limiter is stamped with the count when looked up,
        # in its _used), and the number of keys held at which to sweep next.
        self._lookups = 0
        self._used = 0
        self._sweep_at = 2 * IDLE_KEYS
        self._gate = gate_for(parsed) if key is None else None
        # rate="auto": the gate whose rate the calls' outcomes steer (see _auto_rate).
        self._auto_gate: Any = self._gate if isinstance(parsed, str) else None
        # Retry budgets shared by the maps retrying through this Limiter (see _retry_budget).
        self._retry_budgets: dict[Any, Any] | None = None
        self._in_flight = 0
        self._n_waiting = 0  # callers in line for a slot (not yet handed one)
        self._granted = 0  # callers handed a slot that have not resumed yet
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Cooldown: nobody starts before _cool_until (loop time); then a ramp
        # opens slots step by step (_ramp: slots opened so far, None when not
        # ramping); _timer ends the cooldown or takes the next ramp step.
        self._cool_until = -math.inf
        self._cool_span = 0.0  # the latest cooldown's length: the ramp's follows it
        self._ramp: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._rng: random.Random | None = None
        # Callers holding a slot who wait for the cooldown's end, in arrival
        # order: its end lets them go in that order (see _sit_out_cooldown).
        self._sitting: deque[asyncio.Future[None]] = deque()
        # Adaptive `async with`: when each task entered, to time its body.
        self._entered: dict[asyncio.Task[Any] | None, list[float]] = {}

    # -- what it is --------------------------------------------------------

    @property
    def limit(self) -> int | None:
        """The cap on calls in flight in force, or None when only a rate applies.

        For an adaptive limit, its current value. For a per-key Limiter, the
        limit of each key; with an adaptive limit, the highest in force among
        the keys held (``initial`` before the first).
        """
        if self._key is not None and self._adaptive is not None and self._subs:
            return max(sub._limit or 0 for sub in self._subs.values())
        return self._limit

    @property
    def adaptive(self) -> Adaptive | None:
        """The bounds of an adaptive limit (``limit="auto"`` or an Adaptive), or None."""
        return self._adaptive

    @property
    def ceiling(self) -> int | None:
        """The most calls this Limiter may ever let run at once (one key's, if keyed).

        The fixed limit, or the adaptive ``max``; None when only a rate applies.
        A map sizes its pool of workers from it.
        """
        return self._adaptive.max if self._adaptive is not None else self._limit

    @property
    def key(self) -> Callable[[Any], Hashable] | None:
        """The function giving each item's key, or None for one budget for all."""
        return self._key

    @property
    def rate(self) -> Rate | tuple[Rate, ...] | None:
        """The rate of starts in force (a tuple when several apply at once), or None.

        With ``rate="auto"``, the rate the controller has set now (per key: the
        first key's, or the initial rate before any).
        """
        spec = self._rate_spec
        if isinstance(spec, str):
            gate = self._auto_gate
            if gate is None:  # keyed: each key has its own
                gate = next((sub._auto_gate for sub in self._subs.values()), None)
            if gate is None:
                from ._auto_rate import RateController

                return Rate(RateController().rate)
            rate: Rate = gate.rate
            return rate
        return spec

    @property
    def auto_rate(self) -> bool:
        """True for ``rate="auto"``: the start rate follows the service's throttles."""
        return isinstance(self._rate_spec, str)

    @property
    def in_flight(self) -> int:
        """Slots taken: calls running, plus callers holding a slot while they wait for the rate."""
        if self._key is not None:
            return sum(sub._in_flight for sub in self._subs.values())
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Callers inside ``acquire()`` not yet let through: in line for a slot or for the rate."""
        if self._key is not None:
            return sum(sub.waiting for sub in self._subs.values())
        return self._n_waiting + (self._gate.waiting if self._gate is not None else 0)

    @property
    def cooling_down(self) -> bool:
        """True from a :meth:`cooldown` until its ramp has opened every slot again.

        On a per-key Limiter: while the cooldown lasts, and then while any
        key's ramp is still opening its slots. A cooldown ends with its event
        loop: once that loop has closed, this is False.
        """
        if self._key is not None:
            loop = self._loop
            if loop is not None and not loop.is_closed() and self._cool_until > loop.time():
                return True
            return any(sub.cooling_down for sub in self._subs.values())
        return self._cooling_here()

    def _cooling_here(self) -> bool:
        """A cooldown (or its ramp) is running on a loop that can still run its timer.

        A run that ends mid-cooldown leaves the timer of a closed loop behind,
        which never fires: the next loop drops it (see _rebind), so it must not
        count as a cooldown meanwhile, nor keep an idle key from being forgotten.
        """
        loop = self._loop
        return self._timer is not None and loop is not None and not loop.is_closed()

    def __repr__(self) -> str:
        limit = repr(self.limit)
        if self._adaptive is not None:
            a = self._adaptive
            limit += f" (adaptive {a.min}..{a.max})"
        keyed = f" key={self._key!r} keys={len(self._subs)}" if self._key is not None else ""
        return (
            f"<corral.Limiter limit={limit} rate={self.rate!r}{keyed} "
            f"in_flight={self.in_flight} waiting={self.waiting}>"
        )

    # -- taking and giving back slots ----------------------------------------

    async def acquire(self, cost: Mapping[str, float] | None = None) -> None:
        """Wait for a slot (and then for the rate), in arrival order; pair with :meth:`release`.

        Cancelled while waiting, the caller holds nothing afterwards: its place
        in line, any slot handed to it and any rate slot granted to it are
        given back or passed on.

        Args:
            cost: for a weighted rate, the amounts to reserve, like
                ``{"input_tokens": 1200, "output_tokens": 500}`` (one request
                is implied; ``"requests"``, if given, is >= 1); settle them
                with :meth:`settle` when the call ends, passing this same
                mapping: the rate tells reservations apart by their mapping,
                so give each call a mapping of its own. None: one request.

        Raises:
            TypeError: ``cost`` is not a mapping.
            ValueError: an amount of ``cost`` is not a number from 0 to 1e200, or
                its ``"requests"`` is below 1. Nothing is taken.
        """
        if cost is not None and type(cost) is not _AttemptCost:  # a map's is checked already
            # Before anything is taken: a bad amount reaching the rate would
            # fail there with a slot held, or in its timer with callers in line.
            _checked("cost", cost)
        cap = self._cap
        if cap is None or self._in_flight < cap:
            self._in_flight += 1  # a free slot: nobody live is waiting (see the invariants)
            if self._granted and self._gate is not None:
                await self._let_grantees_go_first()
        else:
            await self._wait_for_slot()
            # The slot may have been handed over just before a cooldown began
            # (a 429 seen between the hand-over and this task resuming).
            await self._sit_out_cooldown()
        gate = self._gate
        if gate is not None:
            try:
                granted = gate.wait_nowait(cost)
                if not granted:
                    await gate.wait(cost)
            except BaseException:
                self.release()  # we hold a slot but will not start
                raise
            if not granted:
                # A cooldown may have begun while this caller waited for the rate.
                await self._sit_out_cooldown()

    async def _let_grantees_go_first(self) -> None:
        """Yield once, holding the slot taken: callers handed a slot earlier reach the rate first.

        A raised limit (or a ramp step) hands slots to the callers in line and
        may leave more free; a newcomer taking one in the same instant would
        otherwise book the next rate slot before they resume. Their wake-ups
        were scheduled before this caller's, so one yield lets them go first.
        """
        try:
            await asyncio.sleep(0)
        except BaseException:
            self.release()
            raise

    async def _sit_out_cooldown(self) -> None:
        """Hold the slot taken until the cooldown in force (if any) ends: no call starts in one.

        Cancelled meanwhile, the slot is given back. Those sitting it out wait
        in line for the end of the cooldown (the timer that ends it, see
        _ramp_step), which lets them go in the order they came: a sleep each
        would end in any order (timers due at one instant run in no set order).
        """
        loop = self._loop
        if loop is None or self._cool_until <= loop.time():
            return
        fut: asyncio.Future[None] = loop.create_future()
        self._sitting.append(fut)
        try:
            await fut
        except BaseException:
            self.release()
            raise

    def acquire_nowait(self) -> bool:
        """Take a slot only if one is free now, nobody is in line and the rate allows now.

        Returns True if taken (pair it with :meth:`release`), False otherwise;
        never waits. With a rate it needs a running event loop.
        """
        if self._key is not None:
            self._refuse_keyed("acquire_nowait()")
        cap = self._cap
        if cap is not None and self._in_flight >= cap:
            # Every open slot taken (and then callers may be in line); unless
            # the cap is a finished loop's cooldown.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: nothing to rebind to
                return False
            if loop is self._loop:
                return False
            self._rebind(loop)
            cap = self._cap
            if cap is not None and self._in_flight >= cap:
                return False
        if self._gate is not None and not self._gate.wait_nowait():
            return False
        self._in_flight += 1
        return True

    def release(self) -> None:
        """Give a slot back; it goes straight to the caller who has waited longest.

        If the limit was lowered (or a cooldown began) since the slot was
        taken, the slot is retired instead, until in-flight calls are below
        the new limit.

        Raises:
            RuntimeError: nothing is acquired (more releases than acquires).
        """
        if not self._in_flight:
            raise RuntimeError(
                "Limiter.release() called with nothing acquired: every release() must "
                "match one acquire() (or use `async with limiter:`)"
            )
        waiters = self._waiters
        if waiters:
            cap = self._cap
            if cap is None or self._in_flight <= cap:
                while waiters:
                    fut = waiters.popleft()
                    if not fut.done():  # skip callers cancelled in line
                        self._n_waiting -= 1
                        self._granted += 1
                        fut.set_result(None)  # the slot changes hands: in_flight stays
                        return
        self._in_flight -= 1

    def __new__(cls, limit: object = None, **options: object) -> Limiter:
        if options.get("redis") is not None:  # one budget shared through Redis: see _redis
            from ._redis import RedisLimiter

            return object.__new__(RedisLimiter)
        # An adaptive Limiter times the bodies of `async with`: a subclass does
        # it, so that a fixed Limiter's `async with` reads no clock.
        adaptive = isinstance(limit, Adaptive | str) or _is_auto(options.get("rate"))
        if cls is Limiter and adaptive and options.get("key") is None:
            cls = _TimedLimiter
        return object.__new__(cls)

    def __aenter__(self) -> Coroutine[Any, Any, None]:
        # acquire()'s own coroutine, not one wrapping it: one frame less per
        # `async with` on the uncontended path (about 10% of its cost).
        return self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            try:
                self.record_error(0.0, exc)  # a 429/503 with Retry-After, or RetryAfter: cool down
            finally:
                self.release()
            return
        self.release()

    # -- weighted rates and provider headers ----------------------------------

    def settle(self, cost: Mapping[str, float] | None, usage: Mapping[str, float] | None) -> None:
        """Reconcile what :meth:`acquire` reserved (``cost``) with what the call used.

        Used less: the difference is refunded to the rate. Used more: it is
        carried as debt that delays the next starts. Dimensions ``usage`` does
        not mention keep their reservation. A no-op without a weighted rate.
        ``corral.map(..., cost=, usage=)`` calls it for you.

        Args:
            cost: the mapping given to :meth:`acquire` (the same object).
            usage: what the call spent, per dimension, or None (unknown: the
                reservation stands).

        Raises:
            TypeError: on a per-key Limiter (settle on ``for_item(item)``),
                or a ``usage`` that is not a mapping.
            ValueError: an amount of ``usage`` is not a number from 0 to 1e200,
                or its ``"requests"`` is below 1.
        """
        if usage is not None:
            _checked("usage", usage)  # a NaN or infinite amount would wreck the schedule
        gate = self._gate
        if usage and isinstance(gate, WeightedGate):
            gate.settle(cost, usage)  # per call: the common case first (a keyed one has no gate)
        elif self._key is not None:
            self._refuse_keyed("settle()")

    def sync_headers(self, headers: Any) -> None:
        """Clamp the local budget to what the server's rate-limit headers say remains.

        Understands OpenAI's ``x-ratelimit-remaining-*`` / ``x-ratelimit-reset-*``
        (durations like ``"1s"``, ``"6m0s"``, ``"20ms"``) and Anthropic's
        ``anthropic-ratelimit-*-remaining`` / ``-reset`` (RFC 3339 times); see
        :func:`corral._headers.read_rate_headers` for the dimensions they map
        to. ``headers`` is any mapping (a dict, aiohttp's ``CIMultiDict``,
        httpx's ``Headers``), matched case-insensitively; unknown headers and
        dimensions this Limiter's rate does not limit are ignored.

        For each dimension the rate limits (its shortest window, when several
        apply), the next starts may use at most what the server says remains.
        When that is not enough for the next start (no request left, or fewer
        tokens than the latest start reserved), the next start waits until the
        server has refilled the difference. Servers refill continuously and
        their reset is when the bucket is *full*, so with the budget's size
        (``x-ratelimit-limit-*``, ``anthropic-ratelimit-*-limit``) that wait
        is the missing units at ``reset / (limit - remaining)`` seconds each,
        not the whole reset; without the size, the whole reset. If the server
        refills slower than the rate allows (a rate set above the real
        limit), starts then follow the server's pace until it reports its
        bucket half full again. Without a rate, a server with no requests
        left puts the Limiter in a :meth:`cooldown` for that wait, of at most
        :data:`MAX_COOLDOWN`, as for a Retry-After. Needs a running event loop.
        """
        from ._headers import read_rate_limits, refill_wait

        if self._key is not None:
            self._refuse_keyed("sync_headers()")
        gate = self._gate
        for dimension, remaining, reset, size in read_rate_limits(headers):
            if gate is not None:
                gate.clamp(dimension, remaining, reset, size)
            elif dimension == "requests" and remaining < 1 and reset:
                # No longer than a Retry-After would pause it (see MAX_COOLDOWN).
                wait = refill_wait(remaining, 1.0, reset, size, 0.0)
                self.cooldown(wait if wait < MAX_COOLDOWN else MAX_COOLDOWN)

    def retry_budget(self, budget: Any) -> Any:
        """The retry budget state the maps retrying through this Limiter share.

        One state per :class:`corral.RetryBudget` setting, made on first use.
        """
        from ._retry_budget import RetryBudgetState

        budgets = self._retry_budgets
        if budgets is None:
            budgets = self._retry_budgets = {}
        state = budgets.get(budget)
        if state is None:
            state = budgets[budget] = RetryBudgetState(budget)
        return state

    # -- adaptive feedback -------------------------------------------------------

    def record(self, latency: float, outcome: Outcome = "success") -> None:
        """Tell an adaptive limit how a call went; call it before :meth:`release`.

        ``latency`` is the seconds from the call's start (after
        :meth:`acquire` returned) to its end. ``outcome``: ``"success"``,
        ``"drop"`` (the service was overloaded: a timeout, a 429/503) or
        ``"ignore"`` (no signal: the call was cancelled, or failed for an
        unrelated reason). Costs nothing on a fixed limit. ``async with`` and
        ``corral.map`` call it for you.

        Raises:
            ValueError: an unknown ``outcome``, or (on an adaptive limit) a
                ``latency`` that is negative, NaN or infinite.
            TypeError: on a per-key Limiter (record on ``for_item(item)``),
                or (on an adaptive limit) a ``latency`` that is not a number.
        """
        controller = self._controller
        if controller is None:
            if self._key is not None:
                self._refuse_keyed("record()")
            if self._auto_gate is not None and outcome == "success":
                self._auto_gate.success()
            return
        if not (type(latency) is float or is_real(latency)) or not 0 <= latency < math.inf:
            # A NaN would poison the window's latency (and int(nan) the limit).
            message = f"latency must be a finite number of seconds >= 0; got latency={latency!r}"
            raise ValueError(message) if is_real(latency) else TypeError(message)
        now = asyncio.get_running_loop().time()
        if outcome == "success":
            self.record_success(latency, now)
            return
        if outcome == "drop":
            controller.drop(now, latency)
        elif outcome != "ignore":
            raise ValueError(
                f"outcome must be 'success', 'drop' or 'ignore'; got outcome={outcome!r}"
            )
        new = controller.in_force
        if new != self._limit:
            self._set_limit(new)

    def record_success(self, latency: float, now: float) -> None:
        """``record(latency)``, for callers that have the loop time ``now`` at hand.

        The per-call path of ``corral.map``: one clock read per call, not two.
        """
        if self._auto_gate is not None:
            self._auto_gate.success()
        controller = self._controller
        if controller is None:
            return
        limit = self._limit
        assert limit is not None  # an adaptive limit is never None
        controller.success(now, latency, self._in_flight >= limit)
        if controller.in_force != limit:
            self._set_limit(controller.in_force)

    def record_error(
        self, latency: float, error: BaseException, *, max_cooldown: float = MAX_COOLDOWN
    ) -> None:
        """Tell the limiter a call failed with ``error`` after ``latency`` seconds.

        If ``error`` carries a server-directed wait (an HTTP 429/503 with
        ``Retry-After``, or a :class:`corral.RetryAfter`), the limiter goes into
        a :meth:`cooldown` of that many seconds, but no more than
        ``max_cooldown``, whatever its limit. An adaptive limit also records
        the outcome :func:`outcome_of` gives.

        Args:
            latency: seconds from the call's start to its failure.
            error: what the call raised.
            max_cooldown: the longest cooldown a server-directed wait starts,
                in seconds: by default :data:`MAX_COOLDOWN` (120 s, the
                default ``Retry.max_retry_after``); ``corral.map`` passes its
                ``Retry``'s ``max_retry_after``.

        Raises:
            ValueError: ``max_cooldown`` is negative or NaN (checked when
                ``error`` asks for a wait).
        """
        if isinstance(error, Exception):
            from ._retry import retry_after_seconds

            seconds = retry_after_seconds(error)
            if seconds:
                if not (is_real(max_cooldown) and max_cooldown >= 0):
                    raise ValueError(
                        "max_cooldown must be a number of seconds >= 0 (math.inf for no cap); "
                        f"got max_cooldown={max_cooldown!r}"
                    )
                # A wait past the cap (an hour, a date in year 9999) means a
                # quota is spent: a map's retries fail rather than sleep
                # through it, and the Limiter's other users must not either.
                if seconds > max_cooldown:
                    seconds = max_cooldown
                if 0 < seconds < math.inf:  # not a NaN, a negative or an endless wait
                    self.cooldown(seconds)
        if self._auto_gate is not None:
            self._auto_gate.feedback(error, asyncio.get_running_loop().time())
        if self._controller is not None:
            self.record(latency, outcome_of(error))

    # -- cooldown ------------------------------------------------------------------

    def cooldown(self, seconds: float) -> None:
        """Start no call for ``seconds``, in any task or map using this Limiter.

        For a server that said "Retry-After: 5": instead of every task backing
        off on its own and all coming back at once, the limiter closes for 5 s
        (calls already running go on), then reopens its slots over a ramp of
        ``RAMP_FRACTION`` of the wait (at most ``RAMP_MAX`` seconds), in steps
        at jittered times, so clients that paused together do not return
        together. With a rate, the rate grants nothing during the pause
        either: callers that were waiting for it start after it, at the rate's
        pace and in arrival order. A second cooldown ending later extends the
        first; one ending earlier changes nothing. On a per-key Limiter, every
        key pauses (keys first seen during the pause, too). Needs a running
        event loop.

        Raises:
            ValueError: ``seconds`` is negative, NaN or infinite.
        """
        if not (is_real(seconds) and is_finite(seconds) and seconds >= 0):
            raise ValueError(
                f"cooldown seconds must be a finite number >= 0; got seconds={seconds!r}"
            )
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        end = loop.time() + seconds
        if seconds == 0 or end <= self._cool_until:
            return
        self._cool_until = end
        self._cool_span = seconds
        if self._key is not None:
            for sub in self._subs.values():
                sub.cooldown(seconds)
            return
        if self._timer is not None:
            self._timer.cancel()
        self._ramp = None
        self._cap = 0
        self._timer = loop.call_at(end, self._ramp_step)
        if self._gate is not None:
            self._hold_the_rate(seconds)

    def _hold_the_rate(self, seconds: float) -> None:
        """Grant no rate slot for ``seconds``: the rate's side of a cooldown.

        Callers holding a slot and waiting for the rate would otherwise be
        granted during a cooldown, sit it out, and all start at its end at
        once (a burst above the rate, in any order). Held back, they start
        after it at the rate's pace, in arrival order; those the rate let
        through just before the pause, not yet resumed, go back to the head
        of the line rather than start at its end with the next one. The pause
        ends with the event loop, as the cooldown does.
        """
        gate = self._gate
        assert gate is not None
        gate.pause(seconds)

    def _ramp_step(self) -> None:
        """End the cooldown, or take the next step of the ramp: open slots, hand them over.

        The ramp opens the limit in ``min(limit, RAMP_STEPS)`` equal steps, the
        first one too after a jittered interval, each interval uniform in
        [0.5, 1.5] x its mean: clients that paused together come back spread
        out, and none before the cooldown's end.
        """
        limit = self._limit
        loop = self._loop
        assert loop is not None  # the timer runs on the loop that set it
        if self._ramp is None:
            # The cooldown ends now, even if the timer runs a little early (a
            # coarse clock): nobody would start before it otherwise.
            if self._cool_until > loop.time():
                self._cool_until = loop.time()
            sitting = self._sitting
            while sitting:  # those handed a slot before it first, in order
                fut = sitting.popleft()
                if not fut.done():
                    fut.set_result(None)
            if self._auto_gate is not None:
                self._auto_gate.after_pause()  # the pause is over: slow start again
        if limit is None:
            # Rate only: the rate already spaces the starts out; let everyone go.
            self._timer = None
            self._cap = None
            self._hand_out()
            return
        rng = self._rng
        if rng is None:
            rng = self._rng = random.Random()
        steps = min(limit, RAMP_STEPS)
        ramp = self._ramp
        # The first call ends the cooldown (no slot yet); each later one opens
        # ceil(limit / steps) slots.
        ramp = 0 if ramp is None else ramp - (-limit // steps)
        if ramp >= limit:
            self._ramp = None
            self._timer = None
            self._cap = limit
        else:
            self._ramp = self._cap = ramp
            seconds = min(RAMP_MAX, RAMP_FRACTION * self._cool_span)
            interval = seconds / steps * (0.5 + rng.random())
            self._timer = loop.call_later(interval, self._ramp_step)
        self._hand_out()

    # -- per key ---------------------------------------------------------------------

    def for_item(self, item: Any) -> Limiter:
        """The Limiter for ``item``'s key (a plain one, with this one's limit and rate).

        Use it at once (``async with limiter.for_item(url):``): an idle key may
        be forgotten, and a limiter held on to past that is no longer shared.
        On a Limiter without ``key=``, returns the Limiter itself.
        """
        key_fn = self._key
        if key_fn is None:
            return self
        try:
            key = key_fn(item)
        except Exception as exc:
            import reprlib

            exc.add_note(f"raised by key={key_fn!r} for item={reprlib.repr(item)}")
            raise
        subs = self._subs
        # A plain look-up, the dict left as it is: keeping it in LRU order
        # (pop, insert) leaves a hole per call at its front, and reading its
        # first key steps over every hole until the dict is resized: with
        # thousands of keys busy, tens of us per new key.
        try:
            sub = subs.get(key)
        except TypeError:
            raise _unhashable(key_fn, key, item) from None
        if sub is None:
            sub = Limiter(self._limit_spec, rate=self._rate_spec)
            if len(subs) >= self._sweep_at:
                self._evict()
            if self._cool_until > -math.inf:
                loop = asyncio.get_running_loop()
                remaining = self._cool_until - loop.time()
                if loop is self._loop and remaining > 0:
                    sub.cooldown(remaining)
            subs[key] = sub
        # Recency, for _evict: the later the use, the higher the stamp.
        sub._used = self._lookups = self._lookups + 1
        return sub

    def _evict(self) -> None:
        """Forget the least recently used idle keys beyond :data:`IDLE_KEYS`; busy keys stay.

        A sweep of all the keys held, when they reach ``_sweep_at``; the next
        is due at twice the keys kept (and at least ``2 * IDLE_KEYS``). So a
        sweep over n keys comes after n/2 new keys or more: O(1) keys examined
        per new key, however many are busy (all of them, say: each sweep then
        doubles the bound instead of running again at the next new key).
        """
        subs = self._subs
        now = asyncio.get_running_loop().time()
        latest = self._lookups
        idle: list[Hashable] = []
        stamps: list[int] = []
        for key, sub in subs.items():
            if sub._idle(now):
                idle.append(key)
                stamps.append(sub._used)
            else:
                # In use now, so used later than any look-up so far; each
                # stamp stays unique, which makes the cut below exact.
                latest += 1
                sub._used = latest
        self._lookups = latest
        excess = len(idle) - IDLE_KEYS
        if excess > 0:
            # The excess oldest stamps go: one sort of ints, in C, far cheaper
            # than the loop above.
            cut = sorted(stamps)[excess - 1]
            for key, stamp in zip(idle, stamps, strict=True):
                if stamp <= cut:
                    del subs[key]
        self._sweep_at = max(2 * IDLE_KEYS, 2 * len(subs))

    def _idle(self, now: float) -> bool:
        """Nothing in flight or waiting, no cooldown, and the rate as fresh as a new one's."""
        if self._in_flight or self._n_waiting or self._cooling_here():
            return False
        return self._gate is None or self._gate.fresh(now)

    def _refuse_keyed(self, what: str) -> NoReturn:
        raise TypeError(
            f"this Limiter has key=, so each key has its own slots: call {what} on "
            "limiter.for_item(item), or pass the limiter to corral.map(), which does"
        )

    # -- internals ---------------------------------------------------------------------

    def _set_limit(self, limit: int) -> None:
        """Put a new limit in force; open slots go to waiters at once."""
        self._limit = limit
        if self._on_limit is not None:
            self._on_limit(limit)
        if self._timer is None:
            self._cap = limit
        elif self._ramp is not None:
            self._cap = min(self._ramp, limit)
        # else: cooling down, the cap stays 0 until the ramp
        self._hand_out()

    def _hand_out(self) -> None:
        """Give open slots to waiters, first come first served, while in_flight < cap."""
        waiters = self._waiters
        cap = self._cap
        while waiters and (cap is None or self._in_flight < cap):
            fut = waiters.popleft()
            if not fut.done():
                self._n_waiting -= 1
                self._granted += 1
                self._in_flight += 1
                fut.set_result(None)

    async def _wait_for_slot(self) -> None:
        if self._key is not None:
            self._refuse_keyed("acquire()")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
            cap = self._cap
            if cap is None or self._in_flight < cap:  # the old loop's cooldown is gone
                self._in_flight += 1
                return
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        self._n_waiting += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.cancelled():  # still in line: leave it; release() skips its future
                n_waiting = self._n_waiting = self._n_waiting - 1
                waiters = self._waiters
                if not n_waiting:
                    waiters.clear()  # only cancelled futures are left
                elif len(waiters) > 2 * n_waiting + 16:
                    # Mostly futures of callers who gave up, kept alive behind
                    # one who waits on: drop them (amortised O(1) per caller),
                    # or a line that never empties grows without end.
                    self._waiters = deque(f for f in waiters if not f.done())
            else:  # handed a slot, cancelled before resuming: pass it on
                self._resumed()
                self.release()
            raise
        self._resumed()

    def _resumed(self) -> None:
        """A caller handed a slot has resumed (a new loop may have forgotten it: see _rebind)."""
        if self._granted:
            self._granted -= 1

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """First use on ``loop``: forget a closed loop's waiters and cooldown; keep slots taken."""
        old = self._loop
        if old is not None and not old.is_closed():
            if old.is_running():  # another loop runs now: in another thread
                raise RuntimeError(
                    "this Limiter is in use by an event loop running in another thread; "
                    "a Limiter can serve successive event loops, not two at once"
                )
            if self._n_waiting:
                raise RuntimeError(
                    "this Limiter has tasks waiting on another event loop that is still open; "
                    "a Limiter can serve successive event loops, not two at once"
                )
        self._waiters.clear()
        self._sitting.clear()
        self._n_waiting = self._granted = 0
        self._loop = loop
        # The old loop's clock and timer mean nothing here: the cooldown ends.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._ramp = None
        self._cool_until = -math.inf
        self._cap = self._limit if self._key is None else 0


class _TimedLimiter(Limiter):
    """A Limiter with an adaptive limit: ``async with`` reports how each body went.

    ``Limiter("auto")`` and ``Limiter(Adaptive(...))`` make one of these (see
    ``Limiter.__new__``); it is a ``Limiter`` in every other respect.
    """

    __slots__ = ()

    def __aenter__(self) -> Coroutine[Any, Any, None]:
        return self._enter_timed()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            task = asyncio.current_task()
            entered = self._entered
            starts = entered.get(task)
            if starts:
                latency = asyncio.get_running_loop().time() - starts.pop()
                if not starts:
                    del entered[task]
                if exc is None:
                    self.record(latency)
                else:
                    self.record_error(latency, exc)
            else:
                # Entered in another task: an async generator closed from
                # elsewhere (as a loop's shutdown closes them). No time to go
                # by; forget what tasks that have ended left behind.
                for ended in [t for t in entered if t is None or t.done()]:
                    del entered[ended]
                if exc is not None:
                    self.record_error(0.0, exc)
        finally:
            self.release()  # whatever recording did: never keep the slot

    async def _enter_timed(self) -> None:
        await self.acquire()
        loop = asyncio.get_running_loop()
        self._entered.setdefault(asyncio.current_task(), []).append(loop.time())
