"""Limiter(redis=..., name=...): one budget shared by processes, kept in a real redis-server."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import corral
from corral._redis import RedisLimiter

# ---------------------------------------------------------------------------
# A redis-server of our own, on a free loopback port, for this module (stopped after it, so
# that later tests counting this process's children do not see it)
# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def _redis_server(binary: str, workdir: Path, port: int | None = None) -> Iterator[str]:
    """A redis-server on ``port`` (a free loopback port by default; no persistence),
    stopped on exit: its URL."""
    port = _free_port() if port is None else port
    log = workdir / "redis.log"
    server = subprocess.Popen(
        [
            *(binary, "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(workdir), "--logfile", str(log)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _ping(port):
            if server.poll() is not None or time.monotonic() > deadline:
                text = log.read_text() if log.exists() else ""
                pytest.fail(f"redis-server did not start on port {port}:\n{text}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server started for these tests (loopback only, no persistence), stopped after."""
    binary = shutil.which("redis-server")
    if binary is None:
        reason = (
            "redis-server is not installed (Debian: apt-get install redis-server); "
            "the Redis-backed Limiter's tests need a real server"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}. .ci/run installs it: CI must not skip these tests.")
        pytest.skip(reason)
    with _redis_server(binary, tmp_path_factory.mktemp("redis")) as url:
        yield url


def _name() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


async def _holders(url: str, name: str) -> int:
    """Slots of ``name`` held now (leases that have not ended)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        now_s, now_us = await client.time()
        now = now_s * 1_000_000 + now_us
        return int(await client.zcount(f"corral:{{{name}}}:holders", now, "+inf"))
    finally:
        await client.aclose()


async def _tat(url: str, name: str) -> bytes | None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        value: bytes | None = await client.get(f"corral:{{{name}}}:tat")
        return value
    finally:
        await client.aclose()


async def _cool_left(url: str, name: str) -> float | None:
    """Seconds the shared cooldown of ``name`` has left on Redis's clock (None: none set)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        now_s, now_us = await client.time()
        until = await client.hget(f"corral:{{{name}}}:cool", "until")
        return None if until is None else (int(until) - now_s * 1_000_000 - now_us) / 1e6
    finally:
        await client.aclose()


async def _queued(url: str, name: str) -> int:
    """Processes in the shared queue of ``name`` (each waiting for slots)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        return int(await client.zcard(f"corral:{{{name}}}:queue"))
    finally:
        await client.aclose()


async def _until(
    condition: Callable[[], Awaitable[object]], what: str, timeout: float = 3.0
) -> None:
    """Poll ``condition()`` until true: state kept in Redis has no event to await."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"not {what} after {timeout} s")
        await asyncio.sleep(0.005)


def _cooling_for(url: str, name: str, more_than: float) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        left = await _cool_left(url, name)
        return left is not None and left > more_than

    return condition


def _holders_are(url: str, name: str, n: int) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return await _holders(url, name) == n

    return condition


def _queue_holds(url: str, name: str, n: int) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return await _queued(url, name) == n

    return condition


def _run_children(code: str, args: list[str], n: int, timeout: float) -> list[Any]:
    """Run ``n`` Python processes on ``code``; each prints one JSON line at the end."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    results = []
    try:
        for child in children:
            out, err = child.communicate(timeout=timeout)
            assert child.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return results


# ---------------------------------------------------------------------------
# Arguments: refused at once, naming the argument and the value
# ---------------------------------------------------------------------------


def test_a_limiter_with_redis_is_a_limiter() -> None:
    """Limiter(redis=) makes the Redis-backed kind, which corral.map takes as a Limiter."""
    limiter = corral.Limiter(limit=5, rate="20/s", redis="redis://127.0.0.1:1/0", name="a")
    assert isinstance(limiter, corral.Limiter)
    assert isinstance(limiter, RedisLimiter)
    assert (limiter.limit, limiter.ceiling, limiter.key, limiter.adaptive) == (5, 5, None, None)
    assert limiter.rate == corral.Rate(20, per=1.0)
    assert limiter.name == "a"
    assert limiter.lease == 10.0


def test_the_repr_hides_the_password() -> None:
    """A password in the URL never shows in a repr (or a log line built from it)."""
    limiter = corral.Limiter(limit=1, redis="redis://user:s3cret@127.0.0.1:6379/0", name="x")
    assert "s3cret" not in repr(limiter)
    assert "redis://user:***@127.0.0.1:6379/0" in repr(limiter)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"redis": 6379, "name": "x"},
            TypeError,
            r"^redis must be a Redis URL like 'redis://127.0.0.1:6379/0' \(also rediss:// or "
            r"unix://\); got redis=6379$",
        ),
        (
            {"redis": "http://127.0.0.1:6379", "name": "x"},
            ValueError,
            r"^redis must be a Redis URL .*; got redis='http://127.0.0.1:6379'$",
        ),
        (
            {"redis": "redis://127.0.0.1:6379/0"},
            TypeError,
            r"^a Limiter shared through Redis needs name=, a non-empty str naming the budget "
            r"every Limiter with that name shares, like name='api-key-1'; got name=None$",
        ),
        (
            {"redis": "redis://127.0.0.1:6379/0", "name": ""},
            ValueError,
            r"^a Limiter shared through Redis needs name=.*; got name=''$",
        ),
        (
            {"redis": "redis://127.0.0.1:6379/0", "name": "x", "lease": 0},
            ValueError,
            r"^lease must be a number of seconds >= 0.01 .*; got lease=0$",
        ),
        (
            {"redis": "redis://127.0.0.1:6379/0", "name": "x", "lease": "10"},
            TypeError,
            r"^lease must be a number of seconds >= 0.01 .*; got lease='10'$",
        ),
        (
            {"redis": "redis://127.0.0.1:6379/0", "name": "x", "lease": 1e13},
            ValueError,
            r"^lease must be a number of seconds >= 0.01 and <= 1000000 .*; "
            r"got lease=10000000000000.0$",
        ),
        (
            {"redis": "redis://127.0.0.1:6379/0", "name": "x", "lease": float("nan")},
            ValueError,
            r"^lease must be a number of seconds >= 0.01 .*; got lease=nan$",
        ),
        (
            {"redis": "redis://127.0.0.1:notaport/0", "name": "x"},
            ValueError,
            r"^redis must be a Redis URL .*; got redis='redis://127.0.0.1:notaport/0' \(Port ",
        ),
        (
            # redis-py would quietly use db 0
            {"redis": "redis://user:s3cret@127.0.0.1:6379/notadb", "name": "x"},
            ValueError,
            r"^redis must be a Redis URL .*; got redis='redis://user:\*\*\*@127.0.0.1:6379/notadb' "
            r"\(the database must be a number, not 'notadb'\)$",
        ),
        (
            {"redis": "redis://127.0.0.1:6379/0?socket_timeout=abc", "name": "x"},
            ValueError,
            r"^redis must be a Redis URL .*; got "
            r"redis='redis://127.0.0.1:6379/0\?socket_timeout=abc' "
            r"\(Invalid value for 'socket_timeout'",
        ),
        (
            {"redis": "redis://127.0.0.1:6379/0?no_such_option=1", "name": "x"},
            ValueError,
            r"^redis must be a Redis URL .*; got "
            r"redis='redis://127.0.0.1:6379/0\?no_such_option=1' "
            r"\(.*no_such_option",
        ),
    ],
)
def test_bad_redis_arguments_fail_at_once(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Each bad argument is refused when the Limiter is made, with its name and value."""
    with pytest.raises(error, match=message):
        corral.Limiter(limit=5, **kwargs)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1",
        "redis://127.0.0.1:6379/",
        "redis://user:pw@[::1]:6379/2?socket_timeout=1.5",
        "redis://127.0.0.1/x?db=3",
        "rediss://example.com:6380/0",
        "unix:///run/redis.sock?db=1",
    ],
)
def test_good_redis_urls_are_taken_without_connecting(url: str) -> None:
    """Checking the URL at construction opens no connection and takes every valid form."""
    assert corral.Limiter(limit=1, redis=url, name="x").name == "x"


def test_what_a_shared_budget_cannot_be_is_refused() -> None:
    """An adaptive limit, key=, a weighted or listed rate: refused, saying why."""
    url = "redis://127.0.0.1:6379/0"
    with pytest.raises(ValueError, match=r"^a Limiter shared through Redis takes an int limit"):
        corral.Limiter(limit="auto", redis=url, name="x")
    with pytest.raises(TypeError, match=r"^key= is not available on a Limiter shared through"):
        corral.Limiter(limit=5, key=str, redis=url, name="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^a Limiter shared through Redis takes one plain rate"):
        corral.Limiter(rate=["20/s", "600/min"], redis=url, name="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^corral.Limiter\(\) needs limit=, rate= or both"):
        corral.Limiter(redis=url, name="x")


def test_name_without_redis_is_refused() -> None:
    """name= and lease= mean nothing without redis=: TypeError saying so."""
    with pytest.raises(TypeError, match=r"^name= and lease= belong to a Limiter shared through"):
        corral.Limiter(limit=5, name="x")


def test_acquire_nowait_is_refused() -> None:
    """A shared budget cannot grant without a round trip: acquire_nowait() says what to use."""
    limiter = corral.Limiter(limit=5, redis="redis://127.0.0.1:6379/0", name="x")
    with pytest.raises(TypeError, match=r"use `await limiter.acquire\(\)` or `async with"):
        limiter.acquire_nowait()


def test_without_redis_py_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py missing: ImportError naming the extra to install."""
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ImportError, match=r"pip install 'corral\[redis\]'$"):
        corral.Limiter(limit=5, redis="redis://127.0.0.1:6379/0", name="x")


def test_import_corral_does_not_import_redis() -> None:
    """redis-py is loaded only when a Limiter is given redis=."""
    code = "import sys, corral; print('redis' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_a_pickled_limiter_shares_the_same_budget() -> None:
    """Pickled (to ship to a worker), it comes back on the same Redis, name, limit and rate."""
    limiter = corral.Limiter(limit=7, rate="5/s", redis="redis://127.0.0.1:1/0", name="p", lease=2)
    copy = pickle.loads(pickle.dumps(limiter))
    assert isinstance(copy, RedisLimiter)
    assert (copy.limit, copy.rate, copy.name, copy.lease) == (7, corral.Rate(5), "p", 2.0)


# ---------------------------------------------------------------------------
# One process, several Limiters on one name (every loop kind)
# ---------------------------------------------------------------------------


class Spy:
    """Stand-in fn that records the most calls ever in flight."""

    def __init__(self) -> None:
        self.running = self.peak = 0

    async def __call__(self, item: int) -> int:
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(0.002)  # a real wait: the other map's grants come back over TCP
        self.running -= 1
        return item


@pytest.mark.slow
async def test_maps_on_two_limiters_with_one_name_share_the_cap(redis_url: str) -> None:
    """Two Limiters of one name: their maps together never exceed the cap; exactly once."""
    name = _name()
    first = corral.Limiter(limit=5, redis=redis_url, name=name)
    second = corral.Limiter(limit=5, redis=redis_url, name=name)
    spy = Spy()
    async with asyncio.timeout(60):
        a, b = await asyncio.gather(
            corral.gather(spy, range(300), limit=first),
            corral.gather(spy, range(300, 600), limit=second),
        )
    assert a == list(range(300))
    assert b == list(range(300, 600))
    assert spy.peak == 5
    await first.aclose()
    await second.aclose()
    assert await _holders(redis_url, name) == 0


async def test_a_waiter_cancelled_in_line_gives_back_its_place(redis_url: str) -> None:
    """Cancelled while waiting for a slot: it takes nothing, the next caller gets the slot."""
    name = _name()
    limiter = corral.Limiter(limit=1, redis=redis_url, name=name)
    async with asyncio.timeout(30):
        await limiter.acquire()
        gone = asyncio.create_task(limiter.acquire())
        while limiter.waiting < 1:
            await asyncio.sleep(0.001)  # until `gone` is in line
        nxt = asyncio.create_task(limiter.acquire())
        while limiter.waiting < 2:
            await asyncio.sleep(0.001)  # until `nxt` is in line behind it
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        limiter.release()
        await nxt
        assert limiter.in_flight == 1
        assert limiter.waiting == 0
        assert await _holders(redis_url, name) == 1
        limiter.release()
    await limiter.aclose()
    assert await _holders(redis_url, name) == 0


async def test_a_caller_cancelled_waiting_for_the_rate_gives_its_slot_back(
    redis_url: str,
) -> None:
    """Cancelled before its rate slot: the reservation is undone, the slot released."""
    name = _name()
    limiter = corral.Limiter(limit=5, rate=corral.Rate(1, per=30), redis=redis_url, name=name)
    async with asyncio.timeout(30):
        await limiter.acquire()  # the first start: at once
        booked = await _tat(redis_url, name)
        waiter = asyncio.create_task(limiter.acquire())  # its slot is 30 s away
        while limiter.waiting < 1:
            await asyncio.sleep(0.001)  # until it sleeps towards its rate slot
        assert await _tat(redis_url, name) != booked
        assert await _holders(redis_url, name) == 2
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await limiter.aclose()  # sends what was queued, gives back what is held
    assert await _tat(redis_url, name) == booked
    assert await _holders(redis_url, name) == 0


async def test_a_cooldown_pauses_every_limiter_sharing_the_name(redis_url: str) -> None:
    """A Retry-After seen by one process pauses the others' starts too."""
    name = _name()
    one = corral.Limiter(limit=5, redis=redis_url, name=name)
    other = corral.Limiter(limit=5, redis=redis_url, name=name)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(30):
        await one.acquire()
        one.release()
        one.cooldown(0.5)
        await one.aclose()  # the cooldown has reached Redis
        began = loop.time()
        await other.acquire()
        # Server time set the end: 0.5 s after the cooldown arrived, which
        # was before `began`; a late wake-up can only make it longer.
        assert loop.time() - began >= 0.4
        other.release()
    await other.aclose()


async def test_a_caller_cancelled_for_the_rate_after_a_release_gives_a_slot_back(
    redis_url: str,
) -> None:
    """release() gives back any token held, maybe the one granted to a caller still waiting
    for its rate slot: cancelled, that caller gives back another, raising nothing."""
    name = _name()
    limiter = corral.Limiter(limit=2, rate=corral.Rate(1, per=30), redis=redis_url, name=name)
    other = corral.Limiter(limit=2, redis=redis_url, name=name)
    async with asyncio.timeout(5):
        await limiter.acquire()  # the first start: at once
        waiter = asyncio.create_task(limiter.acquire())  # granted; its rate slot is 30 s away
        while limiter.waiting < 1:
            await asyncio.sleep(0.001)
        limiter.release()  # the first call ends
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert limiter.in_flight == 0
        # Both slots free: another process gets both, without a lease running out.
        await other.acquire()
        await other.acquire()
        other.release()
        other.release()
    await limiter.aclose()
    await other.aclose()
    assert await _holders(redis_url, name) == 0


async def test_a_caller_waiting_for_the_rate_sits_out_a_cooldown_from_elsewhere(
    redis_url: str,
) -> None:
    """A cooldown another process starts while a caller sleeps towards its rate slot: the
    caller starts after the cooldown, holding its slot meanwhile; cancelled, it frees it."""
    loop = asyncio.get_running_loop()
    for pause, cancel in ((1.0, False), (30.0, True)):
        name = _name()
        limiter = corral.Limiter(limit=5, rate=corral.Rate(1, per=0.3), redis=redis_url, name=name)
        elsewhere = corral.Limiter(limit=5, redis=redis_url, name=name)
        async with asyncio.timeout(5):
            await limiter.acquire()  # the first start: at once
            waiter = asyncio.create_task(limiter.acquire())  # its rate slot is 0.3 s away
            while limiter.waiting < 1:
                await asyncio.sleep(0.001)
            began = loop.time()
            elsewhere.cooldown(pause)
            await _until(_cooling_for(redis_url, name, 0), "cooling")
            if not cancel:
                await waiter
                # The cooldown ends `pause` after it reached Redis, after `began`.
                assert loop.time() - began >= pause - 0.05
                assert limiter.in_flight == 2
            else:
                await asyncio.sleep(0.5)  # past its rate slot: sitting out the cooldown
                assert not waiter.done()
                assert await _holders(redis_url, name) == 2
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
                assert limiter.in_flight == 1
            while limiter.in_flight:
                limiter.release()
        await limiter.aclose()
        await elsewhere.aclose()
        assert await _holders(redis_url, name) == 0


async def test_a_cooldown_just_before_aclose_reaches_redis(redis_url: str) -> None:
    """aclose() right after cooldown() still announces it to every process."""
    name = _name()
    limiter = corral.Limiter(limit=2, redis=redis_url, name=name)
    await limiter.acquire()
    limiter.release()
    await _until(_holders_are(redis_url, name, 0), "released")  # nothing else left to send
    limiter.cooldown(30)
    await limiter.aclose()
    left = await _cool_left(redis_url, name)
    assert left is not None
    assert 25 < left <= 30


def test_a_cooldown_as_the_loop_ends_reaches_redis(redis_url: str) -> None:
    """A Retry-After seen by a worker's last call, as asyncio.run ends, still pauses the rest."""
    name = _name()
    limiter = corral.Limiter(limit=2, redis=redis_url, name=name)

    async def last_call() -> None:
        await limiter.acquire()
        limiter.release()
        await _until(_holders_are(redis_url, name, 0), "released")  # nothing else left to send
        limiter.record_error(0.0, corral.RetryAfter(30))

    asyncio.run(last_call())
    left = asyncio.run(_cool_left(redis_url, name))
    assert left is not None
    assert 25 < left <= 30


@pytest.mark.parametrize("limit", [5, None])
async def test_sync_headers_with_no_request_left_pauses_every_process(
    redis_url: str, limit: int | None
) -> None:
    """The server says no request is left: a shared cooldown until it refills one, capped."""
    name = _name()
    limiter = corral.Limiter(limit=limit, rate="100/s", redis=redis_url, name=name)
    other = corral.Limiter(limit=limit, rate="100/s", redis=redis_url, name=name)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        await limiter.acquire()
        limiter.release()
        began = loop.time()
        # 0 of 10 left, full again in 10 s: one request is back after 1 s.
        limiter.sync_headers(
            {
                "x-ratelimit-limit-requests": "10",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "10s",
            }
        )
        await _until(_cooling_for(redis_url, name, 0), "cooling")
        await other.acquire()
        assert 0.95 <= loop.time() - began < 3
        other.release()
        limiter.sync_headers(
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1h"}
        )
        await _until(_cooling_for(redis_url, name, 60), "cooling again")
        left = await _cool_left(redis_url, name)
        assert left is not None
        assert left <= 120  # MAX_COOLDOWN, as for a Retry-After; not an hour
        # Requests left: nothing to pause for (a longer pause would replace this one).
        other.sync_headers(
            {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "1h"}
        )
        await other.aclose()
        left_after = await _cool_left(redis_url, name)
        assert left_after is not None
        assert left_after <= left
    await limiter.aclose()


async def test_a_dropped_subscription_is_renewed_and_waiters_still_served(
    redis_url: str,
) -> None:
    """A pub/sub connection dropped while Redis is up (a proxy's idle timeout): the waiter
    is not failed and still gets the next release at once, not at the next poll."""
    import redis.asyncio as aioredis

    name = _name()
    holder = corral.Limiter(limit=1, redis=redis_url, name=name, lease=30)  # polls every 10 s
    waiter_side = corral.Limiter(limit=1, redis=redis_url, name=name, lease=30)
    client = aioredis.Redis.from_url(redis_url)

    async def subscribers() -> set[int]:
        return {int(c["id"]) for c in await client.client_list(_type="pubsub")}

    try:
        async with asyncio.timeout(5):
            await holder.acquire()
            waiter = asyncio.create_task(waiter_side.acquire())
            await _until(_queue_holds(redis_url, name, 1), "queued")
            await _until(subscribers, "subscribed")
            dropped = await subscribers()
            assert await client.client_kill_filter(_type="pubsub") == len(dropped)

            async def subscribed_again() -> bool:
                return bool(await subscribers() - dropped)

            await _until(subscribed_again, "subscribed again")
            assert not waiter.done()
            holder.release()
            await asyncio.wait_for(waiter, 2)
            waiter_side.release()
    finally:
        await client.aclose()
        await holder.aclose()
        await waiter_side.aclose()
    assert await _holders(redis_url, name) == 0


def test_waiters_fail_when_redis_itself_is_gone(redis_url: str, tmp_path: Path) -> None:
    """Redis down (commands fail too, not only the subscription): the callers in line get
    the connection error once it has been unreachable for a lease, not after polling."""
    import redis.exceptions

    binary = shutil.which("redis-server")
    assert binary is not None  # redis_url skipped the test otherwise
    with _redis_server(binary, tmp_path) as url:

        async def main(stop: Callable[[], None]) -> BaseException | None:
            name = _name()
            holder = corral.Limiter(limit=1, redis=url, name=name, lease=1)
            waiter_side = corral.Limiter(limit=1, redis=url, name=name, lease=1)
            await holder.acquire()
            waiter = asyncio.create_task(waiter_side.acquire())
            await _until(_queue_holds(url, name, 1), "queued")
            stop()
            try:
                await asyncio.wait_for(waiter, 5)  # polls come every 10 s
            except redis.exceptions.ConnectionError as exc:
                return exc
            finally:
                await holder.aclose()
                await waiter_side.aclose()
            return None

        port = int(url.rsplit(":", 1)[1].split("/")[0])
        error = asyncio.run(main(lambda: _shutdown(port)))
    assert isinstance(error, redis.exceptions.ConnectionError)


def _shutdown(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"SHUTDOWN NOSAVE\r\n")
        sock.recv(16)  # the server closes the connection as it exits
    while _ping(port):
        time.sleep(0.01)


async def test_a_process_leaving_the_queue_lets_the_next_in(redis_url: str) -> None:
    """A process whose last waiter gives up leaves the shared queue at once, and tells the
    processes behind it: a slot freed then goes to them now, not at their next poll."""
    name = _name()
    holder, gone, nxt = (
        corral.Limiter(limit=1, redis=redis_url, name=name, lease=30) for _ in range(3)
    )
    async with asyncio.timeout(5):
        await holder.acquire()
        first = asyncio.create_task(gone.acquire())
        await _until(_queue_holds(redis_url, name, 1), "first queued")
        second = asyncio.create_task(nxt.acquire())
        await _until(_queue_holds(redis_url, name, 2), "second queued")
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        holder.release()
        await asyncio.wait_for(second, 2)  # polls come every 10 s
        nxt.release()
        await _until(_queue_holds(redis_url, name, 0), "queue empty")
    for limiter in (holder, gone, nxt):
        await limiter.aclose()
    assert await _holders(redis_url, name) == 0


def test_slots_held_when_the_loop_ends_are_given_back(redis_url: str) -> None:
    """asyncio.run ending with slots still held gives them back, not after the lease."""
    name = _name()
    limiter = corral.Limiter(limit=5, redis=redis_url, name=name)

    async def take_three() -> int:
        for _ in range(3):
            await limiter.acquire()
        return await _holders(redis_url, name)

    assert asyncio.run(take_three()) == 3
    assert asyncio.run(_holders(redis_url, name)) == 0


def test_a_limiter_serves_successive_event_loops(redis_url: str) -> None:
    """Made outside any loop, used from one asyncio.run after another."""
    name = _name()
    limiter = corral.Limiter(limit=2, redis=redis_url, name=name)

    async def use() -> list[int]:
        return await corral.gather(asyncio.sleep, [0, 0, 0], limit=limiter)

    assert asyncio.run(use()) == [None, None, None]
    assert asyncio.run(use()) == [None, None, None]


# ---------------------------------------------------------------------------
# Several processes on one budget
# ---------------------------------------------------------------------------

_RATE_CHILD = """
import asyncio, json, sys, time
import corral

url, name, start, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
starts = []

async def record(i):
    starts.append(time.monotonic())

async def main():
    limiter = corral.Limiter(rate=corral.Rate(200, per=1.0), redis=url, name=name)
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    await corral.gather(record, range(n), limit=limiter)

asyncio.run(main())
print(json.dumps(starts))
"""


@pytest.mark.slow
def test_two_processes_sharing_a_rate_of_200_per_second_never_exceed_it(redis_url: str) -> None:
    """Two processes on one rate of 200/s: no one-second window holds more than 200 starts.

    GCRA admits at most burst + w / T = 1 + 200 starts in a closed 1 s
    window, on Redis's clock. Starts are timed here by each process after it
    woke, a few ms after its slot (later on a busy machine), so the windows
    allow 15% for late wake-ups; two separate budgets would show about 400.
    """
    name, per_process = _name(), 300
    start = time.monotonic() + 2.0  # both processes ready: they start together
    results = _run_children(
        _RATE_CHILD, [redis_url, name, str(start), str(per_process)], n=2, timeout=120
    )
    starts = sorted(t for result in results for t in result)
    assert len(starts) == 2 * per_process
    busiest = max(bisect.bisect_right(starts, t + 1.0) - i for i, t in enumerate(starts))
    print(f"busiest one-second window: {busiest} starts")
    # Room for wake-ups late on a loaded machine (starts a stall held back bunch
    # up: 205-210 seen); two budgets would allow about 400.
    assert busiest <= 201 + 30
    # The budget was used, and shared: 600 starts at 200/s take about 3 s.
    assert busiest >= 180
    assert starts[-1] - starts[0] >= (2 * per_process - 1) / 200 * 0.98


_CAP_CHILD = """
import asyncio, json, sys
import corral
import redis.asyncio as aioredis

url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
peak = 0

async def main():
    global peak
    limiter = corral.Limiter(limit=50, redis=url, name=name, lease=2)
    client = aioredis.Redis.from_url(url, max_connections=200)
    counter = f"{name}:running"

    async def call(i):
        global peak
        # Counted inside the slot, in Redis: what every process sees at once.
        peak = max(peak, await client.incr(counter))
        await asyncio.sleep(0.003)
        await client.decr(counter)
        return i

    # 50 workers per process compete for 50 slots shared by both processes.
    results = await corral.gather(call, range(n), limit=limiter)
    assert results == list(range(n))
    await client.aclose()
    await limiter.aclose()

asyncio.run(main())
print(json.dumps(peak))
"""


@pytest.mark.slow
def test_a_lease_semaphore_of_50_never_has_more_than_50_holders(redis_url: str) -> None:
    """Two processes, 100 workers, one cap of 50: never more than 50 calls at once, anywhere."""
    name = _name()
    peaks = _run_children(_CAP_CHILD, [redis_url, name, "1500"], n=2, timeout=180)
    assert max(peaks) <= 50
    assert max(peaks) >= 40  # the cap was reached, not merely respected
    assert asyncio.run(_holders(redis_url, name)) == 0


_HOLDER_CHILD = """
import asyncio, sys
import corral

url, name = sys.argv[1], sys.argv[2]

async def main():
    limiter = corral.Limiter(limit=50, redis=url, name=name, lease=1.0)
    for _ in range(50):
        await limiter.acquire()
    print("held", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.slow
def test_the_slots_of_a_killed_holder_come_back_after_its_lease(redis_url: str) -> None:
    """A holder alive keeps its slots (it renews); SIGKILLed, they are free after the lease."""
    name = _name()
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER_CHILD), redis_url, name],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"

        async def wait_for_slots() -> float:
            limiter = corral.Limiter(limit=50, redis=redis_url, name=name, lease=1.0)
            assert await _holders(redis_url, name) == 50
            # 2.5 leases: without renewals every slot would have come back by now.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(2.5):
                    await limiter.acquire()
            assert await _holders(redis_url, name) == 50
            os.kill(child.pid, signal.SIGKILL)
            killed = time.monotonic()
            async with asyncio.timeout(30):
                for _ in range(50):
                    await limiter.acquire()
            waited = time.monotonic() - killed
            assert await _holders(redis_url, name) == 50
            await limiter.aclose()
            return waited

        waited = asyncio.run(wait_for_slots())
        # Back at most a lease after the last renewal (plus slack for a busy box):
        # not the 30 s of the guard, nor never.
        assert waited <= 1.0 + 5.0
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert asyncio.run(_holders(redis_url, name)) == 0
