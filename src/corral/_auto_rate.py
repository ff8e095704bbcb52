"""``rate="auto"``: find and follow the start rate a service allows, from its throttles.

Hosted APIs publish per-minute limits, but the limit that matters is often
lower (a shared key, an acceleration limit, a provider under load) and
nobody tells the client. ``rate="auto"`` controls the *start rate* the way
TCP controls its window (and botocore's adaptive retry mode its send rate):

- **slow start**: from ``initial`` starts/s, every successful call adds
  ``SLOW_START_GAIN`` starts/s, so while the calls keep up with the rate it
  grows by e^0.7, about 2x, per second;
- **multiplicative decrease**: a throttle (HTTP 429 or 503, or a
  :class:`corral.RetryAfter`) cuts the rate to ``DECREASE`` (0.7) of what it
  was and ends slow start; throttles within ``HOLD`` seconds of a cut are the
  same congestion event and cut nothing more;
- **additive increase**: after that, the rate grows by ``INCREASE`` (5%) of
  the rate at the last cut per second (each success adds its share), back
  to the level that was throttled in about 6 s, a little past it after;
- after a **cooldown** (a Retry-After that paused the Limiter), slow start
  again from half the rate, up to where the last cut left it;
- growth stops at ``HEADROOM`` (3) times the successes per second (a moving
  average over ``MEASURE``, 1 s): calls held back by something else (few
  slots, slow calls) never tested a higher rate, and a rate grown far above
  what runs would take many cuts, one per ``HOLD``, to come down from when
  the service starts refusing (the point of RFC 7661 about TCP's window).
  A rate that holds quick calls back stays below the cap, as successes
  then come at about the rate; with slow calls (seconds), slow start grows
  no faster than their successes can show the rate is used.

The rate stays within ``[min, max]``. :class:`RateController` is the pure
arithmetic on times passed in; :class:`AutoRateGate` is a
:class:`corral.RateGate` whose interval follows it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

from ._rate import Rate, RateGate
from ._stats import Waiting

__all__ = ["AutoRateGate", "RateController", "with_auto_rate"]

#: Starts/s added per success in slow start (growth of about 2x per second).
SLOW_START_GAIN = 0.7
#: The share of the rate kept on a throttle.
DECREASE = 0.7
#: In congestion avoidance, the rate grows by this share of the rate at the last cut per second.
INCREASE = 0.05
#: Throttles within this many seconds of a cut belong to the same event.
HOLD = 1.0
#: Successes grow the rate only up to this many times the successes per second.
HEADROOM = 3.0
#: The successes per second are a moving average over about this many seconds.
MEASURE = 1.0


class RateController:
    """AIMD with slow start on a start rate (starts per second), on an injected clock.

    Args:
        initial: the rate to start from.
        min: the lowest rate it may cut to.
        max: the highest it may grow to.

    Raises:
        ValueError: bounds that are not ``0 < min <= initial <= max``.
    """

    __slots__ = (
        "_cut_at",
        "_cut_level",
        "_last",
        "_max",
        "_min",
        "ceiling",
        "demand",
        "rate",
        "slow_start",
    )

    def __init__(self, initial: float = 1.0, min: float = 0.1, max: float = 10_000.0) -> None:
        numbers = (initial, min, max)
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in numbers) or not (
            0 < min <= initial <= max < math.inf
        ):
            raise ValueError(
                "an adaptive rate needs 0 < min <= initial <= max (finite, starts per second); "
                f"got initial={initial!r}, min={min!r}, max={max!r}"
            )
        self._min, self._max = float(min), float(max)
        #: The start rate in force, in starts per second.
        self.rate = float(initial)
        #: True while growing exponentially (at first, and after a cooldown).
        self.slow_start = True
        #: Where slow start hands over to additive increase (the rate after the last cut).
        self.ceiling = math.inf
        self._cut_at = -math.inf
        self._cut_level = float(initial)
        #: Successes per second, a moving average over about ``MEASURE`` seconds;
        #: it starts at ``initial``, as if the calls had used the rate.
        self.demand = float(initial)
        self._last = math.nan  # the time of the latest success (none yet)

    def success(self, now: float | None = None) -> float:
        """A call succeeded at ``now``: grow the rate; returns the rate in force.

        With ``now``, growth stops at ``HEADROOM`` times :attr:`demand`:
        successes that come slower than the rate (calls held back by something
        else: few slots, slow calls) say nothing about a higher rate, and a rate grown far above
        what is used would take many cuts, one per ``HOLD``, to come down when
        the service starts refusing (RFC 7661's point about TCP's window).
        """
        rate = self.rate
        if now is not None:
            # Each success adds 1 / MEASURE to the average, which decays by half
            # per MEASURE seconds without one (1 / (1 + x): cheaper than exp(-x),
            # and as close when successes come often, which is when it is paid
            # for); at a steady d per second it settles at d + 1. NaN (the first
            # success) and a negative gap (another event loop's clock) decay
            # nothing.
            elapsed = now - self._last
            self._last = now
            demand = self.demand
            if elapsed > 0:
                demand /= 1.0 + elapsed / MEASURE
            self.demand = demand = demand + 1.0 / MEASURE
            if rate >= HEADROOM * demand:
                return rate  # the calls use less than a third of the rate: no growth
        if self.slow_start:
            rate += SLOW_START_GAIN
            if rate >= self.ceiling:
                rate = self.ceiling
                self.slow_start = False
        else:
            # About `rate` successes per second: each adds its share of INCREASE * level.
            rate += INCREASE * self._cut_level / rate
        self.rate = rate if rate < self._max else self._max
        return self.rate

    def throttle(self, now: float) -> float:
        """The service throttled a call at ``now``: cut the rate (once per event)."""
        # A time before the last cut is another event loop's clock (a Limiter
        # serves successive loops): a new event, not the same one.
        if 0 <= now - self._cut_at < HOLD:
            return self.rate
        self._cut_at = now
        self._cut_level = self.rate
        rate = self.rate * DECREASE
        self.rate = rate if rate > self._min else self._min
        self.ceiling = self.rate
        self.slow_start = False
        return self.rate

    def after_pause(self) -> float:
        """A cooldown ended: slow start again from half the rate, up to the last cut's level."""
        self.ceiling = self.rate
        half = self.rate / 2
        self.rate = half if half > self._min else self._min
        self.slow_start = self.rate < self.ceiling
        return self.rate


class AutoRateGate(RateGate):
    """A :class:`corral.RateGate` whose rate a :class:`RateController` sets.

    The callers' side is the RateGate's (FIFO, no polling, cancellation-safe);
    :meth:`success`, :meth:`throttle` and :meth:`after_pause` feed the
    controller, and each change of rate changes the spacing of the *next*
    starts (those already booked keep their slots).
    """

    __slots__ = ("_controller", "_pace")

    def __init__(self, controller: RateController | None = None) -> None:
        controller = controller if controller is not None else RateController()
        super().__init__(Rate(controller.rate))
        self._controller = controller
        # The seconds per start a server's headers impose while it refills slower
        # than the controller's rate (see clamp); 0.0 when none.
        self._pace = 0.0

    @property
    def controller(self) -> RateController:
        """The controller setting the rate."""
        return self._controller

    @property
    def rate(self) -> Rate:
        """The rate in force now."""
        return Rate(self._controller.rate)

    def _follow(self, rate: float) -> None:
        interval = 1.0 / rate
        # A server refilling slower than the rate sets the pace until it has room
        # again (RateGate.clamp): a success must not undo that.
        self._interval = interval if interval > self._pace else self._pace

    def clamp(
        self, dimension: str, remaining: float, reset: float | None, limit: float | None = None
    ) -> bool:
        """Follow a server's rate-limit headers (see :meth:`corral.RateGate.clamp`).

        The server's pace, when slower than the controller's rate, holds until
        the server reports its bucket half full again, whatever the calls'
        outcomes do to the rate meanwhile.
        """
        applied = super().clamp(dimension, remaining, reset, limit)
        if applied:
            interval = self._interval
            self._pace = interval if interval > 1.0 / self._controller.rate else 0.0
        return applied

    def success(self) -> None:
        """A call through the gate succeeded: grow the rate, up to a few times what is used."""
        loop = self._loop
        if loop is None:
            return  # no start went through the gate: nothing says the rate was too low
        self._follow(self._controller.success(loop.time()))

    def throttle(self, now: float) -> None:
        """A call through the gate was throttled at loop time ``now``."""
        self._follow(self._controller.throttle(now))

    def after_pause(self) -> None:
        """A cooldown of the Limiter holding this gate ended."""
        self._follow(self._controller.after_pause())

    def feedback(self, error: BaseException | None, now: float) -> None:
        """How a call ended: None for a success; a throttle cuts the rate; other errors, nothing."""
        if error is None:
            self.success()
        elif isinstance(error, Exception):
            from ._retry import retry_kind
            from ._retry_budget import THROTTLE

            if retry_kind(error) == THROTTLE:
                self.throttle(now)

    def __repr__(self) -> str:
        return f"<corral.AutoRateGate rate={self.rate!r} waiting={self.waiting}>"


def is_auto(value: Any) -> bool:
    """Whether a ``rate=`` asks for the adaptive rate."""
    return isinstance(value, str) and value == "auto"


def with_auto_rate(
    call: Callable[[Any], Awaitable[Any]], gate: AutoRateGate, waiting: Waiting
) -> Any:
    """Wrap ``call``: wait for the adaptive rate, then tell it how the call ended.

    ``waiting`` counts the items waiting for their turn (not started yet).
    """
    wait, success, feedback = gate.wait, gate.success, gate.feedback

    async def paced(item: Any) -> Any:
        cell = waiting.cell  # a call the engine times: see Waiting
        if cell is not None:
            waiting.cell = None
        waiting.count += 1
        try:
            await wait()
        finally:
            waiting.count -= 1
        if cell is not None:
            cell[0] = asyncio.get_running_loop().time()
        try:
            value = await call(item)
        except Exception as exc:
            feedback(exc, asyncio.get_running_loop().time())
            raise
        success()
        return value

    return paced
