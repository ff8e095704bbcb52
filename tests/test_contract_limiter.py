"""The Limiter's contract, tried from outside: arrival order, cancellation at every
point, keys, successive event loops, the limit in force, limits across maps."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Coroutine
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import corral
import corral._limits
from _limiting import now
from _loops import LOOP_KINDS, run
from corral import Adaptive, Limiter, Rate


def exactly(message: str) -> str:
    """A ``match=`` pattern for this whole message and nothing else."""
    return f"^{re.escape(message)}$"


def conforms(times: list[float], rate: Rate) -> bool:
    """Whether start times keep to ``rate``: at most burst + w / interval in any window w."""
    s = sorted(times)
    slack = 1e-9
    return all(
        j - i + 1 <= rate.burst + (s[j] - s[i]) / rate.interval + slack
        for i in range(len(s))
        for j in range(i + 1, len(s))
    )


class Starts:
    """Callers of one Limiter: each records (name, loop time) when acquire() returns."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        self.log: list[tuple[str, float]] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def _call(self, name: str, hold: float, then: Callable[[], object] | None) -> None:
        await self.limiter.acquire()
        self.log.append((name, now()))
        try:
            await asyncio.sleep(hold)
        finally:
            self.limiter.release()
        if then is not None:
            then()  # in the same instant as the release, before anyone else runs

    def arrive(
        self, name: str, hold: float = 0.0, then: Callable[[], object] | None = None
    ) -> asyncio.Task[None]:
        task = self.tasks[name] = asyncio.create_task(self._call(name, hold, then))
        return task

    async def finish(self) -> None:
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        assert (self.limiter.in_flight, self.limiter.waiting) == (0, 0)


# -- arrival order ----------------------------------------------------------------------


@pytest.mark.virtual_time
async def test_async_with_users_and_maps_sharing_a_limiter_start_in_arrival_order() -> None:
    """One slot, a rate: `async with` users and one-item maps arriving one after the other
    while the slot is taken start in the order they arrived, each at its rate slot."""
    limiter = Limiter(1, rate=Rate(10))
    log: list[tuple[str, float]] = []

    async def fn(name: str) -> None:
        log.append((name, now()))

    async def user(name: str) -> None:
        async with limiter:
            log.append((name, now()))

    await limiter.acquire()  # at 0: the slot and the rate slot
    names = ["map0", "user0", "map1", "user1", "map2", "user2"]
    tasks = []
    for name in names:
        if name.startswith("map"):
            tasks.append(asyncio.create_task(corral.gather(fn, [name], limit=limiter)))
        else:
            tasks.append(asyncio.create_task(user(name)))
        await asyncio.sleep(0.01)  # each arrives (and queues) before the next
    await asyncio.sleep(1)
    limiter.release()  # at 1.06: a slot free, the rate long ready
    await asyncio.gather(*tasks)
    assert [name for name, _ in log] == names
    assert [t for _, t in log] == pytest.approx([1.06 + 0.1 * i for i in range(6)])
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


@pytest.mark.virtual_time
async def test_callers_with_free_slots_start_at_the_rate_in_arrival_order() -> None:
    """Slots to spare, the rate the bottleneck: starts follow arrival, one per interval."""
    limiter = Limiter(50, rate=Rate(20))
    calls = Starts(limiter)
    for i in range(12):
        calls.arrive(f"c{i}", hold=0.5)
        await asyncio.sleep(0.001)
    await calls.finish()
    assert [name for name, _ in calls.log] == [f"c{i}" for i in range(12)]
    assert [t for _, t in calls.log] == pytest.approx([0.05 * i for i in range(12)])


# -- cancellation at every point ------------------------------------------------------------


# How many callers wait (victim included, if still in line) at each point of cancellation.
WAITING_AT = {"cap: in line": 3, "cap: handed the slot": 1, "rate: in line": 2, "rate: granted": 1}


def _cancel_scenario(point: str, *, cancel: bool) -> list[tuple[str, float]]:
    """Callers "first", "victim", "last" queue behind a holder; the victim is cancelled at
    ``point`` (or never comes). Returns the starts of the others."""
    # Just after the instant t: after every callback due at t (the gate's timer too).
    just_after = 1e-12

    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        limiter = Limiter(1 if point.startswith("cap") else 10, rate=Rate(10))
        calls = Starts(limiter)
        victim: asyncio.Task[None] | None = None

        def cancel_victim() -> None:
            if victim is not None:
                # Where the victim is: the callers still in line (for the slot or the rate).
                assert limiter.waiting == WAITING_AT[point]
                victim.cancel()

        calls.arrive("holder", hold=0.25)  # at 0, holds its slot until 0.25
        await asyncio.sleep(0.01)
        # With one slot, "first" releases at 0.45 and hands the slot to the victim.
        handed = point == "cap: handed the slot"
        calls.arrive("first", hold=0.2, then=cancel_victim if handed else None)
        await asyncio.sleep(0.01)
        if cancel:
            victim = calls.arrive("victim")
        await asyncio.sleep(0.01)
        calls.arrive("last")
        if point == "cap: in line":
            loop.call_at(0.1, cancel_victim)
        elif point == "rate: in line":
            loop.call_at(0.15, cancel_victim)
        elif point == "rate: granted":
            loop.call_at(0.2 + just_after, cancel_victim)  # granted at 0.2, not resumed
        await calls.finish()
        return [(name, t) for name, t in calls.log if name != "holder"]

    result: list[tuple[str, float]] = run(main, virtual_time=True)
    return result


@pytest.mark.parametrize(
    "point", ["cap: in line", "cap: handed the slot", "rate: in line", "rate: granted"]
)
def test_a_caller_cancelled_at_any_point_gives_back_its_place_and_rate_slot(point: str) -> None:
    with_cancel = _cancel_scenario(point, cancel=True)
    without = _cancel_scenario(point, cancel=False)
    assert [name for name, _ in with_cancel] == ["first", "last"]
    assert with_cancel == [(name, pytest.approx(t)) for name, t in without]


def _late_batch(*, cancel: bool) -> list[tuple[str, float]]:
    """Burst of 2 at 1/s; a blocking call holds the loop from 0.5 s to 5 s, so the gate's
    1 s timer, late, grants "victim" and "second" at once; "third" waits in line."""

    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        limiter = Limiter(10, rate=Rate(1, burst=2))
        for _ in range(2):
            assert limiter.acquire_nowait()  # the burst at 0: the next start is due at 1.0
        calls = Starts(limiter)
        victim = calls.arrive("victim") if cancel else None
        calls.arrive("second")
        calls.arrive("third")
        await asyncio.sleep(0)  # all in line for the rate
        loop.call_at(0.5, loop.advance, 4.5)  # type: ignore[attr-defined]
        if victim is not None:
            # Runs right after the late timer granted the victim (and "second").
            loop.call_at(1.0 + 1e-12, victim.cancel)
        await asyncio.sleep(0.1)
        for _ in range(2):
            limiter.release()
        await calls.finish()
        return calls.log

    result: list[tuple[str, float]] = run(main, virtual_time=True)
    return result


def test_a_rate_slot_granted_with_a_later_one_is_passed_on_when_its_caller_is_cancelled() -> None:
    """Cancelled once granted, with a later start granted on top of its slot: the slot
    used to stay spent (the next caller started an interval late). It goes to the next
    caller in line, as a slot handed to a cancelled caller does."""
    expected = [("second", 5.0), ("third", 5.0)]
    assert _late_batch(cancel=False) == expected  # as if the victim never came
    assert _late_batch(cancel=True) == expected


# A plain rate goes to corral._rate's gate; a weighted rate, or several windows, to
# corral._weighted's: a cooldown pauses either alike.
_TEN_PER_SECOND = [
    pytest.param(Rate(10), id="plain"),
    pytest.param(Rate({"requests": 10, "tokens": 1000}), id="weighted"),
    pytest.param([Rate(10), Rate(600, per=60)], id="two-windows"),
]


@pytest.mark.parametrize("cancel", [False, True], ids=["sits-out", "cancelled-meanwhile"])
@pytest.mark.parametrize("limit", [10, None], ids=["capped", "rate-only"])
@pytest.mark.parametrize("rate", _TEN_PER_SECOND)
@pytest.mark.virtual_time
async def test_a_rate_slot_granted_just_before_a_cooldown_does_not_start_with_the_next(
    limit: int | None, cancel: bool, rate: Any
) -> None:
    """A 429 seen in the instant the rate grants a caller (before it resumes): that caller
    used to sit out the pause and start at its end together with the next one, two starts
    at once on a rate of one per 0.1 s. It starts first after the pause, the next 0.1 s
    later; cancelled during the pause, it leaves the first slot to the next caller."""
    limiter = Limiter(limit=limit, rate=rate)
    loop = asyncio.get_running_loop()
    calls = Starts(limiter)
    for n in range(4):
        calls.arrive(f"c{n}")
    await asyncio.sleep(0)  # c0 started at 0; c1..c3 wait for the rate (c1's slot: 0.1)
    loop.call_at(0.1 + 1e-12, limiter.cooldown, 1.0)  # just after the gate grants c1
    if cancel:
        loop.call_at(0.5, calls.tasks["c1"].cancel)
    await calls.finish()
    expected = [("c0", 0.0), ("c1", 1.1), ("c2", 1.2), ("c3", 1.3)]
    if cancel:
        expected = [("c0", 0.0), ("c2", 1.1), ("c3", 1.2)]
    assert calls.log == [(name, pytest.approx(t)) for name, t in expected]
    assert conforms([t for _, t in calls.log], Rate(10))


# -- successive event loops ---------------------------------------------------------------

# Made at import time, outside any event loop, as users do.
_CAPPED = Limiter(2, rate=Rate(10))
_RATE_ONLY = Limiter(rate=Rate(10))
_KEYED = Limiter(2, rate=Rate(10), key=lambda item: item % 2)
_WEIGHTED = Limiter(2, rate=Rate({"requests": 10, "tokens": 1000}))


async def _cancelled_midway(limiter: Limiter, pause: float) -> None:
    """Calls queued for the slots and the rate, a cooldown maybe, then the run is cut."""

    async def call(item: int) -> None:
        async with limiter.for_item(item):
            await asyncio.sleep(0.5)

    # Left running: asyncio.run cancels them when the run is cut.
    tasks = [asyncio.create_task(call(item)) for item in range(8)]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in tasks)
    assert limiter.waiting > 0
    if pause:
        limiter.cooldown(pause)
    await asyncio.sleep(0.01)
    raise KeyboardInterrupt  # as a Ctrl-C would: the run ends with callers in line


async def _six_starts(limiter: Limiter) -> list[float]:
    began: list[float] = []
    running = peak = 0

    async def call(item: int) -> None:
        nonlocal running, peak
        async with limiter.for_item(item):
            began.append(now())
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.3)
            running -= 1

    async with asyncio.timeout(30):  # hang guard, not the assertion
        await asyncio.gather(*(call(item) for item in range(6)))
    assert (limiter.in_flight, limiter.waiting) == (0, 0)
    assert peak <= (limiter.limit or 6) * (2 if limiter.key is not None else 1)
    return sorted(began)


@pytest.mark.parametrize("pause", [0.0, 100.0], ids=["no-cooldown", "in-a-cooldown"])
@pytest.mark.parametrize(
    "limiter",
    [
        pytest.param(_CAPPED, id="capped"),
        pytest.param(_RATE_ONLY, id="rate-only"),
        pytest.param(_KEYED, id="keyed"),
        pytest.param(_WEIGHTED, id="weighted"),
    ],
)
def test_an_import_time_limiter_serves_the_next_run_after_one_cut_midway(
    limiter: Limiter, pause: float
) -> None:
    """A run cut with callers in line (and a cooldown in force) leaves nothing behind: the
    next asyncio.run starts at once, at the rate. A cooldown used to carry over through the
    rate: the next run waited out the rest of it (up to 120 s) before its first start."""
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            run(lambda: _cancelled_midway(limiter, pause), virtual_time=True)
        assert (limiter.in_flight, limiter.waiting) == (0, 0)
        began = run(lambda: _six_starts(limiter), virtual_time=True)
        # The last run's starts still owe at most one interval (carried over as
        # if no time had passed); then one start per 0.1 s, per key.
        assert began[0] <= 0.1 + 1e-9
        per_key = 2 if limiter.key is not None else 1
        assert began[-1] - began[0] <= 1.0
        assert conforms(began[::per_key], Rate(10))


def test_an_import_time_limiter_works_on_every_loop_kind_in_turn() -> None:
    """The same module-level Limiter on asyncio, uvloop and eager loops, one after another."""
    limiter = Limiter(2, rate=Rate(1000))

    async def main() -> int:
        peak = running = 0

        async def call(item: int) -> None:
            nonlocal peak, running
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.001)
            running -= 1

        async with asyncio.timeout(30):  # hang guard, not the assertion
            await asyncio.gather(
                *(_through(limiter, call, i) for i in range(10)),
                corral.gather(call, range(10), limit=limiter),
            )
        return peak

    for kind in LOOP_KINDS * 2:
        assert run(main, kind) == 2
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


# -- keys -----------------------------------------------------------------------------------


def test_a_million_distinct_keys_keep_a_bounded_number_of_limiters() -> None:
    """Memory follows the keys in use, not the keys ever seen."""
    limiter = Limiter(2, key=lambda item: item)
    held = 0

    async def main() -> None:
        nonlocal held
        for item in range(1_000_000):
            sub = limiter.for_item(item)
            if item % 64 == 0:  # some used for real, every one of them looked up
                async with sub:
                    pass
            held = max(held, len(limiter._subs))

    asyncio.run(main())  # not in debug mode: this is a million keys
    assert held <= 2 * corral._limits.IDLE_KEYS + 1
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


@pytest.mark.virtual_time
async def test_a_key_with_a_caller_in_line_or_in_flight_is_never_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sweeps of idle keys while one key has a call in flight and callers in line for its
    slot and for its rate: that key keeps its Limiter, its cap and its rate throughout."""
    monkeypatch.setattr(corral._limits, "IDLE_KEYS", 2)
    limiter = Limiter(1, rate=Rate(10), key=lambda item: item[0])
    log: list[tuple[str, float]] = []

    async def call(item: tuple[str, int], hold: float) -> None:
        async with limiter.for_item(item):
            log.append((f"{item[0]}{item[1]}", now()))
            await asyncio.sleep(hold)

    busy = limiter.for_item(("busy", 0))
    tasks = [asyncio.create_task(call(("busy", i), 0.5)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert (busy.in_flight, busy.waiting) == (1, 2)
    for i in range(200):  # many sweeps, every other key idle
        async with limiter.for_item((f"k{i}", 0)):
            pass
        assert limiter.for_item(("busy", 9)) is busy
    await asyncio.gather(*tasks)
    assert [entry for entry in log if entry[0].startswith("busy")] == [
        ("busy0", 0.0),
        ("busy1", pytest.approx(0.5)),
        ("busy2", pytest.approx(1.0)),
    ]
    assert limiter.for_item(("busy", 0)) is busy


@pytest.mark.virtual_time
async def test_each_key_has_its_own_cap_and_rate_and_cancellation_stays_within_it() -> None:
    """Two keys, one slot and 10/s each: a caller cancelled in one key's line changes
    nothing for the other key, and its own key's next caller takes its place."""
    limiter = Limiter(1, rate=Rate(10), key=lambda name: name[0])
    log: list[tuple[str, float]] = []

    async def call(name: str) -> None:
        async with limiter.for_item(name):
            log.append((name, now()))
            await asyncio.sleep(0.3)

    tasks = {name: asyncio.create_task(call(name)) for name in ("a1", "b1", "a2", "b2", "a3")}
    await asyncio.sleep(0.1)
    tasks["a2"].cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert sorted(log) == [
        ("a1", 0.0),
        ("a3", pytest.approx(0.3)),  # in a2's place
        ("b1", 0.0),
        ("b2", pytest.approx(0.3)),
    ]
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


# -- the limit in force ----------------------------------------------------------------------


async def test_limit_is_the_limit_in_force_and_no_more_run() -> None:
    """A fixed limit, an adaptive one cut while full, a keyed one: limiter.limit is what
    holds. After a cut, nobody starts until the calls in flight are below the new limit."""
    fixed = Limiter(3)
    running = peak = 0

    async def call(item: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        for _ in range(item % 4):
            await asyncio.sleep(0)
        running -= 1

    await corral.gather(call, range(50), limit=fixed)
    assert (fixed.limit, peak) == (3, 3)

    adaptive = Limiter(Adaptive(initial=8, min=1, max=16))
    assert adaptive.limit == 8
    for _ in range(8):
        await adaptive.acquire()
    started: list[tuple[int, int | None]] = []  # (in flight, limit) as each waiter starts

    async def waiter() -> None:
        await adaptive.acquire()
        started.append((adaptive.in_flight, adaptive.limit))

    waiters = [asyncio.create_task(waiter()) for _ in range(4)]
    await asyncio.sleep(0)
    adaptive.record(0.1, "drop")
    cut = adaptive.limit
    assert cut is not None
    assert cut < 8
    for released in range(1, 9):
        adaptive.release()
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(started) == max(0, min(4, released - (8 - cut)))
    assert all(in_flight <= limit for in_flight, limit in started if limit is not None)
    await asyncio.gather(*waiters)
    for _ in range(4):
        adaptive.release()
    assert (adaptive.in_flight, adaptive.waiting) == (0, 0)

    keyed = Limiter(4, key=lambda item: item % 3)
    assert keyed.limit == keyed.for_item(1).limit == 4


async def _through(
    limiter: Limiter, fn: Callable[[int], Coroutine[Any, Any, None]], item: int
) -> None:
    async with limiter:
        await fn(item)


# -- limits hold across maps sharing one Limiter (property) ---------------------------------


_ticks = st.integers(min_value=0, max_value=30)


@settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(
    limit=st.one_of(st.none(), st.integers(min_value=1, max_value=5)),
    per_second=st.sampled_from([5, 10, 20, 50]),
    burst=st.integers(min_value=1, max_value=3),
    maps=st.lists(st.lists(st.tuples(_ticks, st.booleans()), max_size=10), min_size=1, max_size=3),
    users=st.lists(st.tuples(_ticks, _ticks, st.booleans()), max_size=6),
    cut_after=st.one_of(st.none(), _ticks),
)
# Found by this test: the first call's 429 lands as the rate grants the second, which sat
# out the pause and started at its end together with the third.
@example(
    limit=None,
    per_second=20,
    burst=1,
    maps=[[(5, True), (0, False), (0, False)]],
    users=[],
    cut_after=None,
)
def test_limits_hold_across_maps_and_users_sharing_a_limiter(
    limit: int | None,
    per_second: int,
    burst: int,
    maps: list[list[tuple[int, bool]]],
    users: list[tuple[int, int, bool]],
    cut_after: int | None,
) -> None:
    """Maps and `async with` users on one Limiter, calls of random lengths, some answering
    429 with Retry-After (a cooldown for all), one map cut short: never more than `limit`
    in flight, never more starts than the rate allows, nothing left held."""
    rate = Rate(per_second, burst=burst)
    tick = 0.01  # durations and arrivals in steps of 10 ms: instants often coincide

    async def main() -> None:
        limiter = Limiter(limit, rate=rate)
        began: list[float] = []
        running = peak = 0

        async def body(ticks: int, throttled: bool) -> None:
            nonlocal running, peak
            began.append(now())
            running += 1
            peak = max(peak, running)
            try:
                await asyncio.sleep(ticks * tick)
                if throttled:
                    raise corral.RetryAfter(0.2)
            finally:
                running -= 1

        async def fn(item: tuple[int, bool]) -> None:
            await body(*item)

        async def one_map(items: list[tuple[int, bool]], cut: bool) -> None:
            run_map = corral.gather(fn, items, limit=limiter, return_exceptions=True)
            if cut and cut_after is not None:
                try:
                    async with asyncio.timeout(cut_after * tick):
                        await run_map
                except TimeoutError:
                    pass
            else:
                await run_map

        async def user(arrival: int, ticks: int, throttled: bool) -> None:
            await asyncio.sleep(arrival * tick)
            try:
                async with limiter:
                    await body(ticks, throttled)
            except corral.RetryAfter:
                pass

        async with asyncio.timeout(3600):  # hang guard, not the assertion
            await asyncio.gather(
                *(one_map(items, i == 0) for i, items in enumerate(maps)),
                *(user(*u) for u in users),
            )
        assert limit is None or peak <= limit
        assert conforms(began, rate), sorted(began)
        assert (limiter.in_flight, limiter.waiting) == (0, 0)

    run(main, virtual_time=True)


# -- bad arguments ----------------------------------------------------------------------------


_LIMIT_MESSAGE = (
    "limit must be an int >= 1, 'auto', a corral.Adaptive or None, like "
    "corral.Limiter(limit=10); got limit={}"
)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"limit": math.nan}, TypeError, _LIMIT_MESSAGE.format("nan")),
        ({"limit": Fraction(3)}, TypeError, _LIMIT_MESSAGE.format("Fraction(3, 1)")),
        ({"limit": [3]}, TypeError, _LIMIT_MESSAGE.format("[3]")),
        ({"limit": Adaptive}, TypeError, _LIMIT_MESSAGE.format("<class 'corral.Adaptive'>")),
        (
            {"limit": 2, "rate": -3},
            ValueError,
            "rate must be a finite number > 0, like 20, '20/s' or corral.Rate(20, per=1.0); "
            "got rate=-3",
        ),
        (
            {"limit": 2, "rate": True},
            TypeError,
            "rate must be a finite number > 0, like 20, '20/s' or corral.Rate(20, per=1.0); "
            "got rate=True",
        ),
        (
            {"limit": 2, "name": "api"},
            TypeError,
            "name= and lease= belong to a Limiter shared through Redis: pass redis= too, "
            "like corral.Limiter(limit=10, redis='redis://127.0.0.1:6379/0', "
            "name='api-key-1'); got name='api', lease=None",
        ),
    ],
)
def test_bad_arguments_fail_naming_the_argument_and_the_value(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=exactly(message)):
        Limiter(**arguments)


@pytest.mark.parametrize("seconds", [-1, math.nan, math.inf, True, "3", None])
async def test_a_bad_cooldown_fails_naming_the_value_and_changes_nothing(seconds: Any) -> None:
    limiter = Limiter(2, rate=Rate(10))
    message = f"cooldown seconds must be a finite number >= 0; got seconds={seconds!r}"
    with pytest.raises(ValueError, match=exactly(message)):
        limiter.cooldown(seconds)
    assert not limiter.cooling_down
    assert limiter.acquire_nowait()
    limiter.release()
