"""The Redis-backed Limiter recovering: a grant whose caller left, callers leaving or
arriving mid-ask, Redis out of reach for a while."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import corral
from corral._redis import _ACQUIRE, RedisLimiter
from test_redis_edges import _server_on
from test_redis_limiter import (  # the server fixture and the helpers reading Redis
    _free_port,
    _holders,
    _holders_are,
    _name,
    _queue_holds,
    _shutdown,
    _tat,
    _until,
    redis_url,
)

__all__ = ["redis_url"]  # a fixture: used by name

#: The SHA of the script granting slots, as EVALSHA sends it.
_ACQUIRE_SHA = hashlib.sha1(_ACQUIRE.encode()).hexdigest().encode()


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


# ---------------------------------------------------------------------------
# A loopback proxy holding back chosen replies of Redis
# ---------------------------------------------------------------------------


class _Hold:
    """One reply held back: set ``replied`` once Redis answered, passed on at ``let_go``."""

    def __init__(self) -> None:
        self.replied = asyncio.Event()
        self.released = asyncio.Event()

    def let_go(self) -> None:
        self.released.set()


class _ReplyHolder:
    """A loopback TCP proxy to Redis. Each :meth:`hold` catches the next command naming
    the script that grants slots: Redis runs it, and its reply waits in the proxy until
    the hold lets it go (the client meanwhile waits, as on a slow network)."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._armed: list[_Hold] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.url = ""

    def hold(self) -> _Hold:
        hold = _Hold()
        self._armed.append(hold)
        return hold

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
        holding: list[_Hold] = []  # this connection's next reply, when held back
        for pipe in (
            self._to_redis(reader, up_writer, holding),
            self._to_client(up_reader, writer, holding),
        ):
            self._tasks.add(asyncio.create_task(pipe))

    async def _to_redis(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, holding: list[_Hold]
    ) -> None:
        tail = b""  # the SHA may straddle two reads
        try:
            while data := await reader.read(65536):
                if self._armed and _ACQUIRE_SHA in tail + data:
                    holding.append(self._armed.pop(0))
                tail = data[-len(_ACQUIRE_SHA) :]
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _to_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, holding: list[_Hold]
    ) -> None:
        try:
            while data := await reader.read(65536):
                if holding:  # one command at a time per connection: this is its reply
                    hold = holding.pop(0)
                    hold.replied.set()
                    await hold.released.wait()
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def _waiting(limiter: corral.Limiter, n: int) -> None:
    """Until ``n`` callers of ``limiter`` are inside ``acquire()`` (in line, or for the rate)."""
    assert isinstance(limiter, RedisLimiter)
    for _ in range(2000):
        if limiter.waiting == n:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"not {n} waiting, but {limiter.waiting}")


# ---------------------------------------------------------------------------
# Cancelled as Redis grants
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [2, None])
async def test_an_acquire_cancelled_as_redis_grants_it_gives_back_slot_and_rate(
    redis_url: str, limit: int | None
) -> None:
    """Cancelled after Redis ran the script granting it, before the reply came: the
    caller gives back its slot and its rate start (no later start was booked on it)."""
    name = _name()
    held = 1 if limit else 0  # the first caller's slot (a rate-only Limiter has none)
    async with _ReplyHolder(_port_of(redis_url)) as proxy, asyncio.timeout(10):
        rate = corral.Rate(1, per=60)
        limiter = corral.Limiter(limit=limit, rate=rate, redis=proxy.url, name=name)
        await limiter.acquire()  # connected, the scripts loaded; the first start, at once
        booked = await _tat(redis_url, name)
        hold = proxy.hold()
        caller = asyncio.create_task(limiter.acquire())
        await hold.replied.wait()  # granted in Redis: a slot, and the start 60 s on
        assert await _holders(redis_url, name) == 2 * held
        assert await _tat(redis_url, name) != booked
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        hold.let_go()

        async def given_back() -> bool:
            tat_back = await _tat(redis_url, name) == booked
            return tat_back and await _holders(redis_url, name) == held

        await _until(given_back, "the slot and the rate start given back")
        assert limiter.in_flight == 1
        assert limiter.waiting == 0
        limiter.release()
        await limiter.aclose()
    assert await _holders(redis_url, name) == 0


async def test_aclose_gives_back_what_a_cancelled_caller_was_granted(redis_url: str) -> None:
    """Closed while the reply granting a cancelled caller is still on its way: the close
    waits for it and gives back the slot and the rate start, not leaving them behind."""
    name = _name()
    async with _ReplyHolder(_port_of(redis_url)) as proxy, asyncio.timeout(10):
        rate = corral.Rate(1, per=60)
        limiter = corral.Limiter(limit=2, rate=rate, redis=proxy.url, name=name, lease=30)
        await limiter.acquire()  # the first start, at once
        limiter.release()
        await _until(_holders_are(redis_url, name, 0), "released")
        booked = await _tat(redis_url, name)
        hold = proxy.hold()
        caller = asyncio.create_task(limiter.acquire())
        await hold.replied.wait()  # granted in Redis: a slot, and the start 60 s on
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        closing = asyncio.create_task(limiter.aclose())
        for _ in range(10):
            await asyncio.sleep(0)
        assert not closing.done()  # waiting for the reply
        hold.let_go()
        await closing
        assert limiter.in_flight == 0
    assert await _holders(redis_url, name) == 0
    assert await _tat(redis_url, name) == booked


# ---------------------------------------------------------------------------
# Callers in line: arrival order, callers giving up mid-line
# ---------------------------------------------------------------------------


async def test_callers_refused_together_are_served_in_arrival_order(redis_url: str) -> None:
    """Two callers ask Redis at once and are refused; the first one's refusal comes back
    last. It still goes first in line: the next slot is its own."""
    name = _name()
    async with _ReplyHolder(_port_of(redis_url)) as proxy, asyncio.timeout(10):
        holder = corral.Limiter(limit=1, redis=redis_url, name=name, lease=30)
        limiter = corral.Limiter(limit=1, redis=proxy.url, name=name, lease=30)
        await limiter.acquire()  # connected, the scripts loaded
        limiter.release()
        await holder.acquire()
        hold = proxy.hold()
        first = asyncio.create_task(limiter.acquire())
        await hold.replied.wait()  # refused in Redis, the reply held back
        second = asyncio.create_task(limiter.acquire())  # asks too: nobody is in line yet
        await _waiting(limiter, 1)  # refused, in line
        hold.let_go()
        await _waiting(limiter, 2)
        holder.release()
        await first
        assert not second.done()
        limiter.release()
        await second
        limiter.release()
        await holder.aclose()
        await limiter.aclose()
    assert await _holders(redis_url, name) == 0


async def test_a_slot_granted_to_a_later_caller_goes_to_an_earlier_one_in_line(
    redis_url: str,
) -> None:
    """The first caller is refused, a slot frees, the second is granted it; the first
    one's refusal comes back before the second one's grant. The slot goes to the first
    (in line by then) and the second takes its place in line."""
    name = _name()
    async with _ReplyHolder(_port_of(redis_url)) as proxy, asyncio.timeout(10):
        holder = corral.Limiter(limit=1, redis=redis_url, name=name, lease=30)
        limiter = corral.Limiter(limit=1, redis=proxy.url, name=name, lease=30)
        await limiter.acquire()
        limiter.release()
        await holder.acquire()
        refused = proxy.hold()
        first = asyncio.create_task(limiter.acquire())
        await refused.replied.wait()
        holder.release()
        await _until(_holders_are(redis_url, name, 0), "released")
        granted = proxy.hold()
        second = asyncio.create_task(limiter.acquire())
        await granted.replied.wait()  # granted in Redis, the reply held back
        refused.let_go()
        await _waiting(limiter, 1)  # the first, in line
        granted.let_go()
        await first
        assert limiter.in_flight == 1
        assert not second.done()
        limiter.release()
        await second
        limiter.release()
        await holder.aclose()
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
            await _waiting(limiter, 3)  # both in line behind `first`
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


# ---------------------------------------------------------------------------
# Redis out of reach for a while
# ---------------------------------------------------------------------------


class _FailedAsks:
    """Counts a Limiter's asks for slots that failed because Redis could not be reached,
    and lets a test wait for the next one."""

    def __init__(self, limiter: corral.Limiter) -> None:
        import redis.exceptions

        assert isinstance(limiter, RedisLimiter)
        b = limiter._binding
        assert b is not None  # used once already
        acquire = b.acquire
        self.n = 0
        self._changed = asyncio.Event()

        async def counted(**kwargs: Any) -> Any:
            try:
                return await acquire(**kwargs)
            except redis.exceptions.ConnectionError:
                self.n += 1
                self._changed.set()
                raise

        b.acquire = counted  # type: ignore[assignment]

    async def at_least(self, n: int) -> None:
        while self.n < n:
            self._changed.clear()
            await self._changed.wait()


def test_callers_waiting_for_a_slot_ride_out_a_brief_redis_outage(
    redis_url: str, tmp_path: Path
) -> None:
    """Redis stopped, then started again on its port: callers in line, callers asking
    with nobody ahead of them and a caller booking a rate start all ask again, backing
    off, and are served once Redis is back, in arrival order, none failed meanwhile."""
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    name = _name()

    async def main() -> None:
        holder = corral.Limiter(limit=1, redis=url, name=name, lease=30)
        limiter = corral.Limiter(limit=1, redis=url, name=name, lease=30)
        alone = corral.Limiter(limit=1, redis=url, name=_name(), lease=30)
        rated = corral.Limiter(rate="100/s", redis=url, name=_name(), lease=30)
        async with asyncio.timeout(30):
            await holder.acquire()
            for other in (alone, rated):  # connected once
                await other.acquire()
                other.release()
            # Arriving together, both ask Redis; their refusals may come back in
            # either order (or after the outage began): the line keeps arrival order.
            in_line = [asyncio.create_task(limiter.acquire()) for _ in range(2)]
            await _until(_queue_holds(url, name, 1), "queued")
            failed = [_FailedAsks(each) for each in (limiter, alone, rated)]
            _shutdown(port)
            newcomers = [asyncio.create_task(each.acquire()) for each in (alone, rated)]
            for each in failed:
                await each.at_least(2)  # asked again after a failure
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
            await failed.at_least(1)
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
