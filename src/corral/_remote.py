"""Maps whose calls run elsewhere: the side in this process, shared by both backends.

``processes=N`` (see _shard) and ``backend="ray"`` (see _ray) run the calls of
one map on other event loops, in worker processes or Ray actors, each with
corral's own engine and its share of ``limit``. How items travel there and
outcomes travel back differs; everything this process does around that is
the same, and lives here::

    input ──> feeder ──batches──> workers ──outcomes──> merge by index ──> consumer
                ^                                                            │
                └─────── room: the workers' capacity, the window ahead ──────┘

:class:`RemoteRun` is that common part, and a backend subclasses it:

- **Feeding, lazily**: the feeder pulls from the input only when there is
  room, the least of what the workers can take (:meth:`~RemoteRun._worker_room`)
  and of the window the run may go ahead of the consumer, so an endless
  input streams through in bounded memory and the reorder buffer behind a
  slow item is bounded too. A sync input is pulled a batch at a time, an
  async one an item at a time; :meth:`~RemoteRun._dispatch` sends them.
- **Merging, exactly once**: every item gets its input index when pulled;
  its outcome (alone, or with a chunk of neighbours) is handed out in input
  order through a reorder buffer, or as it arrives with ``ordered=False``.
  At the end, the items sent and the outcomes back must match.
- **Ending**: the first failure wins (a failure to start the workers
  too) and stops the workers (:meth:`~RemoteRun._stop_workers`);
  ``cancel()`` keeps what is ready; ``aclose()`` finishes every task, lets
  the backend release its workers, and closes an async input; a stream
  dropped unclosed is closed in the background.
- **Stats**: ``completed`` and ``failed`` are counted here as outcomes
  arrive; the latency histogram is the workers' growth reports summed; the
  backend says what was started, is in flight and was retried.

:class:`RemoteStream` is :class:`ResultStream`'s protocol over a run.

``checkpoint=``, ``deadline=`` and ``progress=`` belong to corral's engine,
and a remote run has none here. With one of them the map is that engine,
in this process, whose call of one item is :class:`RemoteCall`: it hands the
item to a run (fed by :class:`Submissions` instead of the input) and returns
a future its outcome settles. The engine keeps the order, the window, the
checkpoint's records and replays, the deadline and the progress display; the
workers keep the limit, rate, timeouts and retries. It costs a future and a
trip through the engine per item, so a map without those keywords keeps the
direct path above.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import enum
import itertools
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._engine import CONCURRENT_READERS, Halt, ResultStream, close_in_background, wait_closed
from ._stats import LatencyHistogram, Stats

if TYPE_CHECKING:
    from ._engine import _Retried
    from ._retry import Retry
    from ._retry_budget import RetryBudget, RetryBudgetState

R = TypeVar("R")
Call = Callable[[Any], Awaitable[Any]]


def split_limit(limit: int, workers: int) -> list[int]:
    """Shares of ``limit`` for ``workers`` workers, as equal as can be, none zero."""
    count = min(workers, limit)
    base, extra = divmod(limit, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def split_retry_budget(retry: Retry | None, workers: int) -> list[RetryBudget | None]:
    """Each worker's retry budget: the same ratio of its own successes, a share of the floor.

    Every worker keeps its own budget (it sees only its own calls), so the
    whole map keeps ``ratio`` of all its successes; the floor, the retries
    allowed whatever the successes, is split rather than multiplied by the
    number of workers: 10 over 4 is 3, 3, 2 and 2 (a fractional floor is
    split evenly).
    """
    budget = None if retry is None else retry.budget
    if budget is None:
        return [None] * workers
    assert not isinstance(budget, float | int)  # normalised by Retry
    floor = float(budget.floor)  # an int too: RetryBudget(floor=10)
    if floor.is_integer():
        base, extra = divmod(int(floor), workers)
        shares = [float(base + (1 if i < extra else 0)) for i in range(workers)]
    else:
        shares = [floor / workers] * workers
    return [dataclasses.replace(budget, floor=share) for share in shares]


def worker_call(
    fn: Call,
    *,
    timeout: float | None,
    retry: Retry | None,
    budget: RetryBudgetState | None,
    retried: _Retried,
    pace: Callable[[], Awaitable[None]] | None = None,
) -> Call:
    """The call a worker makes per item: ``fn`` with its timeout, pace and retries.

    Each attempt (retries too) waits for ``pace`` (a start token) and then
    runs under ``timeout``; failed attempts are retried as ``retry`` says,
    drawing on the worker's retry ``budget``, and counted in ``retried``. A
    retry the budget refuses fails the item with RetryBudgetExhausted, as in
    one process.
    """
    from ._api import _with_retries, _with_timeout  # here: _api imports the backends

    call = fn if timeout is None else _with_timeout(fn, timeout)
    if pace is not None:
        timed, wait = call, pace

        async def paced(item: Any) -> Any:
            await wait()
            return await timed(item)

        call = paced
    if retry is not None:
        call = _with_retries(call, retry, retried, budget)
    return call


@dataclasses.dataclass(frozen=True, slots=True)
class RemoteOptions:
    """The keywords of a map that every remote backend takes, checked and normalised."""

    limit: int | None
    ordered: bool
    timeout: float | None
    retry: Retry | None
    return_exceptions: bool


class _Phase(enum.Enum):
    IDLE = "idle"  # created; nothing started
    RUNNING = "running"  # workers starting or running, items flowing
    CLOSING = "closing"  # ended, failed or left: the workers being stopped
    CLOSED = "closed"  # every worker stopped, every task finished


async def finish_tasks(
    tasks: set[asyncio.Task[None]], *, cancel: bool, grace: float | None = None
) -> None:
    """Wait for ``tasks`` (cancelling them first, or after ``grace`` seconds)."""
    while tasks:
        batch = list(tasks)
        if cancel:
            for task in batch:
                task.cancel()
            await asyncio.wait(batch)
            continue
        _, late = await asyncio.wait(batch, timeout=grace)
        cancel = True  # whatever is still waiting after the grace is cancelled
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)


async def _close_input(items: object) -> None:
    # Like the engine: an async generator's cleanup runs inside the map.
    if isinstance(items, AsyncIterable):
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


class RemoteRun(abc.ABC, Generic[R]):
    """This process's side of a map run by remote workers: feeder, merge, stats, cleanup.

    A backend provides the workers: :meth:`_boot` (start them, then
    ``await self._feed()``), :meth:`_worker_room`, :meth:`_dispatch`,
    :meth:`_all_done`, :meth:`_stop_workers`, :meth:`_release` and
    :meth:`_counts`; and reports outcomes with :meth:`_deliver_items`
    (item by item) or :meth:`_deliver_chunk` (consecutive items at once).
    """

    #: What the workers are called in messages.
    workers_name = "workers"

    def __init__(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any] | AsyncIterable[Any] | Submissions,
        options: RemoteOptions,
    ) -> None:
        self._fn = fn
        self._items = items
        self._options = options
        self._limit = options.limit
        self._ordered = options.ordered
        self._return_exceptions = options.return_exceptions
        self._window: int | None = None  # items the run may go ahead of the consumer
        # Set by RemoteCall: outcomes go to its per-item futures, not to a consumer.
        self._sink: RemoteCall | None = None

        self._phase = _Phase.IDLE
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None
        self._halted = False  # cancel(): no more results beyond those ready
        self._input_done = False
        self._next_index = 0  # the index the next pulled item gets
        self._ready: deque[Any] = deque()
        # ordered: outcomes done before an earlier one (or chunks of them), by first index
        self._pending: dict[int, Any] = {}
        self._next_delivery = 0  # ordered: the index the consumer gets next
        self._consumed = 0
        self._consumer: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None  # the feeder waiting for room
        self._completed = 0
        self._failed = 0
        self._histogram = LatencyHistogram()
        self._started_at = 0.0
        self._ended_at: float | None = None
        self._closed: asyncio.Future[None] | None = None  # set when aclose() has finished

    # -- what a backend provides -------------------------------------------

    @abc.abstractmethod
    async def _boot(self) -> None:
        """Start the workers, then ``await self._feed()``."""

    @abc.abstractmethod
    def _worker_room(self) -> int:
        """Items the workers can take now (the window is applied on top)."""

    @abc.abstractmethod
    def _dispatch(self, batch: list[Any]) -> None:
        """Send ``batch``, items ``self._next_index`` onwards, and advance ``_next_index``."""

    def _input_ended(self) -> None:
        """The input is exhausted and every item dispatched (e.g. tell the workers)."""

    @abc.abstractmethod
    def _all_done(self) -> bool:
        """The input is exhausted and every outcome has arrived."""

    @abc.abstractmethod
    def _stop_workers(self) -> None:
        """Stop every call now (on failure, ``cancel()`` or an unclean exit)."""

    async def _settle(self) -> None:
        """While closing: finish this run's tasks."""
        await finish_tasks(self._tasks, cancel=True)

    @abc.abstractmethod
    async def _release(self, clean: bool) -> None:
        """While closing, after :meth:`_settle`: stop and reap the workers."""

    @abc.abstractmethod
    def _counts(self, done: int, running: bool) -> tuple[int, int, int]:
        """``(started, in_flight, retried)`` for stats; ``in_flight`` is 0 unless ``running``."""

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        if self._phase is not _Phase.IDLE or self._halted:
            return  # cancelled before it started: it never will (as in one process)
        loop = self._loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        self._phase = _Phase.RUNNING
        self._spawn(self._begin())

    async def _begin(self) -> None:
        try:
            await self._boot()
        except Exception as exc:  # the workers could not start: the consumer must hear of it
            self._fail(exc)

    def _spawn(self, coro: Awaitable[None], into: set[asyncio.Task[None]] | None = None) -> None:
        assert self._loop is not None
        tasks = self._tasks if into is None else into
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    @property
    def finished(self) -> bool:
        return self._phase is _Phase.CLOSED

    def _live(self) -> bool:
        """Running, not failed, not cancelled: outcomes are still wanted."""
        return self._phase is _Phase.RUNNING and self._error is None and not self._halted

    # -- feeding ----------------------------------------------------------

    def _space(self) -> int:
        """Items the feeder may pull now (<= 0: wait)."""
        room = self._worker_room()
        if self._window is not None and self._sink is None:
            room = min(room, self._consumed + self._window - self._next_index)
        return room

    async def _wait_for_room(self) -> int:
        assert self._loop is not None
        while (room := self._space()) <= 0:
            self._room = self._loop.create_future()
            try:
                await self._room
            finally:
                self._room = None
        return room

    def _wake_feeder(self) -> None:
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    async def _feed(self) -> None:
        items = self._items
        try:
            if isinstance(items, Submissions):
                await self._feed_submissions(items)
            elif isinstance(items, AsyncIterable):
                await self._feed_async(aiter(items))
            else:
                await self._feed_sync(iter(items))
        except Exception as exc:  # the input itself raised (or a batch could not be sent)
            self._fail(exc)
            return
        except (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt, SystemExit):
            raise  # stopped, or out of the loop as from anywhere else
        except BaseException as exc:
            # Not an Exception: ending quietly would read as the end of the
            # input, and the consumer would wait for ever. Raised as the map's
            # failure, as in one process.
            self._fail(exc)
            return
        self._input_done = True
        self._input_ended()
        self._check_end()

    async def _feed_sync(self, iterator: Iterator[Any]) -> None:
        while True:
            room = await self._wait_for_room()
            batch = list(itertools.islice(iterator, room))
            if not batch:
                return
            self._dispatch(batch)
            # Let outcomes in (and the batch out) before pulling more.
            await asyncio.sleep(0)

    async def _feed_async(self, iterator: AsyncIterator[Any]) -> None:
        while True:
            await self._wait_for_room()
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                return
            self._dispatch([item])

    async def _feed_submissions(self, submissions: Submissions) -> None:
        # Whatever the calls handed over since the last batch goes as one.
        while True:
            room = await self._wait_for_room()
            batch = await submissions.take(room)
            if batch is None:
                return
            self._dispatch(batch)

    # -- merging ----------------------------------------------------------

    # A run delivers either item by item (its pending values are outcomes)
    # or chunk by chunk (lists of outcomes), never both. The per-item path is
    # the hot one (every result of processes=N crosses it): one call per batch.

    def _deliver_items(self, outcomes: Iterable[tuple[int, bool, Any]]) -> None:
        """Count and hand out ``(index, ok, value)`` outcomes, in input order when ordered.

        A failed one (``ok`` false) ends the run unless ``return_exceptions``.
        """
        if self._sink is not None:
            outcomes = list(outcomes)  # walked twice
            for _, ok, _ in outcomes:
                if ok:
                    self._completed += 1
                else:
                    self._failed += 1
            self._sink.deliver(outcomes)
            return
        ready, pending = self._ready, self._pending
        for index, ok, value in outcomes:
            if ok:
                self._completed += 1
            else:
                self._failed += 1
                if not self._return_exceptions:
                    self._fail(value)
                    continue
            if not self._ordered:
                ready.append(value)
            elif index != self._next_delivery:
                pending[index] = value
            else:
                ready.append(value)
                index += 1
                while index in pending:
                    ready.append(pending.pop(index))
                    index += 1
                self._next_delivery = index
        self._wake_consumer()

    def _deliver_chunk(self, start: int, values: list[Any], failed: list[int]) -> None:
        """Count and hand out the outcomes of items ``start`` onwards.

        ``failed`` holds the offsets (in ``values``) of the failed ones, whose
        values are their exceptions.
        """
        self._failed += len(failed)
        self._completed += len(values) - len(failed)
        if self._sink is not None:
            errors = set(failed)
            self._sink.deliver(
                (start + offset, offset not in errors, value) for offset, value in enumerate(values)
            )
            return
        ready, pending = self._ready, self._pending
        if not self._ordered:
            ready.extend(values)
        elif start != self._next_delivery:
            pending[start] = values
            return
        else:
            ready.extend(values)
            index = start + len(values)
            while index in pending:
                later = pending.pop(index)
                ready.extend(later)
                index += len(later)
            self._next_delivery = index
        self._wake_consumer()

    def _add_latency(self, growth: Mapping[int, int]) -> None:
        """Sum a worker's latency histogram growth (bucket: count) into the run's."""
        histogram = self._histogram
        for bucket, count in growth.items():
            histogram.counts[bucket] += count
            histogram.total += count

    def _check_end(self) -> None:
        if not self._all_done():
            return
        if self._ended_at is None and self._loop is not None:
            self._ended_at = self._loop.time()
        ended = self._completed + self._failed
        if self._pending or ended != self._next_index:  # pragma: no cover - a bug, loudly
            self._fail(
                RuntimeError(
                    f"corral bug: {self._next_index} items were sent to the "
                    f"{self.workers_name}, {ended} results came back; please report it"
                )
            )
        self._wake_consumer()

    # -- failure and early ends -------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """End the run with ``exc`` (the first failure wins); stop the workers now."""
        if self._error is not None or self._halted:
            return
        self._error = exc
        self._stop_now()
        if self._sink is not None:
            self._sink.fail(exc)
        self._wake_consumer()

    def cancel(self) -> None:
        """``cancel()``: stop starting and running calls; keep the results already ready."""
        if self._phase is _Phase.IDLE:
            self._halted = True  # before it started: no worker is ever started
            return
        if not self._live():
            return
        self._halted = True
        self._pending.clear()  # in input order: nothing after the first unfinished item
        self._stop_now()
        self._wake_consumer()

    def _stop_now(self) -> None:
        for task in self._tasks:
            task.cancel()  # the feeder: nothing more is pulled or sent
        self._stop_workers()
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
            if self._consumer is not None:
                raise RuntimeError(CONCURRENT_READERS)
            self._consumer = self._loop.create_future()
            try:
                await self._consumer
            finally:
                self._consumer = None

    # -- cleanup ----------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the workers (unless they are done) and every task, close the input; idempotent."""
        if self._phase is _Phase.CLOSED:
            return
        if self._phase is _Phase.CLOSING:
            assert self._closed is not None
            await wait_closed(self._closed)  # another caller is closing: wait for it
            return
        if self._phase is _Phase.IDLE:
            self._phase = _Phase.CLOSED
            await _close_input(self._items)
            return
        clean = self._error is None and not self._halted and self._all_done()
        self._phase = _Phase.CLOSING
        assert self._loop is not None
        closed = self._closed = self._loop.create_future()
        if not clean:
            self._stop_now()
        interrupted: asyncio.CancelledError | None = None
        try:
            # Until every task has finished: a cancellation of this close (an
            # outer timeout, a second Ctrl-C) does not stop it halfway, or the
            # feeder could outlive it, still inside the async input this close
            # then fails to close. It is raised once all is done, as in one process.
            while True:
                try:
                    await self._settle()
                    break
                except asyncio.CancelledError as exc:
                    interrupted = exc
        finally:
            try:
                await self._release(clean)
            finally:
                if self._ended_at is None:
                    self._ended_at = self._loop.time()
                self._phase = _Phase.CLOSED
                closed.set_result(None)
                self._wake_consumer()
                await _close_input(self._items)
        if interrupted is not None:
            raise interrupted

    def abandon(self) -> None:
        """The consumer dropped the stream unclosed: stop the workers, close in the background."""
        if self._phase in (_Phase.IDLE, _Phase.CLOSED) or self._loop is None:
            return
        self._stop_now()
        self._drop_links()
        if not self._loop.is_closed():
            close_in_background(self._loop, self.aclose)

    def _drop_links(self) -> None:
        """Abandoned: close the links to the workers now (the close may never get to it)."""

    # -- stats ------------------------------------------------------------

    def stats(self) -> Stats:
        if self._phase is _Phase.IDLE or self._loop is None:
            return Stats(0, 0, 0, 0, 0, 0.0, 0.0, self._limit, None, None, None)
        ended = self._ended_at if self._ended_at is not None else self._loop.time()
        elapsed = ended - self._started_at
        done = self._completed + self._failed
        # Asked as if running, so that the calls an early stop cut short still
        # count as started (as in one process); none is in flight once stopped.
        started, in_flight, retried = self._counts(done, True)
        if not self._live():
            in_flight = 0
        histogram = self._histogram
        return Stats(
            started=started,
            completed=self._completed,
            failed=self._failed,
            retried=retried,
            in_flight=in_flight,
            elapsed=elapsed,
            throughput=done / elapsed if elapsed > 0 else 0.0,
            limit=self._limit,
            latency_p50=histogram.percentile(0.50),
            latency_p90=histogram.percentile(0.90),
            latency_p99=histogram.percentile(0.99),
        )


class RemoteStream(ResultStream[R]):
    """The results of a map run by remote workers: same protocol as :class:`ResultStream`.

    ``async with`` it and ``async for`` over it; ``stats`` counts what came
    back from the workers; ``cancel()`` ends early keeping what is done;
    ``aclose()`` (or leaving ``async with``) stops every worker.
    """

    def __init__(self, run: RemoteRun[R]) -> None:
        super().__init__(run)
        self._run = run  # the backend's own run (its workers), beyond the Run protocol


# ---------------------------------------------------------------------------
# A remote run as a per-item call, for a map whose engine runs in this process
# ---------------------------------------------------------------------------


class Submissions:
    """The input of a run driven by :class:`RemoteCall`: items handed over one by one."""

    __slots__ = ("_closed", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: Any) -> None:
        self._items.append(item)
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self, room: int) -> list[Any] | None:
        """Up to ``room`` items, waiting for one; None once closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        batch = self._items[:room]
        del self._items[:room]
        return batch


class RemoteCall:
    """A :class:`RemoteRun` seen as a call of one item, for a map run by an engine here.

    ``checkpoint=``, ``deadline=`` and ``progress=`` are features of corral's
    engine, which runs in this process: with ``processes=N`` or
    ``backend="ray"`` they keep working by putting that engine in front of
    the remote workers. The engine pulls the items, orders the results,
    records and replays them, keeps the deadline and shows progress; its
    call hands an item to the run and returns a future the item's outcome
    settles. The run's workers still make the calls (timeouts, retries, rate
    and the limit are theirs); they see the items the engine sends, so a
    replayed item never leaves this process.

    The run delivers outcomes as they come (``ordered=False``) and every
    failure as an outcome (``return_exceptions=True``): the engine decides
    what a failure means. A failure of the run itself (a worker crashed, fn
    cannot be loaded) is no item's failure: every waiting call raises
    :class:`~corral._engine.Halt` with it, which stops the map without
    recording anything.
    """

    def __init__(self, run: RemoteRun[Any], submissions: Submissions, retried: _Retried) -> None:
        self._run = run
        self._submissions = submissions
        self.retried = retried  # the engine's stats read the workers' retries here
        self._futures: dict[int, asyncio.Future[Any]] = {}  # by run index: no outcome yet
        self._submitted = 0
        self._create_future: Callable[[], asyncio.Future[Any]] | None = None
        run._sink = self

    def __call__(self, item: Any) -> asyncio.Future[Any]:
        run = self._run
        create = self._create_future
        if create is None:  # the first item: the run starts on the map's loop
            run.start()
            create = self._create_future = asyncio.get_running_loop().create_future
        future: asyncio.Future[Any] = create()
        if run._error is not None:
            future.set_exception(Halt(run._error))
            return future
        # The run numbers items in the order they are handed over.
        self._futures[self._submitted] = future
        self._submitted += 1
        self._submissions.put(item)
        return future

    def unstarted(self) -> int:
        """Items handed to the run that its workers have not started (queued there).

        The engine counts an item started when it hands it over; its stats
        take these off, so that ``started`` and ``in_flight`` count the calls
        the workers run, as without the engine (see Engine's ``unstarted``).
        """
        run = self._run
        if run._phase is _Phase.IDLE:
            return self._submitted
        started = run._counts(run._completed + run._failed, True)[0]
        return max(0, self._submitted - started)

    def deliver(self, outcomes: Iterable[tuple[int, bool, Any]]) -> None:
        futures = self._futures
        for index, ok, value in outcomes:
            future = futures.pop(index, None)
            if future is None or future.done():
                continue  # its call was cancelled (cancel(), the deadline)
            if ok:
                future.set_result(value)
            else:
                future.set_exception(_raisable(value))
        self.retried.count = self._run._counts(0, False)[2]

    def fail(self, exc: BaseException) -> None:
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                # started=True: which of these items the workers started is
                # unknown here; ``unstarted`` already takes off those they did
                # not, so the engine must not count them as not run again.
                future.set_exception(Halt(exc, started=True))
                future.exception()  # seen: a call already cancelled does not await it

    def abandon(self) -> None:
        """The engine's abandon hook: its stream was dropped unclosed; stop the workers now.

        The engine's close follows in the background and may not run to its
        end (``asyncio.run`` closes the loop first): the workers must not
        outlive the map meanwhile, as they do not without the engine.
        """
        self._submissions.close()
        run = self._run
        if run._phase is _Phase.RUNNING:
            run._stop_now()
            run._drop_links()

    async def close(self, clean: bool) -> None:
        """The engine's close hook: let the run finish (clean) or stop its workers."""
        self._submissions.close()
        run = self._run
        try:
            if clean and not self._futures and run._phase is _Phase.RUNNING:
                # Every outcome is in: the run ends as the workers finish, and
                # raises its own error if one came after the last outcome,
                # whether before this close or during it (as the map without
                # an engine in front does).
                try:
                    while await run.wait_next():  # pragma: no cover - nothing is ever ready
                        run.take()
                except BaseException:
                    # Interrupted (an outer timeout, a second Ctrl-C): the close
                    # goes on, stopping the workers, before it is raised.
                    await run.aclose()
                    raise
            else:
                await run.aclose()
        finally:
            for future in self._futures.values():
                future.cancel()
            self._futures.clear()


def _raisable(value: Any) -> BaseException:
    # A future refuses StopIteration; a coroutine raising it fails with
    # RuntimeError in this process too.
    if isinstance(value, StopIteration):
        error = RuntimeError(f"fn raised {type(value).__name__}")
        error.__cause__ = value
        return error
    assert isinstance(value, BaseException)
    return value
