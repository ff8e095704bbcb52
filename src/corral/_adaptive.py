"""Adaptive concurrency: finding how many calls to run at once, while they run.

How many calls should be in flight against a service? Too few and its
capacity sits idle; too many and the extra calls only wait in its queue
(latency grows, throughput does not), then overflow it (429, 503, timeouts).
The right number depends on the service's capacity, which you do not know and
which changes. :class:`Controller` finds it from what the calls experience,
the way TCP Vegas and BBR find a link's bandwidth:

- **Latency says "queueing".** While the service has spare capacity, a call
  takes its *baseline* latency whatever the concurrency. Past capacity, every
  extra call in flight waits in the service's queue, and latency grows in
  proportion. So the controller compares a *window* of recent latencies with
  the *baseline*: the ratio says how many of the calls in flight are
  queueing, ``limit * (1 - baseline / latency)`` (Vegas's queue estimate), and
  the limit that would bring latency to ``GRADIENT_TARGET`` times the
  baseline is ``limit * GRADIENT_TARGET * baseline / latency`` (the
  *gradient*: Netflix concurrency-limits' Gradient2, Envoy's adaptive
  concurrency filter, BBR's ``gain * bandwidth * min RTT``).
- **It settles at the knee.** With no queueing at all (latency within
  ``GROW_RATIO`` of the baseline) the limit grows by its square root per
  window, while it was in use. Nearer the target it moves ``CUT_SMOOTHING``
  of the way to what the gradient says, up or down: the steps shrink as it
  closes in, and it comes to rest with a standing queue of a few calls,
  enough to keep the service busy, not enough to add much to the tail
  latency. Latency ``FAST_RATIO`` times the baseline or more is no noise:
  the limit takes the whole step at once (at most a halving,
  ``MIN_GRADIENT``).
- **Drops say "overloaded".** A timeout, an HTTP 429/503 or a
  ``corral.RetryAfter`` cuts the limit by ``DROP_BACKOFF`` at once (AIMD:
  additive increase, multiplicative decrease).

The baseline, and where exactly the limit comes to rest
-------------------------------------------------------

Slow start's baseline is the lowest smoothed window latency seen (a minimum
of noisy values is biased low, so it is taken over smoothed windows: one
lucky window cannot set it). After slow start, every ``PROBE_EVERY`` round
trips the controller *probes* (BBR's ProbeRTT, in spirit): for one window it
lowers the limit to ``PROBE_SCALE`` (3/4) of itself, and the latency there,
smoothed over probes, is the baseline until the next probe; then the limit
goes back. So the baseline is never stale (a minimum only falls: one from a
lucky moment, or from before the service or this client became slower,
would hold the limit too low for good), and it is measured below the limit,
not at it, so queueing cannot raise it (no creep, below).

``GRADIENT_TARGET`` is ``PROBE_SCALE ** -0.5``: the limit rests where cutting
it by a quarter would cut latency by ``1 - 1/GRADIENT_TARGET`` (13%), that is
where latency grows half as fast as the limit (Kleinrock's optimum: the most
throughput per unit of latency). Against a service with a sharp knee that is
just past the knee (a standing queue of about 15%); against a client whose
own CPU is the bottleneck, where latency grows gently with every call added
and throughput with it, it is further out, where more calls stop paying.

Noise does not move it:

- *A window's latency is its interquartile mean*, not its median: event
  loops read their clock in steps (uvloop's in whole milliseconds, 10% of a
  10 ms call), and a median of such readings jumps by whole steps, where the
  mean of the middle half moves smoothly; a few stalled calls at either end
  do not move it at all.
- *Decisions use the median of the latest three windows*: one window slowed
  by a stall of this process (or of the machine) moves nothing.
- *A deep cut must pay off.* After a cut to ``CHECKED_CUT`` of the limit or
  less, queueing predicts latency falls in proportion. If less than a quarter of
  that fall comes, the latency was not this client's doing (the service, or
  this machine, is slower now): the limit holds there, with the baseline
  raised to match, instead of cutting on towards ``min``.
- *A baseline from a stall is dropped at once*: a window more than
  ``TOLERANCE`` times faster replaces it (the first calls of a run open
  connections and start workers, and are slow).
- *At ``min``, high latency is not queueing*: the service itself is slower,
  and the latency seen there becomes the new baseline.

The pitfalls of Gradient2-style controllers, and what this one does instead:

- *Drops must lower the limit.* Gradient2 ignores them, and a rejected call
  answers fast, so its near-zero latency even pulls the limit *up*
  (concurrency-limits #176). Here a drop is never a latency sample; it cuts.
- *No upward creep under steady overload.* Gradient2's baseline is a long
  moving average of latency: under sustained queueing it rises to meet the
  queued latency, the gradient returns to 1, the headroom term adds
  ``sqrt(limit)`` every window, and the limit climbs without end
  (concurrency-limits #134). Here the baseline is measured at 3/4 of the
  limit: while the limit keeps a queue, that is lower, and the limit falls.
- *Cancellations are neither.* A call cancelled because the caller gave up
  says nothing about the service (concurrency-limits #146): it is ignored.
- *Grow only what is used.* A limit that was never reached says nothing about
  whether a higher one would work; the limit grows only after a window in
  which it was binding (every slot taken, or callers waiting).

One reaction per change: a window holds only calls that *started* at least
one round trip (the smoothed latency) after the latest change of the limit:
calls started earlier met the queue the old limit built, so the effect of a
change is judged on calls that saw it in full. A drop counts only if its call
started after the latest change: a burst of drops from one round of calls
cuts once (TCP's fast recovery, in spirit).

Until the first sign of congestion (latency ``SLOW_START_TOLERANCE`` above the
baseline, or a drop) the limit grows by half per window (slow start), so a
run reaches a service's capacity in a few round trips, not a few hundred. It
starts low (4) because the baseline can only be measured below the service's
capacity.

What it cannot see: latency that grows because *this* process (or machine) is
short of CPU, not because the service queues. A client that is the
bottleneck looks like a slow service, and the limit settles where latency
stays near the baseline, which may be below the concurrency that would get
the most throughput out of a CPU-bound client (at the price of its latency).

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

#: A window this many times faster than the baseline means the baseline was
#: measured in a stall: it is replaced at once (Envoy's 25% buffer).
TOLERANCE = 1.25
#: Slow start ends at the first smoothed latency above this multiple of the
#: baseline, or the first window above ``TOLERANCE`` times it: the
#: fast-growing phase is the one that can overshoot, so it stops at the first
#: hint.
SLOW_START_TOLERANCE = 1.2
#: Slow start multiplies the limit by this per window: 1.5, not TCP's 2, so an
#: overshoot puts at most half the capacity in the service's queue.
SLOW_START_GROWTH = 1.5
#: A probe lowers the limit to this share of itself for one window.
PROBE_SCALE = 0.75
#: The limit comes to rest where latency is this multiple of the baseline
#: (latency at ``PROBE_SCALE`` of the limit): where latency grows half as fast
#: as the limit, Kleinrock's optimum (about 1.155).
GRADIENT_TARGET = PROBE_SCALE**-0.5
#: Latency up to this multiple of the baseline is no queueing at all: the
#: limit grows by its square root (if it was in use).
GROW_RATIO = 1.05
#: Latency this multiple of the baseline or more is no noise: the limit takes
#: the gradient's whole step at once.
FAST_RATIO = 2.0
#: The short-term latency is this weight on the latest window's mean plus
#: the rest on the previous value: one noisy window moves it only halfway.
SMOOTHING = 0.5
#: Between ``GROW_RATIO`` and ``FAST_RATIO``, a window moves the limit this
#: share of the way to what the gradient says: one noisy window moves it only
#: half as far, a real change gets there in a few windows.
CUT_SMOOTHING = 0.5
#: No window cuts more than this: latency about doubled halves the limit.
MIN_GRADIENT = 0.5
#: A drop multiplies the limit by this (Netflix's AIMD and Gradient default).
DROP_BACKOFF = 0.9
#: A window closes after at least this many samples (and half the limit).
MIN_SAMPLES = 8
#: Latencies below this read as this: differences under 0.1 ms are the noise
#: of a busy event loop, not queueing in a service.
LATENCY_FLOOR = 1e-4
#: A cut for latency to this share of the limit or lower must pay off: if
#: the latency after it fell less than ``CHECK_SHARE`` of what queueing
#: predicts, the latency was not this client's doing, and the limit holds.
CHECKED_CUT = 0.8
CHECK_SHARE = 0.25
#: The baseline is measured afresh every this many round trips (smoothed
#: latencies): about 0.4 s for 12 ms calls. A probe costs about a round trip
#: at 3/4 of the limit: well under 1% of the throughput.
PROBE_EVERY = 30


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


def _interquartile_mean(samples: list[float]) -> float:
    """The mean of the middle half of ``samples`` (sorted in place)."""
    samples.sort()
    n = len(samples)
    low, high = n // 4, n - n // 4
    middle = samples[low:high]
    return sum(middle) / len(middle)


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
        "_confirmed_at",
        "_cut_from",
        "_max",
        "_min",
        "_need",
        "_probe_from",
        "_recent",
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
        #: The lowest smoothed latency seen since the latest probe (seconds),
        #: or None before the first window.
        self.baseline: float | None = None
        #: The window means, smoothed (seconds), or None before the first window.
        self.smoothed: float | None = None
        #: True until the first sign of congestion: the limit grows by half per window.
        self.slow_start = True
        self._window_start = -math.inf
        self._changed_at = -math.inf
        self._confirmed_at = -math.inf  # when a window last came near the baseline
        self._probe_from: float | None = None  # the limit to go back to after a probe
        self._recent: list[float] = []  # the latest window means, oldest first
        self._cut_from: tuple[float, float] | None = None  # (latency, limit) before a cut
        self._samples: list[float] = []
        self._need = max(MIN_SAMPLES, math.ceil(self.limit / 2))  # samples to close a window
        self._busy = False

    def __repr__(self) -> str:
        return (
            f"<Controller limit={self.limit:.2f} baseline={self.baseline!r} "
            f"slow_start={self.slow_start}>"
        )

    @property
    def probing(self) -> bool:
        """True while the limit is lowered to measure the baseline afresh."""
        return self._probe_from is not None

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

        Cuts the limit by :data:`DROP_BACKOFF` and ends slow start (and a
        probe: the cut is from the limit the probe lowered), unless the call
        started before the latest change: that change already answered it.
        """
        if now - latency < self._changed_at:
            return
        if self.slow_start:
            self.slow_start = False
            self._confirmed_at = now
        limit = self.limit if self._probe_from is None else self._probe_from
        self._probe_from = self._cut_from = None
        self._recent = []
        self._set(limit * DROP_BACKOFF, now)

    # -- internals -------------------------------------------------------------

    def _close_window(self, now: float) -> None:
        mean = _interquartile_mean(self._samples)
        if mean < LATENCY_FLOOR:
            mean = LATENCY_FLOOR
        smoothed = self.smoothed
        baseline = self.baseline
        limit = self.limit
        probe_from = self._probe_from
        if probe_from is not None:
            # The probe's window: latency at PROBE_SCALE of the limit. It is
            # the baseline from now on (smoothed over probes: one noisy probe
            # moves it only half way).
            self._probe_from = None
            assert baseline is not None  # probes follow windows
            baseline += SMOOTHING * (mean - baseline)
            self.baseline = baseline
            self._confirmed_at = now
            self._recent = []
            self._set(probe_from, now)
            return
        if smoothed is None or baseline is None or mean * TOLERANCE < baseline:
            # The first window, or a baseline measured in a stall (the first
            # calls of a run open connections and start workers): start from here.
            smoothed = baseline = self.smoothed = self.baseline = mean
        else:
            smoothed = self.smoothed = smoothed + SMOOTHING * (mean - smoothed)
            if self.slow_start and smoothed < baseline:
                # The minimum of smoothed means, so one lucky window cannot set it.
                baseline = self.baseline = smoothed
        recent = self._recent
        recent.append(mean)
        if len(recent) > 3:
            del recent[0]
        # Decisions use the median of the latest three windows: one window
        # delayed by a stall of this process (or of the machine) moves
        # nothing. Fewer since the latest cut: the latest window alone.
        typical = sorted(recent)[1] if len(recent) == 3 else mean
        cut_from = self._cut_from
        if cut_from is not None:
            # The first window after a cut for latency. Queueing predicts
            # latency falls with the limit; if less than a quarter of that fall
            # came, the latency was not this client's queue (the service, or
            # this machine, is slower now): hold here instead of cutting on.
            self._cut_from = None
            before, was = cut_from
            expected = max(baseline, before * limit / was)
            if mean > before - CHECK_SHARE * (before - expected):
                baseline = self.baseline = max(baseline, mean / GRADIENT_TARGET)
                typical = mean
        ratio = typical / baseline
        if self.slow_start and (smoothed > SLOW_START_TOLERANCE * baseline or ratio > TOLERANCE):
            # The first hint of queueing: from here, settle. The baseline was
            # just measured, at lower limits: the first probe can wait.
            self.slow_start = False
            self._confirmed_at = now
        if self.slow_start:
            new = limit * SLOW_START_GROWTH if self._busy else limit
        elif ratio > TOLERANCE and self.in_force <= self._min:
            # Latency is high at the lowest limit: not our queueing, the
            # service itself is slower now. That is the new baseline.
            self.baseline = self.smoothed = mean
            self._recent = []
            self.slow_start = True
            new = limit
        elif ratio <= GROW_RATIO:
            # No queueing to speak of: grow, if the limit was what held calls back.
            new = limit + math.sqrt(limit) if self._busy else limit
        else:
            gradient = max(MIN_GRADIENT, GRADIENT_TARGET / ratio)
            if ratio >= FAST_RATIO:
                new = limit * gradient  # latency well up: no doubt, cut now
            else:
                # Part of the way: the steps shrink as latency nears the target.
                new = limit + CUT_SMOOTHING * (limit * gradient - limit)
                if new > limit and not self._busy:
                    new = limit
            if new < limit:
                # Judge the cut on the windows after it, alone; a deep one
                # must pay off (a shallow one's effect is lost in the noise).
                self._recent = []
                if new <= CHECKED_CUT * limit:
                    self._cut_from = (typical, limit)
        if (
            not self.slow_start
            and now - self._confirmed_at > PROBE_EVERY * smoothed
            and new * PROBE_SCALE >= self._min
        ):
            # Time to measure the baseline afresh: one window at PROBE_SCALE
            # of the limit.
            self._probe_from = new
            new *= PROBE_SCALE
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
