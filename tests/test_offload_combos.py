"""CPU offload and processes=N with other features at once: crashes, progress, retries,
values that cannot cross, early exits. Each run is bounded by a hang guard."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from pathlib import Path
from typing import Any

import pytest

import corral
from _work import (
    async_logged,
    async_logged_dies_at_25,
    async_odd_result,
    crash_once,
    fail_on_three,
    logged_calls,
    no_worker_left,
    odd_result,
    spin,
    worker_processes,
)

pytestmark = pytest.mark.slow

GUARD = 30  # seconds: a hang fails the test instead of stalling the suite


def counts(stats: corral.Stats) -> tuple[int, int, int, int]:
    return stats.started, stats.completed, stats.failed, stats.in_flight


async def test_a_crashed_process_leaves_stats_that_add_up_with_progress(tmp_path: Path) -> None:
    """progress= puts the engine in front of processes=2; a child dies with items queued:
    WorkerCrashed, and the final stats (and the last snapshot) count as started every call
    that ended and the one cut short, and no more calls than fn saw."""
    log = tmp_path / "calls"
    snapshots: list[corral.Stats] = []
    got: list[int] = []
    async with asyncio.timeout(GUARD):
        with pytest.raises(corral.WorkerCrashed):
            async with corral.map(
                async_logged_dies_at_25,
                [(str(log), x) for x in range(60)],
                processes=2,
                limit=4,
                progress=snapshots.append,
            ) as out:
                async for value in out:
                    got.append(value)
    assert got == [x * x for x in range(len(got))]
    stats = out.stats
    assert stats.in_flight == 0
    assert stats.completed >= len(got)
    # Item 25 was called (its start reported before it died) and neither completed nor failed.
    assert stats.started >= stats.completed + stats.failed + 1, counts(stats)
    assert stats.started <= len(logged_calls(log)) + 1  # item 25 dies before its log line
    assert counts(snapshots[-1]) == counts(stats)
    await no_worker_left()


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_killed_worker_reruns_its_items_once_with_retries_and_progress(
    tmp_path: Path, ordered: bool
) -> None:
    """executor='process' with retries and progress=: the worker running a marked item
    dies once; every item ends once, the last snapshot matches the stats, nothing is left
    in flight and no worker outlives the map."""
    snapshots: list[corral.Stats] = []
    args = [(str(tmp_path), x, x == 7) for x in range(40)]
    async with asyncio.timeout(GUARD):
        async with corral.map(
            crash_once,
            args,
            executor="process",
            limit=4,
            retries=corral.Retry(attempts=2, backoff=0.001),
            ordered=ordered,
            return_exceptions=True,
            progress=snapshots.append,
        ) as out:
            got = [value async for value in out]
    assert (got if ordered else sorted(got)) == list(range(40))
    assert counts(out.stats)[1:] == (40, 0, 0)
    assert counts(snapshots[-1]) == counts(out.stats)
    await no_worker_left()


@pytest.mark.parametrize("processes", [None, 2])
async def test_values_that_cannot_cross_fail_in_place_unordered_with_progress(
    processes: int | None,
) -> None:
    """Results or exceptions that cannot be pickled or loaded, as completed, with
    return_exceptions and progress=: each fails its own item; every other result comes
    once; the counts match what was handed out."""
    kinds = ["plain", "lambda", "plain", "unloadable", "raise-unloadable"] * 4
    snapshots: list[corral.Stats] = []
    keywords: dict[str, Any] = (
        {"executor": "process"} if processes is None else {"processes": processes}
    )
    fn = odd_result if processes is None else async_odd_result
    async with asyncio.timeout(GUARD):
        async with corral.map(
            fn,
            [("/dev/null", x, kind) for x, kind in enumerate(kinds)],
            limit=4,
            ordered=False,
            return_exceptions=True,
            progress=snapshots.append,
            **keywords,
        ) as out:
            got = [value async for value in out]
    failures = [value for value in got if isinstance(value, Exception)]
    assert len(got) == len(kinds)
    assert len(failures) == len(kinds) - kinds.count("plain")
    final = counts(out.stats)
    assert final == (len(kinds), len(kinds) - len(failures), len(failures), 0)
    assert counts(snapshots[-1]) == final
    await no_worker_left()


@pytest.mark.parametrize("mode", ["process", "processes"])
async def test_a_break_out_of_an_endless_input_stops_every_worker(mode: str) -> None:
    """An endless generator, results as completed, progress=: a break after 30 results
    ends the map; nothing is left in flight and no worker outlives it."""
    snapshots: list[corral.Stats] = []
    keywords: dict[str, Any] = {"executor": "process"} if mode == "process" else {"processes": 2}
    fn = spin if mode == "process" else async_logged
    xs = itertools.count() if mode == "process" else (("/dev/null", x) for x in itertools.count())
    got: list[int] = []
    async with asyncio.timeout(GUARD):
        async with corral.map(
            fn, xs, limit=4, ordered=False, progress=snapshots.append, **keywords
        ) as out:
            async for value in out:
                got.append(value)
                if len(got) == 30:
                    break
    assert len(set(got)) == 30
    assert snapshots[-1].in_flight == 0
    assert snapshots[-1].completed >= 30
    await no_worker_left()


async def test_a_failure_on_processes_with_retries_ends_the_map_as_itself() -> None:
    """executor='process', a fn failing on item 3 (not transient: not retried), as
    completed: the KeyError ends the map; no worker is left."""
    async with asyncio.timeout(GUARD):
        with pytest.raises(KeyError, match="bad item 3"):
            async with corral.map(
                fail_on_three, range(40), executor="process", limit=4, retries=2, ordered=False
            ) as out:
                async for _ in out:
                    pass
    assert out.stats.in_flight == 0
    assert out.stats.retried == 0
    await no_worker_left()


async def test_a_worker_killed_from_outside_on_processes_ends_the_map(tmp_path: Path) -> None:
    """SIGKILL from outside to one of processes=2 mid-run, return_exceptions=True: the map
    ends with WorkerCrashed (not an item's failure), results before it once each."""
    log = tmp_path / "calls"
    got: list[Any] = []
    async with asyncio.timeout(GUARD):
        with pytest.raises(corral.WorkerCrashed, match="SIGKILL"):
            async with corral.map(
                async_logged,
                [(str(log), 10**6 if x >= 8 else x) for x in range(40)],
                processes=2,
                limit=4,
                return_exceptions=True,
            ) as out:
                async for value in out:
                    got.append(value)
                    if len(got) == 8:  # the rest sleep: both children are busy
                        os.kill(max(worker_processes()), signal.SIGKILL)
    assert got == [x * x for x in range(8)]
    assert out.stats.in_flight == 0
    await no_worker_left()
