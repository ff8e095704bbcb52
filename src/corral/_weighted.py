"""Weighted rates: several dimensions (requests, input and output tokens), several windows.

A paid API limits more than requests: "500 requests, 200,000 input tokens and
40,000 output tokens per minute", and often a daily cap on top. Each
(dimension, window) pair is one GCRA *cell* with its own theoretical arrival
time (TAT) and its own interval per unit (``per / allowance``): O(1) state
per cell, never a log entry per token.

A start carries a *cost* (the estimated amounts per dimension; one request
unless it says otherwise). It conforms when every cell conforms:
``now >= TAT - tolerance``, whatever its own cost; each cell's TAT then moves
to ``max(TAT, now) + amount * interval``. So the cost is paid *after* the
start, as debt that delays the next ones: a call costing more than a whole
window still runs (it would never fit otherwise), and over any window ``w``
the amounts started stay within ``(w + tolerance) / interval`` plus the last
start's own amount.

When the call ends, its actual usage *settles* the reservation, as if the call
had reserved what it used when it started: a debt (``actual > reserved``)
pushes TAT later by the difference; a refund pulls it earlier by the unused
part, but not before the schedule the starts made after that call keep on
their own (each booked in turn from its start: they would have been booked on
top of the refunded call's usage too), nor, for the latest start's own refund,
before its start. With a tolerance of 0 that schedule ends with the latest
start's own booking (no start comes before the schedule, so each one's
booking covers those before it); with a tolerance, starts come ahead of the
schedule, and the gate keeps a log of the recent starts (their cost mappings,
starts and settled usage) to compute it: a call it cannot place there keeps
more of its reservation, never less. A TAT
before "now" means the same as "now" to every start (a start books from
``max(TAT, now)``: a full bucket holds no more than its burst), so a refund
never banks capacity for a burst later; but it is not lost either: a debt
settled afterwards by a call still in flight is set against it, exactly as if
that call and the refunded one had reserved their actual usage. (Stopping the
refund at "now" instead would make such a debt count from "now", as if its
call had started then.) A dimension the usage does not mention keeps its
reservation.

:class:`WeightedGate` enforces the cells on an event loop, first come first
served, exactly as :class:`corral.RateGate` does for one plain rate (whose
hot path stays separate and unchanged). As there, times are kept as seconds
since the gate bound to its loop: a loop clock far from 0 (a long uptime, a
wall clock at ~1.7e9 s) has too coarse a float grid for short intervals (at
1e9 s a step is 1.2e-7 s, so TAT + 1e-6 adds 0.95e-6 and TAT + 1e-8 adds
nothing), while TAT since binding stays as small as the gate's time on that loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ._headers import refill_wait, server_pace

__all__ = ["MAX_AMOUNT", "Cell", "WeightedGate"]

_get_running_loop = asyncio.get_running_loop
_INF = math.inf

#: The largest amount of any dimension a cost or a usage may hold (checked
#: where they come in, see corral._usage._checked), and the largest interval
#: a cell books per unit (larger ones are lowered to it: one unit per 1e80 s
#: and one per 1e200 s both mean "never again" in any run). So one booking,
#: debt or refund moves a schedule by well under 1e290 s (token_usage may sum
#: up to four counts), less than half a unit in the last place of the largest
#: float: the sums of them and of the times the gate keeps stay finite (at
#: worst they round to the largest float), never inf, and so never the NaN
#: of inf - inf, which every comparison here reads as "no limit".
MAX_AMOUNT = 1e200
_MAX_INTERVAL = 1e80
_NO_COST: dict[str, float] = {}
#: How many recent starts a gate with a tolerance logs for refunds: a refund of
#: a call further back (or one the log cannot tell apart) keeps more of its
#: reservation, never less (see WeightedGate._floors).
_LOG_SIZE = 256

#: A granted waiter's future result: its number, the TATs before and after
#: its booking, and the latest start (time, cost) before it, to undo it; then
#: the cost it booked and its log entry (None without a log), to pass it on.
_Grant = tuple[
    int,
    list[float],
    list[float],
    float,
    "Mapping[str, float] | None",
    "Mapping[str, float] | None",
    "list[Any] | None",
]


def loop_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """``loop.time``, or ``time.monotonic`` itself when that is all ``loop.time`` does.

    asyncio's own loops read ``time.monotonic()`` through a Python method;
    calling the C function directly saves a frame per call on the hot path.
    A loop with its own clock (uvloop, a virtual-time loop) keeps it.
    """
    method = loop.time
    if getattr(method, "__func__", None) is asyncio.BaseEventLoop.time:
        return time.monotonic
    return method


class Cell(NamedTuple):
    """One dimension of one window: how a :class:`WeightedGate` reads a Rate."""

    dimension: str
    #: Seconds of schedule one unit costs: ``per / allowance``.
    interval: float
    #: Seconds a start may lead its schedule: the rate's tolerance.
    tolerance: float
    #: The window's length, to tell per-minute from per-day cells of a dimension.
    per: float


class GateLine:
    """The line of a rate gate's callers: what :class:`corral.RateGate` and
    :class:`WeightedGate` share about callers granted a slot but not resumed.

    A granted caller's future holds its grant, a tuple whose first item is its
    number. Until the caller resumes, the future is kept in ``_grantees``
    (with what the gate needs to put it back in line), so that a pause can
    send it back to the head of the line; its new place is then the future
    ``_moved`` maps the old one to, which a caller follows on waking. The
    gate provides ``_give_back`` (a granted caller cancelled), ``_withdraw``
    (one cancelled in line), ``_undo_grants`` and ``_placed``, and sets the
    slots below in its ``__init__``.
    """

    __slots__ = ("_granted", "_grantees", "_moved", "_queued", "_waiters")

    _grantees: dict[asyncio.Future[Any], Any]
    _moved: dict[asyncio.Future[Any], asyncio.Future[Any]]
    _waiters: deque[Any]
    #: How many callers are in line; how many were granted and have not resumed.
    _queued: int
    _granted: int

    async def _await_turn(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any]) -> None:
        """Wait in line on ``fut`` until granted and resumed; a cancelled caller leaves."""
        while True:
            try:
                await fut
            except asyncio.CancelledError:
                self._leave(loop, fut)
                raise
            moved = self._moved.pop(fut, None) if self._moved else None
            if moved is None:
                break
            fut = moved  # granted before a pause: back in line, at its head
        self._grantees.pop(fut, None)
        self._granted -= 1

    def _leave(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any]) -> None:
        """A caller cancelled while waiting on ``fut`` gives back its place, or its slot.

        ``fut`` may have been granted, then replaced by a place in line by a
        pause (perhaps granted again since): the caller leaves from where it is.
        """
        while not fut.cancelled():
            moved = self._moved.pop(fut, None) if self._moved else None
            if moved is None:  # granted, not resumed
                self._grantees.pop(fut, None)
                self._give_back(loop, fut.result())
                return
            if not moved.done():
                moved.cancel()  # its place in line, which the caller now leaves
            fut = moved
        self._withdraw()

    def _requeue_grantees(self, loop: asyncio.AbstractEventLoop) -> None:
        """Put callers granted a slot but not resumed back at the head of the line, in order.

        Their grants are undone where the gate can (see ``_undo_grants``);
        otherwise they stay spent: one start fewer, never one too many.
        """
        granted = sorted(self._grantees.items(), key=lambda item: item[0].result()[0])
        self._grantees.clear()
        self._undo_grants([fut.result() for fut, _ in granted])
        entries = []
        for fut, kept in granted:
            place = loop.create_future()
            self._moved[fut] = place
            entries.append(self._placed(place, kept))
        self._waiters.extendleft(reversed(entries))
        count = len(granted)
        self._queued += count
        self._granted -= count

    # What each gate provides (declared, not defined: GateLine is never used alone).
    if TYPE_CHECKING:

        def _give_back(self, loop: asyncio.AbstractEventLoop, grant: Any) -> None: ...

        def _withdraw(self) -> None: ...

        def _undo_grants(self, grants: list[Any]) -> None:
            """Undo ``grants`` (in grant order, none resumed) where nothing was booked on top."""

        def _placed(self, place: asyncio.Future[Any], kept: Any) -> Any:
            """The line's entry for a caller waiting on ``place``, from what ``_grantees`` kept."""


class WeightedGate(GateLine):
    """Lets callers through at several weighted rates at once, in arrival order.

    ``await gate.wait(cost)`` returns when a start of that cost may go (the
    cost is then reserved); :meth:`settle` reconciles it with what the call
    actually used. ``cost`` is a mapping of dimension to amount; a missing
    ``requests`` means one request, any other missing dimension means 0.

    Like :class:`corral.RateGate`: no polling (one timer for the head of the
    line), a caller cancelled in line spends nothing, a caller cancelled after
    its grant gives it back when no later grant was made on top of it (but
    for cells a settlement or a header clamp moved since, which keep it), or
    else passes it on to the next caller in line when that one's cost fits in
    it (otherwise it stays spent: never more than was booked), :meth:`pause`
    sends callers granted but not resumed back to the head of the line, and
    the gate follows successive event loops (a pause does not carry over).

    Args:
        cells: the (dimension, window) cells to enforce.
        rates: what the cells came from, for ``repr`` and :attr:`rate`.
    """

    __slots__ = (
        "_by_dimension",
        "_cells",
        "_clamped",
        "_clock",
        "_grants",
        "_last_cost",
        "_last_now",
        "_log",
        "_loop",
        "_lost",
        "_origin",
        "_pause",
        "_rate",
        "_ready",
        "_rounding",
        "_rows",
        "_settled",
        "_shortest",
        "_slack",
        "_tats",
        "_timer",
        "_timer_when",
    )

    def __init__(self, cells: Sequence[Cell], rates: Any) -> None:
        if not cells:
            raise ValueError("a WeightedGate needs at least one cell")
        self._rate = rates
        # Per cell: (dimension, amount when the cost does not name it, interval, tolerance).
        self._cells = tuple(
            (
                c.dimension,
                1.0 if c.dimension == "requests" else 0.0,
                min(c.interval, _MAX_INTERVAL),
                c.tolerance,
            )
            for c in cells
        )
        # What the per-call loops walk, built once: the cells with their index
        # (cheaper than enumerate() per call).
        self._rows = tuple((i, *cell) for i, cell in enumerate(self._cells))
        # Every time below is seconds since _origin, the loop's time when the
        # gate bound to it (see _rebind): the loop's own clock may be far from 0.
        self._origin = 0.0
        self._tats = [-_INF] * len(cells)
        # When the next start conforms: max(TAT - tolerance) over the cells,
        # kept up to date by whatever moves a TAT, so the hot path compares once.
        self._ready = -_INF
        by_dimension: dict[str, list[int]] = {}
        for i, c in enumerate(cells):
            by_dimension.setdefault(c.dimension, []).append(i)
        self._by_dimension = by_dimension
        # A start that comes before its slot by rounding alone is let through
        # (see _only_rounding): by at most 2 ulps of TAT per start a burst holds,
        # and never by more than a millionth of a request interval. A tolerance
        # is (burst - 1) request intervals of its rate; a rate without requests
        # has none, and then no start is ever early.
        burst, slack = 1.0, _INF
        for c in cells:
            if c.dimension == "requests" and c.interval > 0:
                starts = c.tolerance / c.interval + 1  # (a comparison drops a NaN)
                burst = starts if starts > burst else burst
                slack = min(slack, c.interval, _MAX_INTERVAL)
        self._rounding = 2 * burst
        self._slack = slack * 1e-6 if slack < _INF else 0.0
        # The cell a provider's headers describe: the shortest window of each dimension.
        self._shortest = {
            d: min(indices, key=lambda i: cells[i].per) for d, indices in by_dimension.items()
        }
        # The time of the latest start (or of the switch to this loop): a
        # refund moves no TAT before it, as every call still in flight started
        # by then (see the module docstring).
        self._last_now = -_INF
        # The time of the latest header clamp: what carries over to a next loop
        # is measured from it too, when it came after the latest start.
        self._clamped = -_INF
        # The latest start's cost: what the next start likely needs, for clamp().
        self._last_cost: Mapping[str, float] | None = None
        # Once the latest start settled: (its mapping, its start, the usage it
        # reported). It stands for that usage in the dimensions named, for its
        # reservation in the rest, while mapping and start are still the
        # latest start's.
        self._settled: tuple[Mapping[str, float] | None, float, Mapping[str, float]] | None = None
        # With a tolerance, the recent starts, oldest first: [cost, start, usage
        # once settled, seconds booked per cell once a refund needed them]. A
        # refund stops at what the starts after its call booked (see _floors);
        # without a tolerance the latest start's booking is that.
        self._log: deque[list[Any]] | None = (
            deque() if any(c.tolerance > 0 for c in cells) else None
        )
        # Whether a start still unsettled was ever dropped from the log: a
        # settlement it cannot find by identity may then be that one's.
        self._lost = False
        self._grants = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock: Callable[[], float] = time.monotonic  # the loop's clock, set by _rebind
        # (future, cost) per caller in line, first come first served.
        self._waiters: deque[tuple[asyncio.Future[_Grant], Mapping[str, float] | None]] = deque()
        self._queued = 0
        self._granted = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = -_INF
        # The futures of callers granted a slot through the line who have not
        # resumed yet, in grant order, with their costs; and, for those a
        # pause put back in line, the future each waits on now (see GateLine).
        self._grantees: dict[asyncio.Future[_Grant], Mapping[str, float] | None] = {}
        self._moved: dict[asyncio.Future[_Grant], asyncio.Future[_Grant]] = {}
        # The latest pause, in the cell it holds: (TAT without it, TAT with
        # it). A new loop drops it while that TAT is still what the pause set.
        self._pause: tuple[float, float] | None = None

    # -- what it is ----------------------------------------------------------

    @property
    def rate(self) -> Any:
        """The rate (or rates) this gate enforces."""
        return self._rate

    @property
    def dimensions(self) -> frozenset[str]:
        """The dimensions any of its cells limits."""
        return frozenset(self._by_dimension)

    @property
    def waiting(self) -> int:
        """How many callers are in line."""
        return self._queued

    def __repr__(self) -> str:
        return f"<corral.WeightedGate rate={self._rate!r} waiting={self._queued}>"

    def fresh(self, now: float) -> bool:
        """Whether the gate behaves from ``now`` (the loop's time) on exactly as a new one would."""
        return not self._queued and not self._granted and max(self._tats) <= now - self._origin

    def delay(self, now: float) -> float:
        """Seconds from ``now`` (the loop's time) until a start conforms (0.0: it may start now)."""
        ready = self._ready
        now -= self._origin
        return ready - now if ready > now else 0.0

    # -- the hot path ----------------------------------------------------------

    def _update_ready(self) -> None:
        tats = self._tats
        ready = -_INF
        for i, _, _, _, tolerance in self._rows:
            tat = tats[i] - tolerance
            if tat > ready:
                ready = tat
        self._ready = ready

    def _only_rounding(self, now: float) -> bool:
        """Whether a start at ``now``, just before the slot, is due in exact arithmetic.

        After an idle spell a cell's TAT is ``now`` plus each start's booking,
        each sum rounded, while its tolerance is ``(burst - 1) * T`` rounded
        once: the last start of a burst could miss by an ulp or two
        (``Rate({"requests": 100, "tokens": 10_000}, burst=7)`` let 6 start
        at once, not 7). Two ulps of TAT per start of the burst cover those
        roundings; the caller also caps the margin at a millionth of a request
        interval, so no start comes measurably early, and asks only when a
        start is that close to its slot.
        """
        tats = self._tats
        rounding = self._rounding
        for i, _, _, _, tolerance in self._rows:
            tat = tats[i]
            if tat - tolerance - now > rounding * math.ulp(tat):
                return False
        return True

    def _take(self, now: float, cost: Mapping[str, float] | None) -> None:
        # Every cell moves to max(TAT, now), even for an amount of 0: a debt
        # settled later adds to a TAT no earlier than this start, so it can
        # never vanish into idle time that passed before the call began.
        tats = self._tats
        get = (_NO_COST if cost is None else cost).get
        ready = -_INF
        for i, dimension, default, interval, tolerance in self._rows:
            tat = tats[i]
            tat = (tat if tat > now else now) + get(dimension, default) * interval
            tats[i] = tat
            tat -= tolerance
            if tat > ready:
                ready = tat
        self._ready = ready
        self._last_now = now
        self._last_cost = cost
        log = self._log
        if log is not None:
            log.append([cost, now, None, None])
            if len(log) > _LOG_SIZE:
                self._drop_oldest(log)

    def wait_nowait(self, cost: Mapping[str, float] | None = None) -> bool:
        """Reserve ``cost`` now if a start conforms and nobody is ahead; never suspends.

        Returns True when the caller may start (``cost`` is reserved), False
        when it would have to wait (nothing is reserved). Needs a running loop.
        """
        loop = _get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        if self._queued or self._granted:
            return False
        now = self._clock() - self._origin
        ready = self._ready
        # A millionth of an interval early or less may be rounding alone: see _only_rounding.
        if now < ready and (ready - now > self._slack or not self._only_rounding(now)):
            return False
        # _take(), inlined: the per-call hot path.
        tats = self._tats
        get = (_NO_COST if cost is None else cost).get
        ready = -_INF
        for i, dimension, default, interval, tolerance in self._rows:
            tat = tats[i]
            tat = (tat if tat > now else now) + get(dimension, default) * interval
            tats[i] = tat
            tat -= tolerance
            if tat > ready:
                ready = tat
        self._ready = ready
        self._last_now = now
        self._last_cost = cost
        log = self._log
        if log is not None:
            log.append([cost, now, None, None])
            if len(log) > _LOG_SIZE:
                self._drop_oldest(log)
        return True

    async def wait(self, cost: Mapping[str, float] | None = None) -> None:
        """Return once a start of ``cost`` conforms, with ``cost`` reserved; FIFO."""
        if self.wait_nowait(cost):
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_Grant] = loop.create_future()
        self._waiters.append((fut, cost))
        self._queued += 1
        if self._timer is None:
            self._arm(loop)
        await self._await_turn(loop, fut)

    def pause(self, seconds: float) -> None:
        """Grant no start for ``seconds`` from now: a :class:`~corral.Limiter`'s cooldown.

        As :meth:`corral.RateGate.pause`: callers granted a start who have not
        resumed yet go back to the head of the line, in the order they were
        granted (their reservations given back where nothing was booked on
        top of them), so that after the pause starts come at the rates' pace,
        in arrival order, not two at its end; and unlike a :meth:`clamp`, a
        pause ends with the loop it was made on. It holds the shortest
        window's ``requests`` cell (else the first dimension's shortest
        window): a start waits for every cell. Needs a running event loop.
        """
        loop = _get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        now = self._clock() - self._origin
        if now > self._clamped:
            self._clamped = now  # as for a clamp: what a later loop carries is measured from here
        if self._grantees:
            self._requeue_grantees(loop)
        index = self._paused_cell()
        tats = self._tats
        tat = tats[index]
        pause = self._pause
        without = pause[0] if pause is not None and tat == pause[1] else tat
        floor = now + self._cells[index][3] + seconds
        if floor > tat:
            tats[index] = floor
            self._pause = (without, floor)
        self._update_ready()
        if self._queued:
            # Callers put back in line may be due before the timer set for the old head.
            if self._timer is not None:
                self._timer.cancel()
            self._arm(loop)

    def _paused_cell(self) -> int:
        """The cell a pause holds: the shortest window of requests, else of the first dimension."""
        shortest = self._shortest
        index = shortest.get("requests")
        return shortest[self._cells[0][0]] if index is None else index

    def settle(
        self, reserved: Mapping[str, float] | None, used: Mapping[str, float] | None
    ) -> None:
        """Reconcile a reservation with the usage the call reported.

        For each dimension in ``used``: a debt (used more than reserved) moves
        the schedule later; a refund moves it earlier, by the unused part of
        this reservation, but not before the schedule the starts made after
        this call keep on their own (with no tolerance: the end of the latest
        start's booking), nor before the latest start itself when this is its
        own settlement (for every start from now on, the same as not before
        now: see the module docstring). The gate tells whose reservation it
        is by the ``reserved`` mapping (the same object ``wait`` got); with
        one mapping shared by all calls, every settlement reads as the latest
        start's. With a tolerance, a mapping that is not the same object as
        any logged reservation but equal to some is taken for the earliest
        such call not yet settled. Dimensions ``used`` does not mention keep
        their reservation; ``used`` None keeps all of it (a failed attempt
        whose usage is unknown).
        """
        if not used:
            return
        if self._loop is None:
            return  # nothing was ever reserved here
        log = self._log
        floors = None if log is None else self._floors(log, reserved, used)
        start = self._last_now
        # The latest start's booking, which a refund of an earlier call must not
        # erase: it would have been made on top of that call's usage too. The
        # gate knows a reservation only by its mapping, so a settlement passing
        # the latest start's own mapping is taken for that start's (with one
        # mapping shared by every call, all are: a refund then reaches back to
        # the latest start's time, never earlier).
        latest = reserved is self._last_cost
        # The latest start's reservation and usage (once settled), read on the
        # first refund only.
        booked: Mapping[str, float] | None = None
        booked_used: Mapping[str, float] = _NO_COST
        tats = self._tats
        get = used.get
        before = (_NO_COST if reserved is None else reserved).get
        earlier = False
        ready = -_INF
        for i, dimension, default, interval, tolerance in self._rows:
            tat = tats[i]
            actual = get(dimension)
            if actual is not None:
                delta = actual - before(dimension, default)
                if delta > 0:
                    tat += delta * interval  # debt: the next starts wait for it
                    tats[i] = tat
                elif delta < 0:
                    if floors is not None:
                        floor = floors[i]
                    else:
                        floor = start
                        if not latest:
                            if booked is None:
                                booked = self._last_cost or _NO_COST
                                settled = self._settled
                                if (
                                    settled is not None
                                    and settled[0] is self._last_cost
                                    and settled[1] == start
                                ):
                                    booked_used = settled[2]
                            amount = booked_used.get(dimension)
                            if amount is None:
                                amount = booked.get(dimension, default)
                            floor += amount * interval
                    if tat > floor:
                        tat += delta * interval
                        if tat < floor:
                            tat = floor
                        tats[i] = tat
                        earlier = True
            tat -= tolerance
            if tat > ready:
                ready = tat
        self._ready = ready
        if latest:
            # What the latest start now stands for, should an earlier call refund.
            self._settled = (reserved, start, used)
        if earlier and self._timer is not None and self._queued:
            self._timer.cancel()
            loop = self._loop
            assert loop is not None  # a timer is set on the gate's loop
            self._arm(loop)

    def _floors(
        self, log: deque[list[Any]], reserved: Mapping[str, float] | None, used: Mapping[str, float]
    ) -> list[float]:
        """Per cell, how early a refund of ``reserved`` may move TAT; records ``used``.

        As if the call had reserved its usage, TAT would be the later of its
        own chain (this call and those before it, less the refund) and of
        the chain of the starts after it: max over those starts of ``start +
        what it and every later start booked``. The latter is the floor.
        With a tolerance it can lie anywhere up to a tolerance past the
        latest start's booking, so it is computed from the log, walking back
        from the latest start to this call's. Walks at most the log.
        """
        rows = self._rows
        last = self._last_now
        entry = None
        for logged in reversed(log):
            if logged[0] is reserved:
                entry = logged
                break
        mine = entry is not None
        if not mine and not self._lost:
            # Not the object it reserved with: it is one of the unsettled
            # calls of an equal cost, so stop where the earliest of them
            # would (below every later one's floor). Which one it is stays
            # unknown: no entry is marked settled (a wrong mark could put a
            # later refund's floor after its own call).
            for logged in log:
                if logged[2] is None and logged[0] == reserved:
                    entry = logged
                    break
        # Only the cells this settlement refunds need a floor (usually one or two).
        reserved_get = (_NO_COST if reserved is None else reserved).get
        refunded = [
            row
            for row in rows
            if (amount := used.get(row[1])) is not None and amount < reserved_get(row[1], row[2])
        ]
        sums = [0.0] * len(rows)
        # The latest start's own refund stops at its start.
        floors = [last] * len(rows)
        indices = [row[0] for row in refunded]
        for logged in reversed(log) if refunded else ():
            if logged is entry:
                break
            booked_by = logged[3]
            if booked_by is None:
                # What it books per cell, in seconds: kept, as every refund
                # of an earlier call walks over it again.
                booked_by = logged[3] = self._booked(logged[0], logged[2])
            start = logged[1]
            for i in indices:
                booked = sums[i] + booked_by[i]
                sums[i] = booked
                booked += start
                if booked > floors[i]:
                    floors[i] = booked
        if entry is None:
            if not log:
                return [_INF] * len(rows)  # nothing to go by: the reservation stays
            # Unknown, or dropped from the log: the call may have started
            # before every logged one, whose first start came at most a
            # tolerance before the schedule of the calls ahead of it.
            for i, *_, tolerance in rows:
                floors[i] += tolerance
        elif mine:
            entry[2] = used
            entry[3] = None
            while log and log[0][2] is not None:
                log.popleft()  # settled, before every call in flight: no floor needs it
        return floors

    def _booked(
        self, cost: Mapping[str, float] | None, settled: Mapping[str, float] | None
    ) -> list[float]:
        """Per cell, the seconds a start stands for: its usage once settled, else its cost."""
        get = (_NO_COST if cost is None else cost).get
        booked = []
        for _, dimension, default, interval, _ in self._rows:
            amount = None if settled is None else settled.get(dimension)
            if amount is None:
                amount = get(dimension, default)
            booked.append(amount * interval)
        return booked

    def _drop_oldest(self, log: deque[list[Any]]) -> None:
        """Keep the log's walk bounded; an unsettled call dropped can no longer be placed."""
        if log.popleft()[2] is None:
            self._lost = True

    def clamp(
        self, dimension: str, remaining: float, reset: float | None, limit: float | None = None
    ) -> bool:
        """Follow a server that says ``remaining`` units of ``dimension`` are left.

        The shortest window's cell of ``dimension`` is moved so that the
        next starts use no more than ``remaining``: a start needs one request,
        and of a token dimension about what the latest start reserved of it
        (at least one unit when nothing remains). While ``remaining`` covers
        that, it may be spent ahead of the schedule (a start pays its tokens
        after, so a token dimension lets a start go as long as what remains
        covers the latest start's amount). When it does not, the next start
        waits until the server has refilled the difference: servers refill
        continuously and their ``reset`` is when the bucket is *full*, so with
        the budget's size ``limit`` the wait is the missing units at the
        server's pace, ``reset / (limit - remaining)`` seconds each (see
        :func:`corral._headers.refill_wait`), never later than ``reset``;
        without ``limit``, ``reset`` itself.

        The starts after it keep the rate's own pace, unless the server
        refills slower than that (a rate set above the real limit): then the
        cell runs at the server's pace, never faster than the server says,
        until the server reports its bucket at least half full again. The
        clamp only ever delays: it never grants more than the local rate does.

        Returns False when the gate has no such dimension. Needs a running loop.
        """
        index = self._shortest.get(dimension)
        if index is None:
            return False
        loop = _get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        now = self._clock() - self._origin
        if now > self._clamped:
            self._clamped = now
        _, _, configured, tolerance = self._cells[index]
        interval = self._rows[index][3]  # in force: the server's pace after a clamp, if slower
        if dimension == "requests":
            need = 1.0
        else:
            last = self._last_cost
            need = last.get(dimension, 0.0) if last is not None else 0.0
        at_least = need if need > 1.0 else 1.0
        if remaining >= at_least:
            if interval != configured and (limit is None or remaining >= limit / 2):
                interval = self._pace(index, configured)  # the server has room again
            # What may still go ahead of the schedule, once the next start's share is kept.
            floor = now + tolerance - (remaining - need) * interval
        else:
            pace = server_pace(remaining, reset, limit)
            if pace is not None:
                interval = self._pace(index, pace if pace > configured else configured)
            floor = now + tolerance + refill_wait(remaining, at_least, reset, limit, interval)
        if floor > self._tats[index]:
            self._tats[index] = floor
            self._update_ready()
        return True

    def _pace(self, index: int, interval: float) -> float:
        """Put ``interval`` in force for cell ``index`` (the per-call loops read it from _rows)."""
        row = self._rows[index]
        interval = min(interval, _MAX_INTERVAL)  # a server's pace too (see MAX_AMOUNT)
        if row[3] != interval:
            rows = list(self._rows)
            rows[index] = (row[0], row[1], row[2], interval, row[4])
            self._rows = tuple(rows)
        return interval

    # -- the line ----------------------------------------------------------------

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time() - self._origin
        ready = self._ready
        when = ready if ready > now else now
        self._timer_when = when
        self._timer = loop.call_at(self._origin + when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None  # the timer runs on the loop that set it
        # A coarse timer (uvloop: 1 ms) may fire a little early: read the
        # clock as the time asked for, so the head conforms instead of spinning.
        # (The same holds when origin + slot rounds to a loop time before it.)
        now = loop.time() - self._origin
        now = now if now > self._timer_when else self._timer_when
        waiters = self._waiters
        while waiters:
            fut, cost = waiters[0]
            if fut.done():
                waiters.popleft()
                continue
            ready = self._ready
            if now < ready and (ready - now > self._slack or not self._only_rounding(now)):
                # Not yet (a debt or a header clamp moved the schedule): later.
                self._arm(loop)
                return
            waiters.popleft()
            self._queued -= 1
            self._granted += 1
            self._grants += 1
            before = self._tats[:]
            last_now, last_cost = self._last_now, self._last_cost
            self._take(now, cost)
            log = self._log
            self._grantees[fut] = cost
            fut.set_result(
                (
                    self._grants,
                    before,
                    self._tats[:],
                    last_now,
                    last_cost,
                    cost,
                    None if log is None else log[-1],
                )
            )

    def _withdraw(self) -> None:
        self._queued -= 1
        if not self._queued:
            self._waiters.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _give_back(self, loop: asyncio.AbstractEventLoop, grant: _Grant) -> None:
        """A caller granted a start was cancelled before it resumed: undo the grant if safe."""
        self._granted -= 1
        if grant[0] != self._grants:
            # Later grants were made on top of it: undoing it would let them
            # come early. The next caller in line may start in its place.
            self._pass_on(grant)
            return
        self._undo(grant)
        self._update_ready()
        if self._timer is not None:
            self._timer.cancel()
            self._arm(loop)

    def _undo(self, grant: _Grant) -> None:
        """Undo the latest grant standing (``grant``); the caller updates ``_ready``."""
        _, before, after, last_now, last_cost, _, _ = grant
        self._grants -= 1
        tats = self._tats
        for i, tat in enumerate(after):
            # A cell something else moved since (a debt, a refund, a header
            # clamp) keeps this booking too: undoing it would also undo that.
            if tats[i] == tat:
                tats[i] = before[i]
        self._last_now, self._last_cost = last_now, last_cost
        log = self._log
        if log:
            log.pop()  # the newest entry: no start was made after this one

    def _undo_grants(self, grants: list[_Grant]) -> None:
        """Undo ``grants`` from the latest back, while each is the latest grant standing."""
        for grant in reversed(grants):
            if grant[0] != self._grants:
                break  # booked on top of by a start that stands: the rest stay spent
            self._undo(grant)
        self._update_ready()

    def _placed(
        self, place: asyncio.Future[_Grant], cost: Mapping[str, float] | None
    ) -> tuple[asyncio.Future[_Grant], Mapping[str, float] | None]:
        return place, cost

    def _pass_on(self, grant: _Grant) -> None:
        """Give a granted start whose caller was cancelled to the next live caller in line.

        Only when that caller's cost fits in the booking, in every cell: it
        then starts in its place, the rest of the booking spent. Otherwise,
        or with nobody in line, the whole booking stays spent (never more
        than was booked, and nobody overtakes the head of the line).
        """
        booked = grant[5]
        waiters = self._waiters
        while waiters:
            fut, cost = waiters[0]
            if fut.done():  # cancelled in line; its withdrawal counts it
                waiters.popleft()
                continue
            if cost is not booked and not self._fits(cost, booked):
                return
            waiters.popleft()
            self._queued -= 1
            self._granted += 1
            self._grantees[fut] = cost
            entry = grant[6]
            if entry is not None and entry[2] is None:
                # Its log entry now stands for this caller's reservation, so
                # that its settlement finds it by the mapping it passes.
                entry[0] = cost
                entry[3] = None
            fut.set_result((*grant[:5], cost, entry))
            return

    def _fits(self, cost: Mapping[str, float] | None, booked: Mapping[str, float] | None) -> bool:
        """Whether ``cost`` needs no more than ``booked`` of any cell's dimension."""
        get = (_NO_COST if cost is None else cost).get
        has = (_NO_COST if booked is None else booked).get
        return all(
            get(dimension, default) <= has(dimension, default)
            for _, dimension, default, _, _ in self._rows
        )

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        old = self._loop
        if old is not None and (self._queued or self._granted) and not old.is_closed():
            raise RuntimeError(
                "this rate is in use by tasks of another event loop that is still open; "
                "a corral.Limiter or rate can serve successive event loops, not two at once"
            )
        # What the last starts (and a header clamp) still owe carries over, as
        # if no time had passed since the latest of them: the new loop's time
        # now is the new origin. A clamp long after the latest start counts
        # from itself, not from that start.
        last = self._last_now if self._last_now > self._clamped else self._clamped
        pause = self._pause
        if pause is not None:
            index = self._paused_cell()
            if self._tats[index] == pause[1]:
                self._tats[index] = pause[0]  # a pause (a Limiter's cooldown) ends with its loop
            self._pause = None
        self._origin = loop.time()
        self._tats = [t - last if t > last else -_INF for t in self._tats]
        self._update_ready()
        self._last_now = 0.0
        self._clamped = -_INF
        # A start on this loop may reuse the latest one's mapping at 0.0: the
        # usage that one settled must not be read as the new start's.
        self._settled = None
        log = self._log
        if log:
            # Their starts are on the old loop's clock: refunds of calls not
            # yet settled keep their reservations.
            if any(logged[2] is None for logged in log):
                self._lost = True
            log.clear()
        self._waiters.clear()
        self._grantees.clear()
        self._moved.clear()
        self._queued = self._granted = 0
        self._timer = None
        self._loop = loop
        self._clock = loop_clock(loop)
