"""Adaptive concurrency: finding how many calls to run at once, while they run.

How many calls should be in flight against a service? Too few and its
capacity sits idle; too many and the extra calls only wait in its queue
(latency grows, throughput does not), then overflow it (429, 503, timeouts).
The right number depends on the service's capacity, which you do not know and
which changes. :class:`Controller` finds it from what the calls experience,
the way TCP finds a link's bandwidth:

- **Latency says "queueing".** While the service has spare capacity, a call
  takes its *baseline* latency whatever the concurrency. Past capacity, every
  extra call in flight waits in the service's queue, and latency grows in
  proportion. So the controller compares a *short window* of recent latencies
  (their median) with the *baseline* (the lowest of those medians, smoothed):
  within ``TOLERANCE`` of it, there is room, and the limit grows by its square
  root per window; above it, the limit moves half way (``CUT_SMOOTHING``)
  towards itself times the *gradient* ``GRADIENT_TARGET * baseline / latency``
  (halved at once when latency has about doubled), which under proportional
  queueing lands it just above capacity within a few windows (Netflix
  concurrency-limits' Gradient2, Envoy's adaptive concurrency filter).
- **Drops say "overloaded".** A timeout, an HTTP 429/503 or a
  ``corral.RetryAfter`` cuts the limit by ``DROP_BACKOFF`` at once (AIMD:
  additive increase, multiplicative decrease).

The pitfalls of those controllers, and what this one does instead:

- *Drops must lower the limit.* Gradient2 ignores them, and a rejected call
  answers fast, so its near-zero latency even pulls the limit *up*
  (concurrency-limits #176). Here a drop is never a latency sample; it cuts.
- *No upward creep under steady overload.* Gradient2's baseline is a long
  moving average of latency: under sustained queueing it rises to meet the
  queued latency, the gradient returns to 1, the headroom term adds
  ``sqrt(limit)`` every window, and the limit climbs without end
  (concurrency-limits #134). Here the baseline is a minimum, which queueing
  cannot raise, and the headroom is added only while latency is within
  tolerance of it.
- *Cancellations are neither.* A call cancelled because the caller gave up
  says nothing about the service (concurrency-limits #146): it is ignored.
- *Grow only what is used.* A limit that was never reached says nothing about
  whether a higher one would work; the limit grows only after a window in
  which it was binding (every slot taken, or callers waiting).

Two more rules keep it honest:

- *One reaction per change.* A window holds only calls that *started* at
  least one round trip (the smoothed latency) after the latest change of the
  limit: calls started earlier met the queue the old limit built, so the
  effect of a change is judged on calls that saw it in full. A drop counts
  only if its call started after the latest change: a burst of drops from
  one round of calls cuts once (TCP's fast recovery, in spirit).
- *A baseline can be wrong.* If the service itself becomes slower, every
  latency is "too high" and the limit falls. When it reaches ``min`` and
  latency is still high, queueing cannot be the cause: the latency seen there
  becomes the new baseline and the limit grows back. The other way round, a
  baseline measured while the event loop was busy (the first calls of a run
  open connections and start workers) is too high: a window more than
  ``TOLERANCE`` times faster replaces it at once.

Until the first sign of congestion (latency ``SLOW_START_TOLERANCE`` above the
baseline, or a drop) the limit grows by half
per window (slow start), so a run reaches a service's capacity in a few round
trips, not a few hundred. It starts low (4) because the baseline can only be
measured below the service's capacity.

What it cannot see: latency that grows because *this* process (or machine) is
short of CPU, not because the service queues. A client that is the
bottleneck looks like a slow service, and the limit settles where latency
stays within tolerance, which may be below the concurrency that would get the
most throughput out of a CPU-bound client.

Everything here is arithmetic on its arguments: time is passed in, so the
controller is tested on made-up clocks, exactly.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = [
    "CUT_SMOOTHING",
    "DROP_BACKOFF",
    "GRADIENT_TARGET",
    "MIN_GRADIENT",
    "TOLERANCE",
    "Adaptive",
    "Controller",
    "Outcome",
]

#: What became of one call, as the controller sees it: ``"success"`` (a
#: latency sample), ``"drop"`` (overload: timeout, 429/503, RetryAfter) or
#: ``"ignore"`` (no signal: cancelled, or failed for another reason).
Outcome: TypeAlias = Literal["success", "drop", "ignore"]

#: Latency up to this multiple of the baseline counts as "no queueing"
#: (Envoy's 25% buffer over its minimum latency).
TOLERANCE = 1.25
#: Slow start ends at the first latency above this multiple of the baseline:
#: the fast-growing phase is the one that can overshoot, so it stops at the
#: first hint.
SLOW_START_TOLERANCE = 1.2
#: Slow start multiplies the limit by this per window: 1.5, not TCP's 2, so an
#: overshoot puts at most half the capacity in the service's queue.
SLOW_START_GROWTH = 1.5
#: Above tolerance, the limit is scaled so latency would land at this multiple
#: of the baseline if the excess were all queueing.
GRADIENT_TARGET = 1.1
#: The short-term latency is this weight on the latest window's median plus
#: the rest on the previous value: one noisy window moves it only halfway.
SMOOTHING = 0.5
#: A window moves the limit this share of the way to what the gradient says...
CUT_SMOOTHING = 0.5
#: ...except when the gradient is this low or lower (latency about doubled):
#: then the limit is multiplied by it at once. No window cuts more than half.
MIN_GRADIENT = 0.5
#: A drop multiplies the limit by this (Netflix's AIMD and Gradient default).
DROP_BACKOFF = 0.9
#: A window closes after at least this many samples (and half the limit).
MIN_SAMPLES = 8
#: Latencies below this read as this: differences under 0.1 ms are the noise
#: of a busy event loop, not queueing in a service.
LATENCY_FLOOR = 1e-4


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Adaptive:
    """A concurrency limit that adapts to the service, within ``[min, max]``.

    ``limit="auto"`` means ``Adaptive()``. Use this class to bound or seed it::

        api = corral.Limiter(limit=corral.Adaptive(initial=4, max=64))
        await corral.gather(fetch, urls, limit=corral.Adaptive(max=200))

    The limit starts at ``initial`` and grows by half per round trip while latency
    stays near the lowest seen; then it tracks the point where latency starts
    to grow (the service's capacity), and cuts on timeouts, 429/503 and
    :class:`corral.RetryAfter`. It is never below ``min`` nor above ``max``.
    ``max`` is also how many calls a map keeps ready to start, so a huge one
    costs memory, not speed.

    What it is not: not a rate limit (add ``rate=`` for a documented quota),
    and no help for a call that does not wait on a shared resource (CPU work,
    ``asyncio.sleep``): there latency never grows, so the limit runs up to
    ``max``.

    Args:
        initial: the limit before anything is known, an int in [min, max].
            The default, 4, is low on purpose: the baseline latency can only
            be measured below the service's capacity, and slow start grows it
            by half each round trip or two (64 after 7 windows, 1000 after 14).
        min: the lowest the limit goes, an int >= 1.
        max: the highest the limit goes, an int >= min.

    Raises:
        TypeError: a field is not an int (bools are not ints here).
        ValueError: a field is out of range.

    .. versionadded:: 0.1
    """

    initial: int = 4
    min: int = 1
    max: int = 1000

    def __post_init__(self) -> None:
        for name in ("initial", "min", "max"):
            value = getattr(self, name)
            message = (
                f"Adaptive {name} must be an int >= 1, like "
                f"corral.Adaptive(initial=4, min=1, max=1000); got {name}={value!r}"
            )
            if not _is_int(value):
                raise TypeError(message)
            if value < 1:
                raise ValueError(message)
            object.__setattr__(self, name, int(value))
        if not self.min <= self.initial <= self.max:
            raise ValueError(
                "Adaptive needs min <= initial <= max; got "
                f"min={self.min!r}, initial={self.initial!r}, max={self.max!r}"
            )


class Controller:
    """The adaptive limit's state machine: feed it outcomes, read :attr:`limit`.

    Pure: no event loop, no clock. Each method takes ``now`` (any monotonic
    clock, in seconds) and the call's ``latency`` (seconds from its start to
    its outcome), so the call started at ``now - latency``.

    Args:
        adaptive: the bounds and the starting limit.
    """

    __slots__ = (
        "_busy",
        "_changed_at",
        "_max",
        "_min",
        "_need",
        "_samples",
        "_window_start",
        "baseline",
        "in_force",
        "limit",
        "slow_start",
        "smoothed",
    )

    def __init__(self, adaptive: Adaptive) -> None:
        self._min = float(adaptive.min)
        self._max = float(adaptive.max)
        #: The limit as a real number.
        self.limit = float(adaptive.initial)
        #: The limit callers must keep to: the floor of :attr:`limit`.
        self.in_force = adaptive.initial
        #: The lowest smoothed latency seen (seconds), or None before the first window.
        self.baseline: float | None = None
        #: The window medians, smoothed (seconds), or None before the first window.
        self.smoothed: float | None = None
        #: True until the first sign of congestion: the limit grows by half per window.
        self.slow_start = True
        self._window_start = -math.inf
        self._changed_at = -math.inf
        self._samples: list[float] = []
        self._need = max(MIN_SAMPLES, math.ceil(self.limit / 2))  # samples to close a window
        self._busy = False

    def __repr__(self) -> str:
        return (
            f"<Controller limit={self.limit:.2f} baseline={self.baseline!r} "
            f"slow_start={self.slow_start}>"
        )

    # -- outcomes ------------------------------------------------------------

    def success(self, now: float, latency: float, busy: bool) -> None:
        """A call succeeded after ``latency`` seconds.

        ``busy``: the limit was binding when it ended (every slot taken, or
        callers waiting). A window in which it never was cannot grow the limit.
        """
        if now - latency < self._window_start:
            return  # started before the latest change: it says nothing about it
        samples = self._samples
        samples.append(latency)
        if busy:
            self._busy = True
        if len(samples) >= self._need:
            self._close_window(now)

    def drop(self, now: float, latency: float) -> None:
        """A call was dropped (timeout, 429/503, RetryAfter) after ``latency`` seconds.

        Cuts the limit by :data:`DROP_BACKOFF` and ends slow start, unless the
        call started before the latest change: that change already answered it.
        """
        if now - latency < self._changed_at:
            return
        self.slow_start = False
        self._set(self.limit * DROP_BACKOFF, now)

    # -- internals -------------------------------------------------------------

    def _close_window(self, now: float) -> None:
        samples = self._samples
        samples.sort()
        half = len(samples) // 2
        median = samples[half] if len(samples) % 2 else (samples[half - 1] + samples[half]) / 2
        if median < LATENCY_FLOOR:
            median = LATENCY_FLOOR
        # The baseline is a minimum, and the minimum of noisy values is biased
        # low: take it over smoothed medians, so one lucky window cannot set
        # it. But a median far below the baseline is no luck: the baseline was
        # measured in a stall or an overload (say, the first window of a run,
        # while the event loop was busy starting it): start again from it.
        # Decisions use the window's own median, to react within a window.
        smoothed = self.smoothed
        baseline = self.baseline
        if smoothed is None or baseline is None or median * TOLERANCE < baseline:
            smoothed = baseline = self.smoothed = self.baseline = median
        else:
            smoothed = self.smoothed = smoothed + SMOOTHING * (median - smoothed)
            if smoothed < baseline:
                baseline = self.baseline = smoothed
        ratio = median / baseline
        limit = self.limit
        if self.slow_start and smoothed > SLOW_START_TOLERANCE * baseline:
            # The first hint of queueing: grow gently from here. Smoothed, so
            # that one noisy window of a few calls does not end it early.
            self.slow_start = False
        if ratio <= TOLERANCE:
            # No queueing to speak of: grow, if the limit was what held calls back.
            if not self._busy:
                new = limit
            elif self.slow_start:
                new = limit * SLOW_START_GROWTH
            else:
                new = limit + math.sqrt(limit)
        else:
            self.slow_start = False
            if self.in_force <= self._min:
                # Latency is high at the lowest limit: not our queueing, the
                # service itself is slower now. That is the new baseline.
                self.baseline = self.smoothed = median
                self.slow_start = True
                new = limit
            else:
                gradient = GRADIENT_TARGET / ratio
                if gradient <= MIN_GRADIENT:
                    new = limit * MIN_GRADIENT  # latency doubled: no doubt, halve now
                else:
                    # Half way there per window: one noisy window moves it only
                    # half as far; a real change gets there in a few windows.
                    new = limit + CUT_SMOOTHING * (limit * gradient - limit)
        self._set(new, now)

    def _set(self, new: float, now: float) -> None:
        """Move the limit (within bounds) and open a new window at ``now``."""
        if new < self._min:
            new = self._min
        elif new > self._max:
            new = self._max
        self.limit = new
        self.in_force = int(new)
        self._need = max(MIN_SAMPLES, math.ceil(new / 2))
        # Calls that start in the first round trip after a change still meet
        # the old queue (or none yet, after a raise): judge the change on
        # calls started one smoothed latency later.
        self._changed_at = now
        self._window_start = now + (self.smoothed or 0.0)
        self._samples = []
        self._busy = False
