"""The ways people fan out async calls, as interchangeable functions.

The seeds ask "should I gather everything at once, batch it, use a semaphore, or
a queue of workers?". To answer with measurements, every answer has to be a
function with the same shape, run on the same workload::

    results = await strategy(fn, items, limit)

where ``fn`` is an ``async def`` function of one item, ``items`` an iterable and
``limit`` the most calls the strategy may have in flight (``None``: no limit).
Each returns the results as a list **in input order**, and raises the first
exception ``fn`` raises.

They are not equally good citizens, and the differences are what the lab shows:

- ``gather_all`` and ``gather_five_batches`` ignore ``limit`` (the seeds' way);
- ``gather_all``, ``semaphore_tasks`` and ``aiometer_amap`` materialise the
  whole input (a coroutine or a Task per item exists before the first call
  ends), so their memory grows with the number of items, not with ``limit``;
- ``iterator_workers`` is the hand-written baseline every ratio is taken
  against: ``limit`` worker coroutines pulling from one shared iterator, no Task
  per item; corral's engine is built on the same idea.

:data:`STRATEGIES` lists them with these properties, for the benchmark, the lab
and ``corral demo``. Importing this module imports no third-party package:
aiometer, aiostream and aiojobs are imported inside the functions that use them, and
:func:`unavailable` says whether one can run here.

Reference:

``STRATEGIES``
    ``{name: StrategyInfo}``, in the order tables list them.
``BASELINE``
    The name of the strategy ratios are relative to (``"iterator_workers"``).
``unavailable(name)``
    ``None`` if the strategy can run in this environment, else the reason.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import inspect
import itertools
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

__all__ = [
    "BASELINE",
    "STRATEGIES",
    "Strategy",
    "StrategyInfo",
    "aiojobs_scheduler",
    "aiometer_amap",
    "aiostream_map",
    "corral_gather",
    "corral_map",
    "gather_all",
    "gather_batched",
    "gather_five_batches",
    "iterator_workers",
    "queue_workers",
    "semaphore_tasks",
    "unavailable",
]

T = TypeVar("T")
R = TypeVar("R")


class Strategy(Protocol):
    """``await strategy(fn, items, limit)``: every result of ``fn``, in input order."""

    def __call__(
        self, fn: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int | None, /
    ) -> Coroutine[Any, Any, list[R]]: ...


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 or None (no limit); got limit={limit!r}")


def _width(items: Iterable[T], limit: int | None) -> tuple[Iterable[T], int]:
    """How many workers to start: ``limit``, or one per item when there is no limit.

    Without a limit the number of items is needed, so an input without ``len()``
    is materialised here (a ``range`` is not: it has a length).
    """
    _check_limit(limit)
    if limit is not None:
        return items, limit
    sized = items if isinstance(items, Sized) else list(items)
    # At least one worker, so that an empty input still ends the same way.
    return sized, max(1, len(sized))


async def _run_tasks(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run coroutines as sibling tasks; the first failure cancels the rest and is raised.

    A TaskGroup gives the structure (nothing left running on any exit); the
    failure is unwrapped from its ExceptionGroup so that every strategy fails
    the way ``asyncio.gather`` does, with the exception ``fn`` raised.
    """
    try:
        async with asyncio.TaskGroup() as group:
            for coro in coros:
                group.create_task(coro)
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None


# --------------------------------------------------------------------------------------
# The seeds' strategies
# --------------------------------------------------------------------------------------


async def gather_all(
    fn: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int | None
) -> list[R]:
    """Seed 001's "unbatched" (and seed 002's step 1): one ``asyncio.gather`` over every item.

    ``limit`` is ignored: every call starts at once, a Task per item.
    """
    _check_limit(limit)
    return await asyncio.gather(*(fn(x) for x in items))


async def gather_batched(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T],
    limit: int | None,
    *,
    batches: int | None = None,
) -> list[R]:
    """Seed 002's step 2: ``asyncio.gather`` over consecutive batches of ``limit`` items.

    Each batch must finish entirely before the next starts, so one slow call
    idles the other ``limit - 1`` slots. Items are pulled a batch at a time.
    ``limit=None`` is one batch of everything (``gather_all``).

    With ``batches=k`` the input is instead materialised and cut into ``k``
    batches of ``ceil(len / k)`` items, ignoring ``limit`` (seed 001's
    "batched", ``k=5``; see :func:`gather_five_batches`).
    """
    _check_limit(limit)
    chunks: Iterable[Sequence[T]]
    if batches is not None:
        if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
            raise ValueError(f"batches must be an int >= 1 or None; got batches={batches!r}")
        everything = list(items)
        size = max(1, math.ceil(len(everything) / batches))
        chunks = (everything[k : k + size] for k in range(0, len(everything), size))
    elif limit is None:
        chunks = [list(items)]
    else:
        pending = iter(items)
        chunks = iter(lambda: list(itertools.islice(pending, limit)), [])
    results: list[R] = []
    for chunk in chunks:
        results.extend(await asyncio.gather(*(fn(x) for x in chunk)))
    return results


async def gather_five_batches(
    fn: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int | None
) -> list[R]:
    """Seed 001's "batched": the whole input cut into 5 batches, gathered one after the other.

    ``limit`` is ignored (each batch holds a fifth of the items).
    """
    return await gather_batched(fn, items, limit, batches=5)


async def semaphore_tasks(
    fn: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int | None
) -> list[R]:
    """The common recipe (no seed; the usual forum answer): a Task per item + ``Semaphore(limit)``.

    At most ``limit`` calls run, but every Task (and its coroutine) exists from
    the start, so memory grows with the number of items.
    """
    items, width = _width(items, limit)
    gate = asyncio.Semaphore(width)

    async def one(x: T) -> R:
        async with gate:
            return await fn(x)

    return await asyncio.gather(*(one(x) for x in items))


async def queue_workers(
    fn: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int | None
) -> list[R]:
    """Seed 002's step 3 done right: ``limit`` workers fed through a bounded ``asyncio.Queue``.

    The seed's version queues everything up front, never stops its workers
    cleanly and loses the results. Here a producer task puts ``(index, item)``
    into a queue of ``limit`` slots, so items are pulled only as workers free
    up; one ``None`` per worker ends them; results land at their index; the
    first failure cancels producer and workers (a TaskGroup).
    """
    items, width = _width(items, limit)
    jobs: asyncio.Queue[tuple[int, T] | None] = asyncio.Queue(maxsize=width)
    results: list[Any] = []

    async def produce() -> None:
        for i, x in enumerate(items):
            results.append(None)  # the slot exists before any worker can fill it
            await jobs.put((i, x))
        for _ in range(width):
            await jobs.put(None)

    async def work() -> None:
        while (job := await jobs.get()) is not None:
            i, x = job
            results[i] = await fn(x)

    await _run_tasks(itertools.chain([produce()], (work() for _ in range(width))))
    return results


async def iterator_workers(
    fn: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int | None
) -> list[R]:
    """The hand-written baseline: ``limit`` workers pulling ``(i, x)`` from one shared iterator.

    No Task, queue or lock per item: a worker takes the next item, awaits
    ``fn`` and stores the result at its index. Items are pulled only when a
    worker is free. The fastest known pattern, so every ratio is relative to it.
    """
    items, width = _width(items, limit)
    shared = enumerate(items)
    results: list[Any] = []

    async def work() -> None:
        for i, x in shared:
            # Items leave the shared iterator in index order, and no await
            # separates next() from this append: the new slot is index i.
            results.append(None)
            results[i] = await fn(x)

    await _run_tasks(work() for _ in range(width))
    return results


# --------------------------------------------------------------------------------------
# Libraries
# --------------------------------------------------------------------------------------


async def aiometer_amap(
    fn: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int | None
) -> list[R]:
    """aiometer (a peer library): ``aiometer.run_all`` with ``max_at_once=limit``.

    ``run_all`` is ``aiometer.amap`` collecting results by index. It takes a
    sequence, so the input is materialised (a ``functools.partial`` per item),
    and it starts an anyio task per item.
    """
    _check_limit(limit)
    import aiometer

    calls = [functools.partial(fn, x) for x in items]
    results: list[R] = await aiometer.run_all(calls, max_at_once=limit)
    return results


async def aiostream_map(
    fn: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int | None
) -> list[R]:
    """aiostream (a peer library): ``stream.map(..., ordered=True, task_limit=limit)``.

    Pulls items lazily; runs each call in its own task, plus tasks of its own
    to drive the stream.
    """
    _check_limit(limit)
    from aiostream import async_, stream

    # aiostream awaits only what inspect calls a coroutine function; an object
    # with an async __call__ (or a partial) must be wrapped, at one more frame.
    call: Any = fn if inspect.iscoroutinefunction(fn) else async_(fn)
    mapped: Any = stream.map(stream.iterate(items), call, ordered=True, task_limit=limit)
    return cast("list[R]", await stream.list(mapped))


async def aiojobs_scheduler(
    fn: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int | None
) -> list[R]:
    """aiojobs (a peer library): ``Scheduler(limit=limit)``, one spawned job per item.

    ``spawn`` waits while ``limit`` jobs are active and ``limit`` more are
    pending, so the input is pulled lazily; each job is a Task, and a job's
    exception goes to the scheduler's handler rather than to the caller, so it
    is collected here and raised at the end.
    """
    _check_limit(limit)
    import aiojobs

    results: dict[int, R] = {}
    errors: list[BaseException] = []

    def on_error(_scheduler: Any, context: dict[str, Any]) -> None:
        errors.append(context["exception"])

    async def one(index: int, item: T) -> None:
        results[index] = await fn(item)

    width = limit if limit is not None else 10_000
    async with aiojobs.Scheduler(
        limit=limit, pending_limit=width, wait_timeout=None, exception_handler=on_error
    ) as scheduler:
        count = 0
        for count, item in enumerate(items, 1):
            await scheduler.spawn(one(count - 1, item))
    if errors:
        raise errors[0]
    return [results[i] for i in range(count)]


async def corral_gather(
    fn: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int | None
) -> list[R]:
    """corral: ``await corral.gather(fn, items, limit=limit)``."""
    import corral

    return await corral.gather(fn, items, limit=limit)


async def corral_map(
    fn: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int | None
) -> list[R]:
    """corral's streaming form: ``async with corral.map(fn, items, limit=limit)``, collected."""
    import corral

    async with corral.map(fn, items, limit=limit) as results:
        return [r async for r in results]


# --------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StrategyInfo:
    """A strategy and what it promises.

    Attributes:
        name: the function's name, used in tables and on the command line.
        run: the strategy itself.
        origin: where it comes from (a seed, a library, corral).
        bounded: never more than ``limit`` calls in flight.
        lazy: pulls items as capacity frees (memory O(limit)); ``False`` means it
            materialises the input, a Task, coroutine or callable per item.
        needs: what must be importable, as ``"module"`` or ``"module.attribute"``
            (``""``: only the standard library).
    """

    name: str
    run: Strategy
    origin: str
    bounded: bool
    lazy: bool
    needs: str = ""


STRATEGIES: dict[str, StrategyInfo] = {
    info.name: info
    for info in [
        StrategyInfo("gather_all", gather_all, "seed 001 unbatched", bounded=False, lazy=False),
        StrategyInfo("gather_batched", gather_batched, "seed 002 batches", bounded=True, lazy=True),
        StrategyInfo(
            "gather_five_batches",
            gather_five_batches,
            "seed 001 batched",
            bounded=False,
            lazy=False,
        ),
        StrategyInfo("semaphore_tasks", semaphore_tasks, "common recipe", bounded=True, lazy=False),
        StrategyInfo("queue_workers", queue_workers, "seed 002 queue", bounded=True, lazy=True),
        StrategyInfo(
            "iterator_workers", iterator_workers, "hand-written baseline", bounded=True, lazy=True
        ),
        StrategyInfo(
            "aiometer_amap", aiometer_amap, "aiometer", bounded=True, lazy=False, needs="aiometer"
        ),
        StrategyInfo(
            "aiostream_map", aiostream_map, "aiostream", bounded=True, lazy=True, needs="aiostream"
        ),
        StrategyInfo(
            "aiojobs_scheduler",
            aiojobs_scheduler,
            "aiojobs",
            bounded=True,
            lazy=True,
            needs="aiojobs",
        ),
        StrategyInfo(
            "corral_gather", corral_gather, "corral", bounded=True, lazy=True, needs="corral.gather"
        ),
        StrategyInfo(
            "corral_map", corral_map, "corral", bounded=True, lazy=True, needs="corral.map"
        ),
    ]
}

BASELINE = "iterator_workers"


def unavailable(name: str) -> str | None:
    """``None`` if strategy ``name`` can run here, else why not (and how to fix it).

    Raises:
        KeyError: ``name`` is not in :data:`STRATEGIES`.
    """
    try:
        info = STRATEGIES[name]
    except KeyError:
        raise KeyError(f"no strategy named {name!r}; choose from {', '.join(STRATEGIES)}") from None
    if not info.needs:
        return None
    module, _, attribute = info.needs.partition(".")
    if importlib.util.find_spec(module) is None:
        return f"needs {module}: pip install 'corral[peers]'"
    if attribute and not hasattr(importlib.import_module(module), attribute):
        return f"{info.needs} does not exist in this build of corral"
    return None
