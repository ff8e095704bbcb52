"""Helpers for tests that watch when a Limiter lets calls start."""

from __future__ import annotations

import asyncio

import corral


def now() -> float:
    """The running loop's clock (virtual under ``@pytest.mark.virtual_time``)."""
    return asyncio.get_running_loop().time()


async def starts(
    limiter: corral.Limiter, n: int, cost: dict[str, float] | None = None
) -> list[float]:
    """Start ``n`` calls one after the other through ``limiter``; when each started."""
    times = []
    for _ in range(n):
        await limiter.acquire(cost)
        times.append(now())
        limiter.release()
    return times
