"""Stats of a map on processes with corral's engine in front (checkpoint=, deadline=, progress=).

The engine hands each item to the worker processes, which queue what their
limit does not let run yet: ``started`` and ``in_flight`` count the calls the
workers run, as the same map without the engine does, not the items handed
over.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import corral
from _work import async_sleep, async_square, worker_processes

pytestmark = pytest.mark.slow

HANGS = 3600


async def no_worker_left() -> None:
    for _ in range(100):
        if not worker_processes():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"worker processes left: {sorted(worker_processes())}")


def hosted(keyword: str, tmp_path: Path) -> dict[str, Any]:
    """The keyword that puts the engine in front, with a value that changes nothing here."""
    return {
        "progress": {"progress": lambda stats: None},
        "deadline": {"deadline": HANGS},
        "checkpoint": {"checkpoint": tmp_path / "run.sqlite"},
    }[keyword]


@pytest.mark.parametrize("keyword", ["progress", "deadline", "checkpoint"])
async def test_items_queued_in_the_workers_are_not_started(keyword: str, tmp_path: Path) -> None:
    """limit=4 of hanging calls: 4 started and in flight, though the engine handed over 8."""
    seen: list[corral.Stats] = []
    async with corral.map(
        # Seconds to sleep, each its own (a checkpoint's ids must differ).
        async_sleep,
        range(HANGS, HANGS + 20),
        processes=1,
        limit=4,
        **hosted(keyword, tmp_path),
    ) as results:
        # The worker reports its starts on a timer: wait (bounded) until they are in.
        give_up = time.monotonic() + 30
        while results.stats.started < 4 and time.monotonic() < give_up:
            seen.append(results.stats)
            await asyncio.sleep(0.05)
        for _ in range(10):  # and stay there
            seen.append(results.stats)
            await asyncio.sleep(0.05)
        results.cancel()
        assert [r async for r in results] == []
    assert seen[-1].started == 4
    assert max(s.started for s in seen) == 4
    assert max(s.in_flight for s in seen) == 4
    final = results.stats
    assert (final.started, final.completed, final.failed, final.in_flight) == (4, 0, 0, 0)
    await no_worker_left()


async def test_a_finished_run_counts_every_item_started(tmp_path: Path) -> None:
    """Once every item is done, started is every item: none is left queued."""
    async with corral.map(
        async_square, range(50), processes=2, limit=3, checkpoint=tmp_path / "run.sqlite"
    ) as results:
        assert [r async for r in results] == [x * x for x in range(50)]
    stats = results.stats
    assert (stats.started, stats.completed, stats.in_flight) == (50, 50, 0)
    await no_worker_left()
