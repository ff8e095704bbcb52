"""After a deadline with return_exceptions, a checkpointed map reports the rest of its
input as not run without screening it: no ``item_id`` call and no recorded id for an
item that never runs, so the report's memory does not grow with the input.

The deadline passes when the test says so, on a loop whose clock is real time plus an
offset the test moves forward: a checkpoint's writes run on a thread, and a virtual
clock would jump whenever the loop waits for it (see tests/test_contract_longrun.py).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import corral
from _loops import run_offset, skip_offset_once

pytestmark = pytest.mark.slow  # a checkpoint's writes run on a thread of its own

HOUR = 3600.0
LIMIT = 4  # the pool's size, so the input is pulled 4 items at a time
QUICK = 6  # items below this return at once; the others wait until the deadline
COUNT = 2000


class Stalls:
    """fn: the items from QUICK on wait for ever; ``stalled`` is set once LIMIT of them wait."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.waiting = 0
        self.stalled = asyncio.Event()
        self.never = asyncio.Event()

    async def __call__(self, item: int) -> int:
        self.calls.append(item)
        if item >= QUICK:
            self.waiting += 1
            if self.waiting == LIMIT:
                self.stalled.set()
            await self.never.wait()
        await asyncio.sleep(0)
        return item * 10


def _generated(count: int) -> Iterator[int]:
    yield from range(count)


INPUTS: dict[str, Callable[[], Iterable[int]]] = {
    "list": lambda: list(range(COUNT)),
    "range": lambda: range(COUNT),
    "generator": lambda: _generated(COUNT),
}


@pytest.mark.parametrize("kind", list(INPUTS))
def test_the_rest_of_the_input_is_reported_without_computing_its_ids(
    tmp_path: Path, kind: str
) -> None:
    identified: list[int] = []

    def item_id(item: int) -> int:
        identified.append(item)
        return item

    async def main() -> tuple[list[Any], corral.Stats, Stalls]:
        fn = Stalls()
        stream = corral.map(
            fn,
            INPUTS[kind](),
            limit=LIMIT,
            deadline=HOUR,
            return_exceptions=True,
            checkpoint=tmp_path / "run.sqlite",
            item_id=item_id,
        )

        mover = asyncio.ensure_future(skip_offset_once(fn.stalled, HOUR))
        try:
            async with stream as results:
                got = [r async for r in results]
        finally:
            mover.cancel()
        return got, results.stats, fn

    # The guard outlasts the skip by a minute of real time.
    got, stats, fn = run_offset(lambda: asyncio.wait_for(main(), HOUR + 60))

    # Every item has exactly one outcome, in input order.
    assert len(got) == COUNT
    assert got[:QUICK] == [i * 10 for i in range(QUICK)]
    assert sorted(fn.calls) == list(range(QUICK + LIMIT))
    for i in range(QUICK, COUNT):
        assert type(got[i]) is corral.DeadlineExceeded, (i, got[i])
        when = "while" if i < QUICK + LIMIT else "before"
        assert f"the deadline passed {when} item {i} " in str(got[i])
    # item_id ran once for each item pulled (in chunks of LIMIT) before the
    # deadline, and for none of those reported after it.
    assert all(n == 1 for n in Counter(identified).values()), identified
    pulled = len(identified)
    assert identified == list(range(pulled))
    assert QUICK + LIMIT <= pulled <= QUICK + 2 * LIMIT, identified
    assert (stats.started, stats.completed, stats.failed) == (QUICK + LIMIT, QUICK, LIMIT)
    assert stats.in_flight == 0


def _breaks_at(count: int) -> Iterator[int]:
    yield from range(count)
    raise ValueError(f"the input broke after {count} items")


def test_an_input_that_raises_while_reported_fails_the_map_without_computing_ids(
    tmp_path: Path,
) -> None:
    identified: list[int] = []

    def item_id(item: int) -> int:
        identified.append(item)
        return item

    async def main() -> list[Any]:
        fn = Stalls()
        got: list[Any] = []

        mover = asyncio.ensure_future(skip_offset_once(fn.stalled, HOUR))
        try:
            with pytest.raises(ValueError, match="broke after 500 items"):
                async with corral.map(
                    fn,
                    _breaks_at(500),
                    limit=LIMIT,
                    deadline=HOUR,
                    return_exceptions=True,
                    checkpoint=tmp_path / "run.sqlite",
                    item_id=item_id,
                ) as results:
                    async for r in results:
                        got.append(r)
        finally:
            mover.cancel()
        return got

    got = run_offset(lambda: asyncio.wait_for(main(), HOUR + 60))
    assert got[:QUICK] == [i * 10 for i in range(QUICK)]
    assert len(got) <= 500
    assert all(type(r) is corral.DeadlineExceeded for r in got[QUICK:])
    assert identified == list(range(len(identified)))
    assert len(identified) <= QUICK + 2 * LIMIT, identified
