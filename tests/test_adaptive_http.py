"""limit="auto", the shared cooldown and per-key limits, over real HTTP against ``corral serve``.

Each test starts :class:`corral.lab.server.TargetServer` on loopback and calls
it with aiohttp, under a 30 s hang guard. The assertions lean one way only: a
loaded machine makes latency higher, which makes an adaptive limit *lower*
and pauses *longer*, so the tests bound limits from above and pauses from
below, never the other way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

import corral
from corral.lab.server import TargetServer

pytestmark = pytest.mark.slow

HANG_GUARD = 30.0


def fetcher(session: aiohttp.ClientSession) -> Callable[[str], Coroutine[Any, Any, Any]]:
    """GET a URL; a non-200 answer raises aiohttp's ClientResponseError (status, headers)."""

    async def fetch(url: str) -> Any:
        async with session.get(url) as response:
            response.raise_for_status()
            return await response.json()

    return fetch


async def test_auto_finds_a_limit_without_overloading_the_server() -> None:
    """Capacity 8 x 50 ms: auto gets no 429 and keeps a handful in flight, not all 240."""
    async with asyncio.timeout(HANG_GUARD):
        async with (
            TargetServer(capacity=8, service_ms=50, queue=200) as server,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        ):
            urls = [f"{server.url}/item/{i}" for i in range(240)]
            # Starting below the capacity measures the unloaded latency first
            # (spelled out: the test depends on it, whatever the default).
            auto = corral.Adaptive(initial=4)
            async with corral.map(fetcher(session), urls, limit=auto) as results:
                bodies = [body async for body in results]
                limit = results.stats.limit
            stats = server.stats()
    assert all(body["ok"] for body in bodies)
    assert (stats.served, stats.rejected) == (240, 0)
    assert stats.peak_concurrency <= 6 * 8
    assert limit is not None
    assert limit <= 3 * 8


async def test_auto_follows_a_capacity_drop() -> None:
    """Capacity 16 -> 2 mid-run: the limit comes down, to a few times the new capacity.

    Before the drop the limit only has to have reached those few: a client
    starved of CPU (a loaded machine) sees its own lag as latency and grows
    less, and the test must not depend on how far it got.
    """
    limiter = corral.Limiter(limit=corral.Adaptive(initial=4))
    async with asyncio.timeout(HANG_GUARD):
        async with (
            TargetServer(capacity=16, service_ms=50, queue=400) as server,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        ):
            # 200 requests after the drop: at 2 x 50 ms that is 5 s, time for
            # a few round trips of 0.5 s even on a loaded machine.
            urls = [f"{server.url}/item/{i}" for i in range(600)]
            async with corral.map(fetcher(session), urls, limit=limiter) as results:
                seen = 0
                async for _ in results:
                    seen += 1
                    if seen == 400:
                        before = limiter.limit
                        server.set_capacity(2)
            stats = server.stats()
    assert (stats.served, stats.rejected) == (600, 0)
    assert before is not None
    assert limiter.limit is not None
    assert limiter.limit <= 4 * 2 <= before
    assert limiter.limit < before


async def test_a_retry_after_pauses_every_map_sharing_the_limiter() -> None:
    """A 429 with Retry-After: 0.3 s: no request starts, in either map, for 0.3 s after it."""
    limiter = corral.Limiter(limit=8)
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    refusals: list[float] = []
    async with asyncio.timeout(HANG_GUARD):
        async with (
            TargetServer(capacity=2, service_ms=50, queue=0, retry_after=0.3) as server,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        ):
            get = fetcher(session)

            async def fetch(url: str) -> Any:
                starts.append(loop.time())
                try:
                    return await get(url)
                except aiohttp.ClientResponseError:
                    refusals.append(loop.time())
                    raise

            # No retry budget: most calls are refused here, and this test is about
            # the cooldown, not about how many retries a budget allows.
            retry = corral.Retry(attempts=20, backoff=0.01, budget=None)
            urls = [f"{server.url}/item/{i}" for i in range(24)]
            first, second = await asyncio.gather(
                corral.gather(fetch, urls[:12], limit=limiter, retries=retry),
                corral.gather(fetch, urls[12:], limit=limiter, retries=retry),
            )
            stats = server.stats()
    assert all(body["ok"] for body in first + second)
    assert stats.served == 24
    assert refusals, "capacity 2 and no queue under 8 calls at once: some must be refused"
    # Each refusal pauses the limiter for 0.3 s from (a moment after) it was seen.
    for refused in refusals:
        early = [t for t in starts if refused < t < refused + 0.3]
        assert early == [], f"a request started {early[0] - refused:.3f} s after a 429"


async def test_per_key_limits_hold_per_host() -> None:
    """limit=2 per port: each of two servers sees at most 2 requests at once."""
    limiter = corral.Limiter(limit=2, key=lambda url: urlsplit(url).port)
    async with asyncio.timeout(HANG_GUARD):
        async with (
            TargetServer(capacity=8, service_ms=20) as one,
            TargetServer(capacity=8, service_ms=20) as two,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        ):
            urls = [f"{server.url}/item/{i}" for i in range(20) for server in (one, two)]
            bodies = await corral.gather(fetcher(session), urls, limit=limiter)
            stats = one.stats(), two.stats()
    assert len(bodies) == 40
    for server_stats in stats:
        assert server_stats.served == 20
        assert server_stats.peak_concurrency <= 2
