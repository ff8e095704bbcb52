"""The Redis-backed Limiter at its edges: restarts, flushed scripts, cooldowns, threads."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import corral
from corral._redis import _ACQUIRE, RedisLimiter
from test_redis_limiter import (  # the server fixture and the helpers reading Redis
    _free_port,
    _holders,
    _holders_are,
    _name,
    _queue_holds,
    _redis_server,
    _shutdown,
    _tat,
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


# ---------------------------------------------------------------------------
# Cancelled as Redis grants; callers giving up mid-line; Redis out for a while
# ---------------------------------------------------------------------------


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


class _ReplyHolder:
    """A loopback TCP proxy to a Redis that, once armed, holds back the reply to the next
    command naming ``marker`` (a script's SHA): Redis has run it, the client still waits."""

    def __init__(self, port: int, marker: bytes) -> None:
        self._port = port
        self._marker = marker
        self._armed = False
        self.replied = asyncio.Event()  # Redis answered the command held back
        self._let_go = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.url = ""

    def arm(self) -> None:
        self._armed = True

    def let_go(self) -> None:
        """Pass the reply held back on to the client."""
        self._let_go.set()

    async def __aenter__(self) -> _ReplyHolder:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers += [writer, up_writer]
        holding = [False]  # this connection's next reply is held back
        for pipe in (
            self._to_redis(reader, up_writer, holding),
            self._to_client(up_reader, writer, holding),
        ):
            self._tasks.add(asyncio.create_task(pipe))

    async def _to_redis(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, holding: list[bool]
    ) -> None:
        tail = b""  # the marker may straddle two reads
        try:
            while data := await reader.read(65536):
                if self._armed and self._marker in tail + data:
                    self._armed = False
                    holding[0] = True
                tail = data[-len(self._marker) :]
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _to_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, holding: list[bool]
    ) -> None:
        try:
            while data := await reader.read(65536):
                if holding[0]:
                    self.replied.set()
                    await self._let_go.wait()
                    holding[0] = False
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("limit", [2, None])
async def test_an_acquire_cancelled_as_redis_grants_it_gives_back_slot_and_rate(
    redis_url: str, limit: int | None
) -> None:
    """Cancelled after Redis ran the script granting it, before the reply came: the
    caller gives back its slot and its rate start (no later start was booked on it)."""
    name = _name()
    sha = hashlib.sha1(_ACQUIRE.encode()).hexdigest().encode()
    held = 1 if limit else 0  # the first caller's slot (a rate-only Limiter has none)
    async with _ReplyHolder(_port_of(redis_url), sha) as proxy, asyncio.timeout(10):
        rate = corral.Rate(1, per=60)
        limiter = corral.Limiter(limit=limit, rate=rate, redis=proxy.url, name=name)
        await limiter.acquire()  # connected, the scripts loaded; the first start, at once
        booked = await _tat(redis_url, name)
        proxy.arm()
        caller = asyncio.create_task(limiter.acquire())
        await proxy.replied.wait()  # granted in Redis: a slot, and the start 60 s on
        assert await _holders(redis_url, name) == 2 * held
        assert await _tat(redis_url, name) != booked
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        proxy.let_go()

        async def given_back() -> bool:
            tat_back = await _tat(redis_url, name) == booked
            return tat_back and await _holders(redis_url, name) == held

        await _until(given_back, "the slot and the rate start given back")
        assert limiter.in_flight == 1
        assert limiter.waiting == 0
        limiter.release()
        await limiter.aclose()
    assert await _holders(redis_url, name) == 0


async def test_a_caller_leaving_mid_line_lowers_what_its_process_wants_at_once(
    redis_url: str,
) -> None:
    """A caller giving up in a line that goes on (callers left behind or ahead of it): its
    process wants one slot less in the shared queue now, not at its next ask (a third of
    a lease away), during which that slot would be held back from processes behind it."""
    import redis.asyncio as aioredis

    name = _name()
    holder = corral.Limiter(limit=1, redis=redis_url, name=name, lease=30)
    limiter = corral.Limiter(limit=1, redis=redis_url, name=name, lease=30)
    client = aioredis.Redis.from_url(redis_url)

    def wanting(n: int) -> Callable[[], Awaitable[bool]]:
        async def condition() -> bool:
            wants = await client.hgetall(f"corral:{{{name}}}:wants")
            return [int(w) for w in wants.values()] == [n]

        return condition

    try:
        async with asyncio.timeout(10):
            await holder.acquire()
            first = asyncio.create_task(limiter.acquire())
            await _until(_queue_holds(redis_url, name, 1), "queued")
            behind = [asyncio.create_task(limiter.acquire()) for _ in range(2)]
            while limiter.waiting < 3:
                await asyncio.sleep(0.001)  # until both are in line behind `first`
            # A release anywhere wakes the process, which asks again for all three.
            await client.publish(f"corral:{{{name}}}:released", 0)
            await _until(wanting(3), "three slots wanted")
            behind[0].cancel()  # in the middle of the line
            with pytest.raises(asyncio.CancelledError):
                await behind[0]
            await _until(wanting(2), "two slots wanted", timeout=2.0)
            first.cancel()  # at its head
            with pytest.raises(asyncio.CancelledError):
                await first
            await _until(wanting(1), "one slot wanted", timeout=2.0)
            holder.release()
            await behind[1]  # the one left is served
            assert limiter.in_flight == 1
            limiter.release()
            await _until(_queue_holds(redis_url, name, 0), "the queue empty")
    finally:
        await client.aclose()
        await holder.aclose()
        await limiter.aclose()
    assert await _holders(redis_url, name) == 0


class _FailedAsks:
    """Counts a Limiter's asks for slots that failed because Redis could not be reached."""

    def __init__(self, limiter: corral.Limiter) -> None:
        import redis.exceptions

        assert isinstance(limiter, RedisLimiter)
        b = limiter._binding
        assert b is not None  # used once already
        acquire = b.acquire
        self.n = 0

        async def counted(**kwargs: Any) -> Any:
            try:
                return await acquire(**kwargs)
            except redis.exceptions.ConnectionError:
                self.n += 1
                raise

        b.acquire = counted  # type: ignore[assignment]

    def at_least(self, n: int) -> Callable[[], Awaitable[bool]]:
        async def condition() -> bool:
            return self.n >= n

        return condition


def test_callers_waiting_for_a_slot_ride_out_a_brief_redis_outage(
    redis_url: str, tmp_path: Path
) -> None:
    """Redis stopped, then started again on its port: callers in line, a caller asking
    with nobody ahead of it and a caller booking a rate start all ask again, backing off,
    and are served once Redis is back, none failed meanwhile."""
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    name = _name()

    async def main() -> None:
        holder = corral.Limiter(limit=1, redis=url, name=name, lease=30)
        limiter = corral.Limiter(limit=1, redis=url, name=name, lease=30)
        alone = corral.Limiter(limit=1, redis=url, name=_name(), lease=30)
        rated = corral.Limiter(rate="100/s", redis=url, name=_name(), lease=30)
        async with asyncio.timeout(20):
            await holder.acquire()
            for other in (alone, rated):  # connected once
                await other.acquire()
                other.release()
            in_line = [asyncio.create_task(limiter.acquire()) for _ in range(2)]
            await _until(_queue_holds(url, name, 1), "queued")
            failed = [_FailedAsks(each) for each in (limiter, alone, rated)]
            _shutdown(port)
            newcomers = [asyncio.create_task(each.acquire()) for each in (alone, rated)]
            for each in failed:
                await _until(each.at_least(2), "asked again after a failure")
            assert not [t for t in (*in_line, *newcomers) if t.done()]
            holder.release()  # sent once Redis is back
            with _server_on(port, tmp_path):  # back, empty, on the same port
                await asyncio.gather(*newcomers)
                await in_line[0]
                assert not in_line[1].done()  # the cap is 1: it waits its turn
                limiter.release()
                await in_line[1]
                for each in (limiter, alone, rated):
                    each.release()
                    await each.aclose()
                await holder.aclose()
                assert await _holders(url, name) == 0

    with _server_on(port, tmp_path):
        asyncio.run(main())


def test_callers_give_up_once_redis_has_been_unreachable_for_a_lease(
    redis_url: str, tmp_path: Path
) -> None:
    """Redis gone for good: the callers in line fail a lease after the outage began, with
    an error naming the Redis address; a caller coming just after fails at once."""
    import redis.exceptions

    port = _free_port()
    name = _name()

    async def main(url: str) -> None:
        loop = asyncio.get_running_loop()
        holder = corral.Limiter(limit=1, redis=url, name=name, lease=1.0)
        limiter = corral.Limiter(limit=1, redis=url, name=name, lease=1.0)
        async with asyncio.timeout(10):
            await holder.acquire()
            waiters = [asyncio.create_task(limiter.acquire()) for _ in range(2)]
            await _until(_queue_holds(url, name, 1), "queued")
            failed = _FailedAsks(limiter)
            _shutdown(port)
            began = loop.time()
            await _until(failed.at_least(1), "an ask failed")
            for waiter in waiters:
                with pytest.raises(redis.exceptions.ConnectionError) as info:
                    await waiter
                message = str(info.value)
                assert f"Redis at {url} could not be reached" in message
                assert "(lease=1)" in message
            assert loop.time() - began >= 1.0
            # Redis was just seen down for a lease: no second lease of waiting.
            with pytest.raises(redis.exceptions.ConnectionError, match="could not be reached"):
                async with asyncio.timeout(0.9):
                    await limiter.acquire()
            assert limiter.waiting == 0
            assert limiter.in_flight == 0
            await holder.aclose()
            await limiter.aclose()

    with _server_on(port, tmp_path) as url:
        asyncio.run(main(url))
