"""Adaptive concurrency: finding how many calls to run at once, while they run.

How many calls should be in flight against a service? Too few and its
capacity sits idle; too many and the extra calls only wait in its queue
(latency grows, throughput does not), then overflow it (429, 503, timeouts).
The right number depends on the service's capacity, which you do not know and
which changes. :class:`Controller` finds it from what the calls experience,
the way TCP Vegas and BBR find a link's bandwidth:

- **Latency says "queueing".** While the service has spare capacity, a call
  takes the same latency whatever the concurrency. Past capacity, every extra
  call in flight waits in the service's queue, and latency grows in
  proportion: throughput (calls in flight over latency, Little's law) stops
  growing. So the question for a limit is: *does latency grow as fast as the
  limit?* Every ``PROBE_EVERY`` windows (up to ``PROBE_EVERY_MAX`` while the
  limit holds still) the controller *probes*: for one window it lowers the
  limit to ``PROBE_SCALE`` (4/5) of itself and measures the latency there
  (BBR's ProbeRTT, in spirit). That latency, smoothed over probes, is the
  *reference* the latency at the limit is judged by, and the limit rests where
  it is ``GRADIENT_TARGET`` (1.2) times the reference: where the last fifth of
  the calls raises latency less than it raises concurrency (latency grows at
  most 0.82 times as fast as the limit), so they still add throughput. Against
  a service with a sharp knee that is just past the knee; against a client
  whose own CPU is the bottleneck (latency grows gently with every call added,
  and throughput with it) it is further out, where more calls stop paying.
- **It settles, it does not saw.** Below the target the limit grows by up to
  its square root per window (the full step with latency at the reference,
  none at the target); above it, it moves half way (``CUT_SMOOTHING``)
  towards itself times the *gradient* ``GRADIENT_TARGET * reference /
  latency``, at most halving in one window (``MIN_GRADIENT``). So under
  proportional queueing it lands just above capacity within a few windows
  (Netflix concurrency-limits' Gradient2, Envoy's adaptive concurrency
  filter).
- **Drops say "overloaded".** A timeout, an HTTP 429/503 or a
  ``corral.RetryAfter`` cuts the limit by ``DROP_BACKOFF`` at once (AIMD:
  additive increase, multiplicative decrease).

Noise moves it little (a shared machine delays calls for reasons that have
nothing to do with the service):

- *A window's latency is its interquartile mean*, not its median: event loops
  read their clock in steps (uvloop's in whole milliseconds, 10% of a 10 ms
  call), and a median of such readings jumps by whole steps where the mean of
  the middle half moves smoothly; a few stalled calls at either end do not
  move it at all.
- *One slow window cuts nothing.* A cut needs two windows in a row above the
  target; one slowed by a stall of this process (or of the machine) holds
  the limit where it is.
- *Nor does one fast window grow it.* Growth is judged by the slower of the
  window and the one before it: judged on one window while a cut needs two,
  every fast window between slow ones would add headroom that nothing takes
  back, and noise alone would push the limit up.
- *A probe slower than the window before it* met a stall, not less queueing:
  it reads as that window.

Overload, and a reference that is wrong:

- *Far above the lowest latency, probes stop.* Latency more than ``OVERLOAD``
  (2) times the lowest seen (a minimum of smoothed windows) is judged
  against that lowest, not the reference, and no probe runs: under a queue
  deeper than a fifth of the limit a probe would measure queueing, and a
  reference that rose with the queue would hold the limit up (a capacity
  drop would not be followed). So a capacity drop is cut towards the lowest
  latency, by up to half per window.
- *A deep cut must pay off.* After a cut to ``CHECKED_CUT`` of the limit or
  less in that state, queueing predicts latency falls in proportion. If it
  holds still instead (falls by less than ``CHECK_SHARE`` of that), the
  latency was not this client's queue (the service, or this machine, is
  slower now): the cut is undone, and the latency seen is the new lowest and
  the new reference. Latency still *rising* is a queue still building (a
  capacity drop in progress): the cut stands, and more may follow.
- *At ``min``, high latency is not queueing*: the service itself is slower,
  and the latency seen there becomes the new lowest; slow start begins again.
- *A lowest latency from a stall is dropped at once*: a window more than
  ``TOLERANCE`` times faster replaces it (the first calls of a run open
  connections and start workers, and are slow).

The pitfalls of Gradient2-style controllers, and what this one does instead:

- *Drops must lower the limit.* Gradient2 ignores them, and a rejected call
  answers fast, so its near-zero latency even pulls the limit *up*
  (concurrency-limits #176). Here a drop is never a latency sample; it cuts.
- *No upward creep under steady overload.* Gradient2's baseline is a long
  moving average of latency: under sustained queueing it rises to meet the
  queued latency, the gradient returns to 1, the headroom term adds
  ``sqrt(limit)`` every window, and the limit climbs without end
  (concurrency-limits #134). Here, while the limit keeps a queue, latency is
  proportional to it, so the latency at the limit is ``1 / PROBE_SCALE``
  (1.25) times the latency at the probe whatever the queue: above
  ``GRADIENT_TARGET``, so the limit falls, never grows (and beyond
  ``OVERLOAD`` the lowest latency, a minimum queueing cannot raise, is the
  reference).
- *Cancellations are neither.* A call cancelled because the caller gave up
  says nothing about the service (concurrency-limits #146): it is ignored.
- *Grow only what is used.* A limit that was never reached says nothing about
  whether a higher one would work; the limit grows only after a window in
  which it was binding (every slot taken, or callers waiting).

One reaction per change: a window holds only calls that started after the
latest change of the limit (a probe is a change), and after a cut only those
that started at least one round trip (the smoothed latency) after it: the
calls that start just after a cut still wait behind the queue the old limit
built, which drains over a round trip. A raise is judged at once, so slow
start takes one round trip and a half per step, not two and a half. That
reads a large raise a little low: its first calls wait only for the calls in
service to turn over, not behind the whole queue it builds (a step to 1.6x a
service's capacity read 12-13 ms where its full queue makes 16), so slow
start may take one step too many (in 3 of 14 traced runs). Judging its steps
a round trip late did not help overall (see the README). A drop counts only
if its call started after the latest change: a burst of drops from one round
of calls cuts once (TCP's fast recovery, in spirit).

Until the first sign of congestion the limit grows by half per window (slow
start), so a run reaches a service's capacity in a few round trips, not a few
hundred. One window above ``TOLERANCE`` times the lowest latency holds it
there; a smoothed latency above ``SLOW_START_TOLERANCE`` times it ends slow
start, and the limit goes back to where it was before the latest step (the
last limit that showed no queueing: TCP's ssthresh, in spirit), so an
overshoot of capacity lasts one window. It starts low (4) because the lowest
latency can only be measured below the service's capacity.

What it cannot tell apart: a queue in the service and a queue in this
process's own event loop (a client short of CPU). Both make latency grow
with the limit, and the limit rests where more calls stop paying in either
case: right for throughput, but the limit then says more about the client
than about the service.

Everything here is arithmetic on its arguments: time is passed in, so the
controller is tested on made-up clocks, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeAlias

from ._numbers import is_integral

__all__ = [
    "CHECKED_CUT",
    "CHECK_SHARE",
    "CUT_SMOOTHING",
    "DROP_BACKOFF",
    "GRADIENT_TARGET",
    "MIN_GRADIENT",
    "OVERLOAD",
    "PROBE_EVERY",
    "PROBE_EVERY_MAX",
    "PROBE_SCALE",
    "TOLERANCE",
    "Adaptive",
    "Controller",
    "Outcome",
]

#: What became of one call, as the controller sees it: ``"success"`` (a
#: latency sample), ``"drop"`` (overload: timeout, 429/503, RetryAfter) or
#: ``"ignore"`` (no signal: cancelled, or failed for another reason).
Outcome: TypeAlias = Literal["success", "drop", "ignore"]

#: The highest limit Adaptive takes: beyond it, its float arithmetic would
#: lose whole calls (and 10**400 would not even convert).
MAX_LIMIT = 10**9
#: A window this many times faster than the lowest latency means the lowest
#: was measured in a stall: it is replaced at once. Slow start holds on a
#: window this many times slower than the lowest (Envoy's 25% buffer).
TOLERANCE = 1.25
#: Slow start ends when the smoothed latency is above this multiple of the
#: lowest: the fast-growing phase is the one that can overshoot, so it stops
#: at the first lasting hint.
SLOW_START_TOLERANCE = 1.2
#: Slow start multiplies the limit by this per window: 1.5, not TCP's 2, so an
#: overshoot puts at most half the capacity in the service's queue.
SLOW_START_GROWTH = 1.5
#: A probe lowers the limit to this share of itself for one window.
PROBE_SCALE = 0.8
#: A probe follows this many windows at the limit after a change: about every
#: six round trips. It holds back at most a fifth of the calls in flight for
#: one window in four; at a sharp knee, where the limit rests above the
#: capacity, much less...
PROBE_EVERY = 3
#: ...and each probe that finds the limit within ``PROBE_STEADY`` of where the
#: previous one did doubles the spacing, up to this many windows: a steady
#: service is probed every 25 round trips or so, for 1-2% of its throughput
#: instead of up to 5%. A drop, or the limit moving further, brings the
#: spacing back to ``PROBE_EVERY``.
PROBE_EVERY_MAX = 12
#: How far (a share of itself) the limit may move between probes and still
#: count as steady.
PROBE_STEADY = 0.2
#: The limit rests where latency is this multiple of the reference (the
#: latency at ``PROBE_SCALE`` of the limit): where latency grows 0.82 times
#: as fast as the limit (log 1.2 / log 1.25). Below ``1 / PROBE_SCALE``, so
#: a limit whose latency grows in proportion (a queue) always falls.
GRADIENT_TARGET = 1.2
#: Latency more than this multiple of the lowest seen is overload: no probe
#: runs, and the lowest latency is the reference.
OVERLOAD = 2.0
#: A cut in overload to this share of the limit or lower is checked...
CHECKED_CUT = 0.8
#: ...and undone if latency fell less than this share of what queueing
#: predicts (latency falling in proportion to the limit).
CHECK_SHARE = 0.25
#: The smoothed latency is this weight on the latest window plus the rest on
#: the previous value (and so is the reference, over probes): one noisy
#: window moves it only halfway.
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


def _interquartile_mean(samples: list[float]) -> float:
    """The mean of the middle half of ``samples`` (sorted in place)."""
    samples.sort()
    n = len(samples)
    middle = samples[n // 4 : n - n // 4]
    return sum(middle) / len(middle)


class _DefaultInitial(int):
    """The type of ``Adaptive.initial``'s default, told apart from an explicit 4 by identity."""


_DEFAULT_INITIAL = _DefaultInitial(4)


@dataclass(frozen=True, slots=True)
class Adaptive:
    """A concurrency limit that adapts to the service, within ``[min, max]``.

    ``limit="auto"`` means ``Adaptive()``. Use this class to bound or seed it::

        api = corral.Limiter(limit=corral.Adaptive(initial=4, max=64))
        await corral.gather(fetch, urls, limit=corral.Adaptive(max=200))

    The limit starts at ``initial`` and grows by half per round trip while latency
    stays near the lowest seen; then it tracks the point where more calls stop
    adding throughput (latency grows almost as fast as the limit: the
    service's capacity), and cuts on timeouts, 429/503 and
    :class:`corral.RetryAfter`. It is never below ``min`` nor above ``max``.
    A map's own adaptive limit runs as many workers as the limit in force,
    so a large ``max`` costs nothing until the limit gets there. A shared
    :class:`corral.Limiter` with an adaptive limit is different: each map
    drawing on it keeps ``max`` calls ready to start (one item each), in line
    for the Limiter's slots.

    What it is not: not a rate limit (add ``rate=`` for a documented quota),
    and no help for a call that does not wait on a shared resource (CPU work,
    ``asyncio.sleep``): there latency never grows, so the limit runs up to
    ``max``.

    Args:
        initial: the limit before anything is known, an int in [min, max];
            by default 4, or ``min`` or ``max`` when 4 is outside them.
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

    initial: int = _DEFAULT_INITIAL
    min: int = 1
    max: int = 1000

    def __post_init__(self) -> None:
        default = self.initial is _DEFAULT_INITIAL
        for name in ("initial", "min", "max"):
            value = getattr(self, name)
            message = (
                f"Adaptive {name} must be an int >= 1, like "
                f"corral.Adaptive(initial=4, min=1, max=1000); got {name}={value!r}"
            )
            if not is_integral(value):
                raise TypeError(message)
            if value < 1:
                raise ValueError(message)
            if value > MAX_LIMIT:
                raise ValueError(f"{message} (at most {MAX_LIMIT:_})")
            object.__setattr__(self, name, int(value))
        if default:
            # Not given: 4 where the bounds allow it, else the bound it is past,
            # so Adaptive(max=2) and Adaptive(min=10) mean what they say.
            object.__setattr__(self, "initial", max(self.min, min(self.max, self.initial)))
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
        "_check",
        "_grown_from",
        "_last",
        "_max",
        "_min",
        "_need",
        "_probe_every",
        "_probe_from",
        "_probed_at",
        "_samples",
        "_window_start",
        "_windows",
        "baseline",
        "in_force",
        "limit",
        "probed",
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
        #: The window latencies, smoothed (seconds), or None before the first window.
        self.smoothed: float | None = None
        #: True until the first sign of congestion: the limit grows by half per window.
        self.slow_start = True
        self._window_start = -math.inf
        self._changed_at = -math.inf
        self._samples: list[float] = []
        self._need = max(MIN_SAMPLES, math.ceil(self.limit / 2))  # samples to close a window
        self._busy = False
        self._last: float | None = None  # the latency of the latest window not a probe
        self._probe_from: float | None = None  # the limit to go back to after a probe
        self._windows = PROBE_EVERY  # windows since the latest probe
        self._probe_every = PROBE_EVERY  # windows between probes, now
        self._probed_at: float | None = None  # the limit the latest probe returned to
        self._check: tuple[float, float] | None = None  # (latency, limit) before a deep cut
        self._grown_from: float | None = None  # the limit before slow start's latest step
        #: The latency a little below the limit, smoothed over probes, or None.
        self.probed: float | None = None

    def __repr__(self) -> str:
        return (
            f"<Controller limit={self.limit:.2f} baseline={self.baseline!r} "
            f"slow_start={self.slow_start}>"
        )

    @property
    def probing(self) -> bool:
        """True while the limit is lowered for one window to measure the latency below it."""
        return self._probe_from is not None

    # -- outcomes ------------------------------------------------------------

    def success(self, now: float, latency: float, busy: bool) -> None:
        """A call succeeded after ``latency`` seconds.

        ``busy``: the limit was binding when it ended (every slot taken, or
        callers waiting). A window in which it never was cannot grow the limit.
        """
        if now - latency < self._window_start:
            if now >= self._changed_at:
                return  # started before the latest change: it says nothing about it
            self.restart_clock()  # a time before the latest change: another clock
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
            if now >= self._changed_at:
                return
            self.restart_clock()  # a time before the latest change: another clock
        self.slow_start = False
        limit = self.limit if self._probe_from is None else self._probe_from
        self._probe_from = None
        self._probe_every = PROBE_EVERY
        self._set(limit * DROP_BACKOFF, now)

    # -- internals -------------------------------------------------------------

    def _close_window(self, now: float) -> None:
        typical = _interquartile_mean(self._samples)
        if typical < LATENCY_FLOOR:
            typical = LATENCY_FLOOR
        smoothed = self.smoothed
        lowest = self.baseline
        if smoothed is None or lowest is None or typical * TOLERANCE < lowest:
            smoothed = lowest = self.smoothed = self.baseline = typical
        else:
            smoothed = self.smoothed = smoothed + SMOOTHING * (typical - smoothed)
            if smoothed < lowest:
                lowest = self.baseline = smoothed
        probe_from = self._probe_from
        if probe_from is not None:
            # The probe's window: latency a little below the limit. A probe
            # slower than the window before it met a stall, not less queueing.
            self._probe_from = None
            last = self._last
            sample = typical if last is None else min(typical, last)
            probed = self.probed
            self.probed = sample if probed is None else probed + SMOOTHING * (sample - probed)
            self._set(probe_from, now)
            return
        previous = self._last
        self._last = typical
        limit = self.limit
        check = self._check
        self._check = None
        if check is not None:
            # The first window after a deep cut in overload. Queueing predicts
            # latency falls with the limit; if less than CHECK_SHARE of that
            # fall came, the latency was not this client's queue (the
            # service, or this machine, is slower now): undo the cut, and
            # take this latency as the lowest and the reference.
            # Latency still rising is a queue still building (a capacity drop
            # in progress), not a verdict: the cut stands, and more may follow.
            before, cut_from = check
            expected = max(lowest, before * limit / cut_from)
            if before - CHECK_SHARE * (before - expected) < typical <= before:
                self.baseline = self.probed = typical
                self._set(cut_from, now)
                return
        far = typical / lowest
        if self.slow_start:
            grown_from = self._grown_from
            self._grown_from = None
            if smoothed <= SLOW_START_TOLERANCE * lowest:
                if far <= TOLERANCE and self._busy:
                    self._grown_from = limit
                    limit *= SLOW_START_GROWTH
                # (else one slow window: hold, and let the next one say)
                self._set(limit, now)
                return
            # Queueing: the latest step overshot. Back to the limit before it,
            # the last that showed none, and probe from there.
            self.slow_start = False
            previous = None  # the back-off is this window's answer: no cut on top
            if grown_from is not None:
                limit = grown_from
        probed = self.probed
        reference = probed if probed is not None and far <= OVERLOAD else lowest
        ratio = typical / reference
        if ratio <= GRADIENT_TARGET:
            new = limit
            # Judged on two windows, as a cut is: by the slower of this one
            # and the one before (see "Nor does one fast window grow it").
            if previous is not None and previous > typical:
                ratio = previous / reference
            if self._busy and ratio < GRADIENT_TARGET:
                # A full square root of headroom at no queueing at all, less
                # and less nearer the target.
                room = min(1.0, (GRADIENT_TARGET - ratio) / (GRADIENT_TARGET - 1))
                new += math.sqrt(limit) * room
        elif previous is None or previous <= GRADIENT_TARGET * reference:
            new = limit  # one slow window: a stall, or a change; the next one says which
        elif self.in_force <= self._min:
            self.baseline = self.smoothed = typical
            self.probed = None
            self.slow_start = True
            new = limit
        else:
            gradient = GRADIENT_TARGET * reference / min(typical, previous)
            if gradient <= MIN_GRADIENT:
                new = limit * MIN_GRADIENT
            else:
                new = limit + CUT_SMOOTHING * (limit * gradient - limit)
            if far > OVERLOAD and new <= CHECKED_CUT * limit:
                self._check = (typical, limit)
        self._windows += 1
        probed_at = self._probed_at
        if far > OVERLOAD or (
            probed_at is not None and abs(new - probed_at) > PROBE_STEADY * probed_at
        ):
            self._probe_every = PROBE_EVERY  # no longer where the latest probe found it
        if self._windows >= self._probe_every and far <= OVERLOAD and new < self._max:
            self._windows = 0
            back_to = max(self._min, min(self._max, new))
            if probed_at is not None and abs(back_to - probed_at) <= PROBE_STEADY * probed_at:
                self._probe_every = min(PROBE_EVERY_MAX, 2 * self._probe_every)
            self._probed_at = self._probe_from = back_to
            new = new * PROBE_SCALE
        self._set(new, now)

    def restart_clock(self) -> None:
        """Times from now on are read from another clock (a new event loop's).

        Called by :meth:`success` and :meth:`drop` when ``now`` is before the
        latest change, which one clock never reads (a Limiter serves
        successive event loops, and a loop's ``time()`` may start anywhere,
        at 0 for a virtual clock): judged by the old clock's times, no call
        would ever start after the latest change, and the limit would stay
        frozen. The limit and the latencies (durations, not times) are kept;
        the window in progress starts again.
        """
        self._window_start = self._changed_at = -math.inf
        self._samples = []
        self._busy = False

    def _set(self, new: float, now: float) -> None:
        """Move the limit (within bounds) and open a new window at ``now``."""
        if new < self._min:
            new = self._min
        elif new > self._max:
            new = self._max
        raised = new > self.limit
        self.limit = new
        self.in_force = int(new)
        self._need = max(MIN_SAMPLES, math.ceil(new / 2))
        self._changed_at = now
        # A raise is judged at once (see "One reaction per change"). The
        # calls that start in the first round trip after a cut still wait
        # behind the old queue: judge a cut on calls started one smoothed
        # latency later.
        self._window_start = now if raised else now + (self.smoothed or 0.0)
        self._samples = []
        self._busy = False
