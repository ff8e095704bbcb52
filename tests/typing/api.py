"""Checked by mypy, never run: the public API's types as users see them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import assert_type

import corral

assert_type(corral.__version__, str)


async def page_size(url: str) -> int:
    return len(url)


def blocking_size(url: str) -> int:
    return len(url)


async def urls() -> AsyncIterator[str]:
    yield "http://127.0.0.1/"


async def _typed() -> None:
    async with corral.map(page_size, ["a", "b"], limit=10) as sizes:
        async for n in sizes:
            assert_type(n, int)
        assert_type(sizes.stats, corral.Stats)
    async for m in corral.map(blocking_size, urls(), rate="20/s", executor="thread"):
        assert_type(m, int)
    assert_type(await corral.gather(page_size, ["a"], retries=3), list[int])
    assert_type(await corral.gather(blocking_size, ["a"]), list[int])
    db = corral.Limiter(limit=90)
    async with db:
        pass
    await corral.gather(page_size, ["a"], limit=db, retries=corral.Retry(attempts=3))
    await corral.gather(page_size, ["a"], rate=corral.Rate(20, per=1.0, burst=5))


def _sync() -> None:
    assert_type(corral.run(page_size, ["a"], limit=5), list[int])
