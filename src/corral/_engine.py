"""The worker engine: lazy input, a pool of worker coroutines, delivery, errors.

Why workers and not a task per item
-----------------------------------
The obvious way to run N calls with a limit is one Task per item plus a
semaphore. A Task costs a few microseconds to create and schedule, and the
semaphore another wake-up; on this project's benchmark that pattern costs
11-24 µs per item while a handful of long-lived worker coroutines pulling from
one shared iterator cost 0.3 µs (no-op call) to 2 µs (one ``sleep(0)``). So the
engine is a pool of workers, each looping "pull an item, await the call, hand
the result over". A worker suspends only inside the call (or when it must wait
for room, see below), so the loop body is the whole per-item cost and is kept
free of anything not needed for the configuration at hand: timeouts, retries,
limiters and rates are wrapped around the call only when asked for.

The pool grows lazily: it starts with one worker and, whenever every worker is
inside a call, doubles (up to the limit). A no-op workload therefore never
creates more than a couple of tasks, and a 1000-wide I/O workload reaches 1000
workers in ten loop iterations.

Bounded memory
--------------
Items are pulled only by a worker about to call ``fn`` (a checkpointed map
pulls a plain input ahead by up to 256 items, never more than its limit, see
:class:`_ChunkedSource`; an async input is read ahead by a feeder task into a
buffer of up to ``limit`` items, so up to twice the limit are pulled while
every call is busy). Results wait for the
consumer in a buffer; a worker that pulled item ``i`` does not call ``fn`` until
``i < consumed + window``. In input order this bounds the reorder buffer behind
a slow head item; as completed it bounds the results the consumer has not taken
yet. Either way memory is O(window), never O(items).

Errors and cleanup
------------------
A call that fails (after its retries) with ``return_exceptions=False`` ends the
run: the other workers are cancelled at their next suspension, nothing more is
pulled, and the consumer gets the original exception once every task the run
started has finished. Leaving early (``break``, an exception in the consumer,
cancellation) goes through the same :meth:`Engine.aclose`.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import heapq
import itertools
import logging
import reprlib
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
)
from typing import Any, Generic, Protocol, TypeVar

from ._errors import DeadlineExceeded
from ._stats import EXACT_SAMPLES, SAMPLE_STRIDE, LatencyHistogram, Stats, Waiting

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger("corral")

Call = Callable[[Any], Awaitable[Any]]
#: A chunk of a sync input (see _ChunkedSource): a list, or a range sliced from a range.
Chunk = list[Any] | range
#: Items a screened sync input is pulled by at a time (at most).
CHUNK = 256


class _Phase(enum.Enum):
    IDLE = "idle"  # created; no task started yet
    RUNNING = "running"  # workers pulling items
    CLOSING = "closing"  # failed, cancelled or left early: tasks being cancelled and awaited
    CLOSED = "closed"  # every task the run started has finished


#: Only one task waits for a map's next result at a time: a second one would
#: never be woken (each result wakes one waiter), so it is refused.
CONCURRENT_READERS = (
    "another task is already waiting for this map's next result: a map's results "
    "are read by one task at a time (to share them, pass them on through an asyncio.Queue)"
)


#: Closes of runs whose consumer dropped them, until they end: the loop keeps
#: only weak references to its tasks, and one collected midway never finishes.
_BACKGROUND_CLOSES: set[asyncio.Task[None]] = set()


def close_in_background(
    loop: asyncio.AbstractEventLoop, aclose: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    """Run ``aclose()`` on ``loop`` with nobody to await it; log what it raises.

    For a stream dropped unclosed (``break`` out of a plain ``async for``),
    from ``__del__``, which may run in any thread. The close cancels and
    awaits what the run started; it fails only if closing the input does (an
    async generator raising in its ``finally``), and nobody is left to tell
    but the log.
    """

    def start() -> None:
        keep_until_done(
            loop.create_task(aclose()), "closing a map whose results were dropped unclosed"
        )

    loop.call_soon_threadsafe(start)


def keep_until_done(task: asyncio.Task[None], what: str) -> None:
    """Hold ``task`` (a close nobody awaits) until it ends, and log what it raises."""
    _BACKGROUND_CLOSES.add(task)
    task.add_done_callback(functools.partial(_background_close_done, what))


def _background_close_done(what: str, task: asyncio.Task[None]) -> None:
    _BACKGROUND_CLOSES.discard(task)
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.error("corral: %s failed", what, exc_info=error)


class Halt(BaseException):
    """Raised by a call wrapper instead of starting an item: the run must stop starting.

    A BaseException so that no retry policy or ``except Exception`` in a
    wrapper mistakes it for the call's failure. ``reason`` is raised to the
    consumer once everything in flight has finished. ``started``: the item
    was called all the same (the stop refused its retry, or its result), so
    the stats count it as started, as a call cut short.
    """

    def __init__(self, reason: BaseException, *, started: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.started = started


class Observer(Protocol):
    """Something that runs alongside a run: started with it, stopped after it (no per-item hook).

    ``stop()`` is called once the run's stats are final, on every way out
    (end, failure, ``break``, cancellation); neither method may raise.
    """

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Recorder(Protocol):
    """Sees each call's outcome before it is delivered (``checkpoint=``).

    ``result`` runs in the worker right after the call returns, before the
    result is delivered, and may raise only :class:`Halt`; ``failure`` (a
    failure delivered with ``return_exceptions=True``) and ``halted`` (the
    call raised :class:`Halt`) never raise; ``direct`` tells them the item was
    called directly (a chunk ``screen`` passed), not through the wrapper. A
    hook, not a call wrapper: an extra coroutine around every call costs more
    than the whole record.
    """

    def result(self, item: Any, value: Any) -> None: ...

    def failure(self, item: Any, exc: Exception, direct: bool) -> None: ...

    def halted(self, item: Any, halt: Halt, direct: bool) -> None: ...

    @property
    def screen(self) -> Callable[[Chunk], bool] | None:
        """Whether a chunk of a sync input may take the direct path (see
        :class:`_ChunkedSource`); None: no direct path, items go one by one."""

    def prepare(self) -> Awaitable[None]:
        """Before a run of chunks: whatever the screen needs (it never raises)."""

    def backlogged(self) -> bool:
        """Whether the next run should start only after :meth:`prepare` (a commit)."""

    @property
    def direct(self) -> Call:
        """The call for the items of a chunk ``screen`` passed (no per-item wrapper)."""

    @property
    def rows(self) -> list[Any]:
        """Where a passed item's plain result goes: its id, value, appended flat."""

    @property
    def plain(self) -> frozenset[type]:
        """The result types that go to ``rows`` as they are."""

    def first(self, key: Any, value: Any) -> None:
        """A plain result when ``rows`` is empty (it may raise Halt only)."""

    def other(self, key: Any, item: Any, value: Any) -> None:
        """A passed item's result of another type (it may raise Halt only)."""

    @property
    def keyed(self) -> Callable[[int], Any] | None:
        """A passed item's id, taken by ``id(item)``; None: each item is its own id."""


class Run(Protocol):
    """What a :class:`ResultStream` drives: an :class:`Engine`, or a map run elsewhere.

    ``ready`` holds the results ready for the consumer; ``take()`` hands out
    the first; ``wait_next()`` waits until one is ready (True) or the run is
    over (False), raising its error.
    """

    @property
    def ready(self) -> deque[Any]: ...

    @property
    def finished(self) -> bool: ...

    def start(self) -> None: ...

    def take(self) -> Any: ...

    async def wait_next(self) -> bool: ...

    def stats(self) -> Stats: ...

    def cancel(self) -> None: ...

    async def aclose(self) -> None: ...

    def abandon(self) -> None: ...


async def wait_closed(closed: asyncio.Future[None]) -> None:
    """Wait for another task's close to finish (``closed`` is set when it has).

    A cancellation meanwhile is raised after it, as a close raises its own:
    a second ``aclose()`` that returned at once would leave the first still
    stopping what the map started, past the caller's ``async with``.
    """
    interrupted: asyncio.CancelledError | None = None
    while not closed.done():
        try:
            await asyncio.shield(closed)
        except asyncio.CancelledError as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted


class _Retried:
    """A mutable counter the call wrappers share with the engine's stats."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


# ---------------------------------------------------------------------------
# Input sources
#
# Workers iterate a *synchronous* iterator of (index, item) pairs in a plain
# ``for`` loop, the fastest way to pull. For a sync input that iterator is
# ``enumerate(items)`` and covers the whole run. For an async input a feeder
# task pulls from the async iterator into a small buffer, and the workers'
# iterator yields what is buffered; when it runs dry a worker awaits
# ``refill()`` and goes round again.
# ---------------------------------------------------------------------------


class _SyncSource:
    __slots__ = ("pairs",)

    def __init__(self, items: Iterable[Any]) -> None:
        self.pairs: Iterator[tuple[int, Any]] = enumerate(items)

    def pulled(self) -> int:
        # enumerate keeps its next index privately; __reduce__ exposes it
        # without a per-item counter on the hot path.
        state: Any = self.pairs.__reduce__()
        return int(state[1][1])

    async def refill(self) -> bool:
        return False  # a sync input is exhausted when its iterator is

    def rest(self) -> Iterator[tuple[int, Any]]:
        """The pairs no worker took, for reporting items that will never run."""
        return self.pairs

    def start(self, engine: Engine[Any, Any]) -> asyncio.Task[None] | None:
        return None  # a sync input needs no feeder

    async def close(self) -> None:
        pass


class _ChunkedSource:
    """A sync input pulled ``size`` items at a time, each chunk screened first.

    ``size`` is ``CHUNK`` or the pool's size if smaller: the input is pulled
    ahead of the calls by at most as many items as the workers could hold.

    A checkpointed map's recorder (see _checkpoint) checks a whole chunk of
    ids against those recorded in a few C-level set operations instead of a
    Python function call per item. A chunk it passes (every item new, none
    repeated) is called with the recorder's ``direct`` call and recorded by
    two list appends in the worker; any other chunk goes item by item through
    the engine's usual call and hooks. A ``range`` is sliced instead of
    iterated, so its chunks are ranges, which the screen passes without a
    pass over their ids (when they ascend, as most ranges do).

    The workers share one iterator of (index, item) pairs, as they share
    ``enumerate`` on a plain input: a *run* of chunks of one kind, chained in
    C, so a worker takes its next item without leaving its loop. A run of
    chunks of one verdict goes on for as long as the chunks get it; a chunk
    that does not (or, in a run of passed chunks, a recorder that asks to
    wait, :meth:`Recorder.backlogged`) ends it, and the worker that finds the
    run ended starts the next one in :meth:`refill`, where it may wait (the
    file's opening, a commit).
    """

    __slots__ = (
        "_current",
        "_error",
        "_exhausted",
        "_held",
        "_held_direct",
        "_items",
        "_lock",
        "_next",
        "_range",
        "_range_at",
        "_recorder",
        "_screen",
        "_size",
        "_spent",
        "direct",
        "pairs",
    )

    def __init__(self, items: Iterable[Any], recorder: Recorder, size: int) -> None:
        assert recorder.screen is not None
        self._size = size
        self._range = items if type(items) is range else None
        self._range_at = 0  # the next item's position in _range
        self._items = iter(items)
        self._recorder = recorder
        self._screen = recorder.screen
        self.pairs: Iterator[tuple[int, Any]] = iter(())
        self.direct = False  # whether the current run's chunks passed the screen
        self._spent = True  # the current run has ended: the next refill starts one
        self._current: enumerate[Any] = enumerate(())  # the chunk being taken from
        self._held: Chunk | None = None  # pulled, ended a run, not served yet
        self._held_direct: bool | None = None  # its verdict, if it was screened
        self._next = 0  # the index of the next chunk's first item
        self._lock = asyncio.Lock()
        self._exhausted = False
        self._error: Exception | None = None  # the input raised: after the items before it

    def pulled(self) -> int:
        # The current chunk's enumerate holds the index of its next item.
        state: Any = self._current.__reduce__()
        return int(state[1][1])

    async def refill(self) -> bool:
        async with self._lock:
            if not self._spent:
                return True  # another worker started the next run meanwhile
            if self._exhausted:
                return False
            verdict = self._held_direct
            chunk = self._pull()
            if not chunk:
                self._exhausted = True
                if self._error is not None:
                    raise self._error
                return False
            if verdict is None:  # not screened yet
                self._held = chunk  # kept for the next refill if this one is cancelled
                await self._recorder.prepare()
                self._held = None
                verdict = self._screen(chunk)
            self.direct = verdict
            self._spent = False
            self.pairs = itertools.chain.from_iterable(self._run(chunk, verdict))
            return True

    def _pull(self) -> Chunk:
        if self._held is not None:
            held, self._held = self._held, None
            self._held_direct = None
            return held
        whole = self._range
        if whole is not None:
            # A range is sliced, not iterated: each chunk is a range too,
            # so the screen knows its ids are ints that repeat nothing
            # without a pass over them (and keeps them without a list).
            at = self._range_at
            self._range_at = at + self._size
            return whole[at : at + self._size]
        chunk: list[Any] = []
        if self._error is None:
            try:
                # extend keeps the items pulled before the input raised.
                chunk.extend(itertools.islice(self._items, self._size))
            except Exception as exc:
                self._error = exc
        return chunk

    def _run(self, chunk: Chunk, direct: bool) -> Iterator[Iterator[tuple[int, Any]]]:
        """The chunks of one run, each as an iterator of its (index, item) pairs.

        A run goes on while the chunks get the verdict its first got: a worker
        leaves its loop (for :meth:`refill`) once per run, so an input whose
        chunks all go item by item (most resumes) is one run.
        Runs inside the workers' ``next()``, so it must not raise: the
        input's error is kept for the next refill.
        """
        recorder = self._recorder
        try:
            while True:
                start = self._next
                self._next = start + len(chunk)
                self._current = enumerate(chunk, start)
                yield self._current
                if direct and recorder.backlogged():
                    return  # the refill waits for the commit
                chunk = self._pull()
                if not chunk:
                    return
                verdict = self._screen(chunk)
                if verdict is not direct:
                    # The next run's, screened already: a passed chunk's ids
                    # are taken, and screening it again would refuse it.
                    self._held, self._held_direct = chunk, verdict
                    return
        finally:
            self._spent = True

    def rest(self) -> Iterator[tuple[int, Any]]:
        """The pairs no worker took, unscreened, for reporting items that will never run.

        Screening them would record the ids of items that never run (and, under
        ``item_id=``, call it for each): memory that grows with the rest of
        the input. So the rest of the chunk being taken from, the chunk held
        for the next run, then the input itself, each pair once, in order;
        the run of chunks (``pairs``) is ended and refill returns False.
        """
        self.pairs = iter(())
        self._spent = self._exhausted = True
        return self._unscreened()

    def _unscreened(self) -> Iterator[tuple[int, Any]]:
        yield from self._current
        held, self._held = self._held, None
        whole = self._range
        rest: Iterable[Any]
        if whole is not None:
            at, self._range_at = self._range_at, len(whole)
            rest = whole[at:]
        else:
            # Not after the input raised: the error follows what it gave before.
            rest = self._items if self._error is None else ()
        for items in (held or (), rest):
            # Through _current, so that pulled() counts the items reported.
            self._current = enumerate(items, self._next)
            yield from self._current
            self._next = self.pulled()
        if self._error is not None:
            raise self._error

    def start(self, engine: Engine[Any, Any]) -> asyncio.Task[None] | None:
        return None  # a sync input needs no feeder

    async def close(self) -> None:
        pass


class _BufferIterator:
    """Iterates (index, item) pairs out of a deque until it is empty."""

    __slots__ = ("buffer",)

    def __init__(self, buffer: deque[tuple[int, Any]]) -> None:
        self.buffer = buffer

    def __iter__(self) -> _BufferIterator:
        return self

    def __next__(self) -> tuple[int, Any]:
        if self.buffer:
            return self.buffer.popleft()
        raise StopIteration


class _AsyncSource:
    """Feeds an async iterable to the workers through a bounded buffer."""

    def __init__(self, items: AsyncIterable[Any], capacity: int) -> None:
        # type(items).__aiter__ as aiter() calls it: its own errors are the input's.
        iterator = type(items).__aiter__(items)
        if not hasattr(type(iterator), "__anext__"):
            raise TypeError(
                f"items must be an iterable or an async iterable; got items={items!r}, "
                f"whose __aiter__() returned {iterator!r}, which has no __anext__()"
            )
        self._aiter: AsyncIterator[Any] = iterator
        self._buffer: deque[tuple[int, Any]] = deque()
        self.pairs = _BufferIterator(self._buffer)
        self._capacity = capacity
        self._count = 0
        self._exhausted = False
        self._starved: deque[asyncio.Future[None]] = deque()  # workers waiting for items
        self._space: asyncio.Future[None] | None = None  # the feeder waiting for room

    def pulled(self) -> int:
        return self._count - len(self._buffer)

    def start(self, engine: Engine[Any, Any]) -> asyncio.Task[None] | None:
        feeder: asyncio.Task[None] = engine.spawn(self._feed(engine))
        feeder.add_done_callback(engine.feeder_finished)
        return feeder

    async def _feed(self, engine: Engine[Any, Any]) -> None:
        loop = asyncio.get_running_loop()
        buffer = self._buffer
        try:
            async for item in self._aiter:
                buffer.append((self._count, item))
                self._count += 1
                self._wake_one()
                if len(buffer) >= self._capacity:
                    self._space = loop.create_future()
                    await self._space
        except Exception as exc:
            engine.fail(exc)
        except BaseException as exc:
            # Not an Exception: ending quietly would read as the end of the
            # input. The run raises it (the workers woken below see it), as it
            # does one from a worker; engine.feeder_finished retrieves it.
            if not isinstance(exc, asyncio.CancelledError | GeneratorExit):
                engine.fail(exc)
            raise
        finally:
            self._exhausted = True
            while self._starved:
                self._wake_one()

    def _wake_one(self) -> None:
        while self._starved:
            waiter = self._starved.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def refill(self) -> bool:
        """Wait until items are buffered (True) or the input is exhausted (False)."""
        space = self._space
        if space is not None and not space.done():
            space.set_result(None)
        while not self._buffer:
            if self._exhausted:
                return False
            waiter = asyncio.get_running_loop().create_future()
            self._starved.append(waiter)
            await waiter
        return True

    def rest(self) -> Iterator[tuple[int, Any]]:
        """The pairs buffered now, for reporting items that will never run."""
        return self.pairs

    async def close(self) -> None:
        # The feeder task has been cancelled and awaited by now; close the
        # async generator so its cleanup runs inside the map, not at loop exit.
        aclose = getattr(self._aiter, "aclose", None)
        if aclose is not None:
            await aclose()


# ---------------------------------------------------------------------------
# Delivery
# ---------------------------------------------------------------------------


class Engine(Generic[T, R]):
    """One run of ``map``/``gather``: the workers, their input, and the results.

    Args:
        call: the per-item coroutine function, with timeout/retry/limiter
            wrappers already applied.
        items: a sync or async iterable.
        workers: the most workers (the concurrency limit); ``None``: unbounded.
        elastic: the pool follows a limit that changes (a map's own adaptive
            limit), starting at this many workers at most: see :meth:`resize`.
        window: how far (in items) the workers may run ahead of the consumer;
            ``None``: no bound (``gather`` collects everything anyway).
        ordered: deliver in input order (True) or as completed.
        collect: keep results in a dict by index for ``gather`` instead of
            streaming them to a consumer.
        return_exceptions: deliver a failed item's exception as its result.
        limit_reader: reports the limit in force for stats.
        retried: the counter the retry wrapper increments.
        on_close: awaited once every task has finished (executor shutdown).
        on_abandon: called at once when the consumer drops the stream unclosed,
            before the close that follows in the background (which may not
            run to its end): what must not outlive the map (worker processes).
        unstarted: how many items the call took that have not started yet (a
            remote run queues them for its workers): stats count them neither
            as started nor as in flight.
        gates: the call's gates (a Limiter's slot, the rate) count the items
            waiting at them there, and a call timed for the latency is timed
            from when it passed them (see :class:`~corral._stats.Waiting`).
    """

    def __init__(
        self,
        call: Call,
        items: Iterable[T] | AsyncIterable[T],
        *,
        workers: int | None,
        window: int | None,
        ordered: bool,
        collect: bool,
        return_exceptions: bool,
        limit_reader: Callable[[], int | None],
        retried: _Retried,
        on_close: Callable[[bool], Awaitable[None]] | None = None,
        deadline: float | None = None,
        recorder: Recorder | None = None,
        elastic: int | None = None,
        on_abandon: Callable[[], None] | None = None,
        unstarted: Callable[[], int] | None = None,
        gates: Waiting | None = None,
    ) -> None:
        self._call = call
        self._gates = gates
        self._recorder = recorder
        self._items = items
        self._max_workers = workers
        # The most workers at once now: ``workers``, or, for a pool that follows
        # an adaptive limit (see resize), that limit.
        self._cap = workers if elastic is None else elastic
        self._elastic = elastic is not None
        self._window = window
        self._ordered = ordered
        self._collect = collect
        self._return_exceptions = return_exceptions
        self._limit_reader = limit_reader
        self._retried = retried
        self._on_close = on_close
        self._on_abandon = on_abandon
        # How many items the call has taken that have not started (a remote
        # run's queue, see _remote.RemoteCall): stats count them as not started.
        self._unstarted_reader = unstarted
        self._deadline = deadline
        self._deadline_handle: asyncio.TimerHandle | None = None
        # Set when the run stops starting calls before its input ran out
        # (cancel(), the deadline, a budget); the reason, if any, is raised to
        # the consumer after the results already produced were handed out.
        self._halted = False
        # Set once no new call may start (halted, failed or closing): workers
        # check it before each item, so a call that swallowed its cancellation
        # cannot lead its worker on to the next one.
        self._stopping = False
        self._halt_reason: BaseException | None = None
        # Set once the calls in flight were cancelled (cancel(), the deadline).
        self._in_flight_cut = False
        self._deadline_passed = False
        # The deadline passed with return_exceptions: every item not started
        # yields a DeadlineExceeded in its place, so that each item still has
        # exactly one outcome (see _report_unstarted).
        self._reporting = False
        self._reported = False
        self._observers: list[Observer] = []
        # monitor=: reads the loop watch's largest lag for stats (None: not watched).
        self.lag_reader: Callable[[], float] | None = None

        self._phase = _Phase.IDLE
        self._source: _SyncSource | _ChunkedSource | _AsyncSource
        # An async input's feeder task (see _AsyncSource); None for a sync input.
        self._feeder: asyncio.Task[None] | None = None
        # Set while aclose() runs; a second aclose() waits for the first.
        self._closed: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._spawning = False  # inside spawn(): see _own()
        self._alive = 0  # worker tasks not yet finished
        self._unstarted = 0  # workers spawned that have not pulled an item yet
        self._error: BaseException | None = None
        self._failed = 0
        # Failures handed out in their item's place (return_exceptions), and
        # items taken from the input that never ran (the run stopped first).
        self._captured = 0
        self._not_run = 0
        self._histogram = LatencyHistogram()
        self._started_at = 0.0
        self._ended_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

        # Results. ``results`` is the gather dict; ``ready`` the consumer's queue.
        self.results: dict[int, Any] = {}
        self._ready: deque[Any] = deque()
        self._pending: dict[int, Any] = {}  # ordered mode: done, waiting for earlier items
        self._next_index = 0  # ordered mode: the index the consumer gets next
        self._consumed = 0
        self._consumer: asyncio.Future[None] | None = None  # the consumer waiting for a result
        self._done: asyncio.Future[None] | None = None  # gather waiting for the end

        # Backpressure: a worker holding item i waits while i >= consumed + window.
        self._blocked: list[tuple[int, int, asyncio.Future[None]]] = []  # heap by index
        self._blocked_seq = 0
        self._next_room_check = 0

        self.deliver: Callable[[int, Any], None]
        if collect:
            self.deliver = self.results.__setitem__
        elif ordered:
            self.deliver = self._deliver_ordered
        else:
            self.deliver = self._deliver_unordered

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Start the first worker (and the feeder of an async input)."""
        if self._phase is not _Phase.IDLE:
            return
        if self._halted:  # cancelled before it started: it never will
            self._phase = _Phase.CLOSED
            self._end_unstarted()
            return
        loop = asyncio.get_running_loop()
        items = self._items
        try:
            if isinstance(items, AsyncIterable):
                capacity = self._max_workers or 1024
                self._source = _AsyncSource(items, capacity)
            elif self._recorder is not None and self._recorder.screen is not None:
                # Pulled ahead by at most the pool's size, like the workers do.
                size = min(CHUNK, self._max_workers or CHUNK)
                self._source = _ChunkedSource(items, self._recorder, size)
            else:
                self._source = _SyncSource(items)
        except BaseException:
            # The input cannot be read (its __aiter__ failed): nothing started,
            # nothing to close, but the observers still see the run end.
            self._phase = _Phase.CLOSED
            self._end_unstarted()
            raise
        self._loop = loop
        self._started_at = loop.time()
        self._phase = _Phase.RUNNING
        if self._collect:
            self._done = loop.create_future()
        # The timer first: under the eager task factory the feeder and the
        # first worker run inside start(), and may stop the run (cancel() from
        # fn), which must cancel the timer.
        if self._deadline is not None:
            self._deadline_handle = loop.call_later(self._deadline, self._on_deadline)
        self._feeder = self._source.start(self)
        self._alive = self._unstarted = 1
        self._start_worker()
        for observer in self._observers:
            observer.start()

    def _end_unstarted(self) -> None:
        """Start and stop the observers of a run that ends before it starts.

        A display still draws its final line (of zeros) and a ``progress=``
        callable still gets its one final snapshot.
        """
        for observer in self._observers:
            observer.start()
        self._stop_observers()

    def observe(self, observer: Observer) -> None:
        """Have ``observer`` started with the run and stopped once its stats are final.

        Observers (the progress display) pull what they need from
        :meth:`stats` on their own timer: nothing is added per item.
        """
        self._observers.append(observer)

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        assert self._loop is not None
        # Under the eager task factory the task's first step runs inside
        # create_task(), before it is in _tasks: _own() tells it by this flag.
        spawning, self._spawning = self._spawning, True
        try:
            task: asyncio.Task[Any] = self._loop.create_task(coro)  # type: ignore[arg-type]
        finally:
            self._spawning = spawning
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def resize(self, limit: int) -> None:
        """Keep at most ``limit`` workers from now on (an elastic pool's adaptive limit).

        A map's own adaptive limit moves while it runs. Were the pool sized for
        the limit's ``max``, the workers beyond the limit would each hold an
        item and wait in the Limiter's line, and every call's end would hand
        its slot to one of them: a task switch per call (about 7 us, a tenth
        of a sleep(0) call's cost). Sized to the limit, a worker goes straight
        from one call to the next: a higher limit starts workers at once, and
        after a lower one the extra workers retire as their calls end.
        """
        self._cap = limit
        if self._phase is _Phase.RUNNING and self._alive < limit:
            self._grow(limit - self._alive)

    def _grow(self, count: int) -> None:
        """Schedule ``count`` more workers (capped at the limit)."""
        if self._cap is not None:
            count = min(count, self._cap - self._alive)
        if count <= 0:
            return
        # Counted now, created from a loop callback: under the eager task
        # factory a new worker runs inside create_task(), and creating it from
        # inside another worker would nest every new worker one level deeper.
        self._alive += count
        self._unstarted += count
        assert self._loop is not None
        self._loop.call_soon(self._create_workers, count)

    def _create_workers(self, count: int) -> None:
        if self._phase is not _Phase.RUNNING or self._error is not None or self._halted:
            # The run ended or stopped starting calls: they are not needed.
            self._unstarted -= count
            self._alive -= count
            if self._alive == 0:
                self._all_workers_done()
            return
        for _ in range(count):
            self._start_worker()

    @property
    def finished(self) -> bool:
        return self._phase is _Phase.CLOSED

    # -- the worker -------------------------------------------------------

    async def _work(self) -> bool:
        """Take items and call them until the input runs out; True if retired early.

        A worker of an elastic pool retires (after its call, holding no item)
        while the pool is larger than its limit.
        """
        # Everything the loop body touches is a local: attribute lookups are
        # a measurable share of a no-op call's cost.
        call = self._call
        collect = self._collect
        results = self.results
        deliver = self.deliver
        source = self._source
        window = self._window
        bounded = window is not None
        loop = self._loop
        assert loop is not None
        clock = loop.time
        histogram = self._histogram
        countdown = stride = 1
        elastic = self._elastic
        recorder = self._recorder
        record = recorder.result if recorder is not None else None
        # The call's gates, when it enters them in its first step: the timed
        # calls are timed from when they passed them (see Waiting). A
        # checkpoint's wrapper may wait before it calls on: not through it.
        gates = self._gates
        stamps = gates if record is None else None
        # A screened input's chunks (see _ChunkedSource): a chunk that passed
        # is called directly, and its plain results appended to rows here.
        screened = type(source) is _ChunkedSource
        direct = False
        if screened:
            assert recorder is not None
            wrapped = call
            unwrapped = recorder.direct
            rows = recorder.rows
            append = rows.append
            plain = recorder.plain
            record_first = recorder.first
            record_other = recorder.other
            keyed = recorder.keyed
        self._unstarted -= 1
        first = True
        try:
            while True:
                if screened:
                    direct = source.direct  # type: ignore[union-attr]
                    call = unwrapped if direct else wrapped
                    stamps = gates if direct else None
                for index, item in source.pairs:
                    if self._stopping:
                        self._unstarted_item(index, item)
                        return False
                    if bounded and index >= self._consumed + window:  # type: ignore[operator]
                        try:
                            room = await self._wait_for_room(index)
                        except asyncio.CancelledError:
                            self._cancelled_waiting(index, item)
                            raise
                        if not room:  # the run stopped while this one waited
                            self._unstarted_item(index, item)
                            return False
                    if first:
                        first = False
                        self._maybe_grow()
                    countdown -= 1
                    try:
                        if countdown:
                            value = await call(item)
                        else:
                            # Reset before the call: a call that raises must not
                            # leave the countdown at 0, or this worker would
                            # never time a call again.
                            weight = stride
                            stride = countdown = (
                                1 if histogram.total < EXACT_SAMPLES else SAMPLE_STRIDE
                            )
                            # From the call, or from when it passed its gates (a
                            # Limiter's slot, the rate): they write that here.
                            began = [clock()]
                            if stamps is not None:
                                stamps.cell = began
                            try:
                                value = await call(item)
                            except Exception:
                                # A failure is an end too; a call cut short
                                # (cancelled, halted) is not, and says nothing.
                                histogram.add(clock() - began[0], weight)
                                raise
                            finally:
                                if stamps is not None and stamps.cell is began:
                                    stamps.cell = None  # it failed before its gates
                            histogram.add(clock() - began[0], weight)
                        if direct:
                            key = item if keyed is None else keyed(id(item))
                            if type(value) in plain:
                                if rows:
                                    append(key)
                                    append(value)
                                else:
                                    record_first(key, value)
                            else:
                                record_other(key, item, value)
                        elif record is not None:
                            record(item, value)
                    except Exception as exc:
                        self._failed += 1
                        if not self._return_exceptions:
                            if isinstance(exc, StopAsyncIteration):
                                # Raised by the stream's __anext__, it would read
                                # as the end of the results (PEP 479's reason).
                                error = RuntimeError(
                                    f"fn raised StopAsyncIteration for item {reprlib.repr(item)}"
                                )
                                error.__cause__ = exc
                                exc = error
                            self.fail(exc)
                            return False
                        if recorder is not None:
                            recorder.failure(item, exc, direct)
                        value = exc
                        self._captured += 1
                    except asyncio.CancelledError as exc:
                        self._check_cancellation(exc, index, item)
                        return False
                    except Halt as halt:  # the budget (or the checkpoint) refused it
                        if not halt.started:
                            self._not_run += 1
                        if recorder is not None:
                            recorder.halted(item, halt, direct)
                        self.halt(halt.reason, cancel_in_flight=False)
                        return False
                    except BaseException as exc:
                        # Not an Exception (KeyboardInterrupt, a framework's own):
                        # the item failed; _worker_finished fails the run with it.
                        if not isinstance(exc, GeneratorExit):
                            self._failed += 1
                        raise
                    if collect:
                        results[index] = value
                    else:
                        deliver(index, value)
                    if elastic and self._alive > self._cap:  # type: ignore[operator]
                        # Counted out now, so that no other worker retires for
                        # this one (its done-callback sees the True).
                        self._alive -= 1
                        return True
                if not await source.refill():
                    return False
        except Exception as exc:
            # The input itself raised (a call's failure is handled above, per
            # item): there is no item to blame, so the run ends with it.
            self.fail(exc)
        return False

    def _start_worker(self) -> None:
        task = self.spawn(self._work())
        # Counted down by a done-callback, not a `finally` in _work: a worker
        # cancelled before its first step never runs its body at all.
        task.add_done_callback(self._worker_finished)

    def _worker_finished(self, task: asyncio.Task[bool]) -> None:
        if not task.cancelled():
            error = task.exception()
            if error is None and task.result():
                return  # retired from an elastic pool: counted out already
            if error is not None:
                # Not an Exception (those are handled per item): a BaseException
                # subclass from fn or the input. Ending the worker quietly would
                # drop its item and every one after it: the run raises it.
                self.fail(error)
        self._alive -= 1
        if self._alive == 0:
            self._all_workers_done()

    def feeder_finished(self, task: asyncio.Task[None]) -> None:
        """An async input's feeder ended: retrieve what it raised, or the loop logs it.

        The feeder failed the run with it already (see ``_AsyncSource._feed``);
        the first failure wins, so failing again changes nothing.
        """
        if not task.cancelled():
            error = task.exception()
            if error is not None:
                self.fail(error)

    def _maybe_grow(self) -> None:
        """A new worker took its first item: if no other is waiting to start, double the pool.

        Only new workers check, so the hot loop pays nothing once the pool is
        built; growth goes on for as long as each new worker finds every other
        one busy in a call, which is exactly when more concurrency helps.
        """
        if (
            self._unstarted == 0
            and not self._blocked  # waiting for the consumer: more workers would not help
            and (self._cap is None or self._alive < self._cap)
        ):
            self._grow(self._alive)

    def _unstarted_item(self, index: int, item: Any) -> None:
        """``item`` was taken from the input but the run stopped before it started."""
        self._not_run += 1
        if self._reporting:
            self._captured += 1
            self.deliver(
                index,
                DeadlineExceeded(f"the deadline passed before item {reprlib.repr(item)} started"),
            )

    def _cancelled_waiting(self, index: int, item: Any) -> None:
        """A worker waiting for the consumer with ``item`` was cancelled."""
        if self._stopping:  # the run stopped (not the loop abandoning it)
            self._unstarted_item(index, item)

    async def _report_unstarted(self) -> None:
        """After the deadline (with return_exceptions): the rest of the input, reported.

        Runs once every worker has ended, so every item taken before has its
        outcome already and these follow in input order. It waits for the
        consumer like the workers do (``window``), so memory stays bounded.
        """
        source = self._source
        window = self._window
        try:
            while True:
                for index, item in source.rest():
                    if window is not None and index >= self._consumed + window:
                        await self._wait_for_room(index)
                    self._unstarted_item(index, item)
                if not await source.refill():
                    return
        except Exception as exc:  # the input raised: as in a worker, the run ends with it
            self.fail(exc)

    def _check_cancellation(self, exc: asyncio.CancelledError, index: int, item: Any) -> None:
        task = asyncio.current_task()
        if task is None or task.cancelling() or self._phase is not _Phase.RUNNING:
            if self._deadline_passed and self._return_exceptions:
                # The deadline cut this call short: report the item as not done.
                self._failed += 1
                self._captured += 1
                self.deliver(
                    index,
                    DeadlineExceeded(f"the deadline passed while item {reprlib.repr(item)} ran"),
                )
            raise exc
        # fn itself raised CancelledError without this worker being cancelled
        # (e.g. it awaited a task someone else cancelled). Ending quietly would
        # drop the item: fail the run instead.
        self._failed += 1
        error = RuntimeError(
            f"fn raised CancelledError for item {reprlib.repr(item)} "
            "without the map being cancelled"
        )
        error.__cause__ = exc
        self.fail(error)

    async def _wait_for_room(self, index: int) -> bool:
        """Wait until item ``index`` fits in the window (or a halt lets it go).

        Returns whether the run may still start calls (False once it stopped).
        """
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._blocked_seq += 1
        entry = (index, self._blocked_seq, waiter)
        heapq.heappush(self._blocked, entry)
        try:
            await waiter
        except asyncio.CancelledError:
            # Not blocked any more: stats count the blocked as not started.
            if entry in self._blocked:
                self._blocked.remove(entry)
                heapq.heapify(self._blocked)
            raise
        return not self._stopping

    def make_room(self) -> None:
        """Wake the blocked workers whose item now fits in the window.

        While the consumer drains ready results it calls this once per half
        window consumed, not once per item: waking a worker per result would
        ping-pong between consumer and workers on fast calls. Before the
        consumer waits for more results it calls it unconditionally, so no
        worker can stay blocked while there is room.
        """
        assert self._window is not None
        self._next_room_check = self._consumed + self._window // 2
        limit = self._consumed + self._window
        blocked = self._blocked
        while blocked and blocked[0][0] < limit:
            waiter = heapq.heappop(blocked)[2]
            if not waiter.done():
                waiter.set_result(None)

    def halt(self, reason: BaseException | None, *, cancel_in_flight: bool) -> None:
        """Stop starting calls; hand out what is done, then end (raising ``reason``).

        ``cancel_in_flight``: cancel the calls in progress (cancel(), the
        deadline) rather than let them finish (a budget: they are paid for).
        Calls let finish are still cancelled by a later cancel() or deadline:
        the first reason stays the one raised.
        """
        if self._phase is _Phase.IDLE:
            self._halted = True  # cancelled before it started: it never will
            return
        if self._phase is not _Phase.RUNNING:
            return
        if self._halted:
            if cancel_in_flight and not self._in_flight_cut:
                # A budget let the calls in flight go on: cancel() ends them.
                self._cut_in_flight()
                self._wake_consumer()
            return
        self._halted = self._stopping = True
        self._halt_reason = reason
        if cancel_in_flight:
            if self._deadline_handle is not None:
                self._deadline_handle.cancel()
            self._cut_in_flight()
        else:
            # The deadline stays set: it still cuts short the calls left to
            # finish (a budget's), which may never end on their own.
            # The workers waiting for the consumer hold items that will not
            # start: they let them go now. Left waiting, one whose item is
            # beyond an item that never ends (in input order) would wait for
            # ever, and the consumer with it.
            blocked, self._blocked = self._blocked, []
            for _, _, waiter in blocked:
                if not waiter.done():
                    waiter.set_result(None)
        self._wake_consumer()

    def _cut_in_flight(self) -> None:
        """Cancel the calls in flight (every task the run started but this one)."""
        self._in_flight_cut = True
        current = asyncio.current_task()
        # An async input's feeder goes on when the rest of it is reported.
        feeder = self._feeder if self._reporting else None
        for task in self._tasks:
            if task is not current and task is not feeder:
                task.cancel()

    def _on_deadline(self) -> None:
        if self._phase is not _Phase.RUNNING or self._in_flight_cut:
            return  # stopped already (the timer may outlive a cancel() in start())
        self._deadline_passed = True
        if self._halted:
            # A budget stopped the starts and let the calls in flight go on:
            # the deadline ends them (with return_exceptions, each reports it
            # in its item's place); the run still ends with the budget's reason.
            self._cut_in_flight()
            return
        reason = DeadlineExceeded(f"the map's deadline of {self._deadline} s passed")
        # With return_exceptions each cancelled call reports the deadline in its
        # item's place (see _check_cancellation), as does each item not started
        # (see _unstarted_item), and the map ends normally.
        self._reporting = self._return_exceptions
        self.halt(None if self._return_exceptions else reason, cancel_in_flight=True)

    def _all_workers_done(self) -> None:
        if (
            self._reporting
            and not self._reported
            and self._error is None
            and self._phase is _Phase.RUNNING
        ):
            # Every worker has ended: the items never taken are reported now.
            self._reported = True
            self._alive += 1
            task = self.spawn(self._report_unstarted())
            task.add_done_callback(self._worker_finished)
            return
        if self._deadline_handle is not None:
            # Every call has ended: a deadline passing now cuts nothing short
            # (a slow consumer is still reading what is done).
            self._deadline_handle.cancel()
        if self._ended_at is None and self._loop is not None:
            self._ended_at = self._loop.time()
        self._wake_consumer()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """End the run with ``exc`` (the first failure wins): cancel every other task."""
        if self._error is not None:
            return
        self._error = exc
        self._stopping = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._wake_consumer()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    # -- delivery to a streaming consumer ---------------------------------

    def _deliver_unordered(self, index: int, value: Any) -> None:
        self._ready.append(value)
        if self._consumer is not None:
            self._wake_consumer()

    def _deliver_ordered(self, index: int, value: Any) -> None:
        if index != self._next_index:
            self._pending[index] = value
            return
        ready = self._ready
        ready.append(value)
        index += 1
        pending = self._pending
        if pending:
            while index in pending:
                ready.append(pending.pop(index))
                index += 1
        self._next_index = index
        if self._consumer is not None:
            self._wake_consumer()

    def _wake_consumer(self) -> None:
        consumer = self._consumer
        if consumer is not None:
            self._consumer = None
            if not consumer.done():
                consumer.set_result(None)

    def take(self) -> Any:
        """Hand the next ready result to the consumer (the caller checked ``ready``)."""
        self._consumed += 1
        if self._blocked and self._consumed >= self._next_room_check:
            self.make_room()
        return self._ready.popleft()

    @property
    def ready(self) -> deque[Any]:
        return self._ready

    async def wait_next(self) -> bool:
        """Wait until a result is ready (True) or the run is over (False); raise its error."""
        self.start()
        while True:
            if self._error is not None:
                await self.aclose()
                raise self._error
            if self._ready:
                return True
            if self._blocked:
                self.make_room()
            if self._alive == 0 and self._phase is _Phase.RUNNING:
                await self.aclose()
                if self._error is not None:
                    raise self._error
                if self._halt_reason is not None:
                    raise self._halt_reason
                return False
            if self._phase is not _Phase.RUNNING:
                return False
            assert self._loop is not None
            if self._consumer is not None:
                raise RuntimeError(CONCURRENT_READERS)
            self._consumer = self._loop.create_future()
            try:
                await self._consumer
            finally:
                self._consumer = None

    # -- gather -----------------------------------------------------------

    async def run_to_end(self) -> list[Any]:
        """Run to the end and return every result in input order (``gather``)."""
        self.start()
        assert self._done is not None
        try:
            if self._alive:
                await self._done
        finally:
            await self.aclose()
        if self._error is not None:
            raise self._error
        if self._halt_reason is not None:
            raise self._halt_reason
        results = self.results
        if self._halted:  # stopped early: only the items that ran have results
            return [results[i] for i in sorted(results)]
        return [results[i] for i in range(len(results))]

    # -- cleanup ----------------------------------------------------------

    async def aclose(self) -> None:
        """Cancel and await everything the run started; idempotent.

        A close while another is under way (``aclose()`` from another task, the
        consumer leaving meanwhile) returns once that one has finished. A close
        from ``fn`` returns at once: the call cannot wait for itself to end.
        """
        own = self._own()
        if self._closed is not None:
            # A close from one of the run's own tasks (fn) returns at once: the
            # close under way waits for that task.
            if not own:
                await wait_closed(self._closed)
            return
        if self._phase is _Phase.CLOSED:
            return
        if self._phase is _Phase.IDLE:
            self._phase = _Phase.CLOSED
            if isinstance(self._items, AsyncIterable):
                aclose = getattr(self._items, "aclose", None)
                if aclose is not None:
                    await aclose()
            return
        assert self._loop is not None
        self._closed = self._loop.create_future()
        if own:
            # From fn: closed in a task of its own, which cancels and awaits
            # this call too. Run here, the close could not await the task it
            # runs in, and would be over (a consumer leaving at once) while
            # this call still ran. No other item starts meanwhile.
            # Started from a callback: under the eager task factory a task made
            # here would run at once, and this one, in its own first step, is
            # not in _tasks yet.
            self._stopping = True
            self._loop.call_soon(self._close_from_fn)
            return
        await self._closing()

    def _close_from_fn(self) -> None:
        assert self._loop is not None
        keep_until_done(self._loop.create_task(self._closing()), "closing a map from fn")

    def _own(self) -> bool:
        """Whether the current task is one the run started (a worker calling fn)."""
        # A task spawned eagerly is not in _tasks during its first step.
        return self._spawning or asyncio.current_task() in self._tasks

    async def _closing(self) -> None:
        assert self._closed is not None
        try:
            await self._close()
        finally:
            self._closed.set_result(None)

    async def _close(self) -> None:
        self._phase = _Phase.CLOSING
        self._stopping = True
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
        current = asyncio.current_task()
        clean = self._error is None and self._alive == 0
        interrupted: asyncio.CancelledError | None = None
        # Cancel until every task is done: a task can swallow one cancellation.
        # A cancellation of this close itself (a second Ctrl-C, an outer
        # timeout) does not stop it halfway: it is raised once all is done, as
        # a TaskGroup does, or the calls, the watch and the display outlive it.
        while True:
            pending = [t for t in self._tasks if not t.done() and t is not current]
            if not pending:
                break
            for task in pending:
                task.cancel()
            try:
                await asyncio.wait(pending)
            except asyncio.CancelledError as exc:
                interrupted = exc
        if self._ended_at is None:
            assert self._loop is not None
            self._ended_at = self._loop.time()
        try:
            await self._source.close()
        finally:
            self._phase = _Phase.CLOSED
            # The stats are final now (every task has finished, _ended_at is set).
            try:
                self._stop_observers()
            finally:
                if self._on_close is not None:
                    await self._on_close(clean)
        if interrupted is not None:
            raise interrupted

    def _stop_observers(self) -> None:
        """Stop every observer, the last started first, even if one of them raises.

        Last first: the loop watch (started after the display) records its
        final lag before the display takes its final snapshot.
        """
        error: BaseException | None = None
        for observer in reversed(self._observers):
            try:
                observer.stop()
            except BaseException as exc:  # e.g. a progress callback's SystemExit
                error = error or exc
        if error is not None:
            raise error

    def cancel(self) -> None:
        """End the run early, keeping what is done (see :meth:`ResultStream.cancel`)."""
        if self._reporting and self._phase is _Phase.RUNNING:
            # The deadline passed (return_exceptions) and the items left are
            # being reported: stop that too, or an endless input never ends.
            self._reporting = False
            current = asyncio.current_task()
            for task in self._tasks:
                if task is not current:
                    task.cancel()
            self._wake_consumer()
            return
        self.halt(None, cancel_in_flight=True)

    def abandon(self) -> None:
        """Close the run in the background: its consumer is gone without closing it."""
        if self._phase in (_Phase.IDLE, _Phase.CLOSED) or self._loop is None:
            return
        # No new call: a call that swallows its cancellation must not lead its
        # worker on to the next item before the close below runs.
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self._on_abandon is not None:
            self._on_abandon()
        if not self._loop.is_closed():
            close_in_background(self._loop, self.aclose)

    # -- stats ------------------------------------------------------------

    def stats(self) -> Stats:
        max_loop_lag = self.lag_reader() if self.lag_reader is not None else None
        if self._phase is _Phase.IDLE or self._loop is None:
            return Stats(
                0, 0, 0, 0, 0, 0.0, 0.0, self._limit_reader(), None, None, None, max_loop_lag
            )
        ended = self._ended_at if self._ended_at is not None else self._loop.time()
        elapsed = ended - self._started_at
        if self._collect:
            finished = len(self.results)
        else:
            finished = self._consumed + len(self._ready) + len(self._pending)
        completed = finished - self._captured
        started = self._source.pulled() - len(self._blocked) - self._not_run
        if self._unstarted_reader is not None:
            started -= self._unstarted_reader()
        # Once the run is over nothing is in flight; calls cancelled by an early
        # stop count as started, neither completed nor failed.
        closed = self._phase is _Phase.CLOSED
        in_flight = 0 if closed else max(0, started - completed - self._failed)
        done = completed + self._failed
        histogram = self._histogram
        return Stats(
            started=started,
            completed=completed,
            failed=self._failed,
            retried=self._retried.count,
            in_flight=in_flight,
            elapsed=elapsed,
            throughput=done / elapsed if elapsed > 0 else 0.0,
            limit=self._limit_reader(),
            latency_p50=histogram.percentile(0.50),
            latency_p90=histogram.percentile(0.90),
            latency_p99=histogram.percentile(0.99),
            max_loop_lag=max_loop_lag,
        )


class ResultStream(Generic[R]):
    """The results of :func:`corral.map`: an async iterator and async context manager.

    ``async with corral.map(...) as results: async for r in results`` is the
    structured form: leaving the block by any path cancels and awaits whatever
    the map started. Plain ``async for r in corral.map(...)`` also works and
    cleans up when the results are exhausted or the run fails; if you ``break``
    out of a plain loop, the map's tasks are cancelled when the stream is
    garbage-collected, so prefer ``async with`` there.
    """

    def __init__(self, engine: Run) -> None:
        self._engine = engine
        self._ready = engine.ready

    @property
    def stats(self) -> Stats:
        """A frozen snapshot of the run's counters, latency and limit."""
        return self._engine.stats()

    async def __aenter__(self) -> ResultStream[R]:
        self._engine.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[R]:
        return self

    async def __anext__(self) -> R:
        engine = self._engine
        if self._ready:
            return engine.take()  # type: ignore[no-any-return]
        if await engine.wait_next():
            return engine.take()  # type: ignore[no-any-return]
        raise StopAsyncIteration

    def cancel(self) -> None:
        """End the map early, keeping what is done.

        No new call starts and the calls in flight are cancelled; the results
        already produced are still handed out (in input order: up to the first
        item that did not finish), then iteration ends without an error and
        ``stats`` are final. Callable from the consumer's loop body, from
        another task, or from ``fn`` (that call itself goes on to its end and
        its result is kept); after the deadline passed with
        ``return_exceptions=True`` it also ends the report of the items left.
        """
        self._engine.cancel()

    async def aclose(self) -> None:
        """Stop the map: cancel and await everything it started.

        From ``fn`` it returns at once (a call cannot await its own end): the
        map closes in the background, that call cancelled like the others, and
        a consumer leaving ``async with`` waits for that close to finish.
        """
        await self._engine.aclose()

    def __del__(self) -> None:
        # The consumer dropped the stream without closing it (e.g. ``break``
        # out of a plain ``async for``): cancel the workers so none is left
        # running; the loop still owns and finishes them.
        engine = getattr(self, "_engine", None)
        if engine is not None and not engine.finished:
            try:
                engine.abandon()
            except RuntimeError:  # pragma: no cover - the loop is already closed
                pass
