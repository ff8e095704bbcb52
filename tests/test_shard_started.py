"""processes=N: the parent hears of calls the moment the children start them.

``stats.started`` and ``in_flight`` come from the children. Besides the
results, a child reports its counts on a timer (``STATS_INTERVAL``); here that
timer is set to an hour, so only a prompt report of the starts themselves can
make the counts right while every call is held open.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

import corral
from _work import worker_processes
from corral import _shard as corral_shard


async def async_wait_for_release(arg: tuple[int, int]) -> int:
    """Connects to the test's loopback server and returns ``x`` once it sends a byte."""
    port, x = arg
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readexactly(1)
    finally:
        writer.close()
    return x


@pytest.mark.slow
async def test_started_and_in_flight_are_reported_while_the_calls_are_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """All `limit` calls are held open: stats say so, though no result and no timer came."""
    monkeypatch.setattr(corral_shard, "STATS_INTERVAL", 3600.0)
    limit = 4
    release = asyncio.Event()
    connected = 0

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connected
        connected += 1
        try:
            await release.wait()
            writer.write(b"x")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    items = [(port, x) for x in range(3 * limit)]
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(60):  # hang guard
            async with corral.map(async_wait_for_release, items, processes=2, limit=limit) as out:
                deadline = loop.time() + 20
                while out.stats.started < limit:
                    assert loop.time() < deadline, f"stats never caught up: {out.stats}"
                    await asyncio.sleep(0.01)
                stats = out.stats
                assert (stats.started, stats.in_flight, stats.completed) == (limit, limit, 0)
                assert connected <= limit  # the limit holds across the processes
                release.set()
                results = [x async for x in out]
            stats = out.stats
    finally:
        release.set()
        server.close()
        await server.wait_closed()
    assert results == list(range(3 * limit))
    assert (stats.started, stats.completed, stats.in_flight) == (3 * limit, 3 * limit, 0)
    assert worker_processes() == set()


async def _one_by_one(items: list[tuple[int, int]]) -> AsyncIterator[tuple[int, int]]:
    for item in items:
        yield item


@pytest.mark.slow
async def test_an_item_goes_to_an_idle_process_not_behind_the_calls_of_a_busy_one() -> None:
    """An async input hands items over one by one: each goes where there is most room.

    limit=4 over 2 processes runs 2 calls in each. The third item must start
    in the idle process at once, not wait in the queue of the one running the
    first two (whose calls, held open, would never let it start).
    """
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await release.wait()
            writer.write(b"x")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    items = [(port, x) for x in range(3)]
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(60):  # hang guard
            async with corral.map(
                async_wait_for_release, _one_by_one(items), processes=2, limit=4
            ) as out:
                deadline = loop.time() + 20
                while out.stats.started < len(items):
                    assert loop.time() < deadline, f"an item waits in a busy process: {out.stats}"
                    await asyncio.sleep(0.01)
                release.set()
                results = [x async for x in out]
    finally:
        release.set()
        server.close()
        await server.wait_closed()
    assert results == [0, 1, 2]
    assert worker_processes() == set()
