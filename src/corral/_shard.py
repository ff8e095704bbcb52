"""``processes=N``: one map sharded over N worker processes, each with its own loop.

One event loop runs on one core. When the calls of a map do real work between
their awaits (parsing what they fetched, computing on it), the loop saturates
its core long before the network does, and more concurrency only adds queueing.
``corral.map(fetch_and_parse, urls, processes=4, limit=400)`` runs N worker
processes instead, each with its own event loop (uvloop when installed) and its
own corral engine, and the parent feeds them::

    parent: input ──> feeder ──chunks──> child 0: loop + engine (limit 100) ──┐
                        ^                child 1: loop + engine (limit 100) ──┤
                        └── room ──  results (in input order) <── reader <───┘

What each guarantee becomes
---------------------------
- **Limit**: split across the children (400 over 4: 100 each; 5 over 2: 3 and
  2), so never more than ``limit`` calls in flight in all. Fewer children are
  started when ``limit < processes``.
- **Lazy input, bounded memory**: the parent pulls an item only when a child
  has room: a child holds at most twice its share (its calls in flight and as
  many waiting, so it never idles between two messages), and the parent runs
  at most ``4 * limit`` items ahead of the consumer, so the reorder buffer
  behind a slow item is bounded too.
- **Rate, global**: splitting ``rate`` over the children would multiply the
  burst by N (each child's GCRA may start ``burst`` calls at once) and waste
  the share of an idle child. So the parent keeps the one :class:`RateGate`,
  and a child asks it for a start token before each attempt (retries too):
  starts are paced exactly as in one process, up to the few hundred
  microseconds a token takes to cross the socket. Items still flow ahead of
  their tokens, so pacing costs no extra round trip per item.
- **Exactly once, errors as themselves**: each result travels back tagged
  with its input index and is delivered once; an exception comes back as its
  own type with the remote traceback as a note. ``timeout`` and ``retries``
  apply in the child, per attempt, as in one process.
- **Structured**: leaving the map by any path stops the children: after a
  clean end they exit on their own; on failure, cancellation or ``break``
  they are terminated at once (killed a second later if need be). A child
  that dies ends the map with :class:`corral.WorkerCrashed` (its calls in
  flight cannot be attributed to one item, so nothing is silently re-run).
- **Stats**: ``completed`` and ``failed`` are counted in the parent as results
  arrive; ``started``, ``in_flight``, ``retried`` and the latency histogram
  are reported by the children with each batch of results (the histogram a
  few times a second) and summed; they are exact once the map has ended.

``fn`` travels to the children by reference, so it must be importable: an
``async def`` at module level. A lambda or a closure is refused at once.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import pickle
import random
import reprlib
import socket
import sys
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._engine import ResultStream
from ._limits import Rate, RateGate
from ._offload import (
    Link,
    WorkerCrashed,
    connect,
    describe_exit,
    ignore_sigint,
    is_async_callable,
    mp_context,
    picklable_value,
    portable,
    stop_processes,
    wait_exit,
    warm_up_start_method,
)
from ._retry import Retry
from ._stats import LatencyHistogram, Stats

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerContext, SpawnContext
    from multiprocessing.process import BaseProcess

R = TypeVar("R")

#: How far (in items, times the limit) the parent runs ahead of the consumer.
WINDOW_PER_LIMIT = 4
#: The most items the parent pulls in one go when the limit is ``None``.
UNBOUNDED_SLICE = 1024
#: Seconds between a child's latency reports.
STATS_INTERVAL = 0.25
#: Seconds a child that finished cleanly gets to exit before it is terminated.
EXIT_GRACE = 5.0


def split_limit(limit: int, processes: int) -> list[int]:
    """Shares of ``limit`` for ``processes`` children, as equal as can be, none zero."""
    count = min(processes, limit)
    base, extra = divmod(limit, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def check_shardable(fn: Callable[..., Any], limit: object, retry: Retry | None) -> None:
    """Refuse at once what cannot run in worker processes, saying why and what to do."""
    try:
        pickle.dumps(fn, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            f"processes=N runs fn in other processes, which import it by name; {fn!r} "
            f"cannot be sent there ({exc}). Define it with `async def` at module level in "
            "a module (not a lambda, a closure or a function defined inside another)."
        ) from None
    if not is_async_callable(fn):
        raise TypeError(
            f"processes=N runs an `async def` fn on N event loops; {fn!r} is a plain "
            "function. For CPU-bound work in a plain `def`, use executor='process' instead."
        )
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    if module is not None and module.__name__ == "__main__" and not hasattr(module, "__file__"):
        raise TypeError(
            f"processes=N runs fn in other processes, which import it by name; {fn!r} was "
            "defined in an interactive session, which they cannot import. Move it into a "
            "module (a .py file) and import it from there."
        )
    if not (limit is None or (isinstance(limit, int) and not isinstance(limit, bool))):
        raise TypeError(
            "processes=N splits an int limit across its processes; a shared Limiter or an "
            "adaptive limit lives in one process and cannot be split. Pass an int or None; "
            f"got limit={limit!r}"
        )
    try:
        pickle.dumps(retry, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            f"processes=N sends retries= to its processes, but retries={retry!r} cannot be "
            f"pickled ({exc}). Give Retry(on=...) exception types or a module-level function."
        ) from None


class _Phase(enum.Enum):
    IDLE = "idle"  # created; no process started
    RUNNING = "running"  # children started or starting, items flowing
    CLOSING = "closing"  # ended, failed or left: children being stopped
    CLOSED = "closed"  # every child stopped and reaped, every task finished


class _Child:
    """The parent's view of one worker process."""

    __slots__ = (
        "capacity",
        "done",
        "finished",
        "grants",
        "link",
        "number",
        "outbox",
        "outstanding",
        "process",
        "retried",
        "started",
    )

    def __init__(self, number: int, capacity: int | None) -> None:
        self.number = number
        self.capacity = capacity  # items it may hold (in flight + waiting); None: no bound
        self.process: BaseProcess | None = None
        self.link: Link | None = None
        self.outbox: list[tuple[int, Any]] = []  # assigned, sent at the end of this iteration
        self.outstanding = 0  # sent, result not back
        self.grants = 0  # rate tokens to send at the end of this iteration
        self.done = 0  # results received from it
        self.started = 0  # as reported by the child
        self.retried = 0  # as reported by the child
        self.finished = False  # it sent "done": every result it owed has arrived

    def free(self) -> int:
        if self.link is None or self.finished:
            return 0
        if self.capacity is None:
            return UNBOUNDED_SLICE
        return self.capacity - self.outstanding - len(self.outbox)


class ShardRun(Generic[R]):
    """The parent's side of a sharded map: children, feeder, delivery, cleanup."""

    def __init__(
        self,
        fn: Callable[[Any], Awaitable[R]],
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        processes: int,
        limit: int | None,
        rate: Rate | None,
        ordered: bool,
        timeout: float | None,
        retry: Retry | None,
        return_exceptions: bool,
    ) -> None:
        self._fn = fn
        self._items = items
        self._limit = limit
        self._rate = rate
        self._ordered = ordered
        self._return_exceptions = return_exceptions
        shares: list[int | None]
        shares = [None] * processes if limit is None else list(split_limit(limit, processes))
        self._children = [
            _Child(number, None if share is None else 2 * share)
            for number, share in enumerate(shares)
        ]
        self._payloads = [
            pickle.dumps((fn, share, timeout, retry, rate is not None), pickle.HIGHEST_PROTOCOL)
            for share in shares
        ]
        self._window = None if limit is None else WINDOW_PER_LIMIT * limit

        self._phase = _Phase.IDLE
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: ForkServerContext | SpawnContext | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None
        self._halted = False  # cancel(): no more results beyond those ready
        self._input_done = False
        self._next_index = 0  # the index the next pulled item gets
        self._ready: deque[Any] = deque()
        self._pending: dict[int, Any] = {}  # ordered: done, waiting for earlier items
        self._next_delivery = 0  # ordered: the index the consumer gets next
        self._consumed = 0
        self._consumer: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None  # the feeder waiting for room
        self._flush_handle: asyncio.Handle | None = None
        self._token_requests: deque[_Child] = deque()
        self._token_waiter: asyncio.Future[None] | None = None
        self._completed = 0
        self._failed = 0
        self._histogram = LatencyHistogram()
        self._started_at = 0.0
        self._ended_at: float | None = None
        self._closed: asyncio.Future[None] | None = None  # set when aclose() has finished

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        if self._phase is not _Phase.IDLE:
            return
        loop = self._loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        self._phase = _Phase.RUNNING
        self._context = mp_context()
        self._spawn(self._boot())

    def _spawn(self, coro: Awaitable[None]) -> None:
        assert self._loop is not None
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _boot(self) -> None:
        assert self._loop is not None
        assert self._context is not None
        # Starting the fork server blocks for ~0.1 s the first time: not on the loop.
        await self._loop.run_in_executor(None, warm_up_start_method, self._context)
        for child, payload in zip(self._children, self._payloads, strict=True):
            await self._start_child(child, payload)
        if self._rate is not None:
            self._spawn(self._serve_tokens(RateGate(self._rate)))
        await self._feed()

    async def _start_child(self, child: _Child, payload: bytes) -> None:
        assert self._context is not None
        parent_end, child_end = socket.socketpair()
        process = self._context.Process(
            target=_child_main,
            args=(child_end, payload),
            name=f"corral-shard-{child.number}",
            daemon=True,
        )
        child.process = process
        try:
            process.start()
        except BaseException:
            child.process = None
            parent_end.close()
            raise
        finally:
            child_end.close()
        link = Link(lambda message: self._on_message(child, message), lambda: self._on_lost(child))
        await connect(parent_end, link)
        child.link = link

    @property
    def finished(self) -> bool:
        return self._phase is _Phase.CLOSED

    def _all_done(self) -> bool:
        return self._input_done and all(child.finished for child in self._children)

    # -- feeding ----------------------------------------------------------

    def _free(self) -> int:
        free = sum(child.free() for child in self._children)
        if self._window is not None:
            free = min(free, self._consumed + self._window - self._next_index)
        return free

    async def _wait_for_room(self) -> None:
        assert self._loop is not None
        while self._free() <= 0:
            self._room = self._loop.create_future()
            try:
                await self._room
            finally:
                self._room = None

    def _wake_feeder(self) -> None:
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    async def _feed(self) -> None:
        items = self._items
        try:
            if isinstance(items, AsyncIterable):
                await self._feed_async(aiter(items))
            else:
                await self._feed_sync(iter(items))
        except Exception as exc:  # the input itself raised
            self._fail(exc)
            return
        self._input_done = True
        self._flush()
        for child in self._children:
            if child.link is not None:
                child.link.send(("end",))
        self._check_end()

    async def _feed_sync(self, iterator: Iterator[Any]) -> None:
        while True:
            await self._wait_for_room()
            batch = list(itertools.islice(iterator, self._free()))
            if not batch:
                return
            self._assign(batch)
            # Let results in (and the batch out) before pulling more.
            await asyncio.sleep(0)

    async def _feed_async(self, iterator: AsyncIterator[Any]) -> None:
        while True:
            await self._wait_for_room()
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                return
            self._assign([item])

    def _assign(self, batch: list[Any]) -> None:
        """Give the items, with their indexes, to the children: the least loaded get the most.

        Water-filling: children in order of room, smallest first, each taking
        an equal share of what is left or all its room, whichever is less.
        """
        start = self._next_index
        self._next_index += len(batch)
        pairs = list(enumerate(batch, start))
        children = sorted((c for c in self._children if c.free() > 0), key=_Child.free)
        position = 0
        for number, child in enumerate(children):
            left = len(pairs) - position
            if left <= 0:
                break
            take = min(child.free(), -(-left // (len(children) - number)))
            child.outbox.extend(pairs[position : position + take])
            position += take
        assert position >= len(pairs), "assigned more items than there was room for"
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send what the children were given in this iteration, one message each."""
        self._flush_handle = None
        for child in self._children:
            if child.grants and child.link is not None:
                child.link.send(("tokens", child.grants))
                child.grants = 0
            if not child.outbox:
                continue
            pairs, child.outbox = child.outbox, []
            try:
                payload = pickle.dumps(("items", pairs), pickle.HIGHEST_PROTOCOL)
            except Exception:
                pairs = [pair for pair in pairs if self._picklable_item(*pair)]
                payload = pickle.dumps(("items", pairs), pickle.HIGHEST_PROTOCOL)
            if pairs and child.link is not None:
                child.outstanding += len(pairs)
                child.link.send_payload(payload)

    def _picklable_item(self, index: int, item: Any) -> bool:
        try:
            pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            error = TypeError(
                f"the item {reprlib.repr(item)} cannot be sent to a worker process: it "
                f"cannot be pickled ({exc})"
            )
            self._finish_item(index, False, error)
            return False
        return True

    # -- rate tokens ------------------------------------------------------

    async def _serve_tokens(self, gate: RateGate) -> None:
        """Grant start tokens to the children, first come first served, at the rate."""
        assert self._loop is not None
        requests = self._token_requests
        while True:
            while not requests:
                self._token_waiter = self._loop.create_future()
                try:
                    await self._token_waiter
                finally:
                    self._token_waiter = None
            child = requests.popleft()
            await gate.wait()
            child.grants += 1
            self._schedule_flush()

    # -- messages from the children ---------------------------------------

    def _on_message(self, child: _Child, message: Any) -> None:
        if self._phase is not _Phase.RUNNING or self._error is not None or self._halted:
            return  # over: what was still on its way is not wanted
        kind = message[0]
        if kind == "results":
            _, outcomes, child.started, child.retried = message
            child.outstanding -= len(outcomes)
            child.done += len(outcomes)
            for index, ok, value in outcomes:
                self._finish_item(index, ok, value)
            self._wake_feeder()
        elif kind == "want":
            self._token_requests.extend(itertools.repeat(child, message[1]))
            waiter = self._token_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind == "progress":
            _, child.started, child.retried, latency = message
            histogram = self._histogram
            for bucket, count in latency.items():
                histogram.counts[bucket] += count
                histogram.total += count
        elif kind == "done":
            child.finished = True
            self._check_end()
        elif kind == "broken":
            cause = message[1]
            error = RuntimeError(
                f"the worker processes of processes=N cannot load fn={self._fn!r}: {cause!r}. "
                "Define fn at module level in a module they can import."
            )
            error.__cause__ = cause
            self._fail(error)
        elif kind in ("fatal", "undecodable"):  # the child's map failed, or garbled news
            self._fail(message[1])

    def _finish_item(self, index: int, ok: bool, value: Any) -> None:
        if ok:
            self._completed += 1
        else:
            self._failed += 1
            if not self._return_exceptions:
                self._fail(value)
                return
        if self._ordered:
            if index != self._next_delivery:
                self._pending[index] = value
                return
            ready = self._ready
            ready.append(value)
            index += 1
            pending = self._pending
            while index in pending:
                ready.append(pending.pop(index))
                index += 1
            self._next_delivery = index
        else:
            self._ready.append(value)
        self._wake_consumer()

    def _on_lost(self, child: _Child) -> None:
        if self._phase is _Phase.RUNNING and not child.finished:
            self._spawn(self._report_crash(child))

    async def _report_crash(self, child: _Child) -> None:
        assert child.process is not None
        exitcode = await wait_exit(child.process, 1.0)
        self._fail(
            WorkerCrashed(
                f"worker process {child.number} of processes={len(self._children)} (pid "
                f"{child.process.pid}) died ({describe_exit(exitcode)}) with "
                f"{child.outstanding} items in flight; the map was stopped, since those "
                "items cannot be told apart.",
                exitcode=exitcode,
            )
        )

    def _check_end(self) -> None:
        if not self._all_done():
            return
        if self._ended_at is None and self._loop is not None:
            self._ended_at = self._loop.time()
        ended = self._completed + self._failed
        if self._pending or ended != self._next_index:  # pragma: no cover - a bug, loudly
            self._fail(
                RuntimeError(
                    f"corral bug: {self._next_index} items were sent to the worker processes, "
                    f"{ended} results came back; please report it"
                )
            )
        self._wake_consumer()

    # -- failure and early ends -------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """End the run with ``exc`` (the first failure wins); stop the children now."""
        if self._error is not None or self._halted:
            return
        self._error = exc
        self._stop_now()
        self._wake_consumer()

    def halt(self) -> None:
        """``cancel()``: stop starting and running calls; keep the results already ready."""
        if self._phase is not _Phase.RUNNING or self._error is not None or self._halted:
            return
        self._halted = True
        self._pending.clear()  # in input order: nothing after the first unfinished item
        self._stop_now()
        self._wake_consumer()

    def _stop_now(self) -> None:
        for task in self._tasks:
            task.cancel()
        for child in self._children:
            if child.process is not None and child.process.exitcode is None:
                child.process.terminate()
        if self._ended_at is None and self._loop is not None:
            self._ended_at = self._loop.time()

    # -- the consumer -----------------------------------------------------

    @property
    def ready(self) -> deque[Any]:
        return self._ready

    def take(self) -> Any:
        self._consumed += 1
        if self._room is not None:
            self._wake_feeder()
        return self._ready.popleft()

    def _wake_consumer(self) -> None:
        consumer = self._consumer
        if consumer is not None and not consumer.done():
            consumer.set_result(None)

    async def wait_next(self) -> bool:
        """Wait until a result is ready (True) or the run is over (False); raise its error."""
        self.start()
        while True:
            if self._error is not None:
                await self.aclose()
                raise self._error
            if self._ready:
                return True
            if self._halted or self._all_done() or self._phase is not _Phase.RUNNING:
                await self.aclose()
                if self._error is not None:
                    raise self._error
                return False
            assert self._loop is not None
            self._consumer = self._loop.create_future()
            try:
                await self._consumer
            finally:
                self._consumer = None

    # -- cleanup ----------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the children and every task; idempotent."""
        if self._phase is _Phase.CLOSED:
            return
        if self._phase is _Phase.CLOSING:
            assert self._closed is not None
            await asyncio.shield(self._closed)  # another caller is closing: wait for it
            return
        if self._phase is _Phase.IDLE:
            self._phase = _Phase.CLOSED
            await _close_input(self._items)
            return
        clean = self._error is None and not self._halted and self._all_done()
        self._phase = _Phase.CLOSING
        assert self._loop is not None
        self._closed = self._loop.create_future()
        if not clean:
            self._stop_now()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        try:
            while self._tasks:
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks)
        finally:
            for child in self._children:
                if child.link is not None:
                    child.link.close()
            processes = [c.process for c in self._children if c.process is not None]
            try:
                await stop_processes(processes, grace=EXIT_GRACE if clean else 0.0)
            finally:
                if self._ended_at is None:
                    assert self._loop is not None
                    self._ended_at = self._loop.time()
                self._phase = _Phase.CLOSED
                self._closed.set_result(None)
                self._wake_consumer()
                await _close_input(self._items)

    def abandon(self) -> None:
        """The consumer dropped the stream unclosed: stop the children, close in the background."""
        if self._phase in (_Phase.IDLE, _Phase.CLOSED) or self._loop is None:
            return
        self._stop_now()
        if not self._loop.is_closed():
            loop = self._loop
            loop.call_soon_threadsafe(lambda: loop.create_task(self.aclose()))

    # -- stats ------------------------------------------------------------

    def stats(self) -> Stats:
        if self._phase is _Phase.IDLE or self._loop is None:
            return Stats(0, 0, 0, 0, 0, 0.0, 0.0, self._limit, None, None, None)
        ended = self._ended_at if self._ended_at is not None else self._loop.time()
        elapsed = ended - self._started_at
        done = self._completed + self._failed
        in_flight = 0
        if self._phase is _Phase.RUNNING and self._error is None and not self._halted:
            in_flight = sum(max(0, c.started - c.done) for c in self._children)
        histogram = self._histogram
        return Stats(
            started=done + in_flight,
            completed=self._completed,
            failed=self._failed,
            retried=sum(child.retried for child in self._children),
            in_flight=in_flight,
            elapsed=elapsed,
            throughput=done / elapsed if elapsed > 0 else 0.0,
            limit=self._limit,
            latency_p50=histogram.percentile(0.50),
            latency_p90=histogram.percentile(0.90),
            latency_p99=histogram.percentile(0.99),
        )


async def _close_input(items: object) -> None:
    # Like the engine: an async generator's cleanup runs inside the map.
    if isinstance(items, AsyncIterable):
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


class ShardedStream(ResultStream[R]):
    """The results of ``corral.map(..., processes=N)``: same protocol as :class:`ResultStream`.

    ``async with`` it and ``async for`` over it; ``stats`` sums the children's
    counters; ``cancel()`` ends early keeping what is done; ``aclose()`` (or
    leaving ``async with``) stops every worker process.
    """

    def __init__(self, run: ShardRun[R]) -> None:  # no super().__init__: there is no engine
        self._run = run
        self._ready = run.ready

    @property
    def stats(self) -> Stats:
        """A frozen snapshot of the run's counters (summed over the processes) and latency."""
        return self._run.stats()

    async def __aenter__(self) -> ShardedStream[R]:
        self._run.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[R]:
        return self

    async def __anext__(self) -> R:
        run = self._run
        if self._ready:
            return run.take()  # type: ignore[no-any-return]
        if await run.wait_next():
            return run.take()  # type: ignore[no-any-return]
        raise StopAsyncIteration

    def cancel(self) -> None:
        """End the map early, keeping what is done (see :meth:`ResultStream.cancel`)."""
        self._run.halt()

    async def aclose(self) -> None:
        """Stop the map: terminate the worker processes (unless they are done) and reap them."""
        await self._run.aclose()

    def __del__(self) -> None:
        run = getattr(self, "_run", None)
        if run is not None and not run.finished:
            try:
                run.abandon()
            except RuntimeError:  # pragma: no cover - the loop is already closed
                pass


def map_sharded(
    fn: Callable[[Any], Awaitable[R]],
    items: Iterable[Any] | AsyncIterable[Any],
    *,
    processes: int,
    limit: int | None,
    rate: Rate | None,
    ordered: bool,
    timeout: float | None,
    retry: Retry | None,
    return_exceptions: bool,
) -> ShardedStream[R]:
    """``corral.map(..., processes=N)`` with its arguments already checked and normalised.

    Raises:
        TypeError: at once, when ``fn`` cannot run in another process (a lambda,
            a closure, a plain ``def``), ``limit`` is a Limiter, or ``retries``
            cannot be pickled.
    """
    check_shardable(fn, limit, retry)
    run = ShardRun(
        fn,
        items,
        processes=processes,
        limit=limit,
        rate=rate,
        ordered=ordered,
        timeout=timeout,
        retry=retry,
        return_exceptions=return_exceptions,
    )
    return ShardedStream(run)


# ---------------------------------------------------------------------------
# The child process
# ---------------------------------------------------------------------------


def _child_main(sock: socket.socket, payload: bytes) -> None:
    """A worker process: its own event loop (uvloop when installed) running a corral map."""
    ignore_sigint()
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - depends on the machine
        pass
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_ChildSession(payload).run(sock))


class _Tokens:
    """Start tokens from the parent's rate gate: ask for one per waiting attempt."""

    def __init__(self, session: _ChildSession) -> None:
        self._session = session
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._asked = 0  # asked for, not yet granted

    async def acquire(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        if len(self._waiters) > self._asked:
            self._asked += 1
            self._session.ask_tokens(1)
        await future

    def grant(self, count: int) -> None:
        self._asked -= count
        waiters = self._waiters
        while count and waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled waiter passes its token on
                waiter.set_result(None)
                count -= 1
        # Tokens nobody waits for any more are dropped: a start fewer, never one too many.


class _ChildSession:
    """Everything one child does: take items, run them on a corral map, send results."""

    def __init__(self, payload: bytes) -> None:
        self._payload = payload
        self._link = Link(self._on_message, self._on_lost)
        self._inbox: deque[tuple[int, Any]] = deque()
        self._ended = False  # the parent sent "end": no more items will come
        self._item_waiter: asyncio.Future[None] | None = None
        self._outbox: list[tuple[int, bool, Any]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._tokens: _Tokens | None = None
        self._tokens_wanted = 0
        self._started = 0
        self._retried = 0
        self._histogram = LatencyHistogram()
        self._reported = [0] * len(self._histogram.counts)
        self._closed: asyncio.Future[None] | None = None
        self._main: asyncio.Task[Any] | None = None
        self._leaving = False
        self._report_handle: asyncio.TimerHandle | None = None

    async def run(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        self._main = asyncio.current_task()
        await connect(sock, self._link)
        try:
            await self._serve()
        except asyncio.CancelledError:
            if not self._link.open:
                return  # the parent is gone: nobody to report to
            raise
        finally:
            self._leaving = True
            if self._report_handle is not None:
                self._report_handle.cancel()
            self._link.close()
            await asyncio.shield(self._closed)  # the buffered results are flushed

    async def _serve(self) -> None:
        try:
            fn, limit, timeout, retry, paced = pickle.loads(self._payload)
        except Exception as exc:
            self._link.send(("broken", portable(exc)))
            return
        from ._api import map as corral_map  # here: _api imports this module

        if paced:
            self._tokens = _Tokens(self)
        loop = asyncio.get_running_loop()
        self._report_handle = loop.call_later(STATS_INTERVAL, self._report_progress)
        try:
            run_item = self._item_runner(fn, timeout, retry)
            async with corral_map(run_item, self._items(), limit=limit, ordered=False) as out:
                async for outcome in out:
                    self._outbox.append(outcome)
                    if self._flush_handle is None:
                        self._flush_handle = loop.call_soon(self._flush)
        except Exception as exc:
            self._flush()
            self._link.send(("fatal", portable(exc)))
            return
        finally:
            if self._report_handle is not None:
                self._report_handle.cancel()
        self._flush()
        self._send_progress()
        self._link.send(("done",))

    def _item_runner(
        self, fn: Callable[[Any], Awaitable[Any]], timeout: float | None, retry: Retry | None
    ) -> Callable[[tuple[int, Any]], Awaitable[tuple[int, bool, Any]]]:
        """The per-item call: tokens, timeout and retries around ``fn``; never raises."""
        rng = random.Random()
        tokens = self._tokens
        histogram = self._histogram
        clock = asyncio.get_running_loop().time

        async def attempt(item: Any) -> Any:
            if tokens is not None:
                await tokens.acquire()
            if timeout is None:
                return await fn(item)
            async with asyncio.timeout(timeout):
                return await fn(item)

        async def run_item(pair: tuple[int, Any]) -> tuple[int, bool, Any]:
            index, item = pair
            self._started += 1
            began = clock()
            calls = 1
            try:
                while True:
                    try:
                        return (index, True, await attempt(item))
                    except Exception as exc:
                        wait = None if retry is None else retry.next_wait(exc, calls, rng)
                        if wait is None:
                            return (index, False, portable(exc))
                    self._retried += 1
                    calls += 1
                    await asyncio.sleep(wait)
            finally:
                histogram.add(clock() - began)

        return run_item

    async def _items(self) -> AsyncIterator[tuple[int, Any]]:
        inbox = self._inbox
        loop = asyncio.get_running_loop()
        while True:
            if inbox:
                yield inbox.popleft()
            elif self._ended:
                return
            else:
                self._item_waiter = loop.create_future()
                try:
                    await self._item_waiter
                finally:
                    self._item_waiter = None

    # -- messages ---------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        kind = message[0]
        if kind == "items":
            self._inbox.extend(message[1])
        elif kind == "end":
            self._ended = True
        elif kind == "tokens":
            assert self._tokens is not None
            self._tokens.grant(message[1])
            return
        elif kind == "undecodable":  # items this process cannot unpickle: their indexes
            self._link.send(("fatal", message[1]))  # are lost with them, so the map must end
            return
        waiter = self._item_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_lost(self) -> None:
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if not self._leaving and self._main is not None:
            self._main.cancel()  # the parent is gone: stop

    def ask_tokens(self, count: int) -> None:
        self._tokens_wanted += count
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._tokens_wanted:
            self._link.send(("want", self._tokens_wanted))
            self._tokens_wanted = 0
        if not self._outbox:
            return
        outcomes, self._outbox = self._outbox, []
        message = ("results", outcomes, self._started, self._retried)
        try:
            payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        except Exception:
            safe = []
            for index, ok, value in outcomes:
                checked = picklable_value(value)
                safe.append((index, ok and checked is value, checked))
            payload = pickle.dumps(
                ("results", safe, self._started, self._retried), pickle.HIGHEST_PROTOCOL
            )
        self._link.send_payload(payload)

    def _send_progress(self) -> None:
        """Counters and the latency histogram's growth since the last report."""
        counts, reported = self._histogram.counts, self._reported
        delta = {i: c - reported[i] for i, c in enumerate(counts) if c != reported[i]}
        self._reported = list(counts)
        self._link.send(("progress", self._started, self._retried, delta))

    def _report_progress(self) -> None:
        self._send_progress()
        loop = asyncio.get_running_loop()
        self._report_handle = loop.call_later(STATS_INTERVAL, self._report_progress)
