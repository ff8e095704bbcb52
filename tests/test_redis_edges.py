"""The Redis-backed Limiter at its edges: restarts, flushed scripts, cooldowns, threads."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import shutil
import threading
from pathlib import Path

import pytest

import corral
from corral._redis import RedisLimiter
from test_redis_limiter import (  # the server fixture and the helpers reading Redis
    _free_port,
    _holders,
    _holders_are,
    _name,
    _redis_server,
    _shutdown,
    _until,
    redis_url,
)

__all__ = ["redis_url"]  # a fixture: used by name


def _server_on(port: int, workdir: Path) -> contextlib.AbstractContextManager[str]:
    """A redis-server of our own on ``port`` (loopback, no persistence), stopped on exit."""
    binary = shutil.which("redis-server")
    assert binary is not None  # the redis_url fixture skipped (or failed) the test otherwise
    return _redis_server(binary, workdir, port)


# ---------------------------------------------------------------------------
# Redis restarted without its data, scripts flushed
# ---------------------------------------------------------------------------


def test_leases_lost_in_a_redis_restart_are_taken_back(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarts empty while a process holds slots: its next renewal counts them
    again, so another process does not get them too (the cap holds across the restart)."""
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    name = _name()

    async def main() -> None:
        holder = corral.Limiter(limit=2, redis=url, name=name, lease=0.6)
        other = corral.Limiter(limit=2, redis=url, name=name, lease=0.6)
        async with asyncio.timeout(10):
            await holder.acquire()
            await holder.acquire()
            _shutdown(port)  # the data goes with it (no persistence)
            with _server_on(port, tmp_path):
                assert await _holders(url, name) == 0
                # Renewals come every 0.2 s: both leases are back soon.
                await _until(_holders_are(url, name, 2), "leases taken back")
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.3):
                        await other.acquire()  # the cap is full: it must wait
                holder.release()
                await other.acquire()  # a release lets it in
                other.release()
                holder.release()
                await holder.aclose()
                await other.aclose()
                assert await _holders(url, name) == 0

    with _server_on(port, tmp_path), caplog.at_level(logging.WARNING, logger="corral"):
        asyncio.run(main())
    assert any("Redis had lost 2 lease(s)" in r.getMessage() for r in caplog.records)


def test_a_slot_released_while_its_renewal_is_on_the_way_is_not_taken_back(
    redis_url: str,
) -> None:
    """A release reaching Redis just before a renewal naming the same slot: the renewal
    must not hold that slot again until its lease ends."""
    name = _name()
    limiter = corral.Limiter(limit=2, redis=redis_url, name=name, lease=3.0)
    assert isinstance(limiter, RedisLimiter)

    async def main() -> None:
        async with asyncio.timeout(10):
            await limiter.acquire()
            b = limiter._binding
            assert b is not None
            renew = b.renew
            renewed = asyncio.Event()

            async def release_first(**kwargs: object) -> object:
                # The renewal has read the slots held; the release overtakes it.
                limiter.release()
                await _until(_holders_are(redis_url, name, 0), "released")
                reply = await renew(**kwargs)  # type: ignore[arg-type]
                renewed.set()
                return reply

            b.renew = release_first  # type: ignore[assignment]
            await renewed.wait()  # a third of the lease
            # Held again by the renewal, it would stay held for the whole lease (3 s).
            await _until(_holders_are(redis_url, name, 0), "released again", timeout=1.0)
            await limiter.aclose()

    asyncio.run(main())


async def test_scripts_are_loaded_again_after_script_flush(redis_url: str) -> None:
    """SCRIPT FLUSH (as after a restart): each script is loaded again when next used."""
    import redis.asyncio as aioredis

    name = _name()
    limiter = corral.Limiter(limit=1, rate="1000/s", redis=redis_url, name=name)
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with asyncio.timeout(10):
            await limiter.acquire()
            await client.script_flush()
            limiter.release()
            await _until(_holders_are(redis_url, name, 0), "released")
            await client.script_flush()
            await limiter.acquire()
            limiter.release()
            await client.script_flush()
            limiter.cooldown(0.05)
            await limiter.acquire()
            limiter.release()
    finally:
        await limiter.aclose()
        await client.aclose()
    assert await _holders(redis_url, name) == 0


# ---------------------------------------------------------------------------
# A cooldown and the callers already waiting for the rate
# ---------------------------------------------------------------------------


async def test_callers_held_back_by_a_cooldown_start_at_the_rate_pace(redis_url: str) -> None:
    """Callers booked for the rate when a cooldown began start after it one interval
    apart, as with the in-process Limiter, not all at once at its end (a burst)."""
    name = _name()
    limiter = corral.Limiter(limit=50, rate=corral.Rate(1, per=0.2), redis=redis_url, name=name)
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def start() -> None:
        await limiter.acquire()
        starts.append(loop.time())

    async with asyncio.timeout(10):
        await start()  # the first start: at once
        began = loop.time()
        callers = [asyncio.create_task(start()) for _ in range(4)]  # booked 0.2 s apart
        while limiter.waiting < 4:
            await asyncio.sleep(0.001)
        limiter.cooldown(0.5)
        await asyncio.gather(*callers)
        await start()  # a newcomer after the cooldown comes after them
    for _ in starts:
        limiter.release()
    await limiter.aclose()
    # Lower bounds only, each from the cooldown's end: a start woken late on a busy
    # machine cannot fail them (gaps between neighbours could, after a late one).
    after = [t - began for t in starts[1:]]
    assert all(t >= 0.5 + 0.2 * k - 0.03 for k, t in enumerate(after)), after
    assert await _holders(redis_url, name) == 0


@pytest.mark.parametrize(("limit", "rate"), [(5, None), (None, corral.Rate(100, burst=10))])
async def test_a_cooldown_begun_here_holds_back_the_next_acquire_at_once(
    redis_url: str, limit: int | None, rate: corral.Rate | None
) -> None:
    """acquire() right after cooldown(), before the announcement has reached Redis (it is
    sent in the background): not granted inside the cooldown."""
    name = _name()
    limiter = corral.Limiter(limit=limit, rate=rate, redis=redis_url, name=name)
    assert isinstance(limiter, RedisLimiter)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        await limiter.acquire()  # connected, nothing else in flight
        limiter.release()
        b = limiter._binding
        assert b is not None
        cool = b.cool
        sent = asyncio.Event()

        async def held_back(**kwargs: object) -> object:
            await sent.wait()  # a slow link: the announcement is still on its way
            return await cool(**kwargs)  # type: ignore[arg-type]

        b.cool = held_back  # type: ignore[assignment]
        began = loop.time()
        limiter.cooldown(0.3)
        try:
            await limiter.acquire()
            assert loop.time() - began >= 0.3 - 0.01
        finally:
            sent.set()
        limiter.release()
    await limiter.aclose()
    assert await _holders(redis_url, name) == 0


@pytest.mark.parametrize("limit", [50, None])
async def test_after_a_cooldown_the_rate_starts_empty_not_with_a_burst(
    redis_url: str, limit: int | None
) -> None:
    """As with the in-process Limiter (a server with nothing left until the end of the
    pause): after a cooldown the first start comes at its end, the next at the rate's
    pace, even when the rate allows a burst."""
    name = _name()
    rate = corral.Rate(5, per=1.0, burst=3)  # one start per 0.2 s, 3 back to back
    limiter = corral.Limiter(limit=limit, rate=rate, redis=redis_url, name=name)
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def start() -> None:
        await limiter.acquire()
        starts.append(loop.time())

    async with asyncio.timeout(10):
        began = loop.time()
        limiter.cooldown(0.3)
        await asyncio.gather(*(start() for _ in range(3)))
    for _ in starts:
        limiter.release()
    await limiter.aclose()
    # Lower bounds only, from the cooldown's end (see the test above).
    after = [t - began for t in starts]
    assert all(t >= 0.3 + 0.2 * k - 0.03 for k, t in enumerate(after)), after
    assert await _holders(redis_url, name) == 0


# ---------------------------------------------------------------------------
# Event loops: two at once refused; nothing left pending when one ends
# ---------------------------------------------------------------------------


def test_two_event_loops_at_once_in_two_threads_are_refused(redis_url: str) -> None:
    """A loop in another thread holds a slot: this loop's use fails with RuntimeError (as
    with the in-process Limiter), leaving that thread's slot and count alone."""
    name = _name()
    limiter = corral.Limiter(limit=5, redis=redis_url, name=name)
    holding, done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    async def hold() -> None:
        await limiter.acquire()
        holding.set()
        while not done.is_set():
            await asyncio.sleep(0.005)
        limiter.release()

    def thread_main() -> None:
        try:
            asyncio.run(hold())
        except BaseException as exc:
            errors.append(exc)
            holding.set()

    thread = threading.Thread(target=thread_main)
    thread.start()
    try:
        assert holding.wait(10)

        async def use_here() -> None:
            async with asyncio.timeout(10):
                await limiter.acquire()

        with pytest.raises(RuntimeError, match=r"in use by an event loop running in another"):
            asyncio.run(use_here())
        assert limiter.in_flight == 1  # the other thread's slot, still counted
    finally:
        done.set()
        thread.join(10)
    assert not thread.is_alive()
    assert errors == []
    assert asyncio.run(_holders(redis_url, name)) == 0


def test_a_loop_ending_mid_use_leaves_no_task_pending(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncio.run ends with slots held, a caller in line, a caller waiting for its rate
    slot and a cooldown to send: nothing is left pending or destroyed, all is given back."""
    name = _name()
    limiter = corral.Limiter(limit=2, rate=corral.Rate(1, per=30), redis=redis_url, name=name)

    async def main() -> None:
        await limiter.acquire()
        waiting_rate = asyncio.create_task(limiter.acquire())  # slot granted, rate 30 s away
        in_line = asyncio.create_task(limiter.acquire())  # no slot left
        while limiter.waiting < 2:
            await asyncio.sleep(0.001)
        limiter.cooldown(0.01)
        assert not waiting_rate.done()
        assert not in_line.done()

    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        asyncio.run(main())
        gc.collect()
    assert not [r for r in caplog.records if "pending" in r.getMessage()]
    assert limiter.in_flight == 0
    assert asyncio.run(_holders(redis_url, name)) == 0


async def test_callers_giving_up_behind_one_who_waits_on_leave_no_trace(redis_url: str) -> None:
    """Callers who time out in a line that does not move (the cap held elsewhere) are
    forgotten, not kept until the line moves: memory stays bounded."""
    name = _name()
    holder = corral.Limiter(limit=1, redis=redis_url, name=name, lease=30)
    limiter = corral.Limiter(limit=1, redis=redis_url, name=name, lease=30)
    assert isinstance(limiter, RedisLimiter)
    async with asyncio.timeout(10):
        await holder.acquire()
        first = asyncio.create_task(limiter.acquire())  # waits on, at the head of the line
        while limiter.waiting < 1:
            await asyncio.sleep(0.001)
        for _ in range(200):
            gone = asyncio.create_task(limiter.acquire())
            await asyncio.sleep(0)  # in line
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
        b = limiter._binding
        assert b is not None
        assert limiter.waiting == 1
        assert len(b.waiters) <= 2 + 16
        holder.release()
        await first  # still served
        limiter.release()
    await holder.aclose()
    await limiter.aclose()
    assert await _holders(redis_url, name) == 0


# ---------------------------------------------------------------------------
# Arguments and cooldown caps
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/-1", "redis://127.0.0.1:6379/0?db=-2"])
def test_a_negative_database_is_refused_at_once(url: str) -> None:
    """Redis would refuse db -1 only at the first call (inside a map): refused now."""
    with pytest.raises(ValueError, match=r"\(the database must be a number >= 0, not -[12]\)$"):
        corral.Limiter(limit=1, redis=url, name="x")


async def test_a_retry_after_past_the_cap_pauses_every_process_for_the_cap(
    redis_url: str,
) -> None:
    """A Retry-After of an hour seen by one worker pauses all for MAX_COOLDOWN (120 s),
    as on the in-process Limiter; a shorter one given after changes nothing."""
    import redis.asyncio as aioredis

    name = _name()
    limiter = corral.Limiter(limit=2, redis=redis_url, name=name)
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with asyncio.timeout(10):
            limiter.record_error(0.0, corral.RetryAfter(3600))
            limiter.record_error(0.0, corral.RetryAfter(5))
            await limiter.aclose()  # the announcements have reached Redis
            now_s, now_us = await client.time()
            until = await client.hget(f"corral:{{{name}}}:cool", "until")
            assert until is not None
            left = (int(until) - now_s * 1_000_000 - now_us) / 1e6
            assert 110 < left <= 120
            ttl = await client.pttl(f"corral:{{{name}}}:cool")
            assert 0 < ttl <= (120 + 12 + 2) * 1000  # it expires: nothing left for ever
    finally:
        await client.aclose()
