"""Retry budgets: retries may not outgrow the calls that succeed.

Per-call retries multiply load exactly when a service is least able to take
it: with ``retries=3`` and a server failing half its calls, every item costs
up to four calls, and a struggling server gets twice the traffic. A retry
budget (gRPC's retry throttling, Finagle's ``RetryBudget``) caps retries at a
share of the *successful* calls over a sliding window, plus a small floor so
that a run with few calls can still retry a blip::

    retries in the last `window` seconds <= floor + ratio * successes in it

The default, ``RetryBudget(ratio=0.1, floor=10, window=10.0)``, lets retries
add at most about 10% to the calls a healthy run makes. Against a server
failing 50% of calls, attempts stay at most ``items * (1 + ratio * 0.5)``
plus ``floor`` per window, instead of ``items * attempts``.

A retry the server asked for, a 429 or 503 with ``Retry-After`` (or
``retry-after-ms``) or a :class:`corral.RetryAfter`, is not charged: the server
named when to come back, and the limiter's cooldown already holds every call
until then, so it cannot turn into a retry storm, and refusing it would fail
items the server invited back (a rate-limited run starts with a burst of
them). Throttles without a named wait and retries after other errors draw on
two separate allowances of the size above: throttles are expected under a
rate limit, and must not starve retries of real errors, nor the reverse.

A retry refused by the budget fails its item with
:class:`corral.RetryBudgetExhausted` (its cause: the last failure).

The window is counted in ``SLOTS`` slots of ``window / SLOTS`` seconds: O(1)
state, O(1) amortised work per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._numbers import is_finite, is_real

__all__ = ["SLOTS", "RetryBudget", "RetryBudgetExhausted", "RetryBudgetState", "as_budget"]

#: The sliding window is kept as this many slots.
SLOTS = 10


class RetryBudgetExhausted(Exception):
    """A retry was refused: retries already reached the retry budget's share of successes.

    The item fails with this exception (counted in ``stats.failed``); its
    ``__cause__`` and :attr:`error` are the failure that would have been
    retried. See :class:`corral.RetryBudget`.
    """

    def __init__(self, message: str, error: BaseException | None = None) -> None:
        super().__init__(message, error)
        self.error = error
        if error is not None:
            # Also when rebuilt from a pickle (from a worker process or a Ray
            # actor), which keeps the arguments but not ``raise ... from``.
            self.__cause__ = error

    def __str__(self) -> str:
        return str(self.args[0])


def _number(name: str, value: object, minimum: float, strict: bool) -> float:
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    message = f"RetryBudget({name}={value!r}): {name} must be a finite number {bound}"
    if not is_real(value):
        raise TypeError(message)
    if not is_finite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(message)
    return float(value)


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """How many retries a run may make: ``floor + ratio * successes`` per sliding ``window``.

    Give it to :class:`corral.Retry` (``Retry(budget=RetryBudget(ratio=0.2))``,
    or ``Retry(budget=0.2)`` for the ratio alone); ``Retry(budget=None)``
    turns the budget off. The budget's state is shared by every map retrying
    through one :class:`corral.Limiter` (``limit=the_limiter``); a map without
    a shared Limiter (``limit=100``, ``"auto"``) has a budget of its own.

    Args:
        ratio: retries allowed per successful call in the window (>= 0).
            0.1: retries add at most about 10% to the calls.
        floor: retries allowed per window whatever the successes (>= 0), so
            that a small or young run can still retry.
        window: the sliding window in seconds (> 0).

    Raises:
        TypeError, ValueError: a field of the wrong type or out of range.
    """

    ratio: float = 0.1
    floor: float = 10.0
    window: float = 10.0

    def __post_init__(self) -> None:
        # Stored as floats: a Fraction or numpy number is taken, then kept plain.
        object.__setattr__(self, "ratio", _number("ratio", self.ratio, 0.0, strict=False))
        object.__setattr__(self, "floor", _number("floor", self.floor, 0.0, strict=False))
        object.__setattr__(self, "window", _number("window", self.window, 0.0, strict=True))
        if not self.window / SLOTS > 0:  # the slots' width, by which times are divided
            raise ValueError(
                f"RetryBudget(window={self.window!r}): window must be at least "
                f"{SLOTS * 5e-324:g} s (a slot each {SLOTS}th of it)"
            )


def as_budget(budget: object) -> RetryBudget | None:
    """Normalise ``Retry(budget=)``: a RetryBudget, a ratio (a number), or None (off)."""
    if budget is None or isinstance(budget, RetryBudget):
        return budget
    if is_real(budget):
        return RetryBudget(ratio=budget)
    raise TypeError(
        "Retry budget must be a corral.RetryBudget, a ratio like 0.1 (retries per "
        f"successful call) or None (no budget); got budget={budget!r}"
    )


#: The kinds of retry the budget counts apart.
THROTTLE, ERROR = 0, 1


class RetryBudgetState:
    """The running budget: successes and retries per slot of the sliding window.

    Pure bookkeeping on times passed in (the loop's clock), so it is tested
    without an event loop.
    """

    __slots__ = ("_budget", "_slot", "_slot_end", "_span", "_success", "_sums", "_tries")

    def __init__(self, budget: RetryBudget) -> None:
        self._budget = budget
        self._span = budget.window / SLOTS
        self._slot = 0
        self._slot_end = -math.inf  # set by the first event
        self._success = [0] * SLOTS
        # Retries per slot, for each kind.
        self._tries = ([0] * SLOTS, [0] * SLOTS)
        # Running sums over the window: successes, throttle retries, error retries.
        self._sums = [0, 0, 0]

    @property
    def budget(self) -> RetryBudget:
        """The parameters."""
        return self._budget

    def _advance(self, now: float) -> None:
        if now < self._slot_end:
            if now < self._slot_end - self._span:
                # Before the current slot began, which one clock never reads:
                # another event loop's clock (a Limiter serves successive
                # loops, whose time() may start anywhere, at 0 for a virtual
                # clock). Judged by the old clock's times the counts would
                # last until the new one caught up; they age from now on.
                self._slot_end = now + self._span
            return
        if self._slot_end == -math.inf:
            self._slot_end = now + self._span
            return
        # Clear every slot that fell out of the window (all of them after a long pause).
        # Compared as a float first: over a subnormal slot width the count of
        # slots in a gap is infinite, which int() refuses.
        gap = (now - self._slot_end) // self._span
        steps = SLOTS if gap >= SLOTS else int(gap) + 1
        success, (throttle, error), sums = self._success, self._tries, self._sums
        slot = self._slot
        for _ in range(steps):
            slot = (slot + 1) % SLOTS
            sums[0] -= success[slot]
            sums[1] -= throttle[slot]
            sums[2] -= error[slot]
            success[slot] = throttle[slot] = error[slot] = 0
        self._slot = slot
        self._slot_end += steps * self._span
        if self._slot_end <= now:  # a pause longer than the window
            self._slot_end = now + self._span

    def success(self, now: float) -> None:
        """Count one successful call at ``now``."""
        if now >= self._slot_end:
            self._advance(now)
        self._success[self._slot] += 1
        self._sums[0] += 1

    def allowance(self, kind: int, now: float) -> float:
        """Retries of ``kind`` still allowed at ``now`` (may be fractional)."""
        self._advance(now)
        b = self._budget
        return b.floor + b.ratio * self._sums[0] - self._sums[1 + kind]

    def try_retry(self, kind: int, now: float) -> bool:
        """Spend one retry of ``kind`` (THROTTLE or ERROR) if the budget allows it."""
        if self.allowance(kind, now) < 1:
            return False
        self._tries[kind][self._slot] += 1
        self._sums[1 + kind] += 1
        return True

    def counts(self, now: float) -> tuple[int, int, int]:
        """(successes, throttle retries, error retries) in the window ending ``now``."""
        self._advance(now)
        s = self._sums
        return s[0], s[1], s[2]
