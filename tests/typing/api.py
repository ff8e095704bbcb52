"""Checked by mypy, never run: the public API's types as users see them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, assert_type

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


async def _typed_more() -> None:
    auto = corral.Limiter(limit=corral.Adaptive(initial=8, min=2, max=500))
    assert_type(auto.limit, int | None)
    assert_type(await corral.gather(page_size, ["a"], limit="auto", monitor=True), list[int])
    assert_type(await corral.gather(page_size, ["a"], processes=2, ordered=False), list[int])
    snapshots: list[corral.Stats] = []
    assert_type(await corral.gather(page_size, ["a"], progress=snapshots.append), list[int])
    async with corral.map(
        page_size, ["a"], deadline=60, budget={"requests": 10}, checkpoint="run.sqlite"
    ) as sizes:
        sizes.cancel()
        assert_type(sizes.stats.as_dict(), dict[str, Any])
    async with corral.watch_loop(threshold=0.05) as watch:
        pass
    for report in watch.reports:
        assert_type(report, corral.BlockReport)
        assert_type(report.lineno, int)


async def _typed_paid_apis() -> None:
    llm = corral.Limiter(
        limit="auto",
        rate=[
            corral.Rate(
                {"requests": 500, "input_tokens": 200_000, "output_tokens": 40_000}, per=60
            ),
            corral.Rate({"requests": 10_000}, per=86_400),
        ],
    )
    assert_type(llm.rate, corral.Rate | tuple[corral.Rate, ...] | None)
    llm.sync_headers({"x-ratelimit-remaining-tokens": "100"})
    await llm.acquire({"output_tokens": 500})
    llm.settle({"output_tokens": 500}, {"output_tokens": 120})
    llm.release()
    assert_type(
        await corral.gather(
            page_size,
            ["a"],
            limit=llm,
            rate=[corral.Rate({"tokens": 1000}, per=60)],
            cost=lambda url: {"input_tokens": len(url)},
            usage=corral.token_usage,
            budget={"output_tokens": 2_000_000, "requests": 50_000},
            retries=corral.Retry(attempts=3, budget=corral.RetryBudget(ratio=0.2)),
        ),
        list[int],
    )
    assert_type(corral.token_usage(None, cache_reads=False), dict[str, float] | None)
    auto = corral.Limiter(limit="auto", rate="auto")
    assert_type(auto.auto_rate, bool)
    assert_type(await corral.gather(page_size, ["a"], rate="auto"), list[int])
    assert_type(corral.Retry(budget=None).budget, corral.RetryBudget | float | None)
    error = corral.RetryBudgetExhausted("spent", ValueError())
    assert_type(error.error, BaseException | None)


class Session:
    """Stands for something each Ray actor makes once, like an HTTP session."""

    async def get(self, url: str) -> bytes:
        return url.encode()


async def fetch(url: str, session: Session) -> bytes:
    return await session.get(url)


async def open_session() -> Session:
    return Session()


async def _typed_setup() -> None:
    async with corral.map(fetch, ["a"], backend="ray", setup=open_session) as pages:
        async for page in pages:
            assert_type(page, bytes)
    assert_type(await corral.gather(fetch, ["a"], backend="ray", setup=Session), list[bytes])
    assert_type(corral.run(fetch, ["a"], backend="ray", setup=open_session, limit=4), list[bytes])
