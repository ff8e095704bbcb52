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

When the call ends, its actual usage *settles* the reservation: a debt
(``actual > reserved``) pushes TAT later by the difference; a refund pulls it
earlier, but never before "now", so an early estimate that was too high
cannot bank capacity for a burst later. A dimension the usage does not
mention keeps its reservation.

:class:`WeightedGate` enforces the cells on an event loop, first come first
served, exactly as :class:`corral.RateGate` does for one plain rate (whose
hot path stays separate and unchanged).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

__all__ = ["Cell", "WeightedGate"]


class Cell(NamedTuple):
    """One dimension of one window: how a :class:`WeightedGate` reads a Rate."""

    dimension: str
    #: Seconds of schedule one unit costs: ``per / allowance``.
    interval: float
    #: Seconds a start may lead its schedule: the rate's tolerance.
    tolerance: float
    #: The window's length, to tell per-minute from per-day cells of a dimension.
    per: float


class WeightedGate:
    """Lets callers through at several weighted rates at once, in arrival order.

    ``await gate.wait(cost)`` returns when a start of that cost may go (the
    cost is then reserved); :meth:`settle` reconciles it with what the call
    actually used. ``cost`` is a mapping of dimension to amount; a missing
    ``requests`` means one request, any other missing dimension means 0.

    Like :class:`corral.RateGate`: no polling (one timer for the head of the
    line), a caller cancelled in line spends nothing, a caller cancelled after
    its grant gives it back when no later grant was made on top of it, and the
    gate follows successive event loops.

    Args:
        cells: the (dimension, window) cells to enforce.
        rates: what the cells came from, for ``repr`` and :attr:`rate`.
    """

    __slots__ = (
        "_by_dimension",
        "_cells",
        "_dimensions",
        "_granted",
        "_grants",
        "_last_now",
        "_loop",
        "_queued",
        "_rate",
        "_ready",
        "_shortest",
        "_tats",
        "_timer",
        "_timer_when",
        "_waiters",
    )

    def __init__(self, cells: Sequence[Cell], rates: Any) -> None:
        if not cells:
            raise ValueError("a WeightedGate needs at least one cell")
        self._rate = rates
        # Per cell: (dimension, amount when the cost does not name it, interval, tolerance).
        self._cells = tuple(
            (c.dimension, 1.0 if c.dimension == "requests" else 0.0, c.interval, c.tolerance)
            for c in cells
        )
        self._dimensions = tuple(c.dimension for c in cells)
        self._tats = [-math.inf] * len(cells)
        # When the next start conforms: max(TAT - tolerance) over the cells,
        # kept up to date by whatever moves a TAT, so the hot path compares once.
        self._ready = -math.inf
        by_dimension: dict[str, list[int]] = {}
        for i, c in enumerate(cells):
            by_dimension.setdefault(c.dimension, []).append(i)
        self._by_dimension = by_dimension
        # The cell a provider's headers describe: the shortest window of each dimension.
        self._shortest = {
            d: min(indices, key=lambda i: cells[i].per) for d, indices in by_dimension.items()
        }
        self._last_now = -math.inf
        self._grants = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # (future, cost) per caller in line, first come first served.
        self._waiters: deque[
            tuple[asyncio.Future[tuple[int, list[float]]], Mapping[str, float] | None]
        ] = deque()
        self._queued = 0
        self._granted = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = -math.inf

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
        """Whether the gate behaves from ``now`` on exactly as a new one would."""
        return not self._queued and not self._granted and max(self._tats) <= now

    def delay(self, now: float) -> float:
        """Seconds from ``now`` until a start conforms (0.0: it may start now)."""
        ready = self._ready
        return ready - now if ready > now else 0.0

    # -- the hot path ----------------------------------------------------------

    def _update_ready(self) -> None:
        tats = self._tats
        self._ready = max(tats[i] - cell[3] for i, cell in enumerate(self._cells))

    def _take(self, now: float, cost: Mapping[str, float] | None) -> None:
        # Every cell moves to max(TAT, now), even for an amount of 0: a debt
        # settled later adds to a TAT no earlier than this start, so it can
        # never vanish into idle time that passed before the call began.
        tats = self._tats
        ready = -math.inf
        i = 0
        if cost is None:
            for _, default, interval, tolerance in self._cells:
                tat = tats[i]
                tat = (tat if tat > now else now) + default * interval
                tats[i] = tat
                tat -= tolerance
                if tat > ready:
                    ready = tat
                i += 1
        else:
            get = cost.get
            for dimension, default, interval, tolerance in self._cells:
                tat = tats[i]
                tat = (tat if tat > now else now) + get(dimension, default) * interval
                tats[i] = tat
                tat -= tolerance
                if tat > ready:
                    ready = tat
                i += 1
        self._ready = ready
        self._last_now = now

    def wait_nowait(self, cost: Mapping[str, float] | None = None) -> bool:
        """Reserve ``cost`` now if a start conforms and nobody is ahead; never suspends.

        Returns True when the caller may start (``cost`` is reserved), False
        when it would have to wait (nothing is reserved). Needs a running loop.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        if self._queued or self._granted:
            return False
        now = loop.time()
        if now < self._ready:
            return False
        # _take(), inlined for a cost: the per-call hot path.
        if cost is None:
            self._take(now, None)
            return True
        tats = self._tats
        ready = -math.inf
        get = cost.get
        i = 0
        for dimension, default, interval, tolerance in self._cells:
            tat = tats[i]
            tat = (tat if tat > now else now) + get(dimension, default) * interval
            tats[i] = tat
            tat -= tolerance
            if tat > ready:
                ready = tat
            i += 1  # noqa: SIM113  (enumerate() costs more here)
        self._ready = ready
        self._last_now = now
        return True

    async def wait(self, cost: Mapping[str, float] | None = None) -> None:
        """Return once a start of ``cost`` conforms, with ``cost`` reserved; FIFO."""
        if self.wait_nowait(cost):
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, list[float]]] = loop.create_future()
        self._waiters.append((fut, cost))
        self._queued += 1
        if self._timer is None:
            self._arm(loop)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.cancelled():
                self._withdraw()
            else:
                self._give_back(loop, fut.result())
            raise
        self._granted -= 1

    def settle(
        self, reserved: Mapping[str, float] | None, used: Mapping[str, float] | None
    ) -> None:
        """Reconcile a reservation with the usage the call reported.

        For each dimension in ``used``: a debt (used more than reserved) moves
        the schedule later, a refund moves it earlier but never before now.
        Dimensions ``used`` does not mention keep their reservation; ``used``
        None keeps all of it (a failed attempt whose usage is unknown).
        """
        if not used:
            return
        loop = self._loop
        if loop is None:
            return  # nothing was ever reserved here
        now = -math.inf  # read on the first refund only
        tats = self._tats
        earlier = False
        ready = -math.inf
        get = used.get
        for i, (dimension, default, interval, tolerance) in enumerate(self._cells):
            tat = tats[i]
            actual = get(dimension)
            if actual is not None:
                before = default if reserved is None else reserved.get(dimension, default)
                delta = (actual - before) * interval
                if delta > 0:
                    tat += delta  # debt: the next starts wait for it
                    tats[i] = tat
                elif delta < 0:
                    if not earlier:
                        now = loop.time()
                    if tat > now:
                        tat += delta
                        if tat < now:
                            tat = now
                        tats[i] = tat
                        earlier = True
            tat -= tolerance
            if tat > ready:
                ready = tat
        self._ready = ready
        if earlier and self._timer is not None and self._queued:
            self._timer.cancel()
            self._arm(loop)

    def clamp(self, dimension: str, remaining: float, reset: float | None) -> bool:
        """Follow a server that says ``remaining`` units of ``dimension`` are left.

        The shortest window's cell of ``dimension`` is moved so that it allows
        at most ``remaining`` more units before its schedule refills them
        (``remaining - 1`` more *starts* for requests, as the start itself
        takes one). With nothing remaining and ``reset`` seconds until the
        server's budget is back, no start is allowed before then. That is
        cautious: providers refill continuously and their ``reset`` is the
        time until the bucket is *full* again, longer than the wait for the
        next call, so a run that reads every answer's headers can lose some
        throughput to it; it never earns a 429. Returns
        False when the gate has no such dimension. Needs a running loop.
        """
        index = self._shortest.get(dimension)
        if index is None:
            return False
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        now = loop.time()
        _, _, interval, tolerance = self._cells[index]
        # What may still start ahead of the schedule: a start takes one request
        # itself, and pays its tokens after, so any tokens left let one start.
        usable = remaining - 1 if dimension == "requests" else (remaining if remaining > 0 else -1)
        if usable >= 0:
            floor = now + tolerance - usable * interval
        else:
            floor = now + tolerance + (reset if reset is not None else interval)
        if floor > self._tats[index]:
            self._tats[index] = floor
            self._update_ready()
        return True

    # -- the line ----------------------------------------------------------------

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        when = now + self.delay(now)
        self._timer_when = when
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None  # the timer runs on the loop that set it
        # A coarse timer (uvloop: 1 ms) may fire a little early: read the
        # clock as the time asked for, so the head conforms instead of spinning.
        now = loop.time()
        now = now if now > self._timer_when else self._timer_when
        waiters = self._waiters
        while waiters:
            fut, cost = waiters[0]
            if fut.done():
                waiters.popleft()
                continue
            if now < self._ready:
                # Not yet (a debt or a header clamp moved the schedule): later.
                self._arm(loop)
                return
            waiters.popleft()
            self._queued -= 1
            self._granted += 1
            self._grants += 1
            before = self._tats[:]
            self._take(now, cost)
            fut.set_result((self._grants, before))

    def _withdraw(self) -> None:
        self._queued -= 1
        if not self._queued:
            self._waiters.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _give_back(self, loop: asyncio.AbstractEventLoop, grant: tuple[int, list[float]]) -> None:
        self._granted -= 1
        number, before = grant
        if number != self._grants:
            return  # later grants were made on top of it: the reservation stays spent
        self._grants -= 1
        self._tats = before
        self._update_ready()
        if self._timer is not None:
            self._timer.cancel()
            self._arm(loop)

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        old = self._loop
        if old is not None and (self._queued or self._granted) and not old.is_closed():
            raise RuntimeError(
                "this rate is in use by tasks of another event loop that is still open; "
                "a corral.Limiter or rate can serve successive event loops, not two at once"
            )
        # What the last starts still owe carries over, as if no time had passed.
        now = loop.time()
        last = self._last_now
        self._tats = [now + (t - last) if t > last else -math.inf for t in self._tats]
        self._update_ready()
        self._last_now = now
        self._waiters.clear()
        self._queued = self._granted = 0
        self._timer = None
        self._loop = loop
