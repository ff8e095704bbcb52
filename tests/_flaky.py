"""Calls that fail on a fixed schedule, logging every attempt to files: retry budgets elsewhere.

Worker processes and Ray actors import these by name (or receive them by
value), so they live at module level and keep no state in memory: each
attempt appends a byte to ``DIRECTORY/ITEM``, whose size is then the attempt
number, and the whole directory's size is the map's attempts, whichever
process or actor made them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import corral

#: Attempts of one item that fail, out of every attempt, for half_failing.
FAIL_RATE = 0.5
#: The retry budget's floor in these tests.
FLOOR = 10


def budgeted_retry(*, ratio: float, attempts: int) -> corral.Retry:
    """Retries on a budget of ``ratio`` and FLOOR, whose window outlasts the run: one floor."""
    budget = corral.RetryBudget(ratio=ratio, floor=FLOOR, window=600.0)
    return corral.Retry(attempts=attempts, backoff=0.001, budget=budget)


def jobs(directory: str | Path, items: int) -> list[tuple[str, int]]:
    """The input of half_failing and always_failing: items logging to ``directory``."""
    return [(str(directory), item) for item in range(items)]


def _log_attempt(directory: str, item: int) -> int:
    """Record one attempt of ``item``; return its number (1 for the first)."""
    path = Path(directory, str(item))
    with path.open("ab") as log:
        log.write(b".")
        return log.tell()


def fails(item: int, attempt: int) -> bool:
    """Whether ``attempt`` of ``item`` fails: a seeded draw, the same in every process."""
    return random.Random(f"{item}/{attempt}").random() < FAIL_RATE


async def half_failing(job: tuple[str, int]) -> int:
    """Fails half its attempts (ConnectionError, retried by default), on a fixed schedule."""
    directory, item = job
    if fails(item, _log_attempt(directory, item)):
        raise ConnectionError(f"flaky {item}")
    return item


async def always_failing(job: tuple[str, int]) -> int:
    """Fails every attempt with a ConnectionError."""
    directory, item = job
    attempt = _log_attempt(directory, item)
    raise ConnectionError(f"item {item}, attempt {attempt}")


def attempts_logged(directory: str | Path) -> int:
    """Every attempt any process or actor made with ``directory``."""
    return sum(path.stat().st_size for path in Path(directory).iterdir())


async def collect(fn: Any, items: Any, **options: Any) -> tuple[list[Any], corral.Stats]:
    """Every result of ``corral.map(fn, items, **options)``, and its final stats."""
    async with corral.map(fn, items, **options) as out:
        return [r async for r in out], out.stats


def check_budget_held(
    directory: Path, results: list[Any], stats: corral.Stats, *, attempts: int
) -> None:
    """A run of half_failing over ``range(len(results))`` kept to a 10 % retry budget.

    Its attempts stay within ``1.1 x items + FLOOR``, where every retry allowed
    would take about twice the items; the items refused a retry fail with
    RetryBudgetExhausted, its cause the last failure; stats count it all.
    """
    items = len(results)
    made = attempts_logged(directory)
    assert attempts_without_budget(items, attempts) > 1.8 * items  # what the budget holds back
    assert items < made <= 1.1 * items + FLOOR
    assert stats.retried == made - items
    # Exactly the budget, summed over the workers: one floor, 10 % of the successes.
    assert stats.retried <= FLOOR + 0.1 * stats.completed
    exhausted = [r for r in results if isinstance(r, corral.RetryBudgetExhausted)]
    assert exhausted, "the budget must have refused retries"
    assert all(r.__cause__ is r.error and isinstance(r.error, ConnectionError) for r in exhausted)
    failed = sum(isinstance(r, Exception) for r in results)
    assert (stats.started, stats.completed, stats.failed) == (items, items - failed, failed)
    ok = [(item, r) for item, r in enumerate(results) if not isinstance(r, Exception)]
    assert all(item == r for item, r in ok)  # in input order


def attempts_without_budget(items: int, attempts: int) -> int:
    """The attempts ``half_failing`` takes over ``range(items)`` when every retry is allowed."""
    total = 0
    for item in range(items):
        attempt = 1
        while attempt < attempts and fails(item, attempt):
            attempt += 1
        total += attempt
    return total
