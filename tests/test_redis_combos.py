"""The Redis-backed Limiter combined with maps: shared names, cancelled maps, a lost server."""

from __future__ import annotations

import asyncio
import bisect
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import corral
from test_redis_edges import _server_on
from test_redis_limiter import (  # the server fixture and the helpers reading Redis
    _free_port,
    _holders,
    _holders_are,
    _name,
    _queue_holds,
    _queued,
    _run_children,
    _shutdown,
    _until,
    redis_url,
)

__all__ = ["redis_url"]  # a fixture: used by name


class _Running:
    """Counts the calls running at once and when each started (loop time)."""

    def __init__(self, seconds: float = 0.01) -> None:
        self.seconds = seconds
        self.now = 0
        self.peak = 0
        self.starts: list[float] = []

    async def __call__(self, item: int) -> int:
        self.starts.append(asyncio.get_running_loop().time())
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.now -= 1
        return item


def _busiest(starts: list[float], window: float) -> int:
    """The most starts in any closed window of ``window`` seconds."""
    ordered = sorted(starts)
    return max(bisect.bisect_right(ordered, t + window) - i for i, t in enumerate(ordered))


# ---------------------------------------------------------------------------
# One name, a cap and a rate, several maps
# ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_two_maps_on_one_name_keep_both_the_cap_and_the_rate(redis_url: str) -> None:
    """Two Limiters of one name (cap 3, 40/s) under two maps at once: together they keep
    both, and each item runs once."""
    name = _name()
    first = corral.Limiter(limit=3, rate=corral.Rate(40, per=1.0), redis=redis_url, name=name)
    second = corral.Limiter(limit=3, rate=corral.Rate(40, per=1.0), redis=redis_url, name=name)
    spy = _Running(0.1)  # at 40/s, four would run at once without the cap
    async with asyncio.timeout(60):
        a, b = await asyncio.gather(
            corral.gather(spy, range(30), limit=first),
            corral.gather(spy, range(30, 60), limit=second),
        )
    assert a == list(range(30))
    assert b == list(range(30, 60))
    assert 2 <= spy.peak <= 3
    # GCRA: at most 1 + 40 starts in any closed second; two budgets would allow about 80.
    # Room for wake-ups late on a loaded machine: starts a stall held back bunch up.
    assert _busiest(spy.starts, 1.0) <= 41 + 12
    for limiter in (first, second):
        await limiter.aclose()
    assert await _holders(redis_url, name) == 0


_COMBO_CHILD = """
import asyncio, json, sys, time
import corral
import redis.asyncio as aioredis

url, name, start, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
peak = 0
starts = []

async def main():
    limiter = corral.Limiter(limit=4, rate=corral.Rate(100, per=1.0), redis=url, name=name)
    client = aioredis.Redis.from_url(url)
    counter = f"{name}:running"

    async def call(i):
        global peak
        starts.append(time.monotonic())
        peak = max(peak, await client.incr(counter))  # counted in Redis: seen by both
        await asyncio.sleep(0.02)
        await client.decr(counter)
        return i

    await asyncio.sleep(max(0.0, start - time.monotonic()))
    assert await corral.gather(call, range(n), limit=limiter) == list(range(n))
    await client.aclose()
    await limiter.aclose()

asyncio.run(main())
print(json.dumps({"peak": peak, "starts": starts}))
"""


@pytest.mark.slow
def test_two_processes_on_one_name_keep_both_the_cap_and_the_rate(redis_url: str) -> None:
    """Two processes, each a map on a Limiter of one name with limit=4 and 100/s."""
    name, per_process = _name(), 100
    start = time.monotonic() + 2.0  # both processes ready: they start together
    results = _run_children(
        _COMBO_CHILD, [redis_url, name, str(start), str(per_process)], n=2, timeout=120
    )
    assert max(r["peak"] for r in results) <= 4
    starts = [t for r in results for t in r["starts"]]
    assert len(starts) == 2 * per_process
    # The cap allows at most 4 / 0.02 s = 200/s: the rate is what holds them at 100.
    # Room for wake-ups late on a loaded machine (starts a stall held back bunch up);
    # two budgets would allow about 200.
    assert _busiest(starts, 1.0) <= 101 + 30
    assert asyncio.run(_holders(redis_url, name)) == 0


# ---------------------------------------------------------------------------
# A map cancelled while its calls wait for the shared budget
# ---------------------------------------------------------------------------


async def test_a_map_cancelled_while_waiting_for_a_slot_leaves_nothing_behind(
    redis_url: str,
) -> None:
    """Its workers in line for slots another Limiter holds: cancelled, they leave the line
    and hold nothing; the holder's releases go to the next map."""
    name = _name()
    holder = corral.Limiter(limit=2, redis=redis_url, name=name)
    limiter = corral.Limiter(limit=2, redis=redis_url, name=name)
    spy = _Running()
    async with asyncio.timeout(30):
        await holder.acquire()
        await holder.acquire()
        waiting = asyncio.create_task(corral.gather(spy, range(5), limit=limiter))
        await _until(_queue_holds(redis_url, name, 1), "in line")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert spy.starts == []
        assert (limiter.waiting, limiter.in_flight) == (0, 0)
        await _until(_queue_holds(redis_url, name, 0), "out of line")
        holder.release()
        holder.release()
        assert await corral.gather(spy, range(3), limit=limiter) == [0, 1, 2]
        for each in (holder, limiter):
            await each.aclose()
    assert await _holders(redis_url, name) == 0


@pytest.mark.parametrize("limit", [3, None])
async def test_a_map_cancelled_while_waiting_for_the_rate_gives_its_starts_back(
    redis_url: str, limit: int | None
) -> None:
    """One start at once, the next a minute away: cancelled, the map gives back the start
    it booked and the slots it held, and the next start is due at once again."""
    name = _name()
    limiter = corral.Limiter(limit=limit, rate=corral.Rate(1, per=60), redis=redis_url, name=name)
    never = asyncio.Event()
    started: list[int] = []

    async def hang(item: int) -> int:
        started.append(item)
        await never.wait()
        return item

    async with asyncio.timeout(30):
        waiting = asyncio.create_task(corral.gather(hang, range(4), limit=limiter))
        await _until(_started(started, 1), "the first call started")
        await _until(_booked_beyond(redis_url, name, 61), "the next start booked")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert len(started) == 1
        assert (limiter.waiting, limiter.in_flight) == (0, 0)
        # Given back, the next start is the one after the first: within a minute.
        await _until(_booked_within(redis_url, name, 60), "the booked starts given back")
        await _until(_holders_are(redis_url, name, 0), "the slots given back")
        await limiter.aclose()


async def _booked_ahead(url: str, name: str) -> float:
    """Seconds from Redis's now to the rate's next free start for ``name``."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        now_s, now_us = await client.time()
        tat = await client.get(f"corral:{{{name}}}:tat")
        return 0.0 if tat is None else (int(tat) - now_s * 1_000_000 - now_us) / 1e6
    finally:
        await client.aclose()


def _booked_beyond(url: str, name: str, seconds: float) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return await _booked_ahead(url, name) > seconds

    return condition


def _booked_within(url: str, name: str, seconds: float) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return await _booked_ahead(url, name) <= seconds

    return condition


def _started(started: list[int], n: int) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return len(started) >= n

    return condition


def test_a_limiter_serves_the_next_asyncio_run_after_a_map_was_cancelled_in_line(
    redis_url: str,
) -> None:
    """A map cancelled mid-line in one asyncio.run: the next run's map gets every slot."""
    name = _name()
    holder = corral.Limiter(limit=1, redis=redis_url, name=name)
    limiter = corral.Limiter(limit=1, redis=redis_url, name=name)
    spy = _Running()

    async def first() -> None:
        async with asyncio.timeout(30):
            await holder.acquire()
            waiting = asyncio.create_task(corral.gather(spy, range(3), limit=limiter))
            await _until(_queue_holds(redis_url, name, 1), "in line")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        # The loop ends with holder's slot held: given back as the loop shuts down.

    async def second() -> list[int]:
        async with asyncio.timeout(30):
            assert await _holders(redis_url, name) == 0
            assert await _queued(redis_url, name) == 0
            return await corral.gather(spy, range(3), limit=limiter)

    asyncio.run(first())
    assert asyncio.run(second()) == [0, 1, 2]
    assert (limiter.waiting, limiter.in_flight) == (0, 0)
    assert asyncio.run(_holders(redis_url, name)) == 0


# ---------------------------------------------------------------------------
# Redis lost in the middle of a map
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("return_exceptions", [False, True])
def test_a_map_whose_redis_goes_away_ends_with_an_error_naming_it(
    redis_url: str, tmp_path: Path, return_exceptions: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stopped for good mid-map: no hang. The map fails with a ConnectionError naming
    the address (return_exceptions=True: each item left gets it), a lease after the loss."""
    import redis.exceptions

    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    name = _name()
    lease = 0.5

    async def main() -> tuple[list[object], float]:
        limiter = corral.Limiter(limit=2, redis=url, name=name, lease=lease)
        got: list[object] = []
        lost_at = 0.0
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(30):
            async for result in corral.map(
                _Running(), range(200), limit=limiter, return_exceptions=return_exceptions
            ):
                got.append(result)
                if len(got) == 5:
                    _shutdown(port)
                    lost_at = loop.time()
        return got, loop.time() - lost_at

    with _server_on(port, tmp_path), caplog.at_level(logging.WARNING, logger="corral"):
        if not return_exceptions:
            with pytest.raises(redis.exceptions.ConnectionError, match=f"127.0.0.1:{port}"):
                asyncio.run(main())
            return
        got, took = asyncio.run(main())
    assert len(got) == 200
    results = [r for r in got if isinstance(r, int)]
    errors = [r for r in got if isinstance(r, BaseException)]
    assert results == list(range(len(results)))
    assert len(results) >= 5
    assert errors
    assert all(isinstance(e, redis.exceptions.ConnectionError) for e in errors)
    assert f"127.0.0.1:{port}" in str(errors[0])
    assert took < lease + 10  # bounded: not a lease per item
    # What it says it could not give back is what it held: at most the cap, not one
    # slot for every item whose ask for one failed.
    given_up = [
        int(match[1])
        for record in caplog.records
        if (match := re.search(r"give back (\d+) slot\(s\)", record.getMessage()))
    ]
    assert given_up
    assert max(given_up) <= 2


@pytest.mark.parametrize("limit", [3, None])
async def test_a_start_given_back_under_a_later_one_goes_back_with_it(
    redis_url: str, limit: int | None
) -> None:
    """Callers leaving earliest booking first: the first give-back is refused (a start is
    booked on top of it), and goes back once that later start is given back too."""
    name = _name()
    limiter = corral.Limiter(limit=limit, rate=corral.Rate(1, per=60), redis=redis_url, name=name)
    async with asyncio.timeout(30):
        await limiter.acquire()  # the first start, at once; the next is a minute away
        earlier = asyncio.create_task(limiter.acquire())
        await _until(_booked_beyond(redis_url, name, 119), "the second start booked")
        later = asyncio.create_task(limiter.acquire())
        await _until(_booked_beyond(redis_url, name, 179), "the third start booked")
        for caller in (earlier, later):
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            await _until(_sent(limiter), "sent")
            if caller is earlier:  # the later start lies on top of it
                assert await _booked_ahead(redis_url, name) > 179
        assert await _booked_ahead(redis_url, name) <= 60
        assert (limiter.waiting, limiter.in_flight) == (0, 1)
        limiter.release()
        await limiter.aclose()
    assert await _holders(redis_url, name) == 0


def _sent(limiter: corral.Limiter) -> Callable[[], Awaitable[bool]]:
    """Whether the Limiter has nothing left to send to Redis."""

    async def condition() -> bool:
        binding = limiter._binding  # type: ignore[attr-defined]
        return binding.sender is None or binding.sender.done()

    return condition
