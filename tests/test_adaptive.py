"""The adaptive controller: pure arithmetic on made-up clocks, asserted exactly.

Part one feeds ``Controller`` hand-written samples. Part two runs it against a
small discrete-event model of a service (a capacity, a FIFO queue with a
bound, refusals beyond it) on a virtual clock: no event loop, no sleeping,
the same numbers on every run.
"""

from __future__ import annotations

import heapq
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import corral
from corral._adaptive import (
    CHECK_SHARE,
    CUT_SMOOTHING,
    DROP_BACKOFF,
    GRADIENT_TARGET,
    LATENCY_FLOOR,
    MIN_GRADIENT,
    MIN_SAMPLES,
    OVERLOAD,
    PROBE_EVERY,
    PROBE_EVERY_MAX,
    PROBE_SCALE,
    SLOW_START_GROWTH,
    TOLERANCE,
    Adaptive,
    Controller,
)


def exactly(message: str) -> str:
    """A ``match=`` pattern for this whole message and nothing else."""
    return f"^{re.escape(message)}$"


def window(
    controller: Controller, start: float, latency: float, *, busy: bool = True, count: int = 0
) -> float:
    """Feed one full window of equal samples, started once the window is open; return the end."""
    # The window opens at the latest change (a round trip after a cut); start just after.
    now = max(start, controller._window_start) + 1e-6 + latency
    for _ in range(count or controller._need):
        controller.success(now, latency, busy)
    return now


def settled(limit: int, latency: float) -> tuple[Controller, float]:
    """A controller past slow start at ``limit``, just back from a probe that read ``latency``."""
    controller = Controller(Adaptive(initial=limit, max=1000))
    now = window(controller, 0.0, latency, busy=False)  # the lowest latency: `latency`
    controller.slow_start = False  # as if slow start had ended here
    now = window(controller, now, latency, busy=False)  # the first steady window: a probe next
    assert controller.probing
    assert controller.limit == pytest.approx(limit * PROBE_SCALE)
    now = window(controller, now, latency)  # the probe's window
    assert not controller.probing
    assert controller.limit == limit
    assert controller.probed == pytest.approx(latency)
    return controller, now


# -- Adaptive --------------------------------------------------------------------


def test_adaptive_defaults_and_public_name() -> None:
    """limit='auto' means Adaptive(initial=4, min=1, max=1000), exported as corral.Adaptive."""
    assert corral.Adaptive is Adaptive
    assert Adaptive() == Adaptive(initial=4, min=1, max=1000)
    assert repr(Adaptive(initial=4, max=64)) == "Adaptive(initial=4, min=1, max=64)"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"initial": 0},
            ValueError,
            "Adaptive initial must be an int >= 1, like "
            "corral.Adaptive(initial=4, min=1, max=1000); got initial=0",
        ),
        (
            {"min": True},
            TypeError,
            "Adaptive min must be an int >= 1, like "
            "corral.Adaptive(initial=4, min=1, max=1000); got min=True",
        ),
        (
            {"max": 2.5},
            TypeError,
            "Adaptive max must be an int >= 1, like "
            "corral.Adaptive(initial=4, min=1, max=1000); got max=2.5",
        ),
        (
            {"initial": 20, "max": 10},
            ValueError,
            "Adaptive needs min <= initial <= max; got min=1, initial=20, max=10",
        ),
        (
            {"initial": 2, "min": 4},
            ValueError,
            "Adaptive needs min <= initial <= max; got min=4, initial=2, max=1000",
        ),
    ],
)
def test_adaptive_rejects_bad_bounds_naming_them(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    """Each field is an int >= 1 and min <= initial <= max; the message names the value."""
    with pytest.raises(error, match=exactly(message)):
        Adaptive(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "initial"),
    [({"max": 2}, 2), ({"min": 10}, 10), ({"min": 2, "max": 3}, 3), ({"max": 64}, 4)],
)
def test_an_initial_not_given_is_4_or_the_bound_it_is_past(
    kwargs: dict[str, int], initial: int
) -> None:
    """Adaptive(max=2) means "at most 2", not an error about a default nobody wrote."""
    adaptive = Adaptive(**kwargs)
    assert adaptive.initial == initial
    assert type(adaptive.initial) is int
    assert adaptive == Adaptive(initial=initial, **kwargs)


def test_an_initial_given_out_of_bounds_is_still_refused() -> None:
    with pytest.raises(ValueError, match="initial=4, max=2"):
        Adaptive(initial=4, max=2)


# -- Controller: hand-fed samples ------------------------------------------------------


def test_controller_starts_at_initial_in_slow_start() -> None:
    """Before any sample the limit is `initial`; the limit in force is its floor."""
    controller = Controller(Adaptive(initial=5, max=50))
    assert (controller.limit, controller.in_force) == (5.0, 5)
    assert controller.slow_start
    assert controller.baseline is None


def test_slow_start_grows_by_half_per_window_while_latency_stays_flat() -> None:
    """A busy window at the baseline latency multiplies the limit by 1.5, up to max."""
    assert SLOW_START_GROWTH == 1.5
    controller = Controller(Adaptive(initial=8, max=40))
    now = 0.0
    limits = []
    for _ in range(6):
        now = window(controller, now, 0.010)
        limits.append(controller.in_force)
    assert limits == [12, 18, 27, 40, 40, 40]
    assert controller.slow_start
    assert controller.baseline == pytest.approx(0.010)


def test_an_unused_limit_does_not_grow() -> None:
    """Windows in which the limit was never binding leave it where it is."""
    controller = Controller(Adaptive(initial=8))
    now = 0.0
    for _ in range(10):
        now = window(controller, now, 0.010, busy=False)
    assert controller.limit == 8.0


def test_a_window_counts_only_calls_started_after_the_latest_change() -> None:
    """Samples of calls that started before a change say nothing about it and are skipped."""
    controller = Controller(Adaptive(initial=4))
    end = window(controller, 0.0, 0.010)  # closes the first window at t=0.010
    assert controller.in_force == 6
    # Calls started at t=0.005 (before the change at 0.010) end later: ignored.
    for _ in range(100):
        controller.success(end + 0.050, 0.055, True)
    assert controller.in_force == 6
    assert controller._samples == []
    # A raise: calls started just after it join its whole queue, so they count.
    for _ in range(MIN_SAMPLES - 1):
        controller.success(end + 0.011, 0.010, True)
    assert len(controller._samples) == MIN_SAMPLES - 1


def test_after_a_cut_a_window_waits_a_round_trip() -> None:
    """Calls started within a round trip of a cut met the queue the old limit built: skipped."""
    controller = Controller(Adaptive(initial=64))
    now = window(controller, 0.0, 0.010)  # the lowest latency: 10 ms; the limit 96
    controller.drop(now + 0.001, 0.0005)  # a cut at now + 1 ms
    cut_at = now + 0.001
    assert controller.in_force == int(96 * DROP_BACKOFF)
    # Started 5 ms after the cut, within the smoothed latency (10 ms): ignored.
    for _ in range(100):
        controller.success(cut_at + 0.015, 0.010, True)
    assert controller._samples == []
    assert controller.in_force == int(96 * DROP_BACKOFF)
    # Started a round trip after it: counted.
    controller.success(cut_at + 0.0211, 0.010, True)
    assert controller._samples == [0.010]


def test_slow_start_backs_off_to_the_last_limit_that_showed_no_queueing() -> None:
    """Latency 1.8x the lowest after a step: slow start is over, the limit goes back before it."""
    controller = Controller(Adaptive(initial=64, max=1000))
    now = window(controller, 0.0, 0.010)  # lowest 10 ms, limit 96
    assert controller.in_force == 96
    window(controller, now, 0.018)
    assert not controller.slow_start
    # Back to 64, and (the first steady window) a probe at once, below it.
    assert controller.probing
    assert controller.limit == pytest.approx(64 * PROBE_SCALE)


def test_one_slow_window_holds_the_limit_and_a_second_cuts_it() -> None:
    """A stall slows one window: nothing moves; two in a row cut by the gradient."""
    controller, now = settled(64, 0.010)
    now = window(controller, now, 0.020)
    assert controller.limit == 64
    window(controller, now, 0.020)
    assert controller.limit == pytest.approx(64 + CUT_SMOOTHING * (64 * GRADIENT_TARGET / 2 - 64))


def test_one_fast_window_among_slow_ones_grows_nothing() -> None:
    """Noise that alternates slow and fast windows moves the limit neither way.

    A slow window alone never cuts (a stall), so a fast one alone must not
    grow either: growth takes the slower of the window and the one before,
    as a cut does. Otherwise every fast window between two slow ones adds
    headroom no cut takes back, and noise alone pushes the limit up.
    """
    controller, now = settled(64, 0.010)
    slow = 0.010 * (GRADIENT_TARGET + 0.05)
    probes = 0
    for turn in range(12):
        now = window(controller, now, slow if turn % 2 == 0 else 0.010)
        if controller.probing:
            probes += 1
            now = window(controller, now, 0.010)  # the probe reads the reference again
        assert controller.limit == 64
    assert probes >= 2


def test_one_window_never_cuts_more_than_half() -> None:
    """However high the latency, one window at most halves the limit."""
    controller, now = settled(100, 0.010)
    now = window(controller, now, 1.0)
    window(controller, now, 1.0)
    assert controller.limit == pytest.approx(100 * MIN_GRADIENT)


def test_growth_is_a_square_root_per_window_tapering_to_zero_at_the_target() -> None:
    """At the probed latency the limit grows by sqrt(limit); less nearer the target; none at it."""
    controller, now = settled(64, 0.010)
    now = window(controller, now, 0.010)
    assert controller.limit == pytest.approx(64 + 8)
    ratio = 1 + (GRADIENT_TARGET - 1) / 2  # half way to the target: half the step
    now = window(controller, now, 0.010 * ratio)
    assert controller.limit == pytest.approx(72 + math.sqrt(72) / 2)
    limit = controller.limit
    # At the target: no growth. That was the PROBE_EVERY-th window: a probe follows.
    assert PROBE_EVERY == 3
    window(controller, now, 0.010 * GRADIENT_TARGET)
    assert controller.probing
    assert controller.limit == pytest.approx(limit * PROBE_SCALE)


def test_probes_grow_rarer_while_the_limit_holds_still() -> None:
    """Each probe that finds the limit where the last one did doubles the spacing, to a cap.

    A drop, or the limit moving more than PROBE_STEADY from where it was
    probed, brings the spacing back to PROBE_EVERY.
    """
    controller, now = settled(64, 0.010)  # probed once, at 64
    at_target = 0.010 * GRADIENT_TARGET  # the limit holds: no growth, no cut

    def windows_to_next_probe(latency: float) -> int:
        nonlocal now
        count = 0
        while not controller.probing:
            now = window(controller, now, latency)
            count += 1
        now = window(controller, now, 0.010)  # the probe's own window
        return count

    assert PROBE_EVERY_MAX == 4 * PROBE_EVERY
    gaps = [windows_to_next_probe(at_target) for _ in range(4)]
    assert gaps == [PROBE_EVERY, 2 * PROBE_EVERY, PROBE_EVERY_MAX, PROBE_EVERY_MAX]
    assert controller.limit == pytest.approx(64)
    controller.drop(now + 1e-3, 1e-4)  # straight after a probe: no window counted yet
    now += 1e-3
    assert controller.limit == pytest.approx(64 * DROP_BACKOFF)
    assert windows_to_next_probe(at_target) == PROBE_EVERY
    assert windows_to_next_probe(at_target) == 2 * PROBE_EVERY
    # Latency at the reference: the limit grows by its square root a window;
    # once it is more than PROBE_STEADY above where it was probed, a probe
    # comes after PROBE_EVERY windows again, not 4 * PROBE_EVERY.
    assert windows_to_next_probe(0.010) == PROBE_EVERY


def test_a_probe_measures_the_latency_below_the_limit_the_limit_is_judged_by() -> None:
    """Every PROBE_EVERY windows the limit dips to PROBE_SCALE of itself for one window.

    The latency there, smoothed over probes, is what the latency at the limit
    is compared with: a limit whose latency is within GRADIENT_TARGET of it
    still grows, wherever the lowest latency ever seen was.
    """
    controller, now = settled(64, 0.010)
    for _ in range(PROBE_EVERY - 1):
        now = window(controller, now, 0.011, busy=False)
    assert not controller.probing
    now = window(controller, now, 0.011, busy=False)
    assert controller.probing
    assert controller.in_force == int(64 * PROBE_SCALE)
    window(controller, now, 0.014)
    # A probe slower than the window before it met a stall: it reads as that window.
    assert controller.probed == pytest.approx((0.010 + 0.011) / 2)
    assert controller.limit == 64


def test_latency_that_grows_slower_than_the_limit_is_paid_for() -> None:
    """Latency that grows as sqrt(limit) (a client short of CPU): more calls still add throughput.

    A limit judged against the lowest latency stops where latency is
    TOLERANCE (1.25) times it, 62 here; judged against the latency a fifth
    below the limit, it goes on to where latency is OVERLOAD times the lowest
    (160), and saws below: on average more than twice as far.
    """
    controller = Controller(Adaptive(initial=4, max=1000))
    now = 0.0
    limits = []
    for _ in range(400):
        latency = 0.010 * max(1.0, controller.in_force / 40) ** 0.5
        now = window(controller, now, latency)
        limits.append(controller.limit)
    late = limits[200:]
    assert sum(late) / len(late) >= 2 * 40 * TOLERANCE**2
    assert max(late) <= 40 * OVERLOAD**2 * 1.2


def test_latency_that_grows_with_the_limit_stops_it_at_the_knee() -> None:
    """Latency proportional to the limit past 40 (a queue): the limit rests just past 40."""
    controller = Controller(Adaptive(initial=4, max=1000))
    now = 0.0
    limits = []
    for _ in range(400):
        latency = 0.010 * max(1.0, controller.in_force / 40)
        now = window(controller, now, latency)
        limits.append(controller.limit)
    late = limits[200:]
    assert min(late) >= 40 * PROBE_SCALE
    assert max(late) <= 40 * GRADIENT_TARGET * 1.1


def test_a_deep_cut_that_does_not_lower_latency_is_undone() -> None:
    """The service became 3x slower: the cut does not help, so it is undone; that is the new low."""
    controller, now = settled(64, 0.010)
    now = window(controller, now, 0.030)
    assert controller.limit == 64
    now = window(controller, now, 0.030)
    assert controller.limit == pytest.approx(32)  # latency 3x: halved
    # Queueing would bring latency down to 15 ms at 32; it falls less than
    # CHECK_SHARE of the way there.
    window(controller, now, 0.030 - 0.9 * CHECK_SHARE * 0.015)
    assert controller.limit == 64
    assert controller.baseline == pytest.approx(0.030 - 0.9 * CHECK_SHARE * 0.015)
    assert controller.probed == controller.baseline


def test_a_deep_cut_that_lowers_latency_stands() -> None:
    """Latency 3x, and halving the limit halves it: that was queueing, and the cut stands."""
    controller, now = settled(64, 0.010)
    now = window(controller, now, 0.030)
    now = window(controller, now, 0.030)
    assert controller.limit == pytest.approx(32)
    window(controller, now, 0.030 - 1.1 * CHECK_SHARE * 0.015)
    assert controller.limit < 32
    assert controller.baseline == pytest.approx(0.010)


def test_a_deep_cut_followed_by_still_rising_latency_stands() -> None:
    """A capacity drop in progress: latency rises on after a cut; that is no verdict, cut on.

    Undoing the cut there (and taking the queued latency as the lowest) would
    leave the limit above the new capacity for good.
    """
    controller, now = settled(64, 0.010)
    now = window(controller, now, 0.030)
    now = window(controller, now, 0.030)
    assert controller.limit == pytest.approx(32)
    window(controller, now, 0.060)
    assert controller.limit == pytest.approx(16)
    assert controller.baseline == pytest.approx(0.010)


def test_slow_start_ends_when_latency_stays_above_its_tolerance() -> None:
    """One slow window holds slow start; a smoothed latency above SLOW_START_TOLERANCE ends it."""
    controller = Controller(Adaptive(initial=16, max=1000))
    now = window(controller, 0.0, 0.010)  # 24
    now = window(controller, now, 0.013)  # one window 1.3x: smoothed 1.15x, hold
    assert controller.slow_start
    assert controller.in_force == 24
    now = window(controller, now, 0.010)  # back to normal: grow again
    assert controller.in_force == 36
    # Windows at 1.24x (within TOLERANCE): the smoothed latency climbs until
    # it is above 1.2x, then slow start ends, back to the limit before the step.
    limits = []
    while controller.slow_start:
        now = window(controller, now, 0.0124)
        limits.append(controller.limit)
    assert limits[:-1] == [54, 81]
    assert controller.limit == pytest.approx(54 * PROBE_SCALE)  # a probe, below 54
    assert controller.probing


def test_a_drop_cuts_the_limit_and_ends_slow_start() -> None:
    """A timeout or a 429 multiplies the limit by DROP_BACKOFF at once."""
    controller = Controller(Adaptive(initial=50))
    controller.drop(1.0, 0.5)
    assert controller.limit == pytest.approx(50 * DROP_BACKOFF)
    assert not controller.slow_start


def test_drops_of_calls_started_before_a_cut_do_not_cut_again() -> None:
    """A burst of drops from one round of calls cuts once, not once per drop."""
    controller = Controller(Adaptive(initial=50))
    for _ in range(20):
        controller.drop(1.0, 0.2)  # all started at t=0.8, before the first cut at t=1.0
    assert controller.limit == pytest.approx(50 * DROP_BACKOFF)
    controller.drop(1.5, 0.2)  # started at t=1.3, after the cut: a new signal
    assert controller.limit == pytest.approx(50 * DROP_BACKOFF**2)


def test_drops_are_not_latency_samples() -> None:
    """A fast refusal never counts as a fast call (concurrency-limits #176)."""
    controller = Controller(Adaptive(initial=8))
    now = window(controller, 0.0, 0.010)
    for i in range(100):
        controller.drop(now + 0.001 * (i + 1), 0.0001)
    assert controller.baseline == pytest.approx(0.010)
    assert controller._samples == []


def test_the_limit_stays_within_min_and_max() -> None:
    """Cuts stop at min; growth stops at max."""
    controller = Controller(Adaptive(initial=4, min=3, max=6))
    for i in range(50):
        controller.drop(float(i), 0.0)
    assert controller.in_force == 3
    now = 100.0
    for _ in range(10):
        now = window(controller, now, 0.010)
    assert controller.in_force == 6


_EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["success", "drop"]),
        st.sampled_from([0.0, 0.0, 1e-6, 0.001, 0.01, 0.5]),  # the clock's step, often none
        st.one_of(st.sampled_from([0.0, 1e-9, 0.002, 0.01, 0.1]), st.floats(0, 1e6)),
        st.booleans(),
    ),
    max_size=400,
)


@settings(max_examples=300, deadline=None)
@given(
    bounds=st.tuples(st.integers(1, 50), st.integers(0, 50), st.integers(0, 2000)),
    events=_EVENTS,
)
def test_any_outcomes_on_any_clock_keep_the_limit_within_min_and_max(
    bounds: tuple[int, int, int], events: list[tuple[str, float, float, bool]]
) -> None:
    """Successes and drops of any latency, on a clock that may stand still: within bounds."""
    low, up, extra = bounds
    adaptive = Adaptive(initial=low + up, min=low, max=low + up + extra)
    controller = Controller(adaptive)
    now = 0.0
    for kind, step, latency, busy in events:
        now += step
        if kind == "success":
            controller.success(now, latency, busy)
        else:
            controller.drop(now, latency)
        assert adaptive.min <= controller.limit <= adaptive.max
        assert controller.in_force == int(controller.limit)
        assert adaptive.min <= controller.in_force <= adaptive.max


def test_with_no_samples_the_limit_stays_at_initial() -> None:
    controller = Controller(Adaptive(initial=7, max=64))
    for i in range(MIN_SAMPLES - 1):  # never a full window
        controller.success(float(i), 0.01, True)
    assert (controller.in_force, controller.baseline, controller.slow_start) == (7, None, True)


def test_when_every_call_is_dropped_the_limit_rests_at_min() -> None:
    controller = Controller(Adaptive(initial=64, min=2, max=64))
    now = 0.0
    for _ in range(200):
        now += 0.01
        controller.drop(now, 0.005)
    assert controller.in_force == 2
    assert not controller.slow_start


def test_a_clock_that_stands_still_neither_fails_nor_leaves_the_bounds() -> None:
    """Latency 0 at one instant: the floor latency; growth up to max, drops down to min."""
    controller = Controller(Adaptive(initial=4, min=2, max=40))
    for _ in range(1000):
        controller.success(5.0, 0.0, True)
    assert controller.baseline == LATENCY_FLOOR
    assert 4 < controller.in_force <= 40
    for _ in range(100):
        controller.drop(5.0, 0.0)
    assert controller.in_force == 2


def test_the_baseline_is_a_minimum_of_smoothed_interquartile_means() -> None:
    """One lucky fast window cannot set the baseline alone; it moves half way."""
    controller = Controller(Adaptive(initial=16, max=16))
    now = window(controller, 0.0, 0.020)
    assert controller.baseline == pytest.approx(0.020)
    now = window(controller, now, 0.016)
    assert controller.baseline == pytest.approx(0.018)
    # The mean of the middle half: a few very slow calls in a window do not count.
    start = now
    start = max(start, controller._window_start) + 1e-6
    for latency in [0.018] * 15 + [5.0]:
        controller.success(start + latency, latency, True)
    assert controller.baseline == pytest.approx(0.018)


def test_a_window_of_millisecond_steps_reads_between_them() -> None:
    """uvloop's clock steps by 1 ms: 5 calls of 11 ms and 3 of 12 ms read 11.25 ms, not 11."""
    controller = Controller(Adaptive(initial=8, max=8))
    start = controller._window_start + 1e-6
    for latency in [0.011] * 5 + [0.012] * 3:
        controller.success(start + latency, latency, False)
    assert controller.baseline == pytest.approx(0.01125)


def test_a_baseline_from_a_stall_is_dropped_at_once() -> None:
    """A window far below the baseline (first window in a stall, or overloaded) resets it."""
    controller = Controller(Adaptive(initial=16, max=16))
    now = window(controller, 0.0, 0.300)  # a busy event loop while the run starts
    window(controller, now, 0.010)
    assert controller.baseline == pytest.approx(0.010)


def test_high_latency_at_the_minimum_limit_becomes_the_new_baseline() -> None:
    """A service that became slower is not our queueing: at `min` its latency is the baseline."""
    controller = Controller(Adaptive(initial=2, min=2, max=100))
    now = window(controller, 0.0, 0.010, busy=False)
    assert controller.baseline == pytest.approx(0.010)
    now = window(controller, now, 0.030)  # one slow window: wait
    assert controller.baseline == pytest.approx(0.010)
    window(controller, now, 0.030)
    assert controller.baseline == pytest.approx(0.030)
    assert controller.slow_start


def test_a_drop_while_probing_cuts_from_the_limit_the_probe_returns_to() -> None:
    """A drop during a probe cuts the limit the probe would go back to, and ends the probe."""
    controller, now = settled(64, 0.010)
    for _ in range(PROBE_EVERY):
        now = window(controller, now, 0.011, busy=False)
    assert controller.probing
    controller.drop(now + 0.001, 0.0005)
    assert not controller.probing
    assert controller.limit == pytest.approx(64 * DROP_BACKOFF)


def test_latency_has_a_floor() -> None:
    """Zero-latency calls read as LATENCY_FLOOR: no division by zero, no runaway ratio."""
    controller = Controller(Adaptive(initial=8, max=64))
    now = 0.0
    for _ in range(8):
        now = window(controller, now, 0.0)
    assert controller.in_force == 64


def test_a_window_needs_min_samples_or_half_the_limit() -> None:
    """A window closes after max(MIN_SAMPLES, limit / 2) fresh samples."""
    small = Controller(Adaptive(initial=2))
    window(small, 0.0, 0.01, count=MIN_SAMPLES - 1)
    assert small.in_force == 2
    small.success(0.01, 0.01, True)
    assert small.in_force == 3
    big = Controller(Adaptive(initial=100, max=1000))
    window(big, 0.0, 0.01, count=49)
    assert big.in_force == 100
    big.success(0.01, 0.01, True)
    assert big.in_force == 150


# -- Against a modelled service --------------------------------------------------------


@dataclass
class Run:
    """What a simulated run produced."""

    served: list[tuple[float, float]] = field(default_factory=list)  # (end time, latency)
    refused: int = 0
    limits: list[tuple[float, float]] = field(default_factory=list)  # sampled every 50 ms

    def limit_between(self, start: float, end: float) -> list[float]:
        return [limit for t, limit in self.limits if start <= t < end]

    def mean_limit(self, start: float, end: float) -> float:
        values = self.limit_between(start, end)
        return sum(values) / len(values)

    def throughput(self, start: float, end: float) -> float:
        return sum(start <= t < end for t, _ in self.served) / (end - start)


def simulate(
    *,
    capacity: int = 64,
    service: float = 0.010,
    queue: int = 256,
    seconds: float = 10.0,
    jitter: float = 0.3,
    noise: float = 0.002,
    transit: float = 0.0005,
    capacity_at: Sequence[tuple[float, int]] = (),
    service_at: Sequence[tuple[float, float]] = (),
    adaptive: Adaptive | None = None,
    seed: int = 0,
) -> Run:
    """A closed-loop client, always with work waiting, against a queueing service.

    The service serves ``capacity`` requests at once for ``service`` seconds
    (times 1 +/- ``jitter``), queues up to ``queue`` more in arrival order and
    refuses the rest at once. Each request spends ``transit`` seconds each way,
    and the client adds an exponential delay of mean ``noise`` (its own event
    loop, the network). ``capacity_at`` and ``service_at`` change the service
    at the given times.
    """
    rng = random.Random(seed)
    controller = Controller(adaptive or Adaptive())
    run = Run()
    events: list[tuple[float, int, str, float]] = []
    sequence = 0

    def at(when: float, kind: str, value: float) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(events, (when, sequence, kind, value))

    for when, value in capacity_at:
        at(when, "capacity", value)
    for when, value in service_at:
        at(when, "service", value)
    in_flight = in_service = 0
    waiting: list[float] = []  # start times of queued requests, FIFO

    def start_calls(now: float) -> None:
        nonlocal in_flight
        while in_flight < controller.in_force:
            in_flight += 1
            at(now + transit, "arrive", now)

    def serve(now: float, started: float) -> None:
        nonlocal in_service
        in_service += 1
        at(now + service * (1 + jitter * (2 * rng.random() - 1)), "served", started)

    start_calls(0.0)
    next_sample = 0.0
    while events:
        now, _, kind, value = heapq.heappop(events)
        if now > seconds:
            break
        while next_sample <= now:
            run.limits.append((next_sample, controller.limit))
            next_sample += 0.05
        if kind == "capacity":
            capacity = int(value)
            while waiting and in_service < capacity:
                serve(now, waiting.pop(0))
        elif kind == "service":
            service = value
        elif kind == "arrive":
            if in_service < capacity and not waiting:
                serve(now, value)
            elif len(waiting) < queue:
                waiting.append(value)
            else:
                at(now + transit, "refused", value)
        elif kind == "served":
            in_service -= 1
            while waiting and in_service < capacity:
                serve(now, waiting.pop(0))
            at(now + transit + rng.expovariate(1 / noise), "done", value)
        else:
            busy = in_flight >= controller.in_force
            if kind == "done":
                run.served.append((now, now - value))
                controller.success(now, now - value, busy)
            else:
                run.refused += 1
                controller.drop(now, now - value)
            in_flight -= 1
            start_calls(now)
    return run


def test_it_finds_the_capacity_and_delivers_full_throughput() -> None:
    """Capacity 64 x 10 ms: auto settles just above 64 in flight and gets all 6400/s."""
    run = simulate()
    assert run.refused == 0
    # Full throughput needs 64 x (10 + 3 ms of transit and client noise) / 10 in flight.
    assert 64 <= run.mean_limit(5, 10) <= 64 * 1.3 * TOLERANCE * 1.1
    assert run.throughput(5, 10) >= 0.97 * 6400


def test_it_reaches_the_capacity_within_a_few_round_trips() -> None:
    """Slow start: from 16 to capacity in well under half a second."""
    run = simulate()
    first = next(t for t, limit in run.limits if limit >= 64)
    assert first <= 0.3


def test_it_follows_the_capacity_halving_within_a_second() -> None:
    """When capacity drops 64 -> 32 at t=5 s, the limit follows within a second, no refusal."""
    run = simulate(capacity_at=[(5.0, 32)])
    assert run.refused == 0
    before = run.mean_limit(4, 5)
    assert max(run.limit_between(6, 10)) <= 0.75 * before
    assert 32 <= run.mean_limit(6, 10) <= 32 * TOLERANCE * 1.35
    assert run.throughput(6, 10) >= 0.95 * 3200


def test_it_follows_the_capacity_back_up() -> None:
    """When capacity doubles back, the limit grows again to use it."""
    run = simulate(capacity_at=[(3.0, 32), (6.0, 64)])
    assert run.mean_limit(8, 10) >= 64
    assert run.throughput(8, 10) >= 0.95 * 6400


def test_no_upward_creep_under_steady_moderate_overload() -> None:
    """Five minutes 16 calls over capacity: the limit stays put (concurrency-limits #134)."""
    run = simulate(capacity=16, seconds=300.0)
    assert run.refused == 0
    early, late = run.mean_limit(10, 60), run.mean_limit(250, 300)
    assert late <= early * 1.1
    assert max(run.limit_between(60, 300)) <= 3 * 16


def test_refusals_alone_hold_the_limit_at_a_service_without_a_queue() -> None:
    """A queue of 0: latency never grows, only 429s say 'too many'; AIMD keeps near capacity."""
    run = simulate(queue=0, noise=0.001)
    assert 0.8 * 64 <= run.mean_limit(5, 10) <= 1.3 * 64
    assert run.throughput(5, 10) >= 0.75 * 6400
    # Refusals come from probing above capacity: a small share of the calls.
    assert run.refused <= 0.05 * len(run.served)


def test_it_recovers_when_the_service_itself_becomes_slower() -> None:
    """Service time 10 -> 20 ms: the limit dips, re-learns the baseline and regains throughput."""
    run = simulate(service_at=[(3.0, 0.020)])
    assert run.throughput(7, 10) >= 0.9 * 3200


def test_a_service_30_percent_slower_keeps_its_throughput() -> None:
    """Service time 10 -> 13 ms: the probes follow it; a lowest-latency-ever reference would not.

    Judged against the 10 ms seen before, 13 ms reads as queueing for good,
    and the limit would be cut far below the 64 x 1.3 in flight the slower
    service needs (half the throughput, on this seed).
    """
    run = simulate(service_at=[(3.0, 0.013)])
    assert run.refused == 0
    assert run.throughput(6, 10) >= 0.95 * 64 / 0.013


def test_a_tiny_capacity_is_found_too() -> None:
    """Capacity 4: the limit settles at a handful, not at the initial 16."""
    run = simulate(capacity=4, queue=64, seconds=20.0)
    assert run.refused == 0
    assert run.mean_limit(10, 20) <= 16
    assert run.throughput(10, 20) >= 0.95 * 400


def test_a_huge_capacity_is_used_up_to_max() -> None:
    """Capacity far above max: the limit runs up to max and stays."""
    run = simulate(capacity=5000, queue=0, seconds=3.0, adaptive=Adaptive(max=300))
    assert run.limit_between(1, 3) == [300.0] * len(run.limit_between(1, 3))


def test_the_simulation_is_deterministic() -> None:
    """Same seed, same run: these tests assert exact numbers, not lucky ones."""
    assert simulate(seconds=2.0).limits == simulate(seconds=2.0).limits
