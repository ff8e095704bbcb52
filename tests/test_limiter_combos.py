"""A Limiter's features together: keys with rates and cooldowns, weighted rates with
costs and refunds, adaptive limits, maps and direct users sharing one, successive
event loops, and maps that fail with calls queued."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

import corral
import corral._limits
from _limiting import now
from _loops import VirtualClockLoop, run
from corral import Adaptive, Limiter, Rate


def conforms(times: list[float], rate: Rate) -> bool:
    """Whether start times keep to ``rate``: at most burst + w / interval in any window w."""
    s = sorted(times)
    return all(
        j - i + 1 <= rate.burst + (s[j] - s[i]) / rate.interval + 1e-9
        for i in range(len(s))
        for j in range(i + 1, len(s))
    )


# -- a cooldown that a closed loop left behind --------------------------------------------


def test_a_cooldown_left_by_a_closed_loop_is_over_on_the_next() -> None:
    """A run ends while the Limiter cools down: between runs and on the next loop it
    says it is not cooling down, plain or keyed, keys used again or not."""
    plain = Limiter(2, rate=Rate(10))
    keyed = Limiter(2, rate=Rate(10), key=lambda item: item)

    async def pause() -> None:
        async with keyed.for_item("paused"):
            pass
        plain.cooldown(30.0)
        keyed.cooldown(30.0)
        assert plain.cooling_down
        assert keyed.cooling_down

    async def next_run() -> None:
        assert not plain.cooling_down
        assert not keyed.cooling_down
        async with keyed.for_item("used"):
            pass
        assert not keyed.cooling_down

    run(pause, virtual_time=True)
    assert not plain.cooling_down  # between runs, too
    assert not keyed.cooling_down
    run(next_run, virtual_time=True)


def test_keys_paused_when_their_loop_closed_are_forgotten_on_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keys cooling down when a run ends do not stay held for ever: the next run's new
    keys sweep them away like any idle key."""
    monkeypatch.setattr(corral._limits, "IDLE_KEYS", 4)
    keyed = Limiter(1, key=lambda item: item)

    async def first() -> None:
        for key in range(10):
            async with keyed.for_item(key):
                pass
        keyed.cooldown(1000.0)

    async def second() -> None:
        for key in range(10, 200):
            async with keyed.for_item(key):
                pass
        assert not any(key in keyed._subs for key in range(10))
        assert len(keyed._subs) <= 2 * 2 * 4

    run(first, virtual_time=True)
    run(second, virtual_time=True)


# -- every feature at once, direct users ---------------------------------------------------

_BURSTS = (1, 2, 3)


def _rate_of(kind: str, burst: int) -> Any:
    if kind == "plain":
        return Rate(20, burst=burst)
    if kind == "weighted":
        return Rate({"requests": 20, "tokens": 400}, burst=burst)
    # Two windows: the per-minute one is the tighter only for long runs.
    return [Rate({"requests": 20, "tokens": 400}, burst=burst), Rate({"requests": 100}, per=10)]


@pytest.mark.parametrize("seed", range(60))
def test_keys_weighted_rates_adaptive_limits_cooldowns_and_cancellations_together(
    seed: int,
) -> None:
    """Direct users of one Limiter (keyed or not; a plain, weighted or two-window rate;
    a fixed or adaptive limit) reserve costs and settle refunds and debts, report
    drops, raise Retry-After and are cancelled at random moments: nobody hangs, each
    key keeps its cap and its request rate, and nothing stays held."""
    rng = random.Random(seed)
    kind = rng.choice(["plain", "weighted", "list"])
    burst = rng.choice(_BURSTS)
    limit = rng.choice([None, 1, 2, 3, Adaptive(initial=2, min=1, max=4)])
    keyed = rng.random() < 0.5
    tick = 0.01

    async def main() -> None:
        limiter = Limiter(
            limit, rate=_rate_of(kind, burst), key=(lambda item: item) if keyed else None
        )
        began: dict[str, list[float]] = {}
        running: dict[str, int] = {}
        peak: dict[str, int] = {}

        async def user(key: str, arrival: int, hold: int, throttled: bool, costed: bool) -> None:
            await asyncio.sleep(arrival * tick)
            own = limiter.for_item(key)
            cost = {"tokens": rng.randrange(30)} if costed and kind != "plain" else None
            await own.acquire(cost)
            seen = key if keyed else "all"
            began.setdefault(seen, []).append(now())
            running[seen] = running.get(seen, 0) + 1
            peak[seen] = max(peak.get(seen, 0), running[seen])
            try:
                await asyncio.sleep(hold * tick)
                if throttled:
                    own.record_error(hold * tick, corral.RetryAfter(rng.choice([0.05, 0.3])))
                elif own.adaptive is not None:
                    own.record(hold * tick, rng.choice(["success", "drop"]))
                if cost is not None:
                    own.settle(cost, {"tokens": rng.randrange(60)})  # a refund or a debt
            finally:
                running[seen] -= 1
                own.release()

        tasks = [
            asyncio.create_task(
                user(
                    rng.choice("ab"),
                    rng.randrange(20),
                    rng.randrange(10),
                    rng.random() < 0.1,
                    rng.random() < 0.7,
                )
            )
            for _ in range(rng.randrange(5, 30))
        ]
        for _ in range(rng.randrange(6)):
            await asyncio.sleep(rng.randrange(15) * tick)
            rng.choice(tasks).cancel()
        _, pending = await asyncio.wait(tasks, timeout=600)
        assert not pending, f"{len(pending)} callers left waiting: {limiter!r}"
        for times in began.values():
            assert conforms(times, Rate(20, burst=burst)), sorted(times)
        cap = 4 if isinstance(limit, Adaptive) else limit
        assert cap is None or max(peak.values(), default=0) <= cap
        assert (limiter.in_flight, limiter.waiting) == (0, 0)

    run(main, virtual_time=True)


# -- maps and direct users on a keyed or weighted Limiter ------------------------------------


@pytest.mark.parametrize("seed", range(30))
def test_maps_and_users_on_a_keyed_limiter_with_retry_after_keep_each_keys_limits(
    seed: int,
) -> None:
    """Three maps (one cut short) with retries and `async with` users on one keyed
    Limiter with a rate; some calls raise RetryAfter (a cooldown for their key): per
    key, never more than the limit in flight and never more starts than the rate."""
    rng = random.Random(seed)
    rate = Rate(20, burst=rng.choice(_BURSTS))
    limit = rng.choice([1, 2, 3])
    tick = 0.01

    async def main() -> None:
        limiter = Limiter(limit, rate=rate, key=lambda item: item[0])
        began: dict[str, list[float]] = {"a": [], "b": []}
        running = {"a": 0, "b": 0}
        peak = {"a": 0, "b": 0}

        async def body(key: str, ticks: int, throttled: bool) -> None:
            began[key].append(now())
            running[key] += 1
            peak[key] = max(peak[key], running[key])
            try:
                await asyncio.sleep(ticks * tick)
                if throttled:
                    raise corral.RetryAfter(0.2)
            finally:
                running[key] -= 1

        async def fn(item: tuple[str, int, bool]) -> None:
            await body(*item)

        def items() -> list[tuple[str, int, bool]]:
            return [
                (rng.choice("ab"), rng.randrange(10), rng.random() < 0.15)
                for _ in range(rng.randrange(1, 12))
            ]

        async def one_map(work: list[tuple[str, int, bool]], cut: int | None) -> None:
            retry = corral.Retry(attempts=2, backoff=tick)
            gathered = corral.gather(fn, work, limit=limiter, return_exceptions=True, retries=retry)
            try:
                async with asyncio.timeout(None if cut is None else cut * tick):
                    await gathered
            except TimeoutError:
                pass

        async def user(arrival: int, item: tuple[str, int, bool]) -> None:
            await asyncio.sleep(arrival * tick)
            try:
                async with limiter.for_item(item):
                    await body(*item)
            except corral.RetryAfter:
                pass

        cut = rng.choice([None, rng.randrange(30)])
        async with asyncio.timeout(3600):  # a hang guard, not the assertion
            await asyncio.gather(
                *(one_map(items(), cut if i == 0 else None) for i in range(3)),
                *(user(rng.randrange(30), item) for item in items()),
            )
        for key in "ab":
            assert peak[key] <= limit
            assert conforms(began[key], rate), (key, sorted(began[key]))
        assert (limiter.in_flight, limiter.waiting) == (0, 0)

    run(main, virtual_time=True)


_SPECS = {
    "plain": Rate(10),
    "weighted": Rate({"requests": 10, "tokens": 100}),
    "two windows": [Rate(10), Rate(100, per=60)],
    "auto": "auto",
}
# When the next start is due after one at 0: the tighter window is 100 a minute;
# rate="auto" starts at one a second.
_NEXT = {"plain": 0.1, "weighted": 0.1, "two windows": 0.6, "auto": 1.0}


@pytest.mark.virtual_time
@pytest.mark.parametrize("spec", list(_SPECS))
@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("limit", [None, 3])
async def test_a_failing_map_gives_back_the_rate_slots_of_the_calls_it_cancels(
    spec: str, keyed: bool, limit: int | None
) -> None:
    """The first call fails while five more wait for their rate slots: the map
    cancels them, and the next caller starts at the slot right after the failed one."""

    async def fn(item: int) -> None:
        if item == 0:
            await asyncio.sleep(0.05)
            raise ValueError("boom")
        await asyncio.sleep(1.0)

    limiter = Limiter(limit, rate=_SPECS[spec], key=(lambda item: "k") if keyed else None)
    with pytest.raises(ValueError, match="boom"):
        await corral.gather(fn, range(6), limit=limiter)
    assert (limiter.in_flight, limiter.waiting) == (0, 0)
    async with limiter.for_item(0):
        assert now() == pytest.approx(_NEXT[spec])


def test_a_keyed_weighted_limiter_serves_the_next_run_after_one_cut_midway() -> None:
    """A keyed Limiter with a weighted rate made once, a run cut with callers in line
    for slots and rate, then another run: it starts at once and finishes."""
    limiter = Limiter(2, rate=Rate({"requests": 10, "tokens": 100}), key=lambda item: item[0])
    items = [(key, i) for i in range(10) for key in "ab"]

    async def fn(item: tuple[str, int]) -> dict[str, dict[str, int]]:
        await asyncio.sleep(0.05)
        return {"usage": {"tokens": 1}}

    async def gather() -> list[Any]:
        return await corral.gather(
            fn,
            items,
            limit=limiter,
            cost=lambda item: {"tokens": 50},
            usage=lambda result: result["usage"],
        )

    async def cut() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await gather()
        assert (limiter.in_flight, limiter.waiting) == (0, 0)

    async def whole() -> None:
        async with asyncio.timeout(60):  # a hang guard
            assert len(await gather()) == len(items)
        assert (limiter.in_flight, limiter.waiting) == (0, 0)

    run(cut, virtual_time=True)
    run(whole, virtual_time=True)


# -- a 429's rate-limit headers in a map ---------------------------------------------------------


class _Response:
    status_code = 429
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "5s"}


class HTTPStatusError(Exception):
    """httpx's error for a 429 (duck-typed: a response with its status and headers)."""

    def __init__(self) -> None:
        super().__init__("429 Too Many Requests")
        self.response = _Response()


@pytest.mark.virtual_time
@pytest.mark.parametrize("kind", ["plain", "keyed", "auto", "map's own rate"])
async def test_a_429_in_a_map_clamps_a_plain_rate_as_it_does_a_weighted_one(kind: str) -> None:
    """The server says no request is left for 5 s: the next start waits for it, on a
    Limiter with Rate(10) as on one with Rate({"requests": 10}), and on a map's own rate."""
    limit: Any
    if kind == "map's own rate":
        limit, rate = 5, Rate(10)
    else:
        key = (lambda item: "k") if kind == "keyed" else None
        limit = Limiter("auto" if kind == "auto" else 5, rate=Rate(10), key=key)
        rate = None
    starts: list[float] = []

    async def fn(item: int) -> None:
        starts.append(now())
        if len(starts) == 1:
            raise HTTPStatusError()

    retry = corral.Retry(attempts=2, backoff=0.01, jitter=False)
    await corral.gather(fn, range(3), limit=limit, rate=rate, retries=retry)
    assert starts[1] >= 5.0, starts


# -- arrival order at the end of a cooldown -------------------------------------------------------


class _EarlyTimerLoop(VirtualClockLoop):
    """Runs timers up to 1 ms early, as loops with a coarse clock do (uvloop rounds
    delays to whole milliseconds; asyncio runs timers due within its clock resolution)."""

    def __init__(self) -> None:
        super().__init__()
        self._clock_resolution = 0.001


def _run_early(main: Any) -> Any:
    with asyncio.Runner(loop_factory=_EarlyTimerLoop) as runner:
        return runner.run(main())


def test_callers_queued_through_a_cooldown_start_in_arrival_order_on_a_coarse_clock() -> None:
    """A rate-only Limiter pauses; eight callers line up meanwhile. The timer ending the
    pause runs half a millisecond early: they still start in the order they came."""

    async def main() -> list[int]:
        limiter = Limiter(rate=Rate(1000))
        order: list[int] = []

        async def caller(i: int) -> None:
            async with limiter:
                order.append(i)

        limiter.cooldown(1.0)
        tasks = []
        for i in range(8):
            tasks.append(asyncio.create_task(caller(i)))
            await asyncio.sleep(0.01)
        # Wakes the loop at 0.9995: the 1.0 timer ending the pause runs with it.
        asyncio.get_running_loop().call_at(0.9995, lambda: None)
        async with asyncio.timeout(60):  # a hang guard
            await asyncio.gather(*tasks)
        assert (limiter.in_flight, limiter.waiting) == (0, 0)
        return order

    assert _run_early(main) == list(range(8))


@pytest.mark.parametrize("early", [False, True])
def test_callers_handed_a_slot_as_a_cooldown_begins_start_after_it_in_arrival_order(
    early: bool,
) -> None:
    """Eight callers are handed a slot in the instant a cooldown begins: they sit it
    out, then start in the order they came, on an exact clock and on a coarse one."""

    async def main() -> list[int]:
        limiter = Limiter(8, rate=Rate(1000))
        order: list[int] = []
        release = asyncio.Event()

        async def holder() -> None:
            async with limiter:
                await release.wait()

        async def caller(i: int) -> None:
            async with limiter:
                order.append(i)
                assert now() >= 1.0 - 0.001

        holders = [asyncio.create_task(holder()) for _ in range(8)]
        await asyncio.sleep(0.1)
        tasks = []
        for i in range(8):
            tasks.append(asyncio.create_task(caller(i)))
            await asyncio.sleep(0.01)
        release.set()
        await asyncio.sleep(0)  # the holders give their slots to the callers...
        limiter.cooldown(1.0 - now())  # ...which have not resumed yet: they sit it out
        if early:
            asyncio.get_running_loop().call_at(0.9995, lambda: None)
        async with asyncio.timeout(60):  # a hang guard
            await asyncio.gather(*holders, *tasks)
        assert (limiter.in_flight, limiter.waiting) == (0, 0)
        return order

    order = _run_early(main) if early else run(main, virtual_time=True)
    assert order == list(range(8))


# Seeds 458 and 769 found the callers lined up through a cooldown starting in any order.
@pytest.mark.parametrize("seed", [*range(40), 458, 769])
def test_callers_start_in_arrival_order_through_cooldowns_drops_costs_and_cancellations(
    seed: int,
) -> None:
    """Callers of one Limiter (no rate, a plain, weighted or two-window rate; a fixed,
    adaptive or no limit) arrive one by one; some report drops or Retry-After, some
    settle refunds or debts, some are cancelled while in line: the others start in
    the order they came, and nothing stays held."""
    rng = random.Random(seed)
    kind = rng.choice(["plain", "weighted", "list", "none"])
    burst = rng.choice(_BURSTS)
    rate = None if kind == "none" else _rate_of(kind, burst)
    limit = rng.choice([1, 2, 3, Adaptive(initial=2, min=1, max=4), *([None] if rate else [])])
    tick = 0.01

    async def main() -> None:
        limiter = Limiter(limit, rate=rate)
        order: list[int] = []

        async def caller(i: int, hold: int, throttled: bool, costed: bool) -> None:
            cost = (
                {"tokens": rng.randrange(30)} if costed and kind in ("weighted", "list") else None
            )
            await limiter.acquire(cost)
            order.append(i)
            try:
                await asyncio.sleep(hold * tick)
                if throttled:
                    limiter.record_error(0.0, corral.RetryAfter(rng.choice([0.05, 0.3])))
                elif limiter.adaptive is not None:
                    limiter.record(hold * tick, rng.choice(["success", "drop"]))
                if cost is not None:
                    limiter.settle(cost, {"tokens": rng.randrange(60)})
            finally:
                limiter.release()

        tasks: list[asyncio.Task[None]] = []
        for i in range(rng.randrange(5, 30)):
            if rng.random() < 0.5:
                await asyncio.sleep(rng.randrange(3) * tick)
            tasks.append(
                asyncio.create_task(
                    caller(i, rng.randrange(10), rng.random() < 0.1, rng.random() < 0.7)
                )
            )
            await asyncio.sleep(0)  # in line before the next arrives
            if rng.random() < 0.15:
                victim = rng.randrange(len(tasks))
                if victim not in order:
                    tasks[victim].cancel()
        _, pending = await asyncio.wait(tasks, timeout=600)
        assert not pending, f"{len(pending)} callers left waiting: {limiter!r}"
        assert order == sorted(order)
        assert (limiter.in_flight, limiter.waiting) == (0, 0)

    run(main, virtual_time=True)
