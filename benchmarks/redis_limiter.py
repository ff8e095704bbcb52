"""What one grant of a Limiter shared through Redis costs, next to one in this process.

    python benchmarks/redis_limiter.py                 # starts its own redis-server
    python benchmarks/redis_limiter.py --repeats 5     # steadier medians
    python benchmarks/redis_limiter.py --redis redis://127.0.0.1:6379/0   # an existing one

Needs the ``redis`` extra (``pip install 'corral[redis]'``) and, without
``--redis``, a ``redis-server`` binary on PATH (Debian: ``apt-get install
redis-server``); it then runs one on a free loopback port, without
persistence, and stops it at the end.

The cases
---------
``latency``: one task, ``async with limiter:`` 5,000 times in a row: the
    time per grant is one round trip to Redis (a Lua script) plus the
    release, which is sent in the background.
``concurrent``: 64 tasks doing the same (5,000 grants in all), a cap of
    1,000 that is never reached: grants per second when many callers ask at
    once over a pool of connections.
``map``: ``corral.gather(noop, range(5_000), limit=L)`` with L a Limiter of
    ``limit=100`` in Redis, against the same map with ``limit=100`` and with
    a local ``corral.Limiter(limit=100)``: the per-item cost a shared budget
    adds to the engine.
``saturated``: two maps of 5,000 no-op items on two Limiters of one name,
    cap 20: every grant waits for a release elsewhere (the fair queue, a
    published message, one more round trip).

Each case runs ``--repeats`` times (round-robin over the cases); the median
is shown, with the spread (max - min) / median. The machine's CPU count and
Python are printed, since the Redis server shares the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import corral
from corral._redis import RedisLimiter

N = 5_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_server() -> tuple[subprocess.Popen[bytes], str, tempfile.TemporaryDirectory[str]]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: install it (apt-get install redis-server) or use --redis")
    workdir = tempfile.TemporaryDirectory()
    port = _free_port()
    server = subprocess.Popen(
        [
            *(binary, "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", workdir.name),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            sys.exit("redis-server did not start")
        time.sleep(0.02)
    return server, f"redis://127.0.0.1:{port}/0", workdir


def _name() -> str:
    return f"bench-{uuid.uuid4().hex[:12]}"


async def _noop(item: int) -> int:
    return item


async def latency(url: str) -> float:
    """Seconds per grant, one task at a time."""
    limiter = corral.Limiter(limit=1000, redis=url, name=_name())
    async with limiter:  # connect and load the script first
        pass
    began = time.perf_counter()
    for _ in range(N):
        async with limiter:
            pass
    elapsed = time.perf_counter() - began
    await limiter.aclose()
    return elapsed / N


async def concurrent(url: str) -> float:
    """Grants per second, 64 tasks asking at once."""
    limiter = corral.Limiter(limit=1000, redis=url, name=_name())
    async with limiter:
        pass

    async def task(n: int) -> None:
        for _ in range(n):
            async with limiter:
                pass

    began = time.perf_counter()
    await asyncio.gather(*(task(N // 64 + (i < N % 64)) for i in range(64)))
    elapsed = time.perf_counter() - began
    await limiter.aclose()
    return N / elapsed


def _map(make_limit: Callable[[], object]) -> Callable[[str], Awaitable[float]]:
    async def case(url: str) -> float:
        limit: Any = make_limit()
        if limit == "redis":
            limit = corral.Limiter(limit=100, redis=url, name=_name())
        began = time.perf_counter()
        results = await corral.gather(_noop, range(N), limit=limit)
        elapsed = time.perf_counter() - began
        assert results == list(range(N))
        if isinstance(limit, RedisLimiter):
            await limit.aclose()
        return N / elapsed

    return case


async def saturated(url: str) -> float:
    """Items per second of two maps on one shared cap of 20."""
    name = _name()
    one = corral.Limiter(limit=20, redis=url, name=name)
    two = corral.Limiter(limit=20, redis=url, name=name)
    began = time.perf_counter()
    a, b = await asyncio.gather(
        corral.gather(_noop, range(N), limit=one), corral.gather(_noop, range(N), limit=two)
    )
    elapsed = time.perf_counter() - began
    assert a == b == list(range(N))
    await one.aclose()
    await two.aclose()
    return 2 * N / elapsed


CASES: dict[str, tuple[Callable[[str], Awaitable[float]], str]] = {
    "latency": (latency, "us/grant"),
    "concurrent": (concurrent, "grants/s"),
    "map: limit=100": (_map(lambda: 100), "items/s"),
    "map: local Limiter(100)": (_map(lambda: corral.Limiter(limit=100)), "items/s"),
    "map: Redis Limiter(100)": (_map(lambda: "redis"), "items/s"),
    "saturated: 2 maps, cap 20": (saturated, "items/s"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--redis", help="an existing Redis URL (default: start a redis-server)")
    args = parser.parse_args()
    server = workdir = None
    url = args.redis
    if url is None:
        server, url, workdir = _start_server()
    try:
        print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, Redis at {url}")
        runs: dict[str, list[float]] = {case: [] for case in CASES}
        for _ in range(args.repeats):
            for case, (fn, _unit) in CASES.items():
                runs[case].append(asyncio.run(fn(url)))
        print(f"{'case':28} {'median':>12}  unit        spread")
        for case, (_fn, unit) in CASES.items():
            values = runs[case]
            median = statistics.median(values)
            shown = median * 1e6 if unit == "us/grant" else median
            spread = (max(values) - min(values)) / median
            print(f"{case:28} {shown:12,.1f}  {unit:10}  {spread:5.0%}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(5)
        if workdir is not None:
            workdir.cleanup()


if __name__ == "__main__":
    main()
